"""Memory planner: predict the peak memory of a training step and pick the chunk size.

    python -m ds_chunk.plan --config path/to/config.json --seq-len 16384 --gpu-mem-gb 24 \\
        --dtype bfloat16 --quant 4bit --lora-rank 8

Predicts, by component, the peak of one step of ``seco`` / ``spaco`` (ds_chunk), ``plain``
(full backprop, HF loss) or ``ckpt`` (HF gradient checkpointing) for a decoder-only HF
model (Llama-like: RMSNorm, RoPE, SDPA attention, gated MLP), and recommends the largest
chunk size (a power of two from 64) that fits the GPU, or says what would make it fit.

Two figures: ``persistent`` (weights, LoRA, optimizer states: held between steps) and
``step`` (what a step allocates on top: gradients, KV leaves and their gradients, the
attention's copy of the prefix, one chunk's activations, logits). ``step`` is what
``ds_chunk.bench`` measures (peak during a step minus the level before it), and
``python -m ds_chunk.plan --check bench.csv`` reports the prediction error per point.
The formulas follow what autograd saves for backward in transformers' Llama code; each
says which tensors it counts and their shapes. Batch size B multiplies every per-token term.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

GIB = 2**30
MIB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, float32, per trainable parameter
MASTER_BYTES = 4  # float32 master copy of each trainable parameter under 16-bit mixed precision


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model that memory depends on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head ([head_dim] weights each)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config object, a config dict, a config.json path or a hub id."""
        if isinstance(config, (str, Path)):
            config = _load_config(config)
        if not isinstance(config, dict):
            config = config.get_text_config().to_dict()
        config = config.get("text_config", config)
        heads = config["num_attention_heads"]
        bias = config.get("attention_bias")  # Qwen2 has no such key but always uses q/k/v biases
        return cls(
            vocab=config["vocab_size"],
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("model_type") == "qwen2" if bias is None else bias),
            qk_norm=config.get("model_type") == "qwen3",
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        """Linear weights + q/k/v biases + the RMSNorm weights of one layer."""
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return sum(a * b for a, b in self.linears().values()) + bias + norms

    def params(self) -> int:
        """All parameters: embeddings, LM head (unless tied), layers, final norm."""
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden


