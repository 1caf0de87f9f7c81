"""launch/train.py: resume equality, atomic checkpoints, one-line errors (both launchers: tests/test_docs.py
runs docs/launch.md's block)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import train  # noqa: E402

SMALL = ["--seq-len", "128", "--chunk-size", "32", "--eval-every", "1000", "--eval-batches", "1"]


@pytest.fixture(autouse=True)
def _port(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", "29521")


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


def test_resume_continues_exactly(tmp_path):
    full = _losses(train.main([*SMALL, "--max-steps", "6", "--output-dir", str(tmp_path / "a")]))
    first = train.main([*SMALL, "--max-steps", "3", "--save-every", "3", "--output-dir", str(tmp_path / "b")])
    rest = train.main([*SMALL, "--max-steps", "6", "--resume", "--output-dir", str(tmp_path / "b")])
    assert _losses(first) + _losses(rest) == full  # bitwise: same data, optimizer state and step count
    assert os.path.isfile(tmp_path / "b" / "checkpoints" / "step_3" / "model" / "config.json")


def test_resume_with_lora_dropout_is_exact_and_adapter_loads(tmp_path):
    from peft import PeftModel

    args = [*SMALL, "--lora-r", "4", "--lora-dropout", "0.2"]
    full = _losses(train.main([*args, "--max-steps", "4", "--output-dir", str(tmp_path / "a")]))
    train.main([*args, "--max-steps", "2", "--save-every", "2", "--output-dir", str(tmp_path / "b")])
    rest = train.main([*args, "--max-steps", "4", "--resume", "--output-dir", str(tmp_path / "b")])
    assert _losses(rest) == full[2:]  # the dropout masks continue too (RNG state is saved)
    from ds_chunk.model import ModelConfig, build_model

    with open(os.path.join(train.CONFIGS, "recall_cpu.json")) as f:
        base = build_model(ModelConfig.from_dict(json.load(f)["model"]))
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "b" / "checkpoints" / "step_2" / "adapter"))
    assert any("lora_A" in n for n, _ in adapter.named_parameters())


def test_kv_offload_trains_the_same_and_reports_host_memory(tmp_path):
    args = [*SMALL, "--max-steps", "2"]
    plain = train.main([*args, "--output-dir", str(tmp_path / "a")])
    offload = train.main([*args, "--kv-offload", "--output-dir", str(tmp_path / "b")])
    assert _losses(offload) == _losses(plain)  # the copies move values, never change them
    steps = [r for r in offload if "loss" in r]
    assert all(0 < r["kv_host_gb"] <= r["host_gb"] for r in steps)
    assert "kv_host_gb" not in plain[0] and plain[0]["host_gb"] > 0


def test_spaco_resume_replays_the_same_draws(tmp_path):
    args = [*SMALL, "--sparse-rate", "0.5"]
    full = train.main([*args, "--max-steps", "4", "--output-dir", str(tmp_path / "a")])
    train.main([*args, "--max-steps", "2", "--save-every", "2", "--output-dir", str(tmp_path / "b")])
    rest = train.main([*args, "--max-steps", "4", "--resume", "--output-dir", str(tmp_path / "b")])
    steps = [r for r in full if "replayed" in r]
    assert [r["replayed"] for r in rest if "replayed" in r] == [r["replayed"] for r in steps][2:]
    # SpaCO logs its unbiased estimate by default, under its own name
    assert [r["loss_est"] for r in rest if "loss_est" in r] == [r["loss_est"] for r in steps][2:]
    assert len(steps) == 4 and not any("loss" in r for r in steps)
    assert all(r["step_s"] > 0 for r in steps)  # wall seconds per step, for quality per second


def test_a_config_schedule_of_another_length_is_said(tmp_path):
    args = ["--task", "passkey", "--max-steps", "1", "--eval-batches", "1", "--output-dir", str(tmp_path)]
    with pytest.warns(UserWarning, match="total_num_steps = 300, but this run takes 1 optimizer steps"):
        train.main(args)


def test_eval_only_of_a_checkpoint_equals_the_runs_own_evaluation(tmp_path):
    """--eval-only logs one evaluation and trains nothing; of a checkpoint, the run's own numbers."""
    run = train.main([*SMALL, "--max-steps", "3", "--eval-every", "3", "--output-dir", str(tmp_path / "a")])
    want = next(r for r in run if "eval_loss" in r)
    base = train.main([*SMALL, "--eval-only", "--output-dir", str(tmp_path / "b")])
    assert [sorted(r) for r in base] == [sorted(want)] and base[0]["step"] == 0
    assert base[0]["eval_loss"] != want["eval_loss"]  # the untrained model
    ckpt = tmp_path / "a" / "checkpoints" / "step_3"
    again = train.main([*SMALL, "--eval-only", "--resume-from", str(ckpt), "--output-dir", str(tmp_path / "c")])
    assert again == [want]


def test_always_replay_flag_sets_the_sparse_block():
    cfg = train.load_config(train.parse_args(["--sparse-rate", "0.25", "--always-replay", "supervised"]))
    assert cfg["chunkwise"]["sparse"] == {"rate": 0.25, "always_replay": "supervised"}


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from ds_chunk import checkpoint

    out = tmp_path / "run"
    train.main([*SMALL, "--max-steps", "2", "--save-every", "2", "--output-dir", str(out)])

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        train.main([*SMALL, "--max-steps", "4", "--save-every", "2", "--resume", "--output-dir", str(out)])
    monkeypatch.undo()
    assert checkpoint.latest(str(out / "checkpoints")).endswith("step_2")
    monkeypatch.setenv("MASTER_PORT", "29521")
    rest = train.main([*SMALL, "--max-steps", "3", "--resume", "--output-dir", str(out)])
    assert [r["step"] for r in rest if "loss" in r] == [3]


