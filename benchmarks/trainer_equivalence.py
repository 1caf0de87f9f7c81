"""ChunkwiseTrainer / with_chunkwise(SFTTrainer) against the parent, per setting: the relative
errors behind docs/trainer.md's table (the same runs as tests/test_hf.py, ~1 min on CPU).

    python benchmarks/trainer_equivalence.py
"""

import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
import test_hf as t  # noqa: E402
from models import tiny_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from ds_chunk.hf import ChunkwiseTrainer, with_chunkwise  # noqa: E402
from ds_chunk.zero3 import gathered  # noqa: E402


def loss_err(a, b, key="loss") -> float:
    """Largest relative error of a logged value over the steps (absolute where b's is 0)."""
    ours, parent = t._losses(a, key), t._losses(b, key)
    assert len(ours) == len(parent) > 0, f"{key}: logged {len(ours)} times, the parent {len(parent)}"
    return max(abs(x - y) / (abs(y) or 1.0) for x, y in zip(ours, parent))


def trainer_case(tmp, **args):
    t._fresh_accelerate()  # no ZeRO-3 config left global: it would partition `start` as it is made
    start = tiny_model("llama", dtype=torch.float32, seed=0)
    parent = t._train(Trainer, f"{tmp}/a", args=t._args(f"{tmp}/a", **args))
    ours = t._train(ChunkwiseTrainer, f"{tmp}/b", args=t._args(f"{tmp}/b", **args), chunkwise=t.CHUNK)
    with gathered([*ours.model.parameters(), *parent.model.parameters()]):  # ZeRO-3: whole weights
        err = t._update_err(ours.model, parent.model, start)
    t._fresh_accelerate()
    return loss_err(ours, parent), err


def lora_case(tmp):
    from peft import LoraConfig, get_peft_model

    def lora():
        model = tiny_model("llama", dtype=torch.float32, seed=0)
        return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    start, parent = lora(), t._train(Trainer, f"{tmp}/a", model=lora())
    ours = t._train(ChunkwiseTrainer, f"{tmp}/b", model=lora(), chunkwise=t.CHUNK)
    return loss_err(ours, parent), t._update_err(ours.model, parent.model, start)


def deepspeed_case(tmp, offload, stage=2):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": "auto", "zero_optimization": {"stage": stage}, "chunkwise": t.CHUNK}  # fmt: skip
    if stage == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if offload:
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    else:
        cfg["zero_force_ds_cpu_optimizer"] = False
    path = f"{tmp}/ds.json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    return trainer_case(tmp, deepspeed=path)


def sft_case(tmp, mode, chunkwise=t.CHUNK):
    """fp32, AdamW; also SFTTrainer's own metrics (entropy, mean_token_accuracy, num_tokens)."""
    from trl import SFTTrainer

    parent, start = t._sft(SFTTrainer, f"{tmp}/a", mode)
    ours, _ = t._sft(with_chunkwise(SFTTrainer), f"{tmp}/b", mode, chunkwise=chunkwise)
    metrics = max(loss_err(ours, parent, key) for key in ("entropy", "mean_token_accuracy", "num_tokens"))
    return loss_err(ours, parent), t._update_err(ours.model, parent.model, start), metrics


# each setting as docs/trainer.md's table names it
LABELS = {
    "completion_only_loss": "`completion_only_loss` (prompt/completion)",
    "assistant_only_loss": "`assistant_only_loss` (conversational, assistant masks)",
    "packing_wrapped": '`packing=True, packing_strategy="wrapped"`',
    "bfd": 'packed: `packing=True` (`"bfd"`, the default)',
    "bfd_split": 'packed: `packing_strategy="bfd_split"`',
    "padding_free": "packed: `padding_free=True`, no packing",
    "bfd_completion_only": 'packed: `"bfd"` + `completion_only_loss`',
    "bfd_assistant_only": 'packed: `"bfd"` + `assistant_only_loss`',
}
CASES = [
    ("Trainer", "plain", lambda d: trainer_case(d)),
    ("Trainer", "bf16 autocast (both sides)", lambda d: trainer_case(d, bf16=True)),
    ("Trainer", "peft LoRA", lora_case),
    ("Trainer", "DeepSpeed ZeRO-2 from a JSON with the block", lambda d: deepspeed_case(d, False)),
    ("Trainer", "same + `offload_optimizer`", lambda d: deepspeed_case(d, True)),
    ("Trainer", "DeepSpeed ZeRO-3 from a JSON with the block", lambda d: deepspeed_case(d, False, 3)),
    ("Trainer", "same + `offload_param` + `offload_optimizer`", lambda d: deepspeed_case(d, True, 3)),
    *[("SFTTrainer", LABELS[mode], lambda d, m=mode: sft_case(d, m)) for mode in t.SFT_MODES],
    *[  # packed rows, chunks of 5 cutting the documents
        ("SFTTrainer", LABELS[mode], lambda d, m=mode: sft_case(d, t.PACKED_MODES[m], {"chunk_size": 5}))
        for mode in t.PACKED_MODES
    ],
]

rows = []
for parent, setting, case in CASES:
    with tempfile.TemporaryDirectory() as tmp:
        rows.append((parent, setting, *case(tmp)))
print("| parent | setting | losses | weight updates | SFT metrics |\n|---|---|---:|---:|---:|")
for parent, setting, losses, updates, *metrics in rows:
    print(f"| `{parent}` | {setting} | {losses:.1e} | {updates:.1e} | {f'{metrics[0]:.1e}' if metrics else ''} |")
