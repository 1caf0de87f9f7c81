"""Save a tiny, randomly initialised Llama and a word-level tokenizer for it, offline.

    python launch/make_tiny_model.py runs/tiny-llama --data launch/data/colors.jsonl
    python launch/train.py --model runs/tiny-llama --data launch/data/colors.jsonl --seq-len 128 --chunk-size 32

The tokenizer's vocabulary is every whitespace-separated word of the JSONL records (text,
prompts, answers, chat turns), plus <pad>, <unk>, <eos> and the chat template's role words;
both are saved with ``save_pretrained``, so ``--model <dir>`` loads them like a hub model.
"""

from __future__ import annotations

import argparse
import json
import os

SPECIAL = ["<pad>", "<unk>", "<eos>", "user:", "assistant:"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}assistant: "


def words_of(path: str) -> list[str]:
    """Every word of the records' text fields, in first-seen order."""
    seen: dict[str, None] = {}
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            turns = [m.get("content", "") for m in rec.get("messages", [])]
            for text in [rec.get(k, "") for k in ("text", "prompt", "response", "completion")] + turns:
                seen.update(dict.fromkeys(str(text).split()))
    return list(seen)


def make_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, seed: int = 0, max_positions: int = 4096):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save(out_dir: str, data: str, seed: int = 0) -> str:
    """Write the model and tokenizer to ``out_dir``; returns it."""
    tokenizer = make_tokenizer(words_of(data))
    make_model(len(tokenizer), seed).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument(
        "--data", default=os.path.join(here, "data", "colors.jsonl"), help="JSONL whose words form the vocab"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"saved a tiny Llama and its tokenizer to {save(args.out_dir, args.data, args.seed)}")


if __name__ == "__main__":
    main()
