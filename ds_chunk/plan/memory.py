"""Bytes by component: persistent (weights, LoRA, optimizer), activations per token, and
the peak of one step per method (seco / spaco, plain, ckpt)."""

from __future__ import annotations

from ds_chunk.plan.shape import ADAM_STATE_BYTES, DTYPE_BYTES, MASTER_BYTES, ModelShape, Setup

# ---- persistent memory: weights, LoRA, optimizer ---------------------------------------


def trainable_params(shape: ModelShape, setup: Setup) -> int:
    """Full fine-tuning: every parameter. LoRA: A [r, in] + B [out, r] per target linear per layer."""
    if setup.lora_rank == 0:
        return shape.params()
    linears = shape.linears()
    unknown = set(setup.lora_targets) - set(linears)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {', '.join(linears)}")
    per_layer = sum(setup.lora_rank * sum(linears[t]) for t in setup.lora_targets)
    return shape.layers * per_layer


def trainable_bytes(setup: Setup) -> int:
    """Bytes per trainable parameter (and per gradient element).

    peft keeps LoRA weights in float32 even on a 16-bit base (autocast_adapter_dtype), so
    LoRA params and their grads are 4 bytes; full fine-tuning trains in ``dtype``.
    """
    return 4 if setup.lora_rank else DTYPE_BYTES[setup.grad_dtype] if setup.grad_dtype else setup.bytes


def weight_bytes(shape: ModelShape, setup: Setup) -> float:
    """Base weights. Quantization applies to the decoder's linear layers only (bitsandbytes
    keeps embeddings, LM head and norms in ``dtype``). 4bit (NF4/FP4, block 64): 0.5 B/param
    + one float32 absmax per 64 weights. 8bit (LLM.int8): 1 B/param + a float32 scale per
    output row. ZeRO-3 partitions weights over the ranks but gathers a layer to run it
    (plus one prefetched): 2 layers stay whole.
    """
    linears = shape.linears().values()
    linear = shape.layers * sum(a * b for a, b in linears)
    other = (shape.params() - linear) * setup.bytes
    if setup.quant == "4bit":
        quantized = linear * (0.5 + 4 / 64)
    elif setup.quant == "8bit":
        quantized = linear * 1 + shape.layers * sum(out for _, out in linears) * 4
    else:
        quantized = linear * setup.bytes
    total = other + quantized
    if setup.zero_stage == 3 and setup.world_size > 1:
        total = total / setup.world_size + 2 * shape.layer_params() * setup.bytes
    return total


def optimizer_bytes(shape: ModelShape, setup: Setup) -> float:
    """AdamW states (2 x float32) per trainable parameter, plus a float32 master copy when
    the trainable parameters are 16-bit (DeepSpeed bf16/fp16 mixed precision). ZeRO >= 1
    partitions them over the ranks. Returned even when offloaded (then it is host memory).
    """
    per_param = ADAM_STATE_BYTES + (MASTER_BYTES if trainable_bytes(setup) < 4 else 0)
    total = trainable_params(shape, setup) * per_param
    return total / setup.world_size if setup.zero_stage >= 1 else total


def gradient_bytes(shape: ModelShape, setup: Setup) -> float:
    """One gradient per trainable parameter (``.grad``), partitioned by ZeRO >= 2."""
    total = trainable_params(shape, setup) * trainable_bytes(setup)
    return total / setup.world_size if setup.zero_stage >= 2 else total


# ---- per-token activation bytes --------------------------------------------------------


def input_bytes(setup: Setup, consumers: tuple[str, ...], width: int) -> int:
    """Bytes per token kept of an input [width] shared by the linears ``consumers``.

    A linear keeps its input only to compute a weight gradient: with full fine-tuning
    always (once, however many linears share it); with LoRA only for its targets (frozen
    base linears need just their weight to pass the gradient on). On a 16-bit base each
    LoRA target keeps its own float32 copy (peft casts the input to the adapter's dtype).
    """
    if setup.lora_rank == 0:
        return setup.bytes * width
    targets = [c for c in consumers if c in setup.lora_targets]
    if not targets:
        return 0
    return 4 * width * len(targets) if setup.bytes < 4 else setup.bytes * width


def norm_bytes(shape: ModelShape, setup: Setup, consumers: tuple[str, ...]) -> int:
    """What one RMSNorm (feeding the linears ``consumers``) keeps per token.

    The float32 copy of its input the variance is taken from when dtype is 16-bit (in
    float32 that is the input itself, counted where it was made); the normalized x [H]
    when the norm weight trains (its gradient needs it); its output, if a consumer keeps it.
    """
    h = shape.hidden
    upcast = 4 * h if setup.bytes < 4 else 0
    normalized = setup.bytes * h if setup.lora_rank == 0 else 0
    return upcast + normalized + input_bytes(setup, consumers, h)


