"""The PNG plots of a comparison (throughput, memory, collectives by cause beside theory, losses) and of a
memory plan. matplotlib is imported only when a plot is drawn: results.json needs none of it.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardgpt.analysis.attribution import CAUSES

PLOTS = ("throughput.png", "memory.png", "collectives.png", "loss.png")


def write_plots(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Step time and tokens/s, memory split by kind, collective bytes by kind, and every loss curve."""
    import numpy as np

    plt = _pyplot()
    names = [r["name"] for r in runs]
    x = np.arange(len(runs))
    paths = [out_dir / name for name in PLOTS]
    width = max(6.0, 1.2 * len(runs) + 2)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(2 * width, 4))
    ax1.bar(x, [1e3 * r["step_time_s"] for r in runs], color="tab:blue")
    ax1.set(ylabel="median step time (ms)", title="step time")
    ax2.bar(x, [r["tokens_per_s"] for r in runs], color="tab:green")
    ax2.set(ylabel="tokens / s", title="throughput")
    for ax in (ax1, ax2):
        ax.set_xticks(x, names, rotation=30, ha="right")
    _save(fig, paths[0])

    fig, ax = plt.subplots(figsize=(width, 4))
    bottom = np.zeros(len(runs))
    parts = (("params", "tab:blue"), ("grads", "tab:orange"), ("opt_state", "tab:green"), ("temp", "tab:red"))
    scale, unit = byte_unit(
        max(sum(r["memory"].get(f"{k}_bytes_per_device") or 0 for k, _ in parts) for r in runs)
    )
    for key, color in parts:
        values = np.array([(r["memory"].get(f"{key}_bytes_per_device") or 0) / scale for r in runs])
        ax.bar(x, values, bottom=bottom, label=key, color=color)
        bottom += values
    peaks = [r["memory"]["peak_bytes_per_device"] for r in runs]
    if any(p is not None for p in peaks):
        ax.scatter(
            x,
            [np.nan if p is None else p / scale for p in peaks],
            color="k",
            marker="_",
            s=400,
            label="peak (XLA)",
            zorder=3,
        )
    ax.set(ylabel=f"{unit} per device", title="memory per device")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.legend()
    _save(fig, paths[1])

    fig, ax = plt.subplots(figsize=(width + 2, 4))
    causes = [
        c for c in CAUSES if any(row["cause"] == c for r in runs for row in r.get("collectives_by_cause", ()))
    ]
    colors = dict(zip(CAUSES, plt.get_cmap("tab20").colors, strict=False))
    bar = 0.4
    scale, unit = byte_unit(
        max(
            sum(row[f] for row in r.get("collectives_by_cause", ()))
            for r in runs
            for f in ("bytes", "theory_bytes")
        )
    )
    for offset, field, hatch in ((-bar / 2, "bytes", None), (bar / 2, "theory_bytes", "//")):
        bottom = np.zeros(len(runs))
        for cause in causes:
            values = np.array([
                sum(row[field] for row in r.get("collectives_by_cause", ()) if row["cause"] == cause) / scale
                for r in runs
            ])  # fmt: skip
            label = cause if field == "bytes" else None
            ax.bar(x + offset, values, bar, bottom=bottom, color=colors[cause], hatch=hatch, label=label)
            bottom += values
    ax.set(
        ylabel=f"{unit} per device per step",
        title="collective bytes by cause: compiled (left) beside theory (hatched)",
    )
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not on them
    _save(fig, paths[2])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        ax.plot(np.arange(1, len(r["losses"]) + 1), r["losses"], label=r["name"], alpha=0.8)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss, every run")
    ax.legend(fontsize="small")
    _save(fig, paths[3])
    return paths


def byte_unit(largest: float) -> tuple[int, str]:
    """(divisor, name) of the power of 1024 an axis up to `largest` bytes reads in: KiB for gpt-pico's
    state, GiB for gpt2's (a fixed MiB or GiB reads 0.00 for small models)."""
    for power, name in enumerate(("B", "KiB", "MiB", "GiB")):
        if largest < 1024 ** (power + 1):
            return 1024**power, name
    return 1024**4, "TiB"


def _pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display needed), imported when first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plan_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Stacked bars per run (params, grads, opt state, temporaries) against the device's memory."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    names = [r["name"] for r in rows]
    left = [0.0] * len(rows)
    parts = [("params", "state"), ("grads", "state"), ("opt_state", "state"), ("temp", "compiled")]
    fields = [
        (where, f"{key}_bytes_per_device" if where == "state" else f"{key}_bytes") for key, where in parts
    ]
    scale, unit = byte_unit(
        max([r["budget_bytes"] or 0 for r in rows] + [sum(r[w][f] for w, f in fields) for r in rows])
    )
    for (key, _), (where, field) in zip(parts, fields, strict=True):
        widths = [r[where][field] / scale for r in rows]
        ax.barh(names, widths, left=left, label=key.replace("_", " "))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    if rows and rows[0]["budget_bytes"]:
        ax.axvline(rows[0]["budget_bytes"] / scale, color="k", linestyle="--", label="device memory")
    ax.invert_yaxis()
    ax.set(xlabel=f"{unit} per device", title="memory plan (compile-only; temporaries from XLA's compile)")
    ax.legend(fontsize="small")
    _save(fig, path)
    return path
