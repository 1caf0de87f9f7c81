"""Figures README.md and docs/ quote from a deterministic command are that command's output today,
and a figure quoted twice is the same in both places.

python tests/test_readme_figures.py    # prints the planner table as it should read in docs/benchmarks.md
python tests/test_readme_figures.py --sequence-parallel    # and README's sequence-parallel table
"""

import os
import re

from ds_chunk.plan import GIB, ModelShape, estimate, parse_args, setup_from_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/benchmarks.md's command for the Llama-3-8B table, one sequence length per row
PLANNER = ("--config llama-3-8b --seq-len {T} --chunk-size 1024 --loss-chunk-size 256 --quant 4bit --lora-rank 8 "
           "--zero-stage 1 --offload-optimizer")  # fmt: skip
PLANNER_HEADER = "| T | device GiB, HF masked sdpa | device GiB, flash chunk attention |"


def planner_rows() -> list[str]:
    """The rows of the Llama-3-8B table as ``python -m ds_chunk.plan`` computes them now."""
    rows = []
    for t in (16384, 32768, 65536, 131072):
        args = PLANNER.format(T=t).split()
        shape = ModelShape.from_config("llama-3-8b")
        masked, flash, offload = (
            estimate(shape, setup_from_args(parse_args(args + extra)))
            for extra in (["--attention", "masked"], ["--attention", "flash"], ["--kv-offload"])
        )
        cells = [masked.total_bytes, flash.total_bytes, offload.total_bytes, sum(offload.host.values())]
        rows.append(f"| {t // 1024}K | " + " | ".join(f"{c / GIB:.1f}" for c in cells) + " |")
    return rows


# README's command for one 1M-token sequence of Llama-3-8B QLoRA on 8 GPUs (less the last two flags, varied)
SEQUENCE_PARALLEL = ("--config llama-3-8b --seq-len 1048576 --chunk-size 4096 --quant 4bit --lora-rank 8 "
                     "--zero-stage 1 --offload-optimizer --world-size 8 --gpu-mem-gb 80")  # fmt: skip
SEQUENCE_PARALLEL_HEADER = "| `--sequence-parallel-size` | `--kv-offload` | device GiB per GPU |"


def sequence_parallel_rows() -> list[str]:
    """The rows of that table as ``python -m ds_chunk.plan`` computes them now."""
    from ds_chunk.plan import recommend

    rows = []
    for sp, offload in ((1, False), (1, True), (8, False), (8, True)):
        args = SEQUENCE_PARALLEL.split() + ["--sequence-parallel-size", str(sp)] + (["--kv-offload"] if offload else [])
        shape, setup = ModelShape.from_config("llama-3-8b"), setup_from_args(parse_args(args))
        est, rec = estimate(shape, setup), recommend(shape, setup, advise=False)
        best = f"{rec.chunk_size // 1024}K" if rec.chunk_size else "none"
        device, host = est.total_bytes / GIB, sum(est.host.values()) / GIB
        cells = [str(sp), "yes" if offload else "no", f"{device:.1f}", f"{host:.1f}", best]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def test_sequence_parallel_table_is_what_the_planner_prints():
    want = sequence_parallel_rows()
    got = table_rows("README.md", SEQUENCE_PARALLEL_HEADER)
    assert got == want, "README's sequence-parallel table is stale; it should read:\n" + "\n".join(want)


def table_rows(page: str, header: str) -> list[str]:
    """The data rows of the table of ``page`` whose header starts with ``header``."""
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    start = text.index(header)
    table = re.match(r"((?:\|.*\n)+)", text[start:]).group(1).strip().splitlines()
    return table[2:]  # past the header and the |---| line


def test_planner_table_is_what_the_planner_prints():
    want = planner_rows()
    got = table_rows("docs/benchmarks.md", PLANNER_HEADER)
    assert got == want, "docs/benchmarks.md's planner table is stale; it should read:\n" + "\n".join(want)


def test_readme_headline_is_the_memory_budget_table():
    """README's headline rows quote docs/memory-budget.md's T=4096 rows: the same figures."""
    budget = {}
    for row in table_rows("docs/memory-budget.md", "| T | method | budget GiB |"):
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0] == "4096":  # T, method, budget, picked, peak, planner, s/step, x plain, x ckpt, mem x plain
            budget[cells[2] or cells[1]] = (cells[4], cells[9], f"{float(cells[6]):.1f}", cells[7])
    for row in table_rows("README.md", "| method | step peak MiB |"):
        cells = [c.strip() for c in row.strip("|").split("|")]
        key = next((k for k in budget if f"`memory_budget_gb: {k}`" in cells[0]), None)
        key = key or {"plain backprop": "plain backprop", "HF gradient checkpointing": "HF checkpointing"}[cells[0]]
        assert tuple(cells[1:]) == budget[key], f"README's '{cells[0]}' row differs from docs/memory-budget.md"


if __name__ == "__main__":
    import sys

    print("\n".join(sequence_parallel_rows() if "--sequence-parallel" in sys.argv else planner_rows()))
