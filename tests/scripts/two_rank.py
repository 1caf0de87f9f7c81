"""Run by `deepspeed --num_gpus 2`: each rank trains on its row; rank 0 saves the result. With
--sp N (sequence_parallel_size) the N ranks of a group train on the same rows, their slices.

Row 1 of each batch is shorter (right padding) and supervised only after position 33, so
the ranks run different chunk schedules. Also counts DeepSpeed's collectives per step.
"""

import argparse
import os
import sys
from collections import Counter

import deepspeed
import deepspeed.comm as dist
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine_ref import ds_config, lora_model, packed, two_rank_batches  # noqa: E402
from models import tiny_model  # noqa: E402

import ds_chunk  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--stage", type=int, default=1)
parser.add_argument("--offload", action="store_true", help="offload_optimizer to CPU")
parser.add_argument("--offload-param", action="store_true", help="ZeRO-3 offload_param to CPU")
parser.add_argument("--overlap", action="store_true", help="overlap_comm")
parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
parser.add_argument("--chunk", type=int, default=16)
parser.add_argument("--spaco", type=float, help="SpaCO rate")
parser.add_argument("--keep", type=int, default=0, help="chunkwise.keep_chunks")
parser.add_argument("--nan-steps", type=int, nargs="*", default=[], help="steps whose forward turns NaN on rank 1")
parser.add_argument("--steps", type=int, default=2)
parser.add_argument("--packed", action="store_true", help="packed documents, each rank's row unpadded")
parser.add_argument("--plain", action="store_true", help="DeepSpeed's own unchunked step, to compare collectives")
parser.add_argument("--sp", type=int, default=1, help="sequence_parallel_size (the ranks share rows)")
parser.add_argument("--kv-offload", action="store_true", help="chunkwise.kv_offload")
parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
parser.add_argument(
    "--case",
    action="append",
    default=[],
    metavar="NAME=FLAGS",
    help="run FLAGS as case NAME, saved as NAME.pt (repeatable: several cases in one launch)",
)
NAMES = ("all_reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "reduce", "all_gather_into_tensor", "all_gather",
         "broadcast", "allgather_fn", "all_to_all_single")  # fmt: skip
counts: list[Counter] = []


def counting(name, fn):
    def call(*a, **kw):
        if counts:  # not while an engine is made (its broadcasts)
            counts[-1][name] += 1
        return fn(*a, **kw)

    return call


def config(args) -> dict:
    world = int(os.environ["WORLD_SIZE"])
    per = 2 * args.sp // world  # each data-parallel rank's share of the 2 rows: one micro-batch a row
    cfg = ds_config(args.stage, args.offload, micro=1, gas=per, chunk=args.chunk)
    if args.sp > 1:
        cfg["sequence_parallel_size"] = args.sp
    cfg["chunkwise"]["kv_offload"] = args.kv_offload
    cfg["zero_optimization"]["overlap_comm"] = args.overlap
    if args.stage == 3:  # partition even these tiny parameters (by default small ones stay whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if args.offload_param:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if args.spaco is not None:
        cfg["chunkwise"]["sparse"] = {"rate": args.spaco, "seed": 3}
    cfg["chunkwise"]["max_consecutive_skips"] = 1
    cfg["chunkwise"]["keep_chunks"] = args.keep
    return cfg


def step(engine, args, ids, labels, mask, pos, rows, rank):
    if args.plain:  # engine(...), engine.backward, engine.step on the whole row
        out = engine(input_ids=ids[rows], labels=labels[rows], attention_mask=mask[rows])
        engine.backward(out.loss)
        engine.step()
        return out.loss.detach()
    if args.packed:  # padding-free: this rank's real tokens only (ZeRO-3 pads them to the longer row)
        n = int(mask[rank].sum())
        return engine.train_batch({"input_ids": ids[rows, :n], "labels": labels[rows, :n],
                                   "position_ids": pos[0][rows, :n]})  # fmt: skip
    return engine.train_batch({"input_ids": ids[rows], "labels": labels[rows], "attention_mask": mask[rows]})


def run(args, name: str) -> None:
    model = tiny_model("llama", dtype=torch.float32, seed=0) if args.full else lora_model()
    engine, *_ = ds_chunk.initialize(model=model, config=config(args))
    rank = torch.distributed.get_rank()
    dp_rank, per = engine.data_parallel()[0], engine.gradient_accumulation_steps()
    losses, skipped = [], []
    counts.clear()
    batches = two_rank_batches(args.steps)
    for i, (ids, labels, mask, *pos) in enumerate(packed(batches) if args.packed else batches):
        poison = None
        if i in args.nan_steps and rank == 1:  # a non-finite forward on one rank only
            embed = engine.hf_model.get_input_embeddings()
            poison = embed.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        counts.append(Counter())
        try:
            loss = step(engine, args, ids, labels, mask, pos, slice(dp_rank * per, (dp_rank + 1) * per), rank)
        except FloatingPointError as e:
            print(f"NonFiniteError: {e}", flush=True)
            break
        if poison is not None:
            poison.remove()
        losses.append(loss.item())
        skipped.append(engine.skipped_steps)
    trainable = [(k, p) for k, p in engine.hf_model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in trainable], enabled=args.stage == 3):  # collective
        params = {k: p.detach().clone() for k, p in trainable}
    if rank == 0:
        torch.save({"losses": losses, "params": params, "counts": [dict(c) for c in counts], "skipped": skipped},
                   os.path.join(args.out, f"{name}.pt"))  # fmt: skip
    torch.distributed.barrier()  # leave together: a rank exiting under ZeRO-3 traffic can abort the other


args = parser.parse_args()
for collective in NAMES:  # DeepSpeed's collectives (ds_chunk's own all-reduces go to torch.distributed)
    if hasattr(dist, collective):
        setattr(dist, collective, counting(collective, getattr(dist, collective)))
cases = [(c.split("=", 1)[0], parser.parse_args(["--out", args.out, *c.split("=", 1)[1].split()])) for c in args.case]
for name, case in cases or [("rank0", args)]:
    run(case, name)
torch.distributed.destroy_process_group()
