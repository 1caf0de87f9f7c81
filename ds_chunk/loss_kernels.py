"""Fused LM head + cross-entropy kernels of other libraries, for CUDA, imported on first use.

``"liger"``: Liger-Kernel's fused linear cross-entropy (Triton). ``"cce"``: Apple's Cut
Cross-Entropy (Triton), run exactly (``filter_eps=None``: no gradient filtering). Liger makes
the gradients in the forward, block by block, as ``ds_chunk.loss`` does in torch; CCE keeps
the hidden states and the head's weight and makes them in its backward, recomputing the
logits block by block (so not under ZeRO-3, which re-partitions the weight after the
forward). Both return the CE sum of a chunk, which ``chunk_loss`` divides by the step's
normaliser.

``chunkwise.loss_kernel`` picks one; absent, CUDA takes liger when installed, then cce,
and every other device ds_chunk's own torch kernel (``"torch"``). A kernel runs only where
it is exact: a plain ``nn.Linear`` head, no logit transform but soft-capping, 16/32-bit,
and (cce) no head bias, a 16-bit head weight (its kernel asserts fp16/bf16 in backward and
ignores autocast; its weight gradient accumulates in that 16-bit dtype); elsewhere the
default falls back to torch and an explicit choice is an error naming the key. Liger cuts
each call into ceil(vocab / hidden) blocks of rows whatever the rows, reading the whole
head once per block: by default it runs only where its blocks are no smaller than our
sub-chunks (``loss_chunk_size``), so it never reads the head more often than ours would.
Off CUDA, Liger's kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` (how the
tests compare them with ours on a CPU); CCE's own kernel is CUDA-only (its
``torch_compile`` implementation, which also takes float32, stands in for it in the tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ds_chunk.adapter import LMHead
from ds_chunk.chunking import IGNORE_INDEX
from ds_chunk.zero3 import partitioned

KERNELS = ("torch", "liger", "cce")
PACKAGES = {"liger": ("liger_kernel", "liger-kernel"), "cce": ("cut_cross_entropy", "cut-cross-entropy")}
CCE_IMPL = "cce"  # CCE's Triton kernel; "torch_compile" is its portable reference implementation


def installed(kernel: str) -> bool:
    return kernel == "torch" or importlib.util.find_spec(PACKAGES[kernel][0]) is not None


def _why_not(kernel: str, head: LMHead, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``kernel`` cannot compute this head's loss exactly here (None: it can); ``dtype``:
    the autocast dtype, else the head weight's."""
    if kernel == "torch":
        return None
    if not installed(kernel):
        return f"{PACKAGES[kernel][1]} is not installed (pip install 'ds_chunk[kernels]')"
    interpreted = kernel == "liger" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted and not (kernel == "cce" and CCE_IMPL == "torch_compile"):
        return f"it runs on CUDA only (this model is on {device.type})"
    if head.linear is None:
        return f"the LM head is a {type(head.module).__name__}, not a plain nn.Linear (peft / bitsandbytes)"
    if head.transform is not None and head.softcap is None:
        return f"it has no '{head.attr}' logit transform (only soft-capping)"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"it computes in 16/32-bit, not {dtype}"
    sixteen = (torch.bfloat16, torch.float16)
    if kernel == "cce" and CCE_IMPL == "cce" and (dtype not in sixteen or head.linear[0].dtype not in sixteen):
        return f"Cut Cross-Entropy's kernel takes bf16 / fp16 weights and hidden states, not {head.linear[0].dtype}" + (
            f" under {dtype} autocast (its kernels ignore autocast)" if dtype in sixteen else ""
        )
    if kernel == "cce" and head.linear[1] is not None:
        return "Cut Cross-Entropy takes no LM head bias"
    if kernel == "cce" and partitioned(head.module.parameters()):
        return "Cut Cross-Entropy reads the LM head's weight again in its backward, when ZeRO-3 has partitioned it"
    return None


def liger_blocks(head: LMHead) -> int:
    """How many blocks Liger cuts each call into, whatever its rows: ceil(vocab / hidden)."""
    weight = head.module.weight
    vocab, hidden = getattr(weight, "ds_shape", weight.shape)  # ZeRO-3: the whole shape
    return -(-vocab // hidden)


def pick(
    requested: str | None,
    head: LMHead,
    device: torch.device,
    dtype: torch.dtype,
    rows: int | None = None,
    sub_chunk: int | None = None,
) -> str:
    """The kernel for this model: ``requested`` (an error if it cannot run exactly here), or
    by default liger, then cce, where they can, else torch. ``rows`` (batch x chunk) and our
    ``sub_chunk`` (None: the whole chunk): liger is passed over where its blocks would be
    smaller than ours."""
    if requested is not None:
        why = _why_not(requested, head, device, dtype)
        if why:
            raise ValueError(f'chunkwise.loss_kernel = "{requested}" cannot be used: {why}; "torch" always can')
        return requested
    few_rows = rows is not None and head.linear is not None and rows < liger_blocks(head) * min(sub_chunk or rows, rows)
    kernels = ("cce", "torch") if few_rows else ("liger", "cce", "torch")
    return next(k for k in kernels if _why_not(k, head, device, dtype) is None)


def ce_sum(kernel: str, head: LMHead, hidden: torch.Tensor, target: torch.Tensor, weight, bias) -> torch.Tensor:
    """Sum of token CE of the head over hidden [B, C, H] for target [B, C] (-100 ignored), with
    the gradients of hidden, weight and bias made by ``kernel`` in its forward."""
    h, t = hidden.flatten(0, 1), target.flatten()
    if kernel == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # float32 accumulation of the weight / bias gradients, as ds_chunk's kernel does
        return liger_fused_linear_cross_entropy(h, weight, t, bias, ignore_index=IGNORE_INDEX, reduction="sum",
                                                softcap=head.softcap, accum_dtype=torch.float32)  # fmt: skip
    from cut_cross_entropy import linear_cross_entropy

    # filter_eps=None: exact, no gradient filtering. Its kernel ignores autocast: the hidden
    # states in the weight's 16-bit dtype, as autocast would give the head's matmul
    h = h.to(weight.dtype).contiguous()
    return linear_cross_entropy(h, weight, t, ignore_index=IGNORE_INDEX, softcap=head.softcap, reduction="sum",
                                filter_eps=None, impl=CCE_IMPL)  # fmt: skip
