"""A chunk's attention over cat(prefix, chunk): no mask, no repeated K/V.

HF's sdpa path hands SDPA a [B, 1, C, P + C] mask whenever the queries are not the whole
sequence (a chunk after a prefix), and with a mask it repeats K/V over the query heads
(GQA) before the call, because only flash attention takes fewer K/V heads and flash takes
no mask. SDPA then keeps the repeated K/V and a float copy of the mask for backward in
every layer: for Llama-3-8B at 16K tokens, ~8 of 22 GiB.

Without padding that mask is causal aligned to the bottom right, which flash attention
computes natively (torch's ``causal_lower_right``), on K/V with fewer heads
(``enable_gqa``). While the scheduler runs, an sdpa model whose inputs have no padding
and whose shapes flash supports uses ``chunk_sdpa`` instead; HF then builds no mask
(an attention function with no mask function of its own gets none).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

NAME = "ds_chunk_sdpa"
# While chunk_attention runs packed rows: the current chunk's segments, set before each decoder
# call (set_segments) and read by chunk_sdpa, in the forward and in a checkpointed layer's
# recompute during that chunk's backward. Not a kwarg: some decoders (Nemotron) do not pass
# their kwargs on to attention.
_PACKED, _SEGMENTS = [False], [None]
_SP = [None]  # while chunk_attention runs sequence parallel: its sequence_parallel.SequenceParallel


def set_segments(segments) -> None:
    """The segments (``documents.Layout.segments``) of the chunk the next decoder calls run."""
    _SEGMENTS[0] = segments


def chunk_sdpa(module: nn.Module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """HF attention-interface function. query [B, heads, C, d]; key, value [B, kv_heads, P + C, d].
    Packed rows (``set_segments``): each document's part of the chunk attends to that
    document's keys only, one causal call per part."""
    kind = query.device.type
    if torch.is_autocast_enabled(kind):  # as SDPA under autocast: all three in its dtype (fp32 q/k/v
        # come from fp32 norms and RoPE: HF Trainer's autocast on fp32 weights, prepared k-bit models)
        query, key, value = (t.to(torch.get_autocast_dtype(kind)) for t in (query, key, value))
    sp = _SP[0]
    if sp is not None:  # this rank's slice of the chunk, all heads -> the whole chunk, its heads
        query = sp.to_heads(query)
    kv_len = key.shape[2]
    window = kwargs.get("sliding_window")
    extra = kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None
    if attention_mask is not None or extra or (window is not None and window < kv_len):
        raise RuntimeError(f"{NAME} computes plain causal attention only (mask, sinks, softcap or window given)")
    segments = _SEGMENTS[0] if _PACKED[0] else None
    if _PACKED[0] and (
        segments is None or (segments[0][0][0], segments[0][-1][1]) != (kv_len - query.shape[2], kv_len)
    ):
        raise RuntimeError(f"{NAME}: the packed documents' segments are not this chunk's")
    if not query.is_cuda and dropout:
        raise RuntimeError(f"{NAME} on CPU computes attention without dropout only")
    if segments is None:
        out = _causal(query, key, value, dropout, scaling)
    else:
        out = _packed(query, key, value, segments, dropout, scaling)
    if sp is not None:
        out = sp.to_sequence(out)
    return out.transpose(1, 2).contiguous(), None


def _packed(query, key, value, segments, dropout: float, scaling):
    """Each document's part of the chunk (``documents.Layout.segments``: per row, (start, end,
    document start) in positions) over its own document's keys; rows laid out alike at once."""
    s = key.shape[2] - query.shape[2]  # the chunk's first position
    same = all(row == segments[0] for row in segments)
    groups = [(slice(None), segments[0])] if same else [(slice(b, b + 1), row) for b, row in enumerate(segments)]
    rows_out = []
    for rows, parts in groups:
        q, k, v = query[rows], key[rows], value[rows]
        parts_out = [_causal(q[:, :, a - s : b - s], k[:, :, d:b], v[:, :, d:b], dropout, scaling) for a, b, d in parts]
        rows_out.append(torch.cat(parts_out, dim=2))
    return torch.cat(rows_out)


