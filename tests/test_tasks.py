"""The built-in tasks: what each generator makes, and that the synthetic tasks cannot be
learnt without gradient across chunk boundaries (truncated backprop gets none to the
positions the answers depend on)."""

import pytest
import torch
from models import tiny_model

from ds_chunk import ChunkScheduler
from ds_chunk.data import PasskeyTask, RecallTask, StdlibBytes, collate


def test_recall_layout():
    task = RecallTask(4, 16, 64, seed=3)
    ex = task[1]
    assert torch.equal(ex["input_ids"][:8], ex["input_ids"][8:])
    assert (ex["labels"][:8] == -100).all() and torch.equal(ex["labels"][8:], ex["input_ids"][8:])
    assert torch.equal(task[1]["input_ids"], RecallTask(4, 16, 64, seed=3)[1]["input_ids"])  # deterministic


@pytest.mark.parametrize("key_len", [1, 3])
def test_passkey_layout(key_len):
    T, V = 256, 64
    task = PasskeyTask(200, T, V, key_len=key_len, seed=5)
    depths = []
    for i in range(200):
        ids, labels = task[i]["input_ids"], task[i]["labels"]
        key = ids[-key_len:]
        (at,) = (ids == 0).nonzero().flatten().tolist()  # one MARK
        depths.append(at)
        assert at + key_len < 3 * T // 4 and torch.equal(ids[at + 1 : at + 1 + key_len], key)
        assert ids[-key_len - 1] == 1 and (ids == 1).sum() == 1  # one QUERY, just before the answer
        assert (key >= V // 2).all() and int((ids >= V // 2).sum()) == 2 * key_len  # key tokens: needle + answer
        assert torch.equal(labels[-key_len:], key) and (labels[:-key_len] == -100).all()
    assert min(depths) < T // 8 and max(depths) > T // 2  # a random depth over the first 3/4


def test_stdlib_bytes_split_by_file(tmp_path):
    for i in range(10):
        (tmp_path / f"m{i}.py").write_bytes(bytes([65 + i]) * (100 + i))
    train, held = StdlibBytes(32, "train", 0.2, root=str(tmp_path)), StdlibBytes(32, "eval", 0.2, root=str(tmp_path))
    assert len(held.files) == 2 and not set(held.files) & set(train.files)
    assert len(train.files) + len(held.files) == 10
    total = sum(f.stat().st_size + 1 for f in held.files)  # each file and its NUL
    assert len(held) == total // 32 and torch.equal(held[0]["labels"], held[0]["input_ids"])
    assert held[0]["input_ids"].max() < 256
    with pytest.raises(ValueError, match="fewer than 4096 bytes"):
        StdlibBytes(4096, "eval", 0.2, root=str(tmp_path))
    with pytest.raises(ValueError, match=r"no \*\.py files in .*nowhere"):
        StdlibBytes(32, "train", root=str(tmp_path / "nowhere"))


def _input_grads(task, chunk: int, truncate: bool) -> torch.Tensor:
    """d loss / d (the embedding output) at every position of a batch of ``task``."""
    model = tiny_model("llama", vocab=64, max_position_embeddings=1024)
    batch = collate([task[i] for i in range(2)])
    grads = torch.zeros(batch["input_ids"].shape)
    calls = []

    def keep(module, inputs, out):  # per chunk call: record where its gradient lands
        if torch.is_grad_enabled():
            call = len(calls)
            calls.append(out)
            out.register_hook(lambda g: grads_at(call, g))
        return out

    starts = {}

    def grads_at(call, g):
        s = starts[call]
        grads[:, s : s + g.shape[1]] += g.norm(dim=-1)

    def pre(module, args, kwargs):
        starts[len(calls)] = int(kwargs["position_ids"][0, 0])

    decoder = model.get_decoder()
    h1 = decoder.embed_tokens.register_forward_hook(keep)
    h2 = decoder.register_forward_pre_hook(pre, with_kwargs=True)
    ChunkScheduler({"chunk_size": chunk, "truncate": truncate}).backward(model, batch["input_ids"], batch["labels"])
    h1.remove(), h2.remove()
    return grads


@pytest.mark.parametrize(
    "task, chunk, source",
    [
        (RecallTask(4, 128, 64), 32, slice(0, 32)),  # chunk 0 (no loss) is read by chunk 2
        (PasskeyTask(4, 128, 64), 32, None),  # the answer is read from the needle
    ],
    ids=["recall", "passkey"],
)
def test_answers_need_gradient_across_chunks(task, chunk, source):
    """Truncated backprop gives the positions the answers are read from no gradient at all
    (they sit in chunks without a loss); SeCO gives them gradient."""
    seco, cut = _input_grads(task, chunk, False), _input_grads(task, chunk, True)
    for row in range(2):
        if source is None:  # the passkey's needle: MARK and key
            at = int((task[row]["input_ids"] == 0).nonzero()[0])
            cols = slice(at, at + 1 + task.key_len)
        else:
            cols = source
        assert (seco[row, cols] > 0).all()
        assert (cut[row, cols] == 0).all()
