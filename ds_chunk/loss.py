"""Chunk loss: LM head + cross-entropy in sub-chunks, fused with its gradient, normalised globally.

For a plain ``nn.Linear`` head the loss of a sub-chunk and its gradients (w.r.t. the hidden
states, and the head's weight and bias when they train) are made in the same pass: the
logits of one sub-chunk are the only [tokens x V] tensor that ever exists, and the backward
only scales the saved gradients (Liger-Kernel's fused linear cross-entropy, in torch).
Under ZeRO-3 a frozen head's weight is gathered for the call (LoRA: the usual case). Other
heads (peft LoRA on the head, bitsandbytes) run the head module per sub-chunk under
non-reentrant checkpointing instead; a trained head under ZeRO-3 runs the module per
sub-chunk without recompute (ZeRO-3 re-gathers a weight only for its module's own backward),
so those sub-chunks' logits stay for the backward. Label smoothing is not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ds_chunk import loss_kernels
from ds_chunk.adapter import LMHead
from ds_chunk.chunking import IGNORE_INDEX
from ds_chunk.zero3 import gathered, partitioned

LOGITS_BUDGET = 32 * 2**20  # bytes of float32 logits per sub-chunk when loss_chunk_size is left to us


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax, logits [n, V] -> [n]."""
    return torch.special.entr(logits.softmax(-1)).sum(-1)


