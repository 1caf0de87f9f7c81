"""Kept chunks (``keep_chunks``) against full backprop, and the memory budget's pick against
the planner and the measured peak."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from engine_ref import ds_config, lora_model, max_param_err
from models import grads, max_rel_err, reference_loss, tiny_model

import ds_chunk
from ds_chunk import ChunkScheduler, ChunkwiseConfig
from ds_chunk.budget import MARGIN, SMALLEST, pick, planned_setup
from ds_chunk.config import ConfigError
from ds_chunk.plan import ModelShape, Setup, estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _counted(model):
    """A forward_fn that counts the decoder calls (one per chunk forward)."""
    calls = []
    decoder = model.get_decoder()

    def forward(kwargs):
        calls.append(torch.is_grad_enabled())
        return decoder(**kwargs)[0]

    return forward, calls


@pytest.mark.parametrize("keep", [0, 2, 5, 100])
@pytest.mark.parametrize("case", ["plain", "labels-end-early", "padding", "kv_offload"])
def test_kept_chunks_equal_full_backprop_float64(keep, case):
    """7 chunks of 7 tokens: none, some, all but the first or all kept; the no-grad pass then
    skips exactly the kept chunks."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    labels = mask = None
    if case == "labels-end-early":  # the last supervised chunk is 4: chunks 5, 6 are never run
        labels = ids.clone()
        labels[0, 30:], labels[1, 20:] = -100, -100
    if case == "padding":
        mask = torch.ones_like(ids)
        mask[1, 33:] = 0
    reference_loss(model, ids, labels, mask).backward()
    ref = grads(model)
    model.zero_grad()
    forward, calls = _counted(model)
    config = {"chunk_size": 7, "keep_chunks": keep, "kv_offload": case == "kv_offload", "loss_chunk_size": 4}
    result = ChunkScheduler(config).backward(model, ids, labels, mask, forward_fn=forward)
    assert max_rel_err(grads(model), ref) < 1e-12
    last = 4 if case == "labels-end-early" else 6
    kept = min(keep, last)
    assert result.kept == kept and result.num_chunks == 7
    assert result.replayed == list(range(last + 1))  # numbered as the user's chunks
    assert calls.count(False) == last - kept  # the no-grad pass: the chunks before the joined one
    assert calls.count(True) == last - kept + 1  # replays: the joined chunk once


def test_kept_chunks_and_a_micro_batch_without_a_supervised_token():
    """Gradient accumulation hands the normaliser of the whole step: a micro-batch of prompt
    tokens only replays nothing and adds nothing, kept chunks or not."""
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 30))
    labels = torch.full_like(ids, -100)
    result = ChunkScheduler({"chunk_size": 8, "keep_chunks": 2}).backward(model, ids, labels, num_tokens=10)
    assert result.replayed == [] and all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_kept_chunks_and_a_budget_refused_where_they_are_not_seco():
    for block, what in (({"sparse": {"rate": 0.5}}, "sparse"), ({"truncate": True}, "truncate")):
        with pytest.raises(ConfigError, match=f"chunkwise.keep_chunks = 2: expected 0 with chunkwise.{what}"):
            ChunkwiseConfig.from_dict({"keep_chunks": 2, **block})
        with pytest.raises(ConfigError, match=f"chunkwise.memory_budget_gb = 1.0: expected null with chunkwise.{what}"):
            ChunkwiseConfig.from_dict({"memory_budget_gb": 1, **block})
    with pytest.raises(ConfigError, match="chunkwise.keep_chunks = 1: expected 0 with chunkwise.truncate"):
        ChunkwiseConfig(keep_chunks=1, truncate=True)  # made directly, as ChunkScheduler or the Trainer may be given
    with pytest.raises(ConfigError, match=r"memory_budget_gb = -1: expected a number > 0 \(GiB\), or null"):
        ChunkwiseConfig.from_dict({"memory_budget_gb": -1})


def _own_step_config(stage: int, chunkwise: dict) -> dict:
    return ds_config(stage, False, 2, 1, sgd=0.1) | {"chunkwise": chunkwise}


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_with_kept_chunks_and_a_budget_equals_deepspeeds_own_step(stage):
    """train_batch (chunk 8 with 2 and all chunks kept; a budget) against DeepSpeed's own
    unchunked step (SGD: a wrong gradient shows in every weight)."""
    import deepspeed

    model = lora_model()
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 97, (2, 300), generator=g) for _ in range(2)]
    ref, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=_own_step_config(stage, {"enabled": False}))
    for ids in batches:
        ref.backward(ref(input_ids=ids, labels=ids).loss)
        ref.step()
    # a budget between the step of chunk 64 and that of the whole row: the planner must chunk
    shape, setup = planned_setup(model, batches[0], ChunkwiseConfig())
    low, high = (estimate(shape, Setup(**{**setup.__dict__, "chunk_size": c})).step_bytes for c in (64, 300))
    for chunkwise in ({"chunk_size": 64, "keep_chunks": 2}, {"chunk_size": 64, "keep_chunks": 9},
                      {"memory_budget_gb": (low + high) / 2 / 2**30}):  # fmt: skip
        engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=_own_step_config(stage, chunkwise))
        for ids in batches:
            engine.train_batch({"input_ids": ids})
        params = [*ref.module.parameters(), *engine.module.parameters()]
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            assert max_param_err(engine.hf_model, ref.hf_model) < 1e-6, chunkwise
        result = engine.last_results[0]
        assert result.num_chunks - result.kept > 1 or chunkwise.get("keep_chunks") == 9, (chunkwise, result)


