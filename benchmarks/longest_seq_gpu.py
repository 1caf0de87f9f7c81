"""Longest sequence that trains in a 24 GB budget: Llama-3-8B shape, 4-bit base, LoRA.

    python benchmarks/longest_seq_gpu.py                 # CUDA: caps the device at 24 GiB
    python benchmarks/longest_seq_gpu.py --tiny --device cpu --start 256 --max 2048   # smoke test

For kv_offload off and on, doubles the sequence length from --start until a step
(SeCO backward + AdamW on the LoRA weights) runs out of memory, and prints a table:
longest length, seconds per step, peak device memory, the host memory the offloaded
KV cache took at its peak, and the process's host RSS. Random weights from a
config: nothing is downloaded. Weights are quantized layer by layer on the device, so
the bf16 model (16 GB) never exists at once.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch import nn

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=1 << 20,
    rope_theta=500000.0,
)
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


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


def try_step(model, opt, seq_len: int, chunk: int, offload: bool, device: torch.device) -> dict | None:
    """One training step at ``seq_len``; None if it ran out of memory."""
    from ds_chunk import ChunkScheduler

    sched = ChunkScheduler({"chunk_size": chunk, "loss_chunk_size": chunk, "kv_offload": offload})
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


def sweep(model, opt, args, offload: bool) -> list[dict]:
    rows, seq_len = [], args.start
    while seq_len <= args.max:
        result = try_step(model, opt, seq_len, args.chunk, offload, torch.device(args.device))
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append({"kv_offload": offload, "tokens": seq_len, "host_rss_gib": host} | (result or {"oom": True}))
        print(rows[-1], flush=True)
        if result is None:
            break
        seq_len *= 2
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-gib", type=float, default=24.0)
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--max", type=int, default=262144)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same kind (smoke test)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
    torch.manual_seed(0)
    model = build_qlora(TINY if args.tiny else LLAMA3_8B, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = sweep(model, opt, args, offload=False) + sweep(model, opt, args, offload=True)
    print("\n| kv_offload | longest tokens that train | s/step there | peak device GiB | KV host GiB | host RSS GiB |")
    print("|---|---|---|---|---|---|")
    for offload in (False, True):
        ok = [r for r in rows if r["kv_offload"] == offload and "oom" not in r]
        nan = float("nan")
        best = ok[-1] if ok else {"tokens": 0, "seconds": nan, "device_gib": nan, "kv_host_gib": nan}
        host = rows[-1]["host_rss_gib"]
        cells = f"{best['seconds']:.2f} | {best['device_gib']:.2f} | {best['kv_host_gib']:.2f} | {host:.1f}"
        print(f"| {offload} | {best['tokens']} | {cells} |")
    same = {r["tokens"]: r for r in rows if "oom" not in r and not r["kv_offload"]}
    for r in rows:
        if r["kv_offload"] and "oom" not in r and r["tokens"] in same:
            print(f"offload slowdown at {r['tokens']} tokens: {r['seconds'] / same[r['tokens']]['seconds']:.2f}x")


if __name__ == "__main__":
    main()
