"""The prediction against ``ds_chunk.bench`` measurements: predicted vs measured step peak
of each CSV row."""

from __future__ import annotations

from ds_chunk.plan.predict import estimate
from ds_chunk.plan.shape import MIB, ModelShape, Setup

# ---- check against ds_chunk.bench measurements -------------------------------------------


def _flag(value) -> bool:
    """A bench CSV boolean: written as "True" / "False" (or empty for rows without it)."""
    return str(value).strip().lower() in ("true", "1")


def _loss_chunk(row: dict) -> int | None:
    """The sub-chunk the bench row ran with: a number, none (whole chunk) or ds_chunk's auto rule."""
    value = row.get("loss_chunk_size")
    if value == "auto":
        from ds_chunk.loss import auto_sub_chunk

        return auto_sub_chunk(_bench_shape(row).vocab, int(row["batch"]))
    return int(value) if value else None


def setup_from_bench_row(row: dict) -> Setup:
    """The Setup of one ``ds_chunk.bench`` CSV row (measured on one device, no ZeRO)."""
    method = row["method"]
    rate = float(method.split("@")[1]) if method.startswith("spaco@") else None
    qlora, lora = row["weights"] == "qlora", row["weights"] in ("lora", "qlora")
    return Setup(
        seq_len=int(row["seq_len"]),
        method="spaco" if rate else method,
        chunk_size=int(row["chunk_size"]),
        keep_chunks=int(row.get("keep_chunks") or 0),
        loss_chunk_size=_loss_chunk(row),
        sparse_rate=rate,
        # the scheduler's own attention (ds_chunk.attention): CPU flash, or CUDA flash for 16-bit
        attention="auto",
        device=row.get("device") or "cpu",
        batch=int(row["batch"]),
        dtype=row["dtype"],
        quant="4bit" if qlora else "none",
        lora_rank=int(row.get("lora_rank") or 8) if lora else 0,
        lora_targets=tuple((row.get("lora_targets") or "q_proj v_proj").split()),
        reserve_gb=0.0,
    )


def _bench_shape(row: dict) -> ModelShape:
    if row.get("model"):
        return ModelShape.from_config(row["model"])
    from ds_chunk.bench import DEFAULT_MODEL

    return ModelShape.from_config(DEFAULT_MODEL)


def check(rows: list[dict], shape: ModelShape | None = None) -> list[dict]:
    """Predicted vs measured step peak for each measured bench row: error = pred / measured - 1.

    shape: the model the bench measured (``--config``); default: the row's ``model``
    column, else the bench's default model. kv_offload rows are left out: the planner
    predicts device memory, and on a CPU the "device" and the host are one RSS.
    """
    out = []
    for row in rows:
        # qv rows (q/v weights trained at full rank) have no planner setup of their own
        skip = _flag(row.get("kv_offload")) or row.get("weights") == "qv"
        if row["status"] != "ok" or not row.get("peak_mib") or skip:
            continue
        predicted = estimate(shape or _bench_shape(row), setup_from_bench_row(row)).step_bytes / MIB
        measured = float(row["peak_mib"])
        out.append({"label": row["label"], "seq_len": int(row["seq_len"]), "measured_mib": measured,
                    "predicted_mib": predicted, "error": predicted / measured - 1})  # fmt: skip
    return out


def check_table(results: list[dict]) -> str:
    """Markdown table of ``check`` results."""
    lines = ["| method | T | measured MiB | predicted MiB | error |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['seq_len']} | {r['measured_mib']:.1f} | {r['predicted_mib']:.1f} | "
            f"{100 * r['error']:+.1f}% |"
        )
    return "\n".join(lines)
