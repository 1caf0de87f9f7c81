"""Ask a trained model: greedy answers, from a model in memory or a saved checkpoint, and a
LoRA adapter merged into a plain saved model (for inference engines: vLLM, llama.cpp, ...).

    python launch/generate.py runs/colors-seco --prompt "What colour is the sky?"
    python launch/generate.py runs/colors-seco --merge runs/colors-merged   # adapter + base -> one model
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ds_chunk.bnb import no_cpu_inference_packing
from ds_chunk.chunking import IGNORE_INDEX


def greedy(model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> torch.Tensor:
    """The tokens ``model`` appends to ``prompt_ids`` [1, P] by greedy decoding [N], in eval mode
    for the call (dropout off; bitsandbytes kept out of its CPU inference layout, which would
    corrupt later gradients), its mode restored after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_cpu_inference_packing(model):
            out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=eos)  # fmt: skip
    finally:
        model.train(training)
    return out[0, prompt_ids.shape[1] :]


def ask(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy answer to ``prompt``, through the chat template where the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    new = greedy(model, ids.to(device), max_new_tokens, tokenizer.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def held_out_answers(model: nn.Module, tokenizer, examples, n: int = 3) -> list[tuple[str, str, str]]:
    """(end of the prompt, expected answer, the model's greedy answer) for up to ``n`` held-out
    instruction examples (``ds_chunk.data`` examples: the prompt is what precedes the first
    supervised label; packed text has none and is skipped)."""
    out = []
    device = next(model.parameters()).device
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        start = int((labels != IGNORE_INDEX).nonzero()[0]) if (labels != IGNORE_INDEX).any() else 0
        if start == 0:
            continue
        answer = ids[start:][labels[start:] != IGNORE_INDEX]
        new = greedy(model, ids[None, :start].to(device), len(answer) + 8, tokenizer.eos_token_id)
        decode = lambda t: tokenizer.decode(t, skip_special_tokens=True).strip()  # noqa: E731
        out.append((decode(ids[max(0, start - 12) : start]), decode(answer), decode(new)))
        if len(out) == n:
            break
    return out


def load_checkpoint(step_dir: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """(model, tokenizer) of a ``ds_chunk.checkpoint`` step folder: a LoRA adapter on the base
    its ``adapter_config.json`` names, or a whole model; the tokenizer from the base."""
    from transformers import AutoModelForCausalLM

    from ds_chunk.known_models import resolve
    from ds_chunk.model import load_tokenizer

    adapter = os.path.join(step_dir, "adapter")
    if not os.path.isdir(adapter):
        path = os.path.join(step_dir, "model")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), load_tokenizer(path)
    from peft import PeftModel

    from ds_chunk.model import scaled_config

    with open(os.path.join(adapter, "adapter_config.json")) as f:
        base_path = resolve(json.load(f)["base_model_name_or_path"])
    tokenizer = load_tokenizer(base_path)
    # the base as trained: with the run's model.rope_scaling (a context extension), which
    # the adapter cannot carry; the checkpoint's state.json keeps it
    with open(os.path.join(step_dir, "state.json")) as f:
        rope = json.load(f).get("setup", {}).get("model.rope_scaling")
    base = AutoModelForCausalLM.from_pretrained(base_path, **scaled_config(base_path, rope), dtype=dtype)
    return PeftModel.from_pretrained(base, adapter), tokenizer


def merge(model: nn.Module, tokenizer, out_dir: str) -> str:
    """The adapter folded into the base weights (peft's ``merge_and_unload``), saved with the
    tokenizer as a plain HF model folder, written whole and then renamed into place."""
    import shutil

    plain = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
