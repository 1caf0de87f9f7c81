"""Chunk-wise training inside HF ``transformers.Trainer`` and its subclasses (TRL's ``SFTTrainer``).

    from ds_chunk.hf import ChunkwiseTrainer, with_chunkwise

    trainer = ChunkwiseTrainer(model=model, args=TrainingArguments(..., deepspeed="ds.json"), ...)
    trainer = with_chunkwise(trl.SFTTrainer)(model=model, args=SFTConfig(...), chunkwise={"chunk_size": 512})

The training step runs ``ChunkScheduler`` (SeCO / SpaCO) instead of one full forward and
backward; everything around it (data, optimizer, schedule, clipping, logging, saving,
resuming) is the parent's. The loss is normalised exactly as the parent's
``compute_loss`` would (by ``num_items_in_batch`` across gradient accumulation and
devices), so the trained weights and the logged loss equal the parent's. Under
DeepSpeed the chunk backwards never reach accelerate's ``backward`` (which would step the
engine each time), nor the engine: they go to a buffer of each rank, and the
Trainer step's last micro-batch ends with one boundary backward, which hands DeepSpeed the
gradient the chunk backwards collected locally (one reduction), and one ``engine.step()``.
Under ZeRO-3 the ranks run one joint schedule, the chunk backwards go to the engine (see
``_DeepSpeed``), and evaluation is the parent's full forward without gradients.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from typing import Any

import torch
import transformers
from torch import nn

from ds_chunk.adapter import UnsupportedModelError, check_supported, unwrap
from ds_chunk.budget import agreed_pick
from ds_chunk.config import ChunkwiseConfig
from ds_chunk.documents import Layout, check_packed
from ds_chunk.engine import boundary_backward, check_engine, chunk_backward, chunk_modes, refuse_float_quant_storage
from ds_chunk.neftune import row_noise
from ds_chunk.scheduler import ChunkScheduler, LocalGrads
from ds_chunk.sequence_parallel import SequenceParallel, from_deepspeed, gather_rows, group_sum, sp_zero3_scale
from ds_chunk.zero3 import all_reduce, check_packed_together, common_length, joint_schedule

logger = logging.getLogger("ds_chunk")

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")  # what a chunk-wise step passes on
# TRL's padding-free batches also carry varlen hints for flash attention; the documents are read
# from position_ids (checked to agree with cu_seq_lens_q)
VARLEN_HINTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


class ChunkwiseTrainerError(ValueError):
    """A Trainer option that chunk-wise training cannot reproduce; the message names it."""


def _defining_class(cls: type, name: str) -> type:
    return next(c for c in cls.__mro__ if name in vars(c))


def _parent(cls: type) -> type:
    """The Trainer class that ``with_chunkwise`` made ``cls`` from."""
    return next(c for c in cls.__mro__[1:] if not issubclass(c, _ChunkwiseMixin))


def _is_sft(cls: type) -> bool:
    return cls.__name__ == "SFTTrainer" and cls.__module__.startswith("trl.")


def resolve_config(chunkwise, ds_config) -> ChunkwiseConfig | None:
    """The ``chunkwise`` block from ``chunkwise=`` (dict or ChunkwiseConfig), else from the
    DeepSpeed config of the TrainingArguments (path or dict); None when neither has one."""
    if isinstance(chunkwise, ChunkwiseConfig):
        return chunkwise
    if chunkwise is not None:
        return ChunkwiseConfig.from_dict(chunkwise)
    if ds_config is None:
        return None
    source = None if isinstance(ds_config, dict) else str(ds_config)
    if source is not None:
        with open(source) as f:
            ds_config = json.load(f)
    config = ChunkwiseConfig.from_ds_config(ds_config, source)  # warns on a misspelled block name
    return config if "chunkwise" in ds_config else None


class _ChunkwiseMixin:
    """The chunk-wise training step, evaluation and checks; put in front of a Trainer class."""

    def __init__(self, *args, chunkwise: ChunkwiseConfig | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        config = resolve_config(chunkwise, self.args.deepspeed)
        parent = _parent(type(self)).__name__
        self.chunkwise = config if config is not None and config.enabled else None
        if self.chunkwise is None:
            why = "chunkwise.enabled is false" if config is not None else "no chunkwise block (chunkwise= or deepspeed)"
            logger.warning(f"ds_chunk: {why}: training exactly as {parent}")
            return
        self._refuse_what_cannot_be_chunked()
        self._sft = _is_sft(_defining_class(type(self), "compute_loss"))  # log SFTTrainer's metrics as it does
        self._scheduler = ChunkScheduler(self.chunkwise)
        self._micro = 0  # micro-batch index inside the current optimizer step (SpaCO's draw)
        self._driver = None  # made at the first step, once accelerate has wrapped the model

    # ---- what cannot be chunked --------------------------------------------------------

    def _refuse_what_cannot_be_chunked(self) -> None:
        args, cls = self.args, type(self)
        name = _parent(cls).__name__

        def refuse(option: str, why: str) -> None:
            raise ChunkwiseTrainerError(f"{name} with ds_chunk: {option}: {why}")

        if self.compute_loss_func is not None:
            refuse(
                "compute_loss_func is set",
                "ds_chunk computes the causal-LM cross-entropy chunk by chunk and "
                "cannot reproduce a custom loss; drop the chunkwise block or the custom loss",
            )
        loss_owner = _defining_class(cls, "compute_loss")
        if loss_owner is not transformers.Trainer and not _is_sft(loss_owner):
            refuse(
                f"{loss_owner.__name__}.compute_loss is overridden",
                "a custom loss cannot be reproduced chunk "
                "by chunk; chunk-wise training computes the causal-LM cross-entropy of the labels",
            )
        if args.label_smoothing_factor:
            refuse(f"label_smoothing_factor = {args.label_smoothing_factor}", "not supported; set it to 0")
        if args.fp16:
            refuse(
                "fp16 = True",
                "the loss scaler would scale the KV gradient carried between chunks twice; use bf16 = True",
            )
        if args.n_gpu > 1:
            refuse(f"n_gpu = {args.n_gpu} (nn.DataParallel)", "launch one process per GPU (torchrun, accelerate)")
        if self.is_deepspeed_enabled and args.bf16:
            refuse_float_quant_storage(self.model, True)
        pc = getattr(self.accelerator, "parallelism_config", None)
        handler = getattr(pc, "sp_handler", None)
        if getattr(pc, "sp_enabled", False) and getattr(handler, "sp_disable_in_eval", True) is False:
            refuse(
                "parallelism_config.sp_handler.sp_disable_in_eval = False",
                "ds_chunk evaluates each rank's own rows whole (DeepSpeed's Ulysses attention would wait for the "
                "group's other ranks, which hold other rows); leave it True",
            )
        if pc is not None and getattr(pc, "cp_enabled", False):
            refuse(
                "parallelism_config.cp_size (torch context parallelism)",
                'shards the sequence with ring attention; use sp_backend="deepspeed", sp_size=N (Ulysses), which '
                "ds_chunk splits chunk by chunk",
            )
        if _is_sft(loss_owner):
            if getattr(args, "loss_type", "nll") != "nll":
                refuse(f"loss_type = {args.loss_type!r}", "only 'nll' (cross-entropy) is chunked")
            if getattr(self, "padding_free", False):  # packed rows in every batch: refuse now, not at step 1
                try:
                    check_packed(unwrap(self.model), True)
                except ValueError as e:
                    refuse("padding_free / packing_strategy 'bfd'", str(e))
            if getattr(args, "activation_offloading", False):
                refuse("activation_offloading = True", 'use "chunkwise": {"kv_offload": true} instead')
        try:
            check_supported(unwrap(self.model), 1)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{name} with ds_chunk: {e}") from None

    # ---- the training step ---------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        if self.chunkwise is None:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        driver = self._driver = self._driver or _driver_for(model, self.accelerator)
        sp = self._scheduler.sp = driver.sp
        rows = inputs  # sequence parallel: DeepSpeed's shards here (the parent's metrics count them) ...
        if sp is not None:  # ... refused if a chunk-wise step would drop a key; the whole rows run
            self._chunk_inputs({k: v for k, v in inputs.items() if k != "shift_labels"})
            rows = gather_rows(inputs, sp)
        ids, labels, mask, positions = self._chunk_inputs(rows)
        sync = self.accelerator.sync_gradients  # the Trainer step's last micro-batch
        step = self.state.global_step * self.args.gradient_accumulation_steps + self._micro
        own = ids.shape[1]
        with self.compute_loss_context_manager(), self.accelerator.autocast(), driver.modes():
            ids, labels, mask, positions, has_loss = driver.schedule(
                self._scheduler, unwrap(model), ids, labels, mask, positions
            )  # ZeRO-3: padded to every rank's length, has_loss: the ranks' joint supervised chunks
            noise = row_noise(unwrap(model), ids, own) if self.neftune_noise_alpha is not None else None
            with noise or contextlib.nullcontext():
                result = self._backward(model, ids, labels, mask, positions, has_loss, step, num_items_in_batch)
            if sync:
                driver.end_step()
        self._micro = 0 if sync else self._micro + 1
        if self._sft:
            self._sft_metrics(inputs, result.token_stats, result.aux_loss)
        loss = torch.tensor(float(result.loss), dtype=torch.float32, device=self.args.device)
        if sp is not None:  # each rank: its slices' share, of a loss scaled as the parent's gradient is
            loss = group_sum(loss, sp) / sp_zero3_scale(sp, self._zero3())
        return loss

    def _backward(self, model, ids, labels, mask, positions, has_loss, step, num_items_in_batch):
        """The micro-batch's chunk schedule, its backwards through the driver."""
        driver = self._driver
        return self._scheduler.backward(
            unwrap(model),
            ids,
            labels,
            mask,
            num_tokens=self._normalizer(labels, ids, mask, num_items_in_batch),
            boundary=False,
            step=step,
            rank=0 if has_loss is not None else self._data_rank(),  # ZeRO-3: one draw for all ranks
            backward_fn=driver.backward_fn,
            forward_fn=driver.forward,
            position_ids=positions,
            has_loss=has_loss,
            token_stats=self._sft,
            aux_weight=self._aux_weight(num_items_in_batch),
        )

    def _data_rank(self) -> int:
        """The data-parallel rank: a sequence-parallel group makes one draw."""
        sp = self._scheduler.sp
        return self.args.process_index // (1 if sp is None else sp.size)

    def _zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        return plugin is not None and plugin.zero_stage == 3

    def _aux_weight(self, num_items_in_batch) -> float:
        """How the parent weighs a micro-batch's MoE load-balancing loss (coef * aux): SFTTrainer
        divides it by the accumulation steps; Trainer takes the model's loss, scaled as the
        cross-entropy is (by the ranks where the tokens are averaged over them, else 1 / GA)."""
        if num_items_in_batch is None or self._sft:
            return 1.0 / self.current_gradient_accumulation_steps
        return self._token_ranks()

    def _token_ranks(self) -> int:
        """The ranks whose tokens ``num_items_in_batch`` counts (``average_tokens_across_devices``),
        by which the parent scales each rank's loss; else 1."""
        return self.accelerator.num_processes // self.get_tp_size() if self.args.average_tokens_across_devices else 1

    def _sft_metrics(self, inputs: dict, stats, aux_loss: float | None) -> None:
        """What SFTTrainer.compute_loss logs in training: entropy and mean_token_accuracy over
        the supervised tokens of the micro-batch, all ranks (not where the loss is a SpaCO
        estimate or a fused kernel made no logits), the running num_tokens, and an MoE
        model's aux_loss (the ranks' mean)."""
        if stats is not None:
            self._token_metrics("train", stats.tokens, stats.entropy, stats.correct)
        self._aux_metric("train", aux_loss)
        gather = self.accelerator.gather_for_metrics
        if "attention_mask" in inputs:
            tokens = gather(inputs["attention_mask"].sum()).sum().item()
        else:  # padding-free: every position is a token
            tokens = gather(torch.tensor(inputs["input_ids"].size(1), device=self.args.device)).sum().item()
        self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _aux_metric(self, mode: str, aux_loss: float | None) -> None:
        if aux_loss is not None:
            aux = torch.tensor(float(aux_loss), device=self.args.device)
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux).mean().item())

    def _token_metrics(self, mode: str, tokens: float, entropy: float, correct: float) -> None:
        """SFTTrainer's entropy and mean_token_accuracy from this rank's sums: summed over all
        ranks, divided by all ranks' supervised tokens, appended to its per-step lists."""
        sums = torch.tensor([float(tokens), float(entropy), float(correct)], device=self.args.device)
        valid, entropy, correct = self.accelerator.gather_for_metrics(sums[None]).sum(0).tolist()
        self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)

    def _chunk_inputs(self, inputs: dict) -> tuple:
        """(input_ids, labels, attention_mask, position_ids); refuses inputs a chunk-wise step would drop."""
        extra = sorted(set(inputs) - set(MODEL_INPUTS) - set(VARLEN_HINTS) - {"use_cache", "num_items_in_batch"})
        if extra:
            raise ChunkwiseTrainerError(
                f"inputs {extra}: a chunk-wise step passes only {', '.join(MODEL_INPUTS)} to the model; "
                "these would be dropped (shift_labels: use labels; token_type_ids: not a causal-LM input)"
            )
        if "input_ids" not in inputs:
            raise ChunkwiseTrainerError("inputs have no 'input_ids' (inputs_embeds is not chunked)")
        _check_varlen_hints(inputs)
        return tuple(inputs.get(k) for k in ("input_ids", "labels", "attention_mask", "position_ids"))

    def _normalizer(self, labels, ids, mask, num_items_in_batch) -> float:
        """What the parent's loss divides the micro-batch's summed token CE by (per rank)."""
        if self._scheduler.sp is not None:  # as transformers' deepspeed_sp_compute_loss
            num_items_in_batch = None  # the micro-batch's mean over the group, / accumulation steps
        if num_items_in_batch is not None:  # model-side normalisation over the whole step
            return float(num_items_in_batch) / self._token_ranks()
        from ds_chunk.chunking import IGNORE_INDEX, prepare_labels

        count = int((prepare_labels(ids, labels, mask) != IGNORE_INDEX).sum())  # the micro-batch mean ...
        count = float(count * self.current_gradient_accumulation_steps)  # ... / the accumulation steps
        return count / sp_zero3_scale(self._scheduler.sp, self._zero3())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """SpaCO's free loss is an estimate (sum of w_i * L_i over the replayed chunks, 0 when the
        draw replayed no supervised chunk): logged as ``loss_est``, as launch/train.py does, not
        as ``loss``; with ``sparse.report_loss = "off"`` no training loss is logged."""
        kind = self.chunkwise.sparse.report_loss if self.chunkwise is not None and self.chunkwise.sparse else "exact"
        if kind != "exact" and "loss" in logs:
            logs = dict(logs)
            loss = logs.pop("loss")
            if kind == "estimate":
                logs["loss_est"] = loss
        super().log(logs, *args, **kwargs)

    # ---- evaluation ---------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Chunk-wise loss without gradients, in one chunk's memory (the parent's full forward
        when logits are asked for, e.g. by ``compute_metrics``)."""
        if self.chunkwise is None or not prediction_loss_only or self._zero3():
            # ZeRO-3: the ranks' batches differ, and every chunk forward gathers the parameters
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        from ds_chunk.evaluate import evaluate

        inputs = self._prepare_inputs(inputs)
        batch = dict(zip(("input_ids", "labels", "attention_mask", "position_ids"), self._chunk_inputs(inputs)))
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            metrics = evaluate(unwrap(model), [batch], self.chunkwise.chunk_size)
        loss, aux = metrics["loss"], metrics.get("aux_loss")
        if aux is not None:  # as the model's loss: + coef * aux (one batch: no accumulation)
            loss += unwrap(model).config.router_aux_loss_coef * aux
        if self._sft:  # as SFTTrainer.compute_loss logs them in evaluation
            n = metrics["tokens"]
            self._token_metrics("eval", n, metrics["entropy"] * n, metrics["token_accuracy"] * n)
            self._aux_metric("eval", aux)
            self._metrics["eval"]["num_tokens"] = [self._total_train_tokens]
        return torch.tensor(loss, device=self.args.device), None, None

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        if self.chunkwise is not None:
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            loss = output.metrics.get(f"{prefix}_loss")
            if loss is not None:
                output.metrics[f"{prefix}_perplexity"] = math.exp(min(loss, 50.0))
        return output


def _check_varlen_hints(inputs: dict) -> None:
    """TRL's cu_seq_lens_q must name the documents that position_ids do (their restarts)."""
    cu, positions = inputs.get("cu_seq_lens_q"), inputs.get("position_ids")
    if cu is None:
        return
    if positions is None or positions.shape[0] != 1:
        raise ChunkwiseTrainerError("inputs['cu_seq_lens_q'] without one row of position_ids: the documents are read "
                                    "from position_ids (as transformers' sdpa and eager attention do)")  # fmt: skip
    starts = Layout.of(inputs["input_ids"], positions).boundaries()
    if starts != cu.tolist():
        raise ChunkwiseTrainerError(
            f"inputs['cu_seq_lens_q'] = {cu.tolist()} disagrees with the document starts of position_ids "
            f"({starts}): ds_chunk reads the documents from position_ids"
        )


