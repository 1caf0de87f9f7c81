"""Packed rows: several documents in one row, told apart by position ids that restart.

TRL's padding-free batches (``packing=True`` with "bfd" / "bfd_split", ``padding_free=True``)
and launch/train.py's own packing put documents one after another in a row, with
``position_ids`` restarting at each and no attention mask. transformers' full forward keeps
them apart: a new document starts wherever a position id is not its predecessor's plus one
(``masking_utils.find_packed_sequence_indices``), and a token attends only to the earlier
tokens of its own document. A chunk gets the same: its own position ids (RoPE), and attention
to its document's part of the prefix and of the chunk, as segments for ``attention.chunk_sdpa``
or as a 4D mask for the other attention implementations. Unlike transformers, which looks for
packed rows only when no attention mask is given, ds_chunk keeps the documents apart whenever
the position ids restart, padding mask or not (launch/train.py's batches carry both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Segment = tuple[int, int, int]  # (start, end, document start): queries start..end-1 see keys document start..end-1


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each token of a batch sits. position_ids [B, T]; starts [B, T]: the index at which
    each token's document begins (None: one document per row, whatever its first position)."""

    position_ids: torch.Tensor
    starts: torch.Tensor | None
    _segments: dict = field(default_factory=dict, repr=False)  # (s, e) -> segments: the no-grad pass's, replayed

    @classmethod
    def of(cls, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> Layout:
        """The layout of ``position_ids`` ([B, T] or [1, T] for every row); absent or 0..T-1 in
        every row: positions 0..T-1 as [1, T], one document per row."""
        index = torch.arange(input_ids.shape[1], device=input_ids.device)
        if position_ids is None:
            return cls(index.unsqueeze(0), None)
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        batch, length = input_ids.shape
        if position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids shape {tuple(position_ids.shape)}: expected [{batch}, {length}] or [1, {length}] "
                "(as input_ids)"
            )
        if position_ids.is_floating_point() or bool((position_ids < 0).any()):
            raise ValueError("position_ids must be non-negative integers")
        position_ids = position_ids.to(input_ids.device).expand(batch, -1)
        if bool((position_ids == index).all()):
            return cls(index.unsqueeze(0), None)
        step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
        new = step != 1  # where a document begins (transformers' rule); never at 0
        starts = torch.where(new, index, torch.zeros_like(index)).cummax(-1).values if bool(new.any()) else None
        return cls(position_ids, starts)

    @property
    def packed(self) -> bool:
        """Whether some row holds more than one document."""
        return self.starts is not None

    @property
    def longest(self) -> int:
        """One more than the largest position id: the sequence length RoPE must cover."""
        return int(self.position_ids.max()) + 1

    def boundaries(self, row: int = 0) -> list[int]:
        """Where each document of ``row`` starts, and the row's length (``cu_seqlens`` form)."""
        starts = [0] if self.starts is None else torch.unique_consecutive(self.starts[row]).tolist()
        return [*starts, self.position_ids.shape[1]]

    def positions(self, s: int, e: int) -> torch.Tensor:
        return self.position_ids[:, s:e]

    def segments(self, s: int, e: int) -> tuple[tuple[Segment, ...], ...]:
        """Per row, the documents' parts in chunk s..e-1: (start, end, document start), in order."""
        if (s, e) in self._segments:
            return self._segments[s, e]
        rows = []
        for row in self.starts[:, s:e].tolist():
            parts, a = [], s
            for i in range(1, len(row) + 1):
                if i == len(row) or row[i] != row[i - 1]:
                    parts.append((a, s + i, row[i - 1]))
                    a = s + i
            rows.append(tuple(parts))
        self._segments[s, e] = tuple(rows)
        return self._segments[s, e]

    def mask(self, s: int, e: int, attention_mask, dtype: torch.dtype | None, window: int | None = None):
        """[B, 1, e - s, e] attention mask of chunk s..e-1 over keys 0..e-1: causal, within the
        document, not on padding, within ``window`` tokens (as transformers' sliding window:
        key > query - window). Boolean (True: attend) for dtype None, else additive in dtype
        (0 or its minimum, as transformers' eager masks). Packed rows only. A padding query
        still sees itself: no row is empty (a boolean SDPA mask would give NaN there)."""
        q = torch.arange(s, e, device=self.position_ids.device)
        k = torch.arange(e, device=q.device)
        allowed = (k <= q[:, None]) & (k >= self.starts[:, s:e, None])  # [B, C, e]
        if window is not None:
            allowed = allowed & (k > q[:, None] - window)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :e].bool() | (k == q[:, None])
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=q.device).masked_fill_(~allowed, torch.finfo(dtype).min)

    def inputs(self, s: int, e: int, attention_mask: torch.Tensor | None, fast: bool, masks: MaskKind) -> dict:
        """position_ids and attention_mask (2D, or for packed rows 4D: one, or one per layer
        type, as ``masks`` says) of the decoder's call on chunk s..e-1; where ``chunk_sdpa``
        runs (``fast``) it is handed the chunk's segments instead of a mask."""
        out = {"position_ids": self.positions(s, e)}
        if not self.packed:
            out["attention_mask"] = None if attention_mask is None else attention_mask[:, :e]
        elif fast:
            from ds_chunk.attention import set_segments

            out["attention_mask"] = None
            set_segments(self.segments(s, e))
        else:
            made = {kind: self.mask(s, e, attention_mask, masks.dtype, w) for kind, w in masks.windows.items()}
            out["attention_mask"] = made[None] if None in made else made
        return out


