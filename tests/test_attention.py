"""The chunk attention (no mask, no repeated K/V) against HF's sdpa path and full backprop.

Flash attention is CUDA-only, so on CPU the switch is forced (``flash_eligible``); SDPA
then computes the same bottom-right causal attention with a materialised mask.
"""

import pytest
import torch
from models import grads, max_rel_err, reference_loss, tiny_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import ds_chunk.attention as attention
from ds_chunk import ChunkScheduler


def _record_implementation(model) -> list[str]:
    seen = []
    layer = model.model.layers[0].self_attn
    layer.register_forward_pre_hook(lambda m, args: seen.append(m.config._attn_implementation))
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_switched_attention_is_exact(monkeypatch, arch):
    monkeypatch.setattr(attention, "flash_eligible", lambda model, device: True)
    model = tiny_model(arch)  # 4 query heads over 2 KV heads
    seen = _record_implementation(model)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    result = ChunkScheduler({"chunk_size": 16}).backward(model, ids)
    chunked = grads(model)
    assert set(seen) == {attention.NAME} and model.config._attn_implementation == "sdpa"
    model.zero_grad()
    ref = reference_loss(model, ids)
    ref.backward()
    assert max_rel_err(chunked, grads(model)) < 1e-12
    assert abs(float(result.loss) - ref.item()) < 1e-12


def test_padding_keeps_hf_attention(monkeypatch):
    monkeypatch.setattr(attention, "flash_eligible", lambda model, device: True)
    model = tiny_model("llama")
    seen = _record_implementation(model)
    ids = torch.randint(0, 97, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    ChunkScheduler({"chunk_size": 8}).backward(model, ids, attention_mask=mask)
    assert set(seen) == {"sdpa"}


def test_implementation_is_restored_after_an_error(monkeypatch):
    monkeypatch.setattr(attention, "flash_eligible", lambda model, device: True)
    model = tiny_model("llama")

    def fail(scalar, is_last):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ChunkScheduler({"chunk_size": 8}, backward_fn=fail).backward(model, torch.randint(0, 97, (1, 24)))
    assert model.config._attn_implementation == "sdpa"


def test_switched_on_cpu_only_without_attention_dropout_and_not_for_eager():
    assert attention.flash_eligible(tiny_model("llama"), torch.device("cpu"))
    dropout = tiny_model("llama", attention_dropout=0.1).train()
    assert not attention.flash_eligible(dropout, torch.device("cpu"))
    eager = tiny_model("llama", attn_implementation="eager")
    with attention.chunk_attention(eager, padded=False, device=torch.device("cpu")) as switched:
        assert not switched and eager.config._attn_implementation == "eager"


@pytest.mark.parametrize("prefix", [0, 11])
def test_chunk_sdpa_matches_hf_sdpa_with_its_mask(prefix):
    """query [B, 4, C, d] over K/V [B, 2, P + C, d] with the bottom-right causal mask HF builds."""
    model = tiny_model("llama")
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(6)
    c = 7
    q = torch.randn(2, 4, c, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, prefix + c, 8, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(c, prefix + c, dtype=torch.bool).tril(prefix)[None, None]
    ours, _ = attention.chunk_sdpa(module, q, k, v, None, scaling=module.scaling)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-14)


def test_switched_attention_with_offload_and_checkpointing(monkeypatch):
    monkeypatch.setattr(attention, "flash_eligible", lambda model, device: True)
    model = tiny_model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(7))
    ChunkScheduler({"chunk_size": 8, "loss_chunk_size": 3, "kv_offload": True}).backward(model, ids)
    chunked = grads(model)
    model.zero_grad()
    reference_loss(model, ids).backward()
    assert max_rel_err(chunked, grads(model)) < 1e-12


def test_flash_probe_asks_what_causal_lower_right_runs(monkeypatch):
    """The bottom-right causal flash call is probed without a mask and with is_causal=False
    (torch refuses is_causal=True for fewer queries than keys), GQA on, with grad."""
    asked = []
    monkeypatch.setattr(torch.backends.cuda, "flash_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "can_use_flash_attention", lambda p, debug: asked.append(p) or True)
    q = torch.zeros(1, 4, 8, 16, requires_grad=True)
    k = torch.zeros(1, 2, 24, 16, requires_grad=True)
    assert attention._flash_supports(q, k, k, 0.0)
    (params,) = asked
    assert params.attn_mask is None and not params.is_causal and params.enable_gqa
    assert params.query.shape[2] < params.key.shape[2] and params.query.requires_grad


def test_cpu_chunk_attention_runs_and_is_exact(monkeypatch):
    """On CPU an sdpa model's chunks take the two-call flash path (prefix + diagonal), exactly."""
    from models import grads, max_rel_err, reference_loss

    from ds_chunk import ChunkScheduler

    calls = []
    original = attention._PrefixAndDiagonal.forward
    monkeypatch.setattr(attention._PrefixAndDiagonal, "forward", lambda *a: calls.append(a[4]) or original(*a))
    model = tiny_model("qwen3")  # GQA: 4 query heads over 2 K/V heads
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    reference_loss(model, ids).backward()
    want = grads(model)
    model.zero_grad()
    ChunkScheduler({"chunk_size": 16}).backward(model, ids)
    assert max_rel_err(grads(model), want) < 1e-12
    assert sorted(set(calls)) == [0, 16, 32]  # prefix lengths of the three chunks