def _load_config(source: str | Path) -> dict:
    """config.json (a file or a folder holding one) offline; otherwise a hub id via transformers."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import AutoConfig  # needs the network (or the local HF cache)

    return AutoConfig.from_pretrained(str(source)).get_text_config().to_dict()


@dataclasses.dataclass(frozen=True)
class Setup:
    """How the model is trained: the knobs the planner's prediction depends on."""

    seq_len: int
    method: str = "seco"  # seco | spaco | plain | ckpt
    chunk_size: int = 512
    loss_chunk_size: int | None = None
    sparse_rate: float | None = None  # spaco: replay probability
    kv_offload: bool = False
    batch: int = 1
    dtype: str = "bfloat16"  # parameters and activations
    quant: str = "none"  # none | 8bit | 4bit (base linear weights, bitsandbytes)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    zero_stage: int = 0
    offload_optimizer: bool = False
    world_size: int = 1
    gpu_mem_gb: float | None = None
    reserve_gb: float = 1.0  # CUDA context, cuBLAS workspace, allocator fragmentation

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def chunked(self) -> bool:
        return self.method in ("seco", "spaco")


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
    return 4 if setup.lora_rank else setup.bytes


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
    output [heads*d] and float32 logsumexp [heads]; o_proj's input (a contiguous copy of
    the output) if kept; the residual sum [H]. MLP: gate (SiLU's input), SiLU(gate) and up
    ([I] each, kept by SiLU and the product), down_proj's input [I] if kept, the residual
    sum [H]. Two RMSNorms. LoRA: lora_A's float32 output [r] per target.
    """
    b, h, d, i = setup.bytes, shape.hidden, shape.head_dim, shape.intermediate
    q, kv = shape.heads * d, shape.kv_heads * d
    attn = b * (2 * q + 2 * kv + h) + 4 * shape.heads + input_bytes(setup, ("o_proj",), q)
    mlp = b * (3 * i + h) + input_bytes(setup, ("down_proj",), i)
    lora = 4 * setup.lora_rank * len(setup.lora_targets)
    norms = norm_bytes(shape, setup, ("q_proj", "k_proj", "v_proj"))
    norms += norm_bytes(shape, setup, ("gate_proj", "up_proj"))
    return norms + attn + mlp + lora


def kv_token_bytes(shape: ModelShape, setup: Setup) -> int:
    """K and V of one token in all layers, after RoPE and before the GQA repeat: [L, 2, kv, d]."""
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * setup.bytes


def logits_bytes(shape: ModelShape, setup: Setup, tokens: int) -> float:
    """Peak of LM head + cross-entropy over ``tokens`` positions, in loss sub-chunks of ``s``.

    Logits are upcast to float32 for the loss. At the CE backward three [s, V] float32
    tensors are alive: log-softmax output (saved), its gradient, the logits' gradient.
    Then the LM head's backward makes a [V, H] weight gradient. One sub-chunk: it is added
    into ``.grad`` (with the logits' gradient still alive). Several sub-chunks: autograd's
    input buffer sums their weight gradients out of place before ``.grad`` sees them, so
    the running sum, the new one and their sum coexist (3 x [V, H]; measured).
    """
    sub = min(setup.loss_chunk_size or tokens, tokens)
    lb = max(4, setup.bytes)
    head = shape.vocab * shape.hidden * setup.bytes if setup.lora_rank == 0 else 0
    weight_grad = 3 * head if sub < tokens else sub * shape.vocab * lb + head
    return setup.batch * max(3 * sub * shape.vocab * lb, weight_grad)


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
    batch, prefix = setup.batch, start
    kv = kv_token_bytes(shape, setup) * batch
    share = 1.0 if setup.method == "seco" else setup.sparse_rate  # SpaCO: only replayed leaves get grads
    return {
        "gradients": gradient_bytes(shape, setup) if grads_done else 0.0,
        "kv_leaves": prefix * kv,  # m_0..m_{c-1}; m_c itself was freed when its replay began
        # the prefix leaves' .grad + the gradient carried into m_c
        "kv_grads": (prefix * share + size) * kv if grads_done else 0.0,
        # cat(prefix, chunk) K and V and a float mask saved by SDPA in every layer, + the bool mask
        "attention_kv": shape.layers * _attention_bytes(shape, setup, prefix, size) + _bool_mask(setup, prefix, size),
        "activations": size * batch * _token_bytes(shape, setup),
        "logits": logits_bytes(shape, setup, size),
    }


def _attention_bytes(shape: ModelShape, setup: Setup, prefix: int, size: int) -> float:
    """What one layer's attention keeps for a chunk: cat(prefix, chunk) K and V
    [B, heads, prefix + size, d], repeated over the query heads when there is a prefix
    (SDPA then gets a mask, and HF repeats K/V for GQA), and the float copy SDPA makes of
    the bool mask [B, 1, size, prefix + size] in every layer.
    """
    heads = shape.heads if prefix and shape.heads > shape.kv_heads else shape.kv_heads
    kv = (prefix + size) * 2 * heads * shape.head_dim * setup.bytes
    mask = setup.bytes * size * (prefix + size) if prefix else 0
    return setup.batch * (kv + mask)


def _bool_mask(setup: Setup, prefix: int, size: int) -> float:
    """The bool attention mask [B, 1, size, prefix + size] HF builds once per chunk (none without a prefix)."""
    return setup.batch * size * (prefix + size) if prefix else 0.0


def _offloaded_moment(shape: ModelShape, setup: Setup, start: int, size: int, grads_done: bool) -> dict[str, float]:
    """kv_offload: the leaves and their grads live on the host, and so does everything a
    replay saves for backward (the scheduler packs saved tensors with save_on_cpu). The
    device keeps parameter grads and one layer's working set: in its backward, its K/V
    cat(prefix, chunk) brought back and its gradient; or, at the CE backward, the loss's
    [s, V] tensors. Not checked by measurement (on a CPU the offload is a no-op).
    """
    layer = size * setup.batch * layer_activation_bytes(shape, setup)
    return {
        "gradients": gradient_bytes(shape, setup) if grads_done else 0.0,
        "attention_kv": 2 * _attention_bytes(shape, setup, start, size) + _bool_mask(setup, start, size),
        "activations": layer,
        "logits": logits_bytes(shape, setup, size),
    }


def chunked_step(shape: ModelShape, setup: Setup) -> dict[str, float]:
    """SeCO / SpaCO: the larger of the replays of the last chunk and the one before it.

    The last chunk's replay has the longest prefix but no gradients yet; from the second
    replay on, parameter and leaf gradients exist. Earlier replays have shorter prefixes,
    and the no-grad pass holds only the leaves and one chunk without autograd.
    SpaCO: expected leaf gradients (rate x prefix), with both last chunks replayed.
    """
    starts = list(range(0, setup.seq_len, setup.chunk_size))
    sizes = [min(setup.chunk_size, setup.seq_len - s) for s in starts]
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
    return {"activations": acts, "logits": logits_bytes(shape, setup, setup.seq_len)}


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
        "logits": logits_bytes(shape, setup, setup.seq_len),
    }
    head_grad = shape.vocab * shape.hidden * trainable_bytes(setup) if setup.lora_rank == 0 else 0
    at_layer = {"activations": inputs + tokens * layer_activation_bytes(shape, setup), "gradients": head_grad}
    return max(at_loss, at_layer, key=lambda m: sum(m.values()))


# ---- the estimate ----------------------------------------------------------------------


@dataclasses.dataclass
class Estimate:
    """Predicted device memory of one setup, by component (bytes)."""

    setup: Setup
    persistent: dict[str, float]  # held between steps
    step: dict[str, float]  # allocated during a step, on top (what ds_chunk.bench measures)
    host: dict[str, float]  # offloaded to host memory

    @property
    def step_bytes(self) -> float:
        return sum(self.step.values())

    @property
    def total_bytes(self) -> float:
        """Device peak: persistent + step + the reserve (CUDA context, workspace, fragmentation)."""
        return sum(self.persistent.values()) + self.step_bytes + self.setup.reserve_gb * GIB

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits ``gpu_mem_gb`` (None when no budget was given)."""
        return None if self.setup.gpu_mem_gb is None else self.total_bytes <= self.setup.gpu_mem_gb * GIB

    def table(self) -> str:
        """Components in GiB, one per line."""
        rows = [("persistent", k, v) for k, v in self.persistent.items()]
        rows += [("step", k, v) for k, v in self.step.items()]
        rows += [("reserve", "cuda_context_etc", self.setup.reserve_gb * GIB)]
        rows += [("host", k, v) for k, v in self.host.items()]
        lines = [f"  {kind:<10} {name:<18} {v / GIB:9.3f} GiB" for kind, name, v in rows if v]
        lines.append(f"  {'total':<10} {'device peak':<18} {self.total_bytes / GIB:9.3f} GiB")
        return "\n".join(lines)


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Predict the peak memory of one training step of ``setup`` on ``shape``."""
    _validate(setup)
    steps = {"seco": chunked_step, "spaco": chunked_step, "plain": plain_step, "ckpt": ckpt_step}
    step = steps[setup.method](shape, setup)
    lora = trainable_params(shape, setup) * 4 if setup.lora_rank else 0.0
    optimizer = optimizer_bytes(shape, setup)
    persistent = {"weights": weight_bytes(shape, setup), "lora": lora, "optimizer": optimizer}
    host = {}
    if setup.offload_optimizer:
        host["optimizer"], persistent["optimizer"] = optimizer, 0.0
    if setup.kv_offload and setup.chunked:
        host["kv_leaves_and_grads"] = 2 * setup.seq_len * setup.batch * kv_token_bytes(shape, setup)
    return Estimate(setup, persistent, step, host)


def _validate(setup: Setup) -> None:
    if setup.method not in ("seco", "spaco", "plain", "ckpt"):
        raise ValueError(f"method {setup.method!r}: expected seco, spaco, plain or ckpt")
    if setup.method == "spaco" and not (setup.sparse_rate and 0 < setup.sparse_rate <= 1):
        raise ValueError("spaco needs sparse_rate in (0, 1]")
    if setup.dtype not in DTYPE_BYTES or setup.quant not in ("none", "8bit", "4bit"):
        raise ValueError(f"dtype {setup.dtype!r} / quant {setup.quant!r}: see --help for the choices")
    if setup.quant != "none" and setup.lora_rank == 0:
        raise ValueError("quantized base weights cannot be trained: set lora_rank > 0")


# ---- recommendation --------------------------------------------------------------------


@dataclasses.dataclass
class Recommendation:
    """The largest chunk size that fits, or None and what would help."""

    chunk_size: int | None
    estimate: Estimate  # at chunk_size, or at the smallest candidate when nothing fits
    tried: dict[int, float]  # chunk size -> predicted device peak (bytes)
    advice: list[str]


def chunk_candidates(seq_len: int, smallest: int = 64) -> list[int]:
    """Powers of two from ``smallest`` up to the first one that covers the sequence."""
    sizes = [smallest]
    while sizes[-1] < seq_len:
        sizes.append(sizes[-1] * 2)
    return sizes


def recommend(shape: ModelShape, setup: Setup, advise: bool = True) -> Recommendation:
    """Largest power-of-two chunk size (from 64) whose predicted peak fits ``gpu_mem_gb``.

    Larger chunks run faster (fewer, larger kernels), so the largest that fits wins. When
    none fits, ``advice`` lists changes (each re-planned) that would make one fit.
    """
    if setup.gpu_mem_gb is None:
        raise ValueError("recommend needs gpu_mem_gb")
    if not setup.chunked:
        est = estimate(shape, setup)
        advice = [] if est.fits or not advise else _advice(shape, setup)
        return Recommendation(None if not est.fits else setup.seq_len, est, {}, advice)
    estimates = {c: estimate(shape, dataclasses.replace(setup, chunk_size=c)) for c in chunk_candidates(setup.seq_len)}
    fitting = [c for c, e in estimates.items() if e.fits]
    best = max(fitting) if fitting else None
    est = estimates[best if best else min(estimates)]
    advice = [] if best or not advise else _advice(shape, est.setup)
    return Recommendation(best, est, {c: e.total_bytes for c, e in estimates.items()}, advice)


def _changes(setup: Setup) -> list[tuple[str, dict]]:
    """Changes that lower the peak and are not already made: (what to set, Setup fields)."""
    changes = []
    if not setup.chunked:
        changes.append(("chunk-wise training (SeCO)", {"method": "seco"}))
    if not setup.offload_optimizer:
        zero = max(1, setup.zero_stage)
        changes.append(
            (
                "offload the optimizer (zero_optimization.offload_optimizer)",
                {"offload_optimizer": True, "zero_stage": zero},
            )
        )
    if setup.chunked and not setup.kv_offload:
        changes.append(("chunkwise.kv_offload: true", {"kv_offload": True}))
    if setup.method == "seco":
        changes.append(("SpaCO: chunkwise.sparse.rate 0.125", {"method": "spaco", "sparse_rate": 0.125}))
    if setup.chunked and (setup.loss_chunk_size or setup.chunk_size) > 64:
        changes.append(("chunkwise.loss_chunk_size: 64", {"loss_chunk_size": 64}))
    if setup.quant == "none":
        lora = {"quant": "4bit", "lora_rank": setup.lora_rank or 8}
        changes.append(("4-bit base weights" + ("" if setup.lora_rank else " + LoRA r=8 (QLoRA)"), lora))
    if setup.world_size > 1 and setup.zero_stage < 3:
        changes.append(("ZeRO stage 3", {"zero_stage": 3}))
    return changes


def _advice(shape: ModelShape, setup: Setup) -> list[str]:
    """One line per change: the chunk size it allows, or the peak it still needs."""
    lines, combined = [], {}
    for what, fields in _changes(setup) + [("all of the above", None)]:
        fields = combined if fields is None else fields
        combined = {**combined, **fields}
        rec = recommend(shape, dataclasses.replace(setup, **fields), advise=False)
        if rec.chunk_size:
            size = f" with chunk_size {rec.chunk_size}" if rec.estimate.setup.chunked else ""
            lines.append(f"{what}: fits{size} ({rec.estimate.total_bytes / GIB:.2f} GiB)")
        else:
            lines.append(f"{what}: still needs {rec.estimate.total_bytes / GIB:.2f} GiB")
    return lines


def plan(config, seq_len: int, **setup) -> Recommendation | Estimate:
    """One call: the recommendation when ``gpu_mem_gb`` is given, else the estimate.

    config: a transformers config, a config dict, a config.json path or a hub id;
    ``setup``: any ``Setup`` field, e.g. ``plan("config.json", 16384, gpu_mem_gb=24,
    quant="4bit", lora_rank=8)``.
    """
    shape, full = ModelShape.from_config(config), Setup(seq_len=seq_len, **setup)
    return recommend(shape, full) if full.gpu_mem_gb is not None else estimate(shape, full)


# ---- check against ds_chunk.bench measurements -------------------------------------------


def setup_from_bench_row(row: dict) -> Setup:
    """The Setup of one ``ds_chunk.bench`` CSV row (measured on one device, no ZeRO)."""
    method = row["method"]
    rate = float(method.split("@")[1]) if method.startswith("spaco@") else None
    qlora = row["weights"] == "qlora"
    return Setup(
        seq_len=int(row["seq_len"]),
        method="spaco" if rate else method,
        chunk_size=int(row["chunk_size"]),
        loss_chunk_size=int(row["loss_chunk_size"]) if row.get("loss_chunk_size") else None,
        sparse_rate=rate,
        batch=int(row["batch"]),
        dtype=row["dtype"],
        quant="4bit" if qlora else "none",
        lora_rank=int(row.get("lora_rank") or 8) if qlora else 0,
        reserve_gb=0.0,
    )


def _bench_shape(row: dict) -> ModelShape:
    if row.get("model"):
        return ModelShape.from_config(row["model"])
    from ds_chunk.bench import DEFAULT_MODEL

    return ModelShape.from_config(DEFAULT_MODEL)


def check(rows: list[dict]) -> list[dict]:
    """Predicted vs measured step peak for each measured bench row: error = pred / measured - 1."""
    out = []
    for row in rows:
        if row["status"] != "ok" or not row.get("peak_mib"):
            continue
        predicted = estimate(_bench_shape(row), setup_from_bench_row(row)).step_bytes / MIB
        measured = float(row["peak_mib"])
        out.append({"label": row["label"], "seq_len": int(row["seq_len"]), "measured_mib": measured,
                    "predicted_mib": predicted, "error": predicted / measured - 1})  # fmt: skip
    return out


def check_table(results: list[dict]) -> str:
    """Markdown table of ``check`` results."""
    lines = ["| method | T | measured MiB | predicted MiB | error |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['seq_len']} | {r['measured_mib']:.1f} | {r['predicted_mib']:.1f} | "
            f"{100 * r['error']:+.1f}% |"
        )
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ds_chunk.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="config.json (file or folder), or a hub id (needs the network)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--gpu-mem-gb", type=float, help="device memory budget; with it, the chunk size is recommended")
    p.add_argument("--method", choices=["seco", "spaco", "plain", "ckpt"], default="seco")
    p.add_argument("--chunk-size", type=int, default=512, help="the chunk size to break down (default 512)")
    p.add_argument("--loss-chunk-size", type=int)
    p.add_argument("--spaco-rate", type=float, help="SpaCO replay probability (implies --method spaco)")
    p.add_argument("--kv-offload", action="store_true")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--quant", choices=["none", "8bit", "4bit"], default="none")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora-targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0)
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--reserve-gb", type=float, default=1.0, help="CUDA context, workspace, fragmentation")
    p.add_argument("--check", type=Path, metavar="CSV", help="compare with a ds_chunk.bench CSV instead")
    args = p.parse_args(argv)
    if not args.check and (args.config is None or args.seq_len is None):
        p.error("--config and --seq-len are required (or --check CSV)")
    return args


def setup_from_args(args: argparse.Namespace) -> Setup:
    return Setup(
        seq_len=args.seq_len,
        method="spaco" if args.spaco_rate else args.method,
        chunk_size=args.chunk_size,
        loss_chunk_size=args.loss_chunk_size,
        sparse_rate=args.spaco_rate,
        kv_offload=args.kv_offload,
        batch=args.batch,
        dtype=args.dtype,
        quant=args.quant,
        lora_rank=args.lora_rank,
        lora_targets=tuple(args.lora_targets),
        zero_stage=args.zero_stage,
        offload_optimizer=args.offload_optimizer,
        world_size=args.world_size,
        gpu_mem_gb=args.gpu_mem_gb,
        reserve_gb=args.reserve_gb,
    )


def report(shape: ModelShape, setup: Setup) -> str:
    """The breakdown at ``setup.chunk_size`` and, with a budget, the recommendation."""
    est = estimate(shape, setup)
    what = f"{setup.method}" + (f" chunk {setup.chunk_size}" if setup.chunked else "")
    lines = [f"{what}, T={setup.seq_len}, {shape.params() / 1e6:.0f}M params:", est.table()]
    if setup.gpu_mem_gb is None:
        return "\n".join(lines)
    rec = recommend(shape, setup)
    if rec.chunk_size and setup.chunked:
        lines.append(f"recommended chunk_size: {rec.chunk_size} ({rec.estimate.total_bytes / GIB:.2f} GiB "
                     f"of {setup.gpu_mem_gb} GiB)")  # fmt: skip
    elif rec.chunk_size:
        lines.append(f"fits: {est.total_bytes / GIB:.2f} GiB of {setup.gpu_mem_gb} GiB")
    else:
        where = " even at the smallest chunk" if setup.chunked else ""
        lines.append(f"does not fit in {setup.gpu_mem_gb} GiB (needs {rec.estimate.total_bytes / GIB:.2f} GiB"
                     f"{where}). What would help:")  # fmt: skip
        lines += [f"  - {a}" for a in rec.advice]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.check:
        with open(args.check) as f:
            results = check(list(csv.DictReader(f)))
        print(check_table(results))
        worst = max((abs(r["error"]) for r in results), default=0.0)
        print(f"\nlargest error: {100 * worst:.1f}% over {len(results)} measured points")
        return
    print(report(ModelShape.from_config(args.config), setup_from_args(args)))


if __name__ == "__main__":
    main()
