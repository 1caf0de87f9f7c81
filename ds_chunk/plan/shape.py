"""The model's shape (from a transformers config), the training setup a prediction
depends on, and the byte sizes they use."""

from __future__ import annotations

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
    logit_transform: bool = False  # soft-capping or a logit scale (Gemma 2, Granite, Cohere)

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers config object, a config dict, a config.json path or a hub id."""
        if isinstance(config, (str, Path)):
            config = _load_config(config)
        if not isinstance(config, dict):
            config = config.get_text_config().to_dict()
        config = config.get("text_config", config)
        from ds_chunk.adapter import LOGIT_TRANSFORMS

        transform = LOGIT_TRANSFORMS.get(config.get("model_type"))
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
            logit_transform=transform is not None and config.get(transform[0]) is not None,
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


# Llama-3-8B's shape (GQA 32/8, vocab 128256), as transformers config kwargs: what the
# planner and the GPU benchmark size; nothing is downloaded. ``--config llama-3-8b``.
LLAMA3_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
    max_position_embeddings=1 << 20,
    rope_theta=500000.0,
)
SMOLLM2_135M = dict(  # SmolLM2-135M-Instruct (ds_chunk.known_models: --model smollm2-135m)
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    rope_theta=100000.0,
)
NAMED_SHAPES = {"llama-3-8b": LLAMA3_8B, "smollm2-135m": SMOLLM2_135M}


def _load_config(source: str | Path) -> dict:
    """A name in NAMED_SHAPES; config.json (a file or a folder holding one) offline; otherwise
    a hub id via transformers."""
    if str(source) in NAMED_SHAPES:
        return NAMED_SHAPES[str(source)]
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if path.suffix == ".json" or path.parent.is_dir() and str(path.parent) not in ("", "."):
        raise FileNotFoundError(f"model config not found: {source}")
    from transformers import AutoConfig  # needs the network (or the local HF cache)

    try:
        return AutoConfig.from_pretrained(str(source)).get_text_config().to_dict()
    except OSError as e:  # offline, or no such model: one line, not the hub's traceback
        names = ", ".join(NAMED_SHAPES)
        raise FileNotFoundError(
            f"model config not found: {source} is no file or folder here, not a known shape ({names}), "
            f"and the hub gave no config for it ({type(e).__name__})"
        ) from None


@dataclasses.dataclass(frozen=True)
class Setup:
    """How the model is trained: the knobs the planner's prediction depends on."""

    seq_len: int
    method: str = "seco"  # seco | spaco | plain | ckpt
    chunk_size: int = 512
    keep_chunks: int = 0  # chunks joined to the last one and run once with it (chunkwise.keep_chunks)
    loss_chunk_size: int | str | None = "auto"  # "auto": ds_chunk's rule (loss.auto_sub_chunk); None: whole chunk
    sparse_rate: float | None = None  # spaco: replay probability
    kv_offload: bool = False
    # chunk attention: "flash" (CUDA, 16-bit, no padding: ds_chunk.attention, no mask and
    # K/V not repeated), "masked" (HF's sdpa: a mask, K/V repeated for GQA); "auto": flash
    # for 16-bit dtypes
    attention: str = "auto"
    device: str = "cuda"  # cpu: ds_chunk.attention's CPU flash path runs for any dtype
    batch: int = 1
    dtype: str = "bfloat16"  # parameters and activations
    quant: str = "none"  # none | 8bit | 4bit (base linear weights, bitsandbytes)
    lora_rank: int = 0  # 0: full fine-tuning
    grad_dtype: str | None = None  # full fine-tuning: the gradients' dtype if not dtype (fp32 weights under autocast)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    zero_stage: int = 0
    offload_optimizer: bool = False
    world_size: int = 1
    # ranks each sequence is split over (Ulysses, sequence_parallel_size): each holds 1/N of every
    # chunk's tokens and of the K/V heads; world_size counts them (ZeRO partitions over all ranks)
    sequence_parallel: int = 1
    gpu_mem_gb: float | None = None
    reserve_gb: float = 1.0  # CUDA context, cuBLAS workspace, allocator fragmentation

    @property
    def bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def chunked(self) -> bool:
        return self.method in ("seco", "spaco")
