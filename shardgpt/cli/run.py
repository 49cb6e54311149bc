"""Compare sharding strategies side by side: flags -> run specs -> shardgpt.lab -> table, results.json, plots.

With no flags: every strategy on dp=2,tp=4 (8 simulated CPU devices when no accelerator is present), gpt-pico
on the sort task, then a generation benchmark. jax is imported only after the flags are parsed, since
--devices and the multi-host settings must take effect before jax initialises. `experiments/run.py` and
the `shardgpt-run` command call `main`.
"""

import argparse
import shlex
import sys
from pathlib import Path

from shardgpt.analysis import hardware  # no jax: the profiles are the --target choices
from shardgpt.cli import flags
from shardgpt.cli.flags import STRATEGIES, say
from shardgpt.cli.planning import run_plan, validate_plan  # the compile-only branch: --plan, --recommend
from shardgpt.cli.specs import SCRIPT, check_outputs, make_specs, microbatch_counts, prepare_all

DEFAULT_GENERATE = 32


def build_parser() -> argparse.ArgumentParser:
    """The command line; dotted --model.FIELD=VALUE overrides are parsed apart (see parse_args)."""
    p = argparse.ArgumentParser(
        prog=flags.prog(SCRIPT),
        description=__doc__.split("\n")[0],
        epilog="Overrides: --model.FIELD=VALUE for any ModelConfig field (e.g. --model.n_layer=4), "
        "--optim.FIELD=VALUE for any OptimConfig field (learning_rate, warmup_steps, total_steps, "
        "min_lr_ratio, weight_decay, b1, b2, grad_clip; e.g. --optim.weight_decay=0).",
    )
    what = p.add_argument_group("what to compare")
    what.add_argument(
        "--mesh", action="append", help="mesh spec, repeatable (default: dp=2,tp=4 on 8 devices, else dp=-1)"
    )
    pick = what.add_mutually_exclusive_group()
    pick.add_argument("--strategy", help=f"comma list of {', '.join(STRATEGIES)}, fsdp (default: all)")
    pick.add_argument(
        "--compare",
        action="store_true",
        help="every strategy on every mesh, and each one +sp where tp > 1 and the sequence splits over tp "
        "(without --strategy or --compare: the four strategies)",
    )
    what.add_argument(
        "--sp",
        action="store_true",
        help="Megatron sequence parallelism: every strategy as its +sp variant (needs tp > 1 dividing the "
        "sequence)",
    )
    what.add_argument(
        "--impl",
        choices=("gspmd", "shard_map", "explicit", "both", "all"),
        default="gspmd",
        help="GSPMD (jit shardings), shard_map (explicit collectives), explicit (sharding in types); both: "
        "the first two, all: the three (default gspmd)",
    )
    what.add_argument(
        "--plan",
        action="store_true",
        help="will it fit: compile only (nothing allocated, no step run) and print each strategy's memory "
        "per device, and with --device-memory or --target the largest batch that fits",
    )
    what.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="--plan: memory of one device, e.g. 80GiB (default: the accelerator's own where the plan is for "
        "it, else --target's)",
    )
    what.add_argument(
        "--target",
        choices=hardware.names(),
        metavar="NAME",
        help=f"--plan: the machine the plan is for, one of {', '.join(hardware.names())} (default: the "
        "accelerator present, if it has a profile); on a CPU host the figures are an XLA:CPU estimate",
    )
    flags.add_predict_flags(what)
    flags.add_model_flags(p)
    loop = p.add_argument_group("training and measurement")
    loop.add_argument("--steps", type=int, default=100)
    loop.add_argument("--batch", type=int, default=64, help="global batch size")
    loop.add_argument(
        "--microbatches",
        type=microbatch_counts,
        default="1",
        metavar="M",
        help="gradient accumulation: the batch as M microbatches inside each step, or a comma list of M "
        "to compare (M must divide the per-dp batch; default 1)",
    )
    loop.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (= --optim.learning_rate)")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument(
        "--warmup", type=int, help="steps left out of the median step time (default: 5, fewer than --steps)"
    )
    loop.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help=f"benchmark generating N tokens after training (default {DEFAULT_GENERATE}; 0: off)",
    )
    loop.add_argument(
        "--out", default="results", metavar="DIR", help="results.json and plots (default results/)"
    )
    loop.add_argument(
        "--no-plots", action="store_true", help="write results.json only (no matplotlib needed)"
    )
    loop.add_argument("--profile", metavar="DIR", help="jax.profiler trace of a few steps per run")
    flags.add_log_every(loop)
    loop.add_argument(
        "--explain",
        metavar="RUN",
        help="print one run's collectives by cause beside theory, with the ops behind each row, from --out's "
        "results.json (RUN: its name as the table prints it, a unique part of it, or its index) and exit",
    )
    flags.add_device_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; exits with status 2 and a one-line reason on bad input."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = flags.parse_args(parser, argv)
    if args.explain is not None:
        try:
            print(explain(args.out, args.explain))
        except ValueError as e:
            parser.error(str(e))
        return 0
    flags.predict_implies_plan(args, parser)  # and --recommend's conflicts, before jax starts
    if args.target and not args.plan:
        parser.error(
            f"--target {args.target} names the machine a --plan is for: give --plan, or drop --target"
        )
    launched = flags.launch_if_asked("shardgpt.cli.run", parser, args, argv)
    if launched is not None:
        return launched
    flags.set_xla_flags(args.devices, args.plan, args.gpu_flags)
    try:  # only validation is caught: an error during a run is a bug, and keeps its traceback
        work = validate_plan(args) if args.plan else validate(args)
    except (ValueError, FileNotFoundError) as e:  # the library's validation errors say what to change
        parser.error(str(e).splitlines()[0])
    return run_plan(*work, args, argv) if args.plan else compare(work, args, argv)


