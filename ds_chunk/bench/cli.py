"""Benchmark: peak memory and seconds per step vs sequence length, per training method.

    python -m ds_chunk.bench --seq-lens 2048 4096 8192 --methods plain ckpt seco

Methods: ``plain`` (full backprop, HF loss), ``ckpt`` (HF gradient checkpointing,
non-reentrant), ``seco`` (exact chunk-wise backward), ``spaco@<rate>`` (sparse replay,
bernoulli sampler). ``--weights qv`` trains only q_proj / v_proj (LoRA-like, no adapter
overhead); ``--weights qlora`` adds 4-bit NF4 base weights + LoRA.

Every (method, length) point runs in a fresh subprocess, pinned to its own CPU cores and
thread count, so one point's allocations cannot leak into the next one's figure.

What is measured (one "step" = forward + backward into ``.grad``, no optimizer step):
  * seconds/step: median over ``--repeats`` steps after one warm-up step.
  * CPU peak memory: the peak RSS of the process during a step minus its RSS right
    before that step (model loaded, inputs built, one warm-up step done, grads freed),
    maximum over the measured steps. The kernel's peak-RSS counter (VmHWM) is reset
    before each step (/proc/self/clear_refs), so it is the peak of that step alone, not
    the process's lifetime maximum.
  * CUDA peak memory: ``torch.cuda.max_memory_allocated`` during a step minus
    ``memory_allocated`` right before it (same definition, allocator bytes).
Out-of-memory (torch.OutOfMemoryError, a killed process, or ``--mem-limit-gb`` exceeded
by the process RSS / CUDA allocation) is recorded as ``OOM``; the sweep goes on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ds_chunk.bench.meter import worker
from ds_chunk.bench.point import parse_method
from ds_chunk.bench.report import read_csv, write_csv, write_outputs
from ds_chunk.bench.runner import default_cpus, expand, sweep


def describe(args: argparse.Namespace, cpus: str | None) -> str:
    """The header stating what was measured and how."""
    from importlib.metadata import version

    model = args.model or "Llama 4 layers, hidden 256, 4 heads / 4 KV heads, intermediate 688, vocab 32000 (random)"
    mem = (
        "CUDA max_memory_allocated during a step minus memory_allocated before it"
        if args.device == "cuda"
        else "peak RSS during a step minus RSS right before it (model loaded, one warm-up step done, grads "
        "freed), in its own process with glibc's mmap threshold at 4 KiB so RSS follows live bytes"
    )
    if args.measure == "time":
        mem = "not measured (--measure time)"
    if args.interleave:
        mem += "; times: all methods of a length timed in one process, alternating steps round by round"
    return (
        f"model: {model}; device {args.device}, {args.threads} thread(s), pinned to CPUs {cpus or 'none'}; "
        f"torch {version('torch')}; batch {args.batch}; s/step: median (and mean) of {args.repeats} steps after "
        f"1 warm-up (step = forward + backward{'; SpaCO: x ' + str(args.draws_per_round) if args.interleave else ''}), "
        f"wall and CPU time of the process (ratios: CPU time on CPU, wall on CUDA); peak MiB: {mem}."
    )


def _optional_int(text: str) -> int | str | None:
    return {"none": None, "auto": "auto"}.get(text.lower()) if text.lower() in ("none", "auto") else int(text)


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")
    return text.lower() == "true"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="ds-chunk-bench", description=__doc__, formatter_class=fmt)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--methods", nargs="+", default=["plain", "ckpt", "seco"], help="plain ckpt seco spaco@<rate>")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[512], help="chunk sizes for seco/spaco")
    p.add_argument("--keep-chunks", type=int, nargs="+", default=[0],
                   help="seco: chunks joined to the last, run once with autograd (chunkwise.keep_chunks)")  # fmt: skip
    p.add_argument("--memory-budgets-gb", type=float, nargs="+",
                   help="seco: one point per chunkwise.memory_budget_gb, the planner picking chunk, keep and "
                   "loss chunk (replaces --chunk-sizes / --keep-chunks for seco)")  # fmt: skip
    p.add_argument("--loss-chunk-sizes", type=_optional_int, nargs="+", default=["auto"],
                   help="LM head + CE sub-chunks: auto (the default rule), none (whole chunk)")  # fmt: skip
    p.add_argument("--report-loss", nargs="+", choices=["estimate", "exact", "off"], default=["estimate"],
                   help="spaco report_loss")  # fmt: skip
    p.add_argument("--kv-offload", type=_bool, nargs="+", default=[False], help="seco/spaco kv_offload: true false")
    p.add_argument("--weights", nargs="+", choices=["full", "qv", "lora", "qlora"], default=["full"],
                   help="qv: only q_proj/v_proj trained (LoRA-like); lora: peft LoRA; qlora: NF4 + LoRA")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"], help="lora / qlora target modules")
    p.add_argument("--model", default=None, help="config.json (random init), local path or hub id")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16 (CUDA default), float16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="measured steps after one warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    p.add_argument("--cpus", default="auto", help="taskset CPU list for the measured processes; 'none' to not pin")
    p.add_argument("--mem-limit-gb", type=float, default=None, help="record OOM past this (RSS / CUDA allocated)")
    p.add_argument("--measure", choices=["both", "time", "memory"], default="both", help="what to measure (CPU)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="CPU: time all methods of a length in one process, "
        "alternating steps (robust ratios on a shared machine); memory still one fresh process per point",
    )
    p.add_argument("--draws-per-round", type=int, default=1, help="with --interleave: SpaCO steps per round")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per point before it is recorded as timeout")
    p.add_argument("--ref", default=None, help="method the ratio columns divide by (default plain, else seco)")
    p.add_argument("--out", type=Path, default=Path("bench_out"))
    p.add_argument("--name", default="bench", help="file stem of the CSV / markdown / PNG outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", type=Path, nargs="+", help="no run: merge these CSVs into one table and plot")
    p.add_argument("--only", nargs="+", help="with --merge: keep only these method labels")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for method in args.methods:
        parse_method(method)
    if args.interleave and args.device == "cuda":
        p.error("--interleave is for CPU runs")
    return args


def _log(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the sweep (or merge earlier CSVs) and write <out>/<name>.csv, .md and .png."""
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    stem = args.out / args.name
    if args.merge:
        rows = [row for path in args.merge for row in read_csv(path) if not args.only or row["label"] in args.only]
        headers = [p.with_suffix(".md").read_text().split("\n")[0] for p in args.merge if p.with_suffix(".md").exists()]
        header = "\n\n".join(dict.fromkeys(headers)) or "merged: " + ", ".join(map(str, args.merge))
        ref = args.ref or ("plain" if any(r["method"] == "plain" for r in rows) else "seco")
    else:
        cpus = {"auto": default_cpus(args.threads), "none": None}.get(args.cpus, args.cpus)
        if args.device == "cuda" and args.cpus == "auto":
            cpus = None
        ref = args.ref or ("plain" if "plain" in args.methods else "seco")
        header = describe(args, cpus)
        print(header, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        csv_path = stem.with_suffix(".csv")
        save = lambda rows: write_csv(rows, csv_path)  # noqa: E731
        rows = sweep(expand(args), cpus, args.timeout, _log, save, args.measure, args.interleave, args.draws_per_round)
    table = write_outputs(rows, stem, header, ref)
    print("\n" + table + f"\n\nwrote {stem}.csv, {stem}.md, {stem}.png")
