"""Compare sharding strategies side by side: flags -> run specs -> shardgpt.lab -> table, results.json, plots.

With no flags: every strategy on dp=2,tp=4 (8 simulated CPU devices when no accelerator is present), gpt-pico
on the sort task, then a generation benchmark. jax is imported only after the flags are parsed, since
--devices and the multi-host settings must take effect before jax initialises.
"""

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # runs from a checkout (no pip install); finds generation.py

STRATEGIES = ("dp", "zero1", "zero2", "zero3")  # shardgpt.sharding.STRATEGIES, without importing jax
DEFAULT_DEVICES = 8
DEFAULT_GENERATE = 32
_MODEL_OVERRIDE = re.compile(r"^--model\.(\w+)=(.*)$")


def build_parser() -> argparse.ArgumentParser:
    """The command line; dotted --model.FIELD=VALUE overrides are parsed apart (see parse_args)."""
    p = argparse.ArgumentParser(
        prog="experiments/run.py",
        description=__doc__.split("\n")[0],
        epilog="Model overrides: --model.FIELD=VALUE for any ModelConfig field, e.g. --model.n_layer=4.",
    )
    what = p.add_argument_group("what to compare")
    what.add_argument(
        "--mesh", action="append", help="mesh spec, repeatable (default: dp=2,tp=4 on 8 devices, else dp=-1)"
    )
    pick = what.add_mutually_exclusive_group()
    pick.add_argument("--strategy", help=f"comma list of {', '.join(STRATEGIES)}, fsdp (default: all)")
    pick.add_argument("--compare", action="store_true", help="every strategy on every mesh (the default)")
    what.add_argument("--impl", choices=("gspmd", "shard_map", "both"), default="gspmd")
    model = p.add_argument_group("model and data")
    model.add_argument("--model", default="gpt-pico", help="preset name (default gpt-pico)")
    model.add_argument("--task", default="sort", help="sort, or chars:PATH (a local text file)")
    model.add_argument("--seq", type=int, help="sequence length of a chars task")
    model.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)",
    )
    model.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    model.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan layers")
    model.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")
    model.add_argument("--init-from", metavar="PATH", help="GPT-2-named checkpoint (.safetensors/.npz/.pt)")
    loop = p.add_argument_group("training and measurement")
    loop.add_argument("--steps", type=int, default=100)
    loop.add_argument("--batch", type=int, default=64, help="global batch size")
    loop.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    loop.add_argument("--seed", type=int, default=0)
    loop.add_argument("--warmup", type=int, default=5, help="steps left out of the median step time")
    loop.add_argument(
        "--generate",
        type=int,
        metavar="N",
        help=f"benchmark generating N tokens after training (default {DEFAULT_GENERATE}; 0: off)",
    )
    loop.add_argument(
        "--out", default="results", metavar="DIR", help="results.json and plots (default results/)"
    )
    loop.add_argument("--profile", metavar="DIR", help="jax.profiler trace of a few steps per run")
    where = p.add_argument_group("devices")
    where.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help=f"simulated CPU devices when no accelerator is present (default {DEFAULT_DEVICES})",
    )
    where.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="multi-host: coordinator host:port (or JAX_COORDINATOR_ADDRESS)",
    )
    where.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"))
    where.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
    return p


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags plus the --model.FIELD=VALUE overrides (as args.overrides); anything else exits 2."""
    args, unknown = parser.parse_known_args(argv)
    overrides, bad = [], []
    while unknown:
        arg = unknown.pop(0)
        if "=" not in arg and arg.startswith("--model.") and unknown:
            arg = f"{arg}={unknown.pop(0)}"  # --model.n_layer 4
        if match := _MODEL_OVERRIDE.match(arg):
            overrides.append(match.groups())
        else:
            bad.append(arg)
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (model overrides look like --model.n_layer=4)")
    args.overrides = tuple(overrides)
    return args


def _simulate_devices(n: int | None):
    """Ask XLA for n host devices; only effective before jax initialises (later the present ones are used)."""
    if "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if n is None and "xla_force_host_platform_device_count" in flags:
        return  # the environment already chose
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n or DEFAULT_DEVICES}".strip()


def make_specs(args: argparse.Namespace, num_devices: int, platform: str) -> list:
    """One RunSpec per (mesh, strategy, impl), in that order."""
    from shardgpt.lab import RunSpec

    meshes = args.mesh or ["dp=2,tp=4" if num_devices == 8 else "dp=-1"]
    strategies = STRATEGIES if args.compare or not args.strategy else args.strategy.split(",")
    impls = ("gspmd", "shard_map") if args.impl == "both" else (args.impl,)
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    common = dict(
        model=args.model, overrides=args.overrides, task=args.task, seq=args.seq, steps=args.steps,
        batch=args.batch, dtype=dtype, attention=args.attention, scan=args.scan, remat=args.remat, lr=args.lr,
        seed=args.seed, warmup=args.warmup, generate=args.generate, init_from=args.init_from,
        profile=args.profile,
    )  # fmt: skip
    grid = [(m, s.strip(), i) for m in meshes for s in strategies for i in impls]
    return [RunSpec(mesh=m, strategy=s, impl=i, **common) for m, s, i in grid]


def _generation_bench(explicit: bool, say):
    """experiments/generation.py's benchmark, or None (with a note) when it is not there yet."""
    try:
        from generation import benchmark
    except ImportError as e:
        if explicit:
            raise ValueError(f"--generate: experiments/generation.py is not available ({e})") from None
        say(f"note: generation benchmark skipped: experiments/generation.py is not available ({e})")
        return None
    return benchmark


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; exits with status 2 and a one-line reason on bad input."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(parser, argv)
    _simulate_devices(args.devices)
    try:
        return _main(args, argv)
    except (ValueError, FileNotFoundError) as e:  # the library's validation errors say what to change
        parser.error(str(e).splitlines()[0])


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    import jax

    if args.coordinator or args.num_processes:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from shardgpt import lab, metrics, report

    is_main = jax.process_index() == 0
    say = print if is_main else lambda *a, **k: None  # only process 0 prints and writes
    platform = jax.devices()[0].platform
    if args.devices and platform != "cpu":
        say(f"note: --devices ignored: {jax.device_count()} {platform} devices are present")
    elif args.devices and jax.device_count() != args.devices * jax.process_count():
        raise ValueError(f"--devices {args.devices}: jax was initialised with {jax.device_count()} devices")
    bench = _generation_bench(args.generate is not None, say) if args.generate != 0 else None
    if bench and jax.process_count() > 1:
        # shardgpt.generate feeds host arrays to a dp-sharded jit, which jax refuses across processes.
        if args.generate is not None:
            raise ValueError("--generate runs on one process only for now: drop it for multi-host runs")
        say("note: generation benchmark skipped: it runs on one process only for now")
        bench = None
    args.generate = (DEFAULT_GENERATE if args.generate is None else args.generate) if bench else 0
    specs = make_specs(args, jax.device_count(), platform)
    for spec in specs:  # every spec validated before the first compile
        lab.prepare(spec)

    kind = jax.devices()[0].device_kind
    peak = metrics.peak_flops(kind)
    first = specs[0]
    say(
        f"{jax.device_count()} x {kind} ({platform}), jax {jax.__version__}; {len(specs)} run(s) of "
        f"{lab.model_label(first)} on {first.task}, batch {first.batch}, {first.steps} steps, {first.dtype}"
    )
    peak_text = f"{peak:.3g} FLOP/s per device" if peak else "unknown for this device (MFU n/a)"
    say(f"MFU from FLOPs/token = {lab.FLOPS_SOURCE}; peak: {peak_text}")
    runs = []
    for spec in specs:
        result = lab.run(spec, generate_bench=bench, progress=is_main)
        say(
            f"{result['name']}: compile {result['compile_s']:.2f} s, step {1e3 * result['step_time_s']:.2f} "
            f"ms, {result['tokens_per_s']:,.0f} tokens/s, final loss {result['final_loss']:.6f}"
        )
        runs.append(result)
    command = shlex.join(["python", "experiments/run.py", *argv])
    results = {"meta": lab.meta(command), "runs": runs, "agreement": report.agreement(runs)}
    say("\n" + report.table(results))
    if is_main and args.out:
        paths = report.write(results, args.out)
        say(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
