"""Run by `deepspeed --num_gpus 2`: each rank trains on its row; rank 0 saves the result."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine_ref import ds_config, lora_model  # noqa: E402

import ds_chunk  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
args = parser.parse_args()

g = torch.Generator().manual_seed(5)
batches = [torch.randint(0, 97, (2, 40), generator=g) for _ in range(2)]  # same draw as the test
engine, *_ = ds_chunk.initialize(model=lora_model(), config=ds_config(2, False, micro=1))
rank = torch.distributed.get_rank()
losses = [engine.train_batch({"input_ids": ids[rank : rank + 1]}).item() for ids in batches]
if rank == 0:
    params = {k: p.detach().clone() for k, p in engine.hf_model.named_parameters() if p.requires_grad}
    torch.save({"losses": losses, "params": params}, os.path.join(args.out, "rank0.pt"))
