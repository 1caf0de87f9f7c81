"""Library kernels for the LM head + loss (Liger-Kernel, Cut Cross-Entropy): when each is
picked, and their results against ds_chunk's torch kernel and full backprop."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ds_chunk import ChunkwiseConfig, ConfigError, loss_kernels
from ds_chunk.adapter import LOGIT_TRANSFORMS, LMHead

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "loss_kernel_check.py")
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def everything_installed(monkeypatch):
    monkeypatch.setattr(loss_kernels, "installed", lambda kernel: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _head(bias=False, transform=None, zero3=False, dtype=torch.bfloat16) -> LMHead:
    module = nn.Linear(8, 11, bias=bias, dtype=dtype)
    if zero3:
        module.weight.ds_id = 0  # how DeepSpeed tags a ZeRO-3 partitioned parameter
    if transform is None:
        return LMHead(module)
    attr, f, df = LOGIT_TRANSFORMS[transform]
    return LMHead(module, f, df, 2.0, attr)


def test_default_pick(everything_installed):
    assert loss_kernels.pick(None, _head(), CUDA, torch.bfloat16) == "liger"
    assert loss_kernels.pick(None, _head(transform="gemma2"), CUDA, torch.bfloat16) == "liger"
    assert loss_kernels.pick(None, _head(), CPU, torch.float32) == "torch"  # CUDA kernels
    assert loss_kernels.pick(None, _head(transform="granite"), CUDA, torch.bfloat16) == "torch"
    assert loss_kernels.pick(None, _head(), CUDA, torch.float64) == "torch"


def test_default_pick_falls_back_to_what_is_installed(monkeypatch):
    monkeypatch.setattr(loss_kernels, "installed", lambda kernel: kernel != "liger")
    assert loss_kernels.pick(None, _head(), CUDA, torch.bfloat16) == "cce"
    assert loss_kernels.pick(None, _head(bias=True), CUDA, torch.bfloat16) == "torch"  # cce: no bias
    assert loss_kernels.pick(None, _head(zero3=True), CUDA, torch.bfloat16) == "torch"  # cce: not under ZeRO-3
    monkeypatch.setattr(loss_kernels, "installed", lambda kernel: kernel == "torch")
    assert loss_kernels.pick(None, _head(), CUDA, torch.bfloat16) == "torch"


@pytest.mark.parametrize(
    "kernel, head, device, dtype, reason",
    [
        ("liger", _head(), CPU, torch.float32, "runs on CUDA only"),
        ("cce", _head(bias=True), CUDA, torch.bfloat16, "no LM head bias"),
        ("liger", _head(transform="cohere"), CUDA, torch.bfloat16, "'logit_scale' logit transform"),
        ("cce", _head(), CUDA, torch.float64, "16/32-bit"),
        ("cce", _head(zero3=True), CUDA, torch.bfloat16, "backward, when ZeRO-3 has partitioned it"),
    ],
)
def test_explicit_choice_that_cannot_run_names_the_key(everything_installed, kernel, head, device, dtype, reason):
    with pytest.raises(ValueError, match=f'chunkwise.loss_kernel = "{kernel}" cannot be used: .*{reason}'):
        loss_kernels.pick(kernel, head, device, dtype)


def test_explicit_choice_not_installed(monkeypatch):
    monkeypatch.setattr(loss_kernels, "installed", lambda kernel: kernel == "torch")
    with pytest.raises(ValueError, match=r"cut-cross-entropy is not installed \(pip install 'ds_chunk\[kernels\]'\)"):
        loss_kernels.pick("cce", _head(), CUDA, torch.bfloat16)
    assert loss_kernels.pick("torch", _head(), CUDA, torch.bfloat16) == "torch"


def test_peft_head_is_refused_by_name(everything_installed):
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(8, 11)

    peft = get_peft_model(Wrap(), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a plain nn.Linear"):
        loss_kernels.pick("liger", LMHead(peft.base_model.model.lm_head), CUDA, torch.bfloat16)


def test_config_key():
    assert ChunkwiseConfig.from_dict({}).loss_kernel is None
    assert ChunkwiseConfig.from_dict({"loss_kernel": "cce"}).loss_kernel == "cce"
    with pytest.raises(ConfigError, match=r"chunkwise.loss_kernel = 'triton': expected one of 'torch', 'liger'"):
        ChunkwiseConfig.from_dict({"loss_kernel": "triton"})


def _run(kernel: str, **env) -> dict:
    done = subprocess.run([sys.executable, SCRIPT, kernel], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not loss_kernels.installed("liger"), reason="liger-kernel not installed (extra: kernels)")
def test_liger_equals_torch_kernel_and_full_backprop():
    """Liger's Triton kernels, run by Triton's interpreter on the CPU, float32: the chunk loss
    with and without a head bias against ours, and a SeCO step against full backprop."""
    cases = _run("liger", TRITON_INTERPRET="1")
    assert set(cases) == {"bias", "no_bias", "seco_step"}
    for name, errs in cases.items():
        assert errs["loss"] < 1e-6 and errs["grads"] < 2e-6, (name, errs)


@pytest.mark.slow
@pytest.mark.skipif(not loss_kernels.installed("cce"), reason="cut-cross-entropy not installed (extra: kernels)")
def test_cce_equals_torch_kernel_and_full_backprop():
    """Cut Cross-Entropy through its torch_compile implementation (its Triton kernel is
    CUDA-only), float32: the chunk loss with and without soft-capping against ours, and a
    SeCO step against full backprop."""
    cases = _run("cce")
    assert set(cases) == {"no_bias", "softcap", "seco_step"}
    for name, errs in cases.items():
        assert errs["loss"] < 1e-6 and errs["grads"] < 2e-6, (name, errs)
