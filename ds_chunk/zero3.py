"""ZeRO-3 helpers: parameters are partitioned between forwards, so code that reads a weight
outside its module's forward (the fused LM head, a save) gathers it first."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


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
