"""A training run's output folder: its default name, what a run continues from (and what a
resume must keep, and the command that resumes it), a fresh start over an earlier run, and
the base model an adapter needs to be loadable.

    <output-dir>/metrics.jsonl        every run's records (ds_chunk.tracking)
    <output-dir>/checkpoints/step_N/  checkpoints (ds_chunk.checkpoint)
    <output-dir>/base_model/          for LoRA on a model built from a config: its random base
    <output-dir>/tb/                  tensorboard, when asked for
"""

from __future__ import annotations

import json
import os
import shlex
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


# ---- what a resume must keep -----------------------------------------------------------------


def setup(cfg: dict) -> dict:
    """What a checkpoint can only be resumed with, defaults filled in (``model.lora``: its
    r, alpha and targets): the model block (what is loaded, dtype, quantization, LoRA shape;
    the seed of a base built from a config), the ZeRO stage and bf16. Gradient checkpointing,
    the attention kernel and LoRA dropout may change. Stored in each checkpoint's state.json."""
    from dataclasses import asdict

    from ds_chunk.model import ModelConfig

    model = json.loads(json.dumps(asdict(ModelConfig.from_dict(cfg["model"]))))  # tuples as lists
    for key in ("gradient_checkpointing", "attn_implementation", *(() if model["config"] else ("seed",))):
        del model[key]  # how the step runs, or (seed of a loaded model) nothing the weights depend on
    if model["lora"] is not None:
        del model["lora"]["dropout"]
    flat = {f"model.{k}": v for k, v in model.items()}
    flat["zero_optimization.stage"] = cfg.get("zero_optimization", {}).get("stage", 0)
    flat["bf16.enabled"] = bool(cfg.get("bf16", {}).get("enabled", False))
    return flat


def check_resume(step_dir: str, cfg: dict) -> None:
    """Refuse, in one line, to resume ``step_dir`` with a setup it was not trained with."""
    with open(os.path.join(step_dir, "state.json")) as f:
        saved = json.load(f).get("setup")
    if saved is None:  # written before checkpoints recorded their setup
        return
    now = setup(cfg)
    differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k} = {_show(saved, k)} there, {_show(now, k)} here" for k in differ)
        raise ValueError(
            f"{step_dir} was trained with another setup: {shown}. A resume keeps the model, its dtype, "
            "quantization and LoRA shape, the ZeRO stage and bf16; the learning rate and schedule, chunk size, "
            "SpaCO sampler, steps, evaluation and saving may change. Use the run's own flags, or a new --output-dir"
        )


def _show(d: dict, key: str) -> str:
    return json.dumps(d[key]) if key in d else "absent"


def resume_command(argv: list[str], single_process: bool) -> str:
    """The command that continues a run started with ``argv``: its flags less an earlier
    --resume / --resume-from and --overwrite-output-dir (that would start over), plus --resume."""
    flags, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=")[0]
        if name in ("--resume", "--resume-from", "--overwrite-output-dir", "--local_rank"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            skip = "=" not in a and (name == "--resume-from" or (name == "--resume" and nxt in ("yes", "auto")))
            continue
        flags.append(shlex.quote(a))
    launcher = "python" if single_process else "<the same launcher>"
    return " ".join([launcher, "launch/train.py", *flags, "--resume"])
