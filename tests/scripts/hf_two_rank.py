"""Run by `torchrun --nproc_per_node 2`: Trainer, then ChunkwiseTrainer, on the same data and
arguments (DDP, or DeepSpeed ZeRO-1 / ZeRO-3 from --deepspeed; --sp 2: with accelerate's
ParallelismConfig(sp_backend="deepspeed", sp_size=2), DeepSpeed's Ulysses); rank 0 saves losses
and weights as NAME.pt per --case NAME=FLAGS (several cases in one launch; sequence-parallel
ones last: DeepSpeed keeps their groups for the rest of the process)."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import tiny_model  # noqa: E402
from test_hf import Rows, _args, _fresh_accelerate  # noqa: E402
from transformers import Trainer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from ds_chunk.data import collate  # noqa: E402
from ds_chunk.hf import ChunkwiseTrainer  # noqa: E402
from ds_chunk.zero3 import gathered  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--case", action="append", default=[], metavar="NAME=FLAGS")
case_parser = argparse.ArgumentParser()
case_parser.add_argument("--deepspeed")
case_parser.add_argument("--sp", type=int, default=1)


def fixed_length(rows):  # the same length on every rank (DeepSpeed's adapter all-gathers the shards) and positions
    batch = collate(rows)
    pad = 48 - batch["input_ids"].shape[1]
    batch = {k: torch.nn.functional.pad(v, (0, pad), value=-100 if k == "labels" else 0) for k, v in batch.items()}
    batch["position_ids"] = torch.arange(48).expand_as(batch["input_ids"]).clone()
    return batch


def sequence_parallel(size: int) -> dict:
    """accelerate's ParallelismConfig for DeepSpeed's Ulysses, its state reset for a new Trainer."""
    import deepspeed
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    deepspeed.init_distributed(dist_backend="gloo")  # accelerate's Ulysses setup asks DeepSpeed's comm for the group
    ALL_ATTENTION_FUNCTIONS["sdpa"] = SDPA  # DeepSpeed wraps it in place: each Trainer wraps the original
    parallel_state_sp._SEQUENCE_PARALLEL_GROUP = parallel_state_sp._SEQUENCE_DATA_PARALLEL_GROUP = None
    handler = DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa")
    return {"parallelism_config": ParallelismConfig(sp_backend="deepspeed", sp_size=size, sp_handler=handler)}


def run(case, out: str) -> dict:
    result = {}
    for name, cls, extra in (("parent", Trainer, {}), ("ours", ChunkwiseTrainer, {"chunkwise": {"chunk_size": 8}})):
        _fresh_accelerate()
        sp = sequence_parallel(case.sp) if case.sp > 1 else {}
        model = tiny_model("llama", dtype=torch.float32, seed=0)  # before the arguments: ZeRO-3 would partition it
        targs = _args(os.path.join(out, name), deepspeed=case.deepspeed, per_device_train_batch_size=1, **sp)
        collator = fixed_length if sp else collate
        trainer = cls(model=model, args=targs, train_dataset=Rows(), data_collator=collator, **extra)
        trainer.train()
        with gathered(trainer.model.parameters()):  # ZeRO-3: whole parameters on every rank
            params = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
        result[name] = {
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
            "params": params,
            "kind": type(trainer.model_wrapped).__name__,
        }
    return result


args = parser.parse_args()
SDPA = ALL_ATTENTION_FUNCTIONS["sdpa"]
for spec in args.case:
    name, _, flags = spec.partition("=")
    result = run(case_parser.parse_args(flags.split()), os.path.join(args.out, name))
    if int(os.environ["RANK"]) == 0:
        torch.save(result, os.path.join(args.out, f"{name}.pt"))
    torch.distributed.barrier()  # leave together: a rank exiting while the other still talks to it can abort it
torch.distributed.destroy_process_group()
