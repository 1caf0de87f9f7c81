"""Chunk loss: LM head + cross-entropy, optionally in sub-chunks, normalised globally."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ds_chunk.chunking import IGNORE_INDEX


def _ce_sum(lm_head: Callable, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden)  # [B, c, V]
    # HF upcasts half-precision logits to float32 for the loss; keep float64 as is.
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def chunk_loss(
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    target: torch.Tensor,
    normalizer: int,
    sub_chunk: int | None = None,
    skip_unsupervised: bool = True,
) -> torch.Tensor:
    """sum of token CE over the chunk / normalizer (the supervised tokens of the whole step).

    lm_head: hidden -> logits as the model computes them (``adapter.lm_head``).
    hidden: [B, C, H] final hidden states; target: [B, C] globally shifted labels.
    With ``sub_chunk``, the LM head runs on ``sub_chunk`` tokens at a time under
    non-reentrant checkpointing, so at most [B, sub_chunk, V] logits exist at once in
    forward and in backward. Sub-chunks without a supervised token are skipped, unless
    ``skip_unsupervised`` is False (ranks that must call the LM head alike: ZeRO-3).
    """
    step = sub_chunk or hidden.shape[1]
    total = hidden.new_zeros((), dtype=torch.float32 if hidden.dtype != torch.float64 else torch.float64)
    for s in range(0, hidden.shape[1], step):
        h, t = hidden[:, s : s + step], target[:, s : s + step]
        if skip_unsupervised and not (t != IGNORE_INDEX).any():
            continue
        if sub_chunk is None or not torch.is_grad_enabled():
            total = total + _ce_sum(lm_head, h, t)
        else:
            total = total + checkpoint(_ce_sum, lm_head, h, t, use_reentrant=False)
    return total / normalizer
