"""Chunk-wise (SeCO / SpaCO) fine-tuning under DeepSpeed or accelerate.

    python launch/train.py                      # offline default: tiny Llama, recall task
    python launch/train.py --truncate           # same, gradient cut at chunk boundaries
    deepspeed --num_gpus 1 launch/train.py --deepspeed_config ds_configs/qlora_zero1_offload_24gb.json \
        --data train.jsonl --seq-len 16384
    accelerate launch --config_file launch/accelerate_ds.yaml launch/train.py

The DeepSpeed config carries everything: DeepSpeed's own keys, the ``chunkwise`` block
(chunk size, SpaCO) and the ``model`` block (what to load, 4/8-bit, LoRA); flags below
override parts of it. Each optimizer step runs every chunk's backward and then one
``engine.step()`` (see ds_chunk/engine.py).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ds_chunk import checkpoint, ops, run_folder  # noqa: E402
from ds_chunk.config import OUR_BLOCKS, ChunkwiseConfig, ConfigError  # noqa: E402
from ds_chunk.data import (  # noqa: E402
    PACKING,
    NoSupervisedTokens,
    PasskeyTask,
    RecallTask,
    StdlibBytes,
    TextPasskey,
    TokenizedDataset,
    batches,
    eval_batches,
    held_out_rows,
    load_records,
    split_records,
)
from ds_chunk.interrupt import Interrupted, StopOnSignal  # noqa: E402
from ds_chunk.launch_config import data_parallel_size, load_config, world_size  # noqa: E402
from ds_chunk.model import load_tokenizer  # noqa: E402
from ds_chunk.run_folder import default_output_dir, method_name, resume_point, save_base_model  # noqa: E402
from ds_chunk.tracking import RunLog, tracker_names, train_step  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "ds_configs")
# each built-in task's default DeepSpeed config (model, batch, lr schedule, chunk size),
# sequence length and optimizer steps; --data runs use recall's config and 1024 tokens
TASKS = {
    "recall": ("recall_cpu.json", 1024, 250),
    "passkey": ("passkey_cpu.json", 512, 300),
    "stdlib": ("stdlib_bytes_cpu.json", 2048, 300),
    "text-passkey": ("text_passkey_smollm2_cpu.json", 1024, 150),
}
TEXT_PASSKEY_HELD_OUT = 16  # held-out prompts of --task text-passkey
MIN_EVAL_TOKENS = 100  # fewer supervised held-out tokens than this: the eval loss is said to be noise
DEFAULT_STEPS = TASKS["recall"][2]  # --data runs without --max-steps / --epochs
PACKED_AS = {"documents": "separate documents", "wrapped": "one stream, attending across texts"}


def _number(kind, lo, hi=None, open_hi=False):
    """An argparse type: a number of ``kind`` in [lo, hi] (or [lo, hi) with open_hi)."""
    hi_text = "" if hi is None else f" and {'<' if open_hi else '<='} {hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and value >= lo and (hi is None or (value < hi if open_hi else value <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"{text}: expected {'an integer' if kind is int else 'a number'} "
                                             f">= {lo}{hi_text}")  # fmt: skip
        return value

    return parse


def _rope(text: str) -> dict | None:
    """``--rope-scaling linear:4`` as model.rope_scaling; ``none``: off."""
    if text == "none":
        return None
    kind, _, factor = text.partition(":")
    try:
        return {"rope_type": kind, "factor": float(factor)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: expected TYPE:FACTOR, e.g. linear:4, or none") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--deepspeed_config",
        "--config",
        help="DeepSpeed JSON config (default: the accelerate yaml's file, else the task's: "
        "ds_configs/recall_cpu.json, passkey_cpu.json, stdlib_bytes_cpu.json)",
    )
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    m = p.add_argument_group("model (overrides the config's model block)")
    m.add_argument("--model", help="hub id or local path")
    m.add_argument("--quant", choices=["none", "4bit", "8bit"], help="bitsandbytes base weights")
    m.add_argument("--lora-r", type=_number(int, 0), help="add LoRA of this rank (0: none)")
    m.add_argument("--lora-alpha", type=_number(int, 1))
    m.add_argument("--lora-dropout", type=_number(float, 0.0, 1.0))
    m.add_argument("--lora-targets", help='comma-separated module names, or "all-linear"')
    m.add_argument("--rope-scaling", type=_rope, metavar="TYPE:FACTOR", default=False,
                   help="extend the context: model.rope_scaling (e.g. linear:4; none: as trained)")  # fmt: skip
    d = p.add_argument_group("data")
    d.add_argument("--data", help="JSONL file or hf:<dataset>[:split]; default: a synthetic task")
    d.add_argument("--eval-data", help="held-out JSONL / hf: source (default: --eval-fraction of --data)")
    d.add_argument("--eval-fraction", type=_number(float, 0.0, 1.0, open_hi=True), default=0.02,
                   help="records of --data held out for evaluation (at least 1; 0: none)")  # fmt: skip
    d.add_argument("--packing", choices=PACKING, help="--data texts in --seq-len blocks: "
                   "documents (default): each text attends only to itself (position ids restart at each); wrapped: "
                   "to the texts before it in the block, as TRL's packing_strategy='wrapped'")  # fmt: skip
    d.add_argument("--task", choices=list(TASKS), default="recall", help="built-in data (no --data): the "
                   "synthetic recall or passkey task, stdlib: bytes of Python's standard library, or text-passkey: "
                   "a pass key in words for a pretrained model (default SmolLM2-135M, RoPE x4)")  # fmt: skip
    d.add_argument("--seq-len", type=_number(int, 2), help="tokens per sequence (pack/truncate; default 1024, "
                   "passkey 512, stdlib 2048)")  # fmt: skip
    c = p.add_argument_group("chunking (overrides the config's chunkwise block)")
    c.add_argument("--chunk-size", type=int, help="chunkwise.chunk_size")
    c.add_argument("--sparse-rate", type=float, help="SpaCO: replay each chunk with this probability")
    c.add_argument("--sampler", choices=["bernoulli", "gradient", "paper"], help="SpaCO: chunkwise.sparse.sampler")
    c.add_argument("--always-replay", choices=["supervised"], help="SpaCO: chunks with a supervised token replayed "
                   "always (chunkwise.sparse.always_replay)")  # fmt: skip
    c.add_argument("--truncate", action="store_true", help="baseline: no gradient across chunk boundaries")
    c.add_argument("--kv-offload", action="store_true", help="KV cache, its gradient and saved tensors in host memory")
    c.add_argument("--keep-chunks", type=_number(int, 0), help="chunkwise.keep_chunks: chunks before the last run "
                   "once with it, with autograd (faster, more memory)")  # fmt: skip
    c.add_argument("--memory-budget-gb", type=_number(float, 0.0), help="chunkwise.memory_budget_gb: the memory a "
                   "step may add; the planner picks --chunk-size, --keep-chunks and the loss chunk")  # fmt: skip
    o = p.add_argument_group("optimisation (overrides the config's DeepSpeed keys)")
    o.add_argument("--lr", type=_number(float, 0.0), help="optimizer.params.lr")
    o.add_argument("--weight-decay", type=_number(float, 0.0), help="optimizer.params.weight_decay")
    o.add_argument("--max-grad-norm", type=_number(float, 0.0), help="gradient_clipping (0: off)")
    o.add_argument("--micro-batch-size", type=_number(int, 1), help="train_micro_batch_size_per_gpu")
    o.add_argument("--gradient-accumulation-steps", type=_number(int, 1), help="gradient_accumulation_steps")
    o.add_argument(
        "--sequence-parallel-size",
        type=_number(int, 1),
        help="sequence_parallel_size: the ranks each sequence is split over (Ulysses; the others train on other rows)",
    )
    o.add_argument("--lr-scheduler", help="a transformers schedule (linear, cosine, constant_with_warmup, ...), "
                   "replacing the config's scheduler block")  # fmt: skip
    o.add_argument("--warmup-steps", type=_number(int, 0), help="with --lr-scheduler")
    o.add_argument("--warmup-ratio", type=_number(float, 0.0, 1.0), help="with --lr-scheduler: of all steps")
    o.add_argument("--max-steps", type=_number(int, 1), help="optimizer steps (default: 250; passkey, stdlib: 300)")
    o.add_argument("--epochs", type=_number(float, 0.0), help="passes over the data, unless --max-steps is given")
    o.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-every", type=_number(int, 1), default=50)
    e.add_argument("--eval-batch-size", type=_number(int, 1), help="default: the micro batch size")
    e.add_argument("--eval-batches", type=_number(int, 1), help="evaluate at most this many batches (default: all)")
    e.add_argument("--eval-only", action="store_true", help="evaluate the model (with --resume-from: that "
                   "checkpoint) on the held-out set once, log it as the step's evaluation, and stop")  # fmt: skip
    s = p.add_argument_group("output")
    s.add_argument("--output-dir", help="default: runs/<task or data>-<method>")
    s.add_argument("--save-every", type=_number(int, 0), default=500,
                   help="checkpoint every N steps (default 500; 0: only at the end and on a signal)")  # fmt: skip
    s.add_argument("--save-final", action=argparse.BooleanOptionalAction, default=True, help="checkpoint at the end")
    s.add_argument("--save-total-limit", type=_number(int, 0), default=3, help="keep the newest N checkpoints "
                   "(default 3; 0: all)")  # fmt: skip
    s.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                   help="continue from the newest checkpoint in --output-dir; 'auto': if there is one")  # fmt: skip
    s.add_argument("--resume-from", help="continue from this checkpoint (a step_N folder or a run's folder)")
    s.add_argument("--overwrite-output-dir", action="store_true", help="start over, deleting earlier checkpoints")
    s.add_argument("--ddp-timeout", type=_number(float, 1.0), default=1800, help="seconds a rank waits in a "
                   "collective before the run fails instead of hanging (default 1800, as HF)")  # fmt: skip
    s.add_argument("--report-to", nargs="+", default=["none"], help="trackers: tensorboard, wandb, ..., all, none")
    s.add_argument("--tensorboard", action="store_true", help="same as --report-to tensorboard")
    args = p.parse_args(argv)
    task_config, task_len, task_steps = TASKS["recall" if args.data else args.task]
    default_config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(CONFIGS, task_config))
    args.deepspeed_config = args.deepspeed_config or default_config
    args.seq_len = args.seq_len or task_len
    args.default_steps = DEFAULT_STEPS if args.data else task_steps
    if args.tensorboard:
        args.report_to = [*(r for r in args.report_to if r != "none"), "tensorboard"]
    if (args.warmup_steps is not None or args.warmup_ratio is not None) and not args.lr_scheduler:
        p.error("--warmup-steps / --warmup-ratio need --lr-scheduler (e.g. linear, cosine, constant_with_warmup)")
    if args.resume and args.resume_from:
        p.error("give --resume or --resume-from, not both")
    if args.packing and not args.data:
        p.error("--packing packs the texts of --data; the built-in tasks have one sequence per row")
    args.packing = args.packing or "documents"
    return args


def lr_schedule(args: argparse.Namespace, cfg: dict, total_steps: int):
    """``--lr-scheduler``: a callable DeepSpeed calls with its optimizer, giving transformers'
    schedule of that name (the one HF Trainer uses), stepped once per optimizer step."""
    if not args.lr_scheduler:
        return None
    from transformers import SchedulerType, get_scheduler

    names = [t.value for t in SchedulerType]
    if args.lr_scheduler not in names:
        raise ValueError(f"--lr-scheduler {args.lr_scheduler}: expected one of {', '.join(names)}")
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil((args.warmup_ratio or 0) * total_steps)
    return lambda optimizer: get_scheduler(args.lr_scheduler, optimizer, warmup, total_steps)


# ---- model, engine, data -----------------------------------------------------------------


def build_engine(cfg: dict, schedule=None, timeout_s: float = 1800):
    """ds_chunk.initialize under the deepspeed launcher / plain python; accelerate.prepare under
    accelerate. A collective that waits longer than ``timeout_s`` fails instead of hanging."""
    import ds_chunk
    from ds_chunk.model import ModelConfig, build_model

    model = build_model(ModelConfig.from_dict(cfg["model"]))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return ds_chunk.initialize(model=model, config=cfg, lr_scheduler=schedule, dist_timeout=timeout_s)[0]
    return build_engine_accelerate(model, cfg, schedule, timeout_s)


def build_engine_accelerate(model, cfg: dict, schedule=None, timeout_s: float = 1800):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DummyOptim, DummyScheduler, InitProcessGroupKwargs

    from ds_chunk.engine import ChunkedLM, ChunkwiseEngine
    from ds_chunk.ops import announce_op_builds

    with announce_op_builds():
        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))])
        plugin = accelerator.state.deepspeed_plugin
        plugin.deepspeed_config.clear()  # accelerate read the same file; use our resolved copy
        plugin.deepspeed_config.update({k: v for k, v in cfg.items() if k not in OUR_BLOCKS})
        module = ChunkedLM(model)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = DummyOptim(params) if "optimizer" in cfg else torch.optim.AdamW(params, lr=1e-4)
        objects = [module, optimizer]
        if schedule is not None:
            dummy = isinstance(optimizer, DummyOptim)
            objects.append(DummyScheduler(optimizer, lr_scheduler_callable=schedule) if dummy else schedule(optimizer))
        elif "scheduler" in cfg:
            objects.append(DummyScheduler(optimizer))
        engine = accelerator.prepare(*objects)[0]  # the DeepSpeed engine itself
    return ChunkwiseEngine(engine, ChunkwiseConfig.from_ds_config(cfg))


def build_data(args: argparse.Namespace, cfg: dict):
    """(train, held-out or None): the synthetic task, or records tokenized with the model's tokenizer."""
    if args.data is None:
        if args.eval_data:
            raise ValueError("--eval-data needs --data (the synthetic tasks make their own held-out set)")
        if args.task == "text-passkey":  # in words, with the model's own tokenizer
            if "name_or_path" not in cfg["model"]:
                raise ValueError("--task text-passkey needs a pretrained model's tokenizer: pass --model")
            tokenizer = load_tokenizer(cfg["model"]["name_or_path"])
            held = args.eval_batches * (args.eval_batch_size or 1) if args.eval_batches else TEXT_PASSKEY_HELD_OUT
            return TextPasskey(100_000, args.seq_len, tokenizer, args.seed), TextPasskey(
                held, args.seq_len, tokenizer, args.seed + 1
            )
        vocab = cfg["model"].get("config", {}).get("vocab_size")
        if vocab is None:
            raise ValueError("the synthetic tasks need a model built from a config; pass --data for a real model")
        if args.task == "stdlib":  # held out: a fixed seeded tenth of the files
            if vocab < 256:
                raise ValueError(f"--task stdlib needs a model with vocab_size >= 256 (bytes), not {vocab}")
            return StdlibBytes(args.seq_len, "train"), StdlibBytes(args.seq_len, "eval")
        task = RecallTask if args.task == "recall" else PasskeyTask
        return task(100_000, args.seq_len, vocab, seed=args.seed), task(64, args.seq_len, vocab, seed=args.seed + 1)
    records, where = load_records(args.data)
    split_records(records, where)  # a bad record is named before anything is loaded
    if "name_or_path" not in cfg["model"]:
        raise ValueError("--data needs the model's tokenizer: pass --model (a hub id or local path)")
    if args.eval_data:
        held = []
        eval_records, eval_where = load_records(args.eval_data)
        split_records(eval_records, eval_where)
    else:
        held = held_out_rows(len(records), args.eval_fraction, args.seed)
        eval_records, eval_where = [records[i] for i in held], [where[i] for i in held]
        if args.eval_fraction > 0 and not held:
            warnings.warn(f"{args.data}: a single record, none held out: no evaluation", stacklevel=1)
    keep = sorted(set(range(len(records))) - set(held))
    tokenizer = load_tokenizer(cfg["model"]["name_or_path"])
    train_set = TokenizedDataset(
        [records[i] for i in keep], tokenizer, args.seq_len, [where[i] for i in keep], args.packing
    )
    if not eval_records:
        return train_set, None
    try:
        held_set = TokenizedDataset(eval_records, tokenizer, args.seq_len, eval_where, args.packing)
    except NoSupervisedTokens:
        if args.eval_data:
            raise
        msg = f"{args.data}: the held-out records have no supervised token within --seq-len {args.seq_len}"
        warnings.warn(msg + ": no evaluation (raise --eval-fraction, or pass --eval-data)", stacklevel=1)
        return train_set, None
    tokens = sum(int((e["labels"][1:] != -100).sum()) for e in held_set.examples)  # what evaluation counts
    if tokens < MIN_EVAL_TOKENS:
        warnings.warn(f"the held-out set has {tokens} supervised tokens: its loss is mostly noise (pass "
                      "--eval-data, or raise --eval-fraction)", stacklevel=1)  # fmt: skip
    return train_set, held_set


