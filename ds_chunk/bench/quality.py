"""Time to quality: SeCO vs SpaCO (samplers, rates) vs truncated backprop.

    python -m ds_chunk.bench.quality --tasks recall passkey --seeds 0 1 2
    python -m ds_chunk.bench.quality --tasks stdlib --methods seco truncate spaco@0.5 spaco@0.25 --seeds 0

Each (task, method, seed) is one ``launch/train.py`` run with the task's defaults (model,
batch, lr, sequence length), one thread, pinned to one core (``--jobs`` runs side by side,
one per core). Its ``metrics.jsonl`` gives held-out accuracy and loss at every evaluation,
and the wall seconds of each training step (``step_s``, evaluations excluded): the curves
are against steps and against the summed training seconds. Writes ``quality.csv`` (every
evaluation of every run), ``quality.md`` (seconds to reach accuracy X, and x SeCO) and
``quality.png`` (mean over seeds, shaded min..max). The byte-level language model on the
standard library's sources (``stdlib``) is judged by held-out loss instead: at SeCO's
number of steps and at SeCO's training seconds.

Methods: ``seco``, ``truncate``, ``<sampler>@<rate>[+sup]`` with sampler ``spaco``
(bernoulli), ``gradient`` or ``paper``, and ``+sup`` for ``always_replay: "supervised"``;
``base``: the untouched model, evaluated once (``--eval-only``).

``text-passkey`` is the real pretrained model (SmolLM2-135M, RoPE x4, see docs/quality.md):

    python -m ds_chunk.bench.quality --tasks text-passkey --methods base seco truncate gradient@0.5+sup

Its runs keep their final weights, evaluated again at a longer length (``BEYOND``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "launch" / "train.py"  # in a checkout of ds_chunk
METHODS = ["seco", "truncate", "spaco@0.5", "spaco@0.5+sup", "spaco@0.25+sup", "gradient@0.5+sup", "gradient@0.25+sup"]
# per task: optimizer steps of seco, of truncate, of the SpaCO methods (more: they are cheaper), eval interval
SCHEDULE = {"recall": (250, 250, 400, 25), "passkey": (300, 300, 450, 25), "stdlib": (300, 300, 480, 60),
            "text-passkey": (150, 120, 90, 20)}  # fmt: skip
# tasks whose final weights are evaluated again at a longer length (one length beyond
# training), on this many held-out prompts: {task: tokens}
BEYOND, BEYOND_PROMPTS = {"text-passkey": 2048}, 8
SAMPLERS = {"spaco": "bernoulli", "gradient": "gradient", "paper": "paper"}


PLAIN = {"seco": [], "truncate": ["--truncate"], "base": ["--eval-only"]}  # the methods without a sampler


def method_flags(method: str) -> list[str]:
    """The launch/train.py flags of a method name (see the module docstring)."""
    if method in PLAIN:
        return PLAIN[method]
    m = re.fullmatch(r"(spaco|gradient|paper)@([0-9.]+)(\+sup)?", method)
    if m is None or not 0 < float(m.group(2)) <= 1:
        raise argparse.ArgumentTypeError(
            f"{method}: expected seco, truncate, base or <spaco|gradient|paper>@<rate>[+sup]"
        )
    flags = ["--sparse-rate", m.group(2), "--sampler", SAMPLERS[m.group(1)]]
    return flags + (["--always-replay", "supervised"] if m.group(3) else [])


def schedule(task: str, method: str, args: argparse.Namespace) -> tuple[int, int]:
    """(optimizer steps, eval interval) of a run: the task's, or the command line's."""
    seco, truncate, sparse, every = SCHEDULE[task]
    if method == "base":  # the untouched model: one evaluation, no training
        return 0, every
    if method in ("seco", "truncate"):
        steps = args.steps or (seco if method == "seco" else truncate)
    else:
        steps = args.sparse_steps or sparse
    return steps, args.eval_every or every


def _finished(folder: Path, step: int) -> bool:
    metrics = folder / "metrics.jsonl"
    return metrics.exists() and any(json.loads(x).get("step") == step for x in metrics.read_text().splitlines())


def _saved_steps(folder: Path) -> int:
    """The step of the newest complete checkpoint a run folder holds (0: none)."""
    from ds_chunk.checkpoint import steps

    saved = steps(str(folder / "checkpoints"))
    return saved[-1][0] if saved else 0


def _train_py(flags: list[str], out: Path, cpu: int | None, what: str, resume: bool = False) -> None:
    """One launch/train.py process, one thread (pinned to ``cpu``), its output in out/train.log;
    ``resume``: continuing the run in ``out`` (its metrics kept), else starting over."""
    cmd = [sys.executable, str(TRAIN), *flags, "--output-dir", str(out)]
    cmd += ["--resume"] if resume else ["--overwrite-output-dir"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # an unfinished earlier run: start over
    with open(out / "train.log", "a" if resume else "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): see {out / 'train.log'}")
    print(f"done: {what}", flush=True)


def _folder(task: str, method: str, seed: int, args: argparse.Namespace) -> Path:
    return args.out / task / method / f"seed{seed}"


def run(task: str, method: str, seed: int, args: argparse.Namespace, cpu: int | None) -> Path:
    """One training run (skipped if its folder already holds a finished run), then for the
    tasks in BEYOND an evaluation of its final weights at the longer length; its folder."""
    steps, every = schedule(task, method, args)
    out, beyond = _folder(task, method, seed, args), BEYOND.get(task)
    flags = ["--task", task, "--seed", str(seed), *method_flags(method)]
    if not _finished(out, steps):
        length = ["--max-steps", str(steps)] if steps else []  # base: no training
        save = [] if beyond and steps else ["--no-save-final"]  # the longer evaluation reads the final weights
        # a shorter finished run of the same schedule (constant lr after warm-up) continues exactly
        resume = 0 < _saved_steps(out) < steps
        cmd = [*flags, *length, "--eval-every", str(every), *save]
        _train_py(cmd, out, cpu, f"{task} {method} seed {seed}", resume)
    if beyond and not _finished(out / f"eval{beyond}", steps):
        weights = ["--resume-from", str(out)] if steps else []  # base: the untouched model
        longer = ["--eval-only", *weights, "--seq-len", str(beyond), "--eval-batches", str(BEYOND_PROMPTS)]
        _train_py([*flags, *longer], out / f"eval{beyond}", cpu, f"{task} {method} seed {seed} at {beyond} tokens")
    return out


def curve(folder: Path) -> list[dict]:
    """(step, training seconds so far, eval loss, sequence and token accuracy) at each evaluation."""
    seconds, points = 0.0, []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        seconds += record.get("step_s", 0.0)
        if "eval_loss" in record:
            points.append({"step": record["step"], "seconds": seconds, "loss": record["eval_loss"],
                           "accuracy": record["eval_sequence_accuracy"],
                           "token_accuracy": record["eval_token_accuracy"]})  # fmt: skip
    return points


def longer(folder: Path, tokens: int) -> float | None:
    """Sequence accuracy of the run's final weights at ``tokens`` (its task's BEYOND), if evaluated."""
    metrics = folder / f"eval{tokens}" / "metrics.jsonl"
    if not metrics.exists():
        return None
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    return next((r["eval_sequence_accuracy"] for r in records if "eval_sequence_accuracy" in r), None)


def first_reach(points: list[dict], level: float) -> float | None:
    """Training seconds at the first evaluation with accuracy >= level (None: never)."""
    return next((p["seconds"] for p in points if p["accuracy"] >= level - 1e-9), None)


def _spread(values: list[float], digits: int) -> str:
    """median (min-max) of the seeds' values."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _reach(curves: list[list[dict]], level: float) -> tuple[str, float | None]:
    """'median (min-max)' seconds to ``level`` over the seeds that reach it, and the median."""
    times = [t for t in (first_reach(c, level) for c in curves) if t is not None]
    if not times:
        return "not reached", None
    note = "" if len(times) == len(curves) else f" [{len(times)}/{len(curves)} seeds]"
    return _spread(times, 0) + note, statistics.median(times)