def layer_activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """Bytes one decoder layer keeps for backward per token (one chunk's activations).

    attention: q and k after RoPE ([heads*d], [kv*d]) and v ([kv*d]) kept by SDPA with its
    output [heads*d] and float32 logsumexp [heads]; the residual sum [H]. o_proj's input is
    that output itself (SDPA's kernels allocate it as [B, T, heads, d], so HF's transpose and
    .contiguous() copy nothing; measured), but a 16-bit LoRA target keeps a float32 copy.
    MLP: gate (SiLU's input), SiLU(gate) and up ([I] each, kept by SiLU and the product),
    down_proj's input [I] if kept, the residual sum [H]. Two RMSNorms. LoRA: lora_A's
    float32 output [r] per target.
    """
    b, h, d, i = setup.bytes, shape.hidden, shape.head_dim, shape.intermediate
    q, kv = shape.heads * d, shape.kv_heads * d
    o_input = input_bytes(setup, ("o_proj",), q) if setup.lora_rank and setup.bytes < 4 else 0
    attn = b * (2 * q + 2 * kv + h) + 4 * shape.heads + o_input
    mlp = b * (3 * i + h) + input_bytes(setup, ("down_proj",), i)
    lora = 4 * setup.lora_rank * len(setup.lora_targets)
    norms = norm_bytes(shape, setup, ("q_proj", "k_proj", "v_proj"))
    norms += norm_bytes(shape, setup, ("gate_proj", "up_proj"))
    return norms + attn + mlp + lora


