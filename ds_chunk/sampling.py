"""SpaCO: which chunks are replayed, and with what weight.

bernoulli (exactly unbiased): chunk c is replayed independently with probability pi_c and
weighted by 1/pi_c, on its loss and on the KV gradient carried into it. A gradient path
through replayed chunks c_0 > ... > c_r then has weight prod 1/pi and probability prod pi,
so E[estimate] equals the SeCO gradient exactly.

gradient (exactly unbiased, adaptive): chunks are decided in the replay's reverse order,
chunk c when the replay reaches it, with pi_c proportional to the norm of the gradient the
first replayed chunk carried into its K/V (the first-order share of chunk c in the loss; for
a chunk it sent nothing, what the later replays carried by the time c is decided), so the
chunks later chunks read from are replayed and the ones nobody reads are skipped. pi_c
depends only on draws already made (of chunks > c) and chunk c's own uniform draw is
independent of them, so conditioned on that history chunk c's weighted contribution has the
SeCO expectation; by induction from the last chunk the whole estimate does (``test_spaco``
enumerates every draw).

paper (arXiv 2505.16710, Alg. 2): exactly t of k chunks without replacement, weight k/t,
capped at max_compensation. Biased (a path through q replayed chunks survives with
probability t(t-1).../(k(k-1)...), not (t/k)^q; and a cap biases regardless); offered
to reproduce the paper.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

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

    def rate(self, k: int) -> float:
        """The replay probability of a chunk nothing else is known of: ``rate``, or t/k."""
        return self.config.rate if self.config.rate is not None else min(1.0, self.config.num_chunks / k)

    def probabilities(self, has_loss: list[bool]) -> list[float]:
        """pi_c for every chunk (bernoulli); for paper, the marginal t/k."""
        k, cfg = len(has_loss), self.config
        always = self._always(has_loss)
        if cfg.sampler == "paper":
            return [min(1.0, self._paper_count(k) / k)] * k
        return [1.0 if c in always else self.rate(k) for c in range(k)]

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
        """chunk -> weight for the replayed chunks of this draw (or of ``sampled``); bernoulli, paper."""
        k, cfg = len(has_loss), self.config
        if sampled is not None:
            chosen = _checked(sampled, k)
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


class FixedDraw:
    """A draw fixed before the call (SeCO, bernoulli, paper): chunk -> weight."""

    adaptive = False

    def __init__(self, weights: dict[int, float], inclusion: dict[int, float]):
        self.weights, self.inclusion = weights, inclusion
        self.candidates = sorted(weights, reverse=True)

    def weight(self, c: int, norm: Callable[[int], float]) -> float | None:
        return self.weights[c]


def _checked(sampled: list[int], k: int) -> list[int]:
    chosen = sorted({c % k for c in sampled if -k <= c < k})
    if len(chosen) != len(sampled):
        raise ValueError(f"sampled={sampled}: chunk indices must be distinct and within 0..{k - 1}")
    return chosen


class GradientDraw:
    """One call's draw of the ``gradient`` sampler, made chunk by chunk as the replay goes.

    candidates: the chunks that can contribute (up to the last with a supervised token),
    in the replay's order (descending). ``weight(c, norm)`` decides chunk c when the
    replay reaches it; ``norm(j)`` is the norm of the gradient collected so far on m_j.
    When the first gradient has arrived (after the first replay), every chunk j not yet
    decided gets its share from the norms of that moment, n_j:

        share_j = min(1, rate * n_j / mean(n))      (mean over those chunks)
        pi_c = 1 for always_replay chunks, else max(rate if c has a loss, share_c)

    before it, pi_c = rate for a chunk with a loss (0 without one: replaying it would add
    exactly zero). So the chunks the first replayed chunk reads from are replayed, those it
    barely reads seldom, and the chunks without a loss cost at most bernoulli's expected
    replays at the same rate. Later replays carry more gradient in (weighted 1/pi), but the
    shares stay those of the first: what a step costs is known from the first replay on.
    Except where the first replay sent nothing (n_j = 0: a sliding window shorter than the
    distance): such a chunk gets its share from the norm when it is decided, rate * norm /
    mean(n), as a pi of 0 would drop the gradient later replays carried into it (a bias).
    """

    adaptive = True

    def __init__(self, sampler: ChunkSampler, has_loss: list[bool], sampled: list[int] | None, step: int, rank: int,
                 truncate: bool = False):  # fmt: skip
        k = len(has_loss)
        last = max((c for c in range(k) if has_loss[c]), default=-1)
        # truncated: no gradient is carried, so only chunks with a loss can contribute
        self.candidates = [c for c in range(last, -1, -1) if has_loss[c] or not truncate]
        self.has_loss, self.rate, self.always = has_loss, sampler.rate(k), sampler._always(has_loss)
        self.forced = None if sampled is None else set(_checked(sampled, k))
        self.uniform = torch.rand(k, generator=sampler.generator(step, rank), dtype=torch.float64).tolist()
        self.share: dict[int, float] | None = None
        self.mean = 0.0  # mean(n) at the first gradient
        self.inclusion: dict[int, float] = {}  # pi_c of every chunk decided

    def weight(self, c: int, norm: Callable[[int], float]) -> float | None:
        """1/pi_c if chunk c is replayed, else None."""
        pi = 1.0 if c in self.always else self._pi(c, norm)
        self.inclusion[c] = pi
        chosen = self.uniform[c] < pi if self.forced is None else c in self.forced
        return 1.0 / pi if chosen and pi > 0 else None

    def _pi(self, c: int, norm: Callable[[int], float]) -> float:
        floor = self.rate if self.has_loss[c] else 0.0
        if self.share is None:
            norms = {j: norm(j) for j in range(c + 1) if j not in self.always}
            mean = sum(norms.values()) / max(len(norms), 1)
            if mean == 0.0:
                return floor  # no gradient has arrived yet
            self.mean, self.share = mean, {j: min(1.0, self.rate * n / mean) for j, n in norms.items()}
        share = self.share[c]
        if share == 0.0:  # nothing had reached c at the first replay (a sliding window): what has now
            share = min(1.0, self.rate * norm(c) / self.mean)
        return max(floor, share)