# ---- how a step's backwards reach the parameters -------------------------------------------


class _Plain:
    """One process, no DeepSpeed: each chunk backward adds into .grad; the Trainer clips and steps."""

    forward = None  # the model's own decoder
    sp: SequenceParallel | None = None  # the ranks each sequence is split over (DeepSpeed's Ulysses only)

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.backward_fn = self.backward

    def backward(self, scalar: torch.Tensor, is_last: bool) -> None:
        self.accelerator.backward(scalar)  # the Trainer's accelerator: no accumulation scaling, no loss scaler

    def modes(self):
        return contextlib.nullcontext()

    def schedule(self, scheduler, model, ids, labels, mask, positions) -> tuple:
        """(ids, labels, mask, positions, has_loss) as this rank runs them: its own (has_loss None)."""
        return ids, labels, mask, positions, None

    def end_step(self) -> None:
        pass


class _DataParallel(_Plain):
    """DistributedDataParallel: chunk backwards without communication, then one backward of an
    exact zero through DDP's forward, which reduces the accumulated gradients once."""

    def __init__(self, accelerator, ddp: nn.Module):
        super().__init__(accelerator)
        self.ddp = ddp

    def backward(self, scalar: torch.Tensor, is_last: bool) -> None:
        with self.ddp.no_sync():
            scalar.backward()

    def modes(self):
        return chunk_modes(self.ddp.module)

    def end_step(self) -> None:
        self.ddp(sync_zero=True).backward()


