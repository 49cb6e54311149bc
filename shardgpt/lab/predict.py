"""`run.py --predict --hardware SPEC`: each planned (mesh, strategy, M) step's predicted time on a cluster,
from the program the planner compiled (analysis/cost.py), beside the planner's memory per device.

Compile only: the planner's compile supplies both the memory and the collectives, and nothing runs. Compiled
anywhere but the cluster's backend (on this host: for cpu), the collectives are XLA:CPU's and the whole
prediction is an estimate, labelled so; predictions are unvalidated on GPUs and TPUs until measured.
"""

from typing import Any

from shardgpt.analysis import cost, hardware
from shardgpt.lab import report


def check(planners: list[Any], spec: str) -> None:
    """ValueError unless every planner's mesh fits the cluster `spec`: before anything compiles."""
    cluster = hardware.cluster(spec)
    for planner in planners:
        cost.check_fits(dict(planner.mesh.shape), cluster)


def add(rows: list[dict[str, Any]], planners: list[Any], spec: str) -> str:
    """Set each plan row's "prediction" (cost.predict on its planner's compiled step, at the row's batch)
    and return the table; rows and planners in the same order."""
    cluster = hardware.cluster(spec)
    for row, planner in zip(rows, planners, strict=True):
        row["prediction"] = cost.predict(
            planner.hlo[row["batch"]], planner.config, planner.strategy, dict(planner.mesh.shape),
            row["batch"], planner.seq, planner.microbatches, cluster,
        )  # fmt: skip
    return table(rows, cluster)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}"


def table(rows: list[dict[str, Any]], cluster: hardware.Cluster) -> str:
    """The predictions as text: memory, both step-time bounds, tokens/s, MFU and the binding term."""
    header = ["run", "memory", "step ms (none)", "step ms (full)", "tokens/s (full)", "MFU (full)", "binds"]
    header += ["compute ms", "memory ms", "comm ms (inter)"]
    lines = []
    for r in rows:
        p, t = r["prediction"], r["prediction"]["terms_s"]
        mfu = p["mfu"]["full_overlap"]
        lines.append(
            [r["name"], report.size(r["compiled"]["total_bytes"])]
            + [_ms(p["step_time_s"]["no_overlap"]), _ms(p["step_time_s"]["full_overlap"])]
            + [f"{p['tokens_per_s']['full_overlap']:,.0f}", "-" if mfu is None else f"{100 * mfu:.1f}%"]
            + [p["binding"], _ms(t["compute"]), _ms(t["memory"])]
            + [f"{_ms(t['communication'])} ({_ms(t['communication_inter_node'])})"]
        )
    constants = rows[0]["prediction"]["constants"] if rows else {}
    compiled_for = rows[0].get("compiled_for", "?") if rows else "?"
    estimate = compiled_for != cluster.profile.backend
    notes = [
        f"a PREDICTION for {cluster.spec} ({cluster.nodes} node(s) of {cluster.devices_per_node} "
        f"{cluster.profile.name}), from the program compiled for {compiled_for}"
        + (" (an estimate: the target's compiler may differ)" if estimate else ""),
        "unvalidated on GPUs and TPUs until measured; on this CPU: BENCHMARKS.md's error table",
        "memory: the planner's compiled total per device; step (none / full): communication not overlapped / "
        "fully overlapped with max(compute, memory); binds: the largest term",
    ]
    notes += [f"  {name}: {c['value']:.4g} ({c['source']})" for name, c in constants.items()]
    return "\n".join(report.grid(header, lines) + notes)
