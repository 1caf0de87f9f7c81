"""Run by `torchrun --nproc_per_node 2`: Trainer, then ChunkwiseTrainer, on the same data and
arguments (DDP, or DeepSpeed ZeRO-1 / ZeRO-3 from --deepspeed); rank 0 saves losses and weights."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import tiny_model  # noqa: E402
from test_hf import Rows, _args, _fresh_accelerate  # noqa: E402
from transformers import Trainer  # noqa: E402

from ds_chunk.data import collate  # noqa: E402
from ds_chunk.hf import ChunkwiseTrainer  # noqa: E402
from ds_chunk.zero3 import gathered  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--deepspeed")
args = parser.parse_args()

result = {}
for name, cls, extra in (("parent", Trainer, {}), ("ours", ChunkwiseTrainer, {"chunkwise": {"chunk_size": 8}})):
    _fresh_accelerate()
    model = tiny_model("llama", dtype=torch.float32, seed=0)  # before the arguments: a ZeRO-3 config would partition it
    targs = _args(os.path.join(args.out, name), deepspeed=args.deepspeed, per_device_train_batch_size=1)
    trainer = cls(model=model, args=targs, train_dataset=Rows(), data_collator=collate, **extra)
    trainer.train()
    with gathered(trainer.model.parameters()):  # ZeRO-3: whole parameters on every rank
        params = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    result[name] = {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "params": params,
        "kind": type(trainer.model_wrapped).__name__,
    }
if int(os.environ["RANK"]) == 0:
    torch.save(result, os.path.join(args.out, "result.pt"))
torch.distributed.barrier()  # leave together: a rank exiting while the other still talks to it can abort it
torch.distributed.destroy_process_group()
