"""The recommender's confirmation and its table: the top candidates compiled by the planner (memory and a
prediction from the compiled collectives), and the ranked table with every figure's source."""

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from shardgpt.analysis import estimate, hardware
from shardgpt.lab import plan, predict, recommend, report
from shardgpt.lab.target import ESTIMATE

SHOWN = 10  # rows of the ranked table


def confirm(
    ranked: list[dict[str, Any]],
    base_spec: Any,
    devices: Sequence[Any],
    where: dict[str, Any],
    cluster: hardware.Cluster,
    say=print,
    budget: int | None = None,
) -> None:
    """Compile the first recommend.CONFIRM rows with the planner (abstract arrays, nothing allocated) and set
    each row's "confirmed": compiled memory and the prediction from the compiled collectives, with `where`
    (target.Placement.record); or a note where its mesh needs more devices than are present.

    Where none of them compiles within `budget`, go on down the ranking, up to CONFIRM rows more, until
    one does: a recommendation should end with a layout that fits as compiled."""
    for i, row in enumerate(ranked[: 2 * recommend.CONFIRM]):
        if i >= recommend.CONFIRM and (budget is None or _any_fits(ranked[:i], budget)):
            break
        c = row["candidate"]
        note = recommend.needs_devices(c, len(devices))
        if note is not None:
            row["confirmed"] = {"note": note}
            continue
        spec = dataclasses.replace(
            base_spec, mesh=c.mesh_spec, strategy=c.strategy, impl=c.impl, microbatches=c.microbatches,
            remat=c.remat,
        )  # fmt: skip
        started = time.perf_counter()
        planner = plan.Planner.prepare(spec, list(devices)[: c.devices])
        memory = planner.memory(spec.batch)
        prediction = predict.of_planner(planner, spec.batch, cluster)
        wall = time.perf_counter() - started
        row["confirmed"] = {"memory": memory, "prediction": prediction, "compile_s": wall, **where}
        say(f"confirmed #{row['rank']} {c.label()}: compiled in {wall:.1f} s")


def _compiled_memory(done: dict[str, Any], budget: int) -> str:
    if "memory" not in done:
        return "-"
    total = done["memory"]["total_bytes"]
    return report.size(total) + (" (over)" if total > budget else "")


def _compiled_total(row: dict[str, Any]) -> int:
    return row["confirmed"]["memory"]["total_bytes"]


def _any_fits(rows: list[dict[str, Any]], budget: int) -> bool:
    return any("memory" in r["confirmed"] and _compiled_total(r) <= budget for r in rows)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def table(result: dict[str, Any], cluster: hardware.Cluster, budget: int, why: str) -> str:
    """The ranked candidates as text, each column labelled with where its figure comes from, the counts
    searched, and the winner's reason."""
    header = ["#", "mesh", "strategy", "M", "remat", "mem (analytic)", "mem (compiled)"]
    header += ["step ms none-full", "tokens/s", "MFU", "binds", "compiled: step ms none-full"]
    lines = []
    for r in result["ranked"][:SHOWN]:
        c, p, done = r["candidate"], r["prediction"], r.get("confirmed") or {}
        mfu = p["mfu"][recommend.RANK_BOUND]
        steps = p["step_time_s"]
        compiled_step = "-"
        if "prediction" in done:
            s = done["prediction"]["step_time_s"]
            compiled_step = f"{_ms(s['no_overlap'])}-{_ms(s['full_overlap'])}"
        elif "note" in done:
            compiled_step = f"needs {c.devices} devices"
        lines.append(
            [str(r["rank"]), c.mesh_spec, c.strategy, str(c.microbatches), "yes" if c.remat else "no"]
            + [report.size(r["memory"]["total_bytes"])]
            + [_compiled_memory(done, budget)]
            + [f"{_ms(steps['no_overlap'])}-{_ms(steps['full_overlap'])}"]
            + [f"{p['tokens_per_s'][recommend.RANK_BOUND]:,.0f}", "-" if mfu is None else f"{100 * mfu:.1f}%"]
            + [p["binding"], compiled_step]
        )
    confirmed = [r["confirmed"] for r in result["ranked"] if r.get("confirmed")]
    done = next((d for d in confirmed if "compiled_for" in d), None)
    notes = [
        f"a PREDICTION for {cluster.spec} ({cluster.nodes} node(s) of {cluster.devices_per_node} "
        f"{cluster.profile.name}), unvalidated on GPUs and TPUs until measured (BENCHMARKS.md, issue 28)",
        f"searched {result['searched']} layouts: {len(result['refused'])} do not lay out, "
        f"{len(result['over'])} exceed {report.size(budget)} per device (analytic), {len(result['ranked'])} "
        f"fit; ranked by predicted tokens/s at the {recommend.RANK_BOUND} bound",
        f"mem (analytic): {estimate.MEMORY_SOURCE}",
        "step ms none-full, tokens/s, MFU, binds: cost.predict on theory's collectives (no compile): "
        "communication not overlapped - fully overlapped; tokens/s and MFU at the first",
    ]
    compiled = [r for r in result["ranked"] if "memory" in (r.get("confirmed") or {})]
    if done is not None:
        estimate_for = f", an {ESTIMATE} for {cluster.profile.name}" if done["estimate"] else ""
        notes.append(
            f"mem (compiled), compiled: the top {len(compiled)} compiled by the planner for "
            f"{done['compiled_for']}{estimate_for}: XLA's buffer assignment, and cost.predict on the "
            "compiled collectives"
        )
    if any(_compiled_total(r) > budget for r in compiled):
        notes.append(
            "(over): the compiled total exceeds the budget; XLA:CPU's temporaries ran 1.6-2.2x an H200's on "
            "gpt2 (BENCHMARKS.md), so on the target it may fit: check with --plan on the target"
        )
    unconfirmed = {d["note"] for d in confirmed if "note" in d}
    notes += sorted(unconfirmed)
    notes.append(f"recommended: {why}")
    if compiled and compiled[0] is result["ranked"][0] and _compiled_total(compiled[0]) > budget:
        fits = next((r for r in compiled if _compiled_total(r) <= budget), None)
        label = (
            f"#{fits['rank']}, {fits['candidate'].label()}" if fits else f"none of the top {len(compiled)}"
        )
        notes.append(
            f"  but its compiled total is over the budget; the best whose compiled total fits: {label}"
        )
    return "\n".join(report.grid(header, lines) + notes)