def test_trainer_with_kept_chunks_equals_the_parent(tmp_path):
    from test_hf import _args, _losses, _train, _update_err
    from transformers import Trainer

    from ds_chunk.hf import ChunkwiseTrainer

    start = tiny_model("llama", dtype=torch.float32, seed=0)
    parent = _train(Trainer, tmp_path / "a", args=_args(tmp_path / "a", max_steps=2))
    ours = _train(ChunkwiseTrainer, tmp_path / "b", args=_args(tmp_path / "b", max_steps=2),
                  chunkwise={"chunk_size": 8, "keep_chunks": 3})  # fmt: skip
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    assert _update_err(ours.model, parent.model, start) < 1e-4


# ---- the budget's pick -------------------------------------------------------------------

SMOL = ModelShape.from_config("smollm2-135m")
LORA = dict(dtype="float32", device="cpu", lora_rank=8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))


def test_more_budget_never_costs_more_and_ample_budget_is_one_chunk():
    setup = Setup(seq_len=4096, **LORA, reserve_gb=0.0)
    picks = [pick(SMOL, setup, gib * 2**30, [128, 64]) for gib in (0.7, 1.0, 1.5, 2.0, 3.0, 6.0)]
    assert all(p is not None and p.step_bytes <= p.budget_bytes * (1 - MARGIN) for p in picks)
    kept = [p.chunk_size * (p.keep_chunks + 1) for p in picks]
    assert kept == sorted(kept)  # the joined last chunk grows with the budget
    assert (picks[-1].chunk_size, picks[-1].keep_chunks) == (4096, 0)  # everything at once
    plain = estimate(SMOL, Setup(seq_len=4096, method="plain", **LORA)).step_bytes
    assert picks[-1].step_bytes < plain  # the fused loss never makes the whole logits


def test_a_budget_below_one_chunk_names_the_smallest_that_fits():
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 300))
    config = ChunkwiseConfig.from_dict({"memory_budget_gb": 1e-6})
    shape, setup = planned_setup(model, ids, config)
    least = estimate(shape, Setup(**{**setup.__dict__, "chunk_size": SMALLEST, "loss_chunk_size": SMALLEST}))
    need = least.step_bytes / (1 - MARGIN) / 2**30
    with pytest.raises(ConfigError, match=rf"at least {need:.3f} GiB: the smallest step"):
        ChunkScheduler(config).backward(model, ids)
    just = ChunkScheduler({"memory_budget_gb": need * 1.0001})
    just.backward(model, ids)
    assert just.settings(model, ids).chunk_size == SMALLEST


def test_the_setup_read_from_a_peft_model():
    model = lora_model()
    ids = torch.zeros(3, 100, dtype=torch.long)
    shape, setup = planned_setup(model, ids, ChunkwiseConfig.from_dict({"memory_budget_gb": 1.0, "kv_offload": True}))
    assert (setup.batch, setup.seq_len, setup.dtype, setup.device) == (3, 100, "float32", "cpu")
    assert (setup.lora_rank, setup.lora_targets, setup.quant) == (4, ("q_proj", "v_proj"), "none")
    assert setup.kv_offload
    assert shape.layers == 2 and shape.kv_heads == 2


def test_padded_batches_are_planned_for_masked_attention():
    """A padded batch runs HF's masked sdpa (K/V repeated for GQA, a mask per layer): planned
    apart, with at least as much memory."""
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 400))
    mask = torch.ones_like(ids)
    mask[1, 300:] = 0
    config = ChunkwiseConfig.from_dict({"memory_budget_gb": 1.0})
    _, plain = planned_setup(model, ids, config)
    _, padded = planned_setup(model, ids, config, masked=True)
    assert (plain.attention, padded.attention) == ("auto", "masked")
    scheduler = ChunkScheduler(config)
    scheduler.backward(model, ids, attention_mask=mask)
    assert list(scheduler.picks) == [((2, 400), True)]


def test_peft_models_the_planner_cannot_call_lora_are_planned_as_full_fine_tuning():
    from peft import LoraConfig, get_peft_model

    config = ChunkwiseConfig.from_dict({"memory_budget_gb": 1.0})
    ids = torch.zeros(1, 100, dtype=torch.long)
    saved = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert planned_setup(saved, ids, config)[1].lora_rank == 0  # the head trains: its gradient counts
    two = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    two.add_adapter("big", LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    two.set_adapter("big")
    assert planned_setup(two, ids, config)[1].lora_rank == 16


@pytest.mark.slow
def test_the_pick_fits_the_budget_as_measured(tmp_path):
    """The bench measures each picked setting's step peak in a fresh process: within 10% of the
    planner's prediction, and inside the budget."""
    budgets = ["0.075", "0.12", "0.3"]
    cmd = [sys.executable, "-m", "ds_chunk.bench", "--seq-lens", "2048", "--methods", "seco", "--weights", "lora",
           "--memory-budgets-gb", *budgets, "--measure", "memory", "--out", str(tmp_path)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
    from ds_chunk.bench import read_csv

    rows = read_csv(tmp_path / "bench.csv")
    assert len(rows) == len(budgets) and all(r["status"] == "ok" for r in rows)
    for row in rows:
        assert row["peak_mib"] <= row["memory_budget_gb"] * 1024, row
        assert abs(row["predicted_mib"] / row["peak_mib"] - 1) < 0.10, row
    assert len({r["picked"] for r in rows}) == len(budgets), json.dumps(rows)
