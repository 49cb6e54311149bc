"""One-GPU benchmark (issue 13): gpt2 training MFU, KV-cache decode against its bandwidth floor, naive decode.

Measured on the live device, in this order, each part under a wall-clock budget (a part that would start past
it is recorded as skipped, with the reason; a part that fails records its error and the run goes on):
  1. copy bandwidth: x * s over a bf16 array, bytes read + written over the median time;
  2. decode ms/step of shardgpt.generation.generate at batch 1 and 64, beside its floor: the bytes one
     step must read (bf16 weights and the live KV cache) over that bandwidth;
  3. the naive generator (generation_bench's re-jit-per-length loop): seconds per token, compile included;
  4. training MFU for {unrolled, scanned} layers x {cudnn, xla} attention x batch {16, 32, 8}, nearest the
     headline config (the first value of each flag) first.
Writes OUT/results.json (rewritten after every part) and OUT/table.txt. Needs only jax, flax, optax, numpy:
`PYTHONPATH=. python3 experiments/gpu_bench.py --out results/gpu` (`make bench-gpu`); `--tiny` is a CPU
smoke run.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from shardgpt.cli import flags  # imports no jax
from shardgpt.model import config  # imports no jax
from shardgpt.parallel import xla_flags  # imports no jax

SCRIPT = "experiments/gpu_bench.py"


def _fmt(value: Any, spec: str, scale: float = 1) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def _status(row: dict[str, Any]) -> str:
    return row["status"] + (f": {row['error']}" if row["error"] else "")


def _columns(rows: list[dict[str, Any]], columns: list[tuple[str, str, str, float]]) -> list[str]:
    """A header and one line per row; a column is (title, key, format, scale), right-aligned."""
    width = lambda title: max(len(title) + 2, 9)
    lines = ["".join(f"{title:>{width(title)}}" for title, *_ in columns) + "  status"]
    for r in rows:
        cells = (f"{_fmt(r[key], spec, scale):>{width(title)}}" for title, key, spec, scale in columns)
        lines.append("".join(cells) + f"  {_status(r)}")
    return lines


def table(results: dict[str, Any]) -> str:
    """The human summary: every measurement beside its goal and the reference (plain JAX, one H100)."""
    m, bw, naive = results["meta"], results["copy_bandwidth_bytes_per_s"], results["naive"]
    out = [
        f"gpu_bench: {m['model']} ({m['n_params'] / 1e6:.2f}M params), {m['device_kind']}, jax "
        f"{m['jax_version']}, seq {m['seq']}, {m['dtype']}, {m['date']}",
        f"copy bandwidth (measured, read + write): {_fmt(bw, '.4g', 1e-9)} GB/s",
        "train (MFU goal, ref: plain JAX on one H100)",
    ]
    out += _columns(
        results["train"],
        [("layers", "layers", "", 1), ("attn", "attention", "", 1), ("batch", "batch", "d", 1)]
        + [("compile s", "compile_s", ".1f", 1), ("step ms", "step_time_s", ".1f", 1e3)]
        + [("tok/s", "tokens_per_s", ",.0f", 1), ("MFU", "mfu", ".1%", 1), ("goal", "goal_mfu", ".0%", 1)]
        + [("ref", "reference_mfu", ".1%", 1)],
    )
    out.append("decode (KV cache; floor = weight + cache bytes / copy bandwidth; goal: x floor)")
    out += _columns(
        results["decode"],
        [("batch", "batch", "d", 1), ("ms/step", "ms_per_step", ".3f", 1), ("floor ms", "floor_ms", ".3f", 1)]
        + [("x floor", "ratio_to_floor", ".2f", 1), ("goal", "goal_ratio", ".1f", 1)]
        + [("ref ms", "reference_ms_per_step", ".2f", 1), ("compile s", "compile_s", ".1f", 1)],
    )
    per_token, tokens = _fmt(naive["s_per_token"], ".3f"), _fmt(naive["tokens"], "d")
    reference = _fmt(naive["reference_s_per_token"], ".1f")
    out.append(
        f"naive generator, batch 1: {per_token} s/token over {tokens} tokens (compile included; ref "
        f"{reference} s)  {_status(naive)}"
    )
    out.append(f"wall {m['wall_s']:.0f} s of a {m['budget_s']:.0f} s budget")
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; list flags are comma lists whose first value is the headline config."""
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/gpu", help="folder for results.json and table.txt")
    p.add_argument("--tiny", action="store_true", help="gpt-pico, seq 32, a few steps: a CPU smoke run")
    p.add_argument(
        "--no-gpu-flags",
        action="store_true",
        help="leave out XLA's GPU flags (shardgpt.parallel.xla_flags.GPU_FLAGS)",
    )
    p.add_argument("--layers", default="unrolled,scan", help="comma list of unrolled, scan")
    p.add_argument(
        "--attention",
        default=None,
        help="comma list of cudnn, xla, the first the headline (default: cudnn,xla on NVIDIA GPUs, else xla)",
    )
    p.add_argument("--batches", default=None, help="comma list of train batches (default 16,32,8; --tiny 2)")
    p.add_argument(
        "--budget", type=float, default=420.0, help="seconds (default 420); parts past it are skipped"
    )
    args = p.parse_args(argv)
    args.layers = args.layers.split(",")
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
    _start_xla(not args.no_gpu_flags)
    import jax

    from shardgpt.bench import gpu_parts as parts
    from shardgpt.lab import runner
    from shardgpt.parallel.mesh import make_mesh

    if args.attention is None:  # the platform's default first: it is the headline
        args.attention = ["cudnn", "xla"] if flags.default_attention(jax.devices()[0]) == "cudnn" else ["xla"]
    s = parts.TINY if args.tiny else parts.FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    mesh = make_mesh("dp=1", [device])  # one device, whatever else is present
    cfg = config.preset(s.model, dtype="bfloat16", **dict(s.overrides))
    command = " ".join([SCRIPT, *(sys.argv[1:] if argv is None else argv)])
    meta = runner.meta(command) | dict(model=s.model, n_params=cfg.n_params(), seq=s.seq, dtype=cfg.dtype)
    meta |= dict(device=str(device), budget_s=args.budget, tiny=args.tiny, sizes=dataclasses.asdict(s))
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")  # what this run's XLA was started with
    results = dict(
        meta=meta, sources=parts.SOURCES, copy_bandwidth_bytes_per_s=None, copy={}, train=[], decode=[]
    )
    results["naive"] = parts.blank_row(parts.NAIVE_KEYS, batch=1, prompt_len=s.prompt_len)
    run = parts.Budget(results, out, args.budget)

    results["copy"] = dict(array_bytes=2 * s.copy_elements, bytes_per_s=None, status=None, error=None)
    run.attempt(results["copy"], lambda: dict(bytes_per_s=parts.copy_bandwidth(s.copy_elements, 10)))
    results["copy_bandwidth_bytes_per_s"] = results["copy"]["bytes_per_s"]
    parts.measure_generation(run, cfg, mesh, s, args.tiny)  # bounded and cheap: measured before training
    parts.measure_training(run, cfg, mesh, s, args)
    run.save()
    text = table(results)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
