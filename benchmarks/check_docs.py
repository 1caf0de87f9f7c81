"""Rerun the commands behind the docs' tables of errors and compare with what the pages quote.

    python benchmarks/check_docs.py                  # all: ~12 minutes on two CPU cores
    python benchmarks/check_docs.py trainer planner  # some

The planner's table must be reproduced exactly (it is also a test). The equivalence tables are
float rounding: a figure passes within a factor of 10 of the quoted one, a quoted 0 below 1e-6
(CPUs sum in other orders); a row the command does not print (but those the table quotes from
another command, listed below), a row the page lacks, or a figure 10x off is a stale page: exit
status 1. The measured tables (seconds, MiB) are not rerun here: each names its bench command.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
# name: (page, the table's header, the command that prints it, label columns, tolerance factor)
# rows a table quotes from another command: the Trainer's 2-rank rows (tests/scripts/hf_two_rank.py)
ELSEWHERE = {
    ("`Trainer`", "2 ranks, DistributedDataParallel (gloo)"),
    ("`Trainer`", "2 ranks, DeepSpeed ZeRO-1"),
    ("`Trainer`", "2 ranks, DeepSpeed ZeRO-3 (rows of different lengths)"),
}
TABLES = {
    "planner": ("docs/benchmarks.md", "| T | device GiB, HF masked", [PY, "tests/test_readme_figures.py"], 1, 1.0),
    "trainer": ("docs/trainer.md", "| parent | setting |", [PY, "benchmarks/trainer_equivalence.py"], 2, 10.0),
    "real-model": ("docs/real-model.md", "| trained | dtype |", [PY, "benchmarks/real_model_equivalence.py"], 4, 10.0),
    "sp-planner": (
        "README.md",
        "| `--sequence-parallel-size` |",
        [PY, "tests/test_readme_figures.py", "--sequence-parallel"],
        2,
        1.0,
    ),
    "sp": ("docs/multi-gpu.md", "| what | ranks |", [PY, "benchmarks/sequence_parallel.py"], 2, 10.0),
    "sp-real-model": (
        "docs/multi-gpu.md",
        "| model | ranks |",
        ["torchrun", "--nproc_per_node", "3", "benchmarks/real_model_sequence_parallel.py"],
        3,
        10.0,
    ),
}


def rows(text: str, header: str | None, labels: int) -> dict[tuple, list[float | None]]:
    """{label cells: numbers} of the markdown table rows in text (after header, if given)."""
    if header:
        text = re.match(r"((?:\|.*\n)+)", text[text.index(header) :]).group(1)
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) <= labels or set(cells[0]) <= set("-: "):
            continue
        numbers = [re.match(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?", c) for c in cells[labels:]]
        if any(numbers):  # not a header
            out[tuple(cells[:labels])] = [float(m.group(0)) if m else None for m in numbers]
    return out


def close(quoted: float | None, now: float | None, factor: float) -> bool:
    if quoted is None or now is None:
        return quoted is now
    if factor == 1.0:
        return quoted == now
    if quoted == 0:  # exact on the machine that measured it: rounding elsewhere
        return abs(now) < 1e-6
    return 1 / factor <= now / quoted <= factor


def check(name: str) -> list[str]:
    page, header, cmd, labels, factor = TABLES[name]
    quoted = rows(open(os.path.join(ROOT, page)).read(), header, labels)
    print(f"{name}: {' '.join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c for c in cmd[1:])} ...", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        return [f"{name}: the command failed:\n{proc.stderr[-2000:]}"]
    now = rows(proc.stdout, None, labels)
    problems = []
    for key, figures in quoted.items():
        if key not in now:
            print(f"  {' | '.join(key)}: {'from another command' if key in ELSEWHERE else 'NOT PRINTED'}")
            if key not in ELSEWHERE:
                problems.append(f"{page}: {' | '.join(key)}: the command no longer prints this row")
            continue
        ok = len(figures) == len(now[key]) and all(close(q, n, factor) for q, n in zip(figures, now[key]))
        print(f"  {' | '.join(key)}: quoted {figures}, now {now[key]}{'' if ok else '  <- STALE'}")
        if not ok:
            problems.append(f"{page}: {' | '.join(key)}: quoted {figures}, now {now[key]}")
    problems += [f"{page}: the command prints a row the page lacks: {' | '.join(k)}" for k in now if k not in quoted]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tables", nargs="*", help=f"some of {', '.join(TABLES)} (default: all)")
    names = p.parse_args(argv).tables or list(TABLES)
    if unknown := [n for n in names if n not in TABLES]:
        p.error(f"unknown table {', '.join(unknown)}: expected some of {', '.join(TABLES)}")
    problems = [line for name in names for line in check(name)]
    print("\n".join(problems) or "every table as quoted")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
