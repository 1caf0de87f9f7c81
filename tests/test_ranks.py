"""Two CPU ranks (deepspeed launcher, gloo) against one process doing plain full backprop over
both rows (global token mean) + torch AdamW: ZeRO-0/1/2, offload, LoRA and full fine-tuning,
rows of different lengths and supervised chunks; one gradient reduction per step; non-finite
steps skipped by every rank together."""

import json
import os
import socket
import subprocess

import pytest
import torch
from engine_ref import lora_model, packed, reference_steps, spaco_reference, two_rank_batches
from models import tiny_model

from ds_chunk.ops import SHM_DIR, SHM_PREFIX

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A port nobody listens on: a fixed one can still be held by the previous launch (TIME_WAIT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(tmp_path, *flags, ranks: int = 2):
    """tests/scripts/two_rank.py under the deepspeed launcher: (rank 0's result, the process)."""
    proc = _launch(tmp_path, *flags, ranks=ranks)
    return torch.load(tmp_path / "rank0.pt"), proc


def _launch(tmp_path, *flags, ranks: int = 2):
    port = free_port()
    script = os.path.join(os.path.dirname(__file__), "scripts", "two_rank.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), script, "--out", str(tmp_path), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "rror" in line]
    assert proc.returncode == 0, "\n".join(errors[-30:]) + proc.stderr[-2000:]
    return proc


def _start(full: bool) -> torch.nn.Module:
    return tiny_model("llama", dtype=torch.float32, seed=0) if full else lora_model()


def _reference(full: bool):
    batches = two_rank_batches()
    return reference_steps(_start(full), [b[0] for b in batches], [b[1] for b in batches], [b[2] for b in batches])


def _param_err(params: dict, ref: torch.nn.Module, full: bool = False) -> float:
    """Worst parameter's ||ours - ref|| / ||ref - start||: the trained change, compared (a max-abs
    measure would weigh Adam's near-sign updates of tiny gradients)."""
    pb, p0 = dict(ref.named_parameters()), dict(_start(full).named_parameters())
    return max(float((params[k] - pb[k]).norm() / (pb[k] - p0[k]).norm()) for k in params)


CONFIGS = {
    "zero3": ["--stage", "3"],
    "zero3_offload_param": ["--stage", "3", "--offload-param", "--offload"],
    "zero3_full_finetuning": ["--stage", "3", "--full"],
    "zero3_kept_chunk": ["--stage", "3", "--keep", "1"],  # the ranks join the same chunks
    "zero0": ["--stage", "0"],
    "zero1_offload": ["--stage", "1", "--offload"],
    "zero1_overlap_comm": ["--stage", "1", "--overlap"],
    "zero2": ["--stage", "2"],
    "zero2_offload": ["--stage", "2", "--offload"],
    "zero2_full_finetuning": ["--stage", "2", "--full"],
    # one sequence over both ranks (sequence_parallel_size 2): each runs both rows, its slices
    "sequence_parallel_zero2": ["--stage", "2", "--sp", "2"],
    "sequence_parallel_zero3": ["--stage", "3", "--sp", "2"],
    "sequence_parallel_zero1_offload_kv_offload_full": [
        "--stage",
        "1",
        "--offload",
        "--kv-offload",
        "--full",
        "--sp",
        "2",
    ],
}


# every 2-rank case of this module, run in one launch (each builds its own model and engine): a
# launch costs more than a case
CASES = {
    **CONFIGS,
    "packed_zero2": ["--stage", "2", "--packed"],
    "packed_zero3": ["--stage", "3", "--packed"],
    "one_chunk": ["--stage", "2", "--chunk", "40"],
    "five_chunks": ["--stage", "2", "--chunk", "8"],
    "spaco_zero2": ["--stage", "2", "--spaco", "0.5", "--chunk", "8"],
    "spaco_zero3": ["--stage", "3", "--spaco", "0.5", "--chunk", "8"],
    "nan_zero2": ["--stage", "2", "--nan-steps", "0"],
    "nan_zero3": ["--stage", "3", "--nan-steps", "0"],
    "nan_twice": ["--stage", "2", "--nan-steps", "0", "1", "--steps", "3"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: rank 0's result} of every case in CASES, and the launch's process."""
    out = tmp_path_factory.mktemp("two_ranks")
    proc = _launch(out, *[x for name, flags in CASES.items() for x in ("--case", f"{name}={' '.join(flags)}")])
    return {name: torch.load(out / f"{name}.pt") for name in CASES}, proc


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process_with_both_rows(runs, name):
    flags = CONFIGS[name]
    ref, ref_losses = _reference("--full" in flags)
    result = runs[0][name]
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert _param_err(result["params"], ref, "--full" in flags) < 1e-4


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_packed_rows_equal_one_process(runs, stage):
    """Each rank a padding-free row of packed documents (3 of 40 tokens, 2 of 30: under ZeRO-3
    padded to 40 with position 0) against one process running each row as transformers'
    packed forward (documents apart)."""
    steps = packed(two_rank_batches())
    ref, ref_losses = reference_steps(lora_model(), *([s[i] for s in steps] for i in range(4)))
    result = runs[0][f"packed_zero{stage}"]
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert _param_err(result["params"], ref) < 1e-4


def test_data_parallel_times_sequence_parallel_on_four_ranks(tmp_path):
    """2 data-parallel ranks x 2 sequence-parallel: each pair trains on one row, both halves of it."""
    ref, ref_losses = _reference(False)
    result, _ = _two_ranks(tmp_path, "--stage", "2", "--sp", "2", ranks=4)
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert _param_err(result["params"], ref) < 1e-4


def test_one_gradient_reduction_per_step_whatever_the_chunks(runs):
    """DeepSpeed's collectives in a ZeRO-2 step: the same for 1 and 5 chunks per row."""
    one, five = runs[0]["one_chunk"], runs[0]["five_chunks"]
    assert one["counts"] == five["counts"]
    assert all(sum(c.values()) > 0 for c in one["counts"])


@pytest.mark.parametrize("stage", ["2", "3"])
def test_spaco_two_ranks_equal_one_process_with_the_same_draws(runs, stage):
    """ZeRO-2: each rank its own draw; ZeRO-3: one draw, by the ranks' joint supervised chunks."""
    result = runs[0][f"spaco_zero{stage}"]
    ref, ref_losses = spaco_reference(lora_model(), two_rank_batches(), 0.5, 3, 8, identical=stage == "3")
    assert result["losses"] == pytest.approx(ref_losses, rel=1e-5)
    assert _param_err(result["params"], ref) < 1e-4


@pytest.mark.parametrize("stage", ["2", "3"])
def test_a_non_finite_step_on_one_rank_is_skipped_by_both(runs, stage):
    """Rank 1's forward turns NaN in step 0: neither rank steps; step 1 then trains as usual."""
    result = runs[0][f"nan_zero{stage}"]
    assert result["skipped"] == [1, 1]
    assert not torch.isfinite(torch.tensor(result["losses"][0])) and torch.isfinite(torch.tensor(result["losses"][1]))
    assert all(torch.isfinite(p).all() for p in result["params"].values())
    model = lora_model()  # only step 1's batch reached the weights
    batch = two_rank_batches()[1]
    ref, _ = reference_steps(model, [batch[0]], [batch[1]], [batch[2]])
    assert _param_err(result["params"], ref) < 1e-4


def test_consecutive_non_finite_steps_stop_training(runs):
    """max_consecutive_skips = 1 in the script: the second skip in a row stops both ranks."""
    result, proc = runs[0]["nan_twice"], runs[1]
    assert result["skipped"] == [1]  # step 0 skipped; step 1 raised on both ranks before step 2
    assert proc.stdout.count("NonFiniteError: 2 consecutive steps had a non-finite loss or gradient") == 2


def _train_two_ranks(*flags):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/train.py", *flags]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # leaves together and takes DeepSpeed's CPU comm buffers with it (64 MiB per rank otherwise)
    assert not [n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX) and f"_{port}_" in n]


def test_launch_with_sequence_parallel_equals_one_process(tmp_path):
    """launch/train.py --sequence-parallel-size 2 on 2 ranks (each sequence split over both) trains
    as the same command in one process."""
    common = ["--seq-len", "128", "--chunk-size", "32", "--max-steps", "3", "--eval-batches", "1", "--no-save-final"]
    _train_two_ranks(*common, "--sequence-parallel-size", "2", "--output-dir", str(tmp_path / "sp"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = ["python", "launch/train.py", *common, "--output-dir", str(tmp_path / "one")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def records(path):
        return [json.loads(line) for line in open(path / "metrics.jsonl")]

    sp, one = records(tmp_path / "sp"), records(tmp_path / "one")
    assert len([r for r in sp if "loss" in r]) == 3 and any("eval_loss" in r for r in sp)
    for key in ("loss", "eval_loss"):
        assert [r[key] for r in sp if key in r] == pytest.approx([r[key] for r in one if key in r], rel=1e-5)


def test_zero3_save_and_resume_continue_exactly(tmp_path):
    """launch/train.py, ZeRO-3 full fine-tuning on 2 ranks: 4 steps == 2 steps, save, resume, 2 more."""
    common = ["--config", "ds_configs/recall_zero3_cpu.json", "--seq-len", "128", "--chunk-size", "32",
              "--eval-every", "1000", "--eval-batches", "1"]  # fmt: skip
    _train_two_ranks(*common, "--max-steps", "4", "--no-save-final", "--output-dir", str(tmp_path / "a"))
    _train_two_ranks(*common, "--max-steps", "2", "--output-dir", str(tmp_path / "b"))
    _train_two_ranks(*common, "--max-steps", "4", "--resume", "--output-dir", str(tmp_path / "b"))

    def losses(path):
        return [json.loads(line)["loss"] for line in open(path / "metrics.jsonl") if '"loss"' in line]

    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    saved = tmp_path / "b" / "checkpoints" / "step_4" / "model" / "model.safetensors"
    from safetensors.torch import load_file

    assert all(t.numel() > 0 for t in load_file(saved).values())  # whole weights, not ZeRO-3's empty partitions


def test_a_rank_waiting_for_a_collective_that_never_comes_fails_with_a_timeout():
    """ds_chunk.initialize(dist_timeout=3): rank 0 errors out of its step ~3 s after rank 1 went away."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "stalled_rank.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), script]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if "rank 0:" in line]
    assert lines and "Error after" in lines[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert float(lines[0].split(" after ")[1].split(" s")[0]) < 20