def _causal(query, key, value, dropout: float, scaling):
    """Causal attention of the last queries over the keys (bottom-right aligned): [B, heads, C, d]."""
    from torch.nn.attention.bias import causal_lower_right

    q_len, kv_len = query.shape[2], key.shape[2]
    if not query.is_cuda:
        return _PrefixAndDiagonal.apply(query, key, value, kv_len - q_len, scaling)
    gqa = query.shape[1] != key.shape[1]
    if not _flash_supports(query, key, value, dropout):
        # not expected (the scheduler checked the shapes); never let SDPA fall back to its math
        # kernel, which would build [B, heads, C, P + C] scores: repeat K/V as HF does
        key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
        mask, gqa = causal_lower_right(q_len, kv_len)._materialize(query.device), False
    else:
        mask = causal_lower_right(q_len, kv_len)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )  # [B, heads, C, d]


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _PrefixAndDiagonal(torch.autograd.Function):
    """A chunk's causal attention on CPU as two flash calls without a mask: its queries over the
    prefix keys (all visible) and over its own keys (``is_causal``, a square block), merged by
    log-sum-exp, as ring and flash-decoding attention do. The backward runs the flash backward
    of each part with the merged output and log-sum-exp, which gives exactly the gradient of the
    whole softmax. query [B, heads, C, d]; key, value [B, kv_heads, P + C, d] (GQA: fewer heads)."""

    @staticmethod
    def forward(ctx, query, key, value, prefix: int, scale):
        ctx.prefix, ctx.scale = prefix, scale
        own = _FLASH_CPU(query, key[:, :, prefix:], value[:, :, prefix:], 0.0, True, scale=scale)
        if prefix == 0:
            out, lse = own
        else:
            (o1, l1), (o2, l2) = (
                _FLASH_CPU(query, key[:, :, :prefix], value[:, :, :prefix], 0.0, False, scale=scale),
                own,
            )
            lse = torch.logaddexp(l1, l2)  # [B, heads, C], float32 (float64 for float64 inputs)
            w1, w2 = ((part - lse).exp().unsqueeze(-1) for part in (l1, l2))
            out = (o1.to(w1.dtype) * w1 + o2.to(w2.dtype) * w2).to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        p, grad_out = ctx.prefix, grad_out.contiguous()
        dq, dk, dv = _FLASH_CPU_BACKWARD(grad_out, query, key[:, :, p:], value[:, :, p:], out, lse, 0.0, True,
                                         scale=ctx.scale)  # fmt: skip
        if p:
            dq1, dk1, dv1 = _FLASH_CPU_BACKWARD(grad_out, query, key[:, :, :p], value[:, :, :p], out, lse, 0.0, False,
                                                scale=ctx.scale)  # fmt: skip
            dq, dk, dv = dq + dq1, torch.cat([dk1, dk], dim=2), torch.cat([dv1, dv], dim=2)
        return dq, dk, dv, None, None


def _flash_supports(query, key, value, dropout: float) -> bool:
    """Whether torch's flash kernel takes these inputs, probed as ``CausalBias`` does for a
    bottom-right mask: no mask and is_causal=False (torch refuses is_causal=True for fewer
    queries than keys, though the flash op then aligns bottom-right), GQA on."""
    if not torch.backends.cuda.flash_sdp_enabled():
        return False
    params = torch.backends.cuda.SDPAParams(query, key, value, None, dropout, False, True)
    return torch.backends.cuda.can_use_flash_attention(params, False)


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention computes in on ``device``: autocast's where it is on, else the
    parameters' (the first floating one: 4-bit weights are uint8)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def flash_eligible(model: nn.Module, device: torch.device) -> bool:
    """Whether flash attention takes this model's attention on ``device`` (probed on tiny tensors;
    on CPU: torch's CPU flash kernel, without attention dropout)."""
    cfg = model.config.get_text_config()
    if device.type == "cpu":
        dropout = float(getattr(cfg, "attention_dropout", 0.0) or 0.0) if model.training else 0.0
        return dropout == 0.0 and compute_dtype(model, device) in (torch.float32, torch.bfloat16, torch.float64)
    if device.type != "cuda":
        return False
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = compute_dtype(model, device)
    # requires_grad: flash takes fewer shapes with grad; probing the replay's case keeps the
    # no-grad pass and the replay on the same kernel
    q = torch.zeros(1, heads, 8, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.zeros(1, kv_heads, 16, head_dim, dtype=dtype, device=device, requires_grad=True)
    return _flash_supports(q, k, k, float(getattr(cfg, "attention_dropout", 0.0) or 0.0))


def plain_causal(cfg) -> bool:
    """Whether every layer is plain causal attention: no sliding window, no softcap or sinks."""
    sliding = "sliding_attention" in (getattr(cfg, "layer_types", None) or ()) or (
        getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    )
    return not sliding and getattr(cfg, "attn_logit_softcapping", None) is None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, chunk_sdpa)


@contextlib.contextmanager
def chunk_attention(
    model: nn.Module, padded: bool, device: torch.device, packed: bool = False, sp=None
) -> Iterator[bool]:
    """Use ``chunk_sdpa`` for ``model`` inside the block when it is exact and cheaper: an
    sdpa model, no padding, flash attention supported. Yields whether it switched. packed:
    the rows hold several documents (every call then passes its segments). sp (a
    ``sequence_parallel.SequenceParallel``): always switch, for any implementation (the
    caller checked the model and dropped right padding's mask, which causal attention
    never reads): attention is where the ranks swap sequence for heads.

    Only the decoder's own config is switched (its attention layers and mask creation
    read it per call), without the setter's recursion into sub-configs.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    cfg = getattr(decoder, "config", None)
    # only models whose attention layers dispatch through transformers' attention interface:
    # others (Falcon, Bloom, GPT-Neo, ...) read the name themselves and would take another path
    interface = getattr(type(decoder), "_supports_attention_backend", False)
    sdpa = getattr(cfg, "_attn_implementation_internal", None) == "sdpa"
    use = interface and sdpa and not padded and plain_causal(cfg)
    if sp is None and not (use and flash_eligible(model, device)):
        yield False
        return
    _register()
    own = cfg._attn_implementation_internal
    cfg._attn_implementation_internal, _PACKED[0], _SEGMENTS[0], _SP[0] = NAME, packed, None, sp
    try:
        yield True
    finally:
        cfg._attn_implementation_internal, _PACKED[0], _SEGMENTS[0], _SP[0] = own, False, None, None
