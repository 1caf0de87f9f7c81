"""bitsandbytes 4/8-bit base weights + peft LoRA, chunked vs full backprop (float32)."""

import pytest
import torch
from models import grads, max_rel_err, reference_loss, tiny_model

from ds_chunk import ChunkScheduler

bnb = pytest.importorskip("bitsandbytes")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

QUANT = {
    "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "fp4-double": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model("llama", dtype=torch.float32, hidden_size=64, intermediate_size=128, head_dim=16).save_pretrained(path)
    return path


def qlora(path, quant):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANT[quant], dtype=torch.float32)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"], init_lora_weights=False
    )
    return get_peft_model(model, lora)


def _reference(model, ids):
    ref = reference_loss(model, ids)
    ref.backward()
    g = grads(model)
    model.zero_grad()
    return ref.item(), g


@pytest.mark.parametrize("quant", list(QUANT))
def test_qlora_matches_full_backprop(saved, quant):
    model = qlora(saved, quant)
    model.train(quant != "int8")  # int8's matmul differs by mode: compare like with like
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    ref, g_ref = _reference(model, ids)
    result = ChunkScheduler({"chunk_size": 16}).backward(model, ids)
    assert max_rel_err(grads(model), g_ref) < 1e-5
    assert abs(float(result.loss) - ref) < 1e-5


def _pretend_avx512bf16(model):
    """Take bitsandbytes' AVX512-BF16 CPU path whatever this CPU is (the repacking is plain torch)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = True


def _packed(model):
    return any(
        getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )


def test_eval_mode_no_grad_pass_cannot_corrupt_4bit_grads(saved):
    """The trap: an eval-mode no-grad pass repacks 4-bit weights and breaks their gradients."""
    model = qlora(saved, "nf4")
    _pretend_avx512bf16(model)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    model.train()
    _, g_ref = _reference(model, ids)
    model.eval()  # as from_pretrained leaves a model
    ChunkScheduler({"chunk_size": 16}).backward(model, ids)
    assert not _packed(model)
    assert max_rel_err(grads(model), g_ref) < 1e-5
    model.zero_grad()
    # the trap is real: plain autograd after a user's own eval pass is far off
    with torch.no_grad():
        model(input_ids=ids)
    assert _packed(model)
    reference_loss(model, ids).backward()
    # far off, or missing: the packed kernel has no autograd formula (whether an earlier
    # import registered a fallback decides which)
    broken = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()
              if p.requires_grad}  # fmt: skip
    assert max_rel_err(broken, g_ref) > 0.1
    model.zero_grad()
    # ... and the scheduler restores the training layout (scales stay bf16-rounded)
    with pytest.warns(UserWarning, match="repacked"):
        ChunkScheduler({"chunk_size": 16}).backward(model, ids)
    assert not _packed(model)
    got = grads(model)
    model.zero_grad()
    model.train()
    _, g_restored = _reference(model, ids)
    assert max_rel_err(got, g_restored) < 1e-5
