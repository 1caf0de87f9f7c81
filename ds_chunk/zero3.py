"""ZeRO-3 helpers: parameters are partitioned between forwards, so code that reads a weight
outside its module's forward (the fused LM head, a save) gathers it first, and every rank must
run the same chunk forwards and backwards (each gathers the parameters): the same length and
the same chunks to replay (``common_length``, ``joint_schedule``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch

from ds_chunk.chunking import IGNORE_INDEX, chunk_bounds, pad_right, prepare_labels


def partitioned(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The ZeRO-3 partitioned parameters among ``params`` (DeepSpeed tags them with ``ds_id``)."""
    return [p for p in params if hasattr(p, "ds_id")]


def gathered(params: Iterable[torch.Tensor]) -> contextlib.AbstractContextManager:
    """Whole parameters on every rank inside the block (a collective: every rank enters it);
    a no-op without ZeRO-3."""
    params = partitioned(params)
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


AllReduce = Callable[..., torch.Tensor]  # (tensor, op=None) -> the tensor, reduced over the ranks in place


def all_reduce(value: torch.Tensor, op=None) -> torch.Tensor:
    """``value`` reduced over every rank in place (sum, or ``op``); unchanged in one process."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value, **({} if op is None else {"op": op}))
    return value


def check_packed_together(model, ids: torch.Tensor, positions: torch.Tensor) -> None:
    """Packed rows refused by every rank together where the model cannot keep documents apart
    (one all-reduce), so no rank waits in a collective for one that stopped."""
    from ds_chunk.documents import Layout, check_packed

    packed = torch.tensor(float(Layout.of(ids, positions).packed), device=ids.device)
    check_packed(model, bool(all_reduce(packed, torch.distributed.ReduceOp.MAX) > 0))


def common_length(ids, labels, mask, pos, all_reduce: AllReduce) -> tuple:
    """Rows right-padded (mask 0, label -100) to the longest row of any rank, so every rank runs
    the same number of chunk forwards (each gathers the parameters); positions go on counting,
    so padding never makes a row look packed."""
    longest = int(all_reduce(torch.tensor(ids.shape[1], device=ids.device), torch.distributed.ReduceOp.MAX))
    return pad_right(ids, labels, mask, pos, longest - ids.shape[1])


def joint_schedule(scheduler, module, ids, labels, mask, all_reduce: AllReduce) -> list[bool]:
    """Whether each chunk holds a supervised token on any rank (one all-reduce), after the ranks
    agree on a memory budget's pick: every rank then replays the same chunks."""
    from ds_chunk.budget import agreed_pick

    if scheduler.config.memory_budget_gb is not None:
        agreed_pick(scheduler, module, ids, mask, all_reduce)
    settings = scheduler.settings(module, ids, mask)
    size = settings.chunk_size if settings.enabled else ids.shape[1]
    supervised = prepare_labels(ids, labels, mask) != IGNORE_INDEX
    flags = torch.tensor([float(supervised[:, s:e].any()) for s, e in chunk_bounds(ids.shape[1], size)])
    flags = all_reduce(flags.to(ids.device), torch.distributed.ReduceOp.MAX)
    return [bool(f) for f in flags.tolist()]
