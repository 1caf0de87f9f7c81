"""Shared by the engine tests and the 2-rank script: a tiny LoRA model and its torch reference."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from models import tiny_model
from peft import LoraConfig, get_peft_model

ADAMW = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.05}


def lora_model(seed: int = 0) -> torch.nn.Module:
    model = tiny_model("llama", dtype=torch.float32, seed=seed)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def ds_config(
    stage: int, offload: bool, micro: int = 2, gas: int = 1, bf16: bool = False, chunk: int = 16, sgd: float = 0.0
) -> dict:
    """sgd > 0: plain SGD at this learning rate instead of AdamW (no momentum, no normalisation: a
    scaled gradient shows in every weight)."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,  # default 1.0 since deepspeed 0.19.3; the reference does not clip
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": dict(ADAMW)},
        "bf16": {"enabled": bf16},
        "chunkwise": {"chunk_size": chunk},
    }
    if stage == 3:  # partition even these tiny parameters (by default small ones stay whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if sgd:
        cfg["optimizer"], cfg["zero_allow_untested_optimizer"] = {"type": "SGD", "params": {"lr": sgd}}, True
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    else:
        cfg["zero_force_ds_cpu_optimizer"] = False  # plain torch AdamW: no cpu_adam build needed
    return cfg


def mixed_labels(ids: torch.Tensor) -> torch.Tensor:
    """Row 1 supervised only after position 33: its early chunks carry no loss."""
    labels = ids.clone()
    labels[1:, :33] = -100
    return labels


def two_rank_batches(steps: int = 2, seq: int = 40):
    """(input_ids, labels, attention_mask) per step, 2 rows: row 1 has 30 tokens (right padding)
    and is supervised from position 20 on, so its early chunks carry no loss."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 97, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        labels[1, :20] = -100
        out.append((ids, labels, mask))
    return out


PACKED_DOCS = [[10, 18, 12], [8, 22]]  # two_rank_batches' rows as packed documents (row 1: 30 tokens)


def packed(batches):
    """two_rank_batches as padding-free packed rows: (input_ids, labels, attention_mask,
    position_ids) per step, position ids restarting at each document (0 on the padding), each
    document's first token unsupervised (as TRL's collator)."""
    out = []
    for ids, labels, mask in batches:
        pos = torch.zeros_like(ids)
        for row, docs in enumerate(PACKED_DOCS):
            pos[row, : sum(docs)] = torch.cat([torch.arange(n) for n in docs])
        starts = torch.zeros_like(mask, dtype=torch.bool)
        for row, docs in enumerate(PACKED_DOCS):
            starts[row, torch.tensor([0, *docs[:-1]]).cumsum(0)] = True
        out.append((ids, labels.masked_fill(starts, -100), mask, pos))
    return out


def _loss(model, ids, target, mask, positions) -> torch.Tensor:
    """Mean CE over the supervised tokens of all rows; with positions, each row's real tokens
    run as transformers' packed forward (position_ids, no mask, no cache: documents apart)."""
    if positions is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100)
    total = 0.0
    for row in range(ids.shape[0]):
        n = ids.shape[1] if mask is None else int(mask[row].sum())
        logits = model(input_ids=ids[row : row + 1, :n], position_ids=positions[row : row + 1, :n], use_cache=False)
        total = total + F.cross_entropy(logits.logits[0, :-1], target[row, 1:n], ignore_index=-100, reduction="sum")
    return total / int((target[:, 1:] != -100).sum())


def reference_steps(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    labels: list[torch.Tensor] | None = None,
    masks: list[torch.Tensor] | None = None,
    positions: list[torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Plain full-sequence backprop + torch AdamW on a copy, one step per batch: (trained copy, losses)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"], weight_decay=0.05)
    losses = []
    for i, ids in enumerate(batches):
        target = ids if labels is None else labels[i]
        mask, pos = (None if x is None else x[i] for x in (masks, positions))
        loss = _loss(model, ids, target, mask, pos)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def max_param_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max(float((pa[k].float() - pb[k]).abs().max() / pb[k].abs().max()) for k in pb if pb[k].requires_grad)


def spaco_reference(model: torch.nn.Module, batches, rate: float, seed: int, chunk: int, identical: bool):
    """One process, each row with the SpaCO draw its rank makes (rank 0's for every row when the
    ranks run identical schedules, ZeRO-3, which also replay by the rows' joint supervised chunks),
    normalised by the step's total token count, + torch AdamW: (trained copy, losses)."""
    from ds_chunk import ChunkScheduler
    from ds_chunk.chunking import prepare_labels

    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"], weight_decay=0.05)
    scheduler = ChunkScheduler({"chunk_size": chunk, "sparse": {"rate": rate, "seed": seed}})
    losses = []
    for step, (ids, labels, mask) in enumerate(batches):
        supervised = prepare_labels(ids, labels, mask) != -100
        total = int(supervised.sum())
        joint = [bool(supervised[:, s : s + chunk].any()) for s in range(0, ids.shape[1], chunk)] if identical else None
        loss = 0.0
        for r in range(ids.shape[0]):
            rows = slice(r, r + 1)
            result = scheduler.backward(model, ids[rows], labels[rows], mask[rows], num_tokens=total, step=step,
                                        rank=0 if identical else r, has_loss=joint)  # fmt: skip
            loss += float(result.loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss)
    return model, losses
