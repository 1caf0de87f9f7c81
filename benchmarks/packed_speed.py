"""Seconds per step of one row of SmolLM2-135M (LoRA r=8 on q,k,v,o, fp32, one thread):
one document against the same tokens as packed documents (position_ids restarting), with
ds_chunk's chunk attention (one flash call per document part) and through a 4D mask (eager),
and plain full backprop on the packed row (transformers' own document mask).

    python benchmarks/packed_speed.py [--seq-len 1024] [--docs 8] [--chunk-size 256] [--repeats 2]
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_model_equivalence import text_ids  # noqa: E402

from ds_chunk import ChunkScheduler  # noqa: E402
from ds_chunk.known_models import resolve  # noqa: E402


def model_for(path: str, impl: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).train()
    return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def timed(step, repeats: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def steps(model, impl: str, ids, labels, pos, args) -> list[tuple[str, float]]:
    scheduler = ChunkScheduler({"chunk_size": args.chunk_size})

    def full():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100).backward()

    return [
        (f"SeCO, one document, {impl}", timed(lambda: scheduler.backward(model, ids), args.repeats)),
        (f"SeCO, {args.docs} packed documents, {impl}",
         timed(lambda: scheduler.backward(model, ids, labels, position_ids=pos), args.repeats)),
        (f"full backprop, {args.docs} packed documents, {impl}", timed(full, args.repeats)),
    ]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    path = resolve("smollm2-135m")
    ids = text_ids(path, args.seq_len)
    n = args.seq_len // args.docs
    pos = (torch.arange(args.seq_len) % n)[None]
    labels = ids.masked_fill(pos == 0, -100)
    rows = [row for impl in ("sdpa", "eager") for row in steps(model_for(path, impl), impl, ids, labels, pos, args)]
    print(f"T={args.seq_len}, {args.docs} documents of {n}, chunk {args.chunk_size}, one thread, fp32\n")
    print("| step | s |\n|---|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
