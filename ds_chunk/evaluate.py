"""Evaluation without gradients, chunk by chunk, in the memory one training chunk needs."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import torch
from torch import nn

from ds_chunk.adapter import cache_kwarg, full_length_rope, lm_head, text_config, unwrap
from ds_chunk.attention import chunk_attention
from ds_chunk.bnb import no_cpu_inference_packing
from ds_chunk.chunking import IGNORE_INDEX, chunk_bounds, prepare_labels
from ds_chunk.documents import Layout, MaskKind, check_packed
from ds_chunk.kv import ChunkCache, KVStore
from ds_chunk.loss import auto_sub_chunk, token_entropy
from ds_chunk.router import RouterLoss


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], chunk_size: int) -> dict[str, float]:
    """Mean CE, perplexity, token accuracy, entropy of the predicted distribution and
    whole-answer accuracy over supervised tokens; for an MoE model whose loss adds the router's
    load-balancing loss, ``aux_loss`` too (its mean over the batches, before the coefficient).

    ``sequence_accuracy`` counts a row as right when every supervised token of it is
    predicted (argmax) correctly: recall / passkey accuracy for the synthetic tasks.
    """
    hf = unwrap(model)
    was_training = hf.training
    hf.eval()  # no dropout; the 4-bit repacking this would trigger is switched off below
    totals = {"nll": 0.0, "entropy": 0.0, "tokens": 0, "correct": 0, "rows": 0, "rows_correct": 0, "aux": []}
    try:
        with no_cpu_inference_packing(hf):
            for batch in batches:
                _accumulate(hf, batch, chunk_size, totals)
    finally:
        hf.train(was_training)
    n = max(totals["tokens"], 1)
    aux = {"aux_loss": sum(totals["aux"]) / len(totals["aux"])} if totals["aux"] else {}
    return {
        **aux,
        "loss": totals["nll"] / n,
        "perplexity": math.exp(min(totals["nll"] / n, 50.0)),
        "token_accuracy": totals["correct"] / n,
        "entropy": totals["entropy"] / n,
        "sequence_accuracy": totals["rows_correct"] / max(totals["rows"], 1),
        "tokens": totals["tokens"],
    }


def _nll_and_hits(head, hidden: torch.Tensor, target: torch.Tensor, step: int, totals: dict) -> torch.Tensor:
    """Add the CE sum of hidden [n, H] to totals; whether each argmax is right. ``step``
    positions at a time (``loss.auto_sub_chunk``), so no more than [step, V] logits exist."""
    hits = []
    for s in range(0, hidden.shape[0], step):
        logits = head(hidden[s : s + step]).float()  # [step, V]
        totals["nll"] += float(torch.nn.functional.cross_entropy(logits, target[s : s + step], reduction="sum"))
        totals["entropy"] += float(token_entropy(logits).sum())
        hits.append(logits.argmax(-1) == target[s : s + step])
    return torch.cat(hits)


def _accumulate(hf: nn.Module, batch: dict, chunk_size: int, totals: dict) -> None:
    device = next(hf.parameters()).device
    ids, labels, mask, pos = (
        None if batch.get(k) is None else batch[k].to(device)
        for k in ("input_ids", "labels", "attention_mask", "position_ids")
    )
    target = prepare_labels(ids, labels, mask)
    layout = Layout.of(ids, pos)
    check_packed(hf, layout.packed)
    decoder, head = hf.get_decoder(), lm_head(hf)
    text = text_config(hf)
    store, key, step = KVStore(text.num_hidden_layers), cache_kwarg(decoder), auto_sub_chunk(text.vocab_size)
    row_wrong = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    padded = mask is not None and not bool(mask.all())
    masks = MaskKind.of(decoder)
    router = RouterLoss.of(hf)
    with chunk_attention(hf, padded, device, layout.packed) as fast, full_length_rope(hf, layout.longest):
        for c, (s, e) in enumerate(chunk_bounds(ids.shape[1], chunk_size)):
            with router.record() if router else contextlib.nullcontext() as logits:
                hidden = decoder(
                    input_ids=ids[:, s:e],
                    **layout.inputs(s, e, mask if padded else None, fast, masks),
                    use_cache=True,
                    **{key: ChunkCache(store, c, record=True)},
                )[0]
            if router is not None:
                router.count(c, logits, mask[:, s:e] if padded else None)
            t = target[:, s:e]
            keep = t != IGNORE_INDEX
            if not keep.any():
                continue
            hit = _nll_and_hits(head, hidden[keep], t[keep], step, totals)  # only supervised positions
            totals["tokens"] += int(keep.sum())
            totals["correct"] += int(hit.sum())
            wrong = torch.zeros_like(keep)
            wrong[keep] = ~hit
            row_wrong |= wrong.any(1)
    if router is not None:
        totals["aux"].append(router.value())
    has = (target != IGNORE_INDEX).any(1)
    totals["rows"] += int(has.sum())
    totals["rows_correct"] += int((has & ~row_wrong).sum())
