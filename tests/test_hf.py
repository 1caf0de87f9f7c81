"""ChunkwiseTrainer / with_chunkwise(SFTTrainer) against the parent class without chunking:
same seed, data and arguments give the same trained weights and logged losses."""

import json
import os
import sys

import pytest
import torch
from models import tiny_model
from transformers import Trainer, TrainingArguments

from ds_chunk.data import collate
from ds_chunk.hf import ChunkwiseTrainer, ChunkwiseTrainerError, with_chunkwise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _single_process():
    """One process, and the environment restored after: TrainingArguments(deepspeed=...) sets
    ACCELERATE_* variables that would send later tests (launch/train.py) down accelerate's path."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        del os.environ[key]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    yield
    os.environ.clear()
    os.environ.update(saved)


class Rows(torch.utils.data.Dataset):
    """Sequences of 20-47 tokens (right padding in a batch), the first third unsupervised."""

    def __init__(self, n: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(20, 48, (1,), generator=g))
            ids = torch.randint(0, 97, (length,), generator=g)
            labels = ids.clone()
            labels[: length // 3] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _args(out, **overrides):
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2,
              lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=0.5, logging_steps=1, save_strategy="no",
              report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0)  # fmt: skip
    return TrainingArguments(str(out), **{**kw, **overrides})


def _fresh_accelerate():
    """A second Trainer in one process needs accelerate's global state (DeepSpeed plugin) reset."""
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)
    unset_hf_deepspeed_config()


def _train(cls, out, model=None, args=None, **kw):
    _fresh_accelerate()
    model = model if model is not None else tiny_model("llama", dtype=torch.float32, seed=0)
    trainer = cls(model=model, args=args or _args(out), train_dataset=Rows(), data_collator=collate, **kw)
    trainer.train()
    return trainer


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


def _update_err(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module) -> float:
    """max over parameters of ||w_a - w_b|| / ||w_a - w_start||: the trained change, compared."""
    pa, pb, p0 = (dict(m.named_parameters()) for m in (a, b, start))
    errs = [float((pa[k] - pb[k]).norm() / (pa[k] - p0[k]).norm()) for k in pa if pa[k].requires_grad]
    return max(errs)


CHUNK = {"chunk_size": 8}


def test_trainer_fp32_padding_accumulation_clipping_schedule(tmp_path):
    start = tiny_model("llama", dtype=torch.float32, seed=0)
    parent = _train(Trainer, tmp_path / "a")
    ours = _train(ChunkwiseTrainer, tmp_path / "b", chunkwise=CHUNK)
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    assert _update_err(ours.model, parent.model, start) < 1e-4
    assert ours.state.global_step == parent.state.global_step == 4


def test_trainer_bf16_autocast(tmp_path):
    start = tiny_model("llama", dtype=torch.float32, seed=0)
    parent = _train(Trainer, tmp_path / "a", args=_args(tmp_path / "a", bf16=True))
    ours = _train(ChunkwiseTrainer, tmp_path / "b", args=_args(tmp_path / "b", bf16=True), chunkwise=CHUNK)
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-2)
    assert _update_err(ours.model, parent.model, start) < 0.1  # bf16 matmuls: rounding differs per chunk


def test_trainer_peft_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    def lora():
        model = tiny_model("llama", dtype=torch.float32, seed=0)
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    start = lora()
    parent = _train(Trainer, tmp_path / "a", model=lora())
    ours = _train(ChunkwiseTrainer, tmp_path / "b", model=lora(), chunkwise=CHUNK)
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    assert _update_err(ours.model, parent.model, start) < 1e-4


def test_neftune_noise_is_the_parents(tmp_path):
    """transformers' hook scales the noise by the embedding call's length (one chunk): the step
    adds each chunk's slice of the row's noise, drawn as the parent draws it."""
    start = tiny_model("llama", dtype=torch.float32, seed=0)
    parent = _train(Trainer, tmp_path / "a", args=_args(tmp_path / "a", neftune_noise_alpha=5.0))
    ours = _train(ChunkwiseTrainer, tmp_path / "b", args=_args(tmp_path / "b", neftune_noise_alpha=5.0),
                  chunkwise=CHUNK)  # fmt: skip
    quiet = _train(Trainer, tmp_path / "c")
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    assert _update_err(ours.model, parent.model, start) < 1e-4
    assert _update_err(quiet.model, parent.model, start) > 0.1  # the noise is large enough to tell


