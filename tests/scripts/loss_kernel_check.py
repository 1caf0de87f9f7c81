"""Run by tests/test_loss_kernels.py in a fresh process: a library kernel ("liger" under
TRITON_INTERPRET=1, set before Triton is imported; "cce" through its torch_compile
implementation) against ds_chunk's torch kernel and against full backprop, float32.
Prints one JSON line of relative errors."""

import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import grads, max_rel_err, reference_loss, tiny_model  # noqa: E402

from ds_chunk import ChunkScheduler, loss_kernels  # noqa: E402
from ds_chunk.adapter import LOGIT_TRANSFORMS, LMHead  # noqa: E402
from ds_chunk.loss import chunk_loss  # noqa: E402

kernel = sys.argv[1]
if kernel == "cce":
    loss_kernels.CCE_IMPL = "torch_compile"  # CCE's own kernel is CUDA-only
V, H = 97, 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def head_case(bias: bool, softcap: float | None) -> dict:
    """chunk_loss with ``kernel`` vs the torch kernel: the loss and d hidden, d weight, d bias."""
    torch.manual_seed(0)
    module = nn.Linear(H, V, bias=bias)
    head = LMHead(module)
    if softcap is not None:
        head = LMHead(module, *LOGIT_TRANSFORMS["gemma2"][1:], softcap, "final_logit_softcapping")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 24, H, generator=g).requires_grad_(True)
    target = torch.randint(0, V, (2, 24), generator=g)
    target[0, :5] = -100
    out = {}
    for k in ("torch", kernel):
        loss = chunk_loss(head, hidden, target, 37.0, 8, True, k)
        out[k] = (loss.detach(), torch.autograd.grad(loss, [hidden, *module.parameters()]))
    (want, want_g), (got, got_g) = out["torch"], out[kernel]
    return {"loss": abs(float(got - want)) / float(want), "grads": max(rel(a, b) for a, b in zip(got_g, want_g))}


def model_case() -> dict:
    """A whole SeCO step (chunk 8 on 2 x 40 tokens, a prompt ignored) vs full backprop."""
    model = tiny_model("llama", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :12] = -100
    ref = reference_loss(model, ids, labels)
    ref.backward()
    want = grads(model)
    model.zero_grad()
    result = ChunkScheduler({"chunk_size": 8, "loss_kernel": kernel}).backward(model, ids, labels)
    return {"loss": abs(float(result.loss) - ref.item()) / ref.item(), "grads": max_rel_err(grads(model), want)}


cases = {"bias": head_case(True, None)} if kernel == "liger" else {}
cases["no_bias"] = head_case(False, None)
if kernel == "cce":  # Liger's soft-capping does not run in Triton's interpreter (a float scalar's .to)
    cases["softcap"] = head_case(False, 2.0)
cases["seco_step"] = model_case()
print(json.dumps(cases))
