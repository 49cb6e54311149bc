"""Reporting lab results: the equivalence check, the text tables and results.json (plots.py draws the PNGs).

Works on plain results dicts (DESIGN.md's schema), so it needs no jax and can re-render a saved run.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardgpt.analysis.attribution import CAUSES, UNATTRIBUTED
from shardgpt.analysis.attribution import TOLERANCE as THEORY_TOLERANCE
from shardgpt.analysis.hlo import KINDS, SLICED_ALL_REDUCE
from shardgpt.lab.plots import write_plots

# Runs that differ only in mesh, strategy (+sp too), impl or microbatches compute the same function; only
# the order of floating-point reductions differs (~1e-7 relative in fp32). bf16 rounds every partial sum to
# 8 mantissa bits, so its bound is loose: a wrong gradient still misses it by far.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# Judged window. Training amplifies rounding differences exponentially (measured here: gpt-pico on sort, fp32,
# they pass 1e-4 near step 30 at lr 1e-3 and 3e-3), so later steps are reported, not judged; a real bug (a
# missing reduction, a mis-sharded moment) shows from step 2. Grad norms are judged too: Adam's update is
# blind to the gradients' scale, so a mis-scaled reduction barely moves the losses.
CHECKED_STEPS = 10
# Config fields that change how, not what, the model computes.
_EXECUTION_ONLY = ("attention", "scan_layers", "remat", "ring_layout")


def _equivalence_key(run: dict[str, Any]) -> str:
    config = {k: v for k, v in run.get("config", {}).items() if k not in _EXECUTION_ONLY}
    fields = ("model", "task", "dtype", "seed", "batch", "seq", "steps", "lr", "optim")
    return json.dumps([config, [run.get(f) for f in fields]], sort_keys=True, default=str)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def agreement(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of runs that should be equivalent (same model, task, dtype, seed...), checked against the first.

    A run disagrees when its loss or grad norm at any of the first CHECKED_STEPS steps, or its final loss
    if that is not finite, is off the reference's by more than TOLERANCE (relative) for the dtype. A run that
    agrees there but whose final loss does not "drifts": the step where it first parts is reported.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(_equivalence_key(run), []).append(run)
    checks = []
    for members in groups.values():
        if len(members) < 2:
            continue
        ref = members[0]
        tolerance = TOLERANCE.get(ref["dtype"], 5e-2)
        early, final, drift = {}, {}, {}
        for r in members:
            losses = [_rel(a, b) for a, b in zip(r["losses"], ref["losses"], strict=False)]
            norms = [
                _rel(a, b) for a, b in zip(r.get("grad_norms", ()), ref.get("grad_norms", ()), strict=False)
            ]
            early[r["name"]] = max(losses[:CHECKED_STEPS] + norms[:CHECKED_STEPS], default=0.0)
            final[r["name"]] = _rel(r["final_loss"], ref["final_loss"])
            drift[r["name"]] = next((i for i, d in enumerate(losses, 1) if not d <= tolerance), None)
        # `not d <= tol` rather than `d > tol`: NaN compares False with everything and must disagree.
        disagree = [n for n in early if not early[n] <= tolerance or final[n] != final[n]]
        checks.append({
            "runs": [r["name"] for r in members], "reference": ref["name"], "dtype": ref["dtype"],
            "tolerance": tolerance, "checked_steps": min(CHECKED_STEPS, len(ref["losses"])),
            "max_rel_diff": max(early.values()), "final_max_rel_diff": max(final.values()),
            "disagree": disagree, "ok": not disagree,
            "drift": {n: drift[n] for n in early if n not in disagree and final[n] > tolerance},
        })  # fmt: skip
    return checks


def size(nbytes: float | None) -> str:
    """Bytes for a table, in the unit their magnitude needs: 512B, 3.5K, 12M, 1.2G, 2.1T (powers of 1024)."""
    if nbytes is None:
        return "n/a"
    for unit in ("B", "K", "M", "G", "T"):
        if abs(nbytes) < 1024 or unit == "T":
            return f"{nbytes:.3g}{unit}" if unit != "B" and abs(nbytes) < 1000 else f"{nbytes:.0f}{unit}"
        nbytes /= 1024


def grid(header: Sequence[str], rows: Sequence[Sequence[str]], text_last: bool = False) -> list[str]:
    """Left-aligned first column (and with `text_last` the last: prose), right-aligned others, widths
    fitted to the content (but prose's)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    left = {0, len(header) - 1} if text_last else {0}

    def fmt(row):
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in pairs]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header)) if not text_last else "-" * (sum(widths[:-1]) + 2 * len(widths) + 3)
    return [fmt(header), rule, *map(fmt, rows)]