def kv_token_bytes(shape: ModelShape, setup: Setup) -> int:
    """K and V of one token in all layers, after RoPE and before the GQA repeat: [L, 2, kv, d]."""
    return shape.layers * 2 * (shape.kv_heads // setup.sequence_parallel) * shape.head_dim * setup.bytes


def sub_chunk(shape: ModelShape, setup: Setup, tokens: int) -> int:
    """Positions per LM-head sub-chunk: ``loss_chunk_size``, ds_chunk's rule for "auto", or
    the whole ``tokens``."""
    if setup.loss_chunk_size == "auto":
        from ds_chunk.loss import auto_sub_chunk

        return min(auto_sub_chunk(shape.vocab, setup.batch), tokens)
    return min(setup.loss_chunk_size or tokens, tokens)


def hf_logits_bytes(shape: ModelShape, setup: Setup, tokens: int) -> float:
    """Peak of HF's own LM head + cross-entropy over ``tokens`` positions (plain, ckpt).

    Logits are upcast to float32 for the loss. At the CE backward three [T, V] float32
    tensors are alive: log-softmax output (saved), its gradient, the logits' gradient.
    Then the LM head's backward makes a [V, H] weight gradient, added into ``.grad`` with
    the logits' gradient still alive.
    """
    lb = max(4, setup.bytes)
    head = shape.vocab * shape.hidden * setup.bytes if setup.lora_rank == 0 else 0
    return setup.batch * max(3 * tokens * shape.vocab * lb, tokens * shape.vocab * lb + head)


def logits_bytes(shape: ModelShape, setup: Setup, tokens: int) -> float:
    """Peak of the fused LM head + cross-entropy over ``tokens`` positions (``ds_chunk.loss``).

    Per sub-chunk of s positions, in its forward: one float32 [B*s, V] tensor (the logits,
    turned into their gradient in place) beside the 16-bit logits it was upcast from, or
    the 16-bit copy of the gradient handed to the matmuls; next to the buffers the gradients
    are made into: d hidden [B, tokens, H] and, when the head trains, its weight gradient
    [V, H] in float32 (plus a 16-bit [V, H] product added into it). The backward scales
    those buffers in place. Nothing is recomputed. A logit transform adds a second float32
    [B*s, V] tensor (soft-capping's slope, or the scaled logits).
    """
    s, b = sub_chunk(shape, setup, tokens), setup.bytes
    per_logit = max(4, b) + (b if b < 4 else 0) + (4 if shape.logit_transform else 0)
    grad_h = setup.batch * tokens * shape.hidden * b
    head = shape.vocab * shape.hidden * (max(4, b) + (b if b < 4 else 0)) if setup.lora_rank == 0 else 0
    return setup.batch * s * shape.vocab * per_logit + grad_h + head


# ---- the step's peak, per method -------------------------------------------------------


def _token_bytes(shape: ModelShape, setup: Setup) -> int:
    """Activations of one token through the whole model: all layers, the embedding output
    (layer 0's input, [H]) and the final RMSNorm (its output is the LM head's input)."""
    final_norm = norm_bytes(shape, setup, ("lm_head",))
    return shape.layers * layer_activation_bytes(shape, setup) + setup.bytes * shape.hidden + final_norm


def _replay_moment(shape: ModelShape, setup: Setup, start: int, size: int, grads_done: bool) -> dict[str, float]:
    """Memory at the CE backward of the replay of the chunk [start, start + size).

    grads_done: a later chunk was replayed before, so parameter grads, leaf grads and the
    carried gradient of this chunk exist.
    """
    if setup.kv_offload:
        return _offloaded_moment(shape, setup, start, size, grads_done)
    batch, prefix, own = setup.batch, start, size // setup.sequence_parallel  # own: this rank's tokens
    kv = kv_token_bytes(shape, setup) * batch
    share = 1.0 if setup.method == "seco" else setup.sparse_rate  # SpaCO: only replayed leaves get grads
    return _all_to_all(shape, setup, own) | {
        "gradients": gradient_bytes(shape, setup) if grads_done else 0.0,
        "kv_leaves": prefix * kv,  # m_0..m_{c-1}; m_c itself was freed when its replay began
        # the prefix leaves' .grad + the gradient carried into m_c
        "kv_grads": (prefix * share + size) * kv if grads_done else 0.0,
        # cat(prefix, chunk) K and V and a float mask saved by SDPA in every layer, + the bool mask
        "attention_kv": shape.layers * _attention_bytes(shape, setup, prefix, size)
        + _bool_mask(shape, setup, prefix, size),
        "activations": own * batch * _token_bytes(shape, setup),
        "logits": logits_bytes(shape, setup, own),
    }


def _all_to_all(shape: ModelShape, setup: Setup, own: int) -> dict[str, float]:
    """Sequence parallel: the largest all-to-all's two buffers (its contiguous input and its
    output, [B, own tokens, heads, d]: the queries or attention's output), one at a time."""
    if setup.sequence_parallel == 1:
        return {}
    return {"all_to_all": 2.0 * setup.batch * own * shape.heads * shape.head_dim * setup.bytes}


def _attention_bytes(shape: ModelShape, setup: Setup, prefix: int, size: int) -> float:
    """What one layer's attention keeps for a chunk: cat(prefix, chunk) K and V
    [B, heads, prefix + size, d] (flash without a prefix: nothing, SDPA keeps the chunk's own
    K and V, counted in the activations). Masked attention (not flash): repeated over the
    query heads when there is a prefix (SDPA then gets a mask, and HF repeats K/V for GQA),
    and the float copy SDPA makes of the bool mask [B, 1, size, prefix + size] in every layer.
    Sequence parallel: the rank's 1/N of the heads, over the whole chunk.
    """
    n = setup.sequence_parallel
    if uses_flash(shape, setup):
        joined = prefix + size if prefix else 0
        return setup.batch * joined * 2 * (shape.kv_heads // n) * shape.head_dim * setup.bytes
    heads = shape.heads if prefix and shape.heads > shape.kv_heads else shape.kv_heads
    kv = (prefix + size) * 2 * (heads // n) * shape.head_dim * setup.bytes
    mask = setup.bytes * size * (prefix + size) if prefix else 0
    return setup.batch * (kv + mask)


def _bool_mask(shape: ModelShape, setup: Setup, prefix: int, size: int) -> float:
    """The bool attention mask [B, 1, size, prefix + size] HF builds once per chunk (none
    without a prefix, or with flash attention)."""
    return setup.batch * size * (prefix + size) if prefix and not uses_flash(shape, setup) else 0.0


def uses_flash(shape: ModelShape, setup: Setup) -> bool:
    """Whether a chunk's attention runs as flash attention (``ds_chunk.attention``), under
    "auto": on CPU always (torch's CPU flash kernel, two calls), on CUDA for 16-bit and
    head_dim <= 256 (what torch's flash kernel takes)."""
    if setup.attention != "auto":
        return setup.attention == "flash"
    return setup.device == "cpu" or setup.bytes == 2 and shape.head_dim <= 256


def _offloaded_moment(shape: ModelShape, setup: Setup, start: int, size: int, grads_done: bool) -> dict[str, float]:
    """kv_offload: the leaves and their grads live on the host, and so does everything a
    replay saves for backward (``offload.SaveOnHost``). The device keeps parameter grads and
    one layer's working set: in its backward, its K/V cat(prefix, chunk) brought back and its
    gradient, and the next layer's prefix fetched ahead; or, at the CE backward, the loss's
    [s, V] tensors. Not checked by measurement (on a CPU, device and host are one RSS).
    """
    own = size // setup.sequence_parallel  # this rank's tokens of the chunk
    layer = own * setup.batch * layer_activation_bytes(shape, setup)
    ahead = start * setup.batch * kv_token_bytes(shape, setup) / shape.layers
    return _all_to_all(shape, setup, own) | {
        "gradients": gradient_bytes(shape, setup) if grads_done else 0.0,
        "attention_kv": 2 * _attention_bytes(shape, setup, start, size) + _bool_mask(shape, setup, start, size) + ahead,
        "activations": layer,
        "logits": logits_bytes(shape, setup, own),
    }


def _chunks(setup: Setup) -> tuple[list[int], list[int]]:
    """Start and length of every chunk run (the last may be shorter), the last
    ``keep_chunks + 1`` joined into one (``chunking.join_kept``)."""
    starts = list(range(0, setup.seq_len, setup.chunk_size))
    starts = starts[: max(1, len(starts) - setup.keep_chunks)]
    return starts, [b - a for a, b in zip(starts, starts[1:] + [setup.seq_len])]


def offloaded_host(shape: ModelShape, setup: Setup) -> float:
    """kv_offload: host memory at its peak (leaves, their grads, saved tensors), the larger
    of the first two replays.

    First (the last chunk, prefix P): the leaves of P are there; its backward runs layer by
    layer from the last, each freeing its saved tensors as its share of P's gradient
    arrives: leaves + max(all saved, all of P's gradient). Second (prefix P2 = P - C): P2's
    leaves and gradient, the gradient carried into the chunk, and what this replay saves.
    """
    starts, sizes = _chunks(setup)
    kv = kv_token_bytes(shape, setup) * setup.batch
    share = 1.0 if setup.method == "seco" else setup.sparse_rate
    first = starts[-1] * kv + max(_saved(shape, setup, starts[-1], sizes[-1]), share * starts[-1] * kv)
    if len(starts) == 1:
        return first
    second = (1 + share) * starts[-2] * kv + sizes[-2] * kv + _saved(shape, setup, starts[-2], sizes[-2])
    return max(first, second)


def _saved(shape: ModelShape, setup: Setup, prefix: int, size: int) -> float:
    """What one chunk's replay saves for backward: every layer's attention K/V, mask and
    activations (the fused loss keeps its gradients on the device, not saved). The host copy
    is made per saved tensor: o_proj's input, if kept, is copied apart from SDPA's output
    although on the device they share storage."""
    q = shape.heads * shape.head_dim
    twice = input_bytes(setup, ("o_proj",), q) if not (setup.lora_rank and setup.bytes < 4) else 0
    acts = size // setup.sequence_parallel * setup.batch * (_token_bytes(shape, setup) + shape.layers * twice)
    return shape.layers * _attention_bytes(shape, setup, prefix, size) + acts


def chunked_step(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """SeCO / SpaCO: the larger of the replays of the last chunk and the one before it.

    The last chunk's replay has the longest prefix but no gradients yet; from the second
    replay on, parameter and leaf gradients exist. Earlier replays have shorter prefixes,
    and the no-grad pass holds only the leaves and one chunk without autograd.
    SpaCO: expected leaf gradients (rate x prefix), with both last chunks replayed.
    """
    starts, sizes = _chunks(setup)
    moments = [_replay_moment(shape, setup, starts[-1], sizes[-1], grads_done=False)]
    if len(starts) > 1:
        moments.append(_replay_moment(shape, setup, starts[-2], sizes[-2], grads_done=True))
    return max(moments, key=lambda m: sum(m.values()))


def plain_step(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """Full backprop: every token's activations at once, then the CE backward over all T.

    No KV copies (no cache; SDPA saves k and v, counted in the activations, and needs no
    mask). Parameter grads are created after the CE peak, as the backward frees activations.
    """
    tokens = setup.seq_len * setup.batch
    acts = tokens * _token_bytes(shape, setup)
    return {"activations": acts, "logits": hf_logits_bytes(shape, setup, setup.seq_len)}


def ckpt_step(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """HF gradient checkpointing: each layer keeps only its input [T, H]; in the backward
    one layer is recomputed at a time (its activations for all T tokens).

    Peak: the CE backward (all layer inputs + logits), or the recompute of a layer with the
    LM head's gradient already made, whichever is larger.
    """
    tokens = setup.seq_len * setup.batch
    inputs = shape.layers * tokens * shape.hidden * setup.bytes
    at_loss = {
        "activations": inputs + tokens * norm_bytes(shape, setup, ("lm_head",)),
        "logits": hf_logits_bytes(shape, setup, setup.seq_len),
    }
    head_grad = shape.vocab * shape.hidden * trainable_bytes(setup) if setup.lora_rank == 0 else 0
    at_layer = {"activations": inputs + tokens * layer_activation_bytes(shape, setup), "gradients": head_grad}
    return max(at_loss, at_layer, key=lambda m: sum(m.values()))
