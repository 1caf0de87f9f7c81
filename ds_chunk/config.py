"""The ``chunkwise`` block of a DeepSpeed JSON config: schema and validation.

DeepSpeed ignores unknown top-level keys, so it never looks inside this block; we
validate it here, strictly. Every error names the key path, the bad value and what is
allowed, e.g. ``chunkwise.chunk_size = 0: expected an integer >= 1``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["ChunkwiseConfig", "ConfigError", "SparseConfig", "misspelled_blocks", "warn_misspelled_blocks"]

OUR_BLOCKS = ("chunkwise", "model")  # top-level keys DeepSpeed ignores and we validate


class ConfigError(ValueError):
    """A bad value in the ``chunkwise`` block; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {value!r}: expected {allowed}")


# ---- small typed readers: each returns the value or raises ConfigError ----------------


def _reject_auto(key: str, value: Any) -> None:
    # accelerate fills "auto" only in blocks it knows, and raises on the rest; plain
    # DeepSpeed never fills it. A value that is never filled must not be accepted.
    if isinstance(value, str) and value == "auto":
        raise ConfigError(key, value, 'a concrete value ("auto" is not resolved inside chunkwise)')


def _bool(key: str, value: Any) -> bool:
    _reject_auto(key, value)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def _int(key: str, value: Any, lo: int, *, optional: bool = False) -> int | None:
    _reject_auto(key, value)
    if value is None and optional:
        return None
    # bool is an int subclass in Python; `true` is never a chunk size.
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(key, value, f"an integer >= {lo}" + (" or null" if optional else ""))
    return value


def _prob(key: str, value: Any) -> float | None:
    _reject_auto(key, value)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0.0 < float(value) <= 1.0) or math.isnan(value):
        raise ConfigError(key, value, "a number p with 0 < p <= 1, or null")
    return float(value)


def _positive(key: str, value: Any) -> float | None:
    _reject_auto(key, value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(key, value, "a number > 0 (GiB), or null")
    return float(value)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    _reject_auto(key, value)
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(repr(c) for c in choices))
    return value


def _check_keys(prefix: str, block: Any, cls: type) -> dict:
    if not isinstance(block, dict):
        raise ConfigError(prefix, block, "a JSON object")
    known = [f.name for f in fields(cls)]
    for key in block:
        if key not in known:
            raise ConfigError(f"{prefix}.{key}", block[key], "no such key; known keys: " + ", ".join(known))
    return block


# ---- the schema -------------------------------------------------------------------------


@dataclass(frozen=True)
class SparseConfig:
    """``chunkwise.sparse``: SpaCO, replay only a sample of chunks.

    sampler: ``"bernoulli"`` replays chunk c independently with probability pi_c and
        weights it by 1/pi_c (exactly unbiased); ``"gradient"`` does too, deciding each
        chunk when the replay reaches it, with pi_c proportional to the gradient the first
        replayed chunk carried into its K/V (exactly unbiased; ``sampling.GradientDraw``);
        ``"paper"`` draws exactly t chunks without replacement and weights them by k/t,
        capped at ``max_compensation`` (the paper's estimator; biased, for reproduction only).
    rate / num_chunks: exactly one. For bernoulli / gradient, num_chunks=t means p = t/k.
    always_replay: chunks with pi = 1: ``"supervised"`` (every chunk holding a
        supervised token) or a list of chunk indices (negative counts from the end).
    seed: the draw of step s is a function of (seed, step[, rank]).
    same_on_all_ranks: draw the same chunks on every data-parallel rank.
    report_loss: what ``ChunkResult.loss`` is: ``"estimate"`` (default, free) the weighted
        sum of the replayed chunks' losses, sum of w_i * L_i, an unbiased estimate of the
        full-sequence loss; ``"exact"`` (or true) the full loss, with the LM head run on the
        non-replayed chunks in the no-grad pass; ``"off"`` (or false) NaN, and chunks after
        the last replayed one are not run at all.
    """

    sampler: Literal["bernoulli", "gradient", "paper"] = "bernoulli"
    rate: float | None = None
    num_chunks: int | None = None
    always_replay: str | tuple[int, ...] = ()
    max_compensation: float | None = None
    seed: int = 0
    same_on_all_ranks: bool = False
    report_loss: Literal["estimate", "exact", "off"] = "estimate"

    @classmethod
    def from_dict(cls, block: dict, prefix: str = "chunkwise.sparse") -> SparseConfig:
        b = _check_keys(prefix, block, cls)
        sampler = _choice(f"{prefix}.sampler", b.get("sampler", "bernoulli"), ("bernoulli", "gradient", "paper"))
        rate = _prob(f"{prefix}.rate", b.get("rate"))
        num_chunks = _int(f"{prefix}.num_chunks", b.get("num_chunks"), 1, optional=True)
        if (rate is None) == (num_chunks is None):
            raise ConfigError(
                f"{prefix}.rate/num_chunks", {"rate": rate, "num_chunks": num_chunks}, "exactly one of them"
            )
        always = b.get("always_replay", [])
        _reject_auto(f"{prefix}.always_replay", always)
        if always != "supervised":
            ok = isinstance(always, (list, tuple)) and all(
                isinstance(i, int) and not isinstance(i, bool) for i in always
            )
            if not ok:
                raise ConfigError(f"{prefix}.always_replay", always, '"supervised" or a list of chunk indices')
            always = tuple(always)
        if sampler == "paper" and always:
            raise ConfigError(f"{prefix}.always_replay", always, 'an empty list with sampler "paper"')
        cap = b.get("max_compensation")
        _reject_auto(f"{prefix}.max_compensation", cap)
        if cap is not None:
            if sampler != "paper":
                raise ConfigError(f"{prefix}.max_compensation", cap, 'null unless sampler is "paper" (a cap biases)')
            if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 1.0:
                raise ConfigError(f"{prefix}.max_compensation", cap, "a number >= 1, or null")
            cap = float(cap)
        seed = _int(f"{prefix}.seed", b.get("seed", 0), 0)
        same = _bool(f"{prefix}.same_on_all_ranks", b.get("same_on_all_ranks", False))
        report = b.get("report_loss", "estimate")
        report = {True: "exact", False: "off"}.get(report, report) if isinstance(report, bool) else report
        report = _choice(f"{prefix}.report_loss", report, ("estimate", "exact", "off"))
        return cls(sampler, rate, num_chunks, always, cap, seed, same, report)


