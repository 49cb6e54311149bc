"""report.html of a train.py run, beside its metrics.jsonl: the summary, the loss (train and held-out),
tokens/s, gradient norm and learning rate over the steps, the run's config and meta."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardgpt.lab import html_page as H
from shardgpt.lab.html_page import MEASURED

NAME = "report.html"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, in order; a line cut by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict) and "step" in r]


def training_page(records: Sequence[dict], config: dict[str, Any], meta: dict[str, Any]) -> str:
    """The report of one train.py run: summary, loss (train and held-out), tokens/s, lr, config, meta."""
    title = f"shardgpt training: {config.get('mesh', '')} {config.get('strategy', '')}".strip()
    series = lambda key: [(r["step"], r.get(key)) for r in records if key in r]
    val = series("val_loss")
    speeds = sorted(r["tokens_per_s"] for r in records if r.get("tokens_per_s") is not None)
    last = records[-1] if records else {}
    bad = [str(r["step"]) for r in records if r.get("non_finite")]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    summary = [
        f"{records[0]['step']}-{last['step']}" if records else "none",
        fmt(last.get("loss"), ".4f"),
        fmt(val[-1][1] if val else None, ".4f"),
        fmt(speeds[len(speeds) // 2] if speeds else None, ",.0f"),
        fmt(last.get("lr"), ".3g"),
        ", ".join(bad) or "-",
    ]
    header = ["steps logged", "final loss", "held-out loss", "tokens/s (median)", "lr (last)", "non-finite"]
    sources = ["metrics.jsonl", f"{MEASURED} (the step's own)", f"{MEASURED} (val split)"]
    sources += [f"{MEASURED} (host time per step)", "schedule", ""]
    body = [H.heading(title, 1), H.para(f"{config.get('task', '')}; {meta.get('date', '')}", "lead")]
    body += [
        H.heading("Summary", anchor="summary"),
        H.table(header, [summary], sources=sources, ident="summary"),
    ]
    loss = {"train": series("loss")} | ({"held-out": val} if val else {})
    body += [
        H.heading("Curves", anchor="curves"),
        H.figure(
            H.line_chart(loss, "step", "loss", log_y=True),
            "training loss and, where evaluated, the held-out loss (measured)",
        ),
    ]
    for key, label, what in (
        ("tokens_per_s", "tokens/s", "tokens/s per step (measured: the host's time between reads)"),
        ("grad_norm", "gradient norm", "gradient norm before clipping (measured)"),
        ("lr", "learning rate", "learning rate (the schedule's value at the step)"),
    ):
        if any(r.get(key) is not None for r in records):
            body.append(H.figure(H.line_chart({label: series(key)}, "step", label), what))
    body.append(H.heading("Configuration", anchor="config"))
    body.append(H.key_values({k: v for k, v in config.items() if not isinstance(v, dict)}, caption="run"))
    body += [H.key_values(v, caption=k) for k, v in config.items() if isinstance(v, dict)]
    return H.page(title, [*body, *H.meta_section(meta)])


def write(metrics_path: str | Path, config: dict[str, Any], meta: dict[str, Any]) -> Path:
    """report.html beside a train run's metrics.jsonl."""
    path = Path(metrics_path).with_name(NAME)
    path.write_text(training_page(read_metrics(metrics_path), config, meta), encoding="utf-8")
    return path
