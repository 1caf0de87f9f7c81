"""The CUDA-only paths, checked without a GPU: the arithmetic and the calls they make (CUDA
functions mocked, recording their arguments), and, where the same code runs on CPU, its
results. What only a GPU can tell (speed, overlap, Triton kernels) is listed in docs/models.md."""

import json
import os
import sys

import pytest
import torch
from models import grads, max_rel_err, tiny_model
from torch import nn

import ds_chunk.offload as offload
from ds_chunk import ChunkScheduler, loss_kernels
from ds_chunk.adapter import LMHead

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA, CUDA1, CPU = torch.device("cuda"), torch.device("cuda", 1), torch.device("cpu")


class Recorder:
    """Stands in for a torch.cuda function or object: records each call and its arguments."""

    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result if self.result is not None else self

    def __getattr__(self, name):  # any method: a recorder of its own
        if name.startswith("__"):
            raise AttributeError(name)
        method = Recorder()
        setattr(self, name, method)
        return method


def test_gpu_benchmark_caps_memory_by_the_devices_index(monkeypatch):
    """torch.device("cuda") has no index, which set_per_process_memory_fraction refuses."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import longest_seq_gpu

    props = type("Props", (), {"total_memory": 80 * 2**30})()
    cap = Recorder()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", cap)
    assert longest_seq_gpu.cap_device_memory(CUDA, longest_seq_gpu.BUDGET_GIB) == pytest.approx(22.5 / 80)
    assert cap.calls == [((22.5 / 80, 0), {})]  # an int index, never a device without one
    longest_seq_gpu.cap_device_memory(CUDA1, 24.0)
    assert cap.calls[-1][0][1] == 1
    assert longest_seq_gpu.BUDGET_GIB == 22.5  # a 24 GB card less its CUDA context, not 24


def test_float_quant_storage_under_deepspeed_bf16_is_refused(monkeypatch):
    from engine_ref import ds_config

    import ds_chunk

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29537")
    cfg = ds_config(2, False, 2, bf16=True)
    cfg["model"] = {
        "config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 1, "num_attention_heads": 4},
        "dtype": "bfloat16",
        "quantization": {"bits": 4, "compute_dtype": "bfloat16", "quant_storage": "float32"},
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
    }  # fmt: skip
    with pytest.raises(
        ValueError, match='quant_storage = float32 with bf16.enabled: .*use "quant_storage": "bfloat16"'
    ):
        ds_chunk.initialize(config=cfg)
    cfg["model"]["quantization"]["quant_storage"] = "bfloat16"  # what survives DeepSpeed's cast
    engine, *_ = ds_chunk.initialize(config=cfg)
    assert torch.isfinite(engine.train_batch({"input_ids": torch.randint(0, 64, (2, 32))}))


def _head(dtype) -> LMHead:
    return LMHead(nn.Linear(8, 11, bias=False, dtype=dtype))


def test_cce_only_on_16_bit_weights(monkeypatch):
    """CCE's backward asserts fp16/bf16 and its kernels ignore autocast: float32 weights are
    refused, under autocast too (HF Trainer bf16 on fp32 weights, prepared k-bit models)."""
    monkeypatch.setattr(loss_kernels, "installed", lambda kernel: kernel != "liger")
    monkeypatch.setattr(loss_kernels, "CCE_IMPL", "cce")
    assert loss_kernels.pick(None, _head(torch.bfloat16), CUDA, torch.bfloat16) == "cce"
    assert loss_kernels.pick(None, _head(torch.float32), CUDA, torch.float32) == "torch"
    assert loss_kernels.pick(None, _head(torch.float32), CUDA, torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="not torch.float32 under torch.bfloat16 autocast .*ignore autocast"):
        loss_kernels.pick("cce", _head(torch.float32), CUDA, torch.bfloat16)


def test_liger_is_passed_over_where_its_blocks_would_be_smaller_than_ours(monkeypatch):
    """Liger cuts every call into ceil(V / H) blocks of rows: Llama-3 (V 128256, H 4096), 32."""
    monkeypatch.setattr(loss_kernels, "installed", lambda kernel: True)
    head = LMHead(nn.Linear(4096, 128256, bias=False, dtype=torch.bfloat16, device="meta"))
    assert loss_kernels.liger_blocks(head) == 32
    pick = lambda rows, sub: loss_kernels.pick(None, head, CUDA, torch.bfloat16, rows, sub)  # noqa: E731
    assert pick(128, 128) == "cce"  # chunk 128: 32 blocks of 4 rows, ours one of 128
    assert pick(1024, 64) == "cce"  # 32 blocks of 32 rows; ours 16 of 64
    assert pick(4096, 128) == "liger"  # 32 blocks of 128 rows: as many head reads as ours
    assert pick(4096, None) == "cce"  # ours reads the head once per chunk
    assert pick(None, None) == "liger"  # rows unknown: as before
    assert loss_kernels.pick("liger", head, CUDA, torch.bfloat16, 128, 128) == "liger"  # asked for: honoured


def test_shipped_gpu_configs_use_chunks_that_fit_a_24gb_card():
    from ds_chunk.plan import LLAMA3_8B, ModelShape, Setup, estimate

    for name in ("qlora_zero1_offload_24gb.json", "qlora8bit_zero1_offload_24gb.json",
                 "qlora_zero1_offload_spaco_24gb.json"):  # fmt: skip
        with open(os.path.join(ROOT, "ds_configs", name)) as f:
            cfg = json.load(f)
        chunk, sub = cfg["chunkwise"]["chunk_size"], cfg["chunkwise"]["loss_chunk_size"]
        assert chunk >= 1024, name  # 128 makes bitsandbytes dequantize every weight per 128 tokens
        quant = f"{cfg['model']['quantization']['bits']}bit"
        setup = Setup(seq_len=16384, chunk_size=chunk, loss_chunk_size=sub, quant=quant, lora_rank=8, zero_stage=1,
                      offload_optimizer=True)  # fmt: skip
        assert estimate(ModelShape.from_config(LLAMA3_8B), setup).total_bytes < 22.5 * 2**30, name


def test_attention_computes_in_the_autocast_dtype(monkeypatch):
    """Flash eligibility reads autocast's dtype, not the fp32 parameters'."""
    from ds_chunk.attention import compute_dtype

    model = tiny_model("llama", dtype=torch.float32)
    assert compute_dtype(model, CUDA) == torch.float32
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda kind="cpu": kind == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda kind: torch.bfloat16)
    assert compute_dtype(model, CUDA) == torch.bfloat16


def test_kv_leaves_are_kept_in_the_autocast_dtype(monkeypatch):
    """fp32 weights under bf16 autocast: q/k/v leave RoPE in fp32; attention casts them anyway,
    so the cache keeps them in bf16 (half the memory) and the chunk attention casts q/k/v as
    SDPA would. The gradient stays the one of full backprop under the same autocast."""
    from ds_chunk.kv import KVStore

    stored, put = [], KVStore.put
    monkeypatch.setattr(KVStore, "put", lambda self, layer, k, v: stored.append(k.dtype) or put(self, layer, k, v))
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = ChunkScheduler({"chunk_size": 16}).backward(model, ids)
    got = grads(model)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    loss.backward()
    assert set(stored) == {torch.bfloat16}
    assert float(result.loss) == pytest.approx(loss.item(), rel=1e-2)
    assert max_rel_err(got, grads(model)) < 0.05  # bf16 rounding, chunk by chunk


def test_quantized_models_go_to_their_ranks_gpu(monkeypatch):
    """bitsandbytes quantizes onto the current CUDA device: LOCAL_RANK's, set before loading."""
    from transformers import AutoModelForCausalLM

    from ds_chunk.model import ModelConfig, build_model

    set_device, load = Recorder(), Recorder()

    def from_pretrained(*args, **kwargs):
        load(*args, **kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    recipe = {"config": {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 1, "num_attention_heads": 4},
              "dtype": "float32", "quantization": {"bits": 4, "compute_dtype": "float32"}}  # fmt: skip
    for block in (recipe, {"name_or_path": ROOT, **{k: v for k, v in recipe.items() if k != "config"}}):
        with pytest.raises(RuntimeError, match="stop here"):
            build_model(ModelConfig.from_dict(block))
        assert set_device.calls[-1] == ((1,), {}) and load.calls[-1][1]["device_map"] == {"": 1}


def test_rng_tape_uses_the_inputs_device(monkeypatch):
    """A model on cuda:1 without set_device(1): the tape saves and restores cuda:1's generator."""
    from ds_chunk.rng import RngTape

    get, set_ = Recorder(torch.zeros(1)), Recorder()
    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_)
    tape = RngTape(CUDA1)
    tape.record(0)
    tape.replay(0)
    assert get.calls == [((CUDA1,), {})] and set_.calls[0][0][1] == CUDA1