def test_reentrant_gradient_checkpointing_equals_the_parent(tmp_path):
    """Reentrant checkpointing is switched to non-reentrant for the chunk calls: the same gradient."""
    start = tiny_model("llama", dtype=torch.float32, seed=0)
    ckpt = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}
    parent = _train(Trainer, tmp_path / "a", args=_args(tmp_path / "a", **ckpt))
    ours = _train(ChunkwiseTrainer, tmp_path / "b", args=_args(tmp_path / "b", **ckpt), chunkwise=CHUNK)
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    assert _update_err(ours.model, parent.model, start) < 1e-4


@pytest.mark.parametrize("stage, offload", [(2, False), (2, True), (3, True)])
def test_trainer_deepspeed_block_in_the_json(tmp_path, stage, offload):
    """The block comes from TrainingArguments(deepspeed=...): the parent trains unchunked from the
    same file. ZeRO-3: the chunk forwards and backwards go through the engine, every rank alike;
    with offload, parameters and optimizer states on the CPU."""
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "chunkwise": CHUNK}  # fmt: skip
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these small ones
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    else:
        cfg["zero_force_ds_cpu_optimizer"] = False
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    _fresh_accelerate()  # no ZeRO-3 config left global by an earlier test: it would partition `start` at birth
    start = tiny_model("llama", dtype=torch.float32, seed=0)
    parent = _train(Trainer, tmp_path / "a", args=_args(tmp_path / "a", deepspeed=str(path)))
    ours = _train(ChunkwiseTrainer, tmp_path / "b", args=_args(tmp_path / "b", deepspeed=str(path)))
    assert ours.chunkwise.chunk_size == 8
    assert ours.model_wrapped.global_steps == parent.model_wrapped.global_steps == 4  # one engine step each
    assert ours.model_wrapped.zero_optimization_stage() == stage
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    params = [*ours.model.parameters(), *parent.model.parameters()]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        assert _update_err(ours.model, parent.model, start) < 1e-4
    _fresh_accelerate()


# A chat template with {% generation %} markers, so TRL can build assistant masks.
CHAT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}{{ m['content'] }} <eos>"
    "{% endgeneration %} {% else %}{{ m['role'] }}: {{ m['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
SFT_MODES = {  # SFTConfig options and the dataset kind they need
    "completion_only_loss": ({"completion_only_loss": True}, "prompt"),
    "assistant_only_loss": ({"assistant_only_loss": True}, "messages"),
    "packing_wrapped": ({"packing": True, "packing_strategy": "wrapped"}, "text"),
}


def _sft_data(kind: str):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    words = [f"w{i}" for i in range(40)]

    def sentence(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(words[int(i)] for i in torch.randint(0, 40, (n,), generator=g))

    if kind == "prompt":
        rows = [{"prompt": sentence(10, 30), "completion": " " + sentence(6, 7)} for _ in range(16)]
    elif kind == "messages":
        turns = ("user", "assistant", "user", "assistant")
        rows = [{"messages": [{"role": r, "content": sentence(4, 12)} for r in turns]} for _ in range(16)]
    else:
        rows = [{"text": sentence(10, 40)} for _ in range(24)]
    return Dataset.from_list(rows), words


def _sft(cls, out, mode, chunkwise=None, bf16=False, dtype=torch.float32, make=None, **options):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import make_tiny_model
    from trl import SFTConfig

    extra = options
    options, kind = SFT_MODES[mode] if isinstance(mode, str) else mode
    data, words = _sft_data(kind)
    tokenizer = make_tiny_model.make_tokenizer(words)
    tokenizer.chat_template = CHAT
    make = make or (lambda: make_tiny_model.make_model(len(tokenizer), seed=0))
    model, start = make().to(dtype), make().to(dtype)
    args = SFTConfig(str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                     learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=bf16,
                     seed=0, dataloader_num_workers=0, **{"max_length": 48, **options, **extra})  # fmt: skip
    kw = {} if chunkwise is None else {"chunkwise": chunkwise}
    _fresh_accelerate()
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer, **kw)
    trainer.train()
    return trainer, start


