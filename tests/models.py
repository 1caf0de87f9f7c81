"""Tiny seeded HF models built from configs (no weights are downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


def tiny_model(arch: str = "llama", dtype=torch.float64, seed: int = 0, vocab: int = 97, **overrides):
    """2 layers, hidden 32, 4 query heads over 2 KV heads (GQA), eager-free sdpa."""
    kw = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        head_dim=8,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    torch.manual_seed(seed)
    config = CONFIGS[arch](**kw)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random (not zero-init) norms so a dropped path shows up in every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def reference_loss(model, input_ids, labels=None, attention_mask=None) -> torch.Tensor:
    """Full-sequence mean CE computed in the model's dtype (HF's loss upcasts to float32)."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_rel_err(a: dict, b: dict) -> float:
    """max over parameters of ||a - b|| / ||b||."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in a)


def packed_positions(lengths: list[list[int]]) -> torch.Tensor:
    """position_ids [rows, T] of packed rows: 0..n-1 for each document of n tokens, per row."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])


def per_document_loss(model, ids, labels, lengths: list[list[int]]) -> torch.Tensor:
    """The reference of packed rows: each document run alone, its token CE summed in the model's
    dtype, over the supervised tokens of all of them."""
    total, count = 0.0, 0
    for x_row, y_row, docs in zip(ids, labels, lengths):
        for x, y in zip(x_row[: sum(docs)].split(docs), y_row[: sum(docs)].split(docs)):
            logits = model(input_ids=x[None]).logits[0, :-1]
            total = total + F.cross_entropy(logits, y[1:], ignore_index=-100, reduction="sum")
            count += int((y[1:] != -100).sum())
    return total / count
