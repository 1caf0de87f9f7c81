"""What a training run writes as it goes: ``metrics.jsonl``, a progress bar, and the
experiment trackers accelerate supports (tensorboard, wandb, mlflow, ...).

Every record in ``<output-dir>/metrics.jsonl`` carries the id of the run that wrote it,
and each run starts with a ``{"event": "run", ...}`` record (its arguments, the step it
starts from, the checkpoint it resumed), so several runs into one folder stay apart.
"""

from __future__ import annotations

import json
import os
import resource
import time
import uuid

import torch

BAR_KEYS = ("loss", "loss_est", "tok/s", "peak_gb", "host_gb", "replayed", "skipped")  # loss_est: SpaCO's estimate


# ---- one training step's record -----------------------------------------------------------


def peak_memory_gb() -> dict:
    """Peak device memory (CUDA; on CPU the process RSS) and peak host memory (process RSS:
    with ZeRO offload the optimizer lives there, with kv_offload the KV cache)."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    device = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else host
    return {"peak_gb": round(device, 3), "host_gb": round(host, 3)}


def loss_key(engine) -> str | None:
    """The record key of the step's loss: "loss" (exact), "loss_est" (SpaCO's unbiased
    estimate, sum of w_i * L_i over the replayed chunks), None (SpaCO with report_loss off)."""
    kinds = {r.loss_kind for r in engine.last_results}
    return "loss_est" if "estimate" in kinds else None if kinds == {"off"} else "loss"


def train_step(engine, batch: dict, step: int, world: int) -> dict:
    """One ``engine.train_batch`` and its record: loss, lr, speed, memory, replayed chunks."""
    t0 = time.perf_counter()
    loss = engine.train_batch(batch).item()
    tokens = int(batch["attention_mask"].sum()) * world
    key = loss_key(engine)
    return {
        "step": step,
        **({} if key is None else {key: loss}),
        "lr": engine.get_lr()[0],
        "tok/s": round(tokens / (time.perf_counter() - t0)),
        "step_s": round(time.perf_counter() - t0, 4),  # wall seconds of the step (quality per second)
        **peak_memory_gb(),
        "replayed": sum(len(r.replayed) for r in engine.last_results),
        "skipped": engine.skipped_steps,  # steps skipped for a non-finite loss or gradient, so far
    } | kv_host(engine)


def kv_host(engine) -> dict:
    """With kv_offload: the most host memory a micro-batch's KV cache, its gradient and the
    saved tensors took (part of host_gb)."""
    if not engine.chunkwise.kv_offload:
        return {}
    return {"kv_host_gb": round(max(r.host_peak_bytes for r in engine.last_results) / 2**30, 3)}


# ---- where records go ---------------------------------------------------------------------


def tracker_names(report_to: list[str]) -> list[str]:
    """Validate ``--report-to``: "none", "all" (every installed tracker) or names accelerate knows."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = [str(t) for t in get_available_trackers()]
    if report_to in ([], ["none"]):
        return []
    if "all" in report_to:
        return available
    for name in report_to:
        if name not in LOGGER_TYPE_TO_CLASS:
            known = ", ".join(["none", "all", *LOGGER_TYPE_TO_CLASS])
            raise ValueError(f"--report-to {name}: unknown tracker; expected one of {known}")
        if name not in available:
            raise ValueError(f"--report-to {name}: the {name} package is not installed (pip install {name})")
    return list(dict.fromkeys(report_to))


def _start_tracker(name: str, output_dir: str, run_id: str, hparams: dict):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if cls.requires_logging_directory:  # e.g. tensorboard: <output-dir>/tb/<run id>
        tracker = cls(run_id, os.path.join(output_dir, "tb" if name == "tensorboard" else name))
    else:  # a project named after the output folder; wandb also names the run and keeps files there
        extra = {"name": run_id, "dir": output_dir} if name == "wandb" else {}
        tracker = cls(os.path.basename(os.path.abspath(output_dir)), **extra)
    tracker.start()
    tracker.store_init_configuration(hparams)
    return tracker


class RunLog:
    """Rank 0: a tqdm bar, ``<output-dir>/metrics.jsonl`` and the trackers; other ranks: nothing."""

    def __init__(self, output_dir: str, total: int, start: int, rank: int, run: dict, report_to: list[str]):
        from tqdm import tqdm

        self.rank, self.trackers = rank, []
        self.run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.bar = tqdm(total=total, initial=start, disable=rank != 0, dynamic_ncols=True)
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        self._write({"event": "run", "start_step": start, "total_steps": total, **run})
        hparams = {k: v for k, v in run.get("args", {}).items() if isinstance(v, (int, float, str, bool))}
        self.trackers = [_start_tracker(n, output_dir, self.run_id, hparams) for n in report_to]

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps({"run": self.run_id, **record}) + "\n")
        self.file.flush()

    def log(self, record: dict, advance: bool = False) -> None:
        """Write ``record`` (it has a "step"); ``advance``: a training step, shown on the bar."""
        if self.rank != 0:
            return
        self._write(record)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for tracker in self.trackers:
            tracker.log(numbers, step=record["step"])
        if advance:
            self.bar.set_postfix({k: record[k] for k in BAR_KEYS if k in record}, refresh=False)
            self.bar.update(1)
        else:
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def message(self, text: str) -> None:
        """A line above the bar (rank 0)."""
        if self.rank == 0:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.rank == 0:
            for tracker in self.trackers:
                tracker.finish()
            self.file.close()
