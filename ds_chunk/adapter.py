"""How ds_chunk drives an HF decoder-only model chunk by chunk, and what each family needs.

Works through public transformers APIs (``get_decoder``, ``get_output_embeddings``, the
``Cache`` protocol), so a decoder-only model on the Cache API runs unpatched: plain,
peft-wrapped, bitsandbytes-quantized, or inside a DeepSpeed engine. What a family's
``*ForCausalLM.forward`` does beyond "decoder, output embedding, cross-entropy" lives here,
one entry per family: an elementwise logit transform (``LOGIT_TRANSFORMS``), RoPE
frequencies that depend on the sequence length (``full_length_rope``). Anything else that
would make the chunked gradient differ is refused by ``check_supported``, naming the class
and the setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model cannot be trained chunk-wise; the message names the class and why."""


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DeepSpeed engine / DDP wrapper (peft wrappers are kept)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model itself: inside engine / DDP wrappers and peft's PeftModel."""
    model = unwrap(model)
    return unwrap(model.get_base_model()) if hasattr(model, "get_base_model") else model


def text_config(model: nn.Module):
    """The config of the language model (``get_text_config``: nested for multimodal wrappers)."""
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# ---- what a family's forward does to the logits ----------------------------------------------

# model_type -> (config attribute, transform(logits, v), with_slope(logits, v)): applied after
# the output embedding by that family's *ForCausalLM.forward, elementwise, so the chunked loss
# applies it too. with_slope is the fused loss's: (the transformed logits, made in place where
# the ops allow, HF's ops in HF's order; their derivative, a number where it is constant).


