"""Build the model: HF causal LM, optional bitsandbytes 4/8-bit base weights, peft LoRA.

A recipe lives in the top-level ``"model"`` block of the same DeepSpeed JSON config
that carries ``"chunkwise"`` (DeepSpeed ignores unknown top-level keys), e.g.::

    "model": {"name_or_path": "meta-llama/Meta-Llama-3-8B", "dtype": "bfloat16",
              "quantization": {"bits": 4}, "lora": {"r": 8, "alpha": 16}}

``name_or_path`` may be a hub id or a local directory; ``config`` (a transformers
config dict with ``model_type``) builds a randomly initialised model instead, offline.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from ds_chunk.config import ConfigError, _bool, _check_keys, _choice, _int, _reject_auto
from ds_chunk.known_models import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _dtype(key: str, value: Any) -> str:
    return _choice(key, value, tuple(DTYPES))


def _float(key: str, value: Any, lo: float, hi: float) -> float:
    _reject_auto(key, value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(key, value, f"a number in [{lo}, {hi}]")
    return float(value)


@dataclass(frozen=True)
class QuantConfig:
    """bitsandbytes quantization of the base weights (``model.quantization``)."""

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    quant_storage: str | None = None  # = compute dtype for ZeRO-3 (peft docs)

    @classmethod
    def from_dict(cls, b: dict, prefix: str = "model.quantization") -> QuantConfig:
        _check_keys(prefix, b, cls)
        bits = b.get("bits", 4)
        if bits not in (4, 8) or isinstance(bits, bool):
            raise ConfigError(f"{prefix}.bits", bits, "4 or 8")
        storage = b.get("quant_storage")
        return cls(
            bits=bits,
            quant_type=_choice(f"{prefix}.quant_type", b.get("quant_type", "nf4"), ("nf4", "fp4")),
            double_quant=_bool(f"{prefix}.double_quant", b.get("double_quant", True)),
            compute_dtype=_dtype(f"{prefix}.compute_dtype", b.get("compute_dtype", "bfloat16")),
            quant_storage=None if storage is None else _dtype(f"{prefix}.quant_storage", storage),
        )

    def to_hf(self):
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.compute_dtype],
            bnb_4bit_quant_storage=DTYPES[self.quant_storage] if self.quant_storage else torch.uint8,
        )


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA (``model.lora``). target_modules "all-linear": every linear but the LM head."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"

    @classmethod
    def from_dict(cls, b: dict, prefix: str = "model.lora") -> LoraSettings:
        _check_keys(prefix, b, cls)
        targets = b.get("target_modules", "all-linear")
        _reject_auto(f"{prefix}.target_modules", targets)
        if targets != "all-linear":
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
                raise ConfigError(f"{prefix}.target_modules", targets, '"all-linear" or a list of module names')
            targets = tuple(targets)
        return cls(
            r=_int(f"{prefix}.r", b.get("r", 8), 1),
            alpha=_int(f"{prefix}.alpha", b.get("alpha", 16), 1),
            dropout=_float(f"{prefix}.dropout", b.get("dropout", 0.0), 0.0, 1.0),
            target_modules=targets,
        )


@dataclass(frozen=True)
class ModelConfig:
    """The top-level ``model`` block: what to load and how to make it trainable."""

    name_or_path: str | None = None
    config: dict | None = None
    dtype: str = "bfloat16"
    quantization: QuantConfig | None = None
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    rope_scaling: dict | None = None  # e.g. {"rope_type": "linear", "factor": 4}: context extension
    seed: int = 0

    @classmethod
    def from_dict(cls, b: dict, prefix: str = "model") -> ModelConfig:
        _check_keys(prefix, b, cls)
        name, config = b.get("name_or_path"), b.get("config")
        if (name is None) == (config is None):
            raise ConfigError(f"{prefix}.name_or_path/config", {"name_or_path": name, "config": config}, "exactly one")
        if config is not None and (not isinstance(config, dict) or "model_type" not in config):
            raise ConfigError(f"{prefix}.config", config, 'a transformers config dict with "model_type"')
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{prefix}.name_or_path", name, "a hub id or a local path")
        quant, lora = b.get("quantization"), b.get("lora")
        return cls(
            name_or_path=name,
            config=config,
            dtype=_dtype(f"{prefix}.dtype", b.get("dtype", "bfloat16")),
            quantization=None if quant is None else QuantConfig.from_dict(quant, f"{prefix}.quantization"),
            lora=None if lora is None else LoraSettings.from_dict(lora, f"{prefix}.lora"),
            gradient_checkpointing=_bool(f"{prefix}.gradient_checkpointing", b.get("gradient_checkpointing", False)),
            attn_implementation=_choice(
                f"{prefix}.attn_implementation",
                b.get("attn_implementation", "sdpa"),
                ("sdpa", "eager", "flash_attention_2"),
            ),
            rope_scaling=_rope_scaling(f"{prefix}.rope_scaling", b.get("rope_scaling")),
            seed=_int(f"{prefix}.seed", b.get("seed", 0), 0),
        )

    def replace(self, **changes) -> ModelConfig:
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3")


def _rope_scaling(key: str, value: Any) -> dict | None:
    """``model.rope_scaling``: transformers' ``rope_parameters`` to extend the context, merged
    over the model's own (its rope_theta kept); "type" is accepted for "rope_type" as in
    transformers 4 configs. Keys other than these two go to transformers, which checks them."""
    if value is None:
        return None
    _reject_auto(key, value)
    if not isinstance(value, dict):
        raise ConfigError(key, value, 'an object such as {"rope_type": "linear", "factor": 4}')
    rope = {("rope_type" if k == "type" else k): v for k, v in value.items()}
    _choice(f"{key}.rope_type", rope.get("rope_type"), ROPE_TYPES)
    factor = rope.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ConfigError(f"{key}.factor", factor, "a number >= 1")
    return rope


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be asked (offline mode, or no route to it within 5 s), or None:
    transformers would otherwise retry for about a minute before its error."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # through a proxy: let the hub client try
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e.strerror or e})"
    return None


def _check_source(name: str, what: str, file: str) -> None:
    """A name that is neither a local folder nor loadable is one line, at once."""
    if os.path.isdir(name):
        return
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    head = name.split("/")[0]
    local = name.startswith((".", "/", "~")) or (head != name and os.path.isdir(head))  # runs/x: a path
    try:
        cached = not local and isinstance(try_to_load_from_cache(name, file), str)
    except HFValidationError:  # not a hub id either
        local, cached = True, False
    if local:
        raise FileNotFoundError(f"{what} = {name!r}: no such folder")
    why = None if cached else _hub_unreachable()
    if why:
        raise FileNotFoundError(f"{what} = {name!r}: not a local folder, not in the Hugging Face cache, and {why}")


@contextlib.contextmanager
def _not_found(name: str, what: str, file: str = "config.json"):
    """transformers' errors for a missing model (a long hub message, or a minute of retries
    offline) as one line."""
    _check_source(resolve(name), what, file)
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(
            f"{what} = {name!r}: not a local model folder, and not loadable from the hub ({first})"
        ) from None


def load_tokenizer(name_or_path: str):
    """The model's tokenizer (``AutoTokenizer``); a missing one is one clear error."""
    from transformers import AutoTokenizer

    what = "--model / model.name_or_path"
    name_or_path = resolve(name_or_path)
    if os.path.isdir(name_or_path) and not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{what} = {name_or_path!r}: the folder has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): "
            "save the tokenizer there too (tokenizer.save_pretrained(folder))"
        )
    with _not_found(name_or_path, what, "tokenizer_config.json"):
        try:
            return AutoTokenizer.from_pretrained(name_or_path)
        except ValueError as e:  # e.g. a slow tokenizer that needs sentencepiece: five lines
            first = str(e).strip().splitlines()[0]
            raise FileNotFoundError(f"{what} = {name_or_path!r}: its tokenizer does not load ({first})") from None


