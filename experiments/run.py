"""Compare sharding strategies side by side: flags -> run specs -> shardgpt.lab -> table, results.json, plots.

With no flags: every strategy on dp=2,tp=4 (8 simulated CPU devices when no accelerator is present), gpt-pico
on the sort task, then a generation benchmark. jax is imported only after the flags are parsed, since
--devices and the multi-host settings must take effect before jax initialises.
"""

import argparse
import importlib.util
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, no pip install

STRATEGIES = ("dp", "zero1", "zero2", "zero3")  # shardgpt.sharding.STRATEGIES, without importing jax
DEFAULT_DEVICES = 8
DEFAULT_GENERATE = 32
_OVERRIDE = re.compile(r"^--(model|optim)\.(\w+)=(.*)$")  # --model.FIELD=VALUE, --optim.FIELD=VALUE


def build_parser() -> argparse.ArgumentParser:
    """The command line; dotted --model.FIELD=VALUE overrides are parsed apart (see parse_args)."""
    p = argparse.ArgumentParser(
        prog="experiments/run.py",
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
    what.add_argument("--impl", choices=("gspmd", "shard_map", "both"), default="gspmd")
    what.add_argument(
        "--plan",
        action="store_true",
        help="will it fit: compile only (nothing allocated, no step run) and print each strategy's memory "
        "per device, and with --device-memory the largest batch that fits",
    )
    what.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="--plan: memory of one device, e.g. 80GiB (default: the accelerator's own, if one is present)",
    )
    add_model_flags(p)
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
    loop.add_argument(
        "--explain",
        metavar="RUN",
        help="print one run's collectives by cause beside theory, with the ops behind each row, from --out's "
        "results.json (RUN: its name as the table prints it, a unique part of it, or its index) and exit",
    )
    add_device_flags(p)
    return p


def add_model_flags(p: argparse.ArgumentParser):
    """The "model and data" flags, shared with experiments/train.py."""
    model = p.add_argument_group("model and data")
    model.add_argument("--model", default="gpt-pico", help="preset name, or a comma list (default gpt-pico)")
    model.add_argument(
        "--task", default="sort", help="sort, chars:PATH (a local text file) or bin:DIR (nanoGPT's train.bin)"
    )
    model.add_argument(
        "--seq", type=int, help="sequence length of a chars task (--plan: default the context)"
    )
    model.add_argument(
        "--dtype",
        help="compute dtype, float32 or bfloat16 (default: bfloat16 on accelerators, float32 on CPU)",
    )
    model.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
    model.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan layers")
    model.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")
    model.add_argument(
        "--init-from",
        metavar="PATH",
        help="GPT-2-named weights: a .safetensors/.npz/.pt file or a Hugging Face save_pretrained directory "
        "(nanoGPT's ckpt.pt and HF's config.json supply n_head and the GELU)",
    )


