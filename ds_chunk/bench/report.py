"""Outputs of a sweep: the CSV (written and read back), the markdown table with ratios to
a reference method, and the plot."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# ---- outputs -------------------------------------------------------------------------

CSV_FIELDS = [
    "label", "method", "seq_len", "chunk_size", "loss_chunk_size", "report_loss", "weights", "model", "device",
    "dtype", "batch", "lora_rank", "threads", "repeats", "status", "s_per_step", "s_mean", "s_all",
    "cpu_s_per_step", "cpu_s_mean", "cpu_s_all", "warmup_s", "peak_mib", "peak_abs_mib", "loaded_mib",
    "replayed_mean", "wall_s", "error", "kv_offload", "host_mib", "keep_chunks", "memory_budget_gb", "picked",
    "predicted_mib", "lora_targets",
]  # fmt: skip


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            text = {k: " ".join(v) if k == "lora_targets" else json.dumps(v) if isinstance(v, list) else v
                    for k, v in row.items()}  # fmt: skip
            writer.writerow(text)


def _reference(row: dict, rows: list[dict], ref: str | None) -> dict | None:
    """The row of method ``ref`` at the same length and weights (same chunk size if ``ref`` is chunked)."""
    for other in rows:
        same = other["seq_len"] == row["seq_len"] and other["weights"] == row["weights"]
        if other["method"] == ref and same and other["status"] == "ok":
            if ref in ("plain", "ckpt") or (other["chunk_size"] == row["chunk_size"] and not other.get("kv_offload")):
                return other
    return None


def time_keys(row: dict) -> tuple[str, str]:
    """The (median, mean) step-time fields the ratios and the plot use: CPU seconds where
    measured (CPU runs: robust to a shared core), else wall seconds (CUDA)."""
    if row["device"] == "cpu" and row.get("cpu_s_per_step"):
        return "cpu_s_per_step", "cpu_s_mean"
    return "s_per_step", "s_mean"


def markdown_table(rows: list[dict], ref: str | None) -> str:
    """One line per point; ``x <ref>`` columns are ratios to method ``ref`` at the same T.

    Time ratios use CPU seconds on CPU (wall on CUDA), median and mean: SpaCO's step time
    depends on its random draw, and the mean is what sets its throughput.
    """
    host = any(row.get("host_mib") for row in rows)  # kv_offload points: the part in host memory
    head = ["method", "T", "wall s/step", "CPU s/step", "CPU s/step mean", "peak MiB"] + ["host MiB"] * host
    head += [f"time x {ref}", f"time x {ref} (mean)", f"mem x {ref}", "replayed"]
    picks = any(row.get("picked") for row in rows)  # memory_budget_gb points: what the planner picked
    head += ["picked", "planner MiB"] * picks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["label"], str(row["seq_len"])]
        if row["status"] != "ok":
            cells += [row["status"]] * 4 + [""] * (4 + host + 2 * picks)
        else:
            base = _reference(row, rows, ref)
            median, mean = time_keys(row)
            cells += [_fmt(row.get(k), 2) for k in ("s_per_step", "cpu_s_per_step", "cpu_s_mean")]
            cells += [_fmt(row.get("peak_mib"), 0)] + [_fmt(row.get("host_mib"), 0)] * host
            cells += [_ratio(row, base, median), _ratio(row, base, mean)]
            cells += [_ratio(row, base, "peak_mib", 3), _replayed(row)]
            cells += [row.get("picked") or "", _fmt(row.get("predicted_mib"), 0)] * picks
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _replayed(row: dict) -> str:
    return "" if row.get("replayed_mean") is None else f"{row['replayed_mean']:.1f}/{_chunks(row)}"


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(row: dict, base: dict | None, key: str, digits: int = 2) -> str:
    if base is None or not row.get(key) or not base.get(key):
        return ""
    return f"{row[key] / base[key]:.{digits}f}"


def _chunks(row: dict) -> int:
    return -(-row["seq_len"] // row["chunk_size"])


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels, peak memory and seconds/step vs T (log-log), one line per method label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    last = {(r["label"], r["seq_len"]): r for r in rows if r["status"] == "ok"}  # a re-measured point: the last
    for label in dict.fromkeys(r["label"] for r in rows):
        ok = sorted((r for (name, _), r in last.items() if name == label), key=lambda r: r["seq_len"])
        for ax, key in ((ax_mem, lambda r: r.get("peak_mib")), (ax_time, lambda r: r.get(time_keys(r)[0]))):
            measured = [r for r in ok if key(r)]
            if measured:
                ax.plot([r["seq_len"] for r in measured], [key(r) for r in measured], marker="o", label=label)
    lengths = sorted({r["seq_len"] for r in rows})
    _style(ax_mem, lengths, "peak memory increase per step (MiB)")
    _style(ax_time, lengths, "seconds / step (CPU time on CPU)")
    (ax_time if ax_time.lines else ax_mem).legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_tradeoff(rows: list[dict], path: Path, title: str) -> None:
    """Time against memory, one panel per sequence length: plain and checkpointing as points,
    SeCO (its budgets, chunk sizes and kept chunks) as one curve through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r.get("peak_mib") and r.get(time_keys(r)[0])]
    lengths = sorted({r["seq_len"] for r in ok})
    fig, axes = plt.subplots(1, max(1, len(lengths)), figsize=(5 * max(1, len(lengths)), 4), squeeze=False)
    for ax, seq_len in zip(axes[0], lengths):
        at = [r for r in ok if r["seq_len"] == seq_len]
        for method, style, label in (("seco", "o-", "SeCO"), ("plain", "s", "plain"), ("ckpt", "^", "checkpointing")):
            points = sorted((r["peak_mib"], r[time_keys(r)[0]]) for r in at if r["method"] == method)
            if points:
                ax.plot(*zip(*points), style, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("peak memory increase per step (MiB)")
        ax.set_ylabel("seconds / step (CPU time on CPU)")
        ax.set_title(f"T = {seq_len}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _style(ax, lengths: list[int], ylabel: str) -> None:
    """Log-log axes with plain-number ticks at the measured lengths; a note if nothing was measured."""
    import matplotlib.ticker as ticker

    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel(ylabel)
    if not ax.lines:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)


def read_csv(path: Path) -> list[dict]:
    """Rows written by ``write_csv``, with the numbers parsed back."""
    ints = ("seq_len", "chunk_size", "loss_chunk_size", "batch", "lora_rank", "threads", "repeats", "keep_chunks")
    floats = (
        "s_per_step",
        "s_mean",
        "cpu_s_per_step",
        "cpu_s_mean",
        "warmup_s",
        "peak_mib",
        "peak_abs_mib",
        "loaded_mib",
        "replayed_mean",
        "wall_s",
        "host_mib",
        "memory_budget_gb",
        "predicted_mib",
    )
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            row = {k: (v if v != "" else None) for k, v in row.items()}
            row.update({k: int(row[k]) for k in ints if row.get(k) not in (None, "auto")})
            row.update({k: float(row[k]) for k in floats if row.get(k) is not None})
            row["report_loss"] = {"True": "exact", "False": "off"}.get(row.get("report_loss"), row.get("report_loss"))
            row["kv_offload"] = row.get("kv_offload") == "True"
            rows.append(row)
    return rows


def write_outputs(rows: list[dict], stem: Path, header: str, ref: str) -> str:
    """<stem>.csv, .md (header + table) and .png; returns the table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, stem.with_suffix(".csv"))
    table = markdown_table(rows, ref)
    stem.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    devices = sorted({str(r["device"]) for r in rows})
    plot(rows, stem.with_suffix(".png"), f"{', '.join(devices)}; memory: peak increase during a step")
    if any(r.get("memory_budget_gb") or r.get("keep_chunks") for r in rows):
        curve = stem.with_name(stem.name + "_curve.png")
        plot_tradeoff(rows, curve, f"time against memory, {', '.join(devices)}: lower left is better")
    return table
