"""Sequence parallelism (``sequence_parallel_size``) on 2 and 4 CPU ranks against its references: the
relative errors behind docs/multi-gpu.md's table (the runs of tests/test_sequence_parallel.py,
tests/test_ranks.py and tests/test_hf.py, ~6 min on 2 CPU cores).

    python benchmarks/sequence_parallel.py
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch

TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
sys.path.insert(0, TESTS)
import test_ranks as r  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}


def rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def scheduler_rows(tmp: pathlib.Path) -> list[tuple]:
    out = tmp / "sp.json"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(r.free_port()),
           os.path.join(TESTS, "scripts", "sp_ranks.py"), "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    cases = json.loads(out.read_text())
    seco = [c for name, c in cases.items() if name != "spaco"]
    loss = max(abs(c["loss"] - c["ref_loss"]) / c["ref_loss"] for c in seco)
    spaco, grad = cases["spaco"], max(c["grad_err"] for c in seco)
    return [
        ("`ChunkScheduler`: SeCO, the 7 cases", "2", "full backprop, float64", loss, grad),
        ("`ChunkScheduler`: SpaCO, bernoulli 0.5", "2", "one process, the same draw",
         abs(spaco["loss"] - spaco["ref_loss"]) / spaco["ref_loss"], spaco["grad_err"]),
    ]  # fmt: skip


ENGINE = {
    "engine, ZeRO-2": (["--stage", "2", "--sp", "2"], 2),
    "engine, ZeRO-3": (["--stage", "3", "--sp", "2"], 2),
    "engine, ZeRO-1 + `offload_optimizer` + `kv_offload`, full fine-tuning": (
        ["--stage", "1", "--offload", "--kv-offload", "--full", "--sp", "2"], 2),
    "engine, ZeRO-2, data parallel 2 x sequence parallel 2": (["--stage", "2", "--sp", "2"], 4),
}  # fmt: skip


def engine_rows(tmp: pathlib.Path) -> list[tuple]:
    rows = []
    for i, (what, (flags, ranks)) in enumerate(ENGINE.items()):
        (tmp / str(i)).mkdir()
        full = "--full" in flags
        ref, ref_losses = r._reference(full)
        result, _ = r._two_ranks(tmp / str(i), *flags, ranks=ranks)
        rows.append((what, str(ranks), "full backprop + torch AdamW", rel(result["losses"], ref_losses),
                     r._param_err(result["params"], ref, full)))  # fmt: skip
    return rows


def launch_row(tmp: pathlib.Path) -> tuple:
    common = ["--seq-len", "128", "--chunk-size", "32", "--max-steps", "3", "--eval-batches", "1", "--no-save-final"]
    root = os.path.join(TESTS, "..")
    r._train_two_ranks(*common, "--sequence-parallel-size", "2", "--output-dir", str(tmp / "sp"))
    cmd = ["python", "launch/train.py", *common, "--output-dir", str(tmp / "one")]
    subprocess.run(cmd, cwd=root, env=ENV, check=True, capture_output=True)

    def values(path):
        return [v for line in open(path / "metrics.jsonl") for k, v in json.loads(line).items() if "loss" in k]

    return ("`launch/train.py --sequence-parallel-size 2`", "2", "the same command in one process",
            rel(values(tmp / "sp"), values(tmp / "one")), None)  # fmt: skip


def trainer_rows(tmp: pathlib.Path) -> list[tuple]:
    cases = []
    for stage in (1, 3):
        path = tmp / f"ds{stage}.json"
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
        path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                    "gradient_clipping": "auto", "zero_force_ds_cpu_optimizer": False,
                                    "zero_optimization": zero}))  # fmt: skip
        cases += ["--case", f"zero{stage}=--deepspeed {path} --sp 2"]
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(r.free_port()),
           os.path.join(TESTS, "scripts", "hf_two_rank.py"), "--out", str(tmp), *cases]  # fmt: skip
    subprocess.run(cmd, env=ENV, check=True, capture_output=True)
    from models import tiny_model

    start = dict(tiny_model("llama", dtype=torch.float32, seed=0).named_parameters())
    rows = []
    for stage in (1, 3):
        result = torch.load(tmp / f"zero{stage}.pt")
        pa, pb = result["parent"]["params"], result["ours"]["params"]
        err = max(float((pa[k] - pb[k]).norm() / (pa[k] - start[k]).norm()) for k in pa)
        rows.append((f"`ChunkwiseTrainer`, ZeRO-{stage}", "2", "`Trainer`, the same `ParallelismConfig` (Ulysses)",
                     rel(result["ours"]["losses"], result["parent"]["losses"]), err))  # fmt: skip
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = pathlib.Path(d)
        rows = scheduler_rows(tmp) + engine_rows(tmp) + [launch_row(tmp)] + trainer_rows(tmp)
    print("| what | ranks | reference | loss rel. error | weights / gradient rel. error |")
    print("|---|---|---|---|---|")
    for what, ranks, ref, loss, err in rows:
        print(f"| {what} | {ranks} | {ref} | {loss:.1e} | {'' if err is None else f'{err:.1e}'} |")


if __name__ == "__main__":
    main()