def total_steps(args: argparse.Namespace, cfg: dict, num_examples: int) -> int:
    """Optimizer steps: --max-steps, else --epochs over the data, else the default."""
    rows = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * data_parallel_size(cfg)
    per_epoch = num_examples // rows
    if per_epoch == 0:
        raise ValueError(
            f"the training set has {num_examples} examples, fewer than one step's {rows} rows (micro batch "
            f"{cfg['train_micro_batch_size_per_gpu']} x gradient accumulation {cfg['gradient_accumulation_steps']} "
            f"x {data_parallel_size(cfg)} data-parallel ranks): lower --micro-batch-size or add data"
        )
    if args.max_steps is not None:
        return args.max_steps
    return max(1, math.ceil(args.epochs * per_epoch)) if args.epochs else args.default_steps


# ---- the loop ----------------------------------------------------------------------------


def run_eval(engine, data, args, chunk_size: int) -> dict:
    from ds_chunk.evaluate import evaluate

    size = args.eval_batch_size or engine.train_micro_batch_size_per_gpu()
    with engine.autocast():
        return evaluate(engine.hf_model, eval_batches(data, size, args.eval_batches), chunk_size)


def begin(args: argparse.Namespace, engine, steps: int, resume: str | None, cfg: dict) -> tuple[int, RunLog]:
    """Load the checkpoint to resume (or clear an earlier run's), save an adapter's base, open
    the log: (the step to start after, the log)."""
    rank, world = engine.rank_and_world()
    start = 0
    if resume:
        start = checkpoint.load(engine, resume)["step"]
        if start >= steps and not args.eval_only:
            raise ValueError(f"{resume} is at step {start}, already at --max-steps {steps}: nothing to train")
    elif args.overwrite_output_dir:
        run_folder.clear(args.output_dir, rank)
    save_base_model(engine.hf_model, cfg["model"], args.output_dir, rank)  # an adapter's base, once
    run = {"resumed_from": resume, "world_size": world, "args": vars(args), "ds_config": cfg}
    log = RunLog(args.output_dir, steps, start, rank, run, tracker_names(args.report_to))
    rows, chunked = (
        engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps() * engine.data_parallel()[1],
        engine.chunkwise.enabled,
    )
    budget = engine.chunkwise.memory_budget_gb
    size = f"settings picked for a {budget:g} GiB step budget" if budget else f"chunk {engine.chunkwise.chunk_size}"
    logger = logging.getLogger("ds_chunk")  # the budget's pick, above the bar (one handler: runs in one process)
    for old in [h for h in logger.handlers if isinstance(h, _Lines)]:
        logger.removeHandler(old)
    logger.addHandler(_Lines(log))
    logger.setLevel(logging.INFO)
    log.message(
        f"ds_chunk: {method_name(engine.chunkwise)}"
        + (f", {size}" if chunked else " (no chunkwise block: chunking off)")
        + (
            f"; evaluation only, sequences of <= {args.seq_len} tokens"
            if args.eval_only
            else f"; {steps} steps of {rows} sequences of <= {args.seq_len} tokens"
        )
        + (f"; texts packed as {PACKED_AS[args.packing]} (--packing {args.packing})" if args.data else "")
        + f"; output {args.output_dir}"
        + (f"; resumed from {resume} at step {start}" if resume else "")
    )
    return start, log