@pytest.mark.parametrize("mode", list(SFT_MODES))
def test_sft_trainer_label_conventions(tmp_path, mode):
    """SFTConfig's defaults say bf16=True: both sides run float64 here, like with like.

    Not fp32: Adam's eps=1e-8 turns fp32 rounding (chunked sums in another order) on
    near-zero gradient entries into update errors of ~1.5e-4 after 3 steps, varying with
    the thread count; in float64 (HF's RMSNorm still rounds through fp32) they are ~6e-6.
    """
    from trl import SFTTrainer

    parent, start = _sft(SFTTrainer, tmp_path / "a", mode, dtype=torch.float64)
    ours, _ = _sft(with_chunkwise(SFTTrainer), tmp_path / "b", mode, chunkwise=CHUNK, dtype=torch.float64)
    assert type(ours).__name__ == "ChunkwiseSFTTrainer" and isinstance(ours, SFTTrainer)
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-5)
    assert _update_err(ours.model, parent.model, start) < 1e-4


PACKED_MODES = {  # SFTConfig settings whose rows hold several documents, position_ids restarting at each
    "bfd": ({"packing": True}, "text"),
    "bfd_split": ({"packing": True, "packing_strategy": "bfd_split"}, "text"),
    "padding_free": ({"padding_free": True, "max_length": None}, "text"),
    "bfd_completion_only": ({"packing": True, "completion_only_loss": True}, "prompt"),
    "bfd_assistant_only": ({"packing": True, "assistant_only_loss": True}, "messages"),
}
SFT_METRICS = ("loss", "entropy", "mean_token_accuracy", "num_tokens", "grad_norm")


def test_sft_packing_with_attention_that_cannot_keep_documents_apart_is_refused_at_once(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import make_tiny_model
    from trl import SFTTrainer

    def flash(*args, **kwargs):  # no flash-attn here: only the setting is read before training
        model = make(*args, **kwargs)
        model.config._attn_implementation_internal = "flash_attention_2"
        return model

    make = make_tiny_model.make_model
    monkeypatch.setattr(make_tiny_model, "make_model", flash)
    with pytest.raises(ChunkwiseTrainerError, match="padding_free / packing_strategy 'bfd': LlamaForCausalLM: "
                       "packed rows .* attn_implementation='flash_attention_2'"):  # fmt: skip
        _sft(with_chunkwise(SFTTrainer), tmp_path, PACKED_MODES["bfd"], {"chunk_size": 5})


@pytest.mark.parametrize("chunk, dtype", [(5, torch.float64), (64, torch.float64), (5, torch.float32)])
@pytest.mark.parametrize("mode", list(PACKED_MODES))
def test_sft_packed_documents_equal_the_parent(tmp_path, mode, chunk, dtype):
    """TRL's padding-free rows (documents one after another, position_ids restarting, no
    attention mask): the parent's full forward keeps the documents apart, and so must the
    chunks, whether a chunk cuts a document (5) or holds several (64). SGD, so the update
    error is the gradient's (Adam's eps turns float32 rounding of near-zero gradient entries
    into update errors of ~2e-4); float64 (TRL's fused LM head still sums in float32) and
    float32. SFTTrainer's own metrics, logged from the chunk pass, equal its own."""
    from trl import SFTTrainer

    options, kind = PACKED_MODES[mode]
    setting = ({**options, "optim": "sgd"}, kind)
    parent, start = _sft(SFTTrainer, tmp_path / "a", setting, dtype=dtype)
    ours, _ = _sft(with_chunkwise(SFTTrainer), tmp_path / "b", setting, {"chunk_size": chunk}, dtype=dtype)
    for key in SFT_METRICS:
        assert _losses(ours, key) == pytest.approx(_losses(parent, key), rel=1e-5), key
    # measured: float64 1.5e-7, float32 2e-5 to 9e-5
    assert _update_err(ours.model, parent.model, start) < (1e-6 if dtype == torch.float64 else 3e-4)
    assert len(_losses(parent, "entropy")) == 3


def test_resume_gives_the_same_losses_and_spaco_draws(tmp_path):
    spaco = {"chunk_size": 8, "sparse": {"rate": 0.5}}
    full = _train(ChunkwiseTrainer, tmp_path / "a", chunkwise=spaco)
    args = _args(tmp_path / "b", save_strategy="steps", save_steps=2)
    _train(ChunkwiseTrainer, tmp_path / "b", args=args, chunkwise=spaco)
    model = tiny_model("llama", dtype=torch.float32, seed=0)
    _fresh_accelerate()
    resumed = ChunkwiseTrainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, chunkwise=spaco)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert len(_losses(resumed, "loss_est")) == 4  # the first two come back with the trainer state
    assert _losses(resumed, "loss_est")[2:] == _losses(full, "loss_est")[2:]
    assert _losses(full) == []  # SpaCO's free loss is an estimate: logged as loss_est, never as loss


