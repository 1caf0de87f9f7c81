"""A memory budget turned into settings: ``chunkwise.memory_budget_gb``.

At the first step of a batch shape the planner (``ds_chunk.plan``) predicts the step peak of
every (chunk_size, keep_chunks, loss_chunk_size) and the fastest that fits wins. Speed is
judged by what chunk-wise training adds to plain backprop: the no-grad forward over the
tokens before the last run chunk (kept chunks shrink it) and a fixed cost per chunk forward.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ds_chunk.config import ChunkwiseConfig, ConfigError

logger = logging.getLogger("ds_chunk")

SMALLEST = 64  # the smallest chunk and LM-head sub-chunk tried
CHUNK_COST = 64  # a chunk forward's fixed cost (launches, Python), in tokens of forward work
MARGIN = 0.08  # the budget left free: the planner missed measured CPU step peaks by up to -5.4%


@dataclasses.dataclass(frozen=True)
class Pick:
    """The settings the budget allows and what the planner predicts for them."""

    chunk_size: int
    keep_chunks: int
    loss_chunk_size: int
    step_bytes: float  # predicted peak a step adds (the planner's ``step``)
    budget_bytes: float  # what it had to fit in

    def apply(self, config: ChunkwiseConfig) -> ChunkwiseConfig:
        return dataclasses.replace(
            config, chunk_size=self.chunk_size, keep_chunks=self.keep_chunks, loss_chunk_size=self.loss_chunk_size
        )

    def line(self, batch: int, seq_len: int) -> str:
        gib = 2**30
        return (
            f"ds_chunk: memory budget {self.budget_bytes / gib:.2f} GiB for {batch} x {seq_len} tokens: chunk_size "
            f"{self.chunk_size}, keep_chunks {self.keep_chunks}, loss_chunk_size {self.loss_chunk_size}; "
            f"predicted step peak {self.step_bytes / gib:.2f} GiB"
        )


def cost(seq_len: int, chunk: int, keep: int) -> int:
    """What a setting adds to plain backprop, in tokens of forward work: the no-grad pass
    over the chunks before the joined last one, and ``CHUNK_COST`` per chunk forward."""
    run = max(1, -(-seq_len // chunk) - keep)  # chunks run: the last keep + 1 are one
    return (run - 1) * chunk + (2 * run - 1) * CHUNK_COST


def pick(shape, setup, budget_bytes: float, loss_chunks: list[int], keep: bool = True) -> Pick | None:
    """The cheapest (``cost``) setting whose predicted step peak fits ``budget_bytes`` less
    ``MARGIN``; None when none does. ``setup``: a ``plan.Setup`` (its chunk settings are replaced);
    loss_chunks: the LM-head sub-chunks to try, largest first; keep: whether kept chunks
    are allowed (SeCO; not with SpaCO or truncation)."""
    from ds_chunk.plan import chunk_candidates, estimate

    fitting = []
    for chunk in chunk_candidates(setup.seq_len, SMALLEST):
        chunks = -(-setup.seq_len // chunk)
        for kept in range(chunks if keep else 1):
            fits = None
            for sub in loss_chunks:
                trial = dataclasses.replace(setup, chunk_size=chunk, keep_chunks=kept, loss_chunk_size=sub)
                step = estimate(shape, trial).step_bytes
                if step <= budget_bytes * (1 - MARGIN):
                    fits = Pick(chunk, kept, sub, step, budget_bytes)
                    break
            if fits is None:
                break  # keeping more only adds memory
            fitting.append(fits)
    # ties (everything in one chunk, however cut) go to the larger chunk: fewer, larger kernels
    return min(fitting, key=lambda p: (cost(setup.seq_len, p.chunk_size, p.keep_chunks), -p.chunk_size), default=None)


def smallest(shape, setup) -> Pick:
    """The least memory a step can take (the smallest chunk and sub-chunk, nothing kept), and
    the least budget that admits it (``budget_bytes``)."""
    from ds_chunk.plan import estimate

    trial = dataclasses.replace(setup, chunk_size=SMALLEST, keep_chunks=0, loss_chunk_size=SMALLEST)
    step = estimate(shape, trial).step_bytes
    return Pick(SMALLEST, 0, SMALLEST, step, step / (1 - MARGIN))


def planned_setup(model: nn.Module, input_ids: torch.Tensor, config: ChunkwiseConfig):
    """The planner's (ModelShape, Setup) of this model and batch: dtype (autocast's where on),
    4/8-bit base weights, peft LoRA rank and targets, kv_offload. SpaCO is planned as SeCO
    (its peak is no larger)."""
    from ds_chunk.adapter import text_config, unwrap
    from ds_chunk.plan import DTYPE_BYTES, ModelShape, Setup

    hf = unwrap(model)
    try:
        shape = ModelShape.from_config(text_config(hf))
    except KeyError as e:
        allowed = f"a model the planner can size: its config has no {e}; set chunk_size instead"
        raise ConfigError("chunkwise.memory_budget_gb", config.memory_budget_gb, allowed) from None
    device = input_ids.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else hf.get_input_embeddings().weight.dtype
    names = {type(m).__name__ for m in hf.modules()}
    quant = "4bit" if "Linear4bit" in names else "8bit" if "Linear8bitLt" in names else "none"
    rank, targets = _lora(model, shape)
    return shape, Setup(
        seq_len=input_ids.shape[1],
        batch=input_ids.shape[0],
        device=device,
        dtype=str(dtype).removeprefix("torch.") if str(dtype).removeprefix("torch.") in DTYPE_BYTES else "float32",
        quant=quant,
        lora_rank=rank,
        lora_targets=targets,
        kv_offload=config.kv_offload,
        reserve_gb=0.0,
    )


def _lora(model: nn.Module, shape) -> tuple[int, tuple[str, ...]]:
    """(rank, planner target names) of a peft LoRA model's active adapter; (0, ()) otherwise
    (full fine-tuning: the planner's larger figure)."""
    peft = next((m.peft_config for m in model.modules() if getattr(m, "peft_config", None)), None)
    if not peft:
        return 0, ("q_proj", "v_proj")
    lora = next(iter(peft.values()))
    targets = lora.target_modules
    known = tuple(shape.linears())
    if isinstance(targets, str):
        chosen = known if targets == "all-linear" else tuple(t for t in known if t in targets)
    else:
        chosen = tuple(t for t in known if t in set(targets))
    return int(lora.r), chosen or known


def pick_for(model: nn.Module, input_ids: torch.Tensor, config: ChunkwiseConfig) -> ChunkwiseConfig:
    """``config`` with the settings ``memory_budget_gb`` allows for this batch (logged);
    a budget below the smallest step is one ``ConfigError`` naming the least that fits."""
    from ds_chunk.loss import auto_sub_chunk

    shape, setup = planned_setup(model, input_ids, config)
    budget = config.memory_budget_gb * 2**30
    where = ""
    if input_ids.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(input_ids.device)
        if free < budget:
            budget, where = free, f" (only {free / 2**30:.2f} GiB free on {input_ids.device})"
    first = config.loss_chunk_size
    first = auto_sub_chunk(shape.vocab, setup.batch) if first == "auto" else first or setup.seq_len
    loss_chunks = [first] + [s for s in (1024, 512, 256, 128, SMALLEST) if s < first]
    keep = config.sparse is None and not config.truncate
    chosen = pick(shape, setup, budget, loss_chunks, keep)
    if chosen is None:
        least = smallest(shape, setup)
        raise ConfigError(
            "chunkwise.memory_budget_gb", config.memory_budget_gb,
            f"at least {least.budget_bytes / 2**30:.3f} GiB{where}: the smallest step of this model on "
            f"{setup.batch} x {setup.seq_len} tokens (chunk_size {SMALLEST}, loss_chunk_size {SMALLEST}, nothing "
            f"kept) takes {least.step_bytes / 2**30:.3f} GiB as the planner predicts, and {MARGIN:.0%} is left free",
        )  # fmt: skip
    logger.info(chosen.line(setup.batch, setup.seq_len) + where)
    return chosen.apply(config)