class _DeepSpeed(_Plain):
    """The DeepSpeed engine the Trainer prepared: chunk backwards into a local buffer (no
    DeepSpeed hook fires), then one boundary backward through the engine handing it the
    step's gradient (one reduction) and one engine.step().

    ZeRO-3 (parameters gathered in every forward): as ``ds_chunk.initialize`` runs it, every
    rank runs the same schedule (rows padded to the longest of any rank, the chunks to replay
    from the ranks' joint supervised chunks, one SpaCO draw), the chunk forwards go through the
    engine and each chunk backward to DeepSpeed, which reduce-scatters it."""

    def __init__(self, accelerator, engine):
        super().__init__(accelerator)
        check_engine(engine)
        self.engine = engine
        self.sp = from_deepspeed()  # accelerate's ParallelismConfig(sp_backend="deepspeed", sp_size=N)
        self.zero3 = engine.zero_optimization_stage() == 3
        if self.zero3:
            self.forward = lambda kwargs: engine(chunk_inputs=kwargs)[0]
            self.backward_fn = lambda scalar, is_last: chunk_backward(engine, scalar)
        else:
            self.backward_fn = LocalGrads(engine.module.parameters())

    def modes(self):
        return chunk_modes(self.engine.module)

    def schedule(self, scheduler, model, ids, labels, mask, positions) -> tuple:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        sp = scheduler.sp
        if sp is not None or self.zero3:  # what a memory budget plans for
            stage, size = self.engine.zero_optimization_stage(), 1 if sp is None else sp.size
            scheduler.partitioning = {"zero_stage": stage, "world_size": world, "sequence_parallel": size}
        if not self.zero3:
            if sp is not None and scheduler.config.memory_budget_gb is not None:  # one pick for the group
                agreed_pick(scheduler, model, ids, mask, all_reduce)
            return super().schedule(scheduler, model, ids, labels, mask, positions)
        if positions is not None:
            check_packed_together(model, ids, positions)
        ids, labels, mask, positions = common_length(ids, labels, mask, positions, all_reduce)
        return ids, labels, mask, positions, joint_schedule(scheduler, model, ids, labels, mask, all_reduce)

    def end_step(self) -> None:
        boundary_backward(self.engine, None if self.zero3 else self.backward_fn.take())
        self.engine.step()  # the Trainer's optimizer.step() / lr_scheduler.step() are no-ops under DeepSpeed


