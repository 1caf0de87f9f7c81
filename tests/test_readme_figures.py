"""Figures README.md quotes from a deterministic command are that command's output today.

python tests/test_readme_figures.py    # prints the tables as they should read in README
"""

import os
import re

from ds_chunk.plan import GIB, ModelShape, estimate, parse_args, setup_from_args

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

# README's command for the Llama-3-8B table, one sequence length per row
PLANNER = ("--config llama-3-8b --seq-len {T} --chunk-size 1024 --loss-chunk-size 256 --quant 4bit --lora-rank 8 "
           "--zero-stage 1 --offload-optimizer")  # fmt: skip
PLANNER_HEADER = "| T | device GiB, HF masked sdpa | device GiB, flash chunk attention |"


def planner_rows() -> list[str]:
    """The rows of README's Llama-3-8B table as ``python -m ds_chunk.plan`` computes them now."""
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


def readme_rows(header: str) -> list[str]:
    """The data rows of the README table whose header starts with ``header``."""
    with open(README) as f:
        text = f.read()
    start = text.index(header)
    table = re.match(r"((?:\|.*\n)+)", text[start:]).group(1).strip().splitlines()
    return table[2:]  # past the header and the |---| line


def test_readme_planner_table_is_what_the_planner_prints():
    want = planner_rows()
    assert readme_rows(PLANNER_HEADER) == want, "README's planner table is stale; it should read:\n" + "\n".join(want)


if __name__ == "__main__":
    print("\n".join(planner_rows()))
