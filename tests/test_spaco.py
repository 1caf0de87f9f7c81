"""SpaCO: the bernoulli estimator is exactly unbiased (enumerated, no statistics)."""

import itertools
import math

import families
import pytest
import torch
from models import grads, max_rel_err, reference_loss, tiny_model

from ds_chunk import ChunkScheduler
from ds_chunk.config import SparseConfig
from ds_chunk.sampling import ChunkSampler

K, C = 5, 8  # 5 chunks of 8 tokens


def _setup(prompt: int = 0, family: str | None = None):
    model = tiny_model("llama") if family is None else families.build(family)
    ids = torch.randint(0, 97, (2, K * C), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :12] = -100  # chunk 0 supervised only in row 1
    labels[:, :prompt] = -100  # an unsupervised prompt: its chunks learn only through their K/V
    return model, ids, labels


def _grad_for(model, ids, labels, sparse, sampled):
    result = ChunkScheduler({"chunk_size": C, "sparse": sparse}).backward(model, ids, labels, sampled=sampled)
    g = grads(model) if any(p.grad is not None for p in model.parameters()) else None
    model.zero_grad()
    return result, g


def _seco(model, ids, labels):
    reference_loss(model, ids, labels).backward()
    g = grads(model)
    model.zero_grad()
    return g


def _expectation(model, ids, labels, sparse, subsets_with_prob):
    total = None
    for subset, prob in subsets_with_prob:
        _, g = _grad_for(model, ids, labels, sparse, list(subset))
        total = {k: prob * v for k, v in g.items()} if total is None else {k: total[k] + prob * g[k] for k in g}
    return total


@pytest.mark.parametrize(
    "sparse, prompt",
    [
        ({"rate": 0.4}, 0),
        ({"num_chunks": 2}, 0),  # p = t/k
        ({"rate": 0.3, "always_replay": [1, -1]}, 0),  # non-uniform pi
        ({"rate": 0.5, "always_replay": "supervised"}, 2 * C + 1),  # chunks 0-1 only feed later chunks
    ],
)
def test_bernoulli_is_exactly_unbiased(sparse, prompt):
    model, ids, labels = _setup(prompt)
    g_seco = _seco(model, ids, labels)
    # chunk c predicts the labels at positions c*C+1 .. (c+1)*C
    has_loss = [bool((labels[:, c * C + 1 : (c + 1) * C + 1] != -100).any()) for c in range(K)]
    pi = ChunkSampler(SparseConfig.from_dict(sparse)).probabilities(has_loss)
    subsets = []
    for r in range(K + 1):
        for subset in itertools.combinations(range(K), r):
            prob = math.prod(pi[c] if c in subset else 1 - pi[c] for c in range(K))
            if prob > 0:
                subsets.append((subset, prob))
    assert abs(sum(p for _, p in subsets) - 1) < 1e-12
    assert max_rel_err(_expectation(model, ids, labels, sparse, subsets), g_seco) < 1e-6


@pytest.mark.parametrize(
    "sparse, prompt, family",
    [
        ({"sampler": "gradient", "rate": 0.3}, 0, None),
        ({"sampler": "gradient", "rate": 0.5, "always_replay": "supervised"}, 3 * C + 1, None),  # chunks 0-2: K/V only
        ({"sampler": "gradient", "num_chunks": 1, "always_replay": [-1]}, 2 * C + 1, None),
        # window 16 = 2 chunks: the first replay (chunk 4) sends nothing to chunks 0-1, later replays do
        ({"sampler": "gradient", "rate": 0.5, "always_replay": "supervised"}, 4 * C + 1, "mistral_sliding16"),
    ],
)
def test_gradient_sampler_is_exactly_unbiased(sparse, prompt, family):
    """Each chunk's pi depends on the draws of the chunks after it: enumerate every draw, with
    its probability the product of the pi_c (or 1 - pi_c) the call decided along its path."""
    model, ids, labels = _setup(prompt, family)
    g_seco, ref = _seco(model, ids, labels), reference_loss(model, ids, labels).item()
    expected, loss, total, fractional = None, 0.0, 0.0, set()
    for r in range(K + 1):
        for subset in itertools.combinations(range(K), r):
            result, g = _grad_for(model, ids, labels, sparse, list(subset))
            pi = result.inclusion
            prob = math.prod(pi[c] if c in subset else 1 - pi[c] for c in pi) if set(subset) <= set(pi) else 0.0
            fractional |= {c for c, p in pi.items() if 0 < p < 1}
            if prob == 0:
                continue
            assert result.replayed == list(subset)
            assert result.weights == {c: 1 / pi[c] for c in subset}
            total, loss = total + prob, loss + prob * float(result.loss)
            if g is not None:
                expected = {k: prob * v for k, v in g.items()} if expected is None else {
                    k: expected[k] + prob * g[k] for k in g}  # fmt: skip
    assert abs(total - 1) < 1e-12 and len(fractional) >= 2  # a real draw, not SeCO in disguise
    assert max_rel_err(expected, g_seco) < 1e-6
    assert abs(loss - ref) < 1e-10  # the reported estimate, sum of w_i * L_i, is unbiased too