def _softcap_with_slope(x: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    t = x.div_(c).tanh_()
    slope = t.square().neg_().add_(1)  # 1 - tanh^2, kept to the end: the only second [n, V] tensor
    return t.mul_(c), slope


_SOFTCAP = ("final_logit_softcapping", lambda x, c: torch.tanh(x / c) * c, _softcap_with_slope)
_DIVIDE = ("logits_scaling", lambda x, s: x / s, lambda x, s: (x / s, 1 / s))
_MULTIPLY = ("logit_scale", lambda x, s: x * s, lambda x, s: (x * s, s))
LOGIT_TRANSFORMS = {
    "gemma2": _SOFTCAP,
    "gemma3_text": _SOFTCAP,
    "gemma3n_text": _SOFTCAP,
    "vaultgemma": _SOFTCAP,
    "granite": _DIVIDE,
    "granitemoe": _DIVIDE,
    "granitemoeshared": _DIVIDE,
    "cohere": _MULTIPLY,
    "cohere2": _MULTIPLY,
}
# Config attributes that some family's forward applies to the logits: a family not in
# LOGIT_TRANSFORMS with one of these set is refused (the same name means different things:
# granite divides by logits_scaling, hyperclovax multiplies).
LOGIT_ATTRS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclasses.dataclass(frozen=True)
class LMHead:
    """hidden [..., H] -> logits [..., V] as the model's own forward computes them: the output
    embedding, then the family's elementwise logit transform (``value`` its setting), if any."""

    module: nn.Module
    transform: Callable | None = None
    with_slope: Callable | None = None
    value: float | None = None
    attr: str | None = None  # the config attribute ``value`` comes from

    @property
    def softcap(self) -> float | None:
        """The final logit soft-capping value c (logits -> c tanh(logits / c)), if that is the transform."""
        return self.value if self.attr == _SOFTCAP[0] else None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)
        return logits if self.transform is None else self.transform(logits, self.value)

    @property
    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) when the output embedding is a plain ``nn.Linear`` (not a peft or
        bitsandbytes layer): what a fused loss can multiply by itself; None otherwise. Under
        ZeRO-3 they are partitions: gather them (``zero3.gathered``) around their use."""
        m = self.module
        if type(m) is not nn.Linear:
            return None
        return m.weight, m.bias


def lm_head(model: nn.Module) -> LMHead:
    """The model's LM head: its output embedding and its family's logit transform."""
    head = unwrap(model).get_output_embeddings()
    cfg = text_config(model)
    attr, transform, with_slope = LOGIT_TRANSFORMS.get(getattr(cfg, "model_type", None), (None, None, None))
    value = getattr(cfg, attr, None) if attr else None
    if value is None:
        return LMHead(head)
    return LMHead(head, transform, with_slope, value, attr)


# ---- what cannot be chunked exactly --------------------------------------------------------

ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}  # the K/V a chunk needs stay in the store
KV_CACHE_NAMES = {"Cache", "DynamicCache"}  # annotations of a decoder that takes a KV cache


def check_supported(model: nn.Module, seq_len: int) -> None:
    """Raise UnsupportedModelError unless chunk-wise replay is exact for this model."""
    base = base_model(model)
    name = type(base).__name__
    cfg = text_config(base)
    if cfg is None or not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        raise UnsupportedModelError(f"{name}: not an HF causal LM (needs config, get_decoder, get_output_embeddings)")
    if getattr(base.config, "is_encoder_decoder", False) or getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name}: encoder-decoder models are not supported, only decoder-only LMs")
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is base or decoder is None or not any(decoder is m for m in base.modules() if m is not base):
        raise UnsupportedModelError(f"{name}: get_decoder() does not return its decoder (a submodule of the model)")
    if cfg is not base.config:
        # a multimodal wrapper (its config nests a text config): its forward runs an inner
        # model around the decoder that builds its own embeddings and masks (measured:
        # Gemma3ForConditionalGeneration's text-only logits differ from its decoder's by 9e-3)
        raise UnsupportedModelError(
            f"{name}: a multimodal wrapper, whose forward runs more than its decoder ({type(decoder).__name__}); "
            "train the language model alone (AutoModelForCausalLM.from_config(config.get_text_config()))"
        )
    if head is None or not any(head is m for m in base.children()):
        raise UnsupportedModelError(
            f"{name}: its LM head is more than the output embedding (get_output_embeddings() is not a direct "
            "submodule: a transform runs before it), which ds_chunk does not reproduce"
        )
    _check_attention(name, cfg, seq_len)
    _check_logits(name, cfg)
    _check_cache(name, decoder)


def _check_attention(name: str, cfg, seq_len: int) -> None:
    layer_types = set(getattr(cfg, "layer_types", None) or ())
    if layer_types - ATTENTION_LAYER_TYPES:
        raise UnsupportedModelError(
            f"{name}: layer types {sorted(layer_types - ATTENTION_LAYER_TYPES)} are not supported, only "
            f"{sorted(ATTENTION_LAYER_TYPES)} (a recurrent state or chunked attention is not a KV cache)"
        )
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise UnsupportedModelError(
            f"{name}: num_kv_shared_layers={cfg.num_kv_shared_layers} (layers reading another layer's K/V) "
            "is not supported"
        )


def _check_logits(name: str, cfg) -> None:
    known = LOGIT_TRANSFORMS.get(getattr(cfg, "model_type", None), (None,))[0]
    for attr in LOGIT_ATTRS:
        if attr != known and getattr(cfg, attr, None) not in (None, 1, 1.0):
            raise UnsupportedModelError(f"{name}: {attr}={getattr(cfg, attr)} is applied outside the LM head")


def _check_cache(name: str, decoder: nn.Module) -> None:
    key = cache_kwarg(decoder)
    if key is None:
        raise UnsupportedModelError(f"{name}: its decoder takes no KV cache argument")
    annotation = inspect.signature(decoder.forward).parameters[key].annotation
    other = set(re.findall(r"\w*Cache\w*", str(annotation))) - KV_CACHE_NAMES
    if other:
        raise UnsupportedModelError(
            f"{name}: its decoder takes a {sorted(other)[0]} (a recurrent state), not a KV cache"
        )


def cache_kwarg(decoder: nn.Module) -> str | None:
    """The name under which the decoder takes its cache (transformers renamed it)."""
    params = inspect.signature(decoder.forward).parameters
    return next((n for n in ("cache", "past_key_values") if n in params), None)


# ---- around a chunk-wise call ------------------------------------------------------------------


@contextlib.contextmanager
def cache_under_checkpointing(model: nn.Module) -> Iterator[None]:
    """Let HF gradient checkpointing keep our cache during the replay, non-reentrant.

    HF drops the cache in checkpointed layers (a writing cache would be updated again
    by the recompute). Ours is a pure function of the KV store during the replay, so the
    recompute reads the same prefix: tell those layers they may keep it. Reentrant
    checkpointing would cut the carried K/V gradient (K/V stored under no_grad have no
    grad_fn inside its recompute), so a layer configured with it is switched to
    non-reentrant for the call: the same gradient, exactly.
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    funcs = {m: m.__dict__.get("_gradient_checkpointing_func") for m in layers}
    for m in layers:
        m._can_checkpoint_with_cache = True
        func = funcs[m]
        if isinstance(func, functools.partial) and func.keywords.get("use_reentrant", False):
            keywords = {**func.keywords, "use_reentrant": False}
            m._gradient_checkpointing_func = functools.partial(func.func, *func.args, **keywords)
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache
            if funcs[m] is not None:
                m._gradient_checkpointing_func = funcs[m]


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model takes, or None: dynamic RoPE rescales past
    ``max_position_embeddings``, which is what it is for. A RoPE scaling ``factor`` (linear,
    yarn, llama3, longrope) stretches the pretrained length by that factor (transformers'
    docs: "a factor of x will enable the model to handle sequences of length x * original
    maximum pre-trained length")."""
    cfg = text_config(model)
    rope = getattr(cfg, "rope_parameters", None) or {}
    per_layer_type = rope and all(isinstance(r, dict) for r in rope.values())  # Gemma 3: one per layer type
    ropes = list(rope.values()) if per_layer_type else [rope]
    if any("dynamic" in str(r.get("rope_type")) for r in ropes):
        return None
    longest = getattr(cfg, "max_position_embeddings", None)
    if longest is None:
        return None
    for r in ropes:
        if r.get("rope_type") not in (None, "default") and isinstance(r.get("factor"), (int, float)):
            original = r.get("original_max_position_embeddings") or longest
            longest = max(longest, int(original * r["factor"]))
    return longest


def uses_rope(model: nn.Module) -> bool:
    """Whether positions reach the model through a rotary embedding only (no position table or
    ALiBi sized by the longest sequence): a packed row may then outgrow the trained length, as
    long as its documents do not."""
    return any("rotary" in type(m).__name__.lower() for m in model.modules())


def _length_dependent_rope(module: nn.Module) -> list[str | None]:
    """The layer types (None: the only one) whose RoPE frequencies depend on the sequence length."""
    rope_type = getattr(module, "rope_type", None)
    if rope_type is None or not hasattr(type(module).forward, "__wrapped__"):
        return []
    types = rope_type.items() if isinstance(rope_type, dict) else [(None, rope_type)]
    return [layer for layer, kind in types if kind == "longrope" or "dynamic" in str(kind)]


@contextlib.contextmanager
def full_length_rope(model: nn.Module, seq_len: int) -> Iterator[None]:
    """RoPE frequencies of the whole sequence for every chunk.

    longrope (short or long factors) and dynamic RoPE pick their frequencies per forward
    call from max(position_ids) + 1, so an early chunk alone would use those of a short
    sequence. Inside the block each such rotary module is set once for ``seq_len`` tokens
    and then runs without the per-call update (transformers' undecorated forward).
    """
    modules = [(m, _length_dependent_rope(m)) for m in model.modules()]
    modules = [(m, layers) for m, layers in modules if layers]
    for m, layers in modules:
        buffer = next(iter(m.buffers()), None)
        x = torch.zeros(1, device=None if buffer is None else buffer.device)
        last = torch.tensor([[seq_len - 1]], device=x.device)
        for layer in layers:  # the decorated forward: the update for seq_len tokens
            type(m).forward(m, x, last, **({} if layer is None else {"layer_type": layer}))
        m.forward = type(m).forward.__wrapped__.__get__(m)
    try:
        yield
    finally:
        for m, _ in modules:
            del m.forward
