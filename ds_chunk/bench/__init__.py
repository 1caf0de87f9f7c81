"""Benchmark: peak memory and seconds per step vs sequence length, per training method.

    python -m ds_chunk.bench --seq-lens 2048 4096 8192 --methods plain ckpt seco

Each (method, length) point runs in a fresh, pinned subprocess; ``--help`` (``cli``) says
what is measured and how. Modules: ``point`` (a point, its model and step), ``meter``
(measuring inside the worker process), ``runner`` (the sweep over worker processes),
``report`` (CSV, markdown table, plot), ``cli`` (the command line).
"""

from __future__ import annotations

from ds_chunk.bench.cli import describe, main, parse_args
from ds_chunk.bench.meter import (
    MIB,
    CpuPeak,
    CudaPeak,
    LimitExceeded,
    StepTimes,
    measure,
    measure_interleaved,
    worker,
)
from ds_chunk.bench.point import DEFAULT_MODEL, LORA_TARGETS, Point, build_model, make_step, parse_method
from ds_chunk.bench.report import CSV_FIELDS, markdown_table, plot, read_csv, time_keys, write_csv, write_outputs
from ds_chunk.bench.runner import EXACT_RSS_ENV, PAGE, default_cpus, expand, run_interleaved, run_point, sweep

__all__ = [
    "CSV_FIELDS",
    "DEFAULT_MODEL",
    "EXACT_RSS_ENV",
    "LORA_TARGETS",
    "MIB",
    "PAGE",
    "CpuPeak",
    "CudaPeak",
    "LimitExceeded",
    "Point",
    "StepTimes",
    "build_model",
    "default_cpus",
    "describe",
    "expand",
    "main",
    "make_step",
    "markdown_table",
    "measure",
    "measure_interleaved",
    "parse_args",
    "parse_method",
    "plot",
    "read_csv",
    "run_interleaved",
    "run_point",
    "sweep",
    "time_keys",
    "worker",
    "write_csv",
    "write_outputs",
]
