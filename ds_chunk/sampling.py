"""SpaCO: which chunks are replayed, and with what weight.

bernoulli (ours, exactly unbiased): chunk c is replayed independently with probability
pi_c and weighted by 1/pi_c, on its loss and on the KV gradient carried into it. A
gradient path through replayed chunks c_0 > ... > c_r then has weight prod 1/pi and
probability prod pi, so E[estimate] equals the SeCO gradient exactly.

paper (arXiv 2505.16710, Alg. 2): exactly t of k chunks without replacement, weight k/t,
capped at max_compensation. Biased (a path through q replayed chunks survives with
probability t(t-1).../(k(k-1)...), not (t/k)^q; and a cap biases regardless); offered
to reproduce the paper.
"""

from __future__ import annotations

import hashlib

import torch

from ds_chunk.config import SparseConfig


class ChunkSampler:
    def __init__(self, config: SparseConfig):
        self.config = config

    def _always(self, has_loss: list[bool]) -> set[int]:
        k = len(has_loss)
        if self.config.always_replay == "supervised":
            return {c for c in range(k) if has_loss[c]}
        # indices outside [-k, k) name chunks this (short) sequence does not have
        return {c % k for c in self.config.always_replay if -k <= c < k}

    def probabilities(self, has_loss: list[bool]) -> list[float]:
        """pi_c for every chunk (bernoulli); for paper, the marginal t/k."""
        k, cfg = len(has_loss), self.config
        always = self._always(has_loss)
        if cfg.sampler == "paper":
            return [min(1.0, self._paper_count(k) / k)] * k
        p = cfg.rate if cfg.rate is not None else min(1.0, cfg.num_chunks / k)
        return [1.0 if c in always else p for c in range(k)]

    def _paper_count(self, k: int) -> int:
        cfg = self.config
        t = cfg.num_chunks if cfg.num_chunks is not None else max(1, round(cfg.rate * k))
        return min(t, k)

    def generator(self, step: int, rank: int) -> torch.Generator:
        """The draw of (seed, step[, rank]): reproducible, independent across ranks unless asked."""
        key = (self.config.seed, step, -1 if self.config.same_on_all_ranks else rank)
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def weights(self, has_loss: list[bool], sampled: list[int] | None, step: int, rank: int = 0) -> dict[int, float]:
        """chunk -> weight for the replayed chunks of this draw (or of ``sampled``)."""
        k, cfg = len(has_loss), self.config
        if sampled is not None:
            chosen = sorted({c % k for c in sampled if -k <= c < k})
            if len(chosen) != len(sampled):
                raise ValueError(f"sampled={sampled}: chunk indices must be distinct and within 0..{k - 1}")
        elif cfg.sampler == "paper":
            chosen = torch.randperm(k, generator=self.generator(step, rank))[: self._paper_count(k)].tolist()
        else:
            pi = torch.tensor(self.probabilities(has_loss), dtype=torch.float64)
            chosen = torch.nonzero(torch.rand(k, generator=self.generator(step, rank), dtype=torch.float64) < pi)
            chosen = chosen.flatten().tolist()
        if cfg.sampler == "paper":
            w = k / max(len(chosen), 1)
            w = min(w, cfg.max_compensation) if cfg.max_compensation is not None else w
            return dict.fromkeys(sorted(chosen), w)
        pi = self.probabilities(has_loss)
        return {c: 1.0 / pi[c] for c in sorted(chosen)}
