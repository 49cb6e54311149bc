"""report.html of `run.py --plan`: the ranked plan, memory per device against the budget, every compiled
batch's total, and where it was compiled."""

from typing import Any

from shardgpt.lab import html_page as H
from shardgpt.lab.html_page import COMPILED, LAYOUT
from shardgpt.lab.report import size


def plan_page(results: dict[str, Any]) -> str:
    """The report of `run.py --plan`: the ranked table, memory against the budget, totals by batch, meta."""
    rows, meta = results["plan"], results.get("meta", {})
    first = rows[0] if rows else {}
    title = f"shardgpt memory plan: {len(rows)} run(s) of {first.get('model', '?')}"
    compiled = COMPILED + (f" ({first.get('compiled_for')}: an estimate)" if first.get("estimate") else "")
    table = []
    for r in rows:
        st, c = r["state"], r["compiled"]
        fits = "-" if r["fits"] is None else "yes" if r["fits"] else "NO"
        best = "-" if r["max_batch"] is None else str(r["max_batch"]) if r["max_batch"] else "none"
        held = [size(st[f"{k}_bytes_per_device"]) for k in ("params", "grads", "opt_state")]
        table.append(
            [str(r["rank"]), r["name"], *held, size(c["temp_bytes"]), size(c["total_bytes"]), fits, best]
            + [str(r["compiles"]), str(r.get("compiled_for"))]
        )
    header = ["#", "run", "params", "grads", "opt state", "temps", "total", "fits", "max batch", "compiles"]
    sources = [
        "",
        "",
        *[f"{LAYOUT} (exact)"] * 3,
        compiled,
        compiled,
        "total vs budget",
        "compile-only search",
    ]
    budget = first.get("budget_bytes")
    state = lambda r: [r["state"][f"{k}_bytes_per_device"] for k in ("params", "grads", "opt_state")]
    bars = [(r["name"], [*state(r), r["compiled"]["temp_bytes"]]) for r in rows]
    in_order = lambda totals: sorted(totals.items(), key=lambda item: int(item[0]))  # JSON keys are text
    by_batch = [
        [r["name"], ", ".join(f"{b}: {size(t)}" for b, t in in_order(r["totals_by_batch"]))] for r in rows
    ]
    body = [
        H.heading(title, 1),
        H.para(
            f"compile only, nothing allocated or run; global batch {first.get('batch')} x seq "
            f"{first.get('seq')}, {first.get('dtype')} compute, {first.get('attention')} attention; "
            f"compiled for {first.get('compiled_for')}, target {first.get('target') or 'none'}; "
            f"{meta.get('date', '')}",
            "lead",
        ),
        H.heading("Plan, best first", anchor="plan"),
        H.table(
            [*header, "compiled for"], table, sources=[*sources, "", ""], ident="plan", text_columns=(1, 10)
        ),
        H.notes(
            [
                "Memory per device (K, M, G = 2^10, 2^20, 2^30 bytes).",
                "params, grads, opt state: exact, from the layout (shard shape x itemsize).",
                "temps: XLA's temporaries from the compiled step"
                + (
                    " (compiled on another backend than the target's: an estimate)"
                    if first.get("estimate")
                    else ""
                ),
                "total: arguments + outputs - aliased + temporaries of the compiled step (the state is an "
                "argument).",
                (
                    f"fits / max batch: total within {size(budget)} ({first.get('budget_source')}); the "
                    "largest global batch (a multiple of dp) that fits, by compile-only search"
                )
                if budget is not None
                else "no budget (--device-memory or --target): fits and max batch not computed",
            ]
        ),
        H.figure(
            H.bar_chart(
                bars,
                ["params", "grads", "opt state", "temps"],
                "bytes per device",
                size,
                budget,
                f"device memory {size(budget)}" if budget else "",
            ),
            "memory per device, stacked, against the device's memory (dashed)",
        ),
        H.table(
            ["run", "compiled total by global batch"],
            by_batch,
            text_columns=(0, 1),
            caption=f"every batch compiled ({compiled})",
        ),
        *H.meta_section(meta),
    ]
    return H.page(title, body)