def test_gradient_sampler_budget():
    """Chunks without a loss share the budget by the gradient carried into them: their pi add
    up to at most bernoulli's expected replays at the same rate, and are not all alike."""
    model, ids, labels = _setup(prompt=4 * C + 1)  # only the last chunk has a loss
    sched = ChunkScheduler({"chunk_size": C, "sparse": {"sampler": "gradient", "rate": 0.25,
                                                        "always_replay": "supervised"}})  # fmt: skip
    pi = sched.backward(model, ids, labels, sampled=list(range(K))).inclusion
    assert pi[K - 1] == 1.0 and len({round(pi[c], 9) for c in range(K - 1)}) == K - 1
    assert sum(pi[c] for c in range(K - 1)) <= 0.25 * (K - 1) + 1e-12


def test_gradient_sampler_refused_for_identical_schedules():
    model, ids, labels = _setup()
    sched = ChunkScheduler({"chunk_size": C, "sparse": {"sampler": "gradient", "rate": 0.5}})
    with pytest.raises(ValueError, match='sampler = "gradient" decides per rank'):
        sched.backward(model, ids, labels, has_loss=[True] * K)


def test_paper_sampler_is_biased():
    model, ids, labels = _setup()
    g_seco = _seco(model, ids, labels)
    sparse = {"sampler": "paper", "num_chunks": 2}
    subsets = [(s, 1 / math.comb(K, 2)) for s in itertools.combinations(range(K), 2)]
    assert max_rel_err(_expectation(model, ids, labels, sparse, subsets), g_seco) > 1e-2


def test_rate_one_equals_seco_exactly():
    model, ids, labels = _setup()
    ChunkScheduler({"chunk_size": C}).backward(model, ids, labels)
    g_seco = grads(model)
    model.zero_grad()
    result, g = _grad_for(model, ids, labels, {"rate": 1.0}, None)
    assert result.replayed == list(range(K))
    assert all(torch.equal(g[k], g_seco[k]) for k in g)


def test_reported_loss_modes_and_draws_reproduce():
    """exact: the full loss; off: NaN; estimate (the default): sum of w_i * L_i, exactly unbiased
    (enumerated over every draw); the draws are a function of (seed, step)."""
    model, ids, labels = _setup()
    ref = reference_loss(model, ids, labels).item()
    sched = ChunkScheduler({"chunk_size": C, "sparse": {"rate": 0.25, "seed": 7, "report_loss": "exact"}})
    draws = [sched.backward(model, ids, labels, step=s) for s in range(6)]
    for r in draws:
        assert abs(float(r.loss) - ref) < 1e-10 and r.loss_kind == "exact"
        assert all(w == 4.0 for w in r.weights.values())
    again = ChunkScheduler({"chunk_size": C, "sparse": {"rate": 0.25, "seed": 7, "report_loss": "exact"}})
    assert [again.backward(model, ids, labels, step=s).replayed for s in range(6)] == [r.replayed for r in draws]
    assert len({tuple(r.replayed) for r in draws}) > 1
    model.zero_grad()
    quiet = ChunkScheduler({"chunk_size": C, "sparse": {"rate": 0.25, "report_loss": "off"}})
    assert math.isnan(float(quiet.backward(model, ids, labels).loss))
    estimate = ChunkScheduler({"chunk_size": C, "sparse": {"rate": 0.4}})
    expected = 0.0
    for n in range(K + 1):
        for subset in itertools.combinations(range(K), n):
            result = estimate.backward(model, ids, labels, sampled=list(subset))
            assert result.loss_kind == "estimate"
            expected += 0.4**n * 0.6 ** (K - n) * float(result.loss)
            model.zero_grad()
    assert abs(expected - ref) < 1e-10


def test_draws_per_rank():
    sampler = ChunkSampler(SparseConfig(rate=0.5, seed=1))
    has = [True] * 16
    assert sampler.weights(has, None, 3, rank=0) != sampler.weights(has, None, 3, rank=1)
    same = ChunkSampler(SparseConfig(rate=0.5, seed=1, same_on_all_ranks=True))
    assert same.weights(has, None, 3, rank=0) == same.weights(has, None, 3, rank=1)


def test_supervised_chunks_always_replayed():
    sampler = ChunkSampler(SparseConfig(rate=0.01, always_replay="supervised"))
    has = [False] * 6 + [True] * 2
    for step in range(20):
        assert {6, 7} <= set(sampler.weights(has, None, step))


def test_empty_draw_still_signals_boundary():
    model, ids, labels = _setup()
    calls = []
    sched = ChunkScheduler({"chunk_size": C, "sparse": {"rate": 0.5}}, backward_fn=lambda s, last: calls.append(last))
    result = sched.backward(model, ids, labels, sampled=[])
    assert result.replayed == [] and calls == [True]


def test_bad_sampled_override():
    model, ids, labels = _setup()
    with pytest.raises(ValueError, match="distinct"):
        ChunkScheduler({"chunk_size": C, "sparse": {"rate": 0.5}}).backward(model, ids, labels, sampled=[0, 0])
    with pytest.raises(ValueError, match="sparse"):
        ChunkScheduler({"chunk_size": C}).backward(model, ids, labels, sampled=[0])
