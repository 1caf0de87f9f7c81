"""The estimate of one setup (device peak by component) and the chunk-size recommendation."""

from __future__ import annotations

import dataclasses

from ds_chunk.plan.memory import (
    chunked_step,
    ckpt_step,
    offloaded_host,
    optimizer_bytes,
    plain_step,
    sub_chunk,
    trainable_params,
    weight_bytes,
)
from ds_chunk.plan.shape import DTYPE_BYTES, GIB, ModelShape, Setup

# ---- the estimate ----------------------------------------------------------------------


@dataclasses.dataclass
class Estimate:
    """Predicted device memory of one setup, by component (bytes)."""

    setup: Setup
    persistent: dict[str, float]  # held between steps
    step: dict[str, float]  # allocated during a step, on top (what ds_chunk.bench measures)
    host: dict[str, float]  # offloaded to host memory

    @property
    def step_bytes(self) -> float:
        return sum(self.step.values())

    @property
    def total_bytes(self) -> float:
        """Device peak: persistent + step + the reserve (CUDA context, workspace, fragmentation)."""
        return sum(self.persistent.values()) + self.step_bytes + self.setup.reserve_gb * GIB

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits ``gpu_mem_gb`` (None when no budget was given)."""
        return None if self.setup.gpu_mem_gb is None else self.total_bytes <= self.setup.gpu_mem_gb * GIB

    def table(self) -> str:
        """Components in GiB, one per line."""
        rows = [("persistent", k, v) for k, v in self.persistent.items()]
        rows += [("step", k, v) for k, v in self.step.items()]
        rows += [("reserve", "cuda_context_etc", self.setup.reserve_gb * GIB)]
        rows += [("host", k, v) for k, v in self.host.items()]
        lines = [f"  {kind:<10} {name:<18} {v / GIB:9.3f} GiB" for kind, name, v in rows if v]
        lines.append(f"  {'total':<10} {'device peak':<18} {self.total_bytes / GIB:9.3f} GiB")
        return "\n".join(lines)


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Predict the peak memory of one training step of ``setup`` on ``shape``."""
    _validate(shape, setup)
    steps = {"seco": chunked_step, "spaco": chunked_step, "plain": plain_step, "ckpt": ckpt_step}
    step = steps[setup.method](shape, setup)
    lora = trainable_params(shape, setup) * 4 if setup.lora_rank else 0.0
    optimizer = optimizer_bytes(shape, setup)
    persistent = {"weights": weight_bytes(shape, setup), "lora": lora, "optimizer": optimizer}
    host = {}
    if setup.offload_optimizer:
        host["optimizer"], persistent["optimizer"] = optimizer, 0.0
    if setup.kv_offload and setup.chunked:
        host["kv_cache_and_saved"] = offloaded_host(shape, setup)
    return Estimate(setup, persistent, step, host)


def _validate(shape: ModelShape, setup: Setup) -> None:
    if setup.method not in ("seco", "spaco", "plain", "ckpt"):
        raise ValueError(f"method {setup.method!r}: expected seco, spaco, plain or ckpt")
    if setup.method == "spaco" and not (setup.sparse_rate and 0 < setup.sparse_rate <= 1):
        raise ValueError("spaco needs sparse_rate in (0, 1]")
    if setup.dtype not in DTYPE_BYTES or setup.quant not in ("none", "8bit", "4bit"):
        raise ValueError(f"dtype {setup.dtype!r} / quant {setup.quant!r}: see --help for the choices")
    if setup.attention not in ("auto", "flash", "masked"):
        raise ValueError(f"attention {setup.attention!r}: expected auto, flash or masked")
    if setup.quant != "none" and setup.lora_rank == 0:
        raise ValueError("quantized base weights cannot be trained: set lora_rank > 0")
    _validate_sequence_parallel(shape, setup)


def _validate_sequence_parallel(shape: ModelShape, setup: Setup) -> None:
    n = setup.sequence_parallel
    if n == 1:
        return
    if n < 1 or setup.world_size % n:
        raise ValueError(f"sequence_parallel {n}: must divide world_size {setup.world_size} (dp x sp ranks)")
    if not setup.chunked:
        raise ValueError(f"sequence_parallel {n} with method {setup.method}: planned for seco / spaco only")
    if shape.heads % n or shape.kv_heads % n:
        raise ValueError(f"sequence_parallel {n}: {shape.heads} heads and {shape.kv_heads} key/value heads must be "
                         f"multiples of it")  # fmt: skip
    if setup.chunk_size % n:
        raise ValueError(f"sequence_parallel {n}: chunk_size {setup.chunk_size} is not a multiple of it")


# ---- recommendation --------------------------------------------------------------------