def _driver_for(model: nn.Module, accelerator) -> _Plain:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _DeepSpeed(accelerator, model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return _DataParallel(accelerator, model)
    if accelerator.num_processes > 1:
        raise ChunkwiseTrainerError(f"distributed type {accelerator.distributed_type} is not supported by ds_chunk")
    return _Plain(accelerator)


# ---- the classes ---------------------------------------------------------------------------

_MADE: dict[type, type] = {}


def with_chunkwise(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` (``transformers.Trainer`` or a subclass keeping
    ``training_step``'s contract, e.g. ``trl.SFTTrainer``) whose training step is chunk-wise;
    it takes one more keyword, ``chunkwise=`` (a dict or ChunkwiseConfig)."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise TypeError(f"with_chunkwise needs a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, _ChunkwiseMixin):
        return trainer_cls
    if trainer_cls not in _MADE:
        name = f"Chunkwise{trainer_cls.__name__}"
        doc = f"{trainer_cls.__name__} with a chunk-wise (SeCO / SpaCO) training step; see ds_chunk.hf."
        _MADE[trainer_cls] = type(name, (_ChunkwiseMixin, trainer_cls), {"__doc__": doc, "__module__": __name__})
    return _MADE[trainer_cls]


ChunkwiseTrainer = with_chunkwise(transformers.Trainer)