def check_packed(model, packed: bool) -> None:
    """Packed rows need attention that takes their mask: sdpa or eager, no ALiBi made from a
    2D mask (Bloom, Falcon with alibi). The family sweep runs every other family of
    tests/families.py packed (tests/test_families.py)."""
    if not packed:
        return
    from ds_chunk.adapter import text_config

    cfg = text_config(model)
    impl = getattr(cfg, "_attn_implementation", None)
    name = type(model).__name__
    if impl not in ("sdpa", "eager"):
        raise ValueError(
            f"{name}: packed rows (position_ids restart inside a row) with attn_implementation={impl!r}: ds_chunk "
            "separates documents for 'sdpa' and 'eager' only; load the model with attn_implementation='sdpa'"
        )
    if getattr(cfg, "model_type", None) == "bloom" or getattr(cfg, "alibi", False) is True:
        raise ValueError(
            f"{name}: packed rows (position_ids restart inside a row) with ALiBi: its bias is built from a 2D "
            "attention mask, which cannot keep documents apart; pack without restarting positions (TRL: "
            "packing_strategy='wrapped'; launch/train.py: --packing wrapped) or not at all"
        )


@dataclass(frozen=True)
class MaskKind:
    """The 4D masks a decoder takes for packed rows. dtype: None (boolean) for sdpa, else the
    embeddings' dtype, as transformers' additive eager masks. windows: layer type -> sliding
    window (None: full attention) for a decoder with ``layer_types`` (a dict of masks, as its
    own mask creation makes), else {None: window or None} (one mask)."""

    dtype: torch.dtype | None
    windows: dict

    @classmethod
    def of(cls, decoder) -> MaskKind:
        from ds_chunk.adapter import text_config

        cfg = text_config(decoder)
        dtype = (
            None
            if getattr(cfg, "_attn_implementation", None) == "sdpa"
            else decoder.get_input_embeddings().weight.dtype
        )
        window = getattr(cfg, "sliding_window", None)
        types = set(getattr(cfg, "layer_types", None) or ())
        if "sliding_attention" in types:
            return cls(dtype, {t: window if t == "sliding_attention" else None for t in types})
        if types == {"full_attention"} or not getattr(cfg, "use_sliding_window", True):
            window = None
        return cls(dtype, {None: window})
