"""Ask a checkpoint of launch/train.py, or merge its LoRA adapter into a plain model.

    python launch/generate.py runs/colors-seco --prompt "What colour is the sky?"
    python launch/generate.py runs/colors-seco/checkpoints/step_30 --merge runs/colors-merged

CHECKPOINT: a step_N folder, or a run's folder (its newest checkpoint). Greedy answers,
through the model's chat template where it has one. ``--merge OUT`` folds the adapter into
the base weights (peft's merge_and_unload) and saves a plain HF model with its tokenizer,
for inference engines.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ds_chunk import checkpoint  # noqa: E402
from ds_chunk.generate import ask, load_checkpoint, merge  # noqa: E402


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a step_N folder, or a run's folder (its newest checkpoint)")
    p.add_argument("--prompt", action="append", default=[], help="a question (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--merge", metavar="OUT", help="save the adapter merged into the base as a plain model here")
    args = p.parse_args(argv)
    if not args.prompt and not args.merge:
        p.error("give --prompt, --merge, or both")
    model, tokenizer = load_checkpoint(checkpoint.find(args.checkpoint))
    answers = [ask(model, tokenizer, q, args.max_new_tokens) for q in args.prompt]
    for q, a in zip(args.prompt, answers):
        print(f"> {q}\n{a}")
    if args.merge:
        print(f"merged model: {merge(model, tokenizer, args.merge)}")
    return answers


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
