"""Memory planner: components against hand-computed values, the recommendation logic, and
the prediction against a peak measured by ds_chunk.bench in a subprocess."""

import csv
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from ds_chunk.bench import DEFAULT_MODEL, Point, markdown_table, run_interleaved, run_point, sweep
from ds_chunk.plan import GIB, LLAMA3_8B, MIB, ModelShape, Setup, estimate, layer_activation_bytes, recommend

# The CPU benchmark model: Llama, 4 layers, hidden 256, 4 heads = 4 KV heads (d = 64),
# intermediate 688, vocab 32000, untied (the hand counts below check that it still is).
BENCH = DEFAULT_MODEL
# Hand count: embed 32000*256 = 8,192,000, LM head the same; per layer q,k,v,o 4*256*256 =
# 262,144, MLP 3*256*688 = 528,384, 2 norms 512 -> 791,040; x4 layers; final norm 256.
BENCH_PARAMS = 2 * 8_192_000 + 4 * 791_040 + 256
assert BENCH_PARAMS == 19_548_416
# Saved for backward per token per layer (float32): norms 2 x 2 x 256, attention q,k,v,out
# 4 x 256 (o_proj's input is out itself) + residual 256, MLP 4 x 688 + residual 256 (all x 4
# bytes), logsumexp 4 heads x 4 bytes; per token overall: 4 layers + embedding output + final
# norm (2 x 256).
LAYER_BYTES = 4 * (2 * 2 * 256 + 4 * 256 + 256 + 4 * 688 + 256) + 4 * 4
TOKEN_BYTES = 4 * LAYER_BYTES + 4 * 256 + 2 * 4 * 256
assert (LAYER_BYTES, TOKEN_BYTES) == (21_264, 88_128)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**BENCH),
        LlamaConfig(**{**BENCH, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True}),
        Qwen2Config(**{**BENCH, "num_key_value_heads": 2}),  # q/k/v biases
        Qwen3Config(**{**BENCH, "num_key_value_heads": 2, "head_dim": 48}),  # q/k norms
    ],
    ids=["llama", "llama-gqa-tied", "qwen2", "qwen3"],
)
def test_param_count_matches_transformers(config):
    with torch.device("meta"):  # no memory: only the shapes are needed
        model = AutoModelForCausalLM.from_config(config)
    assert ModelShape.from_config(config).params() == sum(p.numel() for p in model.parameters())


def test_shape_from_config_file_offline(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **BENCH}))
    shape = ModelShape.from_config(tmp_path)  # a folder holding config.json, no network
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.params()) == (4, 4, 64, BENCH_PARAMS)


def test_seco_step_components_by_hand():
    """T=2048, chunk 512, float32: peak at the replay of chunk 2 (prefix 1024 tokens)."""
    est = estimate(ModelShape.from_config(BENCH), Setup(seq_len=2048, chunk_size=512, dtype="float32"))
    kv_token = 4 * 2 * 4 * 64 * 4  # layers x (K, V) x kv heads x d x 4 bytes = 8192
    expected = {
        "gradients": BENCH_PARAMS * 4,
        "kv_leaves": 1024 * kv_token,
        "kv_grads": (1024 + 512) * kv_token,  # prefix leaves' grads + chunk 2's carried grad
        # cat(prefix, chunk) per layer + bool mask and one float32 copy of it per layer
        "attention_kv": 4 * 1536 * 2 * 4 * 64 * 4 + (4 * 4 + 1) * 512 * 1536,
        "activations": 512 * TOKEN_BYTES,
        # fused loss, sub-chunks of 256 (32 MiB rule): the logits [256, V] float32 (turned into
        # their gradient in place), the d hidden buffer [512, 256] and the head's weight gradient
        # [V, 256] float32
        "logits": 256 * 32000 * 4 + 512 * 256 * 4 + 32000 * 256 * 4,
    }
    assert est.step == pytest.approx(expected, rel=1e-12)


def test_loss_sub_chunks_by_hand():
    """loss_chunk_size 128, the fused loss: a sub-chunk's float32 logits (made into d logits in
    place) beside the bf16 logits or d logits, next to the d hidden buffer and the float32
    weight-gradient buffer with a bf16 product added into it; the backward scales in place."""
    est = estimate(ModelShape.from_config(BENCH), Setup(seq_len=2048, chunk_size=512, loss_chunk_size=128))
    assert est.step["logits"] == 128 * 32000 * (4 + 2) + 512 * 256 * 2 + 32000 * 256 * (4 + 2)
    fp32 = estimate(ModelShape.from_config(BENCH), Setup(seq_len=2048, loss_chunk_size=128, dtype="float32"))
    assert fp32.step["logits"] == 128 * 32000 * 4 + 512 * 256 * 4 + 32000 * 256 * 4  # no copy in the backward
    softcap = ModelShape.from_config({**BENCH, "model_type": "gemma2", "final_logit_softcapping": 30.0})
    assert softcap.logit_transform and not ModelShape.from_config(BENCH).logit_transform
    capped = estimate(softcap, Setup(seq_len=2048, loss_chunk_size=128, dtype="float32"))
    assert capped.step["logits"] - fp32.step["logits"] == 128 * 32000 * 4  # the slope 1 - tanh^2, kept to the end


