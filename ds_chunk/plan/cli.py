"""Memory planner: predict the peak memory of a training step and pick the chunk size.

    python -m ds_chunk.plan --config path/to/config.json --seq-len 16384 --gpu-mem-gb 24 \\
        --dtype bfloat16 --quant 4bit --lora-rank 8
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from ds_chunk.plan.compare import check, check_table
from ds_chunk.plan.predict import estimate, recommend
from ds_chunk.plan.shape import DTYPE_BYTES, GIB, ModelShape, Setup

# ---- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_chunk.plan", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        help="config.json (file or folder), a name (llama-3-8b, smollm2-135m), or a hub id (needs the network)",
    )
    p.add_argument("--seq-len", type=int)
    p.add_argument("--gpu-mem-gb", type=float, help="device memory budget; with it, the chunk size is recommended")
    p.add_argument("--method", choices=["seco", "spaco", "plain", "ckpt"], default="seco")
    p.add_argument("--chunk-size", type=int, default=512, help="the chunk size to break down (default 512)")
    p.add_argument("--keep-chunks", type=int, default=0, help="chunks joined to the last one (chunkwise.keep_chunks)")
    p.add_argument("--loss-chunk-size", type=int)
    p.add_argument("--spaco-rate", type=float, help="SpaCO replay probability (implies --method spaco)")
    p.add_argument("--kv-offload", action="store_true")
    p.add_argument("--attention", choices=["auto", "flash", "masked"], default="auto",
                   help="flash (CUDA, 16-bit, no padding) or HF's masked sdpa; auto: by dtype")  # fmt: skip
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--quant", choices=["none", "8bit", "4bit"], default="none")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument(
        "--sequence-parallel-size",
        type=int,
        default=1,
        help="ranks each sequence is split over (Ulysses); --world-size counts them",
    )
    p.add_argument("--reserve-gb", type=float, default=1.0, help="CUDA context, workspace, fragmentation")
    p.add_argument("--check", type=Path, metavar="CSV", help="compare with a ds_chunk.bench CSV instead (--config: "
                   "the model it measured; default: the CSV's model column, else the bench's model)")  # fmt: skip
    args = p.parse_args(argv)
    if not args.check and (args.config is None or args.seq_len is None):
        p.error("--config and --seq-len are required (or --check CSV)")
    return args


def setup_from_args(args: argparse.Namespace) -> Setup:
    return Setup(
        seq_len=args.seq_len,
        method="spaco" if args.spaco_rate else args.method,
        chunk_size=args.chunk_size,
        keep_chunks=args.keep_chunks,
        loss_chunk_size=args.loss_chunk_size,
        sparse_rate=args.spaco_rate,
        kv_offload=args.kv_offload,
        attention=args.attention,
        batch=args.batch,
        dtype=args.dtype,
        quant=args.quant,
        lora_rank=args.lora_rank,
        lora_targets=tuple(args.lora_targets),
        zero_stage=args.zero_stage,
        offload_optimizer=args.offload_optimizer,
        world_size=args.world_size,
        sequence_parallel=args.sequence_parallel_size,
        gpu_mem_gb=args.gpu_mem_gb,
        reserve_gb=args.reserve_gb,
    )


def report(shape: ModelShape, setup: Setup) -> tuple[str, bool]:
    """The breakdown at ``setup.chunk_size`` and, with a budget, the recommendation; and
    whether it fits (True without a budget)."""
    est = estimate(shape, setup)
    what = f"{setup.method}" + (f" chunk {setup.chunk_size}" if setup.chunked else "")
    what += f", {setup.keep_chunks} kept" if setup.chunked and setup.keep_chunks else ""
    lines = [f"{what}, T={setup.seq_len}, {shape.params() / 1e6:.0f}M params:", est.table()]
    if setup.gpu_mem_gb is None:
        return "\n".join(lines), True
    rec = recommend(shape, setup)
    if rec.chunk_size and setup.chunked:
        lines.append(f"recommended chunk_size: {rec.chunk_size} ({rec.estimate.total_bytes / GIB:.2f} GiB "
                     f"of {setup.gpu_mem_gb} GiB)")  # fmt: skip
    elif rec.chunk_size:
        lines.append(f"fits: {est.total_bytes / GIB:.2f} GiB of {setup.gpu_mem_gb} GiB")
    else:
        where = " even at the smallest chunk" if setup.chunked else ""
        lines.append(f"does not fit in {setup.gpu_mem_gb} GiB (needs {rec.estimate.total_bytes / GIB:.2f} GiB"
                     f"{where}). What would help:")  # fmt: skip
        lines += [f"  - {a}" for a in rec.advice]
    return "\n".join(lines), rec.chunk_size is not None


def run(args: argparse.Namespace) -> int:
    """Print the report (or the check); the exit status: 0, or 1 when it does not fit."""
    if args.check:
        if not args.check.is_file():
            raise FileNotFoundError(f"bench CSV not found: {args.check}")
        with open(args.check) as f:
            rows = list(csv.DictReader(f))
        results = check(rows, ModelShape.from_config(args.config) if args.config else None)
        if not results:
            raise ValueError(f"{args.check}: no measured point to check (rows with status ok and a peak_mib)")
        print(check_table(results))
        worst = max(abs(r["error"]) for r in results)
        print(f"\nlargest error: {100 * worst:.1f}% over {len(results)} measured points")
        return 0
    text, fits = report(ModelShape.from_config(args.config), setup_from_args(args))
    print(text)
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m ds_chunk.plan`` / ``ds-chunk-plan``: errors are one line and exit 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
