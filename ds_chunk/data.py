"""Training data: synthetic long-range tasks (offline), JSONL / HF datasets, collation.

Every dataset here is a sequence of examples ``{"input_ids": [T], "labels": [T]}`` indexed
deterministically, and ``batches(dataset, batch_size, seed, start)`` yields batches in an
order that depends only on (seed, epoch): resuming at batch ``start`` replays exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence

import torch

from ds_chunk.chunking import IGNORE_INDEX

Example = dict[str, torch.Tensor]
PACKING = ("documents", "wrapped")  # how TokenizedDataset packs texts (see there)


class RecallTask:
    """The second half of each sequence repeats the first; loss on the second half only.

    A token at position t >= T/2 is predictable only from position t - T/2, so with
    chunks shorter than T/2 the loss can fall only if gradient crosses chunk boundaries.
    """

    def __init__(self, num_examples: int, seq_len: int, vocab_size: int, seed: int = 0):
        if seq_len < 2 or seq_len % 2:
            raise ValueError(f"recall task needs an even seq_len >= 2, got {seq_len}")
        self.n, self.seq_len, self.vocab, self.seed = num_examples, seq_len, vocab_size, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        half = torch.randint(0, self.vocab, (self.seq_len // 2,), generator=g)
        ids = torch.cat([half, half])
        labels = ids.clone()
        labels[: self.seq_len // 2] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


class PasskeyTask:
    """A passkey hidden at a random depth of a long filler, asked for at the end.

    Layout: [filler ... MARK key filler ...] QUERY key, the needle (MARK + key) anywhere in
    the first 3/4 of the sequence, the question in the last ``key_len`` + 1 tokens; loss on
    the answer (the final key tokens) only. Token ids: 0 = MARK, 1 = QUERY, filler from
    [2, vocab/2), key from [vocab/2, vocab), so the needle is the only key token before the
    question. With chunks of at most T/4 (and a short key) the answer's chunk never holds
    the needle: the answer can be learnt only through gradient that crosses chunk boundaries.

    key_len is 1 by default: a one-token key is learnt by the tiny default model in ~200
    steps of 16 sequences (an answer position then looks up one token class); longer keys
    need the copying (induction) mechanism, which a model this size learns far more slowly.
    """

    def __init__(self, num_examples: int, seq_len: int, vocab_size: int, key_len: int = 1, seed: int = 0):
        if vocab_size < 8 or key_len < 1 or seq_len < 4 * key_len + 4:
            raise ValueError(f"passkey task needs vocab_size >= 8, key_len >= 1 and seq_len >= {4 * key_len + 4}")
        self.n, self.seq_len, self.vocab, self.key_len, self.seed = num_examples, seq_len, vocab_size, key_len, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Example:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        half, k = self.vocab // 2, self.key_len
        ids = torch.randint(2, half, (self.seq_len,), generator=g)
        key = torch.randint(half, self.vocab, (k,), generator=g)
        at = int(torch.randint(0, 3 * self.seq_len // 4 - k, (1,), generator=g))  # the needle's depth
        ids[at] = 0
        ids[at + 1 : at + 1 + k] = key
        ids[-k - 1] = 1
        ids[-k:] = key
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-k:] = key
        return {"input_ids": ids, "labels": labels}


class TextPasskey:
    """The passkey test in words, with a real model's tokenizer (the landmark-attention /
    LongLoRA prompt): a filler sentence repeated, "The pass key is 72815. Remember it. 72815
    is the pass key." at a random depth in the first ``needle_within`` of the sequence, and at
    the end "What is the pass key? The pass key is 72815"; loss on the key's tokens only.

    Under teacher forcing every key token's argmax is right exactly when greedy decoding
    writes the whole key, so ``evaluate``'s ``sequence_accuracy`` is whole-key accuracy.
    """

    FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    QUESTION = "What is the pass key? The pass key is"

    def __init__(self, num_examples: int, seq_len: int, tokenizer, seed: int = 0, digits: int = 5,
                 needle_within: float = 0.8):  # fmt: skip
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        self.n, self.seq_len, self.seed, self.digits, self.within = num_examples, seq_len, seed, digits, needle_within
        self.ids, self.decode = ids, tokenizer.decode
        self.filler, self.question = ids(self.FILLER), ids(self.QUESTION)
        longest = len(ids(self.needle("9" * digits))) + len(self.question) + len(ids(" " + "9" * digits))
        if seq_len < longest + len(self.filler):
            raise ValueError(f"the text passkey task needs seq_len >= {longest + len(self.filler)}, got {seq_len}")

    @staticmethod
    def needle(key: str) -> str:
        return f"The pass key is {key}. Remember it. {key} is the pass key. "

    def __len__(self) -> int:
        return self.n

    def _blank(self, token: int) -> bool:
        return not self.decode([token]).strip()

    def __getitem__(self, i: int) -> Example:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (self.digits,), generator=g))
        needle, answer = self.ids(self.needle(key)), self.ids(" " + key)
        head = self.question
        if len(answer) > 1 and self._blank(answer[0]):  # a tokenizer's lone-space token: not part of the key
            head, answer = head + answer[:1], answer[1:]
        room = self.seq_len - len(needle) - len(head) - len(answer)  # filler tokens in all
        at = int(torch.randint(0, int(room * self.within) + 1, (1,), generator=g))  # the needle's depth
        reps = -(-room // len(self.filler))
        filler = (self.filler * reps)[:room]
        ids = torch.tensor(filler[:at] + needle + filler[at:] + head + answer)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-len(answer) :] = ids[-len(answer) :]
        return {"input_ids": ids, "labels": labels}


class StdlibBytes:
    """Byte-level language modelling on real text nobody here wrote: the Python standard
    library's own ``*.py`` files (they ship with every Python), split into held-out and
    training files by a seeded draw of ``eval_fraction`` of the files.

    The files of a split are joined (each followed by a NUL byte, which source files do not
    contain) and cut into blocks of ``seq_len`` bytes; loss on every byte (vocabulary 256).
    """

    def __init__(self, seq_len: int, split: str, eval_fraction: float = 0.1, seed: int = 0, root: str | None = None):
        import sysconfig
        from pathlib import Path

        if split not in ("train", "eval"):
            raise ValueError(f"split {split!r}: expected 'train' or 'eval'")
        folder = Path(root or sysconfig.get_paths()["stdlib"])
        files = sorted(folder.glob("*.py"))
        if not files:
            raise ValueError(f"no *.py files in {folder} (the standard library's sources are not installed?)")
        held = set(held_out_rows(len(files), eval_fraction, seed))
        chosen = [f for i, f in enumerate(files) if (i in held) == (split == "eval")]
        stream = torch.frombuffer(bytearray(b"".join(f.read_bytes() + b"\0" for f in chosen)), dtype=torch.uint8)
        self.files, self.blocks = chosen, stream[: len(stream) // seq_len * seq_len].long().view(-1, seq_len)
        if len(self.blocks) == 0:
            raise ValueError(f"the {split} files of {root or 'the standard library'} hold fewer than {seq_len} bytes")

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Example:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class NoSupervisedTokens(ValueError):
    """Every example of a dataset has all its labels ignored (e.g. prompts longer than seq_len)."""


class TokenizedDataset:
    """Examples from JSONL / HF ``datasets`` records, tokenized once up front.

    Records with "text" are packed into ``seq_len`` blocks (loss on every token), each text
    followed by EOS. packing "documents": each text attends only to itself (position_ids
    restart at each, the first token of each is not predicted from the one before; a text cut
    by a block's end goes on in the next block as a new one); "wrapped": texts attend to the
    texts before them in the block (TRL's packing_strategy="wrapped").
    Records with "messages" (chat) or "prompt" + "response"/"completion" are
    instruction samples: loss on the answer tokens only, truncated to ``seq_len``.
    ``where[i]`` names record i in errors (e.g. ``train.jsonl:8``; default ``record i``).
    """

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer,
        seq_len: int,
        where: Sequence[str] | None = None,
        packing: str = "documents",
    ):
        if packing not in PACKING:
            raise ValueError(f"packing = {packing!r}: expected one of {', '.join(map(repr, PACKING))}")
        texts, pairs = split_records(records, where)
        packed = _pack(texts, tokenizer, seq_len, packing == "documents")
        self.examples = packed + [_instruction(p, a, tokenizer, seq_len) for p, a in pairs]
        self.examples = [e for e in self.examples if (e["labels"][1:] != IGNORE_INDEX).any()]
        if not self.examples:
            raise NoSupervisedTokens(
                f"the dataset has no example with a supervised token within seq_len={seq_len} "
                "(every label is ignored: prompts too long, or empty answers)"
            )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def split_records(records: Sequence[dict], where: Sequence[str] | None = None) -> tuple[list[str], list[tuple]]:
    """(texts to pack, (prompt, answer) pairs); a record of neither kind is an error naming ``where[i]``."""
    texts, pairs = [], []
    for n, rec in enumerate(records):
        at = where[n] if where is not None else f"record {n}"
        if "text" in rec:
            if not isinstance(rec["text"], str):
                raise ValueError(f"{at}: 'text' must be a string, got {type(rec['text']).__name__}")
            texts.append(rec["text"])
        elif "messages" in rec or "prompt" in rec:
            pairs.append(_prompt_answer(rec, at))
        else:
            raise ValueError(f"{at}: expected a 'text', 'messages' or 'prompt' field, got {sorted(rec)}")
    return texts, pairs


def _prompt_answer(rec: dict, at: str) -> tuple[object, str]:
    if "messages" in rec:
        msgs = rec["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not isinstance(msgs[-1], dict)
            or msgs[-1].get("role") != "assistant"
        ):
            raise ValueError(f"{at}: 'messages' must be a list of turns ending with an assistant turn")
        return msgs[:-1], msgs[-1]["content"]
    answer = rec.get("response", rec.get("completion"))
    if answer is None:
        raise ValueError(f"{at}: a 'prompt' needs a 'response' or 'completion'")
    return rec["prompt"], answer


def _instruction(prompt, answer: str, tokenizer, seq_len: int) -> Example:
    """Prompt via the chat template where the tokenizer has one; labels on the answer only."""
    if isinstance(prompt, list) or getattr(tokenizer, "chat_template", None):
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        p_ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        p_ids = list(p_ids["input_ids"] if isinstance(p_ids, Mapping) else p_ids)
    else:
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or 0]
    ids = torch.tensor((p_ids + a_ids)[:seq_len])
    labels = ids.clone()
    labels[: len(p_ids)] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _pack(texts: list[str], tokenizer, seq_len: int, separate: bool) -> list[Example]:
    if not texts:
        return []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = [tokenizer(text, add_special_tokens=True)["input_ids"] + eos for text in texts]
    stream = torch.tensor([t for doc in docs for t in doc])
    blocks = [(s, min(s + seq_len, len(stream))) for s in range(0, len(stream), seq_len)]
    if not separate:
        return [{"input_ids": stream[s:e], "labels": stream[s:e].clone()} for s, e in blocks if e - s > 1]
    positions = torch.cat([torch.arange(len(doc)) for doc in docs])
    out = []
    for s, e in blocks:
        pos = positions[s:e].clone()
        first = int(torch.nonzero(pos == 0)[0]) if bool((pos == 0).any()) else len(pos)
        pos[:first] -= int(pos[0])  # the rest of a text the previous block cut: a new document here
        labels = stream[s:e].masked_fill(pos == 0, IGNORE_INDEX)  # no prediction across documents
        if e - s > 1:
            out.append({"input_ids": stream[s:e], "labels": labels, "position_ids": pos})
    return out


def load_records(source: str) -> tuple[list[dict], list[str]]:
    """(records, where): a JSONL file, or ``hf:<dataset name>[:split]`` through ``datasets``.

    ``where[i]`` names record i for error messages: ``file:line`` or ``name[i]``.
    """
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError as e:
            raise ValueError("hf: data sources need the 'datasets' package: pip install datasets") from e
        name, _, split = source[3:].partition(":")
        records = list(datasets.load_dataset(name, split=split or "train"))
        return records, [f"{source}[{i}]" for i in range(len(records))]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"data file not found: {source}")
    records, where = [], []
    with open(source) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{line_no}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{source}:{line_no}: expected a JSON object per line, got {type(rec).__name__}")
            records.append(rec)
            where.append(f"{source}:{line_no}")
    if not records:
        raise ValueError(f"{source}: the dataset is empty")
    return records, where


def held_out_rows(n: int, fraction: float, seed: int) -> list[int]:
    """Which of ``n`` records to hold out for evaluation: a seeded random ``fraction`` of
    them, at least one when ``fraction`` > 0, and never all (at least one stays to train)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--eval-fraction {fraction}: expected a number in [0, 1)")
    count = min(max(1, round(n * fraction)), n - 1) if fraction > 0 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pads have attention_mask 0 and label -100. Where an
    example has position_ids (packed documents), the batch has them: 0..n-1 for the others,
    0 on pads."""
    longest = max(len(e["input_ids"]) for e in examples)
    out = {
        "input_ids": torch.zeros(len(examples), longest, dtype=torch.long),
        "labels": torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), longest, dtype=torch.long),
    }
    packed = any("position_ids" in e for e in examples)
    if packed:
        out["position_ids"] = torch.zeros(len(examples), longest, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        out["input_ids"][row, :n], out["labels"][row, :n], out["attention_mask"][row, :n] = (
            e["input_ids"],
            e["labels"],
            1,
        )
        if packed:
            out["position_ids"][row, :n] = e.get("position_ids", torch.arange(n))
    return out


def eval_batches(dataset, batch_size: int, limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The dataset in order, ``batch_size`` rows at a time, the last batch possibly smaller
    (so any non-empty dataset evaluates); at most ``limit`` batches."""
    starts = range(0, len(dataset), batch_size)
    for s in starts if limit is None else starts[:limit]:
        yield collate([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])


def batches(dataset, batch_size: int, seed: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches forever (a new permutation each epoch), from batch ``start`` on.

    Incomplete final batches of an epoch are dropped, so every batch has batch_size rows.
    """
    per_epoch = len(dataset) // batch_size
    if per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} examples is smaller than one batch of {batch_size}")
    step = start
    while True:
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        yield collate([dataset[int(j)] for j in order[i * batch_size : (i + 1) * batch_size]])
        step += 1
