"""ds_chunk.initialize + engine.train_batch against plain backprop + torch AdamW."""

import copy
import json
import os

import pytest
import torch
from engine_ref import ds_config, lora_model, max_param_err, mixed_labels, reference_steps

import ds_chunk


@pytest.fixture(autouse=True, scope="module")
def single_process_env():
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _batches(n=3, rows=4, seq=40):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 97, (rows, seq), generator=g) for _ in range(n)]


@pytest.mark.parametrize(
    "stage, offload, gas",
    [(0, False, 1), (1, False, 2), (1, True, 1), (2, False, 2), (2, True, 2), (3, False, 2)],
)
def test_train_batch_matches_torch_adamw(stage, offload, gas):
    """Rows 1-3 have no loss in their first chunks, so chunk backwards reach different parameters."""
    model, batches = lora_model(), _batches()
    labels = [mixed_labels(ids) for ids in batches]
    ref, ref_losses = reference_steps(model, batches, labels)
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=ds_config(stage, offload, 4 // gas, gas))
    losses = [engine.train_batch({"input_ids": ids, "labels": y}).item() for ids, y in zip(batches, labels)]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.hf_model.parameters()), enabled=stage == 3):
        assert max_param_err(engine.hf_model, ref) < 1e-5
    assert engine.global_steps == len(batches)


def _own_step_config(stage: int, gas: int, sgd: bool) -> dict:
    cfg = ds_config(stage, False, 2, gas, sgd=0.1 if sgd else 0.0)
    if not sgd:
        cfg["gradient_clipping"] = 0.5  # clipping reads the gradient's norm: it must be the reference's
    return cfg


@pytest.mark.parametrize("sgd", [True, False], ids=["sgd", "adamw-clip"])
@pytest.mark.parametrize("gas", [1, 2, 3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_and_accumulation_matches_deepspeeds_own_step(stage, gas, sgd):
    """train_batch against DeepSpeed's unchunked step: a full forward and engine.backward per
    micro-batch, then engine.step(). ZeRO-0 with GA > 1 once got 1/GA of the gradient."""
    import deepspeed

    model = lora_model()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 97, (2 * gas, 40), generator=g) for _ in range(3)]  # equal rows: equal means
    ref, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=_own_step_config(stage, gas, sgd))
    for ids in batches:
        for rows in ids.split(2):
            ref.backward(ref(input_ids=rows, labels=rows).loss)
            ref.step()
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=_own_step_config(stage, gas, sgd))
    for ids in batches:
        engine.train_batch({"input_ids": ids})
    assert engine.global_steps == ref.global_steps == len(batches)
    with deepspeed.zero.GatheredParameters([*ref.module.parameters(), *engine.module.parameters()], enabled=stage == 3):
        assert max_param_err(engine.hf_model, ref.hf_model) < 1e-6


def _deepspeeds_own_loop(model, cfg: dict, batches) -> list[float]:
    """The standard engine(...) / engine.backward / engine.step loop, unchunked: its losses."""
    plain, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    losses = []
    for ids in batches:
        loss = plain(input_ids=ids, labels=ids).loss
        plain.backward(loss)
        plain.step()
        losses.append(loss.item())
    return losses


def test_bf16_matches_deepspeeds_own_unchunked_loop():
    """bf16: train_batch against DeepSpeed's own loop."""
    model, batches = lora_model(), _batches(3)
    want = _deepspeeds_own_loop(model, ds_config(2, False, 4, bf16=True), batches)
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=ds_config(2, False, 4, bf16=True))
    got = [engine.train_batch({"input_ids": ids}).item() for ids in batches]
    assert got == pytest.approx(want, rel=1e-2)


def test_torch_autocast_block_matches_deepspeeds_own_unchunked_loop():
    """DeepSpeed's ``torch_autocast`` block (fp32 weights, bf16 matmuls): every chunk forward
    runs under it, and train_batch follows DeepSpeed's own autocast loop to bf16 precision."""
    model, batches = lora_model(), _batches(3)
    cfg = {**ds_config(2, False, 4), "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    want = _deepspeeds_own_loop(model, cfg, batches)
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    seen = set()
    q = next(m for n, m in engine.hf_model.named_modules() if n.endswith("q_proj.base_layer"))
    q.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    got = [engine.train_batch({"input_ids": ids}).item() for ids in batches]
    assert seen == {torch.bfloat16}
    assert got == pytest.approx(want, rel=1e-2)


@pytest.mark.parametrize("chunk", [8, 40])
def test_one_engine_backward_per_step_whatever_the_chunks(chunk):
    """The chunk backwards go to a local buffer; DeepSpeed sees one backward, the boundary."""
    engine, *_ = ds_chunk.initialize(model=lora_model(), config=ds_config(2, False, 2, gas=2, chunk=chunk))
    calls, backward = [], engine.engine.backward
    engine.engine.backward = lambda loss, **kw: (calls.append(engine.engine.is_gradient_accumulation_boundary()),
                                                 backward(loss, **kw))[1]  # fmt: skip
    engine.train_batch({"input_ids": _batches(1)[0]})  # 2 micro-batches x 40 tokens
    assert calls == [True]


def test_padding_labels_and_chunking_disabled():
    model = lora_model()
    ids = _batches(1)[0]
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    cfg = ds_config(2, False, 4)
    del cfg["chunkwise"]  # a user's plain DeepSpeed config: one chunk
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    assert not engine.chunkwise.enabled
    plain = engine.train_batch({"input_ids": ids, "attention_mask": mask}).item()
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=ds_config(2, False, 4, chunk=8))
    assert engine.train_batch({"input_ids": ids, "attention_mask": mask}).item() == pytest.approx(plain, rel=1e-6)


def test_fp16_and_auto_are_refused(tmp_path):
    cfg = ds_config(2, False)
    cfg["fp16"] = {"enabled": True}
    with pytest.raises(ValueError, match="fp16.enabled"):
        ds_chunk.initialize(model=lora_model(), config=cfg)
    cfg = ds_config(2, False)
    cfg["train_micro_batch_size_per_gpu"] = "auto"
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match='train_micro_batch_size_per_gpu = "auto"'):
        ds_chunk.initialize(model=lora_model(), config=path)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_from_recipe_learns(bits):
    cfg = ds_config(2, False, 2)
    cfg["model"] = {
        "config": {
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "dtype": "float32",
        "quantization": {"bits": bits, "compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    }
    cfg["optimizer"]["params"]["lr"] = 3e-3
    engine, *_ = ds_chunk.initialize(config=cfg)
    ids = torch.arange(32).repeat(2, 2) % 64  # a sequence that repeats: learnable
    losses = [engine.train_batch({"input_ids": ids}).item() for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses


def test_zero3_with_4bit_base_is_refused_with_the_way_out():
    cfg = ds_config(3, False, 2)
    cfg["model"] = {
        "config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 1, "num_attention_heads": 4},
        "dtype": "float32",
        "quantization": {"bits": 4, "compute_dtype": "float32"},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    }  # fmt: skip
    with pytest.raises(ValueError, match="stage = 3 with bitsandbytes 4/8-bit base weights.*use stage 1 or 2"):
        ds_chunk.initialize(config=cfg)
