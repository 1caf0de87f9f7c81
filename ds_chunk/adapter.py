"""How ds_chunk drives an HF decoder-only model chunk by chunk.

Works through public transformers APIs only (``get_decoder``, ``get_output_embeddings``,
the ``Cache`` protocol), so any decoder-only model on the Cache API runs unpatched:
plain, peft-wrapped, bitsandbytes-quantized, or inside a DeepSpeed engine.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from collections.abc import Iterator

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model cannot be trained chunk-wise; the message names the class and why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine / DDP wrapper (peft wrappers are kept)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _config(model: nn.Module):
    return getattr(model, "config", None)


def check_supported(model: nn.Module, seq_len: int) -> None:
    """Raise UnsupportedModelError unless chunk-wise replay is exact for this model."""
    name = type(unwrap(getattr(model, "get_base_model", lambda: model)())).__name__
    cfg = _config(model)
    if cfg is None or not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise UnsupportedModelError(f"{name}: not an HF causal LM (needs config, get_decoder, get_output_embeddings)")
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: encoder-decoder models are not supported, only decoder-only LMs")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and set(layer_types) != {"full_attention"}:
        raise UnsupportedModelError(
            f"{name}: layer types {sorted(set(layer_types))} are not supported, only full causal attention"
        )
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < seq_len:
        raise UnsupportedModelError(f"{name}: sliding-window attention ({window} < {seq_len} tokens) is not supported")
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise UnsupportedModelError(f"{name}: {attr}={getattr(cfg, attr)} is applied outside the LM head")
    if cache_kwarg(model.get_decoder()) is None:
        raise UnsupportedModelError(f"{name}: its decoder takes no KV cache argument")


def cache_kwarg(decoder: nn.Module) -> str | None:
    """The name under which the decoder takes its cache (transformers renamed it)."""
    params = inspect.signature(decoder.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


@contextlib.contextmanager
def cache_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let HF gradient checkpointing keep our cache during the replay.

    HF drops the cache in checkpointed layers (a writing cache would be updated again
    by the recompute). Ours is a pure function of the KV store during the replay, so the
    recompute reads the same prefix: tell those layers they may keep it.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


@contextlib.contextmanager
def no_cpu_inference_packing(model: nn.Module) -> Iterator[None]:
    """Keep bitsandbytes 4-bit layers out of their CPU inference-only weight layout.

    bitsandbytes (0.50, CPUs with AVX512-BF16) repacks a ``Linear4bit`` weight in place
    when the layer is in eval mode and gets an input without grad, as the no-grad pass
    does; every later call then takes an inference kernel whose gradients are wrong.
    We switch that repacking off while we run, and undo any packing already done.
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # not imported, so no quantized layer can exist
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    saved = [getattr(m, "support_avx512bf16_for_cpu", False) for m in layers]
    for m in layers:
        unpack_cpu_inference_layout(m)
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(layers, saved):
            m.support_avx512bf16_for_cpu = flag


def unpack_cpu_inference_layout(layer: nn.Module) -> bool:
    """Return a repacked ``Linear4bit`` to the standard layout; True if it was packed.

    The packing rounded the block scales (absmax) to bfloat16, which no inverse can
    undo: the layer keeps those rounded scales, so we warn. bitsandbytes' own inverse
    also leaves non-nested scales transposed; we put them back in order.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    nested = state.original_nested
    layer.weight.data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if not nested:  # [K/blocksize, N] bf16 -> [N * K/blocksize] float32, the original order
        state.absmax = state.absmax.T.reshape(-1).float()
    layer.weight.quant_state = state
    warnings.warn(
        "bitsandbytes had repacked a 4-bit weight for CPU inference (an eval-mode no-grad pass); "
        "ds_chunk restored the training layout, but its block scales stay rounded to bfloat16",
        stacklevel=3,
    )
    return True


class RngTape:
    """Replays each chunk with the RNG state it had in the no-grad pass.

    So dropout (LoRA dropout, attention dropout) draws the same masks in both passes:
    the replayed K/V equal the stored leaves, and the gradient is exact for the sampled
    masks, as with activation checkpointing. ``record(k)`` after the last chunk and
    ``replay(k)`` at the end leave the global RNG as one forward pass would.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.states: dict[int, tuple] = {}

    def record(self, chunk: int) -> None:
        self.states[chunk] = (torch.get_rng_state(), torch.cuda.get_rng_state() if self.cuda else None)

    def replay(self, chunk: int) -> None:
        cpu, cuda = self.states[chunk]
        torch.set_rng_state(cpu)
        if self.cuda:
            torch.cuda.set_rng_state(cuda)
