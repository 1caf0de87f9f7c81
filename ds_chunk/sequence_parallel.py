"""Ulysses sequence parallelism for chunk-wise training: one sequence across N ranks.

Each chunk [s, e) is split into N equal slices; rank r runs slice r through everything but
attention. In each attention layer one all-to-all swaps sequence sharding for head sharding
(DeepSpeed's Ulysses, ALST): the rank then holds the whole chunk's K/V and queries of its
1/N of the heads, attends over cat(prefix, chunk) for those heads, and a second all-to-all
gives its slice back all heads. The K/V cache (``kv.ChunkCache``) stores the head shard of
every chunk, so the cache, its gradient and the attention work divide by N, and the
gradient carried into a chunk's K/V never leaves its rank.

Every rank of a group runs the same chunk forwards and backwards (each holds a collective):
they see the same rows, so the same chunks carry a loss and the same SpaCO draw is made.
Each rank's loss is its slices' share of the sequence's loss; the sum of the ranks'
gradients is the gradient of the whole sequence, which DeepSpeed's data-parallel reduction
over every rank already takes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

SETTING = "sequence_parallel_size"


@dataclass(frozen=True)
class SequenceParallel:
    """The ranks one sequence is split over: ``size`` of them, this one ``rank`` among them."""

    size: int
    rank: int
    group: object = None  # torch.distributed ProcessGroup

    def slice(self, s: int, e: int) -> tuple[int, int]:
        """The tokens of chunk [s, e) this rank runs (e - s is a multiple of size)."""
        n = (e - s) // self.size
        return s + self.rank * n, s + (self.rank + 1) * n

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, heads, C/N, d] (this rank's slice, all heads) -> [B, heads/N, C, d] (the whole chunk)."""
        return _Swap.apply(x, self, _heads, _sequence)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, heads/N, C, d] -> [B, heads, C/N, d]: the inverse of ``to_heads``."""
        return _Swap.apply(x, self, _sequence, _heads)


def groups(size: int) -> SequenceParallel | None:
    """This rank's group of ``size`` consecutive ranks (one group per data-parallel rank, as
    DeepSpeed's ``parallel_state_sp`` lays them out); None for size 1. Every rank calls this."""
    if size == 1:
        return None
    if not dist.is_initialized():
        raise ValueError(f"{SETTING} = {size} needs torch.distributed (a launcher with {size} or more ranks)")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % size:
        raise ValueError(f"{SETTING} = {size} does not divide the {world} ranks (data parallel x sequence parallel)")
    mine = None
    for g in range(world // size):  # new_group is collective: every rank makes every group
        ranks = list(range(g * size, (g + 1) * size))
        made = dist.new_group(ranks)
        if rank in ranks:
            mine = made
    return SequenceParallel(size, rank % size, mine)


def _all_to_all(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Piece j of dim 0 to rank j, piece j of the result from rank j. x: [N, ...]."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous too: all_to_all_single writes the pieces in storage order
    dist.all_to_all_single(out, x, group=sp.group)
    return out


def _heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    b, h, n, d = x.shape
    pieces = x.reshape(b, sp.size, h // sp.size, n, d).transpose(0, 1)  # [N, B, heads/N, C/N, d]
    got = _all_to_all(pieces, sp)  # got[j]: rank j's slice of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * n, d)


def _sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    b, h, c, d = x.shape
    pieces = x.reshape(b, h, sp.size, c // sp.size, d).permute(2, 0, 1, 3, 4)  # [N, B, heads/N, C/N, d]
    got = _all_to_all(pieces, sp)  # got[j]: rank j's heads of my slice
    return got.transpose(0, 1).reshape(b, sp.size * h, c // sp.size, d)


class _Swap(torch.autograd.Function):
    """An all-to-all (``there``) whose backward is its inverse (``back``)."""

    @staticmethod
    def forward(ctx, x, sp, there, back):
        ctx.sp, ctx.back = sp, back
        return there(x, sp)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad, ctx.sp), None, None, None


def pad_to_multiple(ids, labels, mask, pos, size: int) -> tuple:
    """Rows right-padded (label -100) to a multiple of ``size`` tokens, so each chunk splits into
    equal slices; exact, as causal attention never lets a real token see the padding after it."""
    from ds_chunk.chunking import pad_right

    return pad_right(ids, labels, mask, pos, -ids.shape[-1] % size)


def check_sequence_parallel(model, sp: SequenceParallel, config, router: bool) -> None:
    """Refuse what Ulysses cannot split here, naming the setting: heads not divisible by the
    group, attention that is not plain causal, a chunk that does not split into equal slices,
    the per-rank choices (the gradient sampler) and the MoE router's loss (counts over ranks)."""
    from ds_chunk.adapter import text_config
    from ds_chunk.attention import plain_causal

    cfg, n, name = text_config(model), sp.size, type(model).__name__
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    decoder = model.get_decoder()
    refusals = [
        (heads % n or kv_heads % n, f"{name} has {heads} attention heads and {kv_heads} key/value heads; Ulysses "
                                    f"gives each rank 1/{n} of both, so both must be multiples of {n}"),
        (not plain_causal(cfg), f"{name} has sliding-window, softcapped or sink attention, which the "
                                "sequence-parallel attention does not compute"),
        (not getattr(type(decoder), "_supports_attention_backend", False),
         f"{type(decoder).__name__} does not dispatch attention through transformers' attention interface, "
         "where the sequence-parallel attention plugs in"),
        (config.enabled and config.chunk_size % n, f"chunkwise.chunk_size = {config.chunk_size} is not a multiple "
                                                   "of it: each chunk splits into equal slices"),
        (config.sparse is not None and config.sparse.sampler == "gradient",
         'chunkwise.sparse.sampler = "gradient" decides per rank from its share of the K/V gradient; use '
         '"bernoulli" (one draw for the whole group)'),
        (router, f"{name}'s router load-balancing loss counts routing over the whole sequence (not split "
                 "over ranks here); set output_router_logits = False"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise ValueError(f"{SETTING} = {n}: {why}")


def same_rows(sp: SequenceParallel, *tensors: torch.Tensor | None) -> None:
    """Refuse a group whose ranks were handed different rows (each would train on slices of
    sequences the others never run): one small all-reduce of a checksum of ``tensors``
    (input_ids, labels, ...; None counts as empty)."""
    device, sums = tensors[0].device, []
    for t in tensors:
        t = torch.zeros(0, device=device) if t is None else t
        index = torch.arange(1, t.numel() + 1, device=device, dtype=torch.float64)
        sums += [torch.tensor(float(t.numel()), device=device), (t.double().flatten() * index).sum()]
    mine = torch.stack(sums)
    both = torch.cat([mine, -mine])  # one MAX all-reduce gives the group's largest and smallest
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=sp.group)
    if not torch.equal(both[: len(mine)], -both[len(mine) :]):
        raise ValueError(
            f"{SETTING} = {sp.size}: the ranks of a sequence-parallel group got different rows; give every rank of "
            "a group the same batch (shard the data by engine.data_parallel(), not by the process rank)"
        )


# ---- under HF Trainer / TRL: accelerate's ParallelismConfig(sp_backend="deepspeed", sp_size=N) ----


def from_deepspeed() -> SequenceParallel | None:
    """The group DeepSpeed's Ulysses set up (accelerate passes its ``mpu`` to the engine);
    None where there is none."""
    from deepspeed.utils import groups

    size = groups._get_sequence_parallel_world_size()
    if size == 1:
        return None
    return SequenceParallel(size, groups._get_sequence_parallel_rank(), groups._get_sequence_parallel_group())


def gather_rows(inputs: dict, sp: SequenceParallel) -> dict:
    """The whole rows back from the contiguous shards that DeepSpeed's ``UlyssesSPDataLoaderAdapter``
    hands each rank of the group (one all-gather per key): chunk-wise training splits every chunk,
    not the sequence once. Its ``shift_labels`` (labels[t + 1]) become labels again."""
    rows = {}
    for key in ("input_ids", "shift_labels", "labels", "attention_mask", "position_ids"):
        if inputs.get(key) is None:
            continue
        shard = inputs[key].contiguous()
        pieces = [torch.empty_like(shard) for _ in range(sp.size)]
        dist.all_gather(pieces, shard, group=sp.group)
        rows[key] = torch.cat(pieces, dim=-1)
    if "shift_labels" in rows:  # labels[:, 0] predicts nothing (no token before it)
        shifted = rows.pop("shift_labels")
        rows["labels"] = torch.nn.functional.pad(shifted[..., :-1], (1, 0), value=-100)
    return rows


def group_sum(value: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """``value`` summed over the group (each rank's loss is its slices' share)."""
    value = value.clone()
    dist.all_reduce(value, group=sp.group)
    return value


def sp_zero3_scale(sp: SequenceParallel | None, zero3: bool) -> int:
    """What the parent's loss is multiplied by under ZeRO-3: before deepspeed 0.20.2 ZeRO-3 averages
    gradients over the whole world, not only its data-parallel ranks (deepspeedai/DeepSpeed#8854),
    and transformers' ``deepspeed_sp_compute_loss`` makes up for it by the group's size."""
    if sp is None or not zero3:
        return 1
    return sp.size if _zero3_averages_over_world() else 1


@functools.cache
def _zero3_averages_over_world() -> bool:
    """deepspeed < 0.20.2 (read once: the installed version does not change in a run)."""
    import importlib.metadata

    from packaging.version import Version

    return Version(importlib.metadata.version("deepspeed")) < Version("0.20.2")
