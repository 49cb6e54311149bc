"""report.html: one self-contained page of a comparison, a memory plan or a training run, every figure
labelled with where it comes from (compiled program, live arrays or device, layout/theory, measured).

It renders results.json as written (so the page and the file agree, and a saved run can be re-rendered) or
a train run's metrics.jsonl; html_page.py draws it. Needs no jax.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shardgpt.lab import html_collectives, html_plan
from shardgpt.lab import html_page as H
from shardgpt.lab.html_page import COMPILED, LAYOUT, LIVE, MEASURED, THEORY
from shardgpt.lab.report import GENERATE_COLUMNS, agreement, number, pipeline_bubbles, size

NAME = "report.html"


def write(out_dir: str | Path) -> Path:
    """out_dir/report.html from out_dir/results.json (a comparison's runs or a plan's rows)."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    path = out / NAME
    path.write_text(render(results), encoding="utf-8")
    return path


def render(results: dict[str, Any]) -> str:
    """The page of a results dict: a plan where it has "plan" rows, else a comparison of its "runs"."""
    return html_plan.plan_page(results) if "plan" in results else comparison_page(results)


def _mesh(mesh: dict[str, int]) -> str:
    return ",".join(f"{axis}={n}" for axis, n in mesh.items() if n > 1) or "1 device"


def _verdicts(checks: Sequence[dict]) -> dict[str, str]:
    verdict = {name: "ok" for c in checks for name in c["runs"]}
    verdict |= {name: f"drifts@{step}" for c in checks for name, step in c["drift"].items()}
    return verdict | {name: "DISAGREES" for c in checks for name in c["disagree"]}


def comparison_table(runs: Sequence[dict], checks: Sequence[dict]) -> str:
    """The terminal's comparison table (report.table's columns), a row of sources under its header."""
    verdict = _verdicts(checks)
    rows = []
    for r in runs:
        mem, ideal = r["memory"], r.get("expected_memory", {})
        state = [
            f"{size(mem[f'{k}_bytes_per_device'])} ({size(ideal.get(f'{k}_bytes_per_device'))})"
            for k in ("params", "grads", "opt_state")
        ]
        rows.append(
            [
                r["name"],
                str(r.get("microbatches", 1)),
                f"{r['compile_s']:.2f}",
                f"{1e3 * r['step_time_s']:.2f}",
            ]
            + [f"{r['tokens_per_s']:,.0f}", "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", *state]
            + [size(mem.get("temp_bytes_per_device")), size(mem.get("peak_bytes_per_device"))]
            + [f"{r['final_loss']:.6f}", verdict.get(r["name"], "-")]
        )
    header = ["run", "M", "compile (s)", "step (ms)", "tokens/s", "MFU", "params", "grads*", "opt state"]
    header += ["temps", "peak", "final loss", "agrees"]
    state = f"{LIVE} (ideal: {THEORY})"
    sources = ["", "config", f"{MEASURED} (wall)", f"{MEASURED} (median)", "derived from step time"]
    sources += ["derived (datasheet peak)", state, f"{LAYOUT} (ideal: {THEORY})", state, COMPILED, COMPILED]
    sources += [MEASURED, "vs the first equivalent run"]
    return H.table(header, rows, sources=sources, ident="comparison", text_columns=(0, 12))


def comparison_page(results: dict[str, Any]) -> str:
    """The whole report of a comparison: table, agreement, losses, memory, collectives, generation, config."""
    runs, meta = results["runs"], results.get("meta", {})
    checks = results.get("agreement") or agreement(runs)
    first = runs[0] if runs else {}
    title = f"shardgpt: {len(runs)} run(s) of {first.get('model', '?')} on {first.get('task', '?')}"
    lead = (
        f"{meta.get('num_devices', '?')} x {meta.get('device_kind', '?')} ({meta.get('platform', '?')}), "
        f"jax {meta.get('jax_version', '?')}; batch {first.get('batch')}, seq {first.get('seq')}, "
        f"{first.get('steps')} steps, {first.get('dtype')}; {meta.get('date', '')}"
    )
    peak = first.get("peak_flops")
    warmup = first.get("steps", 0) - first.get("timed_steps", 0)
    body = [H.heading(title, 1), H.para(lead, "lead"), H.heading("Runs", anchor="runs")]
    body.append(comparison_table(runs, checks))
    body.append(
        H.notes(
            [
                "M: microbatches per step (gradient accumulation inside the one jitted step).",
                "Memory per device (K, M, G = 2^10, 2^20, 2^30 bytes): params and opt state measured from "
                "the live arrays' shards; grads* derived from the layout (gradients never persist); in "
                "brackets the ZeRO paper's ideal (theory); temps and peak from the compiled program (XLA's "
                "memory_analysis; on CPU peak = arguments + outputs - aliased + temps).",
                f"Step time: median of the timed steps after {warmup} warm-up; step t+1 is dispatched "
                "before step t's loss is read (async dispatch respected).",
                f"MFU = tokens/s x FLOPs/token / (peak x devices); FLOPs/token = "
                f"{meta.get('flops_per_token_source', '6N + 12·L·H·Q·T (PaLM app. B)')} = "
                f"{first.get('flops_per_token', 0):,.0f}; peak: "
                + (
                    f"{peak:.3g} FLOP/s per device (bf16 datasheet)"
                    if peak
                    else "none known for this device: n/a"
                ),
            ]
        )
    )
    body += _agreement(checks)
    body += _losses(runs)
    body += _memory(runs)
    body += html_collectives.section(runs)
    body += _bubbles(runs)
    body += _predictions(runs)
    body += _routing(runs)
    body += _generation(runs)
    body += _config(runs)
    body += H.meta_section(meta)
    return H.page(title, body)


