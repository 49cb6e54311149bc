"""report.html's collectives: bytes by kind per run, then each run's bytes by cause beside theory (from the
layout) and the textbook's minimum, with the compiled ops behind every row."""

from collections.abc import Sequence

from shardgpt.analysis.attribution import CAUSES, UNATTRIBUTED
from shardgpt.analysis.attribution import TOLERANCE as THEORY_TOLERANCE
from shardgpt.analysis.hlo import KINDS
from shardgpt.lab import html_page as H
from shardgpt.lab.html_page import COMPILED, LAYOUT, THEORY
from shardgpt.lab.report import size


def section(runs: Sequence[dict]) -> list[str]:
    """The collectives section of a comparison: by kind, a chart by cause, each run's table, the causes."""
    kinds = [k for k in KINDS if any(r["collectives"].get(k, {}).get("count") for r in runs)] or list(KINDS)
    cell = lambda e: "-" if not e.get("count") else f"{size(e['bytes'])} in {e['count']}"
    rows = [[r["name"], *(cell(r["collectives"].get(k, {})) for k in kinds)] for r in runs]
    out = [H.heading("Collectives per device per step", anchor="collectives")]
    out.append(H.table(["run", *kinds], rows, sources=["", *[f"{COMPILED}: bytes in N ops"] * len(kinds)]))
    causes = [
        c
        for c in [*CAUSES, UNATTRIBUTED]
        if any(row["cause"] == c for r in runs for row in r.get("collectives_by_cause") or ())
    ]
    if not causes:
        return out
    bars = []
    for r in runs:
        for label, field in ((COMPILED, "bytes"), (THEORY, "theory_bytes")):
            by = r.get("collectives_by_cause") or ()
            bars.append(
                (f"{r['name']} {label}", [sum(x[field] for x in by if x["cause"] == c) for c in causes])
            )
    chart = H.bar_chart(bars, causes, "collective bytes per device per step", size)
    out.append(H.figure(chart, "collective bytes by cause: compiled beside theory, per run"))
    out.append(H.heading("By cause, beside theory and the textbook", 3))
    out.append(
        H.para(
            "compiled: read from the compiled HLO; by name: the bytes whose cause the op name states (the "
            "rest placed by mesh axes and phase); theory: what our construction should move, from the "
            "layout; textbook: the strategy's minimum from the parallelism math alone. Rows off theory by "
            f"more than {THEORY_TOLERANCE:.0%} are shaded."
        )
    )
    for r in runs:
        out += _by_cause(r)
    glossary = [[c, CAUSES.get(c, "no op name or device group placed these bytes")] for c in causes]
    out.append(H.table(["cause", "what moves"], glossary, text_columns=(0, 1), caption="causes"))
    return out


def _off(row: dict) -> bool:
    return bool(row["bytes"]) if row["ratio"] is None else abs(row["ratio"] - 1) > THEORY_TOLERANCE


def _by_cause(run: dict) -> list[str]:
    """One run's reconciliation: a summary line, every cause's row, and the ops behind them (folded)."""
    rows = run.get("collectives_by_cause") or []
    if not rows:
        return [H.para(f"{run['name']}: no collectives by cause in this record")]
    compiled = sum(r["bytes"] for r in rows)
    named = sum(r.get("bytes_by_name", r["bytes"]) for r in rows if r["cause"] != UNATTRIBUTED)
    summary = (
        f"{run['name']}: {size(compiled)} compiled, theory {size(sum(r['theory_bytes'] for r in rows))}, "
        f"attributed by op name {named / compiled:.0%}"
        if compiled
        else f"{run['name']}: no bytes compiled"
    )
    table = []
    for r in rows:
        book, versus, note = "n/a", "", r.get("note") or ""
        if "textbook_bytes" in r:
            book = "none" if r["textbook_bytes"] is None else size(r["textbook_bytes"])
            if r["textbook_bytes"]:
                versus = f"{r['bytes'] / r['textbook_bytes']:.2f}x"
                versus += " over" if r["theory_bytes"] > r["textbook_bytes"] else ""
            elif r["textbook_bytes"] is None and r.get("textbook_note"):
                note = f"{note} (no textbook figure: {r['textbook_note']})".strip()
        by_name = r.get("bytes_by_name", r["bytes"])
        share = f" ({by_name / r['bytes']:.0%})" if r["bytes"] else ""
        table.append(
            [r["cause"], r["kind"], str(r["count"]), size(r["bytes"]), f"{size(by_name)}{share}"]
            + [size(r.get("bytes_by_axes")), str(r.get("theory_count", "-")), size(r["theory_bytes"])]
            + ["-" if r["ratio"] is None else f"{r['ratio']:.2f}x", book, versus or "-", note or "-"]
        )
    header = ["cause", "kind", "ops", "bytes", "by name", "by axes", "theory ops", "theory bytes", "ratio"]
    sources = ["", "", COMPILED, COMPILED, COMPILED, COMPILED, f"{LAYOUT}/{THEORY}", f"{LAYOUT}/{THEORY}"]
    sources += ["compiled / theory", THEORY, "compiled / textbook", ""]
    ops = [[r["cause"], r["kind"], name, size(nbytes)] for r in rows for name, nbytes in r["ops"].items()]
    return [
        H.heading(summary, 4),
        H.table(
            [*header, "textbook", "vs textbook", "why"],
            table,
            sources=sources,
            text_columns=(0, 1, 11),
            ident=f"causes-{run['name']}",
            row_classes=["off" if _off(r) else "" for r in rows],
        ),
        H.details(
            f"the {len(ops)} ops behind these rows (op name after the jit prefix [mesh axes])",
            H.table(["cause", "kind", "op", "bytes"], ops, text_columns=(0, 1, 2)),
        ),
    ]
