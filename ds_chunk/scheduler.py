"""SeCO / SpaCO: the chunk scheduler between a model's forward and its backward.

Pass 1 (no autograd) runs chunks in order and stores their K/V as leaves; no LM head
unless a loss is wanted for a chunk that will not be replayed. Pass 2 replays the
chunks in reverse with autograd; chunk i's scalar

    w_i * (L_i + sum_layers <m_i_fresh, grad collected on leaf m_i>)

backpropagates chunk i's own loss and the gradient later chunks sent into m_i, and adds
into the parameters' .grad and the leaves m_0..m_{i-1}. With w_i = 1 for every chunk
this is exactly full backprop (SeCO); SpaCO replays a sample with w_i = 1/pi_i.

``keep_chunks`` k: the last supervised chunk and the k before it are one chunk, run once,
with autograd, first in pass 2: no no-grad forward and no leaves for them, their activations
held at once instead (``chunking.join_kept``). ``memory_budget_gb`` picks k, the chunk size
and the LM-head sub-chunk per batch shape (``budget``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ds_chunk import loss_kernels
from ds_chunk.adapter import (
    cache_kwarg,
    cache_under_checkpointing,
    check_supported,
    full_length_rope,
    lm_head,
    max_positions,
    text_config,
    unwrap,
    uses_rope,
)
from ds_chunk.attention import chunk_attention
from ds_chunk.bnb import no_cpu_inference_packing
from ds_chunk.chunking import IGNORE_INDEX, check_inputs, chunk_bounds, join_kept, prepare_labels
from ds_chunk.config import ChunkwiseConfig
from ds_chunk.documents import Layout, MaskKind, check_packed
from ds_chunk.kv import ChunkCache, KVStore
from ds_chunk.loss import TokenStats, auto_sub_chunk, chunk_loss
from ds_chunk.offload import SaveOnHost, side_stream
from ds_chunk.rng import RngTape
from ds_chunk.router import RouterLoss
from ds_chunk.sampling import ChunkSampler, FixedDraw, GradientDraw
from ds_chunk.sequence_parallel import SequenceParallel, check_sequence_parallel, pad_to_multiple

BackwardFn = Callable[[torch.Tensor, bool], None]
"""backward_fn(scalar, is_last): backpropagate ``scalar``; ``is_last`` marks the last
backward of the step (DeepSpeed's gradient-accumulation boundary). A ``LocalGrads`` in its
place collects the gradients in a buffer instead (see there)."""

ForwardFn = Callable[[dict], torch.Tensor]
"""forward_fn(decoder_kwargs) -> final hidden states [B, C, H] of one chunk."""


def autograd_backward(scalar: torch.Tensor, is_last: bool) -> None:
    scalar.backward()


@dataclass
class ChunkResult:
    """What one ``ChunkScheduler.backward`` did.

    loss: full-sequence mean CE over supervised tokens (HF convention), detached. SpaCO:
        what ``sparse.report_loss`` asks for (``loss_kind``): "exact", "estimate" (the
        weighted sum of the replayed chunks' losses, unbiased) or "off" (NaN).
    num_tokens: the normaliser (supervised tokens) the chunk losses were divided by.
    replayed: chunks replayed with autograd, ascending; weights: chunk -> 1/pi.
    inclusion: SpaCO, chunk -> pi_c for the chunks the draw decided (the gradient sampler
        decides as the replay goes; chunks after the last supervised one, and without a loss
        when truncating, are never decided).
    aux_loss: an MoE model's router load-balancing loss (its ``aux_loss``, before the
        coefficient; ``loss`` includes coef * aux_weight * aux_loss), None without one.
    kept: chunks joined to the last supervised one and run once with it (``keep_chunks``,
        fewer where the sequence has fewer chunks before it).
    host_peak_bytes: with kv_offload, the most host memory the call held at once (KV
        leaves, their gradients, saved tensors); 0 without.
    """

    loss: torch.Tensor
    num_tokens: int
    num_chunks: int
    replayed: list[int] = field(default_factory=list)
    weights: dict[int, float] = field(default_factory=dict)
    host_peak_bytes: int = 0
    loss_kind: str = "exact"
    inclusion: dict[int, float] = field(default_factory=dict)
    token_stats: TokenStats | None = None
    aux_loss: float | None = None
    kept: int = 0


class ChunkScheduler:
    """Chunk-wise backward for HF decoder-only models (SeCO, and SpaCO when configured)."""

    def __init__(
        self,
        config: ChunkwiseConfig | dict | None = None,
        backward_fn: BackwardFn | None = None,
        sequence_parallel: SequenceParallel | None = None,
    ):
        """sequence_parallel: the ranks each sequence is split over (``sequence_parallel.groups``);
        every rank of the group calls ``backward`` with the same rows."""
        if not isinstance(config, ChunkwiseConfig):
            config = ChunkwiseConfig.from_dict(config if config is not None else {})
        self.config = config
        self.backward_fn = backward_fn or autograd_backward
        self.sampler = ChunkSampler(config.sparse) if config.sparse is not None and config.enabled else None
        self.calls = 0  # default SpaCO step index; part of the state for exact resume
        self.picks: dict[tuple, ChunkwiseConfig] = {}  # memory_budget_gb: plan_key -> settings
        self.partitioning: dict = {}  # zero_stage, world_size of an engine: what the planner counts per rank
        self.sp = sequence_parallel

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def backward(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        num_tokens: float | None = None,
        boundary: bool = True,
        sampled: list[int] | None = None,
        step: int | None = None,
        rank: int = 0,
        backward_fn: BackwardFn | None = None,
        forward_fn: ForwardFn | None = None,
        has_loss: list[bool] | None = None,
        position_ids: torch.Tensor | None = None,
        token_stats: bool = False,
        aux_weight: float = 1.0,
    ) -> ChunkResult:
        """Add d(loss)/d(param) to every trainable parameter's ``.grad``.

        loss is the mean CE over supervised tokens of ``labels`` (unshifted, -100
        ignored; None means ``input_ids`` with padding ignored), as
        ``model(input_ids, attention_mask=..., labels=labels).loss`` computes it.
        num_tokens: normaliser when several micro-batches form one step (default: this
        batch's supervised tokens). boundary: this batch ends the step, so its last
        backward is flagged ``is_last``. sampled/step/rank: SpaCO draw override, step
        index (default: call count) and data-parallel rank. forward_fn: runs the
        decoder for one chunk (default: the model's own decoder; an engine routes it
        through its forward so its backward hooks see the chunk). has_loss: whether each
        chunk holds a supervised token on any rank, for ranks that must run identical
        schedules (ZeRO-3 gathers parameters in every forward): the chunks replayed and
        the LM head calls then depend on it alone, not on this rank's labels.
        position_ids: [B, T] or [1, T], as the model takes them; where they restart inside a
        row (packed documents, e.g. TRL's padding-free batches) each document attends only to
        itself, as in transformers' full forward (``documents.Layout``). token_stats: also
        sum the supervised tokens' entropy and accuracy (``ChunkResult.token_stats``).
        An MoE model whose forward adds the router's load-balancing loss (``output_router_logits``
        and ``router_aux_loss_coef``) gets it here too, exactly (``ds_chunk.router``), times
        ``aux_weight``: every chunk then has a loss, and ``ChunkResult.aux_loss`` is its value.
        """
        hf = unwrap(model)
        check_supported(hf, input_ids.shape[-1])
        if self.sp is not None:  # every rank its slice of each chunk: the length a multiple of the ranks
            input_ids, labels, attention_mask, position_ids = pad_to_multiple(
                input_ids, labels, attention_mask, position_ids, self.sp.size
            )
        # a packed row may outgrow the trained length where positions only rotate (RoPE)
        rotary = position_ids is not None and uses_rope(hf)  # not on every call: a walk over all modules
        check_inputs(input_ids, attention_mask, max_positions(hf), position_ids if rotary else None)
        layout = Layout.of(input_ids, position_ids)
        check_packed(hf, layout.packed)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let attention take its fastest path
        target = prepare_labels(input_ids, labels, attention_mask)
        supervised = target != IGNORE_INDEX
        n = int(supervised.sum()) if num_tokens is None else num_tokens
        if n == 0:
            raise ValueError("no supervised token in the batch: every label is -100 (ignored)")
        config = self.settings(model, input_ids, attention_mask)
        router = RouterLoss.of(hf, aux_weight)
        if self.sp is not None:
            check_sequence_parallel(hf, self.sp, config, router is not None)
        bounds = chunk_bounds(input_ids.shape[1], config.chunk_size if config.enabled else input_ids.shape[1])
        identical = has_loss is not None
        if identical and len(has_loss) != len(bounds):
            raise ValueError(f"has_loss names {len(has_loss)} chunks, the batch has {len(bounds)}")
        if not identical:
            has_loss = [bool(supervised[:, s:e].any()) for s, e in bounds]
        if router is not None:  # the router's loss reads every token's routing
            has_loss = [True] * len(bounds)
        if identical and self.sampler is not None and self.sampler.config.sampler == "gradient":
            raise ValueError('chunkwise.sparse.sampler = "gradient" decides per rank, but these ranks must replay '
                             'identical chunks (ZeRO-3): use "bernoulli" with same_on_all_ranks')  # fmt: skip
        num_chunks, joined = len(bounds), config.keep_chunks if config.enabled else 0
        if joined:  # SeCO: the kept chunks run as one (config.checked refuses SpaCO / truncate)
            bounds, has_loss, first = join_kept(bounds, has_loss, joined)
            joined = num_chunks - len(bounds)
        draw = self._plan(has_loss, sampled, self.calls if step is None else step, rank)
        self.calls += 1

        kind = "exact" if self.sampler is None else self.sampler.config.report_loss
        stats = TokenStats() if token_stats and kind == "exact" else None
        run = _ChunkRun(hf, config, input_ids, target, attention_mask, bounds, n, forward_fn, identical,
                        layout=layout, stats=stats, router=router, sp=self.sp)  # fmt: skip
        with (
            no_cpu_inference_packing(hf),
            full_length_rope(hf, layout.longest),
            chunk_attention(hf, run.mask is not None, input_ids.device, layout.packed, self.sp) as run.fast,
        ):
            loss = run.forward_pass(draw, kind == "exact" and self.sampler is not None, has_loss)
            weights, replayed, weighted = run.replay(draw, backward_fn or self.backward_fn, boundary)
        if kind == "exact" and not draw.adaptive:
            loss = loss + replayed  # the no-grad pass ran the LM head on the other chunks only
        aux = None if router is None else router.value()
        if aux is not None:  # as the model's own loss: the cross-entropy + coef * aux
            loss = loss + router.weight * router.coef * aux
        loss = {"exact": loss, "estimate": weighted, "off": torch.tensor(float("nan"))}[kind]
        host = run.store.memory.peak
        stats = run.stats.total() if run.stats is not None and run.stats.complete else None
        if joined:  # the chunks as the user numbers them: the joined one stands for its originals
            weights = {o: w for c, w in weights.items() for o in _originals(c, first, joined)}
        return ChunkResult(loss.detach(), n, num_chunks, sorted(weights), weights, host, kind, draw.inclusion, stats,
                           aux, kept=joined)  # fmt: skip

    def settings(self, model: nn.Module, input_ids: torch.Tensor, attention_mask=None) -> ChunkwiseConfig:
        """The settings a batch runs with: the config's, or with ``memory_budget_gb`` the
        planner's pick for its shape and whether it is padded (``budget.pick_for``, once each)."""
        if self.config.memory_budget_gb is None or not self.config.enabled:
            return self.config
        key = self.plan_key(input_ids, attention_mask)
        if key not in self.picks:
            from ds_chunk.budget import pick_for

            self.picks[key] = pick_for(model, input_ids, self.config, key[1], **self.partitioning)
        return self.picks[key]

    @staticmethod
    def plan_key(input_ids: torch.Tensor, attention_mask) -> tuple:
        """(shape, padded): a padded batch runs masked attention, planned apart."""
        return tuple(input_ids.shape), attention_mask is not None and not bool(attention_mask.all())

    def _plan(self, has_loss: list[bool], sampled: list[int] | None, step: int, rank: int):
        """The draw: the chunks to replay and their weights (``sampling.FixedDraw``), or the
        gradient sampler's, decided during the replay (``sampling.GradientDraw``)."""
        k = len(has_loss)
        if self.sampler is None:
            if sampled is not None:
                raise ValueError("sampled= needs a chunkwise.sparse config (SpaCO)")
            weights, inclusion = dict.fromkeys(range(k), 1.0), {}
        elif self.sampler.config.sampler == "gradient":
            return GradientDraw(self.sampler, has_loss, sampled, step, rank, self.config.truncate)
        else:
            weights = self.sampler.weights(has_loss, sampled, step, rank)
            inclusion = dict(enumerate(self.sampler.probabilities(has_loss)))
        # A chunk contributes only through its own loss or through the gradient that a
        # later replayed chunk sends into its K/V; replaying any other adds exactly zero.
        keep: dict[int, float] = {}
        for c in sorted(weights, reverse=True):
            if has_loss[c] or (keep and not self.config.truncate):
                keep[c] = weights[c]
        return FixedDraw(dict(sorted(keep.items())), inclusion)


def _originals(c: int, first: int, joined: int) -> range:
    """The original chunks run chunk ``c`` stands for, ``joined`` of them joined into ``first``."""
    if c < first:
        return range(c, c + 1)
    return range(first, first + joined + 1) if c == first else range(c + joined, c + joined + 1)


class LocalGrads:
    """Chunk backwards into a buffer of this process instead of ``.grad``.

    ``torch.autograd.grad`` on the trainable parameters and the live K/V leaves: no
    gradient hook of an engine fires (DeepSpeed ZeRO-2 reduces in every backward that
    reaches a parameter), so the step's gradient can be handed to the engine in one
    boundary backward, one reduction per step whatever the chunk schedule of each rank.
    Costs a gradient-sized buffer (float32 for 16-bit parameters) per process.
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def add(self, scalar: torch.Tensor, store: KVStore) -> None:
        if scalar.grad_fn is None:  # nothing trainable reaches it (no parameter before a chunk without loss)
            return
        leaves = store.live_leaves()
        grads = torch.autograd.grad(scalar, self.params + leaves, allow_unused=True)
        for i, g in enumerate(grads[: len(self.params)]):
            if g is not None:
                dtype = torch.promote_types(g.dtype, torch.float32)
                self.buffers[i] = g.to(dtype) if self.buffers[i] is None else self.buffers[i].add_(g)
        for leaf, g in zip(leaves, grads[len(self.params) :]):
            if g is not None:
                store.accumulate(leaf, g)

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(parameter, its accumulated gradient or None) for every parameter; the buffers empty."""
        out, self.buffers = list(zip(self.params, self.buffers)), [None] * len(self.params)
        return out


class _CarriedGrad(torch.autograd.Function):
    """<x, g> for a fresh K or V ``x`` and the gradient ``g`` collected on its leaf, so
    backward hands ``x`` exactly ``g``. ``g`` is kept on ctx, not saved for backward: with
    kv_offload it stays in host memory (saved-tensor hooks would copy it there again) and
    reaches the device only when used."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.g = g
        return (x * g.to(x.device, non_blocking=True)).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.g.to(grad.device, non_blocking=True), None


class _ChunkRun:
    """The state of one scheduler call: the model's parts, the batch, the KV store."""

    def __init__(
        self, hf, config: ChunkwiseConfig, input_ids, target, attention_mask, bounds, normalizer, forward_fn, identical,
        *, layout: Layout, stats: TokenStats | None, router: RouterLoss | None = None,
        sp: SequenceParallel | None = None,
    ):  # fmt: skip
        self.model, self.decoder, self.lm_head = hf, hf.get_decoder(), lm_head(hf)
        self.sp = sp  # sequence parallel: this rank runs its slice of each chunk (SequenceParallel.slice)
        if sp is not None:  # right padding only (check_inputs): causal attention never reads the mask
            attention_mask = None
        self.forward_fn = forward_fn or (lambda kwargs: self.decoder(**kwargs)[0])
        self.cache_key = cache_kwarg(self.decoder)
        self.input_ids, self.target, self.mask = input_ids, target, attention_mask
        self.layout, self.stats = layout, stats  # where the tokens sit (packed rows); the token stats asked for
        self.router, self.router_logits = router, []  # the MoE load-balancing loss; the last forward's logits
        self.fast = False  # whether chunk_sdpa runs: set by the caller inside chunk_attention
        self.mask_kind = MaskKind.of(self.decoder)  # packed rows: the 4D masks it takes
        self.bounds, self.normalizer = bounds, normalizer
        self.sub_chunk, self.truncate = config.loss_chunk_size, config.truncate
        text = text_config(hf)
        if self.sub_chunk == "auto":
            self.sub_chunk = auto_sub_chunk(text.vocab_size, input_ids.shape[0])
        device = input_ids.device
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.lm_head.module.weight.dtype
        rows = input_ids.shape[0] * max(e - s for s, e in bounds)
        self.kernel = loss_kernels.pick(config.loss_kernel, self.lm_head, device, dtype, rows, self.sub_chunk)
        self.skip_unsupervised = not identical  # identical schedules: every rank calls the LM head alike
        storage = torch.device("cpu") if config.kv_offload else None
        self.store = KVStore(text.num_hidden_layers, storage, sp)
        self.rng = RngTape(input_ids.device)
        self.trainable = [p for p in hf.parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError(f"{type(hf).__name__} has no trainable parameter (requires_grad=False everywhere)")

    def tokens(self, c: int) -> tuple[int, int]:
        """The tokens of chunk c this rank runs: all of them, or its slice (sequence parallel)."""
        return self.bounds[c] if self.sp is None else self.sp.slice(*self.bounds[c])

    def hidden(self, c: int, record: bool) -> tuple[torch.Tensor, ChunkCache]:
        s, e = self.bounds[c]
        a, b = self.tokens(c)
        cache = ChunkCache(self.store, c, record)
        kwargs = {
            "input_ids": self.input_ids[:, a:b],
            **self.layout.inputs(s, e, self.mask, self.fast, self.mask_kind),  # attention sees the whole chunk
            "position_ids": self.layout.positions(a, b),
            "use_cache": True,
            self.cache_key: cache,
        }
        if self.router is None:
            return self.forward_fn(kwargs), cache  # [B, e - s, H]
        with self.router.record() as self.router_logits:
            hidden = self.forward_fn(kwargs)
        self.router.count(c, self.router_logits, None if self.mask is None else self.mask[:, s:e])
        return hidden, cache

    def loss(self, c: int, hidden: torch.Tensor, stats: TokenStats | None = None) -> torch.Tensor:
        a, b = self.tokens(c)
        args = (self.normalizer, self.sub_chunk, self.skip_unsupervised, self.kernel, stats)
        loss = chunk_loss(self.lm_head, hidden, self.target[:, a:b], *args)
        if self.sp is not None and loss.grad_fn is None and hidden.requires_grad:
            # no supervised token in this rank's slice: its backward must still run through the
            # decoder, whose all-to-alls wait for every rank of the group
            loss = loss + 0.0 * hidden.sum()
        return loss

    @torch.no_grad()
    def forward_pass(self, draw, want_loss: bool, has_loss: list[bool]) -> torch.Tensor:
        """Build the leaves m_c that the replays read (chunks before the last candidate).

        want_loss: also run the chunks that will not be replayed, up to the last one with
        a supervised token, and compute their loss, so the reported loss is the
        full-sequence loss (SpaCO; the gradient sampler decides during the replay, so all).
        """
        last = max(draw.candidates, default=0)
        stop = max(last, max((c + 1 for c, x in enumerate(has_loss) if x), default=0)) if want_loss else last
        if self.router is not None and len(self.bounds) - 1 not in draw.candidates:
            stop = len(self.bounds)  # the router's loss counts every chunk's routing before any replay
        loss = torch.zeros((), dtype=torch.float64)
        for c in range(stop):
            self.rng.record(c)
            h, _ = self.hidden(c, record=True)
            if want_loss and has_loss[c] and (draw.adaptive or c not in draw.weights):
                loss += self.loss(c, h, self.stats).double().cpu()
        self.rng.record(stop)  # what chunk `stop` sees, and the state we leave behind
        self.end = stop
        if not self.truncate:
            self.store.require_grad([c for c in draw.candidates if c != last])
        return loss

    def offload_saved(self):
        """With kv_offload, the tensors autograd saves during a replay (among them the
        joined prefix K/V that attention keeps) wait in host memory until backward."""
        if self.store.storage is None:
            return contextlib.nullcontext()
        device = self.input_ids.device
        stream = side_stream(device) if device.type == "cuda" else None
        return SaveOnHost(self.model, self.store.storage, self.store.memory, stream)

    def replay(self, draw, backward_fn: BackwardFn, boundary: bool) -> tuple:
        """Reverse replay with autograd of the chunks the draw picks; returns chunk -> weight
        of the replayed chunks, and their loss, unweighted and weighted (sum of w_i * L_i:
        SpaCO's unbiased estimate of the full loss)."""
        loss, weighted = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        weights: dict[int, float] = {}
        after = None  # the RNG after the last chunk's draws, as one forward would leave it
        local = isinstance(backward_fn, LocalGrads)
        with cache_under_checkpointing(self.decoder), self.offload_saved():
            for c in draw.candidates:
                w = draw.weight(c, self.store.grad_norm)
                carried = self.store.pop_grads(c)  # frees m_c: no earlier chunk reads it
                if w is None:  # not replayed: the gradient carried into m_c goes no further
                    if self.router is not None and c not in self.router.counted:
                        self.rng.replay(c)  # the gradient sampler skipped the last chunk: count its routing
                        with torch.no_grad():
                            self.hidden(c, record=False)
                    continue
                weights[c] = w
                self.rng.replay(c)
                h, cache = self.hidden(c, record=False)
                if c == self.end:
                    after = self.rng.snapshot()
                chunk = self.loss(c, h, None if draw.adaptive else self.stats)  # adaptive: counted in pass 1
                share = 0.0  # the router's load-balancing loss: every chunk is counted by now
                if self.router is not None:
                    s, e = self.bounds[c]
                    share = self.router.share(self.router_logits, None if self.mask is None else self.mask[:, s:e])
                inject = sum(
                    _CarriedGrad.apply(fk, g[0]) + _CarriedGrad.apply(fv, g[1])
                    for (fk, fv), g in ((cache.fresh[i], g) for i, g in enumerate(carried) if g is not None)
                )
                scalar = w * (chunk + share + inject)
                if local:
                    backward_fn.add(scalar, self.store)
                else:  # a fixed draw knows its last backward; the gradient sampler learns it too late
                    backward_fn(scalar, boundary and not draw.adaptive and c == draw.candidates[-1])
                loss += chunk.detach().double().cpu()
                weighted += w * (chunk + share).detach().double().cpu()
        if boundary and not local and (draw.adaptive or not weights):
            # The step still needs its boundary backward (an empty draw, or the gradient
            # sampler's) so an engine reduces gradients; this one adds exactly zero.
            backward_fn(sum(p.reshape(-1)[0] for p in self.trainable) * 0.0, True)
        if after is not None:
            self.rng.restore(after)
        else:  # the last chunk was not run: the state after the chunks that were
            self.rng.replay(self.end)
        return weights, loss, weighted
