"""Benchmark: peak memory and seconds per step vs sequence length, per training method.

    python -m ds_chunk.bench --seq-lens 2048 4096 8192 --methods plain ckpt seco

Methods: ``plain`` (full backprop, HF loss), ``ckpt`` (HF gradient checkpointing,
non-reentrant), ``seco`` (exact chunk-wise backward), ``spaco@<rate>`` (sparse replay,
bernoulli sampler). ``--weights qlora`` adds 4-bit NF4 base weights + LoRA.

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
import csv
import dataclasses
import gc
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The CPU model of the SeCO issue: Llama, 4 layers, hidden 256, vocab 32000. 4 query heads
# over 4 KV heads (head_dim 64) and intermediate 688 (~ 8/3 x 256, Llama's MLP ratio).
DEFAULT_MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
)
LORA_TARGETS = ("q_proj", "v_proj")
MIB = 2**20
PAGE = 4096


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark measurement: a method at one sequence length."""

    method: str  # plain | ckpt | seco | spaco@<rate>
    seq_len: int
    chunk_size: int = 512
    loss_chunk_size: int | None = None
    report_loss: bool = True
    weights: str = "full"  # full | qlora
    model: str | None = None  # None: DEFAULT_MODEL; a config.json (random init); a local path or hub id
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    repeats: int = 3
    threads: int = 1
    lora_rank: int = 8
    seed: int = 0
    mem_limit_gb: float | None = None

    @property
    def chunked(self) -> bool:
        return self.method == "seco" or self.method.startswith("spaco@")

    @property
    def label(self) -> str:
        """Method name with the settings that change it, e.g. ``spaco@0.125[512,no-loss]``."""
        name = self.method
        if self.chunked:
            opts = [str(self.chunk_size)]
            if self.loss_chunk_size:
                opts.append(f"loss{self.loss_chunk_size}")
            if self.method.startswith("spaco@") and not self.report_loss:
                opts.append("no-loss")
            name += "[" + ",".join(opts) + "]"
        return name + (" +qlora" if self.weights == "qlora" else "")


def parse_method(method: str) -> float | None:
    """The SpaCO rate of ``spaco@<rate>`` (None for the other methods); raises on unknown names."""
    if method in ("plain", "ckpt", "seco"):
        return None
    m = re.fullmatch(r"spaco@([0-9.]+(?:e-?\d+)?)", method)
    if m is None or not 0.0 < float(m.group(1)) <= 1.0:
        raise ValueError(f"unknown method {method!r}: expected plain, ckpt, seco or spaco@<rate in (0, 1]>")
    return float(m.group(1))


