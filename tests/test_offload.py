"""kv_offload: host storage, saved tensors on the host, prefetch, host-memory accounting.

On CPU the "device" and the host are one, but every copy is still made (a clone), so
these tests run the offload path; the reference is the same step without offload.
"""

import gc

import pytest
import torch
from models import grads, max_rel_err, reference_loss, tiny_model

import ds_chunk.offload as offload
import ds_chunk.scheduler as scheduler
from ds_chunk import ChunkScheduler
from ds_chunk.kv import KVStore
from ds_chunk.offload import HostMemory, SaveOnHost

CPU = torch.device("cpu")


def _step(model, ids, labels=None, **cfg):
    result = ChunkScheduler(cfg).backward(model, ids, labels)
    g = grads(model)
    model.zero_grad()
    return result, g


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_offload_is_bitwise_the_same_step(arch, checkpointing):
    """The copies move values, never change them: the gradient is bitwise the one without
    offload, and both match full backprop."""
    model = tiny_model(arch)
    if checkpointing:  # layers recomputed in backward fetch their prefix out of order
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    on, g_on = _step(model, ids, chunk_size=8, loss_chunk_size=3, kv_offload=True)
    off, g_off = _step(model, ids, chunk_size=8, loss_chunk_size=3)
    assert all(torch.equal(g_on[k], g_off[k]) for k in g_off)
    assert torch.equal(on.loss, off.loss)
    reference_loss(model, ids).backward()
    assert max_rel_err(g_on, grads(model)) < 1e-12


def test_offload_with_spaco_sample():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(4))
    sparse = {"rate": 0.5, "seed": 1}
    for step in range(3):  # several draws, each against the same draw without offload
        cfg = {"chunk_size": 8, "sparse": sparse}
        on = ChunkScheduler(dict(cfg, kv_offload=True)).backward(model, ids, step=step)
        g_on = grads(model) if on.replayed else {}
        model.zero_grad()
        off = ChunkScheduler(cfg).backward(model, ids, step=step)
        g_off = grads(model) if off.replayed else {}
        model.zero_grad()
        assert on.replayed == off.replayed
        assert g_on.keys() == g_off.keys() and all(torch.equal(g_on[k], g_off[k]) for k in g_off)


def test_host_bytes_are_counted_and_released(monkeypatch):
    """Peak host bytes cover the leaves and their grads (both alive during the first
    backward) and the saved tensors; all of it is freed by the end of the step; without
    offload nothing is on the host."""
    stores = []
    monkeypatch.setattr(scheduler, "KVStore", lambda *a: stores.append(KVStore(*a)) or stores[-1])
    model = tiny_model("llama")  # float64, 2 layers, 2 KV heads of 8
    ids = torch.randint(0, 97, (2, 40))
    on, _ = _step(model, ids, chunk_size=8, kv_offload=True)
    gc.collect()
    assert stores[0].memory.live == 0 and stores[0].memory.peak == on.host_peak_bytes
    # (K, V) x layers x batch x kv_heads x head_dim x 8 B x the 32 tokens before chunk 4
    leaves = 2 * 2 * 2 * 2 * 8 * 8 * 32
    assert on.host_peak_bytes > 2 * leaves  # + what the last chunk's replay saved
    off, _ = _step(model, ids, chunk_size=8)
    assert off.host_peak_bytes == 0 and stores[1].memory.peak == 0


def test_save_on_host_skips_weights_and_frees_on_backward():
    lin = torch.nn.Linear(64, 32, dtype=torch.float64)
    x = torch.randn(16, 64, dtype=torch.float64, requires_grad=True)
    memory = HostMemory()
    with SaveOnHost(lin, CPU, memory):
        y = torch.tanh(lin(x))  # saves x and the weight (linear), and tanh's output
    assert memory.live == x.nbytes + y.nbytes  # the weight stays where it is
    y.sum().backward()
    del y
    gc.collect()
    assert memory.live == 0 and memory.peak == x.nbytes + 16 * 32 * 8


