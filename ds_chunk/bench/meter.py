"""Inside the worker process: memory meters, timed steps, and the measurement of one
point (or of several methods on one model, interleaved)."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import statistics
import threading
import time

from ds_chunk.bench.point import Point, build_model, make_step, parse_method

MIB = 2**20


# ---- memory meters -------------------------------------------------------------------


class CpuPeak:
    """Peak RSS of this process during a window, via the kernel's resettable VmHWM.

    Without /proc/self/clear_refs (non-Linux) it falls back to a 1 ms sampling thread,
    which can miss short spikes.
    """

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.thread: threading.Thread | None = None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.sampled = None
        except OSError:
            self.sampled, self.stop_flag = self.rss(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self) -> None:
        while not self.stop_flag.wait(0.001):
            self.sampled = max(self.sampled, self.rss())

    def peak(self) -> int:
        """The peak RSS since ``start`` (stops the sampler if one runs)."""
        if self.thread is not None:
            self.stop_flag.set()
            self.thread.join()
            self.thread = None
            return self.sampled
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


class CudaPeak:
    """Peak allocated CUDA memory during a window (``torch.cuda.max_memory_allocated``)."""

    def rss(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def start(self) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


class LimitExceeded(RuntimeError):
    """The measured peak passed ``--mem-limit-gb``."""


def _clear(model) -> None:
    model.zero_grad(set_to_none=True)
    gc.collect()


def _timed(step, device: str) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, what ``step`` returned).

    The CPU time is what the step cost this process: unlike the wall time it does not grow
    when another process shares the core (caches and memory bandwidth still are shared).
    """
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    out = step()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _limit_cuda(point: Point) -> None:
    """Make the CUDA allocator raise OutOfMemoryError past the memory limit."""
    import torch

    if point.mem_limit_gb is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, point.mem_limit_gb * 2**30 / total))


def _memory_steps(point: Point, model, step, meter) -> tuple[list[int], list[int], list[int]]:
    """Peak minus the level right before, per step.

    One step for the deterministic methods; SpaCO's peak depends on the draw (whether the
    last chunks are replayed), so it gets up to 5 steps, the same draws as the timed steps.
    """
    count = min(point.repeats, 5) if parse_method(point.method) is not None else 1
    increases, peaks, hosts = [], [], []
    for _ in range(count):
        _clear(model)
        before = meter.rss()
        meter.start()
        out = step()
        peak = meter.peak()
        hosts.append(out.host_peak_bytes if out is not None else 0)
        if point.mem_limit_gb is not None and peak > point.mem_limit_gb * 2**30:
            raise LimitExceeded(f"peak {peak / 2**30:.2f} GiB > --mem-limit-gb {point.mem_limit_gb}")
        increases.append(peak - before)
        peaks.append(peak)
    return increases, peaks, hosts


class StepTimes:
    """Wall and CPU seconds of the timed steps of one point, and the chunks each replayed."""

    def __init__(self):
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.replayed: list[int] = []

    def run(self, model, step, device: str) -> None:
        _clear(model)
        wall, cpu, out = _timed(step, device)
        self.walls.append(wall)
        self.cpus.append(cpu)
        if out is not None:
            self.replayed.append(len(out.replayed))

    def summary(self) -> dict:
        """Median, mean and all step times (wall and CPU); mean chunks replayed."""
        result = {"replayed_mean": statistics.mean(self.replayed) if self.replayed else None}
        for prefix, times in (("s", self.walls), ("cpu_s", self.cpus)):
            result[f"{prefix}_per_step"] = statistics.median(times)
            result[f"{prefix}_mean"] = statistics.mean(times)
            result[f"{prefix}_all"] = [round(t, 3) for t in times]
        return result


def _timed_steps(point: Point, model, step) -> dict:
    times = StepTimes()
    for _ in range(point.repeats):
        times.run(model, step, point.device)
    return times.summary()


def _toggled_checkpointing(model, step):
    """``step`` with HF gradient checkpointing switched on just for it (ckpt in a shared model)."""

    def run():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            return step()
        finally:
            model.gradient_checkpointing_disable()

    return run


def measure_interleaved(points: list[Point], draws: int = 1) -> list[dict]:
    """Time several methods on one model, alternating: round after round, each method's step.

    On a machine shared with other work, contention drifts over minutes; steps of all
    methods taken side by side in every round see the same drift, so their ratios hold.
    ``points[0].repeats`` rounds; SpaCO points take ``draws`` steps (draws) per round.
    """
    import torch

    torch.set_num_threads(points[0].threads)
    model = build_model(dataclasses.replace(points[0], method="plain"))
    steps = [make_step(p, model) for p in points]
    steps = [_toggled_checkpointing(model, s) if p.method == "ckpt" else s for p, s in zip(points, steps)]
    for step in steps:  # one warm-up step each
        _clear(model)
        step()
    times = [StepTimes() for _ in points]
    for _ in range(points[0].repeats):
        for point, step, record in zip(points, steps, times):
            for _ in range(draws if parse_method(point.method) is not None else 1):
                record.run(model, step, point.device)
    return [{"status": "ok", **record.summary()} for record in times]


def measure(point: Point, mode: str = "both") -> dict:
    """Run ``point`` here: one warm-up step, then timed steps ("time"), memory steps ("memory") or both."""
    import torch

    torch.set_num_threads(point.threads)
    if point.device == "cuda":
        _limit_cuda(point)
    meter = CudaPeak() if point.device == "cuda" else CpuPeak()
    model = build_model(point)
    step = make_step(point, model)
    _clear(model)
    result = {"status": "ok", "loaded_mib": meter.rss() / MIB}
    result["warmup_s"] = round(_timed(step, point.device)[0], 3)  # wall
    if mode in ("time", "both"):
        result.update(_timed_steps(point, model, step))
    if mode in ("memory", "both"):
        increases, peaks, hosts = _memory_steps(point, model, step, meter)
        result.update(peak_mib=max(increases) / MIB, peak_abs_mib=max(peaks) / MIB)
        if point.kv_offload:  # what of the peak the offloaded KV cache held in host memory
            result["host_mib"] = max(hosts) / MIB
    if point.memory_budget_gb is not None:
        result.update(step.picked())
    return result


def worker(payload: str) -> None:
    """Subprocess entry: measure one point and print its result as one JSON line."""
    args = json.loads(payload)
    try:
        if args["mode"] == "interleave":
            points = [Point(**p) for p in args["points"]]
            result = {"status": "ok", "results": measure_interleaved(points, args["draws"])}
        else:
            result = measure(Point(**args["point"]), args["mode"])
    except LimitExceeded as e:
        result = {"status": "OOM", "error": str(e)}
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not (isinstance(e, MemoryError) or "out of memory" in str(e).lower()):
            raise
        result = {"status": "OOM", "error": f"{type(e).__name__}: {str(e)[:200]}"}
    print("RESULT " + json.dumps(result), flush=True)
