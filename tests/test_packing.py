"""Packed rows (documents one after another, position_ids restarting at each) against each
document's own full backprop, transformers' packed full forward and DeepSpeed's own step."""

import copy
import os
import sys

import families
import pytest
import torch
import torch.nn.functional as F
from engine_ref import ds_config, lora_model, max_param_err
from models import grads, max_rel_err, packed_positions, per_document_loss, tiny_model

import ds_chunk
from ds_chunk import ChunkScheduler
from ds_chunk.data import TokenizedDataset, collate
from ds_chunk.documents import Layout
from ds_chunk.evaluate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = [[10, 3, 20, 12], [30, 14, 1]]  # per row, its documents: one of 1 token, one longer than 4 chunks of 5


def _packed(lengths=LENGTHS, seed=1):
    """input_ids, labels (each document's first token unsupervised, as TRL's collator does), position_ids."""
    ids = torch.randint(0, 97, (len(lengths), sum(lengths[0])), generator=torch.Generator().manual_seed(seed))
    pos = packed_positions(lengths)
    return ids, ids.masked_fill(pos == 0, -100), pos


@pytest.mark.parametrize("impl", ["sdpa", "eager"])  # chunk_sdpa's segments; a 4D mask
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_rows_equal_each_document_alone_float64(arch, chunk, impl):
    model = tiny_model(arch, attn_implementation=impl)
    ids, labels, pos = _packed()
    ref = per_document_loss(model, ids, labels, LENGTHS)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad()
    hf = model(input_ids=ids, position_ids=pos, use_cache=False).logits  # transformers' own packed forward
    hf_loss = F.cross_entropy(hf[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    result = ChunkScheduler({"chunk_size": chunk}).backward(model, ids, labels, position_ids=pos)
    tol = 1e-12 if impl == "sdpa" else 1e-6  # HF's eager softmax rounds through float32
    assert float(result.loss) == pytest.approx(float(ref), rel=tol) and float(hf_loss) == pytest.approx(float(ref))
    assert max_rel_err(grads(model), g_ref) < tol


def test_packed_and_padded_rows_and_one_position_row_for_all():
    """Padding (a 4D mask with the documents) and position_ids given as one row for every row."""
    model = tiny_model("llama")
    lengths = [[9, 16, 15], [9, 16, 15]]
    ids, labels, pos = _packed(lengths)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels[1, 30:] = -100
    ref = per_document_loss(model, ids, labels, lengths)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad()
    result = ChunkScheduler({"chunk_size": 7}).backward(model, ids, labels, mask, position_ids=pos[:1])
    assert float(result.loss) == pytest.approx(float(ref), rel=1e-12)
    assert max_rel_err(grads(model), g_ref) < 1e-12


def test_spaco_on_packed_rows_is_exactly_unbiased():
    """Every bernoulli draw of 5 chunks (of 9 tokens) enumerated with its probability: the
    expected gradient equals the documents' own, whichever documents a draw leaves out."""
    import itertools
    import math

    model = tiny_model("llama")
    ids, labels, pos = _packed()
    per_document_loss(model, ids, labels, LENGTHS).backward()
    want = grads(model)
    model.zero_grad()
    expected = None
    for r in range(6):
        for subset in itertools.combinations(range(5), r):
            prob = 0.4 ** len(subset) * 0.6 ** (5 - len(subset))
            scheduler = ChunkScheduler({"chunk_size": 9, "sparse": {"rate": 0.4}})
            scheduler.backward(model, ids, labels, position_ids=pos, sampled=list(subset))
            g = (
                {k: prob * v for k, v in grads(model).items()}
                if any(p.grad is not None for p in model.parameters())
                else {}
            )
            expected = g if expected is None else {k: expected.get(k, 0) + g.get(k, 0) for k in want}
            model.zero_grad()
    assert math.isclose(sum(0.4**r * 0.6 ** (5 - r) * math.comb(5, r) for r in range(6)), 1.0)
    # as tests/test_spaco.py: draws weighted up to 2.5^5 cancel, amplifying HF's float32 RMSNorm rounding
    assert max_rel_err(expected, want) < 1e-6


def test_token_stats_equal_the_full_logits():
    """Entropy and argmax hits over the supervised tokens (SFTTrainer's metrics), from the
    fused head in sub-chunks and from a LoRA head run as a module under checkpointing."""
    from peft import LoraConfig, get_peft_model

    ids, labels, pos = _packed()
    for model in (
        tiny_model("llama"),
        get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)),
    ):
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, :-1]
        keep = labels[:, 1:] != -100
        entropy = torch.special.entr(logits.softmax(-1)).sum(-1)[keep].sum()
        hits = (logits.argmax(-1) == labels[:, 1:])[keep].sum()
        cfg = {"chunk_size": 7, "loss_chunk_size": 4}
        stats = ChunkScheduler(cfg).backward(model, ids, labels, position_ids=pos, token_stats=True).token_stats
        assert stats.tokens == int(keep.sum()) and stats.correct == int(hits)
        assert stats.entropy == pytest.approx(float(entropy), rel=1e-12)


def test_evaluate_packed_rows():
    model = tiny_model("llama")
    ids, labels, pos = _packed()
    with torch.no_grad():
        ref = per_document_loss(model, ids, labels, LENGTHS)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    assert evaluate(model, [batch], 6)["loss"] == pytest.approx(float(ref), rel=1e-6)  # its CE is float32