def table(results: dict, levels: list[float], longer_acc: dict | None = None) -> str:
    """Per task and method: final accuracy and loss, s/step, seconds to each accuracy level
    and to SeCO's final accuracy, and those as multiples of SeCO's; the accuracy at SeCO's
    training seconds; with ``longer_acc`` ({(task, method): per seed}) the final weights'
    accuracy at the task's longer length."""
    head = ["task", "method", "steps", "final seq. acc.", "final eval loss", "s/step"]
    head += [f"s to acc {x}" for x in levels] + ["s to SeCO's final acc.", "x SeCO", "acc. at SeCO's seconds"]
    head += ["final acc. at " + "/".join(f"{n} tokens" for n in BEYOND.values())] if longer_acc else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, methods in results.items():
        seco = methods.get("seco")
        target = statistics.mean(c[-1]["accuracy"] for c in seco) if seco else None
        seco_time = _reach(seco, target)[1] if seco else None
        for method, curves in methods.items():
            finals = [c[-1] for c in curves]
            trained = finals[0]["step"] > 0  # not the base model's one evaluation
            cells = [task, method, str(finals[0]["step"]), _spread([f["accuracy"] for f in finals], 3),
                     _spread([f["loss"] for f in finals], 3),
                     _spread([f["seconds"] / f["step"] for f in finals], 3) if trained else "-"]  # fmt: skip
            cells += [_reach(curves, x)[0] for x in levels]
            text, median = _reach(curves, target) if target is not None else ("-", None)
            ratio = f"{median / seco_time:.2f}" if median is not None and seco_time else "-"
            at = [_at(c, "seconds", s[-1]["seconds"]) for c, s in zip(curves, seco)] if seco else []
            equal = _spread([p["accuracy"] for p in at], 3) if at and None not in at else "-"
            cells += [text, ratio, equal]
            if longer_acc:
                values = longer_acc.get((task, method), [])
                cells.append(_spread(values, 3) if values and None not in values else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _at(points: list[dict], key: str, limit: float) -> dict | None:
    """The last evaluation with ``key`` (step or seconds) at most ``limit``."""
    return next((p for p in reversed(points) if p[key] <= limit * (1 + 1e-9)), None)


def lm_table(results: dict) -> str:
    """Language modelling: held-out loss (nats and bits per byte) at the end, at SeCO's steps
    and at SeCO's training seconds, and the gaps to SeCO (median over seeds)."""
    head = ["task", "method", "steps", "s/step", "final loss (bits/byte)", "loss at SeCO's steps",
            "loss at SeCO's seconds", "- SeCO, equal steps", "- SeCO, equal seconds"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, methods in results.items():
        seco = methods.get("seco")
        seco_end = statistics.median(c[-1]["loss"] for c in seco) if seco else None
        for method, curves in methods.items():
            finals = [c[-1] for c in curves]
            final = statistics.median(f["loss"] for f in finals)
            cells = [task, method, str(finals[0]["step"]), _spread([f["seconds"] / f["step"] for f in finals], 3),
                     f"{final:.3f} ({final / math.log(2):.3f})"]  # fmt: skip
            for key in ("step", "seconds"):
                at = [_at(c, key, s[-1][key]) for c, s in zip(curves, seco)] if seco else []
                cells.append(_spread([p["loss"] for p in at], 3) if at and None not in at else "-")
            for key in ("step", "seconds"):
                at = [_at(c, key, s[-1][key]) for c, s in zip(curves, seco)] if seco else []
                ok = at and None not in at
                cells.append(f"{statistics.median(p['loss'] for p in at) - seco_end:+.3f}" if ok else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Accuracy against steps and against training seconds, one row per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4 * len(results)), squeeze=False)
    for row, (task, methods) in enumerate(results.items()):
        y = "loss" if task == "stdlib" else "accuracy"
        start = {b[0]["seed"]: b[0] for b in methods.get("base", [])}
        for col, x in enumerate(("step", "seconds")):
            ax = axes[row][col]
            for method, curves in methods.items():
                if method == "base":
                    ax.axhline(statistics.mean(c[0][y] for c in curves), ls="--", color="gray", label=method)
                    continue
                # every run starts from the base model of its seed (its one evaluation)
                curves = [[start[c[0]["seed"]]] + c if c[0]["seed"] in start else c for c in curves]
                n = min(len(c) for c in curves)
                xs = [statistics.mean(c[i][x] for c in curves) for i in range(n)]
                acc = [[c[i][y] for c in curves] for i in range(n)]
                (line,) = ax.plot(xs, [statistics.mean(a) for a in acc], label=method)
                ax.fill_between(xs, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.15)
            ax.set_xlabel("optimizer step" if x == "step" else "training seconds (1 core)")
            ax.set_ylabel("held-out loss (nats/byte)" if y == "loss" else "held-out sequence accuracy")
            ax.set_title(f"{task}: {y} vs {'steps' if x == 'step' else 'wall-clock'}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_chunk.bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["recall", "passkey"], choices=list(SCHEDULE))
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, help="optimizer steps of seco and truncate (default: the task's, SCHEDULE)")
    p.add_argument("--sparse-steps", type=int, help="optimizer steps of the SpaCO methods (default: the task's)")
    p.add_argument("--eval-every", type=int, help="default: the task's")
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.9], help="accuracies to time")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="runs side by side, one core each")
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"))
    p.add_argument("--report-only", action="store_true", help="tables and plot of the finished runs; start none")
    args = p.parse_args(argv)
    for method in args.methods:
        method_flags(method)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not TRAIN.exists():
        raise SystemExit(f"{TRAIN} not found: the quality benchmark runs from a checkout of ds_chunk")
    jobs = [(t, m, s) for t in args.tasks for m in args.methods for s in args.seeds]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    free: queue.Queue = queue.Queue()  # the cores not running a job now
    for cpu in cpus[: args.jobs] if len(cpus) >= args.jobs > 1 and shutil.which("taskset") else [None] * args.jobs:
        free.put(cpu)

    def work(job: tuple) -> Path:
        cpu = free.get()
        try:
            return run(*job, args, cpu)
        finally:
            free.put(cpu)

    if args.report_only:  # the finished runs only, none started
        jobs = [j for j in jobs if _finished(_folder(*j, args), schedule(j[0], j[1], args)[0])]
        folders = [_folder(*j, args) for j in jobs]
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            folders = list(pool.map(work, jobs))
    curves = [curve(folder) for folder in folders]  # one read of each run's metrics.jsonl
    results: dict = {}
    for (task, method, seed), points in zip(jobs, curves):
        results.setdefault(task, {}).setdefault(method, []).append([{**p, "seed": seed} for p in points])
    rows = [{"task": t, "method": m, "seed": s, **p} for (t, m, s), c in zip(jobs, curves) for p in c]
    if not rows:
        raise SystemExit(f"no run logged an evaluation: see the runs' metrics.jsonl under {args.out}")
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "quality.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n" + "".join(",".join(str(v) for v in r.values()) + "\n" for r in rows))
    lm = {t: m for t, m in results.items() if t == "stdlib"}
    tasks = {t: m for t, m in results.items() if t != "stdlib"}
    longer_acc: dict = {}
    for (task, method, _), folder in zip(jobs, folders):
        if task in BEYOND:
            longer_acc.setdefault((task, method), []).append(longer(folder, BEYOND[task]))
    text = "\n\n".join(([table(tasks, args.levels, longer_acc)] if tasks else []) + ([lm_table(lm)] if lm else []))
    (args.out / "quality.md").write_text(text + "\n")
    plot(results, args.out / "quality.png")
    print("\n" + text + f"\n\nwrote {args.out}/quality.csv, quality.md, quality.png")


if __name__ == "__main__":
    main()