def test_zero3_saves_and_resumes_through_the_trainer(tmp_path):
    """ZeRO-3 from the JSON (the block in it, SpaCO): a run saved at step 2 and resumed with
    resume_from_checkpoint logs the losses of an uninterrupted run."""
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_force_ds_cpu_optimizer": False,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "chunkwise": {"chunk_size": 8, "sparse": {"rate": 0.5}}}  # fmt: skip
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    full = _train(ChunkwiseTrainer, tmp_path / "a", args=_args(tmp_path / "a", deepspeed=str(path)))
    args = _args(tmp_path / "b", deepspeed=str(path), save_strategy="steps", save_steps=2)
    _train(ChunkwiseTrainer, tmp_path / "b", args=args)
    _fresh_accelerate()
    resumed = ChunkwiseTrainer(model=tiny_model("llama", dtype=torch.float32, seed=0), args=args,
                               train_dataset=Rows(), data_collator=collate)  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed.model_wrapped.zero_optimization_stage() == 3
    assert len(_losses(resumed, "loss_est")) == 4
    assert _losses(resumed, "loss_est")[2:] == pytest.approx(_losses(full, "loss_est")[2:], rel=1e-6)
    _fresh_accelerate()


def test_evaluate_is_chunkwise_and_equals_the_parent(tmp_path):
    model = tiny_model("llama", dtype=torch.float32, seed=0)
    args = _args(tmp_path, per_device_eval_batch_size=3)
    _fresh_accelerate()
    parent = Trainer(model=model, args=args, eval_dataset=Rows(7, seed=3), data_collator=collate)
    _fresh_accelerate()
    ours = ChunkwiseTrainer(model=model, args=args, eval_dataset=Rows(7, seed=3), data_collator=collate,
                            chunkwise=CHUNK)  # fmt: skip
    want, got = parent.evaluate(), ours.evaluate()
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    assert got["eval_perplexity"] == pytest.approx(torch.tensor(want["eval_loss"]).exp().item(), rel=1e-6)


def test_no_block_trains_exactly_as_the_parent(tmp_path, caplog):
    parent = _train(Trainer, tmp_path / "a")
    with caplog.at_level("WARNING", logger="ds_chunk"):
        ours = _train(ChunkwiseTrainer, tmp_path / "b")
    assert _losses(ours) == _losses(parent)  # bitwise: the parent's own step
    assert "no chunkwise block" in caplog.text and "training exactly as Trainer" in caplog.text


def test_what_cannot_be_chunked_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from ds_chunk import ConfigError, UnsupportedModelError

    def make(args=None, model=None, cls=ChunkwiseTrainer, chunkwise=CHUNK, **kw):
        model = model if model is not None else tiny_model("llama", dtype=torch.float32, seed=0)
        _fresh_accelerate()
        return cls(model=model, args=args or _args(tmp_path), train_dataset=Rows(), data_collator=collate,
                   chunkwise=chunkwise, **kw)  # fmt: skip

    with pytest.raises(ConfigError, match="chunkwise.chunk_size = 0: expected an integer >= 1"):
        make(chunkwise={"chunk_size": 0})
    with pytest.raises(ChunkwiseTrainerError, match="compute_loss_func is set"):
        make(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)
    with pytest.raises(ChunkwiseTrainerError, match="label_smoothing_factor = 0.1"):
        make(args=_args(tmp_path, label_smoothing_factor=0.1))

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model(**inputs).loss * 2

    with pytest.raises(ChunkwiseTrainerError, match="OwnLoss.compute_loss is overridden"):
        make(cls=with_chunkwise(OwnLoss))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=97, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        make(model=t5)
    trainer = make()
    packed = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 0, 1]])}
    assert trainer._chunk_inputs(packed)[3] is packed["position_ids"]  # packed documents: taken on
    with pytest.raises(ChunkwiseTrainerError, match=r"cu_seq_lens_q'\] = \[0, 4\] disagrees .* \(\[0, 2, 4\]\)"):
        trainer._chunk_inputs({**packed, "cu_seq_lens_q": torch.tensor([0, 4], dtype=torch.int32)})
    with pytest.raises(ChunkwiseTrainerError, match="inputs \\['token_type_ids'\\]"):
        trainer._chunk_inputs({"input_ids": torch.zeros(1, 4, dtype=torch.long), "token_type_ids": torch.zeros(1, 4)})


