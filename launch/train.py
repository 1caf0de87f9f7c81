"""Chunk-wise (SeCO / SpaCO) fine-tuning under DeepSpeed or accelerate.

    python launch/train.py                      # offline default: tiny Llama, recall task
    python launch/train.py --truncate           # same, gradient cut at chunk boundaries
    deepspeed --num_gpus 1 launch/train.py --deepspeed_config ds_configs/qlora_zero1_offload_24gb.json \
        --data train.jsonl --seq-len 16384
    accelerate launch --config_file launch/accelerate_ds.yaml launch/train.py

The DeepSpeed config carries everything: DeepSpeed's own keys, the ``chunkwise`` block
(chunk size, SpaCO) and the ``model`` block (what to load, 4/8-bit, LoRA); flags below
override parts of it. Each optimizer step runs every chunk's backward and then one
``engine.step()`` (see ds_chunk/engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ds_chunk import checkpoint  # noqa: E402
from ds_chunk.config import ChunkwiseConfig, ConfigError  # noqa: E402
from ds_chunk.data import PasskeyTask, RecallTask, TokenizedDataset, batches, load_records  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ds_configs", "recall_cpu.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--deepspeed_config",
        "--config",
        default=os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", DEFAULT_CONFIG),
        help="DeepSpeed JSON config (default: the accelerate yaml's file, else ds_configs/recall_cpu.json)",
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--model", help="hub id or local path; overrides the config's model block")
    p.add_argument("--quant", choices=["none", "4bit", "8bit"], help="bitsandbytes base weights")
    p.add_argument("--lora-r", type=int, help="add LoRA of this rank (0: none)")
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", help='comma-separated module names, or "all-linear"')
    p.add_argument("--data", help="JSONL file or hf:<dataset>[:split]; default: a synthetic task")
    p.add_argument("--task", choices=["recall", "passkey"], default="recall", help="synthetic task (no --data)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (pack/truncate to this)")
    p.add_argument("--chunk-size", type=int, help="overrides chunkwise.chunk_size")
    p.add_argument("--sparse-rate", type=float, help="SpaCO: replay each chunk with this probability")
    p.add_argument("--truncate", action="store_true", help="baseline: no gradient across chunk boundaries")
    p.add_argument("--kv-offload", action="store_true", help="KV cache, its gradient and saved tensors in host memory")
    p.add_argument("--lr", type=float, help="overrides optimizer.params.lr")
    p.add_argument("--max-steps", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    p.add_argument("--output-dir", default="runs/default")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensorboard", action="store_true", help="also log to <output-dir>/tb")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace, micro_batch: int | None = None) -> dict:
    """The DeepSpeed config with CLI overrides applied and every "auto" resolved or rejected."""
    if not os.path.isfile(args.deepspeed_config):
        raise FileNotFoundError(f"DeepSpeed config not found: {args.deepspeed_config}")
    with open(args.deepspeed_config) as f:
        cfg = json.load(f)
    chunk_flags = (args.chunk_size, args.sparse_rate, args.truncate or None, args.kv_offload or None)
    if "chunkwise" not in cfg and all(flag is None for flag in chunk_flags):
        cfg["chunkwise"] = {"enabled": False}  # a plain DeepSpeed config trains unchunked, as the library does
    chunkwise = dict(cfg.get("chunkwise", {}))
    if args.chunk_size is not None:
        chunkwise["chunk_size"] = args.chunk_size
    if args.sparse_rate is not None:
        chunkwise["sparse"] = {**chunkwise.get("sparse", {}), "rate": args.sparse_rate}
        chunkwise["sparse"].pop("num_chunks", None)
    if args.truncate:
        chunkwise["truncate"] = True
    if args.kv_offload:
        chunkwise["kv_offload"] = True
    cfg["chunkwise"] = chunkwise
    ChunkwiseConfig.from_dict(chunkwise)  # fail early, naming the key
    if args.lr is not None:
        cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    cfg["model"] = model_block(args, cfg.get("model"))
    return resolve_auto(cfg, micro_batch)


def model_block(args: argparse.Namespace, block: dict | None) -> dict:
    block = dict(block or {})
    if args.model:
        block.pop("config", None)
        block["name_or_path"] = args.model
    if args.quant:
        block.pop("quantization", None)
        if args.quant != "none":
            block["quantization"] = {"bits": int(args.quant[0])}
    lora = dict(block.get("lora") or {})
    for key, value in (("r", args.lora_r), ("alpha", args.lora_alpha), ("dropout", args.lora_dropout)):
        if value is not None:
            lora[key] = value
    if args.lora_targets:
        lora["target_modules"] = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    if lora and lora.get("r", 8) > 0:
        block["lora"] = lora
    else:
        block.pop("lora", None)
    block.setdefault("seed", args.seed)
    return block


def resolve_auto(cfg: dict, micro_batch: int | None) -> dict:
    """Fill the "auto" values we can (batch sizes, clipping); reject the rest by name.

    Plain DeepSpeed fills none, and accelerate fills the micro batch only from a
    dataloader passed to prepare(), which we do not pass.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch or 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
    }
    for key, value in fill.items():
        if cfg.get(key) == "auto":
            cfg[key] = value
    if cfg.get("train_batch_size") == "auto":
        cfg["train_batch_size"] = (
            cfg["train_micro_batch_size_per_gpu"] * cfg.get("gradient_accumulation_steps", 1) * world
        )
    from ds_chunk.engine import load_ds_config

    return load_ds_config(cfg)  # raises on any "auto" left, naming its key


