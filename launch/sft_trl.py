"""Chunk-wise SFT with TRL's SFTTrainer (or HF Trainer), the chunkwise block in the DeepSpeed JSON.

    python launch/sft_trl.py                                   # offline: tiny Llama, launch/data/colors.jsonl
    python launch/sft_trl.py --trainer hf                      # transformers.Trainer instead of SFTTrainer
    accelerate launch launch/sft_trl.py --model meta-llama/Meta-Llama-3-8B --data train.jsonl \
        --deepspeed ds_configs/qlora_zero1_offload_24gb.json --max-length 16384 --lora-r 8 --quant 4bit

Without --model, a tiny random Llama and a word-level tokenizer (built with `tokenizers` from
the data's words) are made in memory. --data is a JSONL of {"prompt", "completion" or
"response"} or {"messages": [...]} records (loss on the answer only: TRL's
completion_only_loss); 10% is held out and evaluated chunk-wise at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))  # run from a checkout
sys.path.insert(0, HERE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=["trl", "hf"], default="trl")
    p.add_argument("--model", help="hub id or local path (default: a tiny random Llama, offline)")
    p.add_argument("--data", default=os.path.join(HERE, "data", "colors.jsonl"))
    p.add_argument("--deepspeed", help="DeepSpeed JSON; its chunkwise block sets the chunking")
    p.add_argument("--chunk-size", type=int, default=16, help="chunkwise.chunk_size when the JSON has no block")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--packing", action="store_true", help="TRL's packing (bfd, padding-free: documents kept apart)")
    p.add_argument("--quant", choices=["none", "4bit", "8bit"], default="none")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--gradient-accumulation-steps", type=int, default=2)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output-dir", default="runs/sft")
    args = p.parse_args(argv)
    if args.packing and args.trainer != "trl":
        p.error("--packing is SFTConfig's: it needs --trainer trl")
    return args


def load_pairs(path: str) -> list[dict]:
    """{"prompt", "completion"} records, answers from "completion"/"response" or the last assistant turn."""
    rows = []
    with open(path) as f:
        for line in filter(str.strip, f):
            rec = json.loads(line)
            if "messages" in rec:
                *turns, answer = rec["messages"]
                rows.append({"prompt": " ".join(t["content"] for t in turns), "completion": answer["content"]})
            elif "prompt" in rec:
                rows.append({"prompt": rec["prompt"], "completion": rec.get("completion", rec.get("response"))})
    return [{"prompt": r["prompt"], "completion": " " + r["completion"].lstrip()} for r in rows]


def build_model(args: argparse.Namespace, words: list[str]):
    """(model, tokenizer): the named one through ds_chunk's recipe (4/8-bit, LoRA), or a tiny one."""
    from ds_chunk.model import LoraSettings, ModelConfig, QuantConfig, add_lora, load_tokenizer
    from ds_chunk.model import build_model as recipe

    if args.model is None:
        import make_tiny_model

        tokenizer = make_tiny_model.make_tokenizer(words)
        model = make_tiny_model.make_model(len(tokenizer))
        return (add_lora(model, LoraSettings(r=args.lora_r)) if args.lora_r else model), tokenizer
    quant = None if args.quant == "none" else QuantConfig(bits=int(args.quant[0]))
    lora = LoraSettings(r=args.lora_r, target_modules=("q_proj", "v_proj")) if args.lora_r else None
    dtype = "bfloat16" if args.bf16 or quant else "float32"
    cfg = ModelConfig(name_or_path=args.model, dtype=dtype, quantization=quant, lora=lora)
    return recipe(cfg), load_tokenizer(args.model)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    from datasets import Dataset

    from ds_chunk.config import ChunkwiseConfig
    from ds_chunk.engine import single_process_env
    from ds_chunk.hf import resolve_config, with_chunkwise

    single_process_env()  # plain `python`: a one-process group, as accelerate launch would give
    pairs = load_pairs(args.data)
    words = list(dict.fromkeys(w for r in pairs for w in (r["prompt"] + r["completion"]).split()))
    model, tokenizer = build_model(args, words)
    held = max(1, len(pairs) // 10)
    train_set, eval_set = Dataset.from_list(pairs[held:]), Dataset.from_list(pairs[:held])
    block = resolve_config(None, args.deepspeed)
    chunkwise = block if block is not None else ChunkwiseConfig(chunk_size=args.chunk_size)
    common = dict(
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        bf16=args.bf16,
        deepspeed=args.deepspeed,
        use_cpu=not __import__("torch").cuda.is_available(),
    )
    if args.trainer == "trl":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(
            args.output_dir, max_length=args.max_length, completion_only_loss=True, packing=args.packing, **common
        )
        trainer = with_chunkwise(SFTTrainer)(
            model=model,
            args=config,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=tokenizer,
            chunkwise=chunkwise,
        )
    else:
        from transformers import Trainer, TrainingArguments

        from ds_chunk.data import TokenizedDataset, collate

        def tokenized(rows):
            return TokenizedDataset(
                [{"prompt": r["prompt"], "response": r["completion"]} for r in rows], tokenizer, args.max_length
            )

        config = TrainingArguments(args.output_dir, remove_unused_columns=False, **common)
        trainer = with_chunkwise(Trainer)(
            model=model,
            args=config,
            train_dataset=tokenized(pairs[held:]),
            eval_dataset=tokenized(pairs[:held]),
            data_collator=collate,
            chunkwise=chunkwise,
        )
    trainer.train()
    metrics = trainer.evaluate()
    print(
        f"{type(trainer).__name__}: eval_loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.3f}"
    )
    return trainer, metrics


if __name__ == "__main__":
    main()