def _load_kwargs(cfg: ModelConfig) -> dict:
    return {"dtype": DTYPES[cfg.dtype], "attn_implementation": cfg.attn_implementation}


def scaled(config, rope: dict | None):
    """``config`` with ``model.rope_scaling`` merged over its RoPE parameters (rope_theta kept)."""
    if rope is not None:
        config.rope_parameters = {**(getattr(config, "rope_parameters", None) or {}), **rope}
    return config


def scaled_config(path: str, rope: dict | None) -> dict:
    """``from_pretrained`` keyword arguments loading ``path`` with ``model.rope_scaling``: its
    config merged with the scaling, or none (its own config) when there is no scaling."""
    if rope is None:
        return {}
    from transformers import AutoConfig

    return {"config": scaled(AutoConfig.from_pretrained(path), rope)}


def build_base(cfg: ModelConfig) -> nn.Module:
    """The seeded, randomly initialised model of a ``config`` recipe, before quantization and
    LoRA: what ``build_model`` starts from (saved next to adapters so they can be loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.config is None:
        raise ValueError("build_base is for models built from a config; this recipe loads name_or_path")
    torch.manual_seed(cfg.seed)
    config = scaled(AutoConfig.for_model(**cfg.config), cfg.rope_scaling)
    return AutoModelForCausalLM.from_config(config, **_load_kwargs(cfg))


def _this_gpu() -> dict:
    """bitsandbytes quantizes onto the current CUDA device: make it this rank's (LOCAL_RANK) and
    place the weights there, or every rank's would land on GPU 0. Nothing off CUDA."""
    if not torch.cuda.is_available():
        return {}
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(rank)
    return {"device_map": {"": rank}}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Load (or build from config) the causal LM, quantize, prepare for k-bit training, add LoRA."""
    from transformers import AutoModelForCausalLM

    kwargs = _load_kwargs(cfg)
    quant = {} if cfg.quantization is None else {"quantization_config": cfg.quantization.to_hf(), **_this_gpu()}
    if cfg.config is not None:
        model = build_base(cfg)
        if quant:  # bitsandbytes quantizes on load: go through a checkpoint
            with tempfile.TemporaryDirectory() as tmp:
                model.save_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs, **quant)
    else:
        with _not_found(cfg.name_or_path, "model.name_or_path"):
            path = resolve(cfg.name_or_path)
            model = AutoModelForCausalLM.from_pretrained(
                path, **scaled_config(path, cfg.rope_scaling), **kwargs, **quant
            )
    ckpt_kwargs = {"use_reentrant": False}  # reentrant checkpointing breaks ZeRO-2 and our replay
    if cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora)
    model.train()  # from_pretrained leaves eval mode; dropout and bitsandbytes need train mode
    return model


def add_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)
