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

import functools
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


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The process's one copy stream on CUDA ``device``. Not one per step: torch hands streams
    out round-robin from a pool of 32 and the caching allocator keeps freed blocks per
    stream, so each step's prefetch buffers would stay cached on another stream."""
    return _side_stream(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _side_stream(index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(torch.device("cuda", index))


def copy_to_host(t: torch.Tensor, host: torch.device, stream) -> tuple[torch.Tensor, object | None]:
    """A host copy of ``t`` and, from CUDA with a side ``stream``, the event that marks it done
    (None: done already). The copy waits for the current stream's work, then runs on the side
    stream into pinned memory, so compute goes on meanwhile; whoever reads it waits for the event."""
    t = t.detach()
    if stream is None or not t.is_cuda:
        return to_host(t, host), None
    out = torch.empty(t.shape, dtype=t.dtype, device=host, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(stream):
        out.copy_(t, non_blocking=True)
    t.record_stream(stream)  # its memory is not reused before the copy is done
    event = torch.cuda.Event()
    event.record(stream)
    return out, event


class ToDevice(torch.autograd.Function):
    """A host leaf's copy on the device whose backward sends the gradient back without a
    blocking copy to pageable memory: ``copy_to_host`` on the side stream, handed to the KV
    store, which adds it into the leaf's ``.grad`` when the gradient is read (``flush``)."""

    @staticmethod
    def forward(ctx, leaf: torch.Tensor, device: torch.device, store, stream) -> torch.Tensor:
        ctx.leaf, ctx.store, ctx.stream = leaf, store, stream
        return to_device(leaf, device)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.store.pending.append((ctx.leaf, *copy_to_host(grad, ctx.leaf.device, ctx.stream)))
        return None, None, None, None


def _span_to_host(t: torch.Tensor, host: torch.device, stream=None) -> tuple[torch.Tensor, object, tuple | None]:
    """A host copy of the storage span ``t`` reads, its event (``copy_to_host``), and the
    (shape, stride) to view it again.

    A saved view keeps its layout: an expanded tensor (a mask broadcast over the heads,
    stride 0) is not materialised, and a kernel that saved a padded, sliced tensor gets its
    aligned row stride back. Contiguous tensors, and views that read under half of their
    span, are copied as they are (geometry None).
    """
    if t.is_contiguous() or t.numel() == 0:
        return *copy_to_host(t, host, stream), None
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    if span > 2 * t.numel():
        return *copy_to_host(t, host, stream), None
    flat = t.as_strided((span,), (1,))  # from t's storage offset
    return *copy_to_host(flat, host, stream), (tuple(t.shape), tuple(t.stride()))


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse or wrapper tensors have no plain storage
        return None


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host tensor ``t`` on ``device``, differentiable back into ``t``."""
    return t.clone() if t.device == device else t.to(device, non_blocking=True)


class SaveOnHost(torch.autograd.graph.saved_tensors_hooks):
    """``torch.autograd.graph.save_on_cpu`` for a chunk's replay, with four differences.

    Tensors that share storage with the model's parameters or buffers are kept as they
    are: ``save_on_cpu`` would copy every saved weight (the LM head, the norms) out to the
    host on every replay, moving the model once per chunk for nothing. A tensor saved by
    several ops (a norm's output read by q, k and v; log-softmax's output, saved by it and
    by the NLL loss) is copied once while it is unchanged. The bytes kept on the host are
    counted in ``memory``. And on CUDA the copies run on the side ``stream``, overlapping
    compute; backward waits for each one's event before bringing it back.
    """

    def __init__(self, model: nn.Module, host: torch.device, memory: HostMemory, stream=None):
        tensors = [*model.parameters(), *model.buffers()]
        weights = {_storage_ptr(t) for t in tensors if t.device.type != "meta"}
        copies: dict[int, tuple] = {}  # id(t) -> (weakref to t, its version, weakref to host copy, event, geometry)

        def pack(t: torch.Tensor):
            ptr = _storage_ptr(t)
            if ptr is None or ptr in weights:
                return t
            known = copies.get(id(t))
            if known is not None and known[0]() is t and known[1] == t._version and known[2]() is not None:
                return t.device, known[2](), *known[3:]  # the same tensor, unchanged since it was copied
            saved, event, geometry = _span_to_host(t, host, stream)
            key = id(t)
            forget = lambda ref: copies.get(key, (None,))[0] is ref and copies.pop(key)  # noqa: E731
            copies[key] = (weakref.ref(t, forget), t._version, weakref.ref(memory.track(saved)), event, geometry)
            return t.device, saved, event, geometry

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, saved, event, geometry = packed
            if event is not None:  # the copy to the host ran on the side stream
                torch.cuda.current_stream(device).wait_event(event)
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
        back = self.store.stream  # the gradients' way back (None off CUDA)

        def fetch(t: torch.Tensor) -> torch.Tensor:  # a leaf that collects gradient: through ToDevice
            return ToDevice.apply(t, device, self.store, back) if t.requires_grad else to_device(t, device)

        if stream is None:
            return [fetch(t) for t in ks], [fetch(t) for t in vs]
        # the host leaves were written by copies queued on the compute stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # autograd runs these copies' backward on it too
            return [fetch(t) for t in ks], [fetch(t) for t in vs]

    def _ready(self, ks: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[list, list]:
        """Prefetched tensors, made safe to use on the compute stream."""
        if self.stream is not None:
            current = torch.cuda.current_stream(ks[0].device)
            current.wait_stream(self.stream)
            for t in ks + vs:
                t.record_stream(current)  # freed by the compute stream, not the side one
        return ks, vs
