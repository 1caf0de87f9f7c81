"""Peak memory and time of SFTTrainer against with_chunkwise(SFTTrainer) on one long sequence.

    python benchmarks/trainer_memory.py --seq-len 8192 --chunk-size 512      # CPU, the bench model
    python benchmarks/trainer_memory.py --device cuda --model llama-3-8b --quant 4bit --lora-r 8 --seq-len 16384

Each trainer runs in a fresh process (ds_chunk.bench's meter: on CPU peak RSS during
``trainer.train()`` minus RSS right before it, glibc's mmap threshold at one page so RSS
follows live bytes; on CUDA max_memory_allocated minus allocated before). Both train the
same rows with the same arguments (fp32 on CPU, bf16 on CUDA); the peak includes the
optimizer states AdamW creates at the first step, the same in both. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None, help="default: ds_chunk.bench's CPU model; llama-3-8b: that shape")
    p.add_argument("--quant", choices=["none", "4bit"], default="none")
    p.add_argument("--lora-r", type=int, default=0)
    p.add_argument("--only-qv", action="store_true", help="train only q_proj / v_proj weights (LoRA-like)")
    p.add_argument("--worker", choices=["parent", "chunkwise"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ds_chunk.bench import DEFAULT_MODEL
    from ds_chunk.plan import LLAMA3_8B

    shape = LLAMA3_8B if args.model == "llama-3-8b" else DEFAULT_MODEL
    config = AutoConfig.for_model(**{"model_type": "llama", **shape, "max_position_embeddings": 1 << 17})
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.quant == "4bit":
        from ds_chunk.model import ModelConfig, build_model

        cfg = {k: v for k, v in config.to_dict().items() if k in shape or k == "model_type"}
        lora = {"r": args.lora_r or 8, "target_modules": ["q_proj", "v_proj"]}
        recipe = {"config": cfg, "dtype": "bfloat16", "quantization": {"bits": 4}, "lora": lora}
        return build_model(ModelConfig.from_dict(recipe))
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if args.lora_r:
        from ds_chunk.model import LoraSettings, add_lora

        model = add_lora(model, LoraSettings(r=args.lora_r, target_modules=("q_proj", "v_proj")))
    elif args.only_qv:
        for name, p in model.named_parameters():
            p.requires_grad_("q_proj" in name or "v_proj" in name)
    return model


def worker(args) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from ds_chunk.bench import CpuPeak, CudaPeak
    from ds_chunk.engine import single_process_env
    from ds_chunk.hf import with_chunkwise

    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import make_tiny_model

    single_process_env()
    model = _model(args)
    vocab = model.get_output_embeddings().weight.shape[0]
    tokenizer = make_tiny_model.make_tokenizer([f"w{i}" for i in range(vocab - len(make_tiny_model.SPECIAL))])
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, vocab, (args.seq_len,), generator=g).tolist()} for _ in range(args.steps)]
    config = SFTConfig(os.path.join("/tmp", f"trainer_memory_{args.worker}"), per_device_train_batch_size=1,
                       max_steps=args.steps, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
                       bf16=args.device == "cuda", use_cpu=args.device == "cpu", max_length=args.seq_len,
                       dataloader_num_workers=0, gradient_checkpointing=False)  # fmt: skip
    cls, extra = SFTTrainer, {}
    if args.worker == "chunkwise":
        cls, extra = with_chunkwise(SFTTrainer), {"chunkwise": {"chunk_size": args.chunk_size}}
    trainer = cls(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **extra)
    meter = CudaPeak() if args.device == "cuda" else CpuPeak()
    before = meter.rss()
    meter.start()
    t0 = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - t0) / args.steps
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"peak_mib": (meter.peak() - before) / 2**20, "s_per_step": seconds, "losses": losses}


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    from ds_chunk.bench import EXACT_RSS_ENV

    env = dict(os.environ, **(EXACT_RSS_ENV if args.device == "cpu" else {}), PYTHONPATH=ROOT)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    results = {}
    for which in ("parent", "chunkwise"):
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", which]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        results[which] = json.loads(line[7:]) if line else {"error": out.stderr[-1500:]}
    what = f"T={args.seq_len}, {args.device}, " + (args.model or "bench model (Llama 4 x 256, vocab 32000)")
    print(f"\n{what}; {args.steps} steps of one sequence\n")
    print("| trainer | peak MiB | x SFTTrainer | s/step | losses |\n|---|---:|---:|---:|---|")
    ref = results["parent"].get("peak_mib")
    for which, name in (
        ("parent", "SFTTrainer"),
        ("chunkwise", f"with_chunkwise(SFTTrainer), chunk {args.chunk_size}"),
    ):
        r = results[which]
        if "error" in r:
            print(f"| {name} | failed: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'} | | | |")
            continue
        ratio = f"{r['peak_mib'] / ref:.3f}" if ref else ""
        losses = ", ".join(f"{x:.4f}" for x in r["losses"])
        print(f"| {name} | {r['peak_mib']:.0f} | {ratio} | {r['s_per_step']:.2f} | {losses} |")


if __name__ == "__main__":
    main()
