"""Held-out NLL of long real text by position, before and after a context-extension fine-tune.

    python benchmarks/position_nll.py bench_out/quality/text-passkey/{seco,truncate}/seed0

The model is the text-passkey task's (ds_configs/text_passkey_smollm2_cpu.json: SmolLM2-135M
with linear RoPE x4), untouched (with and without the scaling) and with each given run's
final LoRA adapter. The text: the Python standard library files held out by ``--task
stdlib`` (a seeded tenth), through the model's tokenizer, packed into rows of ``--seq-len``
tokens. Prints the mean NLL (nats per
token) in position buckets of ``--bucket`` tokens, one full forward per row, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_chunk import checkpoint  # noqa: E402
from ds_chunk.data import StdlibBytes  # noqa: E402
from ds_chunk.generate import load_checkpoint  # noqa: E402
from ds_chunk.model import ModelConfig, build_model, load_tokenizer  # noqa: E402

CONFIG = ROOT / "ds_configs" / "text_passkey_smollm2_cpu.json"


def rows(tokenizer, seq_len: int, count: int) -> torch.Tensor:
    """[count, seq_len] token ids of held-out standard-library source, files joined in order."""
    files = StdlibBytes(seq_len, "eval").files
    ids: list[int] = []
    for f in files:
        ids += tokenizer(f.read_text(errors="replace"), add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len * count:
            break
    if len(ids) < seq_len * count:
        raise SystemExit(f"the held-out files hold {len(ids)} tokens, fewer than {count} rows of {seq_len}")
    return torch.tensor(ids[: seq_len * count]).view(count, seq_len)


@torch.no_grad()
def nll_by_position(model, data: torch.Tensor) -> torch.Tensor:
    """[seq_len - 1] mean NLL of each predicted position over the rows."""
    total = torch.zeros(data.shape[1] - 1, dtype=torch.float64)
    for row in data.split(1):
        logits = model(input_ids=row).logits[0, :-1].float()
        total += F.cross_entropy(logits, row[0, 1:], reduction="none").double()
    return total / data.shape[0]


def base(block: dict, scaled: bool):
    """The task's model block as a model, without LoRA (``scaled=False``: nor its RoPE scaling)."""
    drop = {"lora"} if scaled else {"lora", "rope_scaling"}
    return build_model(ModelConfig.from_dict({k: v for k, v in block.items() if k not in drop})).eval()


def adapted(run: str):
    """A run's final LoRA adapter on its base as trained (the RoPE scaling its checkpoint records)."""
    return load_checkpoint(checkpoint.find(run))[0].eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders whose final adapter to evaluate (besides the base)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--bucket", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    block = json.loads(CONFIG.read_text())["model"]
    data = rows(load_tokenizer(block["name_or_path"]), args.seq_len, args.rows)
    edges = list(range(0, args.seq_len - 1, args.bucket))
    head = ["model"] + [f"{s}-{min(s + args.bucket, args.seq_len - 1)}" for s in edges] + ["all"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    models = [("base, RoPE as trained", lambda: base(block, False)), ("base, RoPE x4", lambda: base(block, True))]
    for name, make in models + [(os.path.relpath(r), lambda r=r: adapted(r)) for r in args.runs]:
        nll = nll_by_position(make(), data)
        cells = [f"{float(nll[s : s + args.bucket].mean()):.3f}" for s in edges] + [f"{float(nll.mean()):.3f}"]
        print("| " + " | ".join([name, *cells]) + " |", flush=True)


if __name__ == "__main__":
    main()