def add_device_flags(p: argparse.ArgumentParser):
    """The "devices" flags (simulated devices, multi-host), shared with experiments/train.py."""
    where = p.add_argument_group("devices")
    where.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help=f"simulated CPU devices when no accelerator is present (default {DEFAULT_DEVICES})",
    )
    where.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="start N local processes over the simulated CPU devices, coordinated by jax.distributed on "
        "localhost: the stand-in for N hosts (each holds --devices/N devices)",
    )
    where.add_argument(
        "--coordinator",
        default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="multi-host: coordinator host:port (or JAX_COORDINATOR_ADDRESS); SLURM and Open MPI need none",
    )
    where.add_argument(
        "--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), help="(or JAX_NUM_PROCESSES)"
    )
    where.add_argument(
        "--process-id", type=int, default=_env_int("JAX_PROCESS_ID"), help="(or JAX_PROCESS_ID)"
    )
    where.add_argument(
        "--no-gpu-flags",
        dest="gpu_flags",
        action="store_false",
        help="on a GPU, leave out XLA's performance flags (shardgpt.xla_flags.GPU_FLAGS) that are otherwise "
        "added to XLA_FLAGS (flags already in XLA_FLAGS are always kept as given)",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Flags plus the --model.FIELD=VALUE and --optim.FIELD=VALUE overrides (as args.overrides and
    args.optim); anything else exits 2."""
    args, unknown = parser.parse_known_args(argv)
    overrides: dict[str, list] = {"model": [], "optim": []}
    bad = []
    while unknown:
        arg = unknown.pop(0)
        if "=" not in arg and arg.startswith(("--model.", "--optim.")) and unknown:
            arg = f"{arg}={unknown.pop(0)}"  # --model.n_layer 4
        if match := _OVERRIDE.match(arg):
            overrides[match.group(1)].append(match.group(2, 3))
        else:
            bad.append(arg)
    if bad:
        parser.error(
            f"unrecognized arguments: {' '.join(bad)} (overrides look like --model.n_layer=4 or "
            "--optim.weight_decay=0)"
        )
    if args.devices is not None and args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    args.overrides, args.optim = tuple(overrides["model"]), tuple(overrides["optim"])
    return args


def launch_if_asked(
    script: str, parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> int | None:
    """With --processes N: run `script` as N local workers and return the status; else None."""
    if args.processes is None or args.processes == 1:  # one process: the ordinary run
        return None
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    from shardgpt import distributed

    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        parser.error(
            "--processes starts local processes itself: drop --coordinator, --num-processes, --process-id"
        )
    try:
        workers_argv = _without(argv, "--processes", "--devices")
        return distributed.launch(
            script, workers_argv, args.processes, args.devices or DEFAULT_DEVICES, parser.prog
        )
    except ValueError as e:
        parser.error(str(e))


def _without(argv: list[str], *flags: str) -> list[str]:
    """argv less `flags` and their values (as "--flag V" or "--flag=V")."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in flags)):
            kept.append(arg)
    return kept


def _check_writable(flag: str, path: str):
    """Create the directory `path` if needed and prove a file can be written there, before any run."""
    where = Path(path)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"{flag} {path}: cannot write there ({reason}): choose another directory") from None


def check_outputs(args: argparse.Namespace):
    """Fail before training, not after it: --out and --profile writable, matplotlib present for plots."""
    if args.out:
        _check_writable("--out", args.out)
        if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "the plots need matplotlib, which is not installed: pip install matplotlib "
                "(or shardgpt[experiments]), or pass --no-plots"
            )
    if args.profile:
        _check_writable("--profile", args.profile)


def _set_xla_flags(devices: int | None, plan: bool, gpu_flags: bool = True):
    """Ask XLA for `devices` host devices (to plan, a fast backend; on a GPU, with `gpu_flags`, its
    performance flags); only effective before jax initialises (later the present devices are used)."""
    if "jax" in sys.modules:
        return
    from shardgpt import xla_flags  # imports no jax

    flags = os.environ.get("XLA_FLAGS", "")
    if devices is not None or "xla_force_host_platform_device_count" not in flags:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        flags += f" --xla_force_host_platform_device_count={devices or DEFAULT_DEVICES}"
    if plan and "xla_backend_optimization_level" not in flags:
        # LLVM's optimisation level changes the code's speed, not XLA's buffer assignment: the same bytes,
        # compiled ~40% faster (gpt2 on 8 devices: 2.7 s instead of 4.4 s a compile, here).
        flags += " --xla_backend_optimization_level=0"
    if gpu_flags and xla_flags.gpu_expected():
        flags = xla_flags.with_gpu_flags(flags)
    os.environ["XLA_FLAGS"] = flags.strip()


def microbatch_counts(text: str) -> list[int]:
    """--microbatches "1,2,4" -> [1, 2, 4]; anything but positive integers exits 2 (argparse)."""
    try:
        counts = [int(m) for m in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"takes positive integers, e.g. 4 or 1,2,4 (got {text!r})")
    return counts


