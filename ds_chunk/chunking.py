"""Chunk boundaries, the global label shift, and supervised-token counts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def chunk_bounds(seq_len: int, chunk_size: int) -> list[tuple[int, int]]:
    """[(start, end), ...] covering 0..seq_len; the last chunk may be shorter."""
    return [(s, min(s + chunk_size, seq_len)) for s in range(0, seq_len, chunk_size)]


def prepare_labels(
    input_ids: torch.Tensor, labels: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Return the target of every position, shifted once for the whole sequence.

    HF shifts labels inside the model call; doing that per chunk would drop the
    prediction of chunk i+1's first token from chunk i's last one. So we shift here:
    ``target[:, t] = labels[:, t + 1]`` and the last position predicts nothing.
    ``labels=None`` means ``labels = input_ids`` with padding (attention_mask == 0)
    ignored, as HF's data collators do.
    """
    if labels is None:
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX) if attention_mask is not None else input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
    target = torch.full_like(labels, IGNORE_INDEX)
    target[:, :-1] = labels[:, 1:]
    return target


def pad_right(ids, labels, mask, pos, pad: int) -> tuple:
    """(input_ids, labels, attention_mask, position_ids) with ``pad`` more tokens on the right:
    mask 0, label -100 (labels and mask made explicit); positions go on counting, so padding
    never makes a row look packed. Unchanged for pad 0."""
    if pad == 0:
        return ids, labels, mask, pos
    mask = torch.ones_like(ids) if mask is None else mask
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else labels
    padded = [F.pad(t, (0, pad), value=v) for t, v in ((ids, 0), (labels, IGNORE_INDEX), (mask, 0))]
    if pos is not None:
        pos = pos.unsqueeze(0) if pos.dim() == 1 else pos
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, pad + 1, device=pos.device)], dim=1)
    return *padded, pos


def check_inputs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_positions: int | None,
    position_ids: torch.Tensor | None = None,
) -> None:
    """Clear errors for inputs that would otherwise fail deep inside torch. With position_ids
    the longest sequence is one more than their largest (packed rows: the longest document)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    batch, seq_len = input_ids.shape
    if batch == 0 or seq_len == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(input_ids.shape)}")
    longest = seq_len if position_ids is None or not position_ids.numel() else int(position_ids.max()) + 1
    if max_positions is not None and longest > max_positions:
        raise ValueError(
            f"sequence of {longest} tokens exceeds the {max_positions} positions the model takes "
            "(max_position_embeddings times any RoPE scaling factor; model.rope_scaling extends it)"
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}"
            )
        mask = attention_mask.bool()
        if not mask[:, 0].all():
            raise ValueError("left padding is not supported: pad on the right (attention_mask[:, 0] must be 1)")
        if (mask[:, 1:] & ~mask[:, :-1]).any():
            raise ValueError("attention_mask must be right padding: ones, then zeros, in every row")


def join_kept(
    bounds: list[tuple[int, int]], has_loss: list[bool], keep: int
) -> tuple[list[tuple[int, int]], list[bool], int]:
    """The last supervised chunk joined with the ``keep`` chunks before it (``keep_chunks``):
    one chunk that runs once, with autograd, so the joined chunks need no no-grad forward.

    Returns the bounds and flags to run, and the index of the joined chunk's first original
    chunk (run chunk j > first is original chunk j + the number joined away).
    """
    if not any(has_loss):  # nothing to replay (a micro-batch of prompt tokens only)
        return bounds, has_loss, 0
    last = max(c for c, x in enumerate(has_loss) if x)
    first = max(0, last - keep)
    joined = [(bounds[first][0], bounds[last][1])]
    return bounds[:first] + joined + bounds[last + 1 :], has_loss[:first] + [True] + has_loss[last + 1 :], first