def test_save_on_host_copies_a_tensor_saved_twice_once():
    x = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    memory = HostMemory()
    with SaveOnHost(torch.nn.Module(), CPU, memory):
        a = x.exp()  # saves its output a
        b = a * a  # saves a twice more
    assert memory.live == a.nbytes
    b.sum().backward()
    assert torch.allclose(x.grad, 2 * torch.exp(2 * x.detach()))


def test_save_on_host_keeps_the_layout_of_views():
    """A mask broadcast over heads (stride 0) from a padded, sliced buffer (row stride 16):
    the host keeps the span it reads, and backward gets the same strides back."""
    x = torch.randn(4, 5, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(5, 16, dtype=torch.float64)[:, :11].expand(4, 5, 11)
    memory = HostMemory()
    with SaveOnHost(torch.nn.Module(), CPU, memory):
        y = x * mask  # saves mask
    saved = y.grad_fn._saved_other  # unpacked through the hook
    assert saved.stride() == mask.stride() and torch.equal(saved, mask)
    assert memory.live == (1 + 4 * 16 + 10) * 8  # the span, not 4 x 5 x 11 elements
    y.sum().backward()
    assert torch.equal(x.grad, mask)


def test_carried_gradient_is_not_saved_again():
    """The gradient collected on a leaf (host memory with kv_offload) is injected into the
    fresh K/V without autograd saving a copy of it."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, dtype=torch.float64)
    memory = HostMemory()
    with SaveOnHost(torch.nn.Module(), CPU, memory):
        out = scheduler._CarriedGrad.apply(x, g)
    assert memory.live == 0 and torch.equal(out, (x * g).sum())
    (3 * out).backward()
    assert torch.equal(x.grad, 3 * g)


def _filled_store(layers=3, chunks=3) -> KVStore:
    store = KVStore(layers, storage=CPU)
    for c in range(chunks):
        for layer in range(layers):
            store.put(layer, torch.full((1, 2, 4, 8), float(10 * c + layer)), torch.zeros(1, 2, 4, 8))
    return store


def test_prefetch_copies_each_layer_once_in_order():
    store = _filled_store()
    fetcher = store.fetcher(2, CPU)
    for layer in range(3):
        ks, _ = fetcher.fetch(layer, CPU)
        assert [float(k[0, 0, 0, 0]) for k in ks] == [layer, 10 + layer]
        # the next layer's copy was started while this one computes
        assert (fetcher.ahead or (None,))[0] == (layer + 1 if layer < 2 else None)
    assert store.copies == 3


def test_out_of_order_fetch_copies_on_the_spot():
    """Backward recomputation (gradient checkpointing) asks for layers last first."""
    store = _filled_store()
    fetcher = store.fetcher(2, CPU)
    for layer in range(3):
        fetcher.fetch(layer, CPU)
    for layer in reversed(range(3)):
        ks, _ = fetcher.fetch(layer, CPU)
        assert float(ks[1][0, 0, 0, 0]) == 10 + layer
        assert fetcher.ahead is None
    assert store.copies == 6


def test_host_leaf_gradients_flow_through_the_fetched_copies(monkeypatch):
    copies = []
    monkeypatch.setattr(offload, "to_device", lambda t, d: copies.append(t) or t.clone())
    store = _filled_store(layers=1, chunks=2)
    store.require_grad([0, 1])
    ks, vs = store.fetcher(2, CPU).fetch(0, CPU)
    (torch.cat(ks, -2).sum() * 2 + torch.cat(vs, -2).sum()).backward()
    assert store.keys[0][0].grad is None and len(store.pending) == 4  # sent back, added when read
    store.flush()
    assert len(copies) == 4 and store.keys[0][0].grad.eq(2).all() and store.values[0][1].grad.eq(1).all()
    assert store.memory.live == 4 * 2 * 4 * 8 * 4 * 2  # 4 leaves + their 4 grads, float32