def _agreement(checks: Sequence[dict]) -> list[str]:
    if not checks:
        return []
    rows = [
        [", ".join(c["runs"]), c["reference"], c["dtype"], f"{c['tolerance']:g}", str(c["checked_steps"])]
        + [f"{c['max_rel_diff']:.2g}", f"{c['final_max_rel_diff']:.2g}", ", ".join(c["disagree"]) or "-"]
        + [", ".join(f"{n} at step {s}" for n, s in c["drift"].items()) or "-"]
        + ["ok" if c["ok"] else "DISAGREES"]
        for c in checks
    ]
    header = ["runs", "reference", "dtype", "tolerance", "judged steps", "max rel. diff", "final rel. diff"]
    sources = ["", "", "", "relative", "", f"{MEASURED}: losses, grad norms", f"{MEASURED}: final loss"]
    return [
        H.heading("Agreement of equivalent runs", anchor="agreement"),
        H.table(
            [*header, "disagree", "drifts", "verdict"],
            rows,
            sources=[*sources, "", "", ""],
            text_columns=(0, 1, 2, 7, 8, 9),
            ident="agreement",
        ),
        H.para(
            "Runs differing only in mesh, strategy, impl or execution-only config compute the same "
            "function. They must agree within the tolerance over the judged steps; later steps are "
            "reported, not judged: training amplifies the rounding of another reduction order, so a run can "
            "drift without a bug."
        ),
    ]


def _losses(runs: Sequence[dict]) -> list[str]:
    losses = {r["name"]: list(enumerate(r["losses"], 1)) for r in runs}
    out = [H.heading("Loss curves", anchor="losses")]
    out.append(
        H.figure(H.line_chart(losses, "step", "training loss", log_y=True), "training loss, every run")
    )
    norms = {r["name"]: list(enumerate(r.get("grad_norms") or [], 1)) for r in runs}
    if any(norms.values()):
        out.append(H.figure(H.line_chart(norms, "step", "gradient norm"), "gradient norm before clipping"))
    return out + [H.para(f"{MEASURED}: each step's own metrics, read after the step.")]


MEMORY_COLUMNS = {
    "params": "params", "opt_state": "opt state", "grads": "grads*", "argument": "arguments",
    "output": "outputs", "alias": "aliased", "temp": "temps", "peak": "peak",
}  # fmt: skip


def _memory(runs: Sequence[dict]) -> list[str]:
    keys = [f"{k}_bytes_per_device" for k in MEMORY_COLUMNS] + ["device_peak_bytes"]
    rows = [[r["name"], *(size(r["memory"].get(k)) for k in keys)] for r in runs]
    said = runs[0].get("memory_sources", {}) if runs else {}
    header = ["run", *MEMORY_COLUMNS.values(), "device peak"]
    state = ("params", "opt_state", "grads")
    ideal = [
        [r["name"], *(size(r["expected_memory"].get(f"{k}_bytes_per_device")) for k in state)]
        for r in runs
        if r.get("expected_memory")
    ]
    parts = ("params", "grads", "opt_state", "temp")
    bars = [(r["name"], [r["memory"].get(f"{k}_bytes_per_device") or 0 for k in parts]) for r in runs]
    out = [H.heading("Memory per device by source", anchor="memory")]
    out.append(H.table(header, rows, sources=["", *(said.get(k, "") for k in keys)], ident="memory"))
    if ideal:
        out.append(
            H.table(
                ["run", "params", "opt state", "grads"],
                ideal,
                sources=["", *[f"{THEORY} (the ZeRO paper's ideal)"] * 3],
                ident="ideal-memory",
                caption="the ZeRO paper's ideal per device, beside the measured figures above",
            )
        )
    chart = H.bar_chart(bars, ["params", "grads", "opt state", "temps"], "bytes per device", size)
    out.append(H.figure(chart, "memory per device: params, grads, opt state and temporaries, stacked"))
    return out + [H.para("Memory is read after compiling, before the first step donates the state.")]


def _bubbles(runs: Sequence[dict]) -> list[str]:
    bubbles = pipeline_bubbles(runs)
    if not bubbles:
        return []
    percent = lambda x: "n/a" if x is None else f"{x:.1%}"
    rows = [
        [b["name"], str(b["pp"]), str(b["microbatches"]), str(b["ticks"]), f"{1e3 * b['step_time_s']:.2f}"]
        + [percent(b["bubble_theory"]), percent(b["bubble_measured"])]
        for b in bubbles
    ]
    header = ["run", "pp", "M", "ticks", "step (ms)", "bubble", "bubble"]
    sources = ["", "", "", "M + pp - 1", MEASURED, f"{THEORY}: (pp - 1) / (M + pp - 1)", MEASURED]
    text = (
        "measured = (pp - 1) x tick time / step time; tick time: the slope of step time over ticks "
        "across runs of one microbatch size (n/a with one run); on simulated CPU devices, rough."
    )
    return H.table_section(
        "Pipeline bubble (GPipe in shard_map)", "pipeline", header, rows, text, sources=sources
    )