@dataclass
class TokenStats:
    """Sums over the supervised tokens whose logits were made: the entropy of the next-token
    distribution and whether the label is its (first) argmax, as TRL's SFTTrainer logs them
    (``entropy``, ``mean_token_accuracy``). complete: every supervised token was counted (not
    so where a fused kernel made the loss without logits)."""

    entropy: float = 0.0
    correct: int = 0
    tokens: int = 0
    complete: bool = True
    _parts: list = field(default_factory=list, repr=False)  # per block: its three sums, as tensors (no sync)

    @torch.no_grad()
    def add(self, entropy: torch.Tensor, hit: torch.Tensor, keep: torch.Tensor) -> None:
        """entropy, hit, keep: [n] per position; only ``keep`` positions count."""
        self._parts.append(((entropy * keep).sum().double(), (hit & keep).sum(), keep.sum()))

    @torch.no_grad()
    def add_logits(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """From logits [n, V] (the family's transform applied, upcast) and target [n]."""
        self.add(token_entropy(logits), logits.argmax(-1) == target, target != IGNORE_INDEX)

    def total(self) -> TokenStats:
        """The sums as numbers (one synchronisation)."""
        for e, c, n in self._parts:
            self.entropy += float(e)
            self.correct += int(c)
            self.tokens += int(n)
        self._parts = []
        return self


def auto_sub_chunk(vocab: int, rows: int = 1) -> int:
    """Positions per LM-head sub-chunk: the largest power of two whose float32 logits
    [rows, positions, vocab] fit in ``LOGITS_BUDGET`` (32 MiB), from 16 to 4096.
    Vocabulary 32,000: 256; Llama-3's 128,256: 64."""
    fit = max(1, LOGITS_BUDGET // (4 * vocab * rows))
    return int(min(4096, max(16, 2 ** math.floor(math.log2(fit)))))


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    # HF upcasts half-precision logits to float32 for the loss; keep float64 as is.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _zero_loss(hidden: torch.Tensor) -> torch.Tensor:
    # losses accumulate in float32, or float64 for float64 hidden states
    return hidden.new_zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)


def _ce_sum(head: LMHead, hidden: torch.Tensor, target: torch.Tensor, stats: list | None = None) -> torch.Tensor:
    """stats: [TokenStats] to add to, emptied on use (a checkpoint's recompute adds nothing)."""
    logits = _upcast(head(hidden))  # [n, V]
    if stats:
        stats.pop().add_logits(logits.detach(), target)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")


def _block_ce_and_grad(head: LMHead, h, t, weight, bias, scale: float, stats: TokenStats | None = None):
    """CE sum of one block, hidden [n, H], target [n], and ``scale`` x d CE / d logits [n, V]
    in the logits' own dtype: what the unfused path hands the LM head's matmul backward for
    the loss CE sum x scale (scaled before the matmul, as there, so the roundings agree).

    One [n, V] float32 tensor at a time: the softmax is made in place in the logits
    (``torch.logsumexp`` would allocate a second one), and a 16-bit original is dropped
    once upcast. Two with a logit transform (``LMHead.with_slope``): soft-capping keeps its
    slope for the end, a constant scale makes a new tensor of the scaled logits; and with
    ``stats``, the entropy's."""
    z = F.linear(h, weight, bias)  # [n, V], as the module computes it (autocast applies)
    dtype = z.dtype
    z = _upcast(z)
    slope = None
    if head.transform is not None:
        z, slope = head.with_slope(z, head.value)
    keep = t != IGNORE_INDEX
    safe = t.masked_fill(~keep, 0).unsqueeze(1)
    picked = z.gather(1, safe).squeeze(1)
    top = z.amax(1, keepdim=True)
    hit = z.argmax(1) == t if stats is not None else None
    total = z.sub_(top).exp_().sum(1, keepdim=True)  # z is now exp(z - top)
    ce = (((total.log() + top).squeeze(1) - picked) * keep).sum()
    # d CE / d z = softmax(z) - onehot(t) on supervised rows, 0 on ignored ones
    z.div_(total)
    if stats is not None:
        stats.add(torch.special.entr(z).sum(1), hit, keep)
    dz = z.mul_(keep.unsqueeze(1))
    dz.scatter_add_(1, safe, -keep.unsqueeze(1).to(dz.dtype))
    dz.mul_(scale)
    if slope is not None:
        dz.mul_(slope)
    return ce, dz.to(dtype)


class _FusedLinearCE(torch.autograd.Function):
    """sum of token CE of ``head(hidden)`` over a chunk / ``normalizer``, hidden [B, C, H], target
    [B, C], in blocks of ``step`` positions; the gradients are made in the forward, block by
    block (the weight's summed into one buffer), and the backward returns them scaled.

    The gradients are kept on ctx rather than saved for backward, and scaled in place there:
    saved, autograd could neither let the weight's be stolen into ``.grad`` nor avoid a
    scaled copy, two [V, H] buffers at once. So the graph can be backpropagated once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, normalizer: float, step: int, skip: bool, head: LMHead, stats):
        grad_h = torch.zeros_like(hidden) if hidden.requires_grad else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight.requires_grad else None
        grad_b = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and bias.requires_grad else None
        )
        total = _zero_loss(hidden)
        for s in range(0, hidden.shape[1], step):
            h, t = hidden[:, s : s + step].flatten(0, 1), target[:, s : s + step].flatten()
            if skip and not (t != IGNORE_INDEX).any():
                continue
            ce, d = _block_ce_and_grad(head, h, t, weight, bias, 1.0 / normalizer, stats)
            total += ce.to(total.dtype)
            if grad_h is not None:
                grad_h[:, s : s + step] = (d @ weight.to(d.dtype)).view(hidden.shape[0], -1, hidden.shape[2])
            if grad_w is not None and grad_w.dtype == d.dtype:  # in place: no [V, H] temporary
                grad_w.addmm_(d.t(), h.to(d.dtype))
            elif grad_w is not None:  # a 16-bit product, summed in float32
                grad_w += d.t() @ h.to(d.dtype)
            if grad_b is not None:
                grad_b += d.sum(0)
            del d  # or this block's [n, V] gradient stays alive through the next block's
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        ctx.grads = (grad_h, cast(grad_w, weight), cast(grad_b, bias))
        return total / normalizer

    @staticmethod
    def backward(ctx, out):
        if ctx.grads is None:
            raise RuntimeError("ds_chunk's fused LM head + loss can be backpropagated once (no retain_graph)")
        grads, ctx.grads = ctx.grads, None
        return *(None if g is None else g.mul_(out.to(g.dtype)) for g in grads), None, None, None, None, None, None


def chunk_loss(
    head: LMHead,
    hidden: torch.Tensor,
    target: torch.Tensor,
    normalizer: float,
    sub_chunk: int | None = None,
    skip_unsupervised: bool = True,
    kernel: str = "torch",
    stats: TokenStats | None = None,
) -> torch.Tensor:
    """sum of token CE over the chunk / normalizer (the supervised tokens of the whole step).

    head: ``adapter.lm_head(model)``. hidden: [B, C, H] final hidden states; target: [B, C]
    globally shifted labels. The head runs on ``sub_chunk`` positions (all rows) at a time
    (None: the whole chunk). Sub-chunks without a supervised token are skipped, unless
    ``skip_unsupervised`` is False (ranks that must call the LM head alike: ZeRO-3).
    kernel: what makes the loss and its gradients with autograd on (``loss_kernels.pick``:
    "torch" is ours; "liger" / "cce" take their own blocks); without autograd it is ours.
    stats: adds the supervised tokens' entropy and accuracy (not with "liger" / "cce").
    """
    step = sub_chunk or hidden.shape[1]
    parts = head.linear
    zero3 = partitioned(head.module.parameters())
    if any(p.requires_grad for p in zero3):
        parts = None
    if skip_unsupervised and not (target != IGNORE_INDEX).any():
        return _zero_loss(hidden)
    if parts is not None and torch.is_grad_enabled():
        with gathered(p for p in parts if p is not None):  # ZeRO-3: a collective, every rank calls it
            if kernel != "torch":
                if stats is not None:
                    stats.complete = False  # the kernel makes no logits
                return loss_kernels.ce_sum(kernel, head, hidden, target, *parts) / normalizer
            args = (target, normalizer, step, skip_unsupervised, head, stats)
            return _FusedLinearCE.apply(hidden, parts[0], parts[1], *args)
    recompute = sub_chunk is not None and torch.is_grad_enabled() and not zero3
    total = _zero_loss(hidden)
    for s in range(0, hidden.shape[1], step):
        h, t = hidden[:, s : s + step].flatten(0, 1), target[:, s : s + step].flatten()
        if skip_unsupervised and not (t != IGNORE_INDEX).any():
            continue
        once = [] if stats is None else [stats]
        ce = checkpoint(_ce_sum, head, h, t, once, use_reentrant=False) if recompute else _ce_sum(head, h, t, once)
        total = total + ce
    return total / normalizer
