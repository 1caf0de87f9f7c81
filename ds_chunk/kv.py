"""KV leaves of one batch and the cache object handed to the model for one chunk.

Notation: chunk i holds tokens [s_i, e_i); m_i = per layer (K, V) of chunk i after RoPE,
before GQA repeat, each [batch, kv_heads, e_i - s_i, head_dim].

The no-grad pass stores m_i as detached leaves. During the replay of chunk i the
cache returns cat(m_0..m_{i-1}, fresh m_i) per layer; autograd then adds into the
leaves' ``.grad`` and the fresh m_i is kept so the gradient already collected on leaf
m_i can be injected (see ``scheduler.py``). That cat is the only copy of the prefix,
and attention needs it anyway.

With ``storage`` set (kv_offload) the leaves and their grads live on that device
(host memory); a layer's prefix is copied to the compute device only when that
layer's attention runs, and its gradient flows back through the copy into the host
leaves.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class KVStore:
    """keys[layer][chunk], values[layer][chunk]: the leaves m_chunk of every layer."""

    def __init__(self, num_layers: int, storage: torch.device | None = None):
        self.keys: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.values: list[list[torch.Tensor | None]] = [[] for _ in range(num_layers)]
        self.storage = storage
        self.lengths: list[int] = []  # tokens per stored chunk

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def put(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.storage is not None:
            k, v = self._to_storage(k), self._to_storage(v)
        self.keys[layer].append(k.detach())
        self.values[layer].append(v.detach())
        if layer == 0:
            self.lengths.append(k.shape[-2])

    def _to_storage(self, t: torch.Tensor) -> torch.Tensor:
        if t.device == self.storage:
            return t.clone()  # the copy a real device would make, so the CPU tests run this path
        # pinned host memory: the device-to-host copy runs asynchronously, and later
        # host-to-device fetches on the same stream are ordered after it
        host = torch.empty(t.shape, dtype=t.dtype, device=self.storage, pin_memory=t.is_cuda)
        return host.copy_(t, non_blocking=t.is_cuda)

    def prefix_len(self, chunk: int) -> int:
        return sum(self.lengths[:chunk])

    def joined(self, layer: int, chunk: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cat(m_0..m_{chunk-1}, (k, v)) on k's device, for layer ``layer``."""
        if chunk == 0:
            return k, v
        ks, vs = self.keys[layer][:chunk], self.values[layer][:chunk]
        if self.storage is not None and self.storage != k.device:
            ks = [t.to(k.device, non_blocking=True) for t in ks]
            vs = [t.to(v.device, non_blocking=True) for t in vs]
        return torch.cat([*ks, k], dim=-2), torch.cat([*vs, v], dim=-2)

    def require_grad(self, chunks: list[int]) -> None:
        """Make the leaves of ``chunks`` collect gradient from later chunks' replays."""
        for layer in range(self.num_layers):
            for c in chunks:
                self.keys[layer][c].requires_grad_(True)
                self.values[layer][c].requires_grad_(True)

    def pop_grads(self, chunk: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """The gradient collected on m_chunk, per layer (None if none arrived); frees m_chunk.

        Called when chunk is replayed: every later chunk has already been replayed, so
        the gradient is complete, and no earlier chunk reads m_chunk.
        """
        grads = []
        if chunk >= len(self.lengths):  # never stored: the last replayed chunk
            return [None] * self.num_layers
        for layer in range(self.num_layers):
            k, v = self.keys[layer][chunk], self.values[layer][chunk]
            grads.append(None if k is None or k.grad is None else (k.grad, v.grad))
            self.keys[layer][chunk] = self.values[layer][chunk] = None
        return grads

    def nbytes(self) -> int:
        """Bytes held by the leaves and their grads (for reporting)."""
        total = 0
        for t in (t for per_layer in self.keys + self.values for t in per_layer if t is not None):
            total += t.nbytes + (t.grad.nbytes if t.grad is not None else 0)
        return total


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

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.record:
            self.store.put(layer_idx, key_states, value_states)
        else:
            self.fresh[layer_idx] = (key_states, value_states)
        return self.store.joined(layer_idx, self.chunk, key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.past + query_length, 0
