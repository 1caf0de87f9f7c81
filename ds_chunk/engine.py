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

from ds_chunk.budget import agreed_pick
from ds_chunk.chunking import IGNORE_INDEX, prepare_labels
from ds_chunk.config import OUR_BLOCKS, ChunkwiseConfig
from ds_chunk.kv import ChunkCache
from ds_chunk.ops import announce_op_builds
from ds_chunk.scheduler import ChunkScheduler, LocalGrads
from ds_chunk.sequence_parallel import groups, pad_to_multiple, same_rows
from ds_chunk.zero3 import all_reduce, check_packed_together, common_length, joint_schedule, partitioned

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")  # what train_batch reads from a batch


class _Inject(torch.autograd.Function):
    """A zero whose backward hands ``param`` exactly ``grad``."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.grad = grad
        return param.new_zeros(())

    @staticmethod
    def backward(ctx, out: torch.Tensor):
        return out * ctx.grad, None  # out = 1 from the engine's backward: exactly grad


def _boundary_scalar(module: nn.Module, grads) -> torch.Tensor:
    """The boundary backward's scalar: 0 through one element of each trainable parameter, or
    (``grads``: LocalGrads.take()) a zero whose backward hands each parameter its gradient.
    Under ZeRO-3 (parameters partitioned outside a forward): 0 x the logits of a one-token
    forward, whose hooks gather every parameter and give each a zero gradient."""
    if grads is None and partitioned(module.parameters()):
        device = next(module.parameters()).device
        return 0.0 * module(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device)).logits.float().sum()
    if grads is None:
        return 0.0 * sum(p.reshape(-1)[0] for p in module.parameters() if p.requires_grad)
    return sum(0.0 * p.reshape(-1)[0] if g is None else _Inject.apply(p, g.to(p.dtype)) for p, g in grads)


def chunk_forward(
    module: nn.Module, *args, chunk_inputs: dict | None = None, sync_zero: bool = False, sync_grads=None, **kwargs
):
    """The forward an engine runs, with the two modes chunk-wise training needs.

    ``chunk_inputs=kw`` runs only the decoder on one chunk and returns (hidden [B, C, H],
    the chunk's fresh K/V): the K/V are outputs so DeepSpeed's backward hooks fire even
    for a chunk whose only gradient is the one carried into its K/V. ``sync_zero=True``
    returns the step's boundary scalar (see ``boundary_backward``; with ``sync_grads`` it
    hands over the gradients collected locally). Anything else is the module's own forward.
    """
    if sync_zero:
        return _boundary_scalar(module, sync_grads)
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

    def forward(*args, chunk_inputs: dict | None = None, sync_zero: bool = False, sync_grads=None, **kwargs):
        if chunk_inputs is None and not sync_zero:
            return original(*args, **kwargs)
        return chunk_forward(module, chunk_inputs=chunk_inputs, sync_zero=sync_zero, sync_grads=sync_grads)

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
    if getattr(engine, "pipeline_parallelism", False):
        raise ValueError(
            "pipeline parallelism (a deepspeed.pipe.PipelineModule) is not supported by ds_chunk: a chunk's "
            "replay needs the whole decoder in one process; use ZeRO-3 to shard the model instead"
        )
    if engine.zero_optimization_stage() == 3 and any(
        type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in engine.module.modules()
    ):
        raise ValueError(
            "zero_optimization.stage = 3 with bitsandbytes 4/8-bit base weights is not supported by ds_chunk: "
            "use stage 1 or 2 with offload_optimizer for QLoRA (the base weights are frozen and small), or "
            "stage 3 with a bf16 / fp32 base"
        )
    refuse_fp16(engine.fp16_enabled())
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        # it clears low-precision grads in a prologue that runs after our LM head's
        # gradient has been written, losing it
        raise ValueError(
            "DeepSpeed's BF16_Optimizer (bf16 with ZeRO stage 0, or data_types.grad_accum_dtype) is not "
            "supported by ds_chunk: use bf16 with zero_optimization.stage 1 or 2"
        )


def chunk_backward(engine, scalar: torch.Tensor) -> None:
    """One chunk's backward through DeepSpeed (ZeRO-3: it reduce-scatters), never the boundary."""
    engine.set_gradient_accumulation_boundary(False)  # read during backward: set before each
    engine.backward(scalar, scale_wrt_gas=False)  # we normalise by the step's token count


