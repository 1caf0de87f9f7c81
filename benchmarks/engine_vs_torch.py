"""ds_chunk.initialize + train_batch vs plain backprop + torch AdamW, per ZeRO configuration.

python benchmarks/engine_vs_torch.py     # prints a markdown table (CPU, ~1 min)
"""

import copy
import os
import sys

import torch

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from engine_ref import ds_config, lora_model, max_param_err, mixed_labels, reference_steps  # noqa: E402

import ds_chunk  # noqa: E402

g = torch.Generator().manual_seed(5)
batches = [torch.randint(0, 97, (4, 40), generator=g) for _ in range(3)]
labels = [mixed_labels(ids) for ids in batches]  # rows 1-3: no loss in their first chunks
model = lora_model()
print(
    "| ZeRO stage | offload_optimizer | grad accum | max rel param diff, 1 step | after 3 steps | max rel loss diff |"
)
print("|---|---|---|---|---|---|")
for stage, offload, gas in [
    (0, False, 1),
    (1, False, 1),
    (1, False, 2),
    (1, True, 1),
    (2, False, 1),
    (2, False, 2),
    (2, True, 1),
    (2, True, 2),
]:
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=ds_config(stage, offload, 4 // gas, gas))
    errs, losses = [], []
    for i, ids in enumerate(batches):
        losses.append(engine.train_batch({"input_ids": ids, "labels": labels[i]}).item())
        ref, ref_losses = reference_steps(model, batches[: i + 1], labels[: i + 1])
        errs.append(max_param_err(engine.hf_model, ref))
    lerr = max(abs(a - b) / b for a, b in zip(losses, ref_losses))
    opt = "cpu (DeepSpeedCPUAdam)" if offload else "none (torch AdamW)"
    print(f"| {stage} | {opt} | {gas} | {errs[0]:.2e} | {errs[-1]:.2e} | {lerr:.2e} |", flush=True)
