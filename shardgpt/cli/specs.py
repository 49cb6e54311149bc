"""The run command's flags -> `RunSpec`s, and the checks both of its branches (measure, or plan and
predict) make before anything compiles: what cli/run.py and cli/planning.py share."""

import argparse
import importlib.util

from shardgpt.cli import flags
from shardgpt.cli.flags import STRATEGIES, say

SCRIPT = "experiments/run.py"


def check_outputs(args: argparse.Namespace):
    """Fail before training, not after it: --out and --profile writable, matplotlib present for plots."""
    if args.out:
        flags.check_writable("--out", args.out)
        if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
            raise ValueError(
                "the plots need matplotlib, which is not installed: pip install matplotlib "
                "(or shardgpt[experiments]), or pass --no-plots"
            )
    if args.profile:
        flags.check_writable("--profile", args.profile)


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
    from shardgpt.lab.runner import RunSpec
    from shardgpt.parallel.mesh import parse_mesh_spec

    meshes = args.mesh or ["dp=2,tp=4" if num_devices == 8 else "dp=-1"]
    strategies = STRATEGIES if args.compare or not args.strategy else args.strategy.split(",")
    strategies = [
        s.strip() + ("+sp" if args.sp and not s.strip().endswith("+sp") else "") for s in strategies
    ]
    per_mesh = {}
    for mesh in meshes:
        per_mesh[mesh] = list(strategies)
        # Sizes from the spec alone: --plan may lay meshes over other devices than the default backend's.
        if args.compare and not args.sp and parse_mesh_spec(mesh, num_devices).get("tp", 1) > 1:
            per_mesh[mesh] += [f"{s}+sp" for s in strategies]
    impls = {"both": ("gspmd", "shard_map"), "all": ("gspmd", "shard_map", "explicit")}.get(
        args.impl, (args.impl,)
    )
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    attention = args.attention or "xla"  # validate and validate_plan set the platform's default before
    common = dict(
        overrides=args.overrides, optim=args.optim, task=args.task, seq=args.seq, steps=args.steps,
        batch=args.batch, dtype=dtype, attention=attention, scan=args.scan, remat=args.remat, lr=args.lr,
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
    # Dropped with a note where they cannot run: --compare's +sp variants, and under --impl both or all
    # what only shard_map runs (pp's pipeline; cp for explicit sharding).
    args.optional_specs = {
        spec for spec in specs if (args.compare and not args.sp and spec.strategy.endswith("+sp"))
        or (args.impl in ("both", "all") and not _runs_there(spec, num_devices))
    }  # fmt: skip
    return specs


def _runs_there(spec, num_devices: int) -> bool:
    """False where `spec`'s impl cannot run its mesh: pp is shard_map's alone; explicit sharding does not
    run cp yet (layout.check_mesh_axes says the same to a single --impl)."""
    from shardgpt.parallel.mesh import parse_mesh_spec  # imports jax: after the flags are set

    sizes = parse_mesh_spec(spec.mesh, num_devices)
    if spec.impl == "explicit":
        return sizes["pp"] == sizes["cp"] == 1
    return spec.impl == "shard_map" or sizes["pp"] == 1


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
        say(f"note: runs skipped on {mesh}: {reason}")
    return prepared