TWO_RANKS = {"ddp": (None, 1), "zero1": (1, 1), "zero3": (3, 1), "zero1_sp2": (1, 2), "zero3_sp2": (3, 2)}


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """tests/scripts/hf_two_rank.py's cases of TWO_RANKS in one torchrun launch: {case: result}."""
    import subprocess

    from test_ranks import free_port

    out, flags = tmp_path_factory.mktemp("hf_two_ranks"), []
    for name, (zero, sp) in TWO_RANKS.items():
        case = ""
        if zero is not None:
            path = out / f"{name}.json"
            zero_cfg = {"stage": zero, "stage3_param_persistence_threshold": 0}  # ZeRO-3: partition even small ones
            path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                        "gradient_clipping": "auto", "zero_force_ds_cpu_optimizer": False,
                                        "zero_optimization": zero_cfg}))  # fmt: skip
            case = f"--deepspeed {path} --sp {sp}"
        flags += ["--case", f"{name}={case}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    script = os.path.join(os.path.dirname(__file__), "scripts", "hf_two_rank.py")
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), script, "--out", str(out), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "rror:" in line]
    assert proc.returncode == 0, "\n".join(errors[:40]) + proc.stderr[-2000:]
    return {name: torch.load(out / f"{name}.pt") for name in TWO_RANKS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_ranks_equal_the_parent(two_rank_runs, name):
    """torchrun, 2 CPU ranks (gloo), one row each (rows of different lengths): DistributedDataParallel,
    or DeepSpeed ZeRO-1, or ZeRO-3 (every rank padded to the longer row, one joint schedule). sp2:
    accelerate's ParallelismConfig(sp_backend="deepspeed", sp_size=2), each sequence over both
    ranks, against the parent's own Ulysses step (DeepSpeed's ALST)."""
    result, zero = two_rank_runs[name], TWO_RANKS[name][0]
    assert result["ours"]["kind"] == ("DeepSpeedEngine" if zero else "DistributedDataParallel")
    assert result["ours"]["losses"] == pytest.approx(result["parent"]["losses"], rel=1e-5)
    start = dict(tiny_model("llama", dtype=torch.float32, seed=0).named_parameters())
    pa, pb = result["parent"]["params"], result["ours"]["params"]
    assert max(float((pa[k] - pb[k]).norm() / (pa[k] - start[k]).norm()) for k in pa) < 1e-4


@pytest.mark.parametrize("which", ["trl", "hf", "trl --packing"])
def test_launch_example_runs_offline(tmp_path, which):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import sft_trl

    _fresh_accelerate()
    argv = ["--trainer", *which.split(), "--max-steps", "3", "--output-dir", str(tmp_path)]
    trainer, metrics = sft_trl.main(argv)
    assert trainer.chunkwise.chunk_size == 16 and trainer.state.global_step == 3
    assert metrics["eval_perplexity"] == pytest.approx(torch.tensor(metrics["eval_loss"]).exp().item(), rel=1e-6)
    if which.startswith("trl"):  # SFTTrainer's own metrics, in training and evaluation
        assert 0 <= metrics["eval_mean_token_accuracy"] <= 1 and metrics["eval_entropy"] > 0
        assert any("mean_token_accuracy" in h and "num_tokens" in h for h in trainer.state.log_history)