GENERATE_COLUMNS = {
    "batch": "batch",
    "prompt_len": "prompt",
    "new_tokens": "new",
    "tokens_per_s": "tokens/s",
    "compiles": "compiles",
    "naive_tokens_per_s": "naive tokens/s",
    "recompute_tokens_per_s": "recompute tokens/s",
    "greedy_matches_recompute": "matches recompute",
}


def table(results: dict[str, Any]) -> str:
    """The report: throughput and memory, collectives with their theory, generation, then the checks."""
    runs = results["runs"]
    checks = agreement(runs)
    verdict = {name: "ok" for c in checks for name in c["runs"]}
    verdict |= {name: f"drifts@{step}" for c in checks for name, step in c["drift"].items()}
    verdict |= {name: "DISAGREES" for c in checks for name in c["disagree"]}
    rows = []
    for r in runs:
        mem, ideal = r["memory"], r.get("expected_memory", {})
        cells = [
            f"{size(mem[f'{k}_bytes_per_device'])} ({size(ideal.get(f'{k}_bytes_per_device'))})"
            for k in ("params", "grads", "opt_state")
        ]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        compiled = [size(mem.get(f"{k}_bytes_per_device")) for k in ("temp", "peak")]
        timing = [f"{r['compile_s']:.2f}", f"{1e3 * r['step_time_s']:.2f}", f"{r['tokens_per_s']:,.0f}"]
        rows.append(
            [r["name"], str(r.get("microbatches", 1)), *timing]
            + [mfu, *cells, *compiled, f"{r['final_loss']:.6f}", verdict.get(r["name"], "-")]
        )
    header = ["run", "M", "compile s", "step ms", "tokens/s", "MFU", "params", "grads*", "opt state", "temps"]
    out = grid([*header, "peak", "final loss", "agrees"], rows)
    out += [
        "M: microbatches per step (gradient accumulation inside the one jitted step)",
        "memory per device: params and opt state measured from the live arrays' shards; grads* derived from",
        "  the layout (they never persist); (in brackets) the ZeRO paper's ideal (theory); temps and peak",
        "  from the compiled program (XLA's memory_analysis; on CPU peak = args + outputs - aliased + temps)",
    ]
    device_peaks = [(r["name"], r["memory"].get("device_peak_bytes")) for r in runs]
    if any(peak is not None for _, peak in device_peaks):
        out.append(
            "  live device peak (memory_stats, since the process started): "
            + ", ".join(f"{name} {size(peak)}" for name, peak in device_peaks)
        )
    out += _agrees_footer(checks)

    out += ["", "collectives per device per step, read from the compiled HLO: result bytes in N ops"]
    rows = [[r["name"], *(_collective(r["collectives"][k]) for k in KINDS)] for r in runs]
    out += grid(["run", *KINDS], rows)
    if any(r["collectives"].get(SLICED_ALL_REDUCE, {}).get("count") for r in runs):
        out.append(
            f"  {SLICED_ALL_REDUCE}: a reduce-scatter as XLA:CPU compiles it (an all-reduce whose every use "
            "is a dynamic slice); bytes of the all-reduce"
        )
    if any(r.get("collectives_by_cause") for r in runs):
        out += ["", "collectives by cause beside theory (per device per step; rows off theory by > 5%):"]
        out += [line for r in runs for line in _reconciliation_lines(r)]
        out.append("  the full table of one run: experiments/run.py --explain RUN (--out DIR: the results)")

    bubbles = pipeline_bubbles(runs)
    if bubbles:
        out += [
            "",
            "pipeline (GPipe in shard_map): the bubble, theory (pp - 1) / (M + pp - 1) beside measured",
        ]
        out += bubble_table(bubbles)
    generated = [r for r in runs if r.get("generate")]
    if generated:
        rows = [[r["name"], *(number(r["generate"].get(k)) for k in GENERATE_COLUMNS)] for r in generated]
        naive = sorted({r["generate"].get("naive_tokens") for r in generated} - {None})
        naive_size = f", timed over its first {'/'.join(map(str, naive))} tokens" if naive else ""
        out += [
            "",
            f"generation (KV cache; naive = re-jit per length, one compile a token{naive_size}; recompute = "
            "full forward per token)",
        ]
        out += grid(["run", *GENERATE_COLUMNS.values()], rows)

    first = runs[0] if runs else {}
    peak = first.get("peak_flops")
    source = results.get("meta", {}).get("flops_per_token_source", "6N + 12·L·H·Q·T (PaLM app. B)")
    out += [
        "",
        f"step time: median of the timed steps after {first.get('steps', 0) - first.get('timed_steps', 0)}"
        " warm-up; step t+1 is dispatched before step t's loss is read (async dispatch respected)",
        f"MFU = tokens/s x FLOPs/token / (peak x devices); FLOPs/token = {source}"
        f" = {first.get('flops_per_token', 0):,.0f}; peak used: "
        + (f"{peak:.3g} FLOP/s per device (bf16 datasheet)" if peak else "none known for this device -> n/a"),
    ]
    out += [line for c in checks for line in _check_lines(c, runs)]
    return "\n".join(out)