def make_specs(args: argparse.Namespace, num_devices: int, platform: str) -> list:
    """One RunSpec per (model, mesh, strategy, microbatches, impl), in that order. --compare's +sp variants
    are marked in `args.optional_specs`: validate() drops those a mesh or sequence cannot run."""
    from shardgpt.lab import RunSpec
    from shardgpt.mesh import parse_mesh_spec

    meshes = args.mesh or ["dp=2,tp=4" if num_devices == 8 else "dp=-1"]
    strategies = STRATEGIES if args.compare or not args.strategy else args.strategy.split(",")
    strategies = [
        s.strip() + ("+sp" if args.sp and not s.strip().endswith("+sp") else "") for s in strategies
    ]
    per_mesh = {}
    for mesh in meshes:
        per_mesh[mesh] = list(strategies)
        # Sizes from the spec alone: --plan lays meshes over simulated CPU devices, not the default backend's.
        if args.compare and not args.sp and parse_mesh_spec(mesh, num_devices).get("tp", 1) > 1:
            per_mesh[mesh] += [f"{s}+sp" for s in strategies]
    impls = ("gspmd", "shard_map") if args.impl == "both" else (args.impl,)
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    common = dict(
        overrides=args.overrides, optim=args.optim, task=args.task, seq=args.seq, steps=args.steps,
        batch=args.batch, dtype=dtype, attention=args.attention, scan=args.scan, remat=args.remat, lr=args.lr,
        seed=args.seed, warmup=args.warmup, generate=args.generate or 0, init_from=args.init_from,
        profile=args.profile,
    )  # fmt: skip
    models = [m.strip() for m in args.model.split(",")]
    grid = [
        (n, m, s, k, i)
        for n in models
        for m in meshes
        for s in per_mesh[m]
        for k in args.microbatches
        for i in impls
    ]
    specs = [RunSpec(model=n, mesh=m, strategy=s, microbatches=k, impl=i, **common) for n, m, s, k, i in grid]
    # Dropped with a note where they cannot run: --compare's +sp variants, and GSPMD on a pp mesh under
    # --impl both (the pipeline is shard_map's).
    args.optional_specs = {
        spec
        for spec in specs
        if (args.compare and not args.sp and spec.strategy.endswith("+sp"))
        or (
            args.impl == "both" and spec.impl == "gspmd" and parse_mesh_spec(spec.mesh, num_devices)["pp"] > 1
        )
    }
    return specs


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; exits with status 2 and a one-line reason on bad input."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(parser, argv)
    if args.explain is not None:
        try:
            print(explain(args.out, args.explain))
        except ValueError as e:
            parser.error(str(e))
        return 0
    launched = launch_if_asked(__file__, parser, args, argv)
    if launched is not None:
        return launched
    _set_xla_flags(args.devices, args.plan, args.gpu_flags)
    try:  # only validation is caught: an error during a run is a bug, and keeps its traceback
        work = validate_plan(args) if args.plan else validate(args)
    except (ValueError, FileNotFoundError) as e:  # the library's validation errors say what to change
        parser.error(str(e).splitlines()[0])
    return plan(*work, args, argv) if args.plan else compare(work, args, argv)


def explain(out: str, which: str) -> str:
    """report.explain for the run of `out`/results.json named (exactly, or by a unique part) or numbered
    `which`; ValueError saying what to give where none or several match."""
    import json

    from shardgpt import report

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


def prepare_all(specs: list, args: argparse.Namespace, prepare) -> list:
    """`prepare(spec)` for every spec (ValueError on bad input), less --compare's +sp variants that a mesh
    or sequence cannot run: those leave `specs` with a note saying why."""
    prepared, skipped = [], {}
    for spec in list(specs):
        try:
            prepared.append(prepare(spec))
        except ValueError as e:
            if spec not in args.optional_specs:
                raise
            specs.remove(spec)
            skipped.setdefault(spec.mesh, str(e).splitlines()[0])
    for mesh, reason in skipped.items():
        _say(f"note: runs skipped on {mesh}: {reason}")
    return prepared


def validate(args: argparse.Namespace) -> list:
    """Initialise jax (multi-host first), then check every spec and output path: nothing compiles."""
    import jax

    from shardgpt import distributed, lab

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    platform = jax.devices()[0].platform
    if args.devices and platform != "cpu":
        _say(f"note: --devices ignored: {jax.device_count()} {platform} devices are present")
    elif args.devices and jax.device_count() != args.devices * jax.process_count():
        raise ValueError(f"--devices {args.devices}: jax was initialised with {jax.device_count()} devices")
    if args.generate is None:
        args.generate = DEFAULT_GENERATE
    specs = make_specs(args, jax.device_count(), platform)
    for setup in prepare_all(specs, args, lab.prepare):  # every spec validated before the first compile
        note_tp_across_hosts(setup.mesh)
    if jax.process_index() == 0:
        check_outputs(args)
    return specs


