"""The flags every command shares, and what must happen before jax starts: argument groups for the model,
data and devices, the --model.FIELD / --optim.FIELD overrides, XLA's flags, the local multi-process launch.

Nothing here imports jax at module level: --devices and the multi-host settings only take effect before
jax initialises, so a command parses its flags with this module first.
"""

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

STRATEGIES = ("dp", "zero1", "zero2", "zero3")  # shardgpt.parallel.sharding.STRATEGIES, without jax
DEFAULT_DEVICES = 8
PROGRESS_LINES = 10  # shardgpt.training.loop.PROGRESS_LINES, without jax
_OVERRIDE = re.compile(r"^--(model|optim)\.(\w+)=(.*)$")  # --model.FIELD=VALUE, --optim.FIELD=VALUE


def add_model_flags(p: argparse.ArgumentParser, compare: bool = True):
    """The "model and data" flags, shared by the run and train commands (`compare`: the run command's
    lists of models and its --plan)."""
    model = p.add_argument_group("model and data")
    several = ", or a comma list" if compare else ""
    model.add_argument("--model", default="gpt-pico", help=f"preset name{several} (default gpt-pico)")
    model.add_argument(
        "--task", default="sort", help="sort, chars:PATH (a local text file) or bin:DIR (nanoGPT's train.bin)"
    )
    model.add_argument(
        "--seq",
        type=int,
        help="sequence length of a chars or bin task" + (" (--plan: default the context)" if compare else ""),
    )
    model.add_argument(
        "--dtype",
        help="compute dtype, float32 or bfloat16 (default: bfloat16 on accelerators, float32 on CPU)",
    )
    model.add_argument(
        "--attention",
        choices=("xla", "cudnn"),
        help="jax.nn.dot_product_attention's implementation (default: cudnn on NVIDIA GPUs, xla elsewhere)",
    )
    model.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan layers")
    model.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")
    model.add_argument(
        "--init-from",
        metavar="PATH",
        help="GPT-2-named weights: a .safetensors/.npz/.pt file or a Hugging Face save_pretrained directory "
        "(nanoGPT's ckpt.pt and HF's config.json supply n_head and the GELU)",
    )


def add_log_every(group: argparse._ArgumentGroup):
    """--log-every N, shared by the run and train commands (the Trainer's `log_every`)."""
    group.add_argument(
        "--log-every",
        type=_positive_int,
        metavar="N",
        help="a progress line every N steps (smoothed tokens/s, elapsed, ETA), also under a terminal's bar "
        f"(default: {PROGRESS_LINES} lines a run, and only without a terminal)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes an integer >= 1 (got {text!r})")
    return value


def default_attention(device) -> str:
    """--attention's default, once jax has started: cudnn (cuDNN's flash attention, about 2x XLA's MFU on
    gpt2 at seq 1024: BENCHMARKS.md) on NVIDIA GPUs from Ampere (compute capability 8.0) on, xla elsewhere."""
    client = getattr(device, "client", None)
    cuda = device.platform == "gpu" and "cuda" in getattr(client, "platform_version", "").lower()
    capability = getattr(device, "compute_capability", "0.0") if cuda else "0.0"
    return "cudnn" if tuple(int(x) for x in str(capability).split(".")[:2]) >= (8, 0) else "xla"


def add_device_flags(p: argparse.ArgumentParser):
    """The "devices" flags (simulated devices, multi-host), shared by the run and train commands."""
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
        help="on a GPU, leave out XLA's performance flags (shardgpt.parallel.xla_flags.GPU_FLAGS) that are "
        "otherwise added to XLA_FLAGS (flags already in XLA_FLAGS are always kept as given)",
    )


def prog(script: str) -> str:
    """The name usage lines give the command: the console script's (shardgpt-run) when it was started
    as one, else `script` (experiments/run.py)."""
    name = Path(sys.argv[0]).name
    return name if name.startswith("shardgpt-") else script


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
    module: str, parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]
) -> int | None:
    """With --processes N: run the command `module` (`python -m`) as N local workers and return the
    status; else None."""
    if args.processes is None or args.processes == 1:  # one process: the ordinary run
        return None
    if args.processes < 1:
        parser.error(f"--processes must be >= 1, got {args.processes}")
    from shardgpt.parallel import distributed

    if args.coordinator or args.num_processes is not None or args.process_id is not None:
        parser.error(
            "--processes starts local processes itself: drop --coordinator, --num-processes, --process-id"
        )
    try:
        workers_argv = _without(argv, "--processes", "--devices")
        return distributed.launch(
            module, workers_argv, args.processes, args.devices or DEFAULT_DEVICES, parser.prog
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


def check_writable(flag: str, path: str):
    """Create the directory `path` if needed and prove a file can be written there, before any run."""
    where = Path(path)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where):
            pass
    except OSError as e:
        reason = e.strerror or str(e)
        raise ValueError(f"{flag} {path}: cannot write there ({reason}): choose another directory") from None


