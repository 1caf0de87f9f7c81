"""The sweep, in the parent process: each point measured in fresh worker subprocesses
(pinned to CPUs, watched for memory and time), and the rows collected."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ds_chunk.bench.point import Point, parse_method

PAGE = 4096


# ---- the sweep (parent process) ------------------------------------------------------


def default_cpus(threads: int) -> str | None:
    """The last ``threads`` CPUs this process may use (core 1 of 2 for one thread), or None.

    Keeping the measured process off CPU 0 keeps other work on the machine (a test run)
    from stealing its time; None when there is nothing to pin to or no ``taskset``.
    """
    if not hasattr(os, "sched_getaffinity") or shutil.which("taskset") is None:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return ",".join(map(str, cpus[-threads:])) if len(cpus) > threads else None


# For the memory process only: glibc keeps freed blocks below its mmap threshold (dynamic,
# up to 32 MiB) in the heap, so RSS would keep 100+ MiB of freed tensors and a later
# allocation would reuse them unseen (measured: per-step figures off by -40%..+20%).
# A fixed one-page threshold maps every block of 4 KiB or more on its own and unmaps it on
# free, so RSS follows the live bytes: for SeCO at T=1024 the peak RSS increase matched the
# torch profiler's peak of allocated CPU bytes within 0.5 MiB. It costs page faults, so
# the timed steps run in a second process with the default allocator.
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(PAGE), "MALLOC_TRIM_THRESHOLD_": str(PAGE), "MALLOC_TOP_PAD_": "0"}


def _worker_command(payload: dict, cpus: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "ds_chunk.bench", "--worker", json.dumps(payload)]
    return ["taskset", "-c", cpus, *cmd] if cpus else cmd


def _worker_env(threads: int, exact_rss: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[2])  # the same ds_chunk as this process
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return {**env, **EXACT_RSS_ENV} if exact_rss else env


def _watch(proc: subprocess.Popen, limit_bytes: float | None, timeout: float) -> str | None:
    """Wait for ``proc``; kill it past the RSS limit ("OOM") or the timeout ("timeout")."""
    import psutil

    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return "timeout"
        if limit_bytes is not None:
            try:
                if psutil.Process(proc.pid).memory_info().rss > limit_bytes:
                    proc.kill()
                    proc.wait()
                    return "OOM"
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)
    return None


def _spawn(payload: dict, point: Point, cpus: str | None, timeout: float) -> dict:
    """Run one worker process (threads and memory limit from ``point``); its result, or
    OOM / timeout / error without raising."""
    limit = point.mem_limit_gb * 2**30 if point.mem_limit_gb is not None and point.device == "cpu" else None
    env = _worker_env(point.threads, exact_rss=payload["mode"] == "memory")
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(_worker_command(payload, cpus), stdout=out, stderr=subprocess.STDOUT, env=env)
        killed = _watch(proc, limit, timeout)
        out.seek(0)
        text = out.read()
    if killed:
        return {"status": killed, "error": f"killed by the benchmark ({killed})"}
    lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT ") :])
    if proc.returncode in (-9, 137):  # SIGKILL without our doing: the kernel's OOM killer
        return {"status": "OOM", "error": "killed (SIGKILL), most likely by the OOM killer"}
    tail = "\n".join(text.splitlines()[-15:])
    return {"status": "error", "error": f"exit code {proc.returncode}:\n{tail}"}


def run_point(point: Point, cpus: str | None, timeout: float = 3600.0, what: str = "both") -> dict:
    """Measure ``point`` in fresh subprocesses; never raises for OOM, a crash or a timeout.

    what: "both" (CPU: a memory process, then a timing process), "memory" or "time".
    """

    def spawn(mode: str) -> dict:
        return _spawn({"point": dataclasses.asdict(point), "mode": mode}, point, cpus, timeout)

    if point.device == "cuda":
        return spawn("both")
    memory = spawn("memory") if what in ("both", "memory") else {"status": "ok"}
    if memory["status"] != "ok" or what == "memory":
        return memory
    timing = spawn("time")
    if timing["status"] != "ok" or what == "time":
        return timing
    return {**timing, **{k: memory[k] for k in ("peak_mib", "peak_abs_mib", "loaded_mib", "host_mib") if k in memory}}


def run_interleaved(points: list[Point], cpus: str | None, timeout: float, draws: int = 1) -> list[dict]:
    """Time ``points`` (one model, one length) in one fresh process, alternating their steps."""
    payload = {"points": [dataclasses.asdict(p) for p in points], "mode": "interleave", "draws": draws}
    out = _spawn(payload, points[0], cpus, timeout)
    return out["results"] if out["status"] == "ok" else [dict(out) for _ in points]


def expand(args: argparse.Namespace) -> list[Point]:
    """All points of the sweep, by sequence length first (short ones first)."""
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    common = dict(model=args.model, device=args.device, dtype=dtype, batch=args.batch, repeats=args.repeats)
    common.update(threads=args.threads, lora_rank=args.lora_rank, seed=args.seed, mem_limit_gb=args.mem_limit_gb)
    common.update(lora_targets=tuple(args.lora_targets))
    points = []
    for seq_len, weights, method in itertools.product(args.seq_lens, args.weights, args.methods):
        rate = parse_method(method)
        chunked = method == "seco" or rate is not None
        # seco with --memory-budgets-gb: one point per budget, the planner picks the settings
        sizes = [(c, k, None) for c in args.chunk_sizes for k in (args.keep_chunks if method == "seco" else [0])]
        budgets = [(args.chunk_sizes[0], 0, b) for b in args.memory_budgets_gb or []]
        variants = itertools.product(
            (budgets or sizes) if method == "seco" else sizes if chunked else sizes[:1],
            args.loss_chunk_sizes if chunked else [None],
            args.report_loss if rate is not None else ["estimate"],
            args.kv_offload if chunked else [False],
        )
        for (chunk, keep, budget), loss_chunk, report, offload in variants:
            settings = dict(chunk_size=chunk, keep_chunks=keep, memory_budget_gb=budget, loss_chunk_size=loss_chunk)
            points.append(Point(method, seq_len, **settings, report_loss=report, kv_offload=offload, weights=weights,
                                **common))  # fmt: skip
    return points


def sweep(
    points: list[Point], cpus: str | None, timeout: float, log=print, saved=None, what="both", interleave=False, draws=1
) -> list[dict]:
    """Run every point; a method that ran out of memory is not retried at longer sequences.

    saved(rows), if given, is called after each point (so a stopped sweep keeps its rows).
    what: measure "both", only "time" or only "memory" (see ``run_point``).
    interleave (CPU): per sequence length, the memory of each point in its own fresh
    process, then the timing of all of them in one process, alternating (``run_interleaved``).
    """
    rows, failed = [], set()
    for group in _groups(points, interleave):
        results = {}
        for point in group:
            if point.label in failed:
                results[point] = {"status": "OOM", "error": "skipped: OOM at a shorter sequence"}
            elif interleave and what == "time":
                results[point] = {"status": "ok"}
            else:
                t0 = time.monotonic()
                results[point] = run_point(point, cpus, timeout, "memory" if interleave else what)
                results[point]["wall_s"] = round(time.monotonic() - t0, 1)
        if interleave and what != "memory":
            _time_together(group, results, cpus, timeout, draws)
        for point in group:
            if results[point]["status"] == "OOM":
                failed.add(point.label)
            rows.append({"label": point.label, **dataclasses.asdict(point), **results[point]})
            log(_progress(rows[-1]))
        if saved is not None:
            saved(rows)
    return rows


def _groups(points: list[Point], interleave: bool) -> list[list[Point]]:
    """One point per group, or (interleave) the points sharing a length and weights, in order."""
    if not interleave:
        return [[p] for p in points]
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        groups.setdefault((p.seq_len, p.weights), []).append(p)
    return list(groups.values())


def _time_together(group: list[Point], results: dict, cpus: str | None, timeout: float, draws: int) -> None:
    """Add the interleaved timing of the group's points that passed their memory run."""
    timed = [p for p in group if results[p]["status"] == "ok"]
    if not timed:
        return
    for point, out in zip(timed, run_interleaved(timed, cpus, timeout, draws)):
        results[point] = {**results[point], **out} if out["status"] == "ok" else out


def _progress(row: dict) -> str:
    head = f"{row['label']:>28} T={row['seq_len']:>6}:"
    if row["status"] != "ok":
        return f"{head} {row['status']} ({row.get('error', '')})"
    seconds = "time not measured"
    if row.get("s_per_step"):
        seconds = f"{row['s_per_step']:8.2f} s/step wall, {row.get('cpu_s_per_step') or 0:8.2f} CPU"
    memory = f"{row['peak_mib']:9.1f} MiB peak increase" if row.get("peak_mib") else "memory not measured"
    return f"{head} {seconds}  {memory}  (wall {row.get('wall_s', 0)} s)"