def build_engine(cfg: dict):
    """ds_chunk.initialize under the deepspeed launcher / plain python; accelerate.prepare under accelerate."""
    import ds_chunk
    from ds_chunk.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(cfg["model"]))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)  # plain `python launch/train.py`: one process
        if "MASTER_PORT" not in os.environ:  # a free one, so two runs on one machine do not collide
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        return ds_chunk.initialize(model=model, config=cfg)[0]
    return build_engine_accelerate(model, cfg)


def build_engine_accelerate(model, cfg: dict):
    from accelerate import Accelerator
    from accelerate.utils import DummyOptim, DummyScheduler

    from ds_chunk.engine import OUR_BLOCKS, ChunkedLM, ChunkwiseEngine

    accelerator = Accelerator()
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config.clear()  # accelerate read the same file; use our resolved copy
    plugin.deepspeed_config.update({k: v for k, v in cfg.items() if k not in OUR_BLOCKS})
    module = ChunkedLM(model)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = DummyOptim(params) if "optimizer" in cfg else torch.optim.AdamW(params, lr=1e-4)
    objects = [module, optimizer] + ([DummyScheduler(optimizer)] if "scheduler" in cfg else [])
    engine = accelerator.prepare(*objects)[0]  # the DeepSpeed engine itself
    return ChunkwiseEngine(engine, ChunkwiseConfig.from_ds_config(cfg))


def build_data(args: argparse.Namespace, cfg: dict):
    """(train, held-out) datasets: the synthetic task, or records tokenized with the model's tokenizer."""
    if args.data is None:
        vocab = cfg["model"].get("config", {}).get("vocab_size")
        if vocab is None:
            raise ValueError("the synthetic tasks need a model built from a config; pass --data for a real model")
        task = RecallTask if args.task == "recall" else PasskeyTask
        return task(100_000, args.seq_len, vocab, seed=args.seed), task(64, args.seq_len, vocab, seed=args.seed + 1)
    records = load_records(args.data)
    if len(records) < 2:
        raise ValueError(f"{args.data}: need at least 2 records (one is held out for evaluation)")
    if "name_or_path" not in cfg["model"]:
        raise ValueError("--data needs the model's tokenizer: pass --model (a hub id or local path)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"]["name_or_path"])
    held_out = max(1, len(records) // 50)  # 2% for evaluation
    train_set = TokenizedDataset(records[held_out:], tokenizer, args.seq_len)
    return train_set, TokenizedDataset(records[:held_out], tokenizer, args.seq_len)


BAR_KEYS = ("loss", "tok/s", "peak_gb", "host_gb", "replayed")


class Logger:
    """Rank 0: a tqdm bar, <output-dir>/metrics.jsonl, and tensorboard when asked."""

    def __init__(self, args: argparse.Namespace, start: int, rank: int):
        from tqdm import tqdm

        self.rank, self.tb = rank, None
        self.bar = tqdm(total=args.max_steps, initial=start, disable=rank != 0, dynamic_ncols=True)
        if rank == 0:
            os.makedirs(args.output_dir, exist_ok=True)
            self.file = open(os.path.join(args.output_dir, "metrics.jsonl"), "a")
            if args.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(args.output_dir, "tb"))

    def log(self, record: dict, advance: bool = False) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if self.tb is not None and key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])
        if advance:
            self.bar.set_postfix({k: record[k] for k in BAR_KEYS}, refresh=False)
            self.bar.update(1)
        else:
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def close(self) -> None:
        self.bar.close()
        if self.rank == 0:
            self.file.close()