def set_xla_flags(devices: int | None, plan: bool, gpu_flags: bool = True):
    """Ask XLA for `devices` host devices (to plan, a fast backend; on a GPU, with `gpu_flags`, its
    performance flags); only effective before jax initialises (later the present devices are used)."""
    if "jax" in sys.modules:
        return
    from shardgpt.parallel import xla_flags  # imports no jax

    flags = os.environ.get("XLA_FLAGS", "")
    if devices is not None or "xla_force_host_platform_device_count" not in flags:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
        flags += f" --xla_force_host_platform_device_count={devices or DEFAULT_DEVICES}"
    if plan and "xla_backend_optimization_level" not in flags:
        # LLVM's optimisation level changes the code's speed, not XLA's buffer assignment: the same bytes,
        # compiled ~40% faster (gpt2 on 8 devices: 2.7 s instead of 4.4 s a compile, here).
        flags += " --xla_backend_optimization_level=0"
    if plan:  # a plan allocates nothing: no need to take 75% of an accelerator's memory at start
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if gpu_flags and xla_flags.gpu_expected():
        flags = xla_flags.with_gpu_flags(flags)
    os.environ["XLA_FLAGS"] = flags.strip()


_NOTED_MESHES: set = set()


def note_tp_across_hosts(mesh):
    """Say once per mesh when a tp group spans processes: its per-layer all-reduces then cross hosts."""
    from shardgpt.parallel.mesh import describe, processes_per_group

    spans = processes_per_group(mesh, "tp")
    if spans > 1 and describe(mesh) not in _NOTED_MESHES:
        _NOTED_MESHES.add(describe(mesh))
        say(
            f"note: on {describe(mesh)} each tp group spans {spans} processes, so Megatron's per-layer "
            "all-reduces cross hosts: keep tp within one host's devices (tp <= devices per process)"
        )


def say(*args, **kwargs):
    """print, on process 0 only: the other processes neither print nor write."""
    import jax

    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


def add_predict_flags(group: argparse._ArgumentGroup):
    """--predict, --recommend, --measure and --hardware SPEC: the run command's cost-model prediction
    (shardgpt.lab.predict, shardgpt.lab.recommend)."""
    from shardgpt.analysis import hardware  # no jax

    group.add_argument(
        "--predict",
        action="store_true",
        help="predict each run's step time, tokens/s and MFU on --hardware (compile only, as --plan; an "
        "estimate, unvalidated on GPUs until measured)",
    )
    group.add_argument(
        "--recommend",
        action="store_true",
        help="with --predict: search the cluster's meshes x strategies x microbatches x remat within its "
        "memory, rank them by predicted tokens/s and compile the top 5 to confirm (shardgpt.lab.recommend)",
    )
    group.add_argument(
        "--measure",
        action="store_true",
        help="with --predict: train and time each run (no plan) and print its prediction beside the measured "
        "step time and the error; --hardware must be this machine (e.g. cpux8 for 8 simulated devices)",
    )
    group.add_argument(
        "--hardware",
        metavar="SPEC",
        type=_cluster_spec,
        help=f"--predict's cluster, e.g. {', '.join(hardware.SPEC_EXAMPLES)}",
    )


def _cluster_spec(text: str) -> str:
    from shardgpt.analysis import hardware

    try:
        hardware.cluster(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def predict_implies_plan(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """--predict plans too (compile only, one compile a run; with --target also the largest fitting batch),
    unless --measure asks for the runs themselves."""
    if args.predict != bool(args.hardware):
        parser.error("--predict and --hardware SPEC go together, e.g. --predict --hardware h100x8")
    if args.recommend:
        check_recommend(args, parser)
    if args.measure and (not args.predict or args.recommend or args.plan):
        parser.error(
            "--measure trains each run beside its prediction: give --predict --hardware SPEC, without "
            "--plan or --recommend"
        )
    args.plan = args.plan or (args.predict and not args.measure)


def check_recommend(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """--recommend chooses the layout itself: refuse, before jax starts, what would choose it too."""
    if not args.predict:
        parser.error("--recommend searches layouts for a cluster: add --predict --hardware SPEC")
    chosen = {
        "--mesh": args.mesh,
        "--strategy": args.strategy,
        "--compare": args.compare,
        "--sp": args.sp,
        "--remat": args.remat,
        "--target": args.target,
        "--microbatches": args.microbatches != [1],
        "--impl": args.impl != "gspmd",
    }
    given = [flag for flag, value in chosen.items() if value]
    if given:
        parser.error(
            f"--recommend searches meshes, strategies, microbatches and remat itself (its cluster is "
            f"--hardware): drop {', '.join(given)}"
        )
    if "," in args.model:
        parser.error(f"--recommend plans one model at a time: give one --model, not {args.model!r}")