@dataclass(frozen=True)
class ChunkwiseConfig:
    """The top-level ``chunkwise`` block.

    enabled: chunk-wise training on/off (off: one chunk, i.e. plain backprop).
    chunk_size: tokens per chunk (the last chunk may be shorter).
    sparse: SpaCO settings, or None for exact SeCO.
    loss_chunk_size: positions per LM-head/cross-entropy sub-chunk, so a chunk's full
        [chunk x vocab] logits never exist at once. Absent: picked from the vocabulary
        (``loss.auto_sub_chunk``: about 32 MiB of float32 logits; 256 for a 32K vocabulary,
        64 for 128K); null: the whole chunk at once.
    loss_kernel: what makes the LM head + loss and its gradients in the backward pass:
        ``"torch"`` (ds_chunk's, sub-chunked by ``loss_chunk_size``), ``"liger"``
        (Liger-Kernel) or ``"cce"`` (Cut Cross-Entropy), both CUDA and optional. Absent:
        liger, then cce, on CUDA when installed and exact for the model, else torch.
    kv_offload: keep the KV leaves and their gradients in host memory.
    truncate: baseline only, for comparison: carry no gradient across chunk boundaries
        (truncated backprop); the gradient is then NOT the full-sequence gradient.
    max_consecutive_skips: steps with a non-finite loss or gradient on any rank are
        skipped by every rank; training stops with an error after more than this many in a row.
    keep_chunks: how many chunks before the last supervised one run with autograd at once,
        joined to it (one chunk of (keep_chunks + 1) x chunk_size tokens): their no-grad
        forward and their KV leaves are skipped, at the memory of their activations. 0: SeCO
        as is; at least the number of chunks: plain backprop. Exact; SeCO only.
    memory_budget_gb: the memory (GiB) one training step may add on top of what is held
        before it (weights, optimizer states): at the first step of each batch shape (padded
        or not) the planner picks chunk_size, loss_chunk_size and keep_chunks, the fastest
        whose predicted step peak fits (``ds_chunk.budget``); on CUDA never more than is free
        then. SeCO only. Absent: the settings as given.
    """

    enabled: bool = True
    chunk_size: int = 512
    sparse: SparseConfig | None = None
    loss_chunk_size: int | Literal["auto"] | None = "auto"  # "auto": only as the default, not in JSON
    loss_kernel: Literal["torch", "liger", "cce"] | None = None  # None: picked (loss_kernels.pick)
    kv_offload: bool = False
    truncate: bool = False
    max_consecutive_skips: int = 5
    keep_chunks: int = 0
    memory_budget_gb: float | None = None

    @classmethod
    def from_dict(cls, block: dict | None, prefix: str = "chunkwise") -> ChunkwiseConfig:
        """Validate a ``chunkwise`` block (the dict under that key). None means disabled."""
        if block is None:
            return cls(enabled=False)
        b = _check_keys(prefix, block, cls)
        sparse = b.get("sparse")
        _reject_auto(f"{prefix}.sparse", sparse)
        return cls(
            enabled=_bool(f"{prefix}.enabled", b.get("enabled", True)),
            chunk_size=_int(f"{prefix}.chunk_size", b.get("chunk_size", 512), 1),
            sparse=None if sparse is None else SparseConfig.from_dict(sparse, f"{prefix}.sparse"),
            loss_chunk_size=_int(f"{prefix}.loss_chunk_size", b["loss_chunk_size"], 1, optional=True)
            if "loss_chunk_size" in b
            else "auto",
            loss_kernel=_choice(f"{prefix}.loss_kernel", b["loss_kernel"], ("torch", "liger", "cce"))
            if "loss_kernel" in b
            else None,
            kv_offload=_bool(f"{prefix}.kv_offload", b.get("kv_offload", False)),
            truncate=_bool(f"{prefix}.truncate", b.get("truncate", False)),
            max_consecutive_skips=_int(f"{prefix}.max_consecutive_skips", b.get("max_consecutive_skips", 5), 0),
            keep_chunks=_int(f"{prefix}.keep_chunks", b.get("keep_chunks", 0), 0),
            memory_budget_gb=_positive(f"{prefix}.memory_budget_gb", b.get("memory_budget_gb")),
        )

    def __post_init__(self):
        """Settings that cannot go together: kept chunks and a memory budget are SeCO's (a SpaCO
        draw or truncation decides per chunk, a kept group is one, and a budget may pick one
        chunk for the whole row)."""
        other = "chunkwise.sparse (SpaCO)" if self.sparse is not None else None
        other = "chunkwise.truncate" if self.truncate else other
        if other and self.keep_chunks:
            raise ConfigError("chunkwise.keep_chunks", self.keep_chunks, f"0 with {other}: kept chunks are SeCO's")
        if other and self.memory_budget_gb is not None:
            raise ConfigError("chunkwise.memory_budget_gb", self.memory_budget_gb,
                              f"null with {other}: set chunk_size and loss_chunk_size instead")  # fmt: skip

    @classmethod
    def from_ds_config(cls, config: str | os.PathLike | dict, source: str | None = None) -> ChunkwiseConfig:
        """Read the ``chunkwise`` block out of a whole DeepSpeed config (path or dict).

        A config without the block gives chunking disabled; a top-level key that looks
        like a misspelled block name warns (``source`` names the file in the warning).
        """
        source = source or (str(config) if not isinstance(config, dict) else "the DeepSpeed config")
        if not isinstance(config, dict):
            with open(config) as f:
                config = json.load(f)
        warn_misspelled_blocks(config, source)
        return cls.from_dict(config.get("chunkwise"))