def _cli(*args, launcher=(), timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [*launcher, *(["launch/train.py"] if launcher else [sys.executable, "launch/train.py"]), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.jsonl"], "error: data file not found: missing.jsonl"),
        (["--deepspeed_config", "nope.json"], "error: DeepSpeed config not found: nope.json"),
        (["--chunk-size", "0"], "error: chunkwise.chunk_size = 0: expected an integer >= 1"),
        (
            ["--seq-len", "10000"],
            "error: sequence of 10000 tokens exceeds the 8192 positions the model takes (max_position_embeddings "
            "times any RoPE scaling factor; model.rope_scaling extends it)",
        ),
    ],
)
def test_errors_are_one_line(args, message):
    proc = _cli(*args, "--max-steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in proc.stderr


def test_dataset_errors(tmp_path):
    from ds_chunk.data import TokenizedDataset, load_records

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_records(str(empty))

    class Tok:  # whitespace tokenizer: enough to exercise the record handling
        eos_token_id, chat_template = 0, None

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    with pytest.raises(ValueError, match="no example with a supervised token"):
        TokenizedDataset([{"prompt": "a b c d", "response": "x"}], Tok(), seq_len=3)
    with pytest.raises(ValueError, match="record 0: expected a 'text'"):
        TokenizedDataset([{"content": "?"}], Tok(), seq_len=8)
    data = TokenizedDataset([{"prompt": "a bb", "response": "ccc"}, {"text": "a b c d e"}], Tok(), seq_len=4)
    labels = [e["labels"].tolist() for e in data.examples]
    assert [-100, -100, 3, 0] in labels  # instruction: loss on the answer (+ eos) only


def test_chat_template_records():
    """A real fast tokenizer with a chat template (built offline): loss on the answer only."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "user:", "assistant:", "hi", "there", "ok"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant: "
    from ds_chunk.data import TokenizedDataset

    rec = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "ok"}]}
    (example,) = TokenizedDataset([rec], fast, seq_len=16).examples
    assert example["input_ids"].tolist() == [2, 4, 5, 3, 6, 0]
    assert example["labels"].tolist() == [-100, -100, -100, -100, 6, 0]


def test_sigterm_saves_and_resume_finishes_as_an_uninterrupted_run(tmp_path):
    """A preempted job: SIGTERM mid-run finishes the step, checkpoints it, says how to resume, exits
    143. All three runs are processes of their own (the same threads: the same float sums)."""
    import signal
    import time

    def losses(out):
        return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]

    args = [*SMALL, "--max-steps", "30", "--save-every", "0", "--no-save-final"]
    assert _cli(*args, "--output-dir", str(tmp_path / "a")).returncode == 0
    out = tmp_path / "b"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.Popen([sys.executable, "launch/train.py", *args, "--output-dir", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    done = len(losses(out))
    assert f"ds_chunk: stopped by SIGTERM after step {done}; checkpoint" in stderr
    assert "to continue: python launch/train.py --seq-len 128" in stderr and stderr.rstrip().endswith("--resume")
    assert 3 <= done < 30 and os.path.isfile(out / "checkpoints" / f"step_{done}" / "state.json")
    assert _cli(*args, "--resume", "--output-dir", str(out)).returncode == 0
    # as if never stopped: bitwise up to some steps after the resume, then ~1e-7 apart (a resume
    # in a new process; one inside a process is bitwise: test_resume_continues_exactly)
    assert losses(out) == pytest.approx(losses(tmp_path / "a"), rel=1e-6)


def test_a_second_signal_exits_at_once():
    code = (
        "import os, signal, time\n"
        "from ds_chunk.interrupt import StopOnSignal\n"
        "with StopOnSignal() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('asked', stop.received, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "    print('still here')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == f"asked {int(__import__('signal').SIGINT)}\n"
    assert proc.returncode == -2  # killed by the default SIGINT action, not after the sleep


def test_resume_with_another_setup_is_one_line_naming_what_differs(tmp_path):
    out = str(tmp_path / "run")
    train.main([*SMALL, "--max-steps", "2", "--output-dir", out])
    said = r"step_2 was trained with another setup: model\.lora = null there, \{\"r\": 8, \"alpha\": 16, .*\} "
    said += r"here\. A resume keeps .*the learning rate .* may change"
    with pytest.raises(ValueError, match=said) as e:
        train.main([*SMALL, "--max-steps", "4", "--lora-r", "8", "--resume", "--output-dir", out])
    assert "\n" not in str(e.value)
    changed = ["--lr", "0.003", "--chunk-size", "16", "--resume", "--output-dir", out]
    rest = train.main([*SMALL, "--max-steps", "3", *changed])
    assert [r["step"] for r in rest if "loss" in r] == [3]  # what may change, changes


def test_one_chunk_per_sequence_is_said(tmp_path):
    with pytest.warns(UserWarning, match="chunk_size 512 >= --seq-len 64: one chunk per sequence"):
        train.main(["--seq-len", "64", "--chunk-size", "512", "--max-steps", "1", "--output-dir", str(tmp_path)])
