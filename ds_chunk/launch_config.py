"""The launch script's DeepSpeed config: the JSON file with the command-line flags applied
(``launch/train.py``'s ``--chunk-size``, ``--lora-r``, ``--lr``, ...), each "auto" resolved or
refused by name."""

from __future__ import annotations

import argparse
import json
import os

from ds_chunk.config import ChunkwiseConfig, warn_misspelled_blocks


def load_config(args: argparse.Namespace, micro_batch: int | None = None) -> dict:
    """The DeepSpeed config with CLI overrides applied and every "auto" resolved or rejected."""
    if not os.path.isfile(args.deepspeed_config):
        raise FileNotFoundError(f"DeepSpeed config not found: {args.deepspeed_config}")
    with open(args.deepspeed_config) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.deepspeed_config}:{e.lineno}: not valid JSON ({e.msg})") from None
    warn_misspelled_blocks(cfg, args.deepspeed_config)
    chunk_flags = (args.chunk_size, args.sparse_rate, args.always_replay, args.sampler, args.truncate or None,
                   args.kv_offload or None, args.keep_chunks, args.memory_budget_gb)  # fmt: skip
    if "chunkwise" not in cfg and all(flag is None for flag in chunk_flags):
        cfg["chunkwise"] = {"enabled": False}  # a plain DeepSpeed config trains unchunked, as the library does
    cfg["chunkwise"] = chunkwise_block(args, cfg.get("chunkwise", {}))
    ChunkwiseConfig.from_dict(cfg["chunkwise"])  # fail early, naming the key
    optimizer = {"lr": args.lr, "weight_decay": args.weight_decay}
    for key, value in optimizer.items():
        if value is not None:
            cfg.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})[key] = value
    batch = {"train_micro_batch_size_per_gpu": args.micro_batch_size, "gradient_accumulation_steps":
             args.gradient_accumulation_steps, "gradient_clipping": args.max_grad_norm,
             "sequence_parallel_size": args.sequence_parallel_size}  # fmt: skip
    cfg.update({key: value for key, value in batch.items() if value is not None})
    if args.micro_batch_size or args.gradient_accumulation_steps or args.sequence_parallel_size:
        cfg.pop("train_batch_size", None)  # derived again below, consistent with the new factors
    if args.lr_scheduler:
        cfg.pop("scheduler", None)  # the flag's schedule replaces it (see lr_schedule)
    cfg["model"] = model_block(args, cfg.get("model"))
    from ds_chunk.model import ModelConfig

    ModelConfig.from_dict(cfg["model"])  # fail early, naming the key
    return resolve_auto(cfg, micro_batch)


def chunkwise_block(args: argparse.Namespace, block: dict) -> dict:
    chunkwise = dict(block)
    if args.chunk_size is not None:
        chunkwise["chunk_size"] = args.chunk_size
    if args.sparse_rate is not None:
        chunkwise["sparse"] = {**chunkwise.get("sparse", {}), "rate": args.sparse_rate}
        chunkwise["sparse"].pop("num_chunks", None)
    for key, value in (("always_replay", args.always_replay), ("sampler", args.sampler)):
        if value:
            chunkwise["sparse"] = {**chunkwise.get("sparse", {}), key: value}
    if args.truncate:
        chunkwise["truncate"] = True
    if args.kv_offload:
        chunkwise["kv_offload"] = True
    for key in ("keep_chunks", "memory_budget_gb"):
        if getattr(args, key) is not None:
            chunkwise[key] = getattr(args, key)
    return chunkwise


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
    if getattr(args, "rope_scaling", False) is not False:  # --rope-scaling given (None: none)
        block.pop("rope_scaling", None)
        if args.rope_scaling:
            block["rope_scaling"] = args.rope_scaling
    block.setdefault("seed", args.seed)
    return block


def resolve_auto(cfg: dict, micro_batch: int | None) -> dict:
    """Fill the "auto" values we can (batch sizes, clipping); reject the rest by name.

    Plain DeepSpeed fills none, and accelerate fills the micro batch only from a
    dataloader passed to prepare(), which we do not pass.
    """
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch or 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
    }
    for key, value in fill.items():
        if cfg.get(key) == "auto":
            cfg[key] = value
    if cfg.get("train_batch_size", "auto") == "auto":
        cfg["train_batch_size"] = cfg.get("train_micro_batch_size_per_gpu", 1) * cfg.get(
            "gradient_accumulation_steps", 1
        ) * data_parallel_size(cfg)  # fmt: skip
    from ds_chunk.engine import load_ds_config

    return load_ds_config(cfg)  # raises on any "auto" left, naming its key


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def data_parallel_size(cfg: dict) -> int:
    """The ranks that train on different rows: all of them over ``sequence_parallel_size``
    (the ranks of a sequence-parallel group share their rows)."""
    from ds_chunk.engine import sequence_parallel_size

    size = sequence_parallel_size(cfg)
    if world_size() % size:
        raise ValueError(f"sequence_parallel_size = {size} does not divide the {world_size()} ranks")
    return world_size() // size