def test_plain_and_ckpt_by_hand():
    shape = ModelShape.from_config(BENCH)
    plain = estimate(shape, Setup(seq_len=2048, method="plain", dtype="float32")).step
    logits = 3 * 2048 * 32000 * 4
    assert plain == pytest.approx({"activations": 2048 * TOKEN_BYTES, "logits": logits})
    ckpt = estimate(shape, Setup(seq_len=2048, method="ckpt", dtype="float32")).step
    # layer inputs 4 x [2048, 256] + the final norm's two [2048, 256], float32
    assert ckpt == pytest.approx({"activations": 4 * 2048 * 256 * 4 + 2048 * 2 * 256 * 4, "logits": logits})


def test_persistent_qlora_and_full_by_hand():
    shape = ModelShape.from_config(BENCH)
    qlora = estimate(shape, Setup(seq_len=1024, quant="4bit", lora_rank=8, zero_stage=1, world_size=2))
    linear = 4 * (4 * 256 * 256 + 3 * 256 * 688)  # quantized: 0.5 B + float32 absmax per 64
    lora = 4 * 2 * 8 * (256 + 256)  # layers x (q, v) x r x (in + out)
    assert qlora.persistent == pytest.approx(
        {
            "weights": linear * (0.5 + 4 / 64) + (BENCH_PARAMS - linear) * 2,  # rest in bf16
            "lora": lora * 4,  # peft keeps adapters in float32
            "optimizer": lora * 8 / 2,  # Adam moments, ZeRO-1 over 2 ranks, no master copy
        }
    )
    full = estimate(shape, Setup(seq_len=1024, offload_optimizer=True))
    assert full.persistent == {"weights": BENCH_PARAMS * 2, "lora": 0.0, "optimizer": 0.0}
    assert full.host == {"optimizer": BENCH_PARAMS * (8 + 4)}  # moments + float32 master weights


def test_lora_keeps_fewer_activations_by_hand():
    """Frozen base linears keep no input; LoRA targets (q, v) do; frozen norm weights keep no x."""
    shape = ModelShape.from_config(BENCH)
    fp32 = layer_activation_bytes(shape, Setup(seq_len=1, dtype="float32", quant="4bit", lora_rank=8))
    # ln1 output once (shared by q and v's lora_A), SDPA q, k, v, output, logsumexp, residual,
    # gate, SiLU(gate), up, residual, two lora_A outputs [8] (float32)
    assert fp32 == 4 * 256 + 4 * 4 * 256 + 4 * 4 + 4 * 256 + 3 * 4 * 688 + 4 * 256 + 2 * 8 * 4
    bf16 = layer_activation_bytes(shape, Setup(seq_len=1, dtype="bfloat16", quant="4bit", lora_rank=8))
    upcasts = 2 * 4 * 256  # each norm's float32 copy of its input
    lora_inputs = 2 * 4 * 256  # ln1's output, one float32 copy per LoRA target (peft casts to float32)
    sdpa = 2 * 4 * 256 + 4 * 4  # q, k, v, output in bf16, logsumexp in float32
    mlp = 3 * 2 * 688  # gate, SiLU(gate), up
    assert bf16 == upcasts + lora_inputs + sdpa + 2 * 2 * 256 + mlp + 2 * 8 * 4  # + 2 residual sums, lora_A outs