class _Lines(logging.Handler):
    """ds_chunk's log lines (what a memory budget picked) written above the progress bar."""

    def __init__(self, log: RunLog):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log.message(record.getMessage())


def train(args: argparse.Namespace, engine, train_data, eval_data, steps: int, resume: str | None, cfg: dict):
    """The loop: one engine.train_batch per step; eval, checkpoint, log. Returns the records.
    On SIGINT / SIGTERM the step under way finishes, a checkpoint is written, Interrupted raised."""
    rank, world = engine.data_parallel()  # the ranks of a sequence-parallel group share their rows
    rows = engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps()
    chunk = engine.chunkwise.chunk_size if engine.chunkwise.enabled else args.seq_len
    ckpt_dir = os.path.join(args.output_dir, "checkpoints")
    start, log = begin(args, engine, steps, resume, cfg)
    history = []
    loader = batches(train_data, rows * world, args.seed, start=start)  # the same global batch on every rank
    saved = None  # (step, folder) of this run's newest checkpoint

    def save(step: int) -> None:
        nonlocal saved
        if not engine.weights_finite():  # never a checkpoint from non-finite weights
            raise FloatingPointError(f"step {step}: the weights are not finite; not saving over {ckpt_dir}")
        state = {"step": step, "setup": run_folder.setup(cfg)}
        saved = step, checkpoint.save(engine, ckpt_dir, step, state, keep=args.save_total_limit or None)

    try:
        if args.eval_only:
            if eval_data is None:
                raise ValueError("--eval-only: there is no held-out set (see --eval-data / --eval-fraction)")
            metrics = run_eval(engine, eval_data, args, chunk)
            history.append({"step": start} | {f"eval_{k}": v for k, v in metrics.items()})
            log.log(history[-1])
            return history
        with StopOnSignal() as stop:  # SIGINT / SIGTERM: the step finishes, a checkpoint, Interrupted
            for step in range(start + 1, steps + 1):
                batch = {k: v[rank * rows : (rank + 1) * rows] for k, v in next(loader).items()}
                history.append(train_step(engine, batch, step, world))
                log.log(history[-1], advance=True)
                last = step == steps
                if last and args.save_final or args.save_every and step % args.save_every == 0:
                    save(step)  # before the evaluation: nothing after training can lose it
                if eval_data is not None and (step % args.eval_every == 0 or last):
                    metrics = run_eval(engine, eval_data, args, chunk)
                    history.append({"step": step} | {f"eval_{k}": v for k, v in metrics.items()})
                    log.log(history[-1])
                if not last and stop.agreed(engine.device):
                    if saved is None or saved[0] != step:
                        save(step)
                    raise Interrupted(stop.signum, step, saved[1])
        if saved:
            log.message(f"checkpoint: {saved[1]}")
    finally:
        log.close()  # before any error message, so it stays the last line
    return history


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    cfg = load_config(args)
    chunkwise = ChunkwiseConfig.from_dict(cfg["chunkwise"])
    args.output_dir = args.output_dir or default_output_dir(args.data or args.task, chunkwise)
    # before any compute: a wrong --resume costs nothing
    resume = resume_point(args.output_dir, args.resume, args.resume_from, args.overwrite_output_dir)
    if resume:
        run_folder.check_resume(resume, cfg)
    if chunkwise.enabled and chunkwise.chunk_size >= args.seq_len and chunkwise.memory_budget_gb is None:
        warnings.warn(f"chunk_size {chunkwise.chunk_size} >= --seq-len {args.seq_len}: one chunk per sequence, "
                      "so this trains as plain backprop (lower --chunk-size to train chunk-wise)",
                      stacklevel=1)  # fmt: skip
    train_data, eval_data = build_data(args, cfg)
    steps = total_steps(args, cfg, len(train_data))
    length = cfg.get("scheduler", {}).get("params", {}).get("total_num_steps")
    if isinstance(length, int) and length != steps:  # kept: a longer run stays at the schedule's end
        warnings.warn(f"{args.deepspeed_config}: scheduler.params.total_num_steps = {length}, but this run takes "
                      f"{steps} optimizer steps; the schedule is the config's (or pass --lr-scheduler)",
                      stacklevel=1)  # fmt: skip
    engine = build_engine(cfg, lr_schedule(args, cfg, steps), args.ddp_timeout)
    history = train(args, engine, train_data, eval_data, steps, resume, cfg)
    show_answers(engine, eval_data if args.data else None, cfg)
    return history


def show_answers(engine, eval_data, cfg: dict) -> None:
    """After training on --data: the model's greedy answers to a few held-out prompts (rank 0;
    not under ZeRO-3, whose generate would need every rank)."""
    if eval_data is None or engine.zero3 or engine.rank_and_world()[0] != 0:
        return
    from ds_chunk.generate import held_out_answers

    answers = held_out_answers(engine.hf_model, load_tokenizer(cfg["model"]["name_or_path"]), eval_data.examples)
    for prompt, expected, got in answers:
        print(f"held-out: ...{prompt!r} -> {got!r} (expected {expected!r})")


if __name__ == "__main__":
    from ds_chunk.adapter import UnsupportedModelError

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # one line each
    try:
        main()
        ops.leave_together()
    except Interrupted as stop:
        print(f"ds_chunk: {stop}\nto continue: {run_folder.resume_command(sys.argv[1:], world_size() == 1)}",
              file=sys.stderr)  # fmt: skip
        ops.leave_together()
        sys.exit(stop.exit_code)
    except (ValueError, ConfigError, FileNotFoundError, UnsupportedModelError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)  # one clear line, no traceback wall
        sys.exit(2)
