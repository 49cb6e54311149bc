"""`run.py --predict --hardware SPEC`: each planned (mesh, strategy, M) step's predicted time on a cluster,
from the program the planner compiled (analysis/cost.py), beside the planner's memory per device.

Compile only: the planner's compile supplies both the memory and the collectives, and nothing runs. Compiled
anywhere but the cluster's backend (on this host: for cpu), the collectives are XLA:CPU's and the whole
prediction is an estimate, labelled so; predictions are unvalidated on GPUs and TPUs until measured.

With --measure the runs are trained and timed as usual, and each one's prediction for this machine (from its
step compiled again, the same program) is set beside its measured step time with the error.
"""

from collections.abc import Sequence
from typing import Any

from shardgpt.analysis import cost, hardware
from shardgpt.lab import plan, report, runner


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
        row["prediction"] = of_planner(planner, row["batch"], cluster)
    return table(rows, cluster)


def of_planner(planner: Any, batch: int, cluster: hardware.Cluster) -> dict[str, Any]:
    """cost.predict on a planner's compiled step at `batch` (plan.Planner: its HLO, config, layout)."""
    return cost.predict(
        planner.hlo[batch], planner.config, planner.strategy, dict(planner.mesh.shape), batch, planner.seq,
        planner.microbatches, cluster,
    )  # fmt: skip


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


def check_measurable(spec: str, devices: Sequence[Any], processes: int) -> None:
    """ValueError unless the cluster `spec` is the machine the runs will be timed on: its backend and device
    count (cpuxN for N simulated CPU devices; a GPU profile matching the device present), one process."""
    cluster, first = hardware.cluster(spec), devices[0]
    here = "cpu" if first.platform == "cpu" else hardware.for_device_kind(first.device_kind)
    fits = cluster.profile.name == here and cluster.devices == len(devices)
    if processes > 1 or not fits:
        name = here or first.device_kind
        raise ValueError(
            f"--measure times the runs on this machine ({len(devices)} {name} devices, {processes} "
            f"process(es)), so --hardware must be it, e.g. {name}x{len(devices)}, on one process (got {spec})"
        )


def beside_measured(runs: list[dict[str, Any]], specs: Sequence[Any], spec: str) -> str:
    """Set each run's "prediction" (cost.predict on its step, compiled again) with its measured step time and
    the error per overlap bound; return the table. `runs` and `specs` in the same order."""
    cluster = hardware.cluster(spec)
    for run, run_spec in zip(runs, specs, strict=True):
        s = runner.prepare(run_spec)
        seq, m = s.task.seq_len, run_spec.microbatches
        text = plan.lower_step(s.make_step, s.model, s.tx, s.mesh, s.strategy, run_spec.batch, seq, m)
        p = cost.predict(
            text.compile().as_text(),
            s.config,
            s.strategy,
            dict(s.mesh.shape),
            run_spec.batch,
            seq,
            m,
            cluster,
        )
        measured = run["step_time_s"]
        p["measured_step_time_s"] = measured
        p["error"] = {bound: t / measured - 1 for bound, t in p["step_time_s"].items()}
        run["prediction"] = p
    header = [
        "run",
        "measured ms",
        "predicted ms (none)",
        "predicted ms (full)",
        "error (none)",
        "error (full)",
    ]
    lines = [
        [r["name"], _ms(r["step_time_s"])]
        + [_ms(r["prediction"]["step_time_s"][b]) for b in ("no_overlap", "full_overlap")]
        + [f"{100 * r['prediction']['error'][b]:+.0f}%" for b in ("no_overlap", "full_overlap")]
        for r in runs
    ]
    notes = [
        f"measured: the median step time above, on this machine; predicted: cost.predict for {cluster.spec} "
        "from the same step compiled again (analysis/cost.py; the profile's figures from microbenchmarks); "
        "error: predicted / measured - 1",
    ]
    return "\n".join(report.grid(header, lines) + notes)
