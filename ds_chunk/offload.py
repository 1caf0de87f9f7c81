"""Host memory for ``kv_offload``: what lives there, how it moves, how much it holds.

With kv_offload the device keeps the parameters, their grads and one layer's working
set; what grows with the sequence lives in host memory:
- the KV leaves and their gradients (``KVStore`` with host ``storage``); a layer's prefix
  is fetched when its attention runs, and the next layer's is copied meanwhile
  (``PrefixFetcher``);
- what autograd saves during a chunk's replay (``SaveOnHost``), among it the joined
  prefix K/V that attention keeps for backward; each tensor comes back when backward
  needs it. Not what bypasses autograd's saved-tensor hooks: layers under gradient
  checkpointing (their own hooks win; they keep only their inputs), bitsandbytes 8-bit
  matmuls (their input stays in ``ctx``).
``HostMemory`` counts those bytes, so a run can report host memory beside device memory.

On a CPU "device" every copy is still made (a clone), so the tests run this path and
the counts mean what they mean on a GPU.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn


class HostMemory:
    """Bytes of the tensors ds_chunk holds in host memory: live now, and the peak.

    Tensor bytes: torch's pinned-memory allocator rounds blocks up to a power of two and
    caches freed ones, so the page-locked footprint can be larger (the process RSS shows it).
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._lock = threading.Lock()  # CUDA backward frees saved tensors on autograd's device thread

    def track(self, t: torch.Tensor) -> torch.Tensor:
        """Count ``t`` until it is freed; returns it."""
        n = t.nbytes
        with self._lock:
            self.live += n
            self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        with self._lock:
            self.live -= n


def to_host(t: torch.Tensor, host: torch.device) -> torch.Tensor:
    """A detached host copy of ``t``: pinned and asynchronous from CUDA, so it is ordered
    on the current stream before any later host-to-device copy of it; a clone on CPU."""
    t = t.detach()
    if t.device == host:
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, device=host, pin_memory=t.is_cuda)
    return out.copy_(t, non_blocking=t.is_cuda)


def _span_to_host(t: torch.Tensor, host: torch.device) -> tuple[torch.Tensor, tuple | None]:
    """A host copy of the storage span ``t`` reads, and the (shape, stride) to view it again.

    A saved view keeps its layout: an expanded tensor (a mask broadcast over the heads,
    stride 0) is not materialised, and a kernel that saved a padded, sliced tensor gets its
    aligned row stride back. Contiguous tensors, and views that read under half of their
    span, are copied as they are (geometry None).
    """
    if t.is_contiguous() or t.numel() == 0:
        return to_host(t, host), None
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if span > 2 * t.numel():
        return to_host(t, host), None
    flat = t.as_strided((span,), (1,))  # from t's storage offset
    return to_host(flat, host), (tuple(t.shape), tuple(t.stride()))


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse or wrapper tensors have no plain storage
        return None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host tensor ``t`` on ``device``, differentiable back into ``t``."""
    return t.clone() if t.device == device else t.to(device, non_blocking=True)


class SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu`` for a chunk's replay, with three differences.

    Tensors that share storage with the model's parameters or buffers are kept as they
    are: ``save_on_cpu`` would copy every saved weight (the LM head, the norms) out to the
    host on every replay, moving the model once per chunk for nothing. A tensor saved by
    several ops (a norm's output read by q, k and v; log-softmax's output, saved by it and
    by the NLL loss) is copied once while it is unchanged. And the bytes kept on the host
    are counted in ``memory``.
    """

    def __init__(self, model: nn.Module, host: torch.device, memory: HostMemory):
        tensors = [*model.parameters(), *model.buffers()]
        weights = {_storage_ptr(t) for t in tensors if t.device.type != "meta"}
        copies: dict[int, tuple] = {}  # id(t) -> (weakref to t, its version, weakref to host copy, geometry)

        def pack(t: torch.Tensor):
            ptr = _storage_ptr(t)
            if ptr is None or ptr in weights:
                return t
            known = copies.get(id(t))
            if known is not None and known[0]() is t and known[1] == t._version and known[2]() is not None:
                return t.device, known[2](), known[3]  # the same tensor, unchanged since it was copied
            saved, geometry = _span_to_host(t, host)
            key = id(t)
            forget = lambda ref: copies.get(key, (None,))[0] is ref and copies.pop(key)  # noqa: E731
            copies[key] = (weakref.ref(t, forget), t._version, weakref.ref(memory.track(saved)), geometry)
            return t.device, saved, geometry

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, saved, geometry = packed
            out = saved.to(device, non_blocking=True)
            return out if geometry is None else out.as_strided(*geometry)

        super().__init__(pack, unpack)


class PrefixFetcher:
    """Brings one chunk's prefix m_0..m_{c-1} of each layer from host memory to the device.

    When layer l's attention asks for its prefix, the copy of layer l+1's is started: on
    CUDA on a side stream, so it overlaps layer l's attention and MLP; on a CPU device it
    is a clone made one layer early. A layer asked out of order (gradient checkpointing
    recomputes layers in backward, last first) is copied on the spot, with no prefetch.
    Peak device cost, at layer l's cat: its prefix pieces, their cat, layer l+1's pieces.
    """

    def __init__(self, store, chunk: int, stream):
        self.store, self.chunk, self.stream = store, chunk, stream  # store: a kv.KVStore
        self.next = 0  # the layer a forward in order asks for next
        self.ahead: tuple[int, list[torch.Tensor], list[torch.Tensor]] | None = None

    def fetch(self, layer: int, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == layer:
            ks, vs = self._ready(ahead[1], ahead[2])
        else:
            ks, vs = self._copy(layer, device, stream=None)
        if layer == self.next:
            self.next = layer + 1
            if self.next < self.store.num_layers:
                self.ahead = (self.next, *self._copy(self.next, device, self.stream))
        return ks, vs

    def _copy(self, layer: int, device: torch.device, stream) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.store.copies += 1
        ks, vs = self.store.prefix(layer, self.chunk)
        if stream is None:
            return [to_device(t, device) for t in ks], [to_device(t, device) for t in vs]
        # the host leaves were written by copies queued on the compute stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # autograd runs these copies' backward on it too
            return [to_device(t, device) for t in ks], [to_device(t, device) for t in vs]

    def _ready(self, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[list, list]:
        """Prefetched tensors, made safe to use on the compute stream."""
        if self.stream is not None:
            current = torch.cuda.current_stream(ks[0].device)
            current.wait_stream(self.stream)
            for t in ks + vs:
                t.record_stream(current)  # freed by the compute stream, not the side one
        return ks, vs
