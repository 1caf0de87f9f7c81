"""Longest sequence that trains on a 24 GB card: Llama-3-8B shape, 4-bit base, LoRA.

    python benchmarks/longest_seq_gpu.py                 # CUDA: caps tensors at 22.5 GiB
    python benchmarks/longest_seq_gpu.py --tiny --device cpu --start 256 --max 2048   # smoke test

For kv_offload off and on, doubles the sequence length from --start until a step
(SeCO backward + AdamW on the LoRA weights) runs out of memory, and prints a table:
longest length, seconds per step, peak device memory, the host memory the offloaded
KV cache took at its peak, and the process's host RSS. Random weights from a
config: nothing is downloaded. Weights are quantized layer by layer on the device, so
the bf16 model (16 GB) never exists at once. Each sweep starts with an untimed warm-up
step (Triton compiles and autotunes, pinned host buffers are allocated), so the first
row is not a cold one. The budget is what a 24 GB card leaves to tensors: its 24 GiB
less the CUDA context and workspace (~0.5 GiB) and some fragmentation: 22.5 GiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch
from torch import nn

from ds_chunk.plan import LLAMA3_8B

BUDGET_GIB = 22.5  # a 24 GB card's tensors: 24 GiB less the CUDA context (~0.5 GiB) and fragmentation
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip


def build_qlora(shape: dict, device: torch.device) -> nn.Module:
    """Llama of ``shape`` with random nf4 linears (quantized one at a time), bf16 rest, LoRA r=8 on q/v."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")  # fmt: skip
                    w = torch.randn(lin.out_features, lin.in_features, dtype=torch.bfloat16, device=device) * 0.02
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4").to(device)
                    setattr(parent, name, q)
    for module in model.modules():  # the rest, still on meta: embeddings, norms, LM head
        if any(t.is_meta for t in module.parameters(recurse=False)):
            module.to_empty(device=device, recurse=False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.bfloat16:
                p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers were on meta
    model.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return get_peft_model(model, lora).train()


def cap_device_memory(device: torch.device, budget_gib: float) -> float:
    """Cap this process's CUDA allocations on ``device`` at ``budget_gib``; returns the fraction.
    torch wants the device's index: ``torch.device("cuda")`` has none, so the current device's."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = min(1.0, budget_gib * 2**30 / torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def try_step(model, opt, seq_len: int, args, offload: bool, device: torch.device) -> dict | None:
    """One training step at ``seq_len``; None if it ran out of memory."""
    from ds_chunk import ChunkScheduler

    sched = ChunkScheduler({"chunk_size": args.chunk, "loss_chunk_size": args.loss_chunk, "kv_offload": offload})
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = sched.backward(model, ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        kv_host = result.host_peak_bytes / 2**30
        return {"seconds": time.perf_counter() - t0, "device_gib": peak, "kv_host_gib": kv_host}
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def predicted_host_gib(shape: dict, seq_len: int, args) -> float:
    """ds_chunk.plan's host memory for the offloaded KV cache and saved tensors at ``seq_len``."""
    from ds_chunk.plan import ModelShape, Setup, estimate

    setup = Setup(seq_len=seq_len, chunk_size=args.chunk, loss_chunk_size=args.loss_chunk, kv_offload=True,
                  quant="4bit", lora_rank=8)  # fmt: skip
    return sum(estimate(ModelShape.from_config(shape), setup).host.values()) / 2**30


def sweep(model, opt, args, offload: bool, shape: dict, deadline: float) -> list[dict]:
    """Double the length until a step runs out of memory, or the next one would pass the
    deadline (a doubling costs ~3-4x: attention is quadratic) or the free host memory."""
    rows, seq_len, last = [], args.start, 0.0
    try_step(model, opt, args.start, args, offload, torch.device(args.device))  # warm-up, not timed
    while seq_len <= args.max:
        row = {"kv_offload": offload, "tokens": seq_len}
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        if time.monotonic() + 4 * last > deadline:
            rows.append(row | {"skipped": "time budget"})
        elif offload and predicted_host_gib(shape, seq_len, args) > 0.9 * free:
            rows.append(row | {"skipped": f"host memory (predicted > 90% of {free:.0f} GiB free)"})
        else:
            result = try_step(model, opt, seq_len, args, offload, torch.device(args.device))
            host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            rows.append(row | {"host_rss_gib": host} | (result or {"oom": True}))
        print(rows[-1], flush=True)
        if "seconds" not in rows[-1]:
            break
        last, seq_len = rows[-1]["seconds"], seq_len * 2
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-gib", type=float, default=BUDGET_GIB, help="cap on tensors (default: a 24 GB card's)")
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--max", type=int, default=262144)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--loss-chunk", type=int, default=256, help="chunkwise.loss_chunk_size")
    p.add_argument("--time-budget-s", type=float, default=480.0, help="stop doubling past this (both sweeps)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same kind (smoke test)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        fraction = cap_device_memory(device, args.budget_gib)
        print(f"budget: {args.budget_gib} GiB of tensors ({fraction:.1%} of this card's memory)")
    torch.manual_seed(0)
    from ds_chunk.attention import flash_eligible

    start, shape = time.monotonic(), TINY if args.tiny else LLAMA3_8B
    model = build_qlora(shape, device)
    print(f"chunk attention: {'flash, no mask' if flash_eligible(model, device) else 'HF sdpa with a mask'}")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    half = start + args.time_budget_s / 2  # without offload first: it stops early, leaving time to the other
    rows = sweep(model, opt, args, False, shape, half)
    rows += sweep(model, opt, args, True, shape, start + args.time_budget_s)
    print("\n| kv_offload | longest tokens that train | s/step there | peak device GiB | KV host GiB | host RSS GiB |")
    print("|---|---|---|---|---|---|")
    for offload in (False, True):
        ok = [r for r in rows if r["kv_offload"] == offload and "seconds" in r]
        nan = float("nan")
        best = ok[-1] if ok else {"tokens": 0, "seconds": nan, "device_gib": nan, "kv_host_gib": nan}
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        cells = f"{best['seconds']:.2f} | {best['device_gib']:.2f} | {best['kv_host_gib']:.2f} | {host:.1f}"
        print(f"| {offload} | {best['tokens']} | {cells} |")
    same = {r["tokens"]: r for r in rows if "seconds" in r and not r["kv_offload"]}
    for r in rows:
        if r["kv_offload"] and "seconds" in r and r["tokens"] in same:
            print(f"offload slowdown at {r['tokens']} tokens: {r['seconds'] / same[r['tokens']]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
