"""The one-GPU benchmark's jobs that need a process of their own (gpu_apart.py starts them), the first two on
run.py's --plan flags:
  planner: run.py --plan's figures for one config (validate_plan, then plan.plan), and the same compiled
           program run on real state for a few steps: memory_stats' peak, in a process no earlier
           measurement has raised it in (where the device keeps none, gpu_apart runs it in its own);
  mock:    run.py --plan for meshes past this host's devices, i.e. jax_mock_gpu_topology's path
           (lab/target.py clears jax's backends to take it), each plan's memory and the cost model's
           prediction from the GPU compiler's collectives. Refused off a GPU.
  lever:   one lever's variant (gpu_levers.py) on its spec, in the XLA flags the parent gives it.

  python -m shardgpt.bench.gpu_child planner|mock RESULT.json [--steps N] -- RUN_PY_PLAN_FLAGS...
  python -m shardgpt.bench.gpu_child lever RESULT.json -- SPEC_JSON

XLA's flags are set as run.py --plan sets them (a lever's by the parent), before jax starts; RESULT.json is
rewritten as each part ends.
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from shardgpt.bench.gpu_run import error_text, write_json  # imports no jax
from shardgpt.cli import flags
from shardgpt.cli import run as run_command

PREDICTED = ("hardware", "step_time_s", "terms_s", "binding", "mfu")


def planner_job(args: argparse.Namespace, steps: int, out: dict[str, Any], write):
    """The planner's figures for the one planned config, then its compiled program run live."""
    import jax
    import numpy as np

    from shardgpt.analysis import metrics
    from shardgpt.cli import planning
    from shardgpt.lab import plan
    from shardgpt.parallel import sharding
    from shardgpt.training import train

    (planner,), placement = planning.validate_plan(args)
    batch = planner.spec.batch
    # Planner.memory's own compile, kept here to run: plan.plan then reads the figures it stored.
    step = (planner.make_step, planner.model, planner.tx, planner.mesh, planner.strategy)
    compiled = plan.lower_step(*step, batch, planner.seq, planner.microbatches).compile()
    planner.compiled[batch], planner.hlo[batch] = metrics.compiled_memory(compiled), compiled.as_text()
    out["plan"] = plan.plan(planner, None, placement.record())  # no budget: no max-batch search
    out |= dict(placement=placement.describe(), budget_bytes=placement.budget)
    write()
    state, _ = train.init_state(planner.model, planner.tx, planner.mesh, planner.strategy)
    tokens = np.random.default_rng(0).integers(0, planner.config.vocab_size, (batch, planner.seq + 1))
    tokens = tokens.astype(np.int32)
    where = sharding.batch_sharding(planner.mesh, planner.strategy)
    placed = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, where)
    for _ in range(steps):
        state, _ = compiled(state, placed)
    jax.block_until_ready(state)
    device = planner.mesh.devices.flat[0]
    peak = metrics.device_peak_bytes(device)
    note = None if peak else f"{device.platform} reports no memory_stats peak_bytes_in_use: no live peak"
    out |= dict(live_steps=steps, live_peak_bytes=peak, live_note=note)


def mock_job(args: argparse.Namespace, steps: int, out: dict[str, Any], write):
    """Each mesh planned on a mock GPU topology, with the cost model's prediction for that many GPUs."""
    import jax

    from shardgpt.lab import target  # imports no more of jax than this

    first = jax.devices()[0]
    if first.platform != "gpu":  # run.py --plan plans on XLA:CPU here; the mock path itself refuses
        needed = max(target.devices_needed(mesh, len(jax.devices())) for mesh in args.mesh)
        try:
            target._mock_gpus(needed)
        except ValueError as e:
            out |= dict(status="skipped", error=str(e))
            return
    from shardgpt.analysis import cost, hardware
    from shardgpt.cli import planning
    from shardgpt.lab import plan

    planners, placement = planning.validate_plan(args)  # target.place: a mock topology past this host's GPUs
    out |= dict(compiled_for=placement.compiled_for, placement=placement.describe(), rows=[])
    out["budget_bytes"] = placement.budget
    spec = f"{placement.target}x{len(placement.devices)}" if placement.target else None
    for planner in planners:
        row = plan.plan(planner, None, placement.record())
        row["fits"] = None if placement.budget is None else row["compiled"]["total_bytes"] <= placement.budget
        if spec:
            p = cost.predict(
                planner.hlo[row["batch"]], planner.config, planner.strategy, dict(planner.mesh.shape),
                row["batch"], planner.seq, planner.microbatches, hardware.cluster(spec),
            )  # fmt: skip
            row["prediction"] = {k: p[k] for k in PREDICTED}
        out["rows"].append(row)
        write()