def test_gqa_attention_masked_flash_and_kv_offload():
    """Llama-3-8B, bf16, T=16384, chunk 512. HF's masked sdpa repeats K/V 4x for SDPA and
    saves a float mask per layer; flash attention (the default for bf16) saves neither."""
    shape = ModelShape.from_config(LLAMA3_8B)
    qlora = dict(seq_len=16384, chunk_size=512, quant="4bit", lora_rank=8)
    prefix, chunk = 16384 - 1024, 512  # the replay of the second-to-last chunk
    masked = estimate(shape, Setup(**qlora, attention="masked")).step
    copies = 32 * (prefix + chunk) * 2 * 32 * 128 * 2  # layers x tokens x (K, V) x 32 heads x d x 2 B
    assert masked["attention_kv"] == copies + (32 * 2 + 1) * chunk * (prefix + chunk)
    assert masked["kv_leaves"] == prefix * 32 * 2 * 8 * 128 * 2
    flash = estimate(shape, Setup(**qlora)).step
    assert flash["attention_kv"] == copies / 4  # 8 KV heads, no mask
    off = estimate(shape, Setup(**qlora, kv_offload=True)).step
    # Leaves, grads and all saved tensors on the host; the device holds one layer's working set.
    # The second-to-last chunk's replay peaks (LoRA's grads exist by then): its K/V
    # cat(prefix, chunk) and their gradient, + the next layer's prefix fetched ahead.
    one_layer = (prefix + chunk) * 2 * 8 * 128 * 2
    ahead = prefix * 2 * 8 * 128 * 2
    assert "kv_leaves" not in off and off["attention_kv"] == 2 * one_layer + ahead
    assert off["gradients"] > 0
    # one layer's activations, bf16 QLoRA (q, v): norm input copies, LoRA input copies,
    # SDPA q, k, v, out + logsumexp, 2 residuals, gate/SiLU/up, lora_A outputs
    layer = 2 * 4 * 4096 + 2 * 4 * 4096 + 2 * (4096 + 1024 + 1024 + 4096) + 4 * 32 + 2 * 2 * 4096 + 3 * 2 * 14336 + 64
    assert off["activations"] == 512 * layer


@pytest.mark.parametrize("seq_len, chunk, loss_chunk", [(1024, 256, None), (2048, 512, 128)])
def test_offload_host_memory_against_the_schedulers_count(seq_len, chunk, loss_chunk):
    """The planner's host bytes for kv_offload vs what the scheduler counted (leaves, grads,
    saved tensors; exact, not sampled), float32 bench model."""
    from ds_chunk import ChunkScheduler

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**BENCH), dtype=torch.float32)
    ids = torch.randint(0, 32000, (1, seq_len))
    cfg = {"chunk_size": chunk, "loss_chunk_size": loss_chunk, "kv_offload": True}
    counted = ChunkScheduler(cfg).backward(model, ids).host_peak_bytes
    setup = Setup(seq_len=seq_len, chunk_size=chunk, loss_chunk_size=loss_chunk, dtype="float32", kv_offload=True,
                  device="cpu")  # fmt: skip
    predicted = estimate(ModelShape.from_config(BENCH), setup).host["kv_cache_and_saved"]
    assert predicted == pytest.approx(counted, rel=0.10)


def test_recommend_picks_largest_fitting_chunk():
    shape = ModelShape.from_config(BENCH)
    base = Setup(seq_len=8192, dtype="float32", reserve_gb=0.0)
    peak = {c: estimate(shape, Setup(**{**base.__dict__, "chunk_size": c})).total_bytes for c in (512, 1024)}
    assert peak[512] < peak[1024]
    rec = recommend(shape, Setup(**{**base.__dict__, "gpu_mem_gb": (peak[512] + peak[1024]) / 2 / GIB}))
    assert rec.chunk_size == 512 and rec.advice == []
    assert list(rec.tried) == [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert recommend(shape, Setup(**{**base.__dict__, "gpu_mem_gb": 100.0})).chunk_size == 8192


def test_recommend_says_what_helps_when_nothing_fits():
    """Full fine-tuning of an 8B model on 80 GiB: AdamW alone is 8.03e9 x 12 B = 90 GiB."""
    shape = ModelShape.from_config(LLAMA3_8B)
    rec = recommend(shape, Setup(seq_len=16384, gpu_mem_gb=80))
    assert rec.chunk_size is None
    assert rec.estimate.setup.chunk_size == 64  # the breakdown shown is the smallest chunk's
    advice = {line.split(":")[0]: line for line in rec.advice}
    assert "fits with chunk_size" in advice["offload the optimizer (zero_optimization.offload_optimizer)"]
    assert "still needs" in advice["chunkwise.kv_offload"]
    assert "fits" in advice["4-bit base weights + LoRA r=8 (QLoRA)"]
    hopeless = recommend(shape, Setup(seq_len=16384, gpu_mem_gb=4))
    assert hopeless.chunk_size is None and all("still needs" in line for line in hopeless.advice)


def test_plain_that_does_not_fit_suggests_seco():
    shape = ModelShape.from_config(BENCH)
    setup = Setup(seq_len=8192, method="plain", dtype="float32", reserve_gb=0.0, gpu_mem_gb=1.0)
    rec = recommend(shape, setup)  # plain: ~3.6 GiB of logits alone at T=8192
    assert rec.chunk_size is None
    assert rec.advice[0].startswith("chunk-wise training (SeCO): fits with chunk_size")


# A small GQA model (4 heads over 2 KV heads, so HF repeats K/V in the replays).
TINY = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)


