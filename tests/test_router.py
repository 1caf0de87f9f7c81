"""The MoE router's load-balancing loss, chunk-wise, against transformers' own.

The reference is the model's full forward: cross-entropy (float64, computed here) + coef *
transformers' ``load_balancing_loss_func`` of the family, which runs in float32 over the whole
batch, padding masked. Tiny float64 MoEs from tests/families.py ("_router": the loss on).
"""

import copy
import itertools
import math
import sys

import families
import pytest
import torch
import torch.nn.functional as F
from engine_ref import ds_config
from models import max_rel_err, packed_positions

import ds_chunk
from ds_chunk import ChunkScheduler
from ds_chunk.config import SparseConfig
from ds_chunk.evaluate import evaluate
from ds_chunk.sampling import ChunkSampler

K, C = 5, 8  # 5 chunks of 8 tokens


def _batch(prompt: int = 0):
    ids = torch.randint(3, 97, (2, K * C), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # row 1: 30 tokens, right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, labels, mask


def hf_loss(model, ids, labels, mask=None, position_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's loss with its load-balancing term, the term's aux) from one full forward."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    func = sys.modules[type(model).__module__].load_balancing_loss_func
    aux = func(out.router_logits, model.num_experts, model.num_experts_per_tok, mask)
    return ce + model.config.router_aux_loss_coef * aux, aux


def _grads(model) -> dict:
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return g


CASES = [("mixtral_router", *c) for c in [(1, 0, 0), (8, 2, 0), (16, 0, 1)]]
CASES += [("qwen2_moe_router", 5, 0, 0), ("gpt_oss_router", 5, 0, 0)]  # the family sweep runs the rest


@pytest.mark.parametrize("name, chunk, keep, offload", CASES)
def test_chunked_equals_the_models_own_loss(name, chunk, keep, offload):
    """Padding, a prompt without loss (its chunks learn through the load-balancing loss and
    their K/V), chunks of 1 to 64 tokens, kept chunks, host KV offload."""
    model = families.build(name)
    ids, labels, mask = _batch(prompt=13)
    ref, aux = hf_loss(model, ids, labels, mask)
    ref.backward()
    want = _grads(model)
    result = ChunkScheduler({"chunk_size": chunk, "keep_chunks": keep, "kv_offload": bool(offload)}).backward(
        model, ids, labels, mask
    )
    assert max_rel_err(_grads(model), want) < 1e-12
    assert result.aux_loss == pytest.approx(aux.item(), rel=1e-6)
    assert float(result.loss) == pytest.approx(ref.item(), rel=1e-6)


def test_without_the_router_loss_nothing_changes():
    """output_router_logits off, a coefficient of 0, or a family whose forward adds no such loss."""
    for name, cfg in [("mixtral", {}), ("mixtral_router", {"router_aux_loss_coef": 0.0}), ("deepseek_v3", {})]:
        model = families.build(name)
        for k, v in cfg.items():
            setattr(model.config, k, v)
        ids, labels, mask = _batch()
        assert ChunkScheduler({"chunk_size": C}).backward(model, ids, labels, mask).aux_loss is None


def _draws(pi: list[float]):
    for r in range(K + 1):
        for subset in itertools.combinations(range(K), r):
            prob = math.prod(pi[c] if c in subset else 1 - pi[c] for c in range(K))
            if prob > 0:
                yield list(subset), prob


@pytest.mark.parametrize("report", ["estimate", "exact"])
def test_spaco_stays_unbiased(report):
    """Bernoulli at rate 0.4: every chunk has a loss now (the router's); the expected gradient
    over every draw is the model's own, each draw reports the exact aux (the last chunk counted,
    drawn or not), and the reported loss is exact or, as an estimate, unbiased."""
    model = families.build("mixtral_router")
    ids, labels, mask = _batch(prompt=13)
    ref, aux = hf_loss(model, ids, labels, mask)
    ref.backward()
    want = _grads(model)
    sparse = {"rate": 0.4, "report_loss": report}
    pi = ChunkSampler(SparseConfig.from_dict(sparse)).probabilities([True] * K)
    expected, loss = None, 0.0
    for subset, prob in _draws(pi):
        result = ChunkScheduler({"chunk_size": C, "sparse": sparse}).backward(model, ids, labels, mask, sampled=subset)
        assert result.aux_loss == pytest.approx(aux.item(), rel=1e-6)
        if report == "exact":
            assert float(result.loss) == pytest.approx(ref.item(), rel=1e-6)
        loss += prob * float(result.loss)
        g = _grads(model)
        expected = {k: prob * v for k, v in g.items()} if expected is None else {
            k: expected[k] + prob * g.get(k, 0) for k in expected}  # fmt: skip
    assert max_rel_err(expected, want) < 1e-6  # the share's float32 gradient, times 1/pi, rounds anew
    assert loss == pytest.approx(ref.item(), rel=1e-6)


def test_one_chunk_and_an_empty_draw():
    """A row of one chunk whose draw replays nothing: its routing is still counted."""
    model = families.build("mixtral_router")
    ids, labels, mask = _batch()
    _, aux = hf_loss(model, ids, labels, mask)
    result = ChunkScheduler({"chunk_size": 64, "sparse": {"rate": 0.5}}).backward(model, ids, labels, mask, sampled=[])
    assert result.replayed == [] and result.aux_loss == pytest.approx(aux.item(), rel=1e-6)


def test_gradient_sampler_that_skips_the_last_chunk():
    """The gradient sampler decides the last chunk during the replay: left out, its routing is
    still counted (one no-grad forward), so the replayed chunks' shares are exact."""
    model = families.build("mixtral_router")
    ids, labels, mask = _batch()
    ref, aux = hf_loss(model, ids, labels, mask)
    sparse = {"sampler": "gradient", "rate": 0.5}  # the estimate: the no-grad pass stops before the last chunk
    result = ChunkScheduler({"chunk_size": C, "sparse": sparse}).backward(model, ids, labels, mask, sampled=[1, 2])
    assert result.replayed == [1, 2]
    assert result.aux_loss == pytest.approx(aux.item(), rel=1e-6)


def test_packed_rows_equal_each_document_alone():
    """Documents packed in rows (position_ids restarting, no mask): each document's tokens and
    routing are its own, while the load-balancing loss spans the batch. Reference: every
    document run alone, its CE summed and its router logits laid out as in the packed rows,
    through transformers' load_balancing_loss_func."""
    model = families.build("mixtral_router")
    docs = [[10, 3, 20, 12], [30, 14, 1]]
    pos = packed_positions(docs)
    ids = torch.randint(3, 97, pos.shape, generator=torch.Generator().manual_seed(3))
    labels = ids.masked_fill(pos == 0, -100)
    total, count, layers = 0.0, 0, None
    for x_row, y_row, row in zip(ids, labels, docs):
        for x, y in zip(x_row.split(row), y_row.split(row)):
            out = model(input_ids=x[None])
            total = total + F.cross_entropy(out.logits[0, :-1], y[1:], ignore_index=-100, reduction="sum")
            count += int((y[1:] != -100).sum())
            now = list(out.router_logits)  # [tokens, experts] per layer
            layers = now if layers is None else [torch.cat(p) for p in zip(layers, now)]
    func = sys.modules[type(model).__module__].load_balancing_loss_func
    aux = func(tuple(layers), model.num_experts, model.num_experts_per_tok, None)
    (total / count + model.config.router_aux_loss_coef * aux).backward()
    want = _grads(model)
    result = ChunkScheduler({"chunk_size": 5}).backward(model, ids, labels, position_ids=pos)
    assert max_rel_err(_grads(model), want) < 1e-12
    assert result.aux_loss == pytest.approx(aux.item(), rel=1e-6)


def test_evaluation_reports_the_aux_loss():
    model = families.build("mixtral_router")
    ids, labels, mask = _batch()
    with torch.no_grad():
        _, aux = hf_loss(model.eval(), ids, labels, mask)
    metrics = evaluate(model, [{"input_ids": ids, "labels": labels, "attention_mask": mask}], C)
    assert metrics["aux_loss"] == pytest.approx(aux.item(), rel=1e-6)


@pytest.fixture
def single_process_env(monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29519"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_equals_deepspeeds_own_step(stage, single_process_env):
    """train_batch against DeepSpeed's unchunked step on the model's own loss (its aux term
    included): a full forward and engine.backward per micro-batch (GA 2), then engine.step(); SGD."""
    import deepspeed

    model = families.build("mixtral_router").float()  # DeepSpeed reduces no float64 gradient
    cfg = ds_config(stage, False, 2, 2, chunk=C, sgd=0.5)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(3, 97, (4, K * C), generator=g) for _ in range(2)]  # equal rows: equal means
    ref, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    for ids in batches:
        for rows in ids.split(2):
            ref.backward(ref(input_ids=rows, labels=rows).loss)
            ref.step()
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    for ids in batches:
        engine.train_batch({"input_ids": ids})
    assert all(r.aux_loss is not None for r in engine.last_results)
    params = [*ref.module.parameters(), *engine.module.parameters()]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
        start = dict(model.named_parameters())
        theirs, ours = dict(ref.hf_model.named_parameters()), dict(engine.hf_model.named_parameters())
        err = max(float((ours[k] - theirs[k]).norm() / (theirs[k] - start[k]).norm()) for k in start)
    # float32: a layer norm's small update differs by 3e-5 here (7e-6 without the router's loss);
    # both steps are 7e-4 from a float64 one there, where transformers' own loss runs in float32
    assert err < 1e-4


def test_trainer_equals_the_parent(tmp_path):
    """ChunkwiseTrainer against transformers.Trainer on a tiny Mixtral with the router's loss:
    padding, gradient accumulation (the model's loss, as the parent sums it), clipping, a schedule."""
    from test_hf import Rows, _losses, _train, _update_err
    from transformers import Trainer

    from ds_chunk import ChunkwiseTrainer

    start = families.build("mixtral_router")
    parent = _train(Trainer, tmp_path / "a", model=families.build("mixtral_router"))
    ours = _train(ChunkwiseTrainer, tmp_path / "b", model=families.build("mixtral_router"), chunkwise={"chunk_size": 8})
    assert _losses(ours) == pytest.approx(_losses(parent), rel=1e-6)
    assert _update_err(ours.model, parent.model, start) < 1e-6
    held_out = Rows(6, seed=1)  # evaluation: the model's loss, its router term included
    assert ours.evaluate(held_out)["eval_loss"] == pytest.approx(parent.evaluate(held_out)["eval_loss"], rel=1e-6)


@pytest.mark.parametrize("mode", ["completion_only_loss"])
def test_sft_trainer_equals_the_parent_and_logs_its_aux_loss(tmp_path, mode):
    """with_chunkwise(SFTTrainer) on a tiny Mixtral, TRL's router_aux_loss_coef (0.05, not the
    model's 0.1): the losses, the weights and TRL's logged aux_loss equal SFTTrainer's; SGD."""
    from test_hf import _losses, _sft, _update_err
    from trl import SFTTrainer

    from ds_chunk import with_chunkwise

    make = lambda: families.build("mixtral_router")  # noqa: E731
    kw = dict(dtype=torch.float64, make=make, router_aux_loss_coef=0.05, optim="sgd")
    parent, start = _sft(SFTTrainer, tmp_path / "a", mode, **kw)
    ours, _ = _sft(with_chunkwise(SFTTrainer), tmp_path / "b", mode, chunkwise={"chunk_size": 8}, **kw)
    for key in ("loss", "aux_loss"):
        assert len(_losses(parent, key)) == 3 and _losses(ours, key) == pytest.approx(_losses(parent, key), rel=1e-6)
    assert _update_err(ours.model, parent.model, start) < 1e-6
    ours_eval, parent_eval = (t.evaluate(t.train_dataset) for t in (ours, parent))
    for key in ("eval_loss", "eval_aux_loss"):
        assert ours_eval[key] == pytest.approx(parent_eval[key], rel=1e-6)