def peak_memory_gb() -> dict:
    """Peak device memory (CUDA; on CPU the process RSS) and peak host memory (process RSS:
    with ZeRO offload the optimizer lives there, with kv_offload the KV cache)."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    device = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else host
    return {"peak_gb": round(device, 3), "host_gb": round(host, 3)}


def run_eval(engine, data, args, chunk_size: int, micro: int) -> dict:
    from ds_chunk.evaluate import evaluate

    loader = batches(data, micro, seed=0)
    return evaluate(engine.hf_model, (next(loader) for _ in range(args.eval_batches)), chunk_size)


def train(args: argparse.Namespace, engine, train_data, eval_data) -> list[dict]:
    """The loop: one engine.train_batch per step; eval, checkpoint, log. Returns the records."""
    rank, world = engine.rank_and_world()
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    rows, chunk = micro * gas, engine.chunkwise.chunk_size if engine.chunkwise.enabled else args.seq_len
    ckpt_dir, start = os.path.join(args.output_dir, "checkpoints"), 0
    if args.resume and (last := checkpoint.latest(ckpt_dir)):
        start = checkpoint.load(engine, last)["step"]
    log, history = Logger(args, start, rank), []
    loader = batches(train_data, rows * world, args.seed, start=start)  # the same global batch on every rank
    try:
        for step in range(start + 1, args.max_steps + 1):
            batch = {k: v[rank * rows : (rank + 1) * rows] for k, v in next(loader).items()}
            history.append(train_step(engine, batch, step, world))
            log.log(history[-1], advance=True)
            if step % args.eval_every == 0 or step == args.max_steps:
                metrics = run_eval(engine, eval_data, args, chunk, micro)
                history.append({"step": step} | {f"eval_{k}": v for k, v in metrics.items()})
                log.log(history[-1])
            if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
                checkpoint.save(engine, ckpt_dir, step, {"step": step})
    finally:
        log.close()  # before any error message, so it stays the last line
    return history


def train_step(engine, batch: dict, step: int, world: int) -> dict:
    t0 = time.perf_counter()
    loss = engine.train_batch(batch).item()
    tokens = int(batch["attention_mask"].sum()) * world
    return {
        "step": step,
        "loss": loss,
        "lr": engine.get_lr()[0],
        "tok/s": round(tokens / (time.perf_counter() - t0)),
        **peak_memory_gb(),
        "replayed": sum(len(r.replayed) for r in engine.last_results),
    } | kv_host(engine)


def kv_host(engine) -> dict:
    """With kv_offload: the most host memory a micro-batch's KV cache, its gradient and the
    saved tensors took (part of host_gb)."""
    if not engine.chunkwise.kv_offload:
        return {}
    return {"kv_host_gb": round(max(r.host_peak_bytes for r in engine.last_results) / 2**30, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = load_config(args)
    train_data, eval_data = build_data(args, cfg)
    engine = build_engine(cfg)
    return train(args, engine, train_data, eval_data)


if __name__ == "__main__":
    from ds_chunk.adapter import UnsupportedModelError

    try:
        main()
    except (ValueError, ConfigError, FileNotFoundError, UnsupportedModelError) as e:
        print(f"error: {e}", file=sys.stderr)  # one clear line, no traceback wall
        sys.exit(2)
