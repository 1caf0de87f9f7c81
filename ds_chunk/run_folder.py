"""A training run's output folder: its default name, what a run continues from, a fresh
start over an earlier run, and the base model an adapter needs to be loadable.

    <output-dir>/metrics.jsonl        every run's records (ds_chunk.tracking)
    <output-dir>/checkpoints/step_N/  checkpoints (ds_chunk.checkpoint)
    <output-dir>/base_model/          for LoRA on a model built from a config: its random base
    <output-dir>/tb/                  tensorboard, when asked for
"""

from __future__ import annotations

import os
import shutil

from ds_chunk import checkpoint
from ds_chunk.config import ChunkwiseConfig


def method_name(chunkwise: ChunkwiseConfig) -> str:
    """seco, spaco<rate>, truncate or plain: the method a chunkwise block trains with."""
    if not chunkwise.enabled:
        return "plain"
    if chunkwise.truncate:
        return "truncate"
    if chunkwise.sparse is not None:
        s = chunkwise.sparse
        name = f"spaco{s.rate if s.rate is not None else str(s.num_chunks) + 'of'}"
        return name + ("" if s.sampler == "bernoulli" else f"-{s.sampler}")
    return "seco"


def default_output_dir(data: str, chunkwise: ChunkwiseConfig) -> str:
    """runs/<task or data file>-<method>, so runs of different methods do not share a folder."""
    name = os.path.splitext(os.path.basename(data.rstrip("/")))[0].replace(":", "_")
    return os.path.join("runs", f"{name}-{method_name(chunkwise)}")


def resume_point(output_dir: str, resume: str | None, resume_from: str | None, overwrite: bool) -> str | None:
    """The checkpoint to continue from, or None for a fresh run.

    resume: None, "yes" (the newest checkpoint, an error if none) or "auto" (if any).
    A fresh run over an earlier run's checkpoints is refused unless ``overwrite``: they
    would be mixed with, and rotated out by, the new ones.
    """
    ckpt_dir = os.path.join(output_dir, "checkpoints")
    if resume_from:
        return checkpoint.find(resume_from)
    if resume:
        found = checkpoint.latest(ckpt_dir)
        if found is None and resume == "yes":
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_dir} (--resume auto starts fresh if none)")
        return found
    existing = checkpoint.steps(ckpt_dir)
    if existing and not overwrite:
        raise ValueError(
            f"{output_dir} already holds checkpoints (newest: step {existing[-1][0]}): pass --resume to "
            "continue that run, --overwrite-output-dir to start over, or another --output-dir"
        )
    return None


def clear(output_dir: str, rank: int) -> None:
    """--overwrite-output-dir: an earlier run's checkpoints, metrics and tracker logs go (rank 0)."""
    if rank == 0:
        for name in ("checkpoints", "metrics.jsonl", "tb", "base_model"):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)


def save_base_model(model, model_block: dict, output_dir: str, rank: int) -> None:
    """A LoRA adapter on a model built from a config points at a base nobody can load (a
    random init, or the temporary folder it was quantized through): save that base once as
    <output-dir>/base_model and point the adapter's base_model_name_or_path at it."""
    if "config" not in model_block or not hasattr(model, "peft_config"):
        return
    path = os.path.abspath(os.path.join(output_dir, "base_model"))
    if rank == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        from ds_chunk.model import ModelConfig, build_base

        tmp = path + ".tmp"  # written whole, then renamed into place
        shutil.rmtree(tmp, ignore_errors=True)
        build_base(ModelConfig.from_dict(model_block)).save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = path