def lever_job(spec: dict[str, Any], out: dict[str, Any], write):
    """In the lever's own process: spec's jax options set, then its config measured as the parent measures
    it (decode: bench_decode; train: bench_train_dispatched, `untimed` calls first); figures into `out`."""
    import jax  # here, not at the top: the parent's XLA_FLAGS are in place before jax starts

    from shardgpt.bench import gpu_parts as parts
    from shardgpt.bench import gpu_sections as sections
    from shardgpt.parallel.mesh import make_mesh

    s = parts.TINY if spec["tiny"] else parts.FULL
    device = jax.devices()[0]
    attention = spec.get("attention", "xla")
    matrix = (["unrolled"], [attention], [spec["batch"]])
    mesh = make_mesh("dp=1", [device])
    ctx = sections.Context(s, spec["tiny"], device, mesh, attention, None, Path(), matrix)
    out |= dict(spec=spec, xla_flags=os.environ.get("XLA_FLAGS", ""), jax_version=jax.__version__)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, value in spec.get("jax", {}).items():
            jax.config.update(name, value)
        if spec["kind"] == "decode":
            bandwidth = spec.get("bandwidth") or parts.copy_bandwidth(s.copy_elements, 10)
            model, params = sections.decode_params(ctx, spec["model"])
            out |= parts.bench_decode(model, params, ctx.mesh, spec["batch"], s, bandwidth)
        else:
            cfg = sections.model_config(
                ctx, spec["model"], attention=attention, scan_layers=spec["layers"] == "scan"
            )
            out |= parts.bench_train_dispatched(cfg, ctx.mesh, spec["batch"], s, spec["untimed"])
    # PGLE says so where its profile came back empty (no device trace: a CPU, or CUPTI taken by another tool)
    out["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})[:5]
    write()


def run_job(job: str, plan_argv: list[str], steps: int, result: Path | None = None) -> dict[str, Any]:
    """One job on run.py's --plan flags (a lever: on its spec, JSON): its outcome (ok, skipped or error, with
    the reason), also written to `result` as it goes. In a fresh process XLA's flags are set as run.py --plan
    sets them (a lever's, by the parent); in one where jax has started (gpu_apart runs the planner here where
    the device keeps no memory peak), as they are."""
    out: dict[str, Any] = dict(job=job, argv=plan_argv, status=None, error=None)
    write = lambda: result and write_json(result, out)
    if job == "lever":
        body = lambda: lever_job(json.loads(plan_argv[0]), out, write)
    else:
        args = flags.parse_args(run_command.build_parser(), plan_argv)
        flags.set_xla_flags(args.devices, True, args.gpu_flags)  # as run.py --plan: only before jax starts
        body = lambda: (planner_job if job == "planner" else mock_job)(args, steps, out, write)
    try:
        body()
        out["status"] = out["status"] or "ok"
    except Exception as e:  # recorded for the benchmark, which goes on
        out |= dict(status="error", error=error_text(e))
    write()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one job (run_job) into RESULT.json. Exits 0: the outcome is in the file."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m shardgpt.bench.gpu_child", description=__doc__.split("\n")[0])
    p.add_argument("job", choices=("planner", "mock", "lever"))
    p.add_argument("result", help="the JSON file to write")
    p.add_argument("--steps", type=int, default=3, help="planner: steps run live (default 3)")
    opts = p.parse_args(argv[:split])
    run_job(opts.job, argv[split + 1 :], opts.steps, Path(opts.result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