# ---- model and step (run inside the worker process) ----------------------------------


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _base_model(point: Point):
    """The full-precision model: the default config, a config.json (random init), or pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    dtype = _torch_dtype(point.dtype)
    torch.manual_seed(point.seed)
    if point.model is None:
        config = LlamaConfig(**DEFAULT_MODEL)
    elif point.model.endswith(".json"):
        config = AutoConfig.from_pretrained(point.model)
    else:
        return AutoModelForCausalLM.from_pretrained(point.model, dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _qlora_model(point: Point):
    """NF4 base weights (bitsandbytes) + LoRA on q_proj, v_proj (r, alpha = 2r, dropout 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _torch_dtype(point.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        source = point.model
        if point.model is None or point.model.endswith(".json"):
            _base_model(point).save_pretrained(tmp)  # quantize our random-init model via a save
            source = tmp
        device_map = {"": 0} if point.device == "cuda" else None
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quant, dtype=dtype, device_map=device_map
        )
    lora = LoraConfig(r=point.lora_rank, lora_alpha=2 * point.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, lora)


def build_model(point: Point):
    """The model of ``point`` on its device, in train mode (gradient checkpointing for ``ckpt``)."""
    model = _qlora_model(point) if point.weights == "qlora" else _base_model(point).to(point.device)
    if point.method == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # plain/ckpt: no KV cache copies in a training forward
    return model.train()


def make_step(point: Point, model):
    """A function running one forward + backward of ``point``; returns chunks replayed (or None)."""
    import torch

    g = torch.Generator().manual_seed(point.seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (point.batch, point.seq_len), generator=g).to(point.device)
    if not point.chunked:

        def step() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

        return step
    from ds_chunk.scheduler import ChunkScheduler

    config = {"chunk_size": point.chunk_size, "loss_chunk_size": point.loss_chunk_size}
    rate = parse_method(point.method)
    if rate is not None:
        config["sparse"] = {"rate": rate, "report_loss": point.report_loss}
    scheduler = ChunkScheduler(config)
    return lambda: len(scheduler.backward(model, ids).replayed)


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


def _memory_steps(point: Point, model, step, meter) -> tuple[list[int], list[int]]:
    """Peak minus the level right before, per step.

    One step for the deterministic methods; SpaCO's peak depends on the draw (whether the
    last chunks are replayed), so it gets up to 5 steps, the same draws as the timed steps.
    """
    count = min(point.repeats, 5) if parse_method(point.method) is not None else 1
    increases, peaks = [], []
    for _ in range(count):
        _clear(model)
        before = meter.rss()
        meter.start()
        step()
        peak = meter.peak()
        if point.mem_limit_gb is not None and peak > point.mem_limit_gb * 2**30:
            raise LimitExceeded(f"peak {peak / 2**30:.2f} GiB > --mem-limit-gb {point.mem_limit_gb}")
        increases.append(peak - before)
        peaks.append(peak)
    return increases, peaks


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
            self.replayed.append(out)

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
        increases, peaks = _memory_steps(point, model, step, meter)
        result.update(peak_mib=max(increases) / MIB, peak_abs_mib=max(peaks) / MIB)
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
    root = str(Path(__file__).resolve().parent.parent)  # the same ds_chunk as this process
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
    return {**timing, **{k: memory[k] for k in ("peak_mib", "peak_abs_mib", "loaded_mib")}}


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
    points = []
    for seq_len, weights, method in itertools.product(args.seq_lens, args.weights, args.methods):
        rate = parse_method(method)
        chunked = method == "seco" or rate is not None
        variants = itertools.product(
            args.chunk_sizes if chunked else args.chunk_sizes[:1],
            args.loss_chunk_sizes if chunked else [None],
            args.report_loss if rate is not None else [True],
        )
        for chunk, loss_chunk, report in variants:
            points.append(Point(method, seq_len, chunk, loss_chunk, report, weights, **common))
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


# ---- outputs -------------------------------------------------------------------------

CSV_FIELDS = [
    "label", "method", "seq_len", "chunk_size", "loss_chunk_size", "report_loss", "weights", "model", "device",
    "dtype", "batch", "lora_rank", "threads", "repeats", "status", "s_per_step", "s_mean", "s_all",
    "cpu_s_per_step", "cpu_s_mean", "cpu_s_all", "warmup_s", "peak_mib", "peak_abs_mib", "loaded_mib",
    "replayed_mean", "wall_s", "error",
]  # fmt: skip


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})


def _reference(row: dict, rows: list[dict], ref: str | None) -> dict | None:
    """The row of method ``ref`` at the same length and weights (same chunk size if ``ref`` is chunked)."""
    for other in rows:
        same = other["seq_len"] == row["seq_len"] and other["weights"] == row["weights"]
        if other["method"] == ref and same and other["status"] == "ok":
            if ref in ("plain", "ckpt") or other["chunk_size"] == row["chunk_size"]:
                return other
    return None


def time_keys(row: dict) -> tuple[str, str]:
    """The (median, mean) step-time fields the ratios and the plot use: CPU seconds where
    measured (CPU runs: robust to a shared core), else wall seconds (CUDA)."""
    if row["device"] == "cpu" and row.get("cpu_s_per_step"):
        return "cpu_s_per_step", "cpu_s_mean"
    return "s_per_step", "s_mean"


