"""One-GPU benchmark (`make bench-gpu`), the one script for every figure an issue needs a GPU for.

Sections in priority order, each under its own time limit (--limit), all under one budget (--budget, 450 s:
the whole run stays under 8 minutes on an H200); a measurement whose projected time would pass either is
skipped with the reason, a section that fails records its error and the next one runs:
  headline    copy bandwidth; gpt2 train at the headline config (unrolled, cuDNN attention on NVIDIA GPUs) at
              batch 16 and 32, MFU beside the 45% / 47% goals; decode at batch 1 and 64 (prompt 128 + 256
              new): ms/step against the floor at the measured copy and at PyTorch's 4.3 TB/s
  anchor      the plain-JAX anchor (.anchors/gpu_ref.py or ../shared/anchors/gpu_ref.py, in its own process)
              at the same configs, its figures beside ours
  planner     run.py --plan's memory for the headline config on this device against the same step's
              compiled memory and its live peak (issue 24; a fresh process where the device keeps a peak)
  mock        run.py --plan for dp=8 and dp=2,tp=4 on a mock GPU topology (a process of its own)
  cost_model  the cost model's predicted step time against 8+ measured one-GPU configs (issue 28)
  xl          gpt2-xl: train at the best batch that fits (50% MFU goal); decode at batch 1 against the copy
  levers      issue 30's candidate speed-ups, each against this run's own figure: decode with XLA command
              buffers over the loop (a process of its own), training with PGLE (likewise), the fused
              loss's chunk size
  rest        the rest of the train matrix (--layers x --attention x --batches), the naive generator
Writes OUT/results.json, rewritten as each measurement finishes (every figure's source under "sources"), and
OUT/table.txt at the end. Needs only jax, flax, optax, numpy: `PYTHONPATH=. python3 experiments/gpu_bench.py
--out results/gpu`; `--tiny` is a CPU smoke run (gpt-pico, the cpu profile).
"""

import argparse
import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from shardgpt.analysis import hardware  # imports no jax
from shardgpt.cli import flags  # imports no jax
from shardgpt.model import config  # imports no jax
from shardgpt.parallel import xla_flags  # imports no jax

SCRIPT = "experiments/gpu_bench.py"
BUDGET_S = 450.0
LIMITS_S = {  # each section's limit, in priority order; the budget, not their sum, bounds the run
    "headline": 120.0,
    "anchor": 110.0,
    "planner": 50.0,
    "mock": 50.0,
    "cost_model": 100.0,
    "xl": 110.0,
    "levers": 70.0,  # runs before rest, which has what the budget leaves: no other limit changed for it
    "rest": 60.0,
}


