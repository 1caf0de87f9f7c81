"""ds_chunk: chunk-wise (SeCO / SpaCO) training of long-context LLMs in DeepSpeed and accelerate.

Heavy dependencies (transformers, deepspeed, bitsandbytes) load on first use, so
``import ds_chunk`` is fast and needs no GPU.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ds_chunk.config import ChunkwiseConfig, ConfigError, SparseConfig

__version__ = "0.1.0"

_LAZY = {
    "ChunkScheduler": "ds_chunk.scheduler",
    "ChunkResult": "ds_chunk.scheduler",
    "UnsupportedModelError": "ds_chunk.adapter",
    "initialize": "ds_chunk.engine",
    "ChunkwiseEngine": "ds_chunk.engine",
    "ChunkedLM": "ds_chunk.engine",
    "ChunkwiseTrainer": "ds_chunk.hf",
    "with_chunkwise": "ds_chunk.hf",
}

__all__ = [
    "ChunkResult",
    "ChunkedLM",
    "ChunkScheduler",
    "ChunkwiseConfig",
    "ChunkwiseEngine",
    "ChunkwiseTrainer",
    "ConfigError",
    "SparseConfig",
    "UnsupportedModelError",
    "initialize",
    "with_chunkwise",
]

if TYPE_CHECKING:
    from ds_chunk.adapter import UnsupportedModelError
    from ds_chunk.engine import ChunkedLM, ChunkwiseEngine, initialize
    from ds_chunk.hf import ChunkwiseTrainer, with_chunkwise
    from ds_chunk.scheduler import ChunkResult, ChunkScheduler


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ds_chunk' has no attribute {name!r}")
