"""The fused LM head + cross-entropy against the unfused path (the head module, then HF's CE)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_chunk.adapter import LOGIT_TRANSFORMS, LMHead
from ds_chunk.loss import _ce_sum, auto_sub_chunk, chunk_loss

V, H = 97, 16


def _head(bias: bool, trainable: bool, dtype=torch.float64, transform: str | None = None) -> LMHead:
    torch.manual_seed(0)
    module = nn.Linear(H, V, bias=bias, dtype=dtype)
    module.requires_grad_(trainable)
    if transform is None:
        return LMHead(module)
    attr, f, df = LOGIT_TRANSFORMS[transform]
    return LMHead(module, f, df, {"gemma2": 2.0, "granite": 4.0, "cohere": 0.3}[transform], attr)


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 24, H, generator=g, dtype=dtype).requires_grad_(True)
    target = torch.randint(0, V, (2, 24), generator=g)
    target[0, :5] = -100  # ignored positions
    target[1, 8:16] = -100  # a whole sub-chunk of 8 ignored in one row
    return hidden, target


def _loss(head: LMHead, hidden, target, fused: bool, sub: int | None = None, skip: bool = True):
    if fused:
        return chunk_loss(head, hidden, target, 37.0, sub, skip)
    return _ce_sum(head, hidden.flatten(0, 1), target.flatten()) / 37.0  # the module on the whole chunk, then CE


def _grads(head: LMHead, hidden, target, fused: bool, sub: int | None):
    loss = _loss(head, hidden, target, fused, sub)
    params = [p for p in head.module.parameters() if p.requires_grad]
    return loss.detach(), torch.autograd.grad(loss, [hidden, *params])


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("transform", [None, "gemma2", "granite", "cohere"])
@pytest.mark.parametrize("sub", [None, 8, 5])
def test_fused_equals_unfused_float64(bias, trainable, transform, sub):
    head = _head(bias, trainable, transform=transform)
    hidden, target = _inputs()
    want_loss, want = _grads(head, hidden, target, fused=False, sub=None)
    got_loss, got = _grads(head, hidden, target, fused=True, sub=sub)
    assert abs(float(got_loss - want_loss)) < 1e-12
    for a, b in zip(got, want):
        assert float((a - b).norm() / b.norm()) < 1e-12


def test_fused_bf16_within_rounding():
    head = _head(bias=True, trainable=True, dtype=torch.bfloat16)
    hidden, target = _inputs(torch.bfloat16)
    want_loss, want = _grads(head, hidden, target, fused=False, sub=None)
    got_loss, got = _grads(head, hidden, target, fused=True, sub=8)
    assert abs(float(got_loss - want_loss)) / float(want_loss) < 1e-3
    for a, b in zip(got, want):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_tied_head_and_all_ignored_sub_chunk_kept_for_zero3():
    """A tied embedding gets both gradients; with skip_unsupervised=False an ignored sub-chunk
    still runs the head (every rank alike) and adds exactly zero."""
    embed = nn.Embedding(V, H, dtype=torch.float64)
    module = nn.Linear(H, V, bias=False, dtype=torch.float64)
    module.weight = embed.weight
    ids, target = torch.randint(0, V, (2, 24)), _inputs()[1]
    losses = []
    for fused in (False, True):
        embed.zero_grad()
        loss = _loss(LMHead(module), embed(ids), target, fused, sub=8, skip=False)
        loss.backward()
        losses.append((float(loss), embed.weight.grad.clone()))
    assert abs(losses[0][0] - losses[1][0]) < 1e-12
    assert float((losses[0][1] - losses[1][1]).norm() / losses[0][1].norm()) < 1e-12


def test_other_heads_take_the_unfused_path():
    """A peft LoRA head is not a plain Linear: it runs as a module, still exact."""
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(H, V, bias=False, dtype=torch.float64)

        def forward(self, x):
            return self.lm_head(x)

    peft = get_peft_model(Wrap(), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    head = LMHead(peft.base_model.model.lm_head)
    assert head.linear is None
    hidden, target = _inputs()
    loss = chunk_loss(head, hidden, target, 37.0, 8)
    ref = F.cross_entropy(head(hidden).flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum") / 37.0
    assert abs(float(loss - ref)) < 1e-12


def test_auto_sub_chunk_rule():
    assert auto_sub_chunk(32000) == 256 and auto_sub_chunk(128256) == 64 and auto_sub_chunk(32000, rows=4) == 64
    assert auto_sub_chunk(10) == 4096 and auto_sub_chunk(10**7) == 16
