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

from ds_chunk.plan.cli import main, parse_args, report, setup_from_args
from ds_chunk.plan.compare import check, check_table, setup_from_bench_row
from ds_chunk.plan.memory import (
    chunked_step,
    ckpt_step,
    gradient_bytes,
    input_bytes,
    kv_token_bytes,
    layer_activation_bytes,
    logits_bytes,
    norm_bytes,
    optimizer_bytes,
    plain_step,
    trainable_bytes,
    trainable_params,
    weight_bytes,
)
from ds_chunk.plan.predict import Estimate, Recommendation, chunk_candidates, estimate, plan, recommend
from ds_chunk.plan.shape import (
    ADAM_STATE_BYTES,
    DTYPE_BYTES,
    GIB,
    LLAMA3_8B,
    MASTER_BYTES,
    MIB,
    NAMED_SHAPES,
    ModelShape,
    Setup,
)

__all__ = [
    "ADAM_STATE_BYTES",
    "DTYPE_BYTES",
    "GIB",
    "LLAMA3_8B",
    "NAMED_SHAPES",
    "MASTER_BYTES",
    "MIB",
    "Estimate",
    "ModelShape",
    "Recommendation",
    "Setup",
    "check",
    "check_table",
    "chunk_candidates",
    "chunked_step",
    "ckpt_step",
    "estimate",
    "gradient_bytes",
    "input_bytes",
    "kv_token_bytes",
    "layer_activation_bytes",
    "logits_bytes",
    "main",
    "norm_bytes",
    "optimizer_bytes",
    "parse_args",
    "plain_step",
    "plan",
    "recommend",
    "report",
    "setup_from_args",
    "setup_from_bench_row",
    "trainable_bytes",
    "trainable_params",
    "weight_bytes",
]
