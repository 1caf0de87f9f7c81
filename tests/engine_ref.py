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


def ds_config(stage: int, offload: bool, micro: int = 2, gas: int = 1, bf16: bool = False, chunk: int = 16) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,  # default 1.0 since deepspeed 0.19.3; the reference does not clip
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": dict(ADAMW)},
        "bf16": {"enabled": bf16},
        "chunkwise": {"chunk_size": chunk},
    }
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


def reference_steps(
    model: torch.nn.Module, batches: list[torch.Tensor], labels: list[torch.Tensor] | None = None
) -> tuple[torch.nn.Module, list[float]]:
    """Plain full-sequence backprop + torch AdamW on a copy, one step per batch: (trained copy, losses)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"], weight_decay=0.05)
    losses = []
    for i, ids in enumerate(batches):
        target = ids if labels is None else labels[i]
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def max_param_err(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return max(float((pa[k].float() - pb[k]).abs().max() / pb[k].abs().max()) for k in pb if pb[k].requires_grad)