@dataclasses.dataclass
class Recommendation:
    """The largest chunk size that fits, or None and what would help."""

    chunk_size: int | None
    estimate: Estimate  # at chunk_size, or at the smallest candidate when nothing fits
    tried: dict[int, float]  # chunk size -> predicted device peak (bytes)
    advice: list[str]


def chunk_candidates(seq_len: int, smallest: int = 64, multiple: int = 1) -> list[int]:
    """Powers of two from ``smallest`` up to the first one that covers the sequence, each rounded
    up to a multiple of ``multiple`` (sequence parallel: chunks split into equal slices)."""
    sizes = [smallest]
    while sizes[-1] < seq_len:
        sizes.append(sizes[-1] * 2)
    return list(dict.fromkeys(-(-s // multiple) * multiple for s in sizes))


def recommend(shape: ModelShape, setup: Setup, advise: bool = True) -> Recommendation:
    """Largest power-of-two chunk size (from 64) whose predicted peak fits ``gpu_mem_gb``.

    Larger chunks run faster (fewer, larger kernels), so the largest that fits wins. When
    none fits, ``advice`` lists changes (each re-planned) that would make one fit.
    """
    if setup.gpu_mem_gb is None:
        raise ValueError("recommend needs gpu_mem_gb")
    if not setup.chunked:
        est = estimate(shape, setup)
        advice = [] if est.fits or not advise else _advice(shape, setup)
        return Recommendation(None if not est.fits else setup.seq_len, est, {}, advice)
    candidates = chunk_candidates(setup.seq_len, multiple=setup.sequence_parallel)
    estimates = {c: estimate(shape, dataclasses.replace(setup, chunk_size=c)) for c in candidates}
    fitting = [c for c, e in estimates.items() if e.fits]
    best = max(fitting) if fitting else None
    est = estimates[best if best else min(estimates)]
    advice = [] if best or not advise else _advice(shape, est.setup)
    return Recommendation(best, est, {c: e.total_bytes for c, e in estimates.items()}, advice)


def _changes(shape: ModelShape, setup: Setup) -> list[tuple[str, dict]]:
    """Changes that lower the peak and are not already made: (what to set, Setup fields)."""
    changes = []
    if not setup.chunked:
        changes.append(("chunk-wise training (SeCO)", {"method": "seco"}))
    if not setup.offload_optimizer:
        zero = max(1, setup.zero_stage)
        changes.append(
            (
                "offload the optimizer (zero_optimization.offload_optimizer)",
                {"offload_optimizer": True, "zero_stage": zero},
            )
        )
    if setup.chunked and not setup.kv_offload:
        changes.append(("chunkwise.kv_offload: true", {"kv_offload": True}))
    if setup.method == "seco":
        changes.append(("SpaCO: chunkwise.sparse.rate 0.125", {"method": "spaco", "sparse_rate": 0.125}))
    if setup.chunked and sub_chunk(shape, setup, setup.chunk_size) > 64:
        changes.append(("chunkwise.loss_chunk_size: 64", {"loss_chunk_size": 64}))
    if setup.quant == "none":
        lora = {"quant": "4bit", "lora_rank": setup.lora_rank or 8}
        changes.append(("4-bit base weights" + ("" if setup.lora_rank else " + LoRA r=8 (QLoRA)"), lora))
    if setup.world_size > 1 and setup.zero_stage < 3:
        changes.append(("ZeRO stage 3", {"zero_stage": 3}))
    return changes


def _advice(shape: ModelShape, setup: Setup) -> list[str]:
    """One line per change: the chunk size it allows, or the peak it still needs."""
    lines, combined = [], {}
    for what, fields in _changes(shape, setup) + [("all of the above", None)]:
        fields = combined if fields is None else fields
        combined = {**combined, **fields}
        rec = recommend(shape, dataclasses.replace(setup, **fields), advise=False)
        if rec.chunk_size:
            size = f" with chunk_size {rec.chunk_size}" if rec.estimate.setup.chunked else ""
            lines.append(f"{what}: fits{size} ({rec.estimate.total_bytes / GIB:.2f} GiB)")
        else:
            lines.append(f"{what}: still needs {rec.estimate.total_bytes / GIB:.2f} GiB")
    return lines


def plan(config, seq_len: int, **setup) -> Recommendation | Estimate:
    """One call: the recommendation when ``gpu_mem_gb`` is given, else the estimate.

    config: a transformers config, a config dict, a config.json path or a hub id;
    ``setup``: any ``Setup`` field, e.g. ``plan("config.json", 16384, gpu_mem_gb=24,
    quant="4bit", lora_rank=8)``.
    """
    shape, full = ModelShape.from_config(config), Setup(seq_len=seq_len, **setup)
    return recommend(shape, full) if full.gpu_mem_gb is not None else estimate(shape, full)
