"""Run by `torchrun --nproc_per_node 2`: ChunkScheduler with sequence_parallel over both ranks
against one process's plain full backprop of the same rows (float64), case by case; rank 0
writes {case: {"loss", "ref_loss", "grad_err", "all_to_all", "chunks"}} to --out as JSON."""

import argparse
import copy
import json
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine_ref import PACKED_DOCS  # noqa: E402
from models import tiny_model  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from ds_chunk import ChunkScheduler  # noqa: E402
from ds_chunk.sequence_parallel import groups  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
dist.init_process_group("gloo")
torch.set_num_threads(1)
sp = groups(dist.get_world_size())
calls = Counter()
_all_to_all = dist.all_to_all_single


def counted(*a, **kw):
    calls["all_to_all"] += 1
    return _all_to_all(*a, **kw)


dist.all_to_all_single = counted


def rows(length: int, packed: bool = False, until: int | None = None):
    """2 rows: row 1 shorter (right padding) and supervised from position 20 on; packed: the rows
    as documents (engine_ref.PACKED_DOCS), position ids restarting, row 1 unpadded in its 30;
    until: no label from there on."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :20] = -100
    if until is not None:
        labels[:, until:] = -100
    pos = None
    if packed:
        pos = torch.zeros_like(ids)
        for row, docs in enumerate(PACKED_DOCS):
            pos[row, : sum(docs)] = torch.cat([torch.arange(n) for n in docs])
            pos[row, sum(docs) :] = torch.arange(length - sum(docs))  # the padding goes on counting
            labels[row, torch.tensor([0, *docs[:-1]]).cumsum(0)] = -100
    return ids, labels, mask, pos


def reference(model, ids, labels, mask, pos):
    """Plain full backprop of the mean CE (float64, our own CE); packed: each document alone."""
    if pos is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    else:
        total = 0.0
        for r, docs in enumerate(PACKED_DOCS):
            a = 0
            for n in docs:
                logits = model(input_ids=ids[r : r + 1, a : a + n]).logits[0, :-1]
                total = total + F.cross_entropy(logits, labels[r, a + 1 : a + n], ignore_index=-100, reduction="sum")
                a += n
        loss = total / int((labels[:, 1:] != -100).sum())
    loss.backward()
    return float(loss)


def base(lora: bool):
    model = tiny_model("llama", dtype=torch.float64, seed=0)
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


SPACO = {"chunk_size": 8, "sparse": {"rate": 0.5, "seed": 3}}
CASES = {  # name: (chunkwise config, length, packed, lora, labels until)
    "seco": ({"chunk_size": 8}, 40, False, False),
    # rank 1's slice of the last supervised chunk has no label: its backward still runs
    "a_slice_without_labels": ({"chunk_size": 8}, 40, False, False, 36),
    "spaco": (SPACO, 40, False, False),
    "length_not_a_multiple": ({"chunk_size": 8}, 41, False, False),
    "one_chunk": ({"chunk_size": 48}, 41, False, False),
    "lora_kv_offload": ({"chunk_size": 8, "kv_offload": True}, 40, False, True),
    "keep_chunks": ({"chunk_size": 8, "keep_chunks": 1}, 40, False, False),
    "packed": ({"chunk_size": 8}, 40, True, False),
}
out = {}
for name, (config, length, packed, lora, *until) in CASES.items():
    ids, labels, mask, pos = rows(length, packed, *until)
    model = base(lora)
    ref = copy.deepcopy(model)
    calls.clear()
    result = ChunkScheduler(config, sequence_parallel=sp).backward(model, ids, labels, mask, position_ids=pos)
    a2a = calls["all_to_all"]
    loss = result.loss.clone()
    dist.all_reduce(loss)
    if "sparse" in config:  # SpaCO: one process with the same draw (rank 0's, the group's)
        ref_loss = float(ChunkScheduler(config).backward(ref, ids, labels, mask).loss)
    else:
        ref_loss = reference(ref, ids, labels, mask, pos)
    errs = []
    for p, q in zip(model.parameters(), ref.parameters()):
        if q.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g)  # the group's gradient: each rank holds its slices' share
            errs.append(float((g - q.grad).abs().max() / q.grad.abs().max()))
    out[name] = {"loss": float(loss), "ref_loss": ref_loss, "grad_err": max(errs), "all_to_all": a2a,
                 "chunks": result.num_chunks, "replayed": len(result.replayed) - result.kept,
                 "host_peak_bytes": result.host_peak_bytes}  # fmt: skip
if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(out, f)
dist.destroy_process_group()