def explain(out: str, which: str) -> str:
    """report.explain for the run of `out`/results.json named (exactly, or by a unique part) or numbered
    `which`; ValueError saying what to give where none or several match."""
    import json

    from shardgpt.lab import report

    path = Path(out) / "results.json"
    if not path.is_file():
        raise ValueError(
            f"--explain reads {path}, which does not exist: run the comparison first, or give --out"
        )
    try:
        runs = json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"--explain: {path} is not a results.json of run.py ({e})") from None
    names = [r["name"] for r in runs]
    if which.isdigit() and int(which) < len(runs):
        return report.explain(runs[int(which)])
    matches = [r for r in runs if r["name"] == which] or [r for r in runs if which in r["name"]]
    if len(matches) > 1 and len(gspmd := [r for r in matches if r["impl"] == "gspmd"]) == 1:
        matches = gspmd  # "dp=2,tp=4 dp" names the GSPMD run, not also "... dp shard_map"
    if len(matches) != 1:
        found = "several runs match" if matches else "no run matches"
        raise ValueError(
            f"--explain {which!r}: {found}; the runs in {path}: {'; '.join(names)} (or 0-{len(runs) - 1})"
        )
    return report.explain(matches[0])


def validate(args: argparse.Namespace) -> list:
    """Initialise jax (multi-host first), then check every spec and output path: nothing compiles."""
    import jax

    from shardgpt.lab import runner
    from shardgpt.parallel import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    platform = jax.devices()[0].platform
    if args.devices and platform != "cpu":
        say(f"note: --devices ignored: {jax.device_count()} {platform} devices are present")
    elif args.devices and jax.device_count() != args.devices * jax.process_count():
        raise ValueError(f"--devices {args.devices}: jax was initialised with {jax.device_count()} devices")
    if args.generate is None:
        args.generate = DEFAULT_GENERATE
    args.attention = args.attention or flags.default_attention(jax.devices()[0])
    specs = make_specs(args, jax.device_count(), platform)
    for setup in prepare_all(specs, args, runner.prepare):  # every spec validated before the first compile
        flags.note_tp_across_hosts(setup.mesh)
    if args.measure:  # before any run: the prediction must be for the devices that will be timed
        from shardgpt.lab import predict

        predict.check_measurable(args.hardware, jax.devices(), jax.process_count())
    if jax.process_index() == 0:
        check_outputs(args)
    return specs


def compare(specs: list, args: argparse.Namespace, argv: list[str]) -> int:
    """Train and measure every spec, then print the table and write results.json (and the plots)."""
    import jax

    from shardgpt.analysis import metrics
    from shardgpt.lab import experts, html_report, report, runner

    kind, platform = jax.devices()[0].device_kind, jax.devices()[0].platform
    peak = metrics.peak_flops(kind)
    first = specs[0]
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    say(
        f"{jax.device_count()} x {kind} ({platform}{processes}), jax {jax.__version__}; {len(specs)} "
        f"run(s) of {runner.model_label(first)} on {first.task}, batch {first.batch}, {first.steps} steps, "
        f"{first.dtype}, {first.attention} attention"
    )
    peak_text = f"{peak:.3g} FLOP/s per device" if peak else "unknown for this device (MFU n/a)"
    say(f"MFU from FLOPs/token = {runner.FLOPS_SOURCE}; peak: {peak_text}")
    runs = []
    for spec in specs:
        result = runner.run(spec, progress=jax.process_index() == 0, log_every=args.log_every)
        say(
            f"{result['name']}: compile {result['compile_s']:.2f} s, step {1e3 * result['step_time_s']:.2f} "
            f"ms, {result['tokens_per_s']:,.0f} tokens/s, final loss {result['final_loss']:.6f}"
        )
        if result["moe"]:
            say(f"  routing after training: {experts.summary(result['moe']['at'][-1])}")
        runs.append(result)
    if args.measure:  # each run's prediction on this machine beside its measured step time
        from shardgpt.lab import predict

        say("\n" + predict.beside_measured(runs, specs, args.hardware))
    command = shlex.join([flags.prog(SCRIPT), *argv])
    results = {"meta": runner.meta(command), "runs": runs, "agreement": report.agreement(runs)}
    say("\n" + report.table(results))
    if jax.process_index() == 0 and args.out:
        paths = report.write(results, args.out, plots=not args.no_plots)
        paths.append(html_report.write(args.out))  # report.html, rendered from the results.json just written
        say(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