def bubble_table(bubbles: Sequence[dict[str, Any]]) -> list[str]:
    """pipeline_bubbles' rows as a text table, with how the measurement is made."""
    percent = lambda x: "n/a" if x is None else f"{x:.1%}"
    rows = [
        [b["name"], str(b["pp"]), str(b["microbatches"]), str(b["ticks"]), f"{1e3 * b['step_time_s']:.2f}"]
        + [percent(b["bubble_theory"]), percent(b["bubble_measured"])]
        + [b.get("bubble_note") or ""]
        for b in bubbles
    ]
    header = ["run", "pp", "M", "ticks", "step ms", "bubble (theory)", "bubble (measured)", ""]
    out = grid(header, rows, text_last=True)
    return out + [
        "  measured = (pp - 1) x tick time / step time; tick time: the slope of step time over ticks",
        "  across runs of one microbatch size (batch / M); on simulated CPU devices, rough. At one --batch",
        "  each M has its own microbatch size: scale --batch with M (a run.py per M; pipeline_bench.py does)",
    ]


def pipeline_bubbles(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pp run's bubble: theory beside a measurement. The tick time is the least-squares slope of step
    time over ticks (M + pp - 1) across the runs that differ only in M at the same microbatch size (rows
    per microbatch), so per-tick work is equal; measured = (pp - 1) x tick time / step time. None where
    fewer than two such runs exist, with `bubble_note` saying why (runs of other M at another microbatch
    size, as --microbatches 2,4,8 at one --batch gives, cannot share a slope)."""
    piped = [r for r in runs if r.get("pipeline")]
    key = lambda r: (
        r["name"].split(" M=")[0],
        r["model"],
        r["impl"],
        r["seq"],
        r["batch"] // r["microbatches"],
    )
    groups: dict = {}
    for r in piped:
        groups.setdefault(json.dumps(key(r), default=str), []).append(r)
        groups.setdefault(json.dumps(key(r)[:-1], default=str), []).append(r)  # any microbatch size
    out = []
    for r in piped:
        group = groups[json.dumps(key(r), default=str)]
        ticks = [g["pipeline"]["ticks"] for g in group]
        measured, note = None, None
        if len(set(ticks)) < 2:
            others = len({g["pipeline"]["ticks"] for g in groups[json.dumps(key(r)[:-1], default=str)]}) > 1
            note = "no other M at this microbatch size (batch / M)" if others else "one run: no slope"
        if len(set(ticks)) > 1:
            times = [g["step_time_s"] for g in group]
            mt, mtime = sum(ticks) / len(ticks), sum(times) / len(times)
            slope = sum((t - mt) * (y - mtime) for t, y in zip(ticks, times, strict=True)) / sum(
                (t - mt) ** 2 for t in ticks
            )
            measured = (r["pipeline"]["pp"] - 1) * slope / r["step_time_s"]
        out.append(
            {"name": r["name"], "step_time_s": r["step_time_s"], **r["pipeline"], "bubble_measured": measured}
            | {"bubble_note": note}
        )
    return out


def _agrees_footer(checks: Sequence[dict[str, Any]]) -> list[str]:
    """The "agrees" column's legend, with the tolerance each check used."""
    if not checks:
        return []
    within = "; ".join(sorted({f"{c['tolerance']:g} relative in {c['dtype']}" for c in checks}))
    lines = [
        "agrees: each run against the first of its equivalent runs (same model, data, dtype, seed): ok =",
        f"  losses and grad norms within {within} over the first {checks[0]['checked_steps']} steps, else "
        "it disagrees (a bug)",
    ]
    if any(c["drift"] for c in checks):
        lines += [
            "  drifts@k: ok there, then a loss parts by more than that at step k: another reduction order's",
            "  rounding, amplified by training (reported, not judged; the final losses' spread: below)",
        ]
    return lines


def _final_spread(c: dict[str, Any], runs: Sequence[dict[str, Any]]) -> str:
    """The final losses' absolute spread, which a relative difference at losses near 0 hides."""
    finals = [r["final_loss"] for r in runs if r["name"] in c["runs"]]
    if len(finals) < 2 or not all(f == f for f in finals):
        return ""
    return f", {max(finals) - min(finals):.2g} apart (from {min(finals):.4g} to {max(finals):.4g})"


def _check_lines(c: dict[str, Any], runs: Sequence[dict[str, Any]] = ()) -> list[str]:
    within = f"within {c['tolerance']:g} relative ({c['dtype']})"
    if not c["ok"]:
        return [
            f"DISAGREE: {', '.join(c['disagree'])} vs {c['reference']}: should be equivalent, but losses or "
            f"grad norms over the first {c['checked_steps']} steps differ by up to {c['max_rel_diff']:.2g}, "
            f"not {within}"
        ]
    lines = [
        f"equivalent runs agree: {len(c['runs'])} runs' losses and grad norms over the first "
        f"{c['checked_steps']} steps {within}, max difference {c['max_rel_diff']:.2g}"
    ]
    if c["drift"]:
        parted = ", ".join(f"{name} at step {step}" for name, step in c["drift"].items())
        lines += [
            f"  then they drift apart ({parted}): final losses differ by up to "
            f"{c['final_max_rel_diff']:.2g} relative{_final_spread(c, runs)};",
            "  training amplifies the rounding differences of another reduction order (not judged)",
        ]
    else:
        lines.append(f"  and so do their final losses (max difference {c['final_max_rel_diff']:.2g})")
    return lines


def _ratio(row: dict[str, Any]) -> str:
    return "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"


def _reconciliation_lines(run: dict[str, Any]) -> list[str]:
    """One line per run: how much of its bytes theory accounts for, how many no op name attributes (the
    by-axes guesses and the unattributed), and the rows off by more than 5%, the largest gaps named first
    (their reasons: --explain, and the HTML report)."""
    rows = run.get("collectives_by_cause") or []
    compiled = sum(r["bytes"] for r in rows)
    unnamed = compiled - sum(r.get("bytes_by_name", r["bytes"]) for r in rows if r["cause"] != UNATTRIBUTED)
    off = [r for r in rows if (r["bytes"] if r["ratio"] is None else abs(r["ratio"] - 1) > THEORY_TOLERANCE)]
    head = f"  {run['name']}: {size(compiled)} compiled, theory {size(sum(r['theory_bytes'] for r in rows))}"
    head += (
        f", not attributed by name {size(unnamed)} ({unnamed / compiled:.0%})" if unnamed else ", all by name"
    )
    if not off:
        return [head + "; every cause within 5% of theory"]
    off.sort(key=lambda r: -abs(r["bytes"] - (r["theory_bytes"] or 0)))
    named = ", ".join(
        f"{r['cause']} {r['kind']} {_ratio(r) if r['ratio'] is not None else 'no theory'}" for r in off[:3]
    )
    more = f" +{len(off) - 3} more" if len(off) > 3 else ""
    return [f"{head}; off theory by > 5%: {named}{more}"]


def _textbook(row: dict[str, Any]) -> tuple[str, str]:
    """(the textbook's bytes, and how our construction compares: "over" where theory exceeds it)."""
    if "textbook_bytes" not in row:
        return "n/a", ""
    book = row["textbook_bytes"]
    if book is None:
        return "none", ""
    over = "over" if row["theory_bytes"] > book else ""
    return size(book), f"{row['bytes'] / book:.2f}x {over}".strip() if book else over or "-"


def explain(run: dict[str, Any]) -> str:
    """The whole reconciliation table of one run (compiled beside our construction's theory and the
    textbook's minimum), then the op names behind each row's compiled bytes."""
    rows = run.get("collectives_by_cause")
    if not rows:
        return f"{run['name']}: no collectives_by_cause in this record (written before they were recorded)"
    table = [
        [r["cause"], r["kind"], str(r["count"]), size(r["bytes"]), size(r.get("bytes_by_name")),
         size(r["theory_bytes"]), _ratio(r), *_textbook(r), r["note"]]
        for r in rows
    ]  # fmt: skip
    header = ["cause", "kind", "ops", "bytes", "by name", "theory", "ratio", "textbook", "vs textbook", "why"]
    out = [
        f"{run['name']} ({run.get('model', '')}, batch {run.get('batch')}, seq {run.get('seq')}): collectives"
    ]
    out += [
        "per device per step: compiled (read from the HLO), theory (what our construction should move,",
        "from the layout) and the textbook (the strategy's minimum from the parallelism math alone);",
        "by name: bytes whose cause an op name states (the rest placed from mesh axes, or unattributed);",
        "vs textbook: compiled / textbook, 'over' where our construction exceeds the textbook;",
        "none: no textbook figure",
        "",
    ]
    out += grid(header, table, text_last=True)
    reasons = sorted(
        {f"{r['cause']}: {r['textbook_note']}" for r in rows if r.get("textbook_bytes", 0) is None}
    )
    out += ["", "no textbook figure:"] + [f"  {reason}" for reason in reasons] if reasons else []
    out += ["", "causes:"] + [
        f"  {cause}: {what}" for cause, what in CAUSES.items() if any(r["cause"] == cause for r in rows)
    ]
    out += ["", "the ops behind each row (op_name after the jit prefix [mesh axes]: bytes per step):"]
    for r in rows:
        for name, nbytes in r["ops"].items():
            out.append(f"  {r['cause']} {r['kind']}: {name}: {size(nbytes)}")
    return "\n".join(out)


def _collective(entry: dict[str, int]) -> str:
    return "-" if not entry["count"] else f"{size(entry['bytes'])} in {entry['count']}"


def number(value: Any) -> str:
    """A table cell: yes/NO, 1,234.5, 1,234, n/a."""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return "n/a" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def write(results: dict[str, Any], out_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write out_dir/results.json and (unless `plots` is False) the PNG plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return [path, *(write_plots(results["runs"], out) if plots else [])]
