"""SeCO against full backprop on a real pretrained LLM (SmolLM2-135M-Instruct, offline).

    python benchmarks/real_model_equivalence.py      # ~4 minutes on one CPU core

Prints a table: the largest relative gradient error over the trainable parameters
(||g_seco - g_full|| / ||g_full||) for LoRA and full fine-tuning in float64 (the reference
cross-entropy computed in float64; RMSNorm in float64 or as transformers computes it, in
float32), and for LoRA on nf4 and on the unquantized model in float32. Text: this
repository's README of December 2026 (`benchmarks/data/real_text.md`, frozen so that editing
the README does not move the figures) through the model's tokenizer.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from ds_chunk import ChunkScheduler
from ds_chunk.known_models import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def rmsnorm_in_float64():
    """LlamaRMSNorm's formula in the input's dtype (transformers casts to float32 and back)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    original = LlamaRMSNorm.forward

    def forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    LlamaRMSNorm.forward = forward
    try:
        yield
    finally:
        LlamaRMSNorm.forward = original


def text_ids(path: str, n: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    with open(os.path.join(ROOT, "benchmarks", "data", "real_text.md")) as f:
        return AutoTokenizer.from_pretrained(path)(f.read(), return_tensors="pt").input_ids[:, :n]


def model_for(path: str, dtype: torch.dtype, what: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = {}
    if what == "nf4":
        quant = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=dtype)}  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quant).train()
    if what == "full":  # the last layer and the tied embedding / LM head
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("model.layers.29.", "model.embed_tokens")))
        return model
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, lora).train()


def gradient_error(model, ids: torch.Tensor, chunk: int, prompt: int) -> float:
    labels = ids.clone()
    labels[:, :prompt] = -100
    logits = model(input_ids=ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ChunkScheduler({"chunk_size": chunk}).backward(model, ids, labels)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)


def main() -> None:
    torch.manual_seed(0)
    path = resolve("smollm2-135m")
    cases = [
        ("LoRA r=8 q/v", torch.float64, "lora", True, 384, 96, 100),
        ("last layer + tied embedding", torch.float64, "full", True, 384, 96, 100),
        ("LoRA r=8 q/v, transformers' float32 RMSNorm", torch.float64, "lora", False, 384, 96, 100),
        ("LoRA r=8 q/v on nf4 base weights", torch.float32, "nf4", False, 256, 64, 0),
        ("LoRA r=8 q/v, unquantized", torch.float32, "lora", False, 256, 64, 0),
    ]
    print("| trained | dtype | T | chunk | max relative gradient error |")
    print("|---|---|---:|---:|---:|")
    for name, dtype, what, norm64, seq, chunk, prompt in cases:
        with rmsnorm_in_float64() if norm64 else contextlib.nullcontext():
            err = gradient_error(model_for(path, dtype, what), text_ids(path, seq), chunk, prompt)
        dname = str(dtype).removeprefix("torch.") + (" (norm in float64)" if norm64 else "")
        print(f"| {name} | {dname} | {seq} | {chunk} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