def _predictions(runs: Sequence[dict]) -> list[str]:
    """Each run's cost-model prediction (run.py --predict --measure) beside its measured step time."""
    predicted = [r for r in runs if r.get("prediction")]
    if not predicted:
        return []
    ms = lambda seconds: f"{1e3 * seconds:.3g}"
    bounds = ("no_overlap", "full_overlap")
    rows = [
        [r["name"], ms(r["step_time_s"])]
        + [ms(r["prediction"]["step_time_s"][b]) for b in bounds]
        + [f"{100 * r['prediction']['error'][b]:+.0f}%" for b in bounds]
        for r in predicted
    ]
    header = ["run", "step (ms)", "no overlap (ms)", "full overlap (ms)", "error", "error"]
    kind = "prediction (analysis/cost.py)"
    sources = ["", MEASURED, kind, kind, "no overlap / measured - 1", "full overlap / measured - 1"]
    title = f"Predicted beside measured ({predicted[0]['prediction']['hardware']})"
    text = (
        "The cost model's prediction for this machine, from each run's step compiled again, beside its "
        "measured median step time; the profile's figures come from microbenchmarks, never these runs."
    )
    return H.table_section(title, "predicted", header, rows, text, sources=sources)


def routing_per_layer(at: dict[str, Any]) -> list[tuple[float, float]]:
    """(share of choices dropped, busiest expert's load over the mean) per layer, of one routing record
    (results.json's moe.at[i], lab/experts.RoutingProbe's)."""
    return [
        (dropped / at["choices"], max(load) / max(sum(load) / len(load), 1e-9))
        for dropped, load in zip(at["dropped"], at["load"], strict=True)
    ]


def _routing(runs: Sequence[dict]) -> list[str]:
    """An MoE run's routing at its first and last step: the choices dropped past the capacity and the
    busiest expert's load over the mean, per layer."""
    routed = [r for r in runs if r.get("moe")]
    if not routed:
        return []
    rows = []
    for r in routed:
        for step, at in zip(r["moe"]["steps"], r["moe"]["at"], strict=True):
            dropped, busiest = zip(*routing_per_layer(at), strict=True)
            rows.append([r["name"], str(step), ", ".join(f"{d:.0%}" for d in dropped)])
            rows[-1].append(", ".join(f"{x:.2f}x" for x in busiest))
    header = ["run", "step", "dropped, per layer", "busiest expert / mean, per layer"]
    sources = ["", "before its update", MEASURED, MEASURED]
    text = (
        "Choices (tokens x top_k) routed past an expert's capacity in a routing group are dropped (the "
        "token passes through the residual); read by one forward of the run's own params on that step's "
        "batch (lab/experts.py). The same on every layout at step 1: the groups are whole rows."
    )
    return H.table_section("Expert routing", "routing", header, rows, text, sources=sources)


def _generation(runs: Sequence[dict]) -> list[str]:
    generated = [r for r in runs if r.get("generate")]
    if not generated:
        return []
    rows = [[r["name"], *(number(r["generate"].get(k)) for k in GENERATE_COLUMNS)] for r in generated]
    sources = ["", "", "tokens", "tokens", MEASURED, "counted", MEASURED, MEASURED, "compared"]
    header = ["run", *GENERATE_COLUMNS.values()]
    text = "KV-cache generator, timed; naive = re-jit per length; recompute = full forward per token."
    return H.table_section(
        "Generation", "generation", header, rows, text, sources=sources, ident="generation"
    )


RUN_FIELDS = ("model", "n_params", "mesh", "strategy", "impl", "task", "batch", "microbatches", "seq")
RUN_FIELDS += ("steps", "dtype", "lr", "seed", "wall_s")


def _config(runs: Sequence[dict]) -> list[str]:
    fields = [f for f in RUN_FIELDS if runs and f in runs[0]]
    show = lambda v: _mesh(v) if isinstance(v, dict) else f"{v:.4g}" if isinstance(v, float) else number(v)
    rows = [[r["name"], *(show(r.get(f)) for f in fields)] for r in runs]
    out = [
        H.heading("Configuration", anchor="config"),
        H.table(["run", *fields], rows, text_columns=(0, 1, 3, 4, 5, 6)),
    ]
    for key, what in (("config", "model config"), ("optim", "optimizer")):
        values = [r.get(key) for r in runs]
        if values and values[0]:
            differ = [r["name"] for r, v in zip(runs, values, strict=True) if v != values[0]]
            caption = f"{what} of {runs[0]['name']}" + (
                f" (differs in: {', '.join(differ)})" if differ else " (every run)"
            )
            out.append(H.key_values(values[0], caption=caption))
    return out