def validate_plan(args: argparse.Namespace) -> tuple[list, int | None]:
    """--plan: (planners, device memory in bytes or None), every one validated; nothing compiles.

    Planning compiles for the CPU backend's simulated devices whatever else is present, in the
    accelerators' compute dtype (bfloat16) unless --dtype says otherwise.
    """
    import jax

    from shardgpt import plan

    if args.init_from or args.task != "sort":
        raise ValueError("--plan takes a preset (--model) and --seq, not --init-from or --task")
    budget = plan.parse_bytes(args.device_memory) if args.device_memory else None
    if budget is None and jax.devices()[0].platform != "cpu":
        budget = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    devices = jax.devices("cpu")
    specs = make_specs(args, len(devices), "accelerator")
    planners = prepare_all(specs, args, lambda spec: plan.Planner.prepare(spec, devices))
    check_outputs(args)
    return planners, budget


def plan(planners: list, budget: int | None, args: argparse.Namespace, argv: list[str]) -> int:
    """Compile every planner's step (abstract arrays only), print the ranked table, write results.json."""
    import time

    from shardgpt import lab
    from shardgpt import plan as planning

    started = time.perf_counter()
    n = len(planners[0].mesh.devices.flat)
    print(f"planning {len(planners)} run(s) on {n} simulated CPU devices: compile only, nothing allocated")
    if budget is None:
        print("note: no --device-memory: fits and max batch are not computed")
    rows = []
    for planner in planners:
        row = planning.plan(planner, budget)
        print(f"{row['name']}: {row['compiles']} compile(s), {row['wall_s']:.1f} s", file=sys.stderr)
        rows.append(row)
    rows = planning.rank(rows)
    print("\n" + planning.table(rows, "cpu"))
    print(f"wall time {time.perf_counter() - started:.0f} s for {sum(r['compiles'] for r in rows)} compiles")
    if args.out:
        meta = lab.meta(shlex.join(["python", "experiments/run.py", *argv]))
        paths = planning.write(rows, meta, args.out, plots=not args.no_plots)
        print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


_NOTED_MESHES: set = set()


def note_tp_across_hosts(mesh):
    """Say once per mesh when a tp group spans processes: its per-layer all-reduces then cross hosts."""
    from shardgpt.mesh import describe, processes_per_group

    spans = processes_per_group(mesh, "tp")
    if spans > 1 and describe(mesh) not in _NOTED_MESHES:
        _NOTED_MESHES.add(describe(mesh))
        _say(
            f"note: on {describe(mesh)} each tp group spans {spans} processes, so Megatron's per-layer "
            "all-reduces cross hosts: keep tp within one host's devices (tp <= devices per process)"
        )


def _say(*args, **kwargs):
    """print, on process 0 only: the other processes neither print nor write."""
    import jax

    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def compare(specs: list, args: argparse.Namespace, argv: list[str]) -> int:
    """Train and measure every spec, then print the table and write results.json (and the plots)."""
    import jax

    from shardgpt import lab, metrics, report

    kind, platform = jax.devices()[0].device_kind, jax.devices()[0].platform
    peak = metrics.peak_flops(kind)
    first = specs[0]
    processes = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    _say(
        f"{jax.device_count()} x {kind} ({platform}{processes}), jax {jax.__version__}; {len(specs)} "
        f"run(s) of {lab.model_label(first)} on {first.task}, batch {first.batch}, {first.steps} steps, "
        f"{first.dtype}"
    )
    peak_text = f"{peak:.3g} FLOP/s per device" if peak else "unknown for this device (MFU n/a)"
    _say(f"MFU from FLOPs/token = {lab.FLOPS_SOURCE}; peak: {peak_text}")
    runs = []
    for spec in specs:
        result = lab.run(spec, progress=jax.process_index() == 0)
        _say(
            f"{result['name']}: compile {result['compile_s']:.2f} s, step {1e3 * result['step_time_s']:.2f} "
            f"ms, {result['tokens_per_s']:,.0f} tokens/s, final loss {result['final_loss']:.6f}"
        )
        runs.append(result)
    command = shlex.join(["python", "experiments/run.py", *argv])
    results = {"meta": lab.meta(command), "runs": runs, "agreement": report.agreement(runs)}
    _say("\n" + report.table(results))
    if jax.process_index() == 0 and args.out:
        paths = report.write(results, args.out, plots=not args.no_plots)
        _say(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