def markdown_table(rows: list[dict], ref: str | None) -> str:
    """One line per point; ``x <ref>`` columns are ratios to method ``ref`` at the same T.

    Time ratios use CPU seconds on CPU (wall on CUDA), median and mean: SpaCO's step time
    depends on its random draw, and the mean is what sets its throughput.
    """
    head = ["method", "T", "wall s/step", "CPU s/step", "CPU s/step mean", "peak MiB", f"time x {ref}"]
    head += [f"time x {ref} (mean)", f"mem x {ref}", "replayed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], str(row["seq_len"])]
        if row["status"] != "ok":
            cells += [row["status"]] * 4 + [""] * 4
        else:
            base = _reference(row, rows, ref)
            median, mean = time_keys(row)
            cells += [_fmt(row.get(k), 2) for k in ("s_per_step", "cpu_s_per_step", "cpu_s_mean")]
            cells += [_fmt(row.get("peak_mib"), 0), _ratio(row, base, median), _ratio(row, base, mean)]
            cells += [_ratio(row, base, "peak_mib", 3), _replayed(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _replayed(row: dict) -> str:
    return "" if row.get("replayed_mean") is None else f"{row['replayed_mean']:.1f}/{_chunks(row)}"


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(row: dict, base: dict | None, key: str, digits: int = 2) -> str:
    if base is None or not row.get(key) or not base.get(key):
        return ""
    return f"{row[key] / base[key]:.{digits}f}"


def _chunks(row: dict) -> int:
    return -(-row["seq_len"] // row["chunk_size"])


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels, peak memory and seconds/step vs T (log-log), one line per method label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    last = {(r["label"], r["seq_len"]): r for r in rows if r["status"] == "ok"}  # a re-measured point: the last
    for label in dict.fromkeys(r["label"] for r in rows):
        ok = sorted((r for (name, _), r in last.items() if name == label), key=lambda r: r["seq_len"])
        for ax, key in ((ax_mem, lambda r: r.get("peak_mib")), (ax_time, lambda r: r.get(time_keys(r)[0]))):
            measured = [r for r in ok if key(r)]
            if measured:
                ax.plot([r["seq_len"] for r in measured], [key(r) for r in measured], marker="o", label=label)
    lengths = sorted({r["seq_len"] for r in rows})
    _style(ax_mem, lengths, "peak memory increase per step (MiB)")
    _style(ax_time, lengths, "seconds / step (CPU time on CPU)")
    (ax_time if ax_time.lines else ax_mem).legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _style(ax, lengths: list[int], ylabel: str) -> None:
    """Log-log axes with plain-number ticks at the measured lengths; a note if nothing was measured."""
    import matplotlib.ticker as ticker

    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel(ylabel)
    if not ax.lines:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


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


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


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
    p.add_argument("--loss-chunk-sizes", type=_optional_int, nargs="+", default=[None],
                   help="LM head + CE sub-chunk sizes for seco/spaco, 'none' = whole chunk")  # fmt: skip
    p.add_argument("--report-loss", type=_bool, nargs="+", default=[True], help="spaco report_loss: true false")
    p.add_argument("--weights", nargs="+", choices=["full", "qlora"], default=["full"], help="qlora: NF4 + LoRA")
    p.add_argument("--lora-rank", type=int, default=8)
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


def read_csv(path: Path) -> list[dict]:
    """Rows written by ``write_csv``, with the numbers parsed back."""
    ints = ("seq_len", "chunk_size", "loss_chunk_size", "batch", "lora_rank", "threads", "repeats")
    floats = (
        "s_per_step",
        "s_mean",
        "cpu_s_per_step",
        "cpu_s_mean",
        "warmup_s",
        "peak_mib",
        "peak_abs_mib",
        "loaded_mib",
        "replayed_mean",
        "wall_s",
    )
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            row = {k: (v if v != "" else None) for k, v in row.items()}
            row.update({k: int(row[k]) for k in ints if row.get(k) is not None})
            row.update({k: float(row[k]) for k in floats if row.get(k) is not None})
            row["report_loss"] = row.get("report_loss") != "False"
            rows.append(row)
    return rows


def write_outputs(rows: list[dict], stem: Path, header: str, ref: str) -> str:
    """<stem>.csv, .md (header + table) and .png; returns the table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, stem.with_suffix(".csv"))
    table = markdown_table(rows, ref)
    stem.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    devices = sorted({str(r["device"]) for r in rows})
    plot(rows, stem.with_suffix(".png"), f"{', '.join(devices)}; memory: peak increase during a step")
    return table


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


if __name__ == "__main__":
    main()