# ---- misspelled block names ---------------------------------------------------------------


def _distance(a: str, b: str) -> int:
    """Levenshtein edit distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


_WARNED: set[str] = set()


def warn_misspelled_blocks(config: dict, source: str = "the DeepSpeed config") -> None:
    """Warn (once per key and process: a launcher reads the file, the engine then the dict)
    about top-level keys that look like a misspelled ``chunkwise`` or ``model``."""
    for key, line in misspelled_blocks(config, source):
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(line, stacklevel=3)


def misspelled_blocks(config: dict, source: str = "the DeepSpeed config") -> list[tuple[str, str]]:
    """(key, message) for each top-level key that looks like a misspelled ``chunkwise`` or ``model``.

    DeepSpeed ignores unknown top-level keys, so ``"chunk_wise": {...}`` would otherwise
    train unchunked without a word.
    """
    lines = []
    for key in config:
        if key in OUR_BLOCKS or not isinstance(key, str):
            continue
        norm = key.lower().replace("_", "").replace("-", "")
        for block in OUR_BLOCKS:
            close = _distance(norm, block) <= len(block) // 4  # 2 edits for chunkwise, 1 for model
            if close or (block == "chunkwise" and norm.startswith("chunk")):
                lines.append(
                    (
                        key,
                        f'{source}: top-level key "{key}" looks like a misspelling of "{block}" and has no effect '
                        "(DeepSpeed ignores unknown top-level keys)",
                    )
                )
    return lines