def boundary_backward(engine, grads=None) -> None:
    """The step's boundary backward: an exact zero through every trainable parameter.

    Chunk backwards differ in which parameters they reach (a chunk without loss skips
    the LM head, or the last layer's adapters) and in number across ranks (their own
    labels and SpaCO draws). DeepSpeed reduces gradients, and with offload moves them
    to the optimizer, for the parameters whose hooks fire in the boundary backward:
    ending every step with the same backward on every rank, through every parameter,
    makes that complete and identical. It goes through engine(...) so DeepSpeed's
    backward prologue runs (the engine's module must have ``chunk_forward``'s modes).
    With ``grads`` (``LocalGrads.take()``: the chunk backwards went into a local buffer)
    this one backward hands every parameter its whole gradient of the step: DeepSpeed
    reduces it once.
    """
    engine.set_gradient_accumulation_boundary(True)
    scalar = engine(sync_zero=True, sync_grads=grads)
    # A new node, not the engine's output: DeepSpeed hooks each forward output to divide its
    # gradient by gradient_accumulation_steps unless engine.backward's own hook ran first, and
    # that hook sits on the tensor it is given, after the forward's (ZeRO-0 with GA > 1 got
    # 1/GA of the gradient; ZeRO-1/2/3 hand the optimizer a scaled copy, a new node already).
    engine.backward(scalar.clone(), scale_wrt_gas=False)


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient on some rank."""


class ChunkwiseEngine:
    """A DeepSpeed engine plus ``train_batch``; every other attribute is the engine's own.

    ZeRO-0/1/2: the chunk backwards collect the step's gradient in a buffer of each rank
    (``LocalGrads``), without DeepSpeed's hooks; one boundary backward then hands it to
    DeepSpeed, which reduces it once, identically on every rank whatever each rank's
    chunk schedule (their own labels and SpaCO draws).
    ZeRO-3 (parameters gathered in every forward): every rank runs the same schedule, its
    rows padded to the longest row of any rank, the chunks to replay and SpaCO's draw
    decided from the all-reduced supervised-chunk flags; each chunk backward goes through
    DeepSpeed (which reduce-scatters it), the ranks' own labels giving the global gradient.
    A step whose loss or gradient is not finite on any rank is skipped by every rank together.
    """

    def __init__(self, engine, chunkwise: ChunkwiseConfig, sequence_parallel_size: int = 1):
        check_engine(engine)
        if not isinstance(engine.module, ChunkedLM):
            raise TypeError("wrap the model with ds_chunk.ChunkedLM before deepspeed.initialize / accelerator.prepare")
        self.engine = engine
        self.chunkwise = chunkwise
        self.sp = groups(sequence_parallel_size)  # every rank makes the groups, so before any other collective
        self.scheduler = ChunkScheduler(chunkwise, sequence_parallel=self.sp)
        self.scheduler.partitioning = {
            "zero_stage": engine.zero_optimization_stage(),
            "world_size": self.rank_and_world()[1],
            "sequence_parallel": sequence_parallel_size,
        }
        self.zero3 = engine.zero_optimization_stage() == 3
        self.grads = None if self.zero3 else LocalGrads(engine.module.parameters())
        self.last_results: list = []  # ChunkResult of each micro-batch of the last step
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient, in all
        self.consecutive_skips = 0

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

    def rank_and_world(self) -> tuple[int, int]:
        """(this process's rank, the number of ranks); (0, 1) without torch.distributed."""
        if not torch.distributed.is_initialized():
            return 0, 1
        return torch.distributed.get_rank(), torch.distributed.get_world_size()

    def data_parallel(self) -> tuple[int, int]:
        """(data-parallel rank, data-parallel size): which rows this rank trains on. The ranks of a
        sequence-parallel group (``sequence_parallel_size``) train on the same rows."""
        rank, world = self.rank_and_world()
        size = 1 if self.sp is None else self.sp.size
        return rank // size, world // size

    def train_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on ``batch`` (input_ids, optional labels / attention_mask /
        position_ids: restarting ones mark packed documents, see ``ChunkScheduler.backward``).

        The batch's rows are this rank's micro-batches (gradient_accumulation_steps of
        them). Returns the mean CE over every supervised token of the step, all ranks (plus,
        for an MoE model with the router's load-balancing loss, coef * its mean over micro-batches)
        (non-finite if the step was skipped: see ``skipped_steps``).
        """
        ids, labels, mask, pos = (batch.get(k) for k in BATCH_KEYS)
        if ids is None:
            raise KeyError("train_batch needs batch['input_ids']")
        gas = self.engine.gradient_accumulation_steps()
        if ids.shape[0] % gas:
            raise ValueError(f"batch of {ids.shape[0]} rows does not split into gradient_accumulation_steps={gas}")
        ids, labels, mask, pos = (None if t is None else t.to(self.engine.device) for t in (ids, labels, mask, pos))
        world = self.rank_and_world()[1]
        if pos is not None:
            pos = self._positions(ids, pos)
        if self.zero3:
            ids, labels, mask, pos = common_length(ids, labels, mask, pos, all_reduce)
        if self.sp is not None:
            same_rows(self.sp, ids, labels, mask, pos)
            ids, labels, mask, pos = pad_to_multiple(ids, labels, mask, pos, self.sp.size)
        # Mean over all supervised tokens of the step on all ranks; DeepSpeed averages the
        # ranks' gradients (all of them: DeepSpeed sees sequence-parallel ranks as data-parallel
        # ones), so each rank divides by (global count / world size). The ranks of a
        # sequence-parallel group hold the same rows: each counts them once between them.
        local = (prepare_labels(ids, labels, mask) != IGNORE_INDEX).sum().double()
        total = float(all_reduce(local.clone())) / (1 if self.sp is None else self.sp.size)
        if total == 0:
            raise ValueError("no supervised token in the step: every label is -100 (ignored)")
        self.last_results = []
        with self.autocast():
            self._micro_batches((ids, labels, mask, pos), total / world, self.data_parallel()[0])
        grads = None if self.zero3 else self.grads.take()
        finite = self._all_finite(grads or [])
        if self.zero3 or finite:
            boundary_backward(self.engine, grads)  # ZeRO-3: finishes the reduce-scatters either way
        if finite:
            self.consecutive_skips = 0
            self.engine.step()
        else:
            if self.zero3:
                self.engine.optimizer.zero_grad(set_to_none=True)  # drop the partitions' gradients
            self._skip()
        return all_reduce(loss_sum(self.last_results).to(self.engine.device)).cpu() / world

    def autocast(self) -> contextlib.AbstractContextManager:
        """DeepSpeed's ``torch_autocast`` block as a context: its dtype on the engine's device where
        it is enabled, else nothing. DeepSpeed applies it inside ``engine(...)``; chunk forwards under
        ZeRO-0/1/2 run the module directly, so the whole step runs in it (evaluation too)."""
        if not self.engine.torch_autocast_enabled():
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.engine.device).type, dtype=self.engine.torch_autocast_dtype())

    def _positions(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """position_ids as [rows, T]; packed rows refused by every rank together where the model
        cannot keep documents apart."""
        pos = pos.unsqueeze(0) if pos.dim() == 1 else pos
        pos = pos.expand(ids.shape[0], -1) if pos.shape[0] == 1 else pos  # rows, so micro-batches can slice it
        check_packed_together(self.hf_model, ids, pos)
        return pos

    def _schedule(self, ids, labels, mask) -> list[bool] | None:
        """ZeRO-3: whether each chunk holds a supervised token on any rank (None otherwise).
        Sequence parallel: a memory budget's pick agreed by the ranks (a group runs one schedule)."""
        if self.zero3:
            return joint_schedule(self.scheduler, self.engine.module, ids, labels, mask, all_reduce)
        if self.sp is not None and self.scheduler.config.memory_budget_gb is not None:
            agreed_pick(self.scheduler, self.engine.module, ids, mask, all_reduce)
        return None

    def _all_finite(self, grads) -> bool:
        """Whether the step's loss and gradient are finite on every rank (one all-reduce)."""
        finite = all(bool(torch.isfinite(r.loss)) for r in self.last_results if r.loss_kind != "off")
        finite = finite and all(g is None or bool(torch.isfinite(g).all()) for _, g in grads)
        return self._on_every_rank(finite)

    def _skip(self) -> None:
        self.skipped_steps += 1
        self.consecutive_skips += 1
        limit = self.chunkwise.max_consecutive_skips
        if self.consecutive_skips > limit:
            raise NonFiniteError(
                f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient on some rank (more "
                f"than chunkwise.max_consecutive_skips = {limit}): stopping. Lower the learning rate, check the "
                "data, or train in float32; the last checkpoint holds finite weights"
            )

    def weights_finite(self) -> bool:
        """Whether every trainable parameter is finite on every rank (checked before a checkpoint)."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters() if p.requires_grad)
        return self._on_every_rank(finite)

    def _on_every_rank(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (one all-reduce)."""
        flag = torch.tensor(float(ok), device=self.engine.device)
        return bool(all_reduce(flag, torch.distributed.ReduceOp.MIN) > 0)

    def _micro_batches(self, batch: tuple, normalizer: float, rank: int) -> None:
        gas = self.engine.gradient_accumulation_steps()
        micro = batch[0].shape[0] // gas
        for j in range(gas):
            rows = slice(j * micro, (j + 1) * micro)
            ids_j, labels_j, mask_j, pos_j = (None if t is None else t[rows] for t in batch)
            result = self.scheduler.backward(
                self.engine.module,
                ids_j,
                labels_j,
                mask_j,
                num_tokens=normalizer,
                boundary=False,  # the boundary is boundary_backward
                step=self.engine.global_steps * gas + j,
                rank=0 if self.zero3 else rank,  # ZeRO-3: the same SpaCO draw on every rank; SP: the group's
                # ZeRO-0/1/2: no engine forward or backward per chunk (see LocalGrads)
                backward_fn=self._chunk_backward if self.zero3 else self.grads,
                forward_fn=self._forward if self.zero3 else None,
                has_loss=self._schedule(ids_j, labels_j, mask_j),
                position_ids=pos_j,
                aux_weight=1.0 / gas,  # an MoE router's loss: DeepSpeed's mean over micro-batches and ranks
            )
            self.last_results.append(result)

    def _chunk_backward(self, scalar: torch.Tensor, is_last: bool) -> None:
        chunk_backward(self.engine, scalar)

    def _forward(self, kwargs: dict) -> torch.Tensor:
        return self.engine(chunk_inputs=kwargs)[0]


def loss_sum(results: list) -> torch.Tensor:
    return sum((r.loss for r in results), torch.zeros((), dtype=torch.float64))


def refuse_fp16(enabled: bool) -> None:
    # engine.backward scales each chunk's scalar by the loss scale, and the KV gradient
    # carried into the next chunk's scalar would be scaled again
    if enabled:
        raise ValueError('fp16.enabled = true is not supported by ds_chunk: use "bf16": {"enabled": true}')


def refuse_float_quant_storage(module: nn.Module, bf16: bool) -> None:
    """DeepSpeed's bf16 casts every floating parameter to bf16, so 4-bit weights packed into a
    float32 / float16 storage are cast too: a shape error, or (float16) silently wrong outputs.
    Only bf16 storage (or bitsandbytes' default uint8) survives it."""
    if not bf16:
        return
    for name, p in module.named_parameters():
        if type(p).__name__ == "Params4bit" and p.is_floating_point() and p.dtype != torch.bfloat16:
            raise ValueError(
                f"model.quantization.quant_storage = {str(p.dtype).removeprefix('torch.')} with bf16.enabled: "
                f"DeepSpeed casts floating parameters to bf16, and would cast the packed 4-bit weights too ({name}); "
                'use "quant_storage": "bfloat16", or leave it unset (uint8)'
            )


def sequence_parallel_size(ds_config: dict, loader: bool = False) -> int:
    """DeepSpeed's ``sequence_parallel_size`` (1 if absent): the ranks one sequence is split over
    (``ds_chunk.sequence_parallel``). DeepSpeed itself reads it for the batch-size arithmetic only
    (train_batch_size = micro batch x accumulation x data-parallel ranks)."""
    size = ds_config.get("sequence_parallel_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"sequence_parallel_size = {size!r}: expected a positive integer")
    if size > 1 and "data_parallel_size" in ds_config:
        raise ValueError(
            f"data_parallel_size with sequence_parallel_size = {size}: DeepSpeed then reduces gradients over its "
            "data-parallel mesh dimension only, not over the sequence-parallel ranks; leave data_parallel_size out "
            "(ds_chunk takes it as the number of ranks / sequence_parallel_size)"
        )
    if size > 1 and loader:
        raise ValueError(
            f"training_data with sequence_parallel_size = {size}: DeepSpeed's loader would give the ranks of a "
            "sequence-parallel group different rows; load the rows by engine.data_parallel() (rank, size) instead"
        )
    return size


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
    dist_timeout: float | None = None,
    **kwargs,
):
    """Like ``deepspeed.initialize``, returning (ChunkwiseEngine, optimizer, dataloader, lr_scheduler).

    config: a DeepSpeed config (path or dict) with optional top-level ``chunkwise``
    and ``model`` blocks. Without ``model=``, the ``model`` block builds it (see
    ``ds_chunk.model``). model_parameters default to the trainable parameters. Under
    plain ``python`` (no launcher) it runs as a one-process group. dist_timeout: seconds
    a collective may wait before it fails (when this call starts the process group;
    DeepSpeed's default: $DEEPSPEED_TIMEOUT minutes, 10).
    """
    import deepspeed

    if config is None:
        raise ValueError("ds_chunk.initialize needs config= (a DeepSpeed config path or dict)")
    ds_config = load_ds_config(config)
    chunkwise = ChunkwiseConfig.from_ds_config(ds_config, source=None if isinstance(config, dict) else str(config))
    sp_size = sequence_parallel_size(ds_config, training_data is not None)
    refuse_fp16(ds_config.get("fp16", {}).get("enabled", False) is True)
    if model is None:
        from ds_chunk.model import ModelConfig, build_model

        if "model" not in ds_config:
            raise ValueError('pass model= or give the config a top-level "model" block')
        model = build_model(ModelConfig.from_dict(ds_config["model"]))
    module = model if isinstance(model, ChunkedLM) else ChunkedLM(model)
    refuse_float_quant_storage(module, ds_config.get("bf16", {}).get("enabled", False) is True)
    if model_parameters is None:
        model_parameters = [p for p in module.parameters() if p.requires_grad]
    single_process_env()
    if dist_timeout is not None and not torch.distributed.is_initialized():
        from datetime import timedelta

        deepspeed.init_distributed(timeout=timedelta(seconds=dist_timeout))
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
    return ChunkwiseEngine(engine, chunkwise, sp_size), optimizer, loader, lr_scheduler
