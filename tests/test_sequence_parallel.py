"""One sequence over two ranks (Ulysses, ``ds_chunk.sequence_parallel``) against one process's
plain full backprop of the same rows in float64; the all-to-alls per step; the refusals that
name the setting. The engine's runs (ZeRO-1/2/3, offload, full fine-tuning) are in test_ranks."""

import dataclasses
import json
import os
import subprocess

import families
import pytest
import torch
from models import tiny_model
from test_ranks import free_port

from ds_chunk import ChunkScheduler
from ds_chunk.engine import sequence_parallel_size
from ds_chunk.plan import ModelShape, Setup, estimate, logits_bytes, recommend
from ds_chunk.sequence_parallel import SequenceParallel

LAYERS = 2  # tests/models.py's tiny models


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sp") / "result.json"
    script = os.path.join(os.path.dirname(__file__), "scripts", "sp_ranks.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), script, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


CASES = ["seco", "a_slice_without_labels", "spaco", "length_not_a_multiple", "one_chunk", "lora_kv_offload",
         "keep_chunks", "packed"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_full_backprop_in_one_process(two_ranks, case):
    """The ranks' losses and gradients summed equal one process's (SpaCO: with the same draw)."""
    got = two_ranks[case]
    assert got["loss"] == pytest.approx(got["ref_loss"], rel=1e-12)
    assert got["grad_err"] < 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("case", ["seco", "packed", "keep_chunks", "one_chunk", "length_not_a_multiple"])
def test_all_to_alls_per_step(two_ranks, case):
    """4 per layer per chunk forward (q, k, v in; attention out), 4 per layer per replay's
    backward: the no-grad pass runs every chunk before the last replayed one (keep_chunks: the
    joined chunks run once)."""
    got = two_ranks[case]
    replays = got["replayed"]  # chunk forwards with autograd
    assert got["all_to_all"] == 4 * LAYERS * ((replays - 1) + 2 * replays)


def _refused(model, config: dict, match: str, **kw):
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        ChunkScheduler(config, sequence_parallel=SequenceParallel(2, 0)).backward(model, ids, **kw)


def test_refusals_name_the_setting():
    """Checked before any collective: a one-process SequenceParallel of size 2 reaches them."""
    setting = "sequence_parallel_size = 2: "
    _refused(
        tiny_model(hidden_size=24, num_attention_heads=6, num_key_value_heads=3, head_dim=4),
        {"chunk_size": 8},
        setting + ".*3 key/value",
    )
    _refused(tiny_model(), {"chunk_size": 7}, setting + "chunkwise.chunk_size = 7")
    sampler = {"chunk_size": 8, "sparse": {"rate": 0.5, "sampler": "gradient"}}
    _refused(tiny_model(), sampler, setting + 'chunkwise.sparse.sampler = "gradient"')
    _refused(families.build("mistral_sliding16"), {"chunk_size": 8}, setting + ".*sliding-window")
    _refused(families.build("mixtral_router"), {"chunk_size": 8}, setting + ".*router load-balancing")


def test_the_deepspeed_key():
    assert sequence_parallel_size({}) == 1
    assert sequence_parallel_size({"sequence_parallel_size": 4}) == 4
    for bad in (0, 2.0, "2", True):
        with pytest.raises(ValueError, match=f"sequence_parallel_size = {bad!r}: expected a positive integer"):
            sequence_parallel_size({"sequence_parallel_size": bad})
    with pytest.raises(ValueError, match="data_parallel_size with sequence_parallel_size = 2"):
        sequence_parallel_size({"sequence_parallel_size": 2, "data_parallel_size": 1})
    with pytest.raises(ValueError, match="training_data with sequence_parallel_size = 2"):
        sequence_parallel_size({"sequence_parallel_size": 2}, loader=True)


@pytest.mark.slow
def test_planner_predicts_a_ranks_host_memory(two_ranks):
    """kv_offload: the host memory the scheduler counted on rank 0 (its heads' K/V leaves and
    gradients, its slices' saved tensors) against the planner's per-rank figure."""
    shape = ModelShape.from_config(tiny_model().config.to_dict())
    setup = Setup(seq_len=40, chunk_size=8, batch=2, dtype="float64", lora_rank=4, lora_targets=("q_proj", "v_proj"),
                  kv_offload=True, device="cpu", sequence_parallel=2, world_size=2)  # fmt: skip
    predicted = estimate(shape, setup).host["kv_cache_and_saved"]
    assert predicted == pytest.approx(two_ranks["lora_kv_offload"]["host_peak_bytes"], rel=0.05)


def test_planner_splits_the_sequence_terms_over_the_group():
    """Per rank at sequence_parallel N: the K/V cache, its gradient and attention's copy over 1/N of
    the heads; activations and logits of 1/N of a chunk's tokens; weights and optimizer as before.
    Refusals name the setting; a recommended chunk splits into equal slices."""
    shape = ModelShape.from_config("llama-3-8b")
    one = Setup(seq_len=65536, chunk_size=4096, quant="4bit", lora_rank=8, world_size=8)
    eight = dataclasses.replace(one, sequence_parallel=8)
    a, b = estimate(shape, one), estimate(shape, eight)
    for key in ("kv_leaves", "kv_grads", "attention_kv", "activations"):
        assert b.step[key] == pytest.approx(a.step[key] / 8, rel=1e-12), key
    assert b.step["logits"] == logits_bytes(shape, eight, 4096 // 8)
    assert b.persistent == a.persistent
    for bad, match in ((dict(sequence_parallel=3), "must divide world_size 8"),
                       (dict(chunk_size=4098, sequence_parallel=4), "chunk_size 4098 is not a multiple"),
                       (dict(method="plain", sequence_parallel=8), "seco / spaco only")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            estimate(shape, dataclasses.replace(one, **bad))
    odd = dataclasses.replace(shape, kv_heads=3, heads=9)
    with pytest.raises(ValueError, match="9 heads and 3 key/value heads"):
        estimate(odd, dataclasses.replace(one, sequence_parallel=2))
    three = dataclasses.replace(one, seq_len=1000, chunk_size=300, sequence_parallel=3, world_size=3, gpu_mem_gb=80)
    rec = recommend(dataclasses.replace(shape, heads=24, kv_heads=6), three)
    assert list(rec.tried) == [66, 129, 258, 513, 1026]
