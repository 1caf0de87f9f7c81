"""KV leaves of one batch and the cache object handed to the model for one chunk.

Notation: chunk i holds tokens [s_i, e_i); m_i = per layer (K, V) of chunk i after RoPE,
before GQA repeat, each [batch, kv_heads, e_i - s_i, head_dim].

The no-grad pass stores m_i as detached leaves. During the replay of chunk i the
cache returns cat(m_0..m_{i-1}, fresh m_i) per layer; autograd then adds into the
leaves' ``.grad`` and the fresh m_i is kept so the gradient already collected on leaf
m_i can be injected (see ``scheduler.py``). That cat is the only copy of the prefix,
and attention needs it anyway.

With ``storage`` set (kv_offload) the leaves and their grads live on that device
(host memory, counted in ``memory``); a layer's prefix is copied to the compute device
only when that layer's attention runs (``offload.PrefixFetcher``), and its gradient
flows back through the copy into the host leaves.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ds_chunk.offload import HostMemory, PrefixFetcher, side_stream, to_host


class KVStore:
    """keys[layer][chunk], values[layer][chunk]: the leaves m_chunk of every layer."""

    def __init__(self, num_layers: int, storage: torch.device | None = None, sp=None):
        self.sp = sp  # sequence parallel: each rank stores its heads of every chunk (see ChunkCache.update)
        self.keys: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.storage = storage
        self.memory = HostMemory()
        self.lengths: list[int] = []  # tokens per stored chunk
        self.copies = 0  # layer prefixes fetched from storage (kv_offload)
        # kv_offload: (leaf, host gradient, event or None) sent back by the fetched copies'
        # backward, added into the leaves' .grad when read (flush)
        self.pending: list[tuple] = []
        self.stream = None  # CUDA: the side stream of the prefetches and of the gradients' way back

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        k, v = k.detach(), v.detach()
        if self.storage is not None:  # tracked as stored: a detach() would be a new object
            k, v = self.memory.track(to_host(k, self.storage)), self.memory.track(to_host(v, self.storage))
        self.keys[layer].append(k)
        self.values[layer].append(v)
        if layer == 0:
            self.lengths.append(k.shape[-2])

    def prefix_len(self, chunk: int) -> int:
        return sum(self.lengths[:chunk])

    def fetcher(self, chunk: int, device: torch.device) -> PrefixFetcher:
        """The layer-by-layer fetcher of chunk's prefix from storage to ``device`` (kv_offload)."""
        if device.type == "cuda":
            self.stream = side_stream(device)
        return PrefixFetcher(self, chunk, self.stream)

    def prefix(self, layer: int, chunk: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """m_0..m_{chunk-1} of ``layer``, where they are stored."""
        return self.keys[layer][:chunk], self.values[layer][:chunk]

    def require_grad(self, chunks: list[int]) -> None:
        """Make the leaves of ``chunks`` collect gradient from later chunks' replays."""
        for layer in range(self.num_layers):
            for c in chunks:
                for leaf in (self.keys[layer][c], self.values[layer][c]):
                    leaf.requires_grad_(True)  # kv_offload: their gradient comes back through flush

    def live_leaves(self) -> list[torch.Tensor]:
        """The leaves that collect gradient and are not freed yet (the replays' prefix)."""
        return [
            t for kv in (self.keys, self.values) for layer in kv for t in layer if t is not None and t.requires_grad
        ]

    def accumulate(self, leaf: torch.Tensor, grad: torch.Tensor) -> None:
        """Add ``grad`` into ``leaf.grad`` as autograd would (``torch.autograd.grad`` callers, and
        the gradients kv_offload's copies send back)."""
        if leaf.grad is None:
            leaf.grad = grad
            if self.storage is not None:  # host memory a leaf's gradient takes, counted once
                self.memory.track(grad)
        else:
            leaf.grad.add_(grad)

    def flush(self) -> None:
        """Add the gradients the fetched copies sent back (kv_offload) into their leaves, in the
        order they came, each once its copy is done."""
        for leaf, grad, event in self.pending:
            if event is not None:
                event.synchronize()
            self.accumulate(leaf, grad)
        self.pending.clear()

    def grad_norm(self, chunk: int) -> float:
        """The norm of the gradient collected so far on m_chunk, all layers' K and V (0: none)."""
        self.flush()
        if chunk >= len(self.lengths):
            return 0.0
        squares = [t.grad.double().square().sum() for kv in (self.keys, self.values) for layer in kv
                   if (t := layer[chunk]) is not None and t.grad is not None]  # fmt: skip
        return math.sqrt(float(sum(squares))) if squares else 0.0

    def pop_grads(self, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The gradient collected on m_chunk, per layer (None if none arrived); frees m_chunk.

        Called when chunk is replayed: every later chunk has already been replayed, so
        the gradient is complete, and no earlier chunk reads m_chunk.
        """
        self.flush()
        grads = []
        if chunk >= len(self.lengths):  # never stored: the last replayed chunk
            return [None] * self.num_layers
        for layer in range(self.num_layers):
            k, v = self.keys[layer][chunk], self.values[layer][chunk]
            grads.append(None if k is None or k.grad is None else (k.grad, v.grad))
            self.keys[layer][chunk] = self.values[layer][chunk] = None
        return grads


class ChunkCache(Cache):
    """A transformers ``Cache`` for one forward of chunk ``chunk``, backed by a KVStore.

    record=True (the no-grad pass): new K/V are stored as the chunk's leaves.
    record=False (the replay): new K/V are kept in ``fresh`` (overwritten if
    gradient checkpointing recomputes the layer, which is harmless: ``update`` is a
    pure function of the store, so the recompute reads the same prefix).
    """

    def __init__(self, store: KVStore, chunk: int, record: bool):
        super().__init__(layers=[DynamicLayer() for _ in range(store.num_layers)])
        self.store, self.chunk, self.record = store, chunk, record
        self.past = store.prefix_len(chunk)
        self.fresh: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fetcher: PrefixFetcher | None = None  # kv_offload: made at the first layer, kept for the recompute

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """cat(m_0..m_{chunk-1}, new K/V) of this layer, on the new K/V's device."""
        kind = key_states.device.type
        if torch.is_autocast_enabled(kind):
            # attention reads K/V in autocast's dtype anyway; fp32 ones (fp32 norms and RoPE
            # under autocast) would take twice the memory in the cache, its gradient, and the cat
            dtype = torch.get_autocast_dtype(kind)
            key_states, value_states = key_states.to(dtype), value_states.to(dtype)
        if self.store.sp is not None:  # this rank's slice, all heads -> the whole chunk, this rank's heads
            key_states, value_states = self.store.sp.to_heads(key_states), self.store.sp.to_heads(value_states)
        if self.record:
            self.store.put(layer_idx, key_states, value_states)
        else:
            self.fresh[layer_idx] = (key_states, value_states)
        if self.chunk == 0:
            return key_states, value_states
        if self.store.storage is None:
            ks, vs = self.store.prefix(layer_idx, self.chunk)
        else:
            self.fetcher = self.fetcher or self.store.fetcher(self.chunk, key_states.device)
            ks, vs = self.fetcher.fetch(layer_idx, key_states.device)
        return torch.cat([*ks, key_states], dim=-2), torch.cat([*vs, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.past + query_length, 0