def test_what_packed_rows_cannot_take():
    ids, labels, pos = _packed()
    flash = tiny_model("llama")
    flash.config._attn_implementation_internal = "flash_attention_2"  # its varlen path: not built (no GPU here)
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2': ds_chunk separates documents"):
        ChunkScheduler({"chunk_size": 8}).backward(flash, ids, labels, position_ids=pos)
    with pytest.raises(ValueError, match=r"position_ids shape \(3, 45\): expected \[2, 45\] or \[1, 45\]"):
        ChunkScheduler({"chunk_size": 8}).backward(tiny_model("llama"), ids, labels, position_ids=pos[[0, 1, 1]])
    with pytest.raises(ValueError, match="sequence of 585 tokens exceeds the 512 positions"):
        ChunkScheduler({"chunk_size": 8}).backward(tiny_model("llama"), ids, labels, position_ids=pos + 555)
    assert Layout.of(ids, torch.arange(45)).packed is False  # 0..T-1: the plain path
    # a position table (GPT-Neo's, as ALiBi's) is as long as the model's positions, whatever the documents
    neo, long_ids = families.build("gpt_neo"), torch.randint(3, 97, (1, 300))
    with pytest.raises(ValueError, match="sequence of 300 tokens exceeds the 256 positions"):
        ChunkScheduler({"chunk_size": 64}).backward(neo, long_ids, position_ids=torch.arange(300)[None] % 100)
    # RoPE only: a packed row may outgrow the trained length (512) while its documents do not
    ChunkScheduler({"chunk_size": 256}).backward(tiny_model("llama"), torch.randint(0, 97, (1, 600)),
                                                 position_ids=torch.arange(600)[None] % 300)  # fmt: skip


@pytest.mark.parametrize("stage", [0, 3])
def test_train_batch_equals_deepspeeds_own_packed_step(stage):
    """engine.train_batch with position_ids against DeepSpeed's unchunked step on the same rows,
    whose full forward keeps the documents apart (no attention mask, no cache)."""
    import deepspeed

    model = lora_model()
    ids, labels, pos = _packed()
    cfg = ds_config(stage, False, 2, 1, chunk=6, sgd=0.1)
    ref, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    for _ in range(2):
        ref.backward(ref(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss)
        ref.step()
    engine, *_ = ds_chunk.initialize(model=copy.deepcopy(model), config=cfg)
    for _ in range(2):
        engine.train_batch({"input_ids": ids, "labels": labels, "position_ids": pos})
    with deepspeed.zero.GatheredParameters([*ref.module.parameters(), *engine.module.parameters()], enabled=stage == 3):
        assert max_param_err(engine.hf_model, ref.hf_model) < 1e-6
    assert engine._positions(ids, torch.arange(45)).shape == ids.shape  # one row of positions for all, 1D too


class _Words:
    """A whitespace tokenizer of numbers with an EOS id, as make_tiny_model's word-level one."""

    eos_token_id = 96

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(w) for w in text.split()]}


def test_launch_packing_keeps_texts_apart():
    """launch/train.py's --data texts: by default each text attends only to itself, the
    gradient of a block equal to its documents' own (a text cut by the block's end going on
    in the next block as a new one); --packing wrapped keeps the old single stream."""
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(str(int(t)) for t in torch.randint(0, 90, (n,), generator=g)) for n in (7, 30, 4, 22, 11)]
    records = [{"text": t} for t in texts]
    data = TokenizedDataset(records, _Words(), 32)
    batch = collate([data[i] for i in range(len(data))])
    starts = Layout.of(batch["input_ids"], batch["position_ids"]).starts
    lengths = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in starts]
    assert lengths[0] == [8, 24] and lengths[1] == [7, 5, 20]  # 7 + EOS; 31 of 30 + EOS, the rest next block
    model = tiny_model("llama")
    mask = batch["attention_mask"]
    ref = per_document_loss(model, batch["input_ids"], batch["labels"], lengths)
    ref.backward()
    g_ref = grads(model)
    model.zero_grad()
    ChunkScheduler({"chunk_size": 5}).backward(model, batch["input_ids"], batch["labels"], mask,
                                               position_ids=batch["position_ids"])  # fmt: skip
    assert max_rel_err(grads(model), g_ref) < 1e-12
    wrapped = TokenizedDataset(records, _Words(), 32, packing="wrapped")
    assert "position_ids" not in wrapped[0] and bool((wrapped[1]["labels"] != -100).all())


def test_launch_start_line_says_how_texts_are_packed(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import make_tiny_model
    import train

    colors = os.path.join(ROOT, "launch", "data", "colors.jsonl")
    tiny = make_tiny_model.save(str(tmp_path / "tiny"), colors)
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for packing, said in (("documents", "separate documents"), ("wrapped", "one stream, attending across texts")):
            out = str(tmp_path / packing)
            train.main(["--model", tiny, "--data", colors, "--seq-len", "64", "--chunk-size", "16", "--max-steps",
                        "1", "--eval-every", "1000", "--packing", packing, "--output-dir", out])  # fmt: skip
            assert f"texts packed as {said} (--packing {packing})" in capsys.readouterr().out
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