def test_one_side_stream_per_device(monkeypatch):
    made = Recorder(object())
    monkeypatch.setattr(torch.cuda, "Stream", made)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    offload._side_stream.cache_clear()
    try:
        streams = {id(offload.side_stream(d)) for d in (CUDA, torch.device("cuda", 0), CUDA)}
        assert len(streams) == 1 and len(made.calls) == 1  # every step, the same stream
        offload.side_stream(CUDA1)
        assert len(made.calls) == 2
    finally:
        offload._side_stream.cache_clear()


def test_offload_gradients_go_back_on_the_side_stream_with_an_event(monkeypatch):
    """kv_offload's backward: each fetched leaf's gradient is copied to the host by
    ``copy_to_host`` on the side stream, and added into the leaf once its event is done
    (not by autograd's blocking copy to pageable memory, in its thread)."""
    from ds_chunk.kv import KVStore

    events, copies = [], []

    class Event:
        done = False

        def synchronize(self):
            self.done = True

    def copy_to_host(t, host, stream):
        copies.append(stream)
        events.append(Event())
        return t.detach().clone(), events[-1]

    monkeypatch.setattr(offload, "copy_to_host", copy_to_host)
    store = KVStore(1, CPU)
    for c in range(2):
        store.put(0, torch.full((1, 2, 4, 8), float(c)), torch.full((1, 2, 4, 8), 10.0 + c))
    store.require_grad([0, 1])
    ks, vs = store.fetcher(2, CPU).fetch(0, CPU)
    store.stream = side = object()  # as on CUDA: fetches made from now on send gradients back on it
    ks2, vs2 = store.fetcher(2, CPU).fetch(0, CPU)
    (torch.cat(ks2, -2).sum() * 2 + torch.cat(vs2, -2).sum()).backward()
    assert copies == [side] * 4 and store.keys[0][0].grad is None  # nothing added in autograd's thread
    assert not any(e.done for e in events)
    store.flush()
    assert all(e.done for e in events) and store.keys[0][0].grad.eq(2).all() and store.values[0][1].grad.eq(1).all()


def test_saved_tensors_wait_for_their_copy_before_coming_back(monkeypatch):
    """With a side stream, SaveOnHost's copies carry an event that backward waits for."""
    waited, made = [], []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    def copy_to_host(t, host, stream):
        made.append(object())
        return t.detach().clone(), made[-1]

    monkeypatch.setattr(offload, "copy_to_host", copy_to_host)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    x = torch.randn(4, 8, requires_grad=True)
    with offload.SaveOnHost(nn.Identity(), CPU, offload.HostMemory(), stream=object()):
        y = (x.sin() * x.cos()).sum()
    y.backward()
    assert made and set(map(id, waited)) == set(map(id, made))
    assert torch.allclose(x.grad, torch.cos(2 * x.detach()), atol=1e-5)  # d/dx sin x cos x
