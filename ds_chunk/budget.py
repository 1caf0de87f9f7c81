"""A memory budget turned into settings: ``chunkwise.memory_budget_gb``.

At the first step of a batch shape the planner (``ds_chunk.plan``) predicts the step peak of
every (chunk_size, keep_chunks, loss_chunk_size) and the fastest that fits wins. Speed is
judged by what chunk-wise training adds to plain backprop: the no-grad forward over the
tokens before the last run chunk (kept chunks shrink it) and a fixed cost per chunk forward.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
from torch import nn

from ds_chunk.config import ChunkwiseConfig, ConfigError

logger = logging.getLogger("ds_chunk")

SMALLEST = 64  # the smallest chunk and LM-head sub-chunk tried
CHUNK_COST = 64  # a chunk forward's fixed cost (launches, Python), in tokens of forward work
MARGIN = 0.08  # the budget left free: the planner missed measured CPU step peaks by up to -5.6%


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


def pick(shape, setup, budget_bytes: float, loss_chunks: list[int]) -> Pick | None:
    """The cheapest (``cost``) setting whose predicted step peak fits ``budget_bytes`` less
    ``MARGIN``; None when none does. ``setup``: a ``plan.Setup`` (its chunk settings are
    replaced); loss_chunks: the LM-head sub-chunks to try, largest first."""
    from ds_chunk.plan import chunk_candidates, estimate

    fitting = []
    for chunk in chunk_candidates(setup.seq_len, SMALLEST, setup.sequence_parallel):
        chunks = -(-setup.seq_len // chunk)
        for kept in range(chunks):
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


def smallest(shape, setup, loss_chunk: int = SMALLEST) -> Pick:
    """The least memory a step can take (the smallest chunk, ``loss_chunk``, nothing kept),
    and the least budget that admits it (``budget_bytes``)."""
    from ds_chunk.plan import estimate

    chunk = -(-SMALLEST // setup.sequence_parallel) * setup.sequence_parallel  # splits into equal slices
    trial = dataclasses.replace(setup, chunk_size=chunk, keep_chunks=0, loss_chunk_size=loss_chunk)
    step = estimate(shape, trial).step_bytes
    return Pick(chunk, 0, loss_chunk, step, step / (1 - MARGIN))


def planned_setup(model: nn.Module, input_ids: torch.Tensor, config: ChunkwiseConfig, masked: bool = False, **zero):
    """The planner's (ModelShape, Setup) of this model and batch: dtype (autocast's where on),
    4/8-bit base weights, peft LoRA rank and targets, kv_offload, the attention path (masked:
    padding, where ds_chunk's chunk attention steps aside) and ``zero`` (zero_stage,
    world_size). Full fine-tuning plans float32 gradients (fp32 weights under autocast, or an
    engine's float32 buffer: never fewer bytes than run)."""
    from ds_chunk.adapter import text_config, unwrap
    from ds_chunk.plan import DTYPE_BYTES, ModelShape, Setup

    hf = unwrap(model)
    key = "chunkwise.memory_budget_gb"
    try:
        shape = ModelShape.from_config(text_config(hf))
    except KeyError as e:
        raise ConfigError(key, config.memory_budget_gb, f"a model the planner can size: its config has no {e}; "
                          "set chunk_size instead") from None  # fmt: skip
    attention = getattr(text_config(hf), "_attn_implementation", "sdpa")
    if attention not in ("sdpa", "flash_attention_2"):
        raise ConfigError(key, config.memory_budget_gb, f'a model with "sdpa" attention (the planner\'s), not '
                          f'"{attention}"; set chunk_size instead')  # fmt: skip
    device = input_ids.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = str(torch.get_autocast_dtype(device) if autocast else hf.get_input_embeddings().weight.dtype)
    dtype = dtype.removeprefix("torch.") if dtype.removeprefix("torch.") in DTYPE_BYTES else "float32"
    names = {type(m).__name__ for m in hf.modules()}
    quant = "4bit" if "Linear4bit" in names else "8bit" if "Linear8bitLt" in names else "none"
    rank, targets = _lora(model, shape)
    return shape, Setup(
        seq_len=input_ids.shape[1],
        batch=input_ids.shape[0],
        device=device,
        dtype=dtype,
        grad_dtype=None if rank else "float32",
        attention="masked" if masked else "auto",
        quant=quant,
        lora_rank=rank,
        lora_targets=targets,
        kv_offload=config.kv_offload,
        reserve_gb=0.0,
        **zero,
    )


def _lora(model: nn.Module, shape) -> tuple[int, tuple[str, ...]]:
    """(rank, planner target names) of a peft LoRA model's active adapter; (0, ...) for full
    fine-tuning, also where parameters other than LoRA's train (``modules_to_save``) or the
    adapter is not LoRA: the planner's larger figure."""
    tuner = next((m for m in model.modules() if getattr(m, "peft_config", None)), None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if tuner is None or any("lora_" not in n for n in trainable):
        return 0, ("q_proj", "v_proj")
    active = getattr(tuner, "active_adapter", None)
    active = active[0] if isinstance(active, list) else active
    lora = tuner.peft_config.get(active) or next(iter(tuner.peft_config.values()))
    if not hasattr(lora, "r"):
        return 0, ("q_proj", "v_proj")
    targets, known = lora.target_modules, tuple(shape.linears())
    if isinstance(targets, str):
        chosen = known if targets == "all-linear" else tuple(t for t in known if t in targets)
    else:
        chosen = tuple(t for t in known if t in set(targets))
    return int(lora.r), chosen or known


def free_bytes(device: torch.device) -> float:
    """What a CUDA device can still give this process: free, plus what torch's allocator holds
    unused; inf elsewhere."""
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def pick_for(
    model: nn.Module, input_ids: torch.Tensor, config: ChunkwiseConfig, masked: bool = False,
    free: float | None = None, **zero,
) -> ChunkwiseConfig:  # fmt: skip
    """``config`` with the settings ``memory_budget_gb`` allows for this batch (logged); the
    budget capped by ``free`` (default: ``free_bytes`` of the batch's device). A budget below
    the smallest step is one ``ConfigError`` naming the least that fits."""
    from ds_chunk.loss import auto_sub_chunk

    shape, setup = planned_setup(model, input_ids, config, masked, **zero)
    free = free_bytes(input_ids.device) if free is None else free
    budget = min(config.memory_budget_gb * 2**30, free)
    first = config.loss_chunk_size
    first = auto_sub_chunk(shape.vocab, setup.batch) if first == "auto" else first or setup.seq_len
    loss_chunks = [first] + [s for s in (1024, 512, 256, 128, SMALLEST) if s < first]
    chosen = pick(shape, setup, budget, loss_chunks)
    free_gib, device = free / 2**30, input_ids.device
    capped = f" (capped: {free_gib:.2f} GiB free on {device})" if free == budget < math.inf else ""
    if chosen is None:
        least = smallest(shape, setup, loss_chunks[-1])
        what = f"{least.budget_bytes / 2**30:.3f} GiB" + (
            f" free on {device}, which has {free_gib:.2f}" if capped else ""
        )
        raise ConfigError(
            "chunkwise.memory_budget_gb", config.memory_budget_gb,
            f"at least {what}: the smallest step of this model on {setup.batch} x {setup.seq_len} tokens "
            f"(chunk_size {SMALLEST}, loss_chunk_size {loss_chunks[-1]}, nothing kept) takes "
            f"{least.step_bytes / 2**30:.3f} GiB as the planner predicts, and {MARGIN:.0%} is left free",
        )  # fmt: skip
    logger.info(chosen.line(setup.batch, setup.seq_len) + capped)
    return chosen.apply(config)


def agreed_pick(scheduler, model: nn.Module, input_ids: torch.Tensor, attention_mask, all_reduce) -> None:
    """ZeRO-3 ranks run one schedule: plan every rank from the least free memory and, if any
    rank's batch is padded, masked attention (one all-reduce per micro-batch), so each gets
    the same pick, or the same error; stored under this rank's own ``plan_key``."""
    key = scheduler.plan_key(input_ids, attention_mask)
    local = torch.tensor([-min(free_bytes(input_ids.device), 2.0**62), float(key[1])], dtype=torch.float64)
    free, masked = all_reduce(local.to(input_ids.device), torch.distributed.ReduceOp.MAX).tolist()
    agreed = (key[0], bool(masked), "agreed")
    if agreed not in scheduler.picks:
        scheduler.picks[agreed] = pick_for(
            model, input_ids, scheduler.config, bool(masked), -free, **scheduler.partitioning
        )
    scheduler.picks[key] = scheduler.picks[agreed]
