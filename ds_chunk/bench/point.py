"""One benchmark point (a method at one sequence length) and the model and training step
it measures (built inside the worker process)."""

from __future__ import annotations

import dataclasses
import re
import tempfile

# The CPU model of the SeCO issue: Llama, 4 layers, hidden 256, vocab 32000. 4 query heads
# over 4 KV heads (head_dim 64) and intermediate 688 (~ 8/3 x 256, Llama's MLP ratio).
DEFAULT_MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=65536,
    tie_word_embeddings=False,
)
LORA_TARGETS = ("q_proj", "v_proj")


@dataclasses.dataclass(frozen=True)
class Point:
    """One benchmark measurement: a method at one sequence length."""

    method: str  # plain | ckpt | seco | spaco@<rate>
    seq_len: int
    chunk_size: int = 512
    keep_chunks: int = 0  # seco: chunks joined to the last one and run once with autograd
    memory_budget_gb: float | None = None  # seco: chunkwise.memory_budget_gb (the planner picks the settings)
    loss_chunk_size: int | str | None = "auto"  # "auto": ds_chunk's default; None: the whole chunk
    report_loss: str = "estimate"  # spaco: estimate | exact | off
    kv_offload: bool = False
    weights: str = "full"  # full | qv (only q_proj / v_proj trained, as LoRA would) | lora | qlora (NF4 + LoRA)
    model: str | None = None  # None: DEFAULT_MODEL; a config.json (random init); a local path or hub id
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    repeats: int = 3
    threads: int = 1
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = LORA_TARGETS
    seed: int = 0
    mem_limit_gb: float | None = None

    def __post_init__(self):  # read back from JSON, a list: keep the point hashable
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    @property
    def chunked(self) -> bool:
        return self.method == "seco" or self.method.startswith("spaco@")

    @property
    def label(self) -> str:
        """Method name with the settings that change it, e.g. ``spaco@0.125[512,no-loss]``."""
        name = self.method
        if self.chunked:
            opts = [f"budget {self.memory_budget_gb:g}G" if self.memory_budget_gb else str(self.chunk_size)]
            if self.keep_chunks:
                opts.append(f"keep{self.keep_chunks}")
            if self.loss_chunk_size != "auto":
                opts.append(f"loss{self.loss_chunk_size or 'whole'}")
            if self.method.startswith("spaco@") and self.report_loss != "estimate":
                opts.append(f"{self.report_loss}-loss")
            if self.kv_offload:
                opts.append("offload")
            name += "[" + ",".join(opts) + "]"
        return name + ("" if self.weights == "full" else f" +{self.weights}")


def parse_method(method: str) -> float | None:
    """The SpaCO rate of ``spaco@<rate>`` (None for the other methods); raises on unknown names."""
    if method in ("plain", "ckpt", "seco"):
        return None
    m = re.fullmatch(r"spaco@([0-9.]+(?:e-?\d+)?)", method)
    if m is None or not 0.0 < float(m.group(1)) <= 1.0:
        raise ValueError(f"unknown method {method!r}: expected plain, ckpt, seco or spaco@<rate in (0, 1]>")
    return float(m.group(1))


# ---- model and step (run inside the worker process) ----------------------------------


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _base_model(point: Point):
    """The full-precision model: the default config, a config.json (random init), or pretrained."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    dtype = _torch_dtype(point.dtype)
    torch.manual_seed(point.seed)
    if point.model is None:
        config = LlamaConfig(**DEFAULT_MODEL)
    elif point.model.endswith(".json"):
        config = AutoConfig.from_pretrained(point.model)
    else:
        from ds_chunk.known_models import resolve

        return AutoModelForCausalLM.from_pretrained(resolve(point.model), dtype=dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _lora(point: Point, model):
    """LoRA on ``point.lora_targets`` (r, alpha = 2r, dropout 0)."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=point.lora_rank, lora_alpha=2 * point.lora_rank, lora_dropout=0.0,
                      target_modules=list(point.lora_targets))  # fmt: skip
    return get_peft_model(model, lora)


def _qlora_model(point: Point):
    """NF4 base weights (bitsandbytes) + LoRA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = _torch_dtype(point.dtype)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        from ds_chunk.known_models import resolve

        source = None if point.model is None else resolve(point.model)
        if point.model is None or point.model.endswith(".json"):
            _base_model(point).save_pretrained(tmp)  # quantize our random-init model via a save
            source = tmp
        device_map = {"": 0} if point.device == "cuda" else None
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=quant, dtype=dtype, device_map=device_map
        )
    return _lora(point, model)


def build_model(point: Point):
    """The model of ``point`` on its device, in train mode (gradient checkpointing for ``ckpt``)."""
    model = _qlora_model(point) if point.weights == "qlora" else _base_model(point).to(point.device)
    if point.weights == "lora":
        model = _lora(point, model)
    if point.weights == "qv":  # LoRA-like: the rest is frozen (no weight gradients, fewer saved inputs)
        for name, p in model.named_parameters():
            p.requires_grad_(any(t in name for t in LORA_TARGETS))
    if point.method == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # plain/ckpt: no KV cache copies in a training forward
    return model.train()


def make_step(point: Point, model):
    """A function running one forward + backward of ``point``; returns the scheduler's
    ``ChunkResult`` (None for plain and ckpt)."""
    import torch

    g = torch.Generator().manual_seed(point.seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (point.batch, point.seq_len), generator=g).to(point.device)
    if not point.chunked:

        def step() -> None:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

        return step
    from ds_chunk.scheduler import ChunkScheduler

    config = {"chunk_size": point.chunk_size, "kv_offload": point.kv_offload, "keep_chunks": point.keep_chunks}
    if point.memory_budget_gb is not None:
        config["memory_budget_gb"] = point.memory_budget_gb
    if point.loss_chunk_size != "auto":  # absent: ds_chunk picks it
        config["loss_chunk_size"] = point.loss_chunk_size
    rate = parse_method(point.method)
    if rate is not None:
        config["sparse"] = {"rate": rate, "report_loss": point.report_loss}
    scheduler = ChunkScheduler(config)

    def step():
        return scheduler.backward(model, ids)

    step.picked = lambda: picked(scheduler, model, ids)
    return step


def picked(scheduler, model, ids) -> dict:
    """What a memory budget picked for ``ids`` and the planner's step peak for it (MiB)."""
    from ds_chunk.budget import planned_setup
    from ds_chunk.plan import MIB, estimate

    config = scheduler.settings(model, ids)
    shape, setup = planned_setup(model, ids, config)
    chosen = dict(chunk_size=config.chunk_size, keep_chunks=config.keep_chunks, loss_chunk_size=config.loss_chunk_size)
    predicted = estimate(shape, dataclasses.replace(setup, **chosen)).step_bytes / MIB
    return {**chosen, "picked": f"chunk {config.chunk_size} keep {config.keep_chunks} loss {config.loss_chunk_size}",
            "predicted_mib": round(predicted, 1)}  # fmt: skip
