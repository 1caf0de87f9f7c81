"""Every family in tests/families.py is exact (float64, against full backprop) or refused with a
message naming the class and the setting: a transformers upgrade that changes a family shows up here."""

import re
import sys

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, build
from models import packed_positions, per_document_loss

from ds_chunk import ChunkScheduler, UnsupportedModelError

# family -> what ds_chunk must say instead of training it (a fragment of the message)
REFUSED = {
    "llama4": "Llama4ForCausalLM: get_decoder() does not return its decoder",
    "qwen3_next": "Qwen3NextForCausalLM: layer types ['linear_attention'] are not supported",
    "lfm2": "Lfm2ForCausalLM: layer types ['conv'] are not supported",
    "falcon_h1": "FalconH1ForCausalLM: layer types",
}
# HF runs some ops in float32 even in a float64 model (norms, eager softmax, routers): their
# rounding, not ds_chunk, sets these bounds (with those upcasts removed every family is < 1e-13).
FLOAT32_INSIDE = {"cohere", "cohere2", "helium", "gemma", "gemma2", "gemma3", "gemma3n", "vaultgemma", "gpt_neo",
                  "bloom", "mpt", "diffllama", "glm4_moe", "deepseek_v3"}  # fmt: skip
# A router that samples (phimoe's sparsemixer) draws differently for a chunk than for the
# whole sequence, like dropout: compare in eval mode.
SAMPLING = {"phimoe", "phimoe_router"}
# "_router": the MoE load-balancing loss on; the reference adds coef * transformers' own
# load_balancing_loss_func, which runs in float32 (hence the bound), over the whole batch.
ROUTER = {name for name in FAMILIES if name.endswith("_router")}

IDS = torch.randint(3, 97, (2, 45), generator=torch.Generator().manual_seed(1))  # window 16 < 45 < positions


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _max_rel_err(ours: dict, ref: dict) -> float:
    """Worst parameter's ||ours - ref|| / ||ref||; parameters whose true gradient is zero (a K bias
    without RoPE: softmax ignores a shift) carry only rounding noise and are left out."""
    total = torch.sqrt(sum(g.norm() ** 2 for g in ref.values()))
    assert ours.keys() == ref.keys()
    return max(float((ours[k] - ref[k]).norm() / ref[k].norm()) for k in ref if ref[k].norm() > 1e-12 * total)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_is_exact_or_refused(name):
    model = build(name)
    if name in SAMPLING:
        model.eval()
    scheduler = ChunkScheduler({"chunk_size": 8})
    if name in REFUSED:
        with pytest.raises(UnsupportedModelError, match=re.escape(REFUSED[name])):
            scheduler.backward(model, IDS)
        return
    out = model(input_ids=IDS)
    ref = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())  # in float64
    if name in ROUTER:
        ref = ref + model.router_aux_loss_coef * router_loss(model, out.router_logits)
    ref.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    result = scheduler.backward(model, IDS)
    tol = 1e-6 if name in FLOAT32_INSIDE | ROUTER else 1e-12
    assert _max_rel_err(_grads(model), want) < tol
    assert abs(float(result.loss) - ref.item()) < tol * ref.item()
    assert (result.aux_loss is None) == (name not in ROUTER)


def router_loss(model, router_logits, mask=None) -> torch.Tensor:
    """transformers' own load-balancing loss of the model's family."""
    func = sys.modules[type(model).__module__].load_balancing_loss_func
    return func(router_logits, model.num_experts, model.num_experts_per_tok, mask)


# Packed rows (position_ids restarting at each document): what must be refused instead
REFUSED_PACKED = {"bloom": "BloomForCausalLM: packed rows", "falcon_alibi": "FalconForCausalLM: packed rows"}
DOCUMENTS = [[10, 3, 20, 12], [30, 14, 1]]  # per row; 20 and 30 > the window of 16


# the load-balancing loss couples a batch's documents: tests/test_router.py packs it against HF's packed forward
@pytest.mark.parametrize("name", sorted(set(FAMILIES) - set(REFUSED) - ROUTER))
def test_family_packed_rows_equal_each_document_alone(name):
    """Packed rows against each document run alone (the sliding window really cuts)."""
    model = build(name)
    if name in SAMPLING:
        model.eval()
    pos = packed_positions(DOCUMENTS)
    labels = IDS.masked_fill(pos == 0, -100)
    if name in REFUSED_PACKED:
        with pytest.raises(ValueError, match=re.escape(REFUSED_PACKED[name]) + ".* with ALiBi"):
            ChunkScheduler({"chunk_size": 8}).backward(model, IDS, labels, position_ids=pos)
        return
    per_document_loss(model, IDS, labels, DOCUMENTS).backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    ChunkScheduler({"chunk_size": 8}).backward(model, IDS, labels, position_ids=pos)
    assert _max_rel_err(_grads(model), want) < (1e-6 if name in FLOAT32_INSIDE else 1e-12)


def _bert():
    from transformers import BertConfig, BertLMHeadModel

    return BertLMHeadModel(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, is_decoder=True))  # fmt: skip


def _xlstm():
    from transformers import xLSTMConfig, xLSTMForCausalLM

    return xLSTMForCausalLM(xLSTMConfig(vocab_size=97, hidden_size=32, embedding_dim=32, num_heads=2, num_blocks=1))


def _gemma4_shared():
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    types = ["sliding_attention", "full_attention"] * 2
    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    config = Gemma4TextConfig(**sizes, num_hidden_layers=4, head_dim=8, num_kv_shared_layers=2, layer_types=types,
                              sliding_window=16)  # fmt: skip
    return Gemma4ForCausalLM(config)


def _paligemma():
    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    text = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)  # fmt: skip
    config = PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision, image_token_index=96, projection_dim=32)
    return PaliGemmaForConditionalGeneration(config)


@pytest.mark.parametrize(
    "make, message",
    [
        (_bert, "BertLMHeadModel: its LM head is more than the output embedding"),
        (_xlstm, "xLSTMForCausalLM: its decoder takes a xLSTMCache (a recurrent state), not a KV cache"),
        (_gemma4_shared, "Gemma4ForCausalLM: num_kv_shared_layers=2 (layers reading another layer's K/V)"),
        (
            _paligemma,
            "PaliGemmaForConditionalGeneration: a multimodal wrapper, whose forward runs more than its decoder",
        ),
    ],
)
def test_refused_with_the_class_and_the_setting(make, message):
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        ChunkScheduler({"chunk_size": 8}).backward(make(), IDS[:, :20])
