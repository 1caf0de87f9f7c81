"""Atomic checkpoints: a LoRA adapter in peft format plus a DeepSpeed checkpoint for resume.

Layout: ``<dir>/step_<N>/{adapter/ (or model/), ds/, rng_rank<r>.pt, state.json}`` and ``<dir>/latest`` (the name of
the newest complete step). Each step is written under a temporary name and renamed
into place only when complete, and ``latest`` is replaced atomically after that, so a
crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ds_chunk.zero3 import gathered, partitioned


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(engine, root: str, step: int, state: dict, keep: int | None = None) -> str:
    """Write step ``step`` (all ranks call this: DeepSpeed's save is collective).

    keep: then delete the oldest complete checkpoints beyond the newest ``keep``
    (``--save-total-limit``), only after the new one is in place.
    """
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash during an earlier save
        os.makedirs(tmp)
    _barrier()
    engine.save_checkpoint(tmp, tag="ds", client_state={"ds_chunk": state}, save_latest=False)
    # DeepSpeed keeps no RNG state; dropout after a resume must draw what it would have
    torch.save(_rng_state(), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    _barrier()
    model = engine.hf_model  # peft saves just the adapter; a plain model saves itself
    with _gathered(model):  # ZeRO-3: whole parameters on every rank for the save (collective)
        if _rank() == 0:
            model.save_pretrained(os.path.join(tmp, "adapter" if hasattr(model, "peft_config") else "model"))
    if _rank() == 0:
        _write_atomic(os.path.join(tmp, "state.json"), json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _write_atomic(os.path.join(root, "latest"), f"step_{step}")
        for _, old in steps(root)[:-keep] if keep else []:
            shutil.rmtree(old)
    _barrier()
    return final


def steps(root: str) -> list[tuple[int, str]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(name[5:]), path))
    return sorted(found)


def find(path: str) -> str:
    """The checkpoint ``path`` names: a ``step_N`` folder itself, or the newest one in a
    checkpoints folder or in a run's output folder."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    for root in (path, os.path.join(path, "checkpoints")):
        if found := latest(root):
            return found
    raise FileNotFoundError(f"no checkpoint in {path} (expected a step_N folder, or a folder holding them)")


def _gathered(model):
    """ZeRO-3: the parameters save_pretrained writes (the adapter's for peft, all otherwise)."""
    params = partitioned(model.parameters())
    return gathered([p for p in params if p.requires_grad] if hasattr(model, "peft_config") else params)


def latest(root: str) -> str | None:
    """The newest complete checkpoint under ``root``, or None."""
    path = os.path.join(root, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        step_dir = os.path.join(root, f.read().strip())
    return step_dir if os.path.isdir(step_dir) else None


def load(engine, step_dir: str) -> dict:
    """Restore model, optimizer, LR schedule and engine counters; return our saved state."""
    _, client = engine.load_checkpoint(step_dir, tag="ds")
    if client is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {step_dir}/ds")
    rng = os.path.join(step_dir, f"rng_rank{_rank()}.pt")
    if os.path.isfile(rng):  # absent when resuming on more ranks than saved
        state = torch.load(rng, weights_only=False)
        torch.set_rng_state(state["cpu"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
    return client["ds_chunk"]


def _rng_state() -> dict:
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
