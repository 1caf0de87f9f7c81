"""The chunkwise block: every bad value gets an error naming key, value and what is allowed."""

import json

import pytest

from ds_chunk import ChunkwiseConfig, ConfigError, SparseConfig


def test_defaults_and_roundtrip(tmp_path):
    cfg = ChunkwiseConfig.from_dict({"chunk_size": 128})
    assert cfg == ChunkwiseConfig(enabled=True, chunk_size=128)
    assert cfg.loss_chunk_size == "auto"  # absent: picked from the vocabulary
    assert ChunkwiseConfig.from_dict({"loss_chunk_size": None}).loss_chunk_size is None  # null: the whole chunk
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "chunkwise": {"chunk_size": 64}}))
    assert ChunkwiseConfig.from_ds_config(path).chunk_size == 64
    assert ChunkwiseConfig.from_ds_config({"zero_optimization": {"stage": 2}}).enabled is False


def test_sparse_block():
    cfg = ChunkwiseConfig.from_dict({"sparse": {"rate": 0.125, "always_replay": "supervised", "seed": 3}})
    assert cfg.sparse == SparseConfig(rate=0.125, always_replay="supervised", seed=3)
    paper = SparseConfig.from_dict({"sampler": "paper", "num_chunks": 8, "max_compensation": 2})
    assert (paper.num_chunks, paper.max_compensation) == (8, 2.0)


@pytest.mark.parametrize(
    "block, key, allowed",
    [
        ({"chunk_size": 0}, "chunkwise.chunk_size", "integer >= 1"),
        ({"chunk_size": 12.5}, "chunkwise.chunk_size", "integer >= 1"),
        ({"chunk_size": True}, "chunkwise.chunk_size", "integer >= 1"),
        ({"chunk_size": "auto"}, "chunkwise.chunk_size", '"auto" is not resolved'),
        ({"enabled": "yes"}, "chunkwise.enabled", "true or false"),
        ({"chunk_sise": 8}, "chunkwise.chunk_sise", "no such key"),
        ({"loss_chunk_size": 0}, "chunkwise.loss_chunk_size", "integer >= 1 or null"),
        ({"kv_offload": 1}, "chunkwise.kv_offload", "true or false"),
        ({"sparse": []}, "chunkwise.sparse", "a JSON object"),
        ({"sparse": {"rate": 0.5, "typo": 1}}, "chunkwise.sparse.typo", "no such key"),
        ({"sparse": {"rate": 0}}, "chunkwise.sparse.rate", "0 < p <= 1"),
        ({"sparse": {"rate": 1.5}}, "chunkwise.sparse.rate", "0 < p <= 1"),
        ({"sparse": {"rate": "auto"}}, "chunkwise.sparse.rate", '"auto"'),
        ({"sparse": {}}, "chunkwise.sparse.rate/num_chunks", "exactly one"),
        ({"sparse": {"rate": 0.5, "num_chunks": 2}}, "chunkwise.sparse.rate/num_chunks", "exactly one"),
        ({"sparse": {"num_chunks": 0}}, "chunkwise.sparse.num_chunks", "integer >= 1"),
        (
            {"sparse": {"rate": 0.5, "sampler": "uniform"}},
            "chunkwise.sparse.sampler",
            "'bernoulli', 'gradient', 'paper'",
        ),
        ({"sparse": {"rate": 0.5, "always_replay": "answers"}}, "chunkwise.sparse.always_replay", '"supervised"'),
        ({"sparse": {"rate": 0.5, "max_compensation": 2}}, "chunkwise.sparse.max_compensation", "unless sampler"),
        (
            {"sparse": {"rate": 0.5, "sampler": "paper", "max_compensation": 0.5}},
            "chunkwise.sparse.max_compensation",
            ">= 1",
        ),
        (
            {"sparse": {"num_chunks": 2, "sampler": "paper", "always_replay": [0]}},
            "chunkwise.sparse.always_replay",
            "empty list",
        ),
        ({"sparse": {"rate": 0.5, "seed": -1}}, "chunkwise.sparse.seed", "integer >= 0"),
        ({"sparse": {"rate": 0.5, "same_on_all_ranks": "no"}}, "chunkwise.sparse.same_on_all_ranks", "true or false"),
        ({"sparse": {"rate": 0.5, "report_loss": "yes"}}, "chunkwise.sparse.report_loss", "'estimate', 'exact', 'off'"),
        ({"loss_chunk_size": "auto"}, "chunkwise.loss_chunk_size", '"auto" is not resolved'),
        ({"max_consecutive_skips": -1}, "chunkwise.max_consecutive_skips", "integer >= 0"),
    ],
)
def test_bad_values(block, key, allowed):
    with pytest.raises(ConfigError) as info:
        ChunkwiseConfig.from_dict(block)
    assert info.value.key == key
    assert str(info.value).startswith(key + " = ")
    assert allowed in str(info.value)


def test_block_must_be_object():
    with pytest.raises(ConfigError, match="chunkwise = 5: expected a JSON object"):
        ChunkwiseConfig.from_ds_config({"chunkwise": 5})


@pytest.mark.parametrize(
    "value, key, allowed",
    [
        ("linear", "model.rope_scaling", "an object"),
        ({"rope_type": "ntk", "factor": 4}, "model.rope_scaling.rope_type", "'linear', 'dynamic'"),
        ({"type": "linear", "factor": 0.5}, "model.rope_scaling.factor", ">= 1"),
        ({"rope_type": "linear"}, "model.rope_scaling.factor", ">= 1"),
    ],
)
def test_bad_rope_scaling(value, key, allowed):
    from ds_chunk.model import ModelConfig

    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"name_or_path": "x", "rope_scaling": value})
    assert info.value.key == key and allowed in str(info.value)


def test_rope_scaling_merges_over_the_models_own():
    """model.rope_scaling extends the context: "type" read as "rope_type", rope_theta kept."""
    import torch

    from ds_chunk.model import ModelConfig, build_model

    config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5000.0}  # fmt: skip
    block = {"config": config, "dtype": "float32", "rope_scaling": {"type": "linear", "factor": 4}}
    scaled, plain = (build_model(ModelConfig.from_dict(b)) for b in (block, {**block, "rope_scaling": None}))
    assert scaled.config.rope_parameters == {"rope_type": "linear", "factor": 4, "rope_theta": 5000.0}
    ids = torch.arange(20).unsqueeze(0)
    assert not torch.allclose(scaled(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_seco_equals_full_backprop_under_rope_scaling(rope_type):
    """float64, every weight trained: the chunked gradient of a context-extended model is full backprop's."""
    import torch
    from models import grads, max_rel_err, reference_loss

    from ds_chunk import ChunkScheduler
    from ds_chunk.model import ModelConfig, build_model

    config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16}  # fmt: skip
    rope = {"rope_type": rope_type, "factor": 4}
    model = build_model(ModelConfig.from_dict({"config": config, "dtype": "float64", "rope_scaling": rope}))
    ids = torch.randint(0, 32, (2, 48), generator=torch.Generator().manual_seed(0))  # 3x the trained length
    reference_loss(model, ids).backward()
    want = grads(model)
    model.zero_grad()
    ChunkScheduler({"chunk_size": 12}).backward(model, ids)
    assert max_rel_err(grads(model), want) < 1e-12
    if rope_type == "linear":  # 4 x 16 positions, not more
        with pytest.raises(ValueError, match="sequence of 65 tokens exceeds the 64 positions the model takes"):
            ChunkScheduler({"chunk_size": 12}).backward(model, torch.zeros(1, 65, dtype=torch.long))