def _measured_vs_planned(tmp_path, method: str, rate: float | None = None) -> tuple[float, float]:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    label = method if rate is None else f"spaco@{rate}"
    point = Point(method=label, seq_len=1024, chunk_size=128, model=str(config), repeats=1)
    result = run_point(point, cpus=None, timeout=300, what="memory")
    assert result["status"] == "ok", result
    setup = Setup(seq_len=1024, method=method, chunk_size=128, sparse_rate=rate, dtype="float32", device="cpu")
    return result["peak_mib"], estimate(ModelShape.from_config(config), setup).step_bytes / MIB


def test_planner_within_15_percent_of_measured_seco(tmp_path):
    measured, predicted = _measured_vs_planned(tmp_path, "seco")
    assert abs(predicted / measured - 1) < 0.15, (measured, predicted)


@pytest.mark.slow
@pytest.mark.parametrize("method,rate", [("plain", None), ("spaco", 0.5)])
def test_planner_within_15_percent_of_measured(tmp_path, method, rate):
    measured, predicted = _measured_vs_planned(tmp_path, method, rate)
    assert abs(predicted / measured - 1) < 0.15, (measured, predicted)


@pytest.mark.slow
def test_bench_records_oom_and_goes_on(tmp_path):
    """A limit half-way into the step's peak: recorded as OOM, and longer sequences are skipped."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    base = Point(method="plain", seq_len=1024, model=str(config), repeats=1)
    free = run_point(base, cpus=None, timeout=300, what="memory")
    limit_gb = (free["loaded_mib"] + free["peak_mib"] / 2) / 1024
    points = [dataclasses.replace(base, mem_limit_gb=limit_gb), dataclasses.replace(base, seq_len=2048)]
    rows = sweep(points, cpus=None, timeout=300, log=lambda line: None, what="memory")
    assert [r["status"] for r in rows] == ["OOM", "OOM"]
    assert "skipped" in rows[1]["error"]
    assert "| plain | 1024 | OOM |" in markdown_table(rows, "plain")


@pytest.mark.slow
def test_interleaved_timing_covers_every_point(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    base = Point(method="plain", seq_len=256, chunk_size=64, model=str(config), repeats=2)
    points = [base, dataclasses.replace(base, method="ckpt"), dataclasses.replace(base, method="spaco@0.5")]
    results = run_interleaved(points, cpus=None, timeout=300, draws=2)
    assert [r["status"] for r in results] == ["ok"] * 3
    assert [len(r["cpu_s_all"]) for r in results] == [2, 2, 4]  # rounds, SpaCO x draws
    assert results[2]["replayed_mean"] <= 4


def test_markdown_table_shows_host_memory_of_offload_points():
    common = dict(seq_len=4096, weights="full", device="cpu", status="ok", chunk_size=512, method="seco")
    rows = [
        dict(common, label="seco[512]", s_per_step=2.0, cpu_s_per_step=2.0, cpu_s_mean=2.0, peak_mib=400.0),
        dict(common, label="seco[512,offload]", kv_offload=True, cpu_s_per_step=2.5, cpu_s_mean=2.5, peak_mib=500.0,
             host_mib=300.0, s_per_step=2.5),
    ]  # fmt: skip
    lines = markdown_table(rows, "seco").splitlines()
    assert "host MiB" in lines[0]
    assert lines[3].split(" | ")[5:8] == ["500", "300", "1.25"]  # peak, host, time x seco (offload-free row)


def test_check_reads_what_the_bench_writes(tmp_path, capsys):
    """--check on a CSV the bench just wrote: kv_offload is written "False"/"True" and offload rows
    are left out; --config names the model the bench measured."""
    from ds_chunk import bench, plan

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    bench.main(["--seq-lens", "512", "--methods", "seco", "--chunk-sizes", "128", "--kv-offload", "false", "true",
                "--model", str(config), "--repeats", "1", "--measure", "memory", "--cpus", "none", "--out",
                str(tmp_path)])  # fmt: skip
    csv_path = tmp_path / "bench.csv"
    assert [r["kv_offload"] for r in csv.DictReader(open(csv_path))] == ["False", "True"]
    capsys.readouterr()
    assert plan.main(["--check", str(csv_path), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "over 1 measured points" in out
    error = float(out.split("largest error: ")[1].split("%")[0])
    assert error < 15


def test_plan_cli_exit_status(tmp_path, capsys):
    from ds_chunk import plan

    assert plan.main(["--config", str(tmp_path / "nope.json"), "--seq-len", "100"]) == 2
    assert capsys.readouterr().err.strip() == f"error: model config not found: {tmp_path / 'nope.json'}"
    fits = ["--config", "llama-3-8b", "--seq-len", "16384", "--quant", "4bit", "--lora-rank", "8", "--gpu-mem-gb"]
    assert plan.main([*fits, "80"]) == 0
    assert plan.main([*fits, "4"]) == 1  # does not fit: non-zero, so a script can test it
    assert "does not fit in 4.0 GiB" in capsys.readouterr().out
