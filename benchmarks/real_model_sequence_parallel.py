"""The real pretrained model (SmolLM2-135M-Instruct: 9 heads, 3 key/value heads) with each sequence
split over 3 CPU ranks against one process's plain full backprop, float64 (~2 min on 2 cores):

    torchrun --nproc_per_node 3 benchmarks/real_model_sequence_parallel.py
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_model_equivalence import rmsnorm_in_float64, text_ids  # noqa: E402

from ds_chunk import ChunkScheduler  # noqa: E402
from ds_chunk.known_models import resolve  # noqa: E402
from ds_chunk.sequence_parallel import groups  # noqa: E402


def lora_model(path: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).train()
    torch.manual_seed(0)  # the same adapter on every rank and in the reference (an engine broadcasts rank 0's)
    return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sp = groups(dist.get_world_size())
    path = resolve("smollm2-135m")
    ids = text_ids(path, 384)
    labels = ids.clone()
    labels[:, :100] = -100  # a prompt without loss: the first chunk counts through its K/V only
    with rmsnorm_in_float64():
        model = lora_model(path)
        result = ChunkScheduler({"chunk_size": 96}, sequence_parallel=sp).backward(model, ids, labels)
        loss = result.loss.clone()
        dist.all_reduce(loss)
        ours = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        for g in ours.values():
            dist.all_reduce(g)  # each rank holds its slices' share
        if dist.get_rank() == 0:
            ref = lora_model(path)
            logits = ref(input_ids=ids).logits
            ref_loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
            ref_loss.backward()
            want = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
            err = max(float((ours[k] - g).abs().max() / g.abs().max()) for k, g in want.items())
            print("| model | ranks | tokens, chunk | loss rel. error | gradient rel. error |")
            print("|---|---|---|---|---|")
            print(f"| SmolLM2-135M-Instruct, LoRA q,v, float64 | {sp.size} | 384, 96 | "
                  f"{abs(float(loss) - float(ref_loss)) / float(ref_loss):.1e} | {err:.1e} |")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
