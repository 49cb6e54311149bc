"""run.py's compile-only branch: --plan (will it fit), --predict (step time on a cluster) and --recommend
(the cluster's layouts searched), each validated before anything compiles, then compiled and tabled.

Imports no jax at module level (cli/run.py imports it before the flags are set); the grid of specs and
the output checks are cli/specs.py's, which run.py shares.
"""

import argparse
import shlex
import sys
import time
from typing import Any

from shardgpt.cli import flags, specs


def _check_attention(args: argparse.Namespace, placement: Any) -> None:
    """Set --attention's default for the devices compiled on; ValueError where cuDNN's cannot compile."""
    devices = placement.devices
    args.attention = args.attention or flags.default_attention(devices[0])
    attention = dict(args.overrides).get("attention", args.attention)
    if attention == "cudnn" and devices[0].platform != "gpu":
        raise ValueError(
            f"--plan --attention cudnn: cuDNN's attention compiles only for NVIDIA GPUs, and this plan "
            f"compiles for {placement.compiled_for}: plan it on a GPU host, or plan --attention xla"
        )


def validate_plan(args: argparse.Namespace) -> tuple:
    """--plan: (planners, their target.Placement), every one validated; nothing compiles. --recommend:
    (its base RunSpec, the Placement) instead, the model and sequence checked.

    The meshes compile on the accelerator present (a mock GPU topology past its device count), else on
    XLA:CPU's simulated devices (an estimate), in the accelerators' compute dtype (bfloat16) unless --dtype
    says otherwise; each mesh over the first devices it needs.
    """
    from shardgpt.analysis import hardware
    from shardgpt.lab import plan, predict, recommend, target

    if args.init_from or args.task != "sort":
        raise ValueError("--plan takes a preset (--model) and --seq, not --init-from or --task")
    given = plan.parse_bytes(args.device_memory) if args.device_memory else None
    if args.recommend:  # every device present; the budget the cluster's device's unless given
        placement = target.place(["dp=-1"], hardware.cluster(args.hardware).profile.name, given)
        _check_attention(args, placement)
        base = specs.make_specs(args, len(placement.devices), "accelerator")[0]
        cfg, seq = recommend.resolve(base.model, base.overrides, base.dtype, base.attention, base.seq)
        if seq > cfg.block_size:
            raise ValueError(
                f"--seq {seq} exceeds {base.model}'s context {cfg.block_size}: give a shorter one"
            )
        specs.check_outputs(args)
        return base, placement
    placement = target.place(args.mesh or ["dp=-1"], args.target, given)
    _check_attention(args, placement)
    devices = placement.devices
    grid = specs.make_specs(args, len(devices), "accelerator")
    # Each mesh over the first devices it needs: "dp=2" plans on 2 of 8 simulated devices, or of 8 GPUs.
    first = lambda spec: devices[: target.devices_needed(spec.mesh, len(devices))]
    planners = specs.prepare_all(grid, args, lambda spec: plan.Planner.prepare(spec, first(spec)))
    if args.predict:  # a mesh larger than the cluster, refused before anything compiles
        predict.check(planners, args.hardware)
    specs.check_outputs(args)
    return planners, placement


def run_plan(work: Any, placement: Any, args: argparse.Namespace, argv: list[str]) -> int:
    """Compile every planner's step (abstract arrays only), print the ranked table, write results.json;
    with --recommend, run_recommend."""
    from shardgpt.lab import html_report, predict, runner
    from shardgpt.lab import plan as planning

    if args.recommend:
        return run_recommend(work, placement, args, argv)
    planners, started, devices = work, time.perf_counter(), placement.devices
    print(
        f"planning {len(planners)} run(s) on up to {len(devices)} {devices[0].device_kind} devices: compile "
        f"only, nothing allocated; the figures: {placement.describe()}"
    )
    if placement.budget is None:
        print("note: no --device-memory or --target: fits and max batch are not computed")
    rows = []
    for planner in planners:
        row = planning.plan(planner, placement.budget, placement.record())
        print(f"{row['name']}: {row['compiles']} compile(s), {row['wall_s']:.1f} s", file=sys.stderr)
        rows.append(row)
    if args.predict:
        print("\n" + predict.add(rows, planners, args.hardware))
    rows = planning.rank(rows)
    print("\n" + planning.table(rows, placement.describe()))
    print(f"wall time {time.perf_counter() - started:.0f} s for {sum(r['compiles'] for r in rows)} compiles")
    if args.out:
        meta = runner.meta(shlex.join([flags.prog(specs.SCRIPT), *argv]))
        paths = planning.write(rows, meta, args.out, plots=not args.no_plots)
        paths.append(html_report.write(args.out))  # report.html, rendered from the results.json just written
        print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


def run_recommend(base: Any, placement: Any, args: argparse.Namespace, argv: list[str]) -> int:
    """Search the cluster's layouts analytically, compile the best few, print the ranked table and the
    winner's reason, and write results.json's "recommendation"."""
    from shardgpt.analysis import hardware
    from shardgpt.lab import recommend, recommend_table, report, runner

    started = time.perf_counter()
    cluster = hardware.cluster(args.hardware)
    cfg, seq = recommend.resolve(base.model, base.overrides, base.dtype, base.attention, base.seq)
    cfg = cfg.replace(scan_layers=base.scan)
    budget = placement.budget
    print(
        f"recommending a layout of {base.model} for {cluster.spec}: global batch {base.batch} x seq {seq}, "
        f"{cfg.dtype}, {cfg.attention} attention, within {report.size(budget)} per device "
        f"({placement.budget_source})"
    )
    result = recommend.search(cfg, cluster, base.batch, seq, budget)
    log = lambda text: print(text, file=sys.stderr, flush=True)
    log(f"analytic search: {result['searched']} layouts in {time.perf_counter() - started:.1f} s")
    if not result["ranked"] and result["refused"] and not result["over"]:
        label, why = next(iter(result["refused"].items()))
        raise SystemExit(f"{specs.SCRIPT}: error: no layout of {cluster.spec} lays out ({label}: {why})")
    recommend_table.confirm(
        result["ranked"], base, placement.devices, placement.record(), cluster, log, budget
    )
    why = recommend.reason(result, cluster, budget)
    print("\n" + recommend_table.table(result, cluster, budget, why))
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        meta = runner.meta(shlex.join([flags.prog(specs.SCRIPT), *argv]))
        record = recommend.record(result, cluster, budget, why)
        (path,) = report.write({"meta": meta, "recommendation": record}, args.out, plots=False)
        print(f"\nwrote {path}")
    return 0
