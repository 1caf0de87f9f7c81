"""DeepSpeed engine wrapper: chunk-wise backward between engine forward and one engine.step().

    engine, optimizer, _, lr_scheduler = ds_chunk.initialize(model=model, config="ds.json")
    for batch in loader:
        loss = engine.train_batch(batch)  # every chunk's backward, then one engine.step()

The chunk forwards go through ``engine(...)`` (so DeepSpeed's backward prologue hooks
see them) and the backwards through ``engine.backward(..., scale_wrt_gas=False)`` with
the accumulation boundary set on the last backward of the step only: with ZeRO-1/2,
several backwards without that flag keep only the last one's gradient.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ds_chunk.chunking import IGNORE_INDEX, prepare_labels
from ds_chunk.config import OUR_BLOCKS, ChunkwiseConfig
from ds_chunk.kv import ChunkCache
from ds_chunk.ops import announce_op_builds
from ds_chunk.scheduler import ChunkScheduler


def chunk_forward(module: nn.Module, *args, chunk_inputs: dict | None = None, sync_zero: bool = False, **kwargs):
    """The forward an engine runs, with the two modes chunk-wise training needs.

    ``chunk_inputs=kw`` runs only the decoder on one chunk and returns (hidden [B, C, H],
    the chunk's fresh K/V): the K/V are outputs so DeepSpeed's backward hooks fire even
    for a chunk whose only gradient is the one carried into its K/V. ``sync_zero=True``
    returns 0 * (one element of each trainable parameter), the step's boundary backward
    (see ``boundary_backward``). Anything else is the module's own forward.
    """
    if sync_zero:
        return 0.0 * sum(p.reshape(-1)[0] for p in module.parameters() if p.requires_grad)
    if chunk_inputs is None:
        return module(*args, **kwargs)
    hidden = module.get_decoder()(**chunk_inputs)[0]
    cache = next(v for v in chunk_inputs.values() if isinstance(v, ChunkCache))
    return hidden, [t for kv in cache.fresh.values() for t in kv]


class ChunkedLM(nn.Module):
    """The module DeepSpeed wraps: the HF model, plus the modes of ``chunk_forward``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return chunk_forward(self.module, *args, **kwargs)


@contextlib.contextmanager
def chunk_modes(module: nn.Module) -> Iterator[None]:
    """Give ``module`` (the model inside an engine or DDP wrapper that is not a ChunkedLM,
    e.g. the one HF Trainer prepared) the modes of ``chunk_forward`` inside the block, so
    chunk forwards still run through the wrapper's own forward and hooks."""
    own = module.__dict__.get("forward")  # accelerate may have set one (autocast)
    original = own if own is not None else type(module).forward.__get__(module)

    def forward(*args, chunk_inputs: dict | None = None, sync_zero: bool = False, **kwargs):
        if chunk_inputs is None and not sync_zero:
            return original(*args, **kwargs)
        return chunk_forward(module, chunk_inputs=chunk_inputs, sync_zero=sync_zero)

    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def check_engine(engine) -> None:
    """Refuse the DeepSpeed setups chunk-wise training cannot run exactly, naming the key."""
    if engine.zero_optimization_stage() == 3:
        raise ValueError(
            "zero_optimization.stage = 3 is not supported by ds_chunk: ranks that run different numbers of "
            "chunk forwards would deadlock in ZeRO-3's parameter all-gather. Use stage 2 with "
            '"offload_optimizer": {"device": "cpu"} instead.'
        )
    refuse_fp16(engine.fp16_enabled())
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        # it clears low-precision grads in a prologue that runs after our LM head's
        # gradient has been written, losing it
        raise ValueError(
            "DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 0, or data_types.grad_accum_dtype) is not "
            "supported by ds_chunk: use bf16 with zero_optimization.stage 1 or 2"
        )
    if engine.dp_world_size > 1 and (
        engine.zero_optimization_stage() == 2 or engine.zero_optimization_stage() == 1 and engine.zero_overlap_comm()
    ):
        # these reduce gradients inside every backward, so ranks would have to run the
        # same chunk backwards in the same order; ours differ (own labels, own draws)
        raise ValueError(
            "zero_optimization.stage = 2 (or stage 1 with overlap_comm) on several ranks is not supported by "
            "ds_chunk: use stage 1 (LoRA gradients are small, so stage 2 saves little), with offload_optimizer"
        )


def chunk_backward(engine, scalar: torch.Tensor) -> None:
    """One chunk's backward: never the accumulation boundary (that is ``boundary_backward``)."""
    engine.set_gradient_accumulation_boundary(False)  # read during backward: set before each
    engine.backward(scalar, scale_wrt_gas=False)  # we normalise by the step's token count


def boundary_backward(engine) -> None:
    """The step's boundary backward: an exact zero through every trainable parameter.

    Chunk backwards differ in which parameters they reach (a chunk without loss skips
    the LM head, or the last layer's adapters) and in number across ranks (their own
    labels and SpaCO draws). DeepSpeed reduces gradients, and with offload moves them
    to the optimizer, for the parameters whose hooks fire in the boundary backward:
    ending every step with the same backward on every rank, through every parameter,
    makes that complete and identical. It goes through engine(...) so DeepSpeed's
    backward prologue runs (the engine's module must have ``chunk_forward``'s modes).
    """
    engine.set_gradient_accumulation_boundary(True)
    engine.backward(engine(sync_zero=True), scale_wrt_gas=False)


class ChunkwiseEngine:
    """A DeepSpeed engine plus ``train_batch``; every other attribute is the engine's own."""

    def __init__(self, engine, chunkwise: ChunkwiseConfig):
        check_engine(engine)
        if not isinstance(engine.module, ChunkedLM):
            raise TypeError("wrap the model with ds_chunk.ChunkedLM before deepspeed.initialize / accelerator.prepare")
        self.engine = engine
        self.chunkwise = chunkwise
        self.scheduler = ChunkScheduler(chunkwise, backward_fn=self._backward)
        self.last_results: list = []  # ChunkResult of each micro-batch of the last step

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not yet set (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def __call__(self, *args, **kwargs):
        return self.engine(*args, **kwargs)

    @property
    def hf_model(self) -> nn.Module:
        """The user's model (HF or peft), e.g. for ``save_pretrained``."""
        return self.engine.module.module

    def _backward(self, scalar: torch.Tensor, is_last: bool) -> None:
        chunk_backward(self.engine, scalar)

    def _sync_backward(self) -> None:
        boundary_backward(self.engine)

    def _forward(self, kwargs: dict) -> torch.Tensor:
        return self.engine(chunk_inputs=kwargs)[0]

    def rank_and_world(self) -> tuple[int, int]:
        """(data-parallel rank, world size); (0, 1) without torch.distributed."""
        if not torch.distributed.is_initialized():
            return 0, 1
        return torch.distributed.get_rank(), torch.distributed.get_world_size()

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        if self.rank_and_world()[1] > 1:
            torch.distributed.all_reduce(value)
        return value

    def train_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on ``batch`` (input_ids, optional labels / attention_mask).

        The batch's rows are this rank's micro-batches (gradient_accumulation_steps of
        them). Returns the mean CE over every supervised token of the step, all ranks.
        """
        ids, labels, mask = (batch.get(k) for k in ("input_ids", "labels", "attention_mask"))
        if ids is None:
            raise KeyError("train_batch needs batch['input_ids']")
        gas = self.engine.gradient_accumulation_steps()
        if ids.shape[0] % gas:
            raise ValueError(f"batch of {ids.shape[0]} rows does not split into gradient_accumulation_steps={gas}")
        ids, labels, mask = (None if t is None else t.to(self.engine.device) for t in (ids, labels, mask))
        rank, world = self.rank_and_world()
        # Mean over all supervised tokens of the step on all ranks; DeepSpeed averages
        # the ranks' gradients, so each rank divides by (global count / world size).
        local = (prepare_labels(ids, labels, mask) != IGNORE_INDEX).sum().double()
        total = float(self._all_reduce(local.clone()))
        if total == 0:
            raise ValueError("no supervised token in the step: every label is -100 (ignored)")
        self.last_results = []
        self._micro_batches(ids, labels, mask, total / world, rank)
        self._sync_backward()
        self.engine.step()
        return self._all_reduce(loss_sum(self.last_results).to(self.engine.device)).cpu() / world

    def _micro_batches(self, ids, labels, mask, normalizer: float, rank: int) -> None:
        gas = self.engine.gradient_accumulation_steps()
        micro = ids.shape[0] // gas
        for j in range(gas):
            rows = slice(j * micro, (j + 1) * micro)
            result = self.scheduler.backward(
                self.engine.module,
                ids[rows],
                None if labels is None else labels[rows],
                None if mask is None else mask[rows],
                num_tokens=normalizer,
                boundary=False,  # the boundary is _sync_backward
                step=self.engine.global_steps * gas + j,
                rank=rank,
                forward_fn=self._forward,
            )
            self.last_results.append(result)


def loss_sum(results: list) -> torch.Tensor:
    return sum((r.loss for r in results), torch.zeros((), dtype=torch.float64))


def refuse_fp16(enabled: bool) -> None:
    # engine.backward scales each chunk's scalar by the loss scale, and the KV gradient
    # carried into the next chunk's scalar would be scaled again
    if enabled:
        raise ValueError('fp16.enabled = true is not supported by ds_chunk: use "bf16": {"enabled": true}')


def load_ds_config(config: str | os.PathLike | dict) -> dict:
    """A DeepSpeed config dict from a path or dict; rejects the "auto" values nothing will fill."""
    if not isinstance(config, dict):
        with open(config) as f:
            config = json.load(f)
    for key, value in _walk(config):
        if value == "auto":
            raise ValueError(
                f'{key} = "auto": DeepSpeed does not resolve "auto" outside accelerate; give a concrete value'
            )
    return config


def _walk(d: dict, prefix: str = ""):
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, path + ".")
        else:
            yield path, value


LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def single_process_env() -> None:
    """Under plain ``python`` (no launcher set RANK / WORLD_SIZE), the environment of a
    one-process group on a free local port, as ``deepspeed --num_gpus 1`` would give;
    DeepSpeed would otherwise try MPI discovery (and fail without mpi4py)."""
    if any(key in os.environ for key in ("RANK", "WORLD_SIZE")):
        return
    import socket

    with socket.socket() as s:  # a free port, so two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    for key, value in zip(LAUNCHER_ENV, ("0", "1", "0", "127.0.0.1", port)):
        os.environ.setdefault(key, value)


def initialize(
    model: nn.Module | None = None,
    config: str | os.PathLike | dict | None = None,
    model_parameters=None,
    optimizer=None,
    lr_scheduler=None,
    training_data=None,
    collate_fn=None,
    **kwargs,
):
    """Like ``deepspeed.initialize``, returning (ChunkwiseEngine, optimizer, dataloader, lr_scheduler).

    config: a DeepSpeed config (path or dict) with optional top-level ``chunkwise``
    and ``model`` blocks. Without ``model=``, the ``model`` block builds it (see
    ``ds_chunk.model``). model_parameters default to the trainable parameters. Under
    plain ``python`` (no launcher) it runs as a one-process group.
    """
    import deepspeed

    if config is None:
        raise ValueError("ds_chunk.initialize needs config= (a DeepSpeed config path or dict)")
    ds_config = load_ds_config(config)
    chunkwise = ChunkwiseConfig.from_ds_config(ds_config, source=None if isinstance(config, dict) else str(config))
    refuse_fp16(ds_config.get("fp16", {}).get("enabled", False) is True)
    if model is None:
        from ds_chunk.model import ModelConfig, build_model

        if "model" not in ds_config:
            raise ValueError('pass model= or give the config a top-level "model" block')
        model = build_model(ModelConfig.from_dict(ds_config["model"]))
    module = model if isinstance(model, ChunkedLM) else ChunkedLM(model)
    if model_parameters is None:
        model_parameters = [p for p in module.parameters() if p.requires_grad]
    single_process_env()
    with announce_op_builds():
        engine, optimizer, loader, lr_scheduler = deepspeed.initialize(
            model=module,
            config={k: v for k, v in ds_config.items() if k not in OUR_BLOCKS},
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            training_data=training_data,
            collate_fn=collate_fn,
            **kwargs,
        )
    return ChunkwiseEngine(engine, chunkwise), optimizer, loader, lr_scheduler