def _limits(pairs: list[str], p: argparse.ArgumentParser) -> dict[str, float]:
    limits = dict(LIMITS_S)
    for pair in pairs:
        name, _, seconds = pair.partition("=")
        try:
            limits[name] = float(seconds) if name in LIMITS_S else p.error(f"--limit: no section {name!r}")
        except ValueError:
            p.error(f"--limit takes SECTION=SECONDS, e.g. xl=90; got {pair!r}")
    return limits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; list flags are comma lists whose first value is the headline config."""
    raw = argparse.RawDescriptionHelpFormatter  # the docstring's section list, as written
    p = argparse.ArgumentParser(
        prog=SCRIPT,
        description=__doc__.split("\n")[0],
        epilog="\n".join(__doc__.split("\n")[2:]),
        formatter_class=raw,
    )
    p.add_argument("--out", default="results/gpu", help="folder for results.json and table.txt")
    p.add_argument("--tiny", action="store_true", help="gpt-pico, seq 32, a few steps: a CPU smoke run")
    p.add_argument(
        "--no-gpu-flags", action="store_true", help="leave out XLA's GPU flags (shardgpt.parallel.xla_flags)"
    )
    p.add_argument(
        "--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S:.0f})"
    )
    defaults = ", ".join(f"{k} {v:.0f}" for k, v in LIMITS_S.items())
    p.add_argument(
        "--limit", action="append", default=[], metavar="SECTION=SECONDS",
        help=f"a section's time limit, repeatable (defaults, in order: {defaults}); 0 skips it",
    )  # fmt: skip
    p.add_argument(
        "--sections", default=",".join(LIMITS_S), help="comma list of the sections to run (default: all)"
    )
    p.add_argument(
        "--anchor", metavar="PATH", help="the anchor script (default: .anchors/ or ../shared/anchors/)"
    )
    p.add_argument("--layers", help="comma list of unrolled, scan (default unrolled,scan; --tiny unrolled)")
    p.add_argument(
        "--attention",
        default=None,
        help="comma list of cudnn, xla, the first the headline (default: cudnn,xla on NVIDIA GPUs, else xla)",
    )
    p.add_argument("--batches", default=None, help="comma list of train batches (default 16,32,8; --tiny 2)")
    args = p.parse_args(argv)
    args.limits = _limits(args.limit, p)
    args.sections = args.sections.split(",")
    if not set(args.sections) <= set(LIMITS_S):
        p.error(f"--sections takes {', '.join(LIMITS_S)}; got {','.join(args.sections)}")
    args.layers = (args.layers or ("unrolled" if args.tiny else "unrolled,scan")).split(",")
    if not set(args.layers) <= {"unrolled", "scan"}:
        p.error(f"--layers takes unrolled and/or scan, got {args.layers}")
    # Without --attention: both on a GPU, decided once jax has started (main).
    args.attention = args.attention.split(",") if args.attention else None
    if args.attention and not set(args.attention) <= set(config.ATTENTION_IMPLS):
        p.error(f"--attention takes {' and/or '.join(config.ATTENTION_IMPLS)}, got {args.attention}")
    try:
        args.batches = [int(b) for b in (args.batches or ("2" if args.tiny else "16,32,8")).split(",")]
    except ValueError:
        p.error(f"--batches takes a comma list of integers, got {args.batches!r}")
    if min(args.batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    return args


def _start_xla(gpu_flags: bool):
    """XLA's GPU performance flags (shardgpt.parallel.xla_flags), as the run command sets them: only before
    jax starts, only where it will start on a GPU, never over the user's own."""
    if "jax" not in sys.modules and gpu_flags and xla_flags.gpu_expected():
        os.environ["XLA_FLAGS"] = xla_flags.with_gpu_flags(os.environ.get("XLA_FLAGS", ""))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it wrote to OUT/results.json."""
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        return _run(args, argv)
    # A SIGTERM (a timeout's, a machine's) unwinds like Ctrl-C, so a child in its own session dies too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        return _run(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    env = dict(os.environ)  # as the user started us: the anchor runs as plain JAX would, without our flags
    _start_xla(not args.no_gpu_flags)
    import jax

    from shardgpt.bench import gpu_apart, gpu_levers, gpu_sections, gpu_table
    from shardgpt.bench import gpu_parts as parts
    from shardgpt.bench.gpu_run import Run
    from shardgpt.lab import runner
    from shardgpt.parallel.mesh import make_mesh

    device = jax.devices()[0]
    if args.attention is None:  # the platform's default first: it is the headline
        args.attention = ["cudnn", "xla"] if flags.default_attention(device) == "cudnn" else ["xla"]
    s = parts.TINY if args.tiny else parts.FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = "cpu" if device.platform == "cpu" else hardware.for_device_kind(device.device_kind)
    mesh = make_mesh("dp=1", [device])  # one device, whatever else is present
    cluster = hardware.cluster(f"{profile}x1") if profile else None  # the cost model's
    matrix = (args.layers, args.attention, args.batches)
    ctx = gpu_sections.Context(
        s, args.tiny, device, mesh, args.attention[0], cluster, out, matrix, args.anchor, env
    )
    cfg = gpu_sections.model_config(ctx, s.model)
    command = " ".join([SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    meta = runner.meta(command) | dict(model=s.model, n_params=cfg.n_params(), seq=s.seq, dtype=cfg.dtype)
    meta |= dict(device=str(device), budget_s=args.budget, limits_s=args.limits, tiny=args.tiny)
    meta |= dict(sizes=dataclasses.asdict(s), hardware=ctx.cluster.spec if ctx.cluster else None)
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")  # what this run's XLA was started with
    results: dict[str, Any] = dict(meta=meta, sources=parts.SOURCES, sections={}, copy=None)
    results |= dict(copy_bandwidth_bytes_per_s=None, train=[], decode=[], anchor=None, planner=None)
    results |= dict(mock=None, cost_model=None, xl=None, levers=None, naive=None)
    run = Run(results, out, args.budget, args.limits)
    bodies = dict(headline=gpu_sections.headline, anchor=gpu_apart.anchor, planner=gpu_apart.planner)
    bodies |= dict(mock=gpu_apart.mock, cost_model=gpu_sections.cost_model, xl=gpu_sections.xl)
    bodies |= dict(levers=gpu_levers.levers, rest=gpu_sections.rest)
    for name in LIMITS_S:
        if name in args.sections:
            run.section(name, lambda run, body=bodies[name]: body(run, ctx))
        else:
            results["sections"][name] = dict(
                status="skipped", error="not in --sections", limit_s=0, wall_s=None
            )
        (out / "table.txt").write_text(gpu_table.table(results) + "\n")  # a run cut short keeps one too
    run.save()
    text = gpu_table.table(results)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
