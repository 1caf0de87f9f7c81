"""Run by `deepspeed --num_gpus 2`: each rank trains on its row; rank 0 saves the result."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine_ref import ds_config, lora_model, mixed_labels  # noqa: E402

import ds_chunk  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--stage", type=int, default=1)
parser.add_argument("--offload", action="store_true")
parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
args = parser.parse_args()

g = torch.Generator().manual_seed(5)
batches = [torch.randint(0, 97, (2, 40), generator=g) for _ in range(2)]  # same draw as the test
engine, *_ = ds_chunk.initialize(model=lora_model(), config=ds_config(args.stage, args.offload, micro=1))
rank = torch.distributed.get_rank()
losses = []
for ids in batches:
    labels = mixed_labels(ids)  # the ranks replay different chunks
    losses.append(engine.train_batch({"input_ids": ids[rank : rank + 1], "labels": labels[rank : rank + 1]}).item())
if rank == 0:
    params = {k: p.detach().clone() for k, p in engine.hf_model.named_parameters() if p.requires_grad}
    torch.save({"losses": losses, "params": params}, os.path.join(args.out, "rank0.pt"))
