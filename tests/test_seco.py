"""SeCO gradients against full-sequence backprop (float64 reference on tiny seeded models)."""

import pytest
import torch
from models import grads, max_rel_err, reference_loss, tiny_model

from ds_chunk import ChunkScheduler, UnsupportedModelError
from ds_chunk.kv import KVStore


def _check(model, ids, chunk_size, labels=None, mask=None, tol=1e-6, **cfg):
    ref = reference_loss(model, ids, labels, mask)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad()
    result = ChunkScheduler({"chunk_size": chunk_size, **cfg}).backward(model, ids, labels, mask)
    err = max_rel_err(grads(model), g_ref)
    assert err < tol, f"max relative grad error {err:.3g}"
    assert abs(float(result.loss) - ref.item()) < tol * max(1.0, ref.item())
    model.zero_grad()
    return result


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_matches_full_backprop_float64(arch, chunk_size):
    model = tiny_model(arch)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    result = _check(model, ids, chunk_size)
    assert result.num_chunks == -(-45 // chunk_size)
    assert result.num_tokens == 2 * 44


def test_float32_looser_bound():
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 40))
    _check(model, ids, 8, tol=1e-4)


def test_right_padding_and_partial_labels():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 97, (3, 33))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :10] = -100  # an unsupervised prompt
    _check(model, ids, 6, labels, mask)
    _check(model, ids, 6, None, mask)  # labels=None ignores the padding


def test_grads_accumulate_into_existing():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 30))
    reference_loss(model, ids).backward()
    once = grads(model)
    ChunkScheduler({"chunk_size": 8}).backward(model, ids)
    assert max_rel_err(grads(model), {k: 2 * v for k, v in once.items()}) < 1e-6


def test_disabled_is_one_chunk():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 30))
    assert _check(model, ids, 4, enabled=False).num_chunks == 1


def test_loss_sub_chunks_and_kv_offload_are_exact():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 40))
    _check(model, ids, 16, loss_chunk_size=5, kv_offload=True)


def test_gradient_checkpointing_inside_chunk():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 97, (2, 40))
    _check(model, ids, 16)


def test_peft_lora_float64():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in model.named_parameters():  # LoRA B starts at zero; make A's gradient non-trivial
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 97, (2, 40))
    _check(model, ids, 12)


def test_dropout_masks_replayed_consistently():
    """With dropout, each chunk's replay sees its no-grad-pass masks: replay K/V == stored K/V."""
    model = tiny_model("llama", attention_dropout=0.3)
    model.train()
    ids = torch.randint(0, 97, (1, 40))
    stored, replayed = {}, {}
    orig_put = KVStore.put

    def put(self, layer, k, v):
        stored[(len(self.lengths) - (layer != 0), layer)] = k.clone()
        orig_put(self, layer, k, v)

    KVStore.put = put
    try:
        from ds_chunk import kv

        orig_update = kv.ChunkCache.update

        def update(self, k, v, layer, *a, **kw):
            if not self.record:
                replayed[(self.chunk, layer)] = k.detach().clone()
            return orig_update(self, k, v, layer, *a, **kw)

        kv.ChunkCache.update = update
        torch.manual_seed(0)
        ChunkScheduler({"chunk_size": 10}).backward(model, ids)
    finally:
        KVStore.put = orig_put
        kv.ChunkCache.update = orig_update
    # chunk 0's layer-1 keys depend on layer 0's dropout; equal only if masks match
    common = [key for key in stored if key in replayed]
    assert len(common) >= 6
    for key in common:
        torch.testing.assert_close(replayed[key], stored[key], rtol=0, atol=0)


def test_truncated_backprop_is_detected():
    """Cutting gradient at chunk boundaries (the `truncate` baseline) fails the equality above."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 40))
    labels = ids.masked_fill(torch.arange(40) < 20, -100)  # chunks 0-1 unsupervised: they learn only via KV
    reference_loss(model, ids, labels).backward()
    g_ref = grads(model)
    model.zero_grad()
    result = ChunkScheduler({"chunk_size": 10, "truncate": True}).backward(model, ids, labels)
    assert result.replayed == [1, 2, 3]  # chunk 1 holds the target of position 19
    assert max_rel_err(grads(model), g_ref) > 1e-2
    assert abs(float(result.loss) - reference_loss(model, ids, labels).item()) < 1e-10


def test_backward_fn_sees_one_boundary():
    model = tiny_model("llama")
    calls = []

    def backward_fn(scalar, is_last):
        calls.append(is_last)
        scalar.backward()

    ChunkScheduler({"chunk_size": 8}, backward_fn=backward_fn).backward(model, torch.randint(0, 97, (1, 30)))
    assert calls == [False, False, False, True]


def test_trailing_unsupervised_chunks_are_skipped():
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 40))
    labels = ids.clone()
    labels[:, 15:] = -100  # targets end at position 13 (shifted), in chunk 1
    result = _check(model, ids, 10, labels)
    assert result.replayed == [0, 1]


@pytest.mark.parametrize(
    "ids, labels, match",
    [
        (torch.zeros(1, 0, dtype=torch.long), None, "empty"),
        (torch.zeros(1, 600, dtype=torch.long), None, "max_position_embeddings"),
        (torch.zeros(8, dtype=torch.long), None, r"\[batch, seq_len\]"),
        (torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), -100), "no supervised token"),
    ],
)
def test_bad_inputs_get_clear_errors(ids, labels, match):
    with pytest.raises(ValueError, match=match):
        ChunkScheduler({"chunk_size": 4}).backward(tiny_model("llama"), ids, labels)


def test_left_padding_is_refused():
    mask = torch.tensor([[0, 1, 1, 1]])
    with pytest.raises(ValueError, match="right"):
        ChunkScheduler({"chunk_size": 2}).backward(tiny_model("llama"), torch.ones(1, 4, dtype=torch.long), None, mask)


def test_sliding_window_shorter_than_the_sequence_is_exact():
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    _check(tiny_model("mistral", sliding_window=8), ids, 6)  # windows cross chunk boundaries


def test_unsupported_models_name_the_class():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        ChunkScheduler({"chunk_size": 4}).backward(torch.nn.Linear(2, 2), torch.ones(1, 16, dtype=torch.long))


def test_rng_after_backward_is_where_a_forward_leaves_it():
    """The next step must draw new dropout masks: after the backward the RNG is where one forward
    leaves it (one chunk: the forward is the model's own, so the states are equal)."""
    model = tiny_model("llama", attention_dropout=0.5)
    model.train()
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    model.model(input_ids=ids)  # the decoder alone: no LM head draws, as in the scheduler
    want = torch.get_rng_state()
    torch.manual_seed(7)
    ChunkScheduler({"chunk_size": 24}).backward(model, ids)
    assert torch.equal(torch.get_rng_state(), want)


def test_reentrant_gradient_checkpointing_is_made_exact():
    """Reentrant checkpointing would cut the carried K/V gradient: switched to non-reentrant for the call."""
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    layer = model.model.layers[0]
    configured = layer._gradient_checkpointing_func
    _check(model, torch.randint(0, 97, (2, 40)), 16)
    assert layer._gradient_checkpointing_func is configured  # restored after the call
