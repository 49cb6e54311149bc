"""One-GPU benchmark (issue 13): gpt2 training MFU, KV-cache decode against its bandwidth floor, naive decode.

Measured on the live device, in this order, each part under a wall-clock budget (a part that would start past
it is recorded as skipped, with the reason; a part that fails records its error and the run goes on):
  1. copy bandwidth: x * s over a bf16 array, bytes read + written over the median time;
  2. decode ms/step of shardgpt.generate at batch 1 and 64, beside its floor: the bytes one step must read
     (bf16 weights and the live KV cache) over that bandwidth;
  3. the naive generator (generation_bench's re-jit-per-length loop): seconds per token, compile included;
  4. training MFU for {unrolled, scanned} layers x {cudnn, xla} attention x batch {16, 32, 8}, nearest the
     headline config (the first value of each flag) first.
Writes OUT/results.json (rewritten after every part) and OUT/table.txt. Needs only jax, flax, optax, numpy:
`python3 experiments/gpu_bench.py --out results/gpu` (`make bench-gpu`); `--tiny` is a CPU smoke run.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout: runs without a pip install
sys.path.append(str(HERE))  # for the sibling script gpu_generation; appended, so it shadows nothing

from shardgpt import xla_flags  # noqa: E402  (imports no jax)

# XLA's GPU performance flags (shardgpt.xla_flags), as run.py sets them: only before jax starts, only where
# it will start on a GPU, never over the user's own; --no-gpu-flags leaves them out.
if "jax" not in sys.modules and "--no-gpu-flags" not in sys.argv[1:] and xla_flags.gpu_expected():
    os.environ["XLA_FLAGS"] = xla_flags.with_gpu_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (after the checkout is on the path and XLA's flags are set)
import jax.numpy as jnp  # noqa: E402
from gpu_generation import median_s  # noqa: E402

from shardgpt import config, generation_bench, lab, metrics, optim, sharding, train  # noqa: E402
from shardgpt.generate import Generator  # noqa: E402
from shardgpt.mesh import make_mesh  # noqa: E402
from shardgpt.model import GPT  # noqa: E402

GOAL_MFU = 0.45
GOAL_FLOOR_RATIO = {1: 3.0}  # decode step / floor; every other batch: DEFAULT_FLOOR_GOAL
DEFAULT_FLOOR_GOAL = 1.5
# DESIGN.md's anchors: one H100, plain-JAX gpt2 124M, seq 1024, bf16 (shared/anchors/gpu_ref.py).
REFERENCE_MFU = {("unrolled", "cudnn", 16): 0.366, ("scan", "cudnn", 16): 0.254}
REFERENCE_MFU |= {("scan", "cudnn", 32): 0.271, ("scan", "xla", 16): 0.119}
REFERENCE_DECODE_MS = {1: 0.58, 64: 0.83}
REFERENCE_NAIVE_S = 3.6

SOURCES = {
    "copy_bandwidth_bytes_per_s": "measured: 2 x array bytes (read + write) / median time of x * s",
    "compile_s": "measured: wall time of lower + compile",
    "step_time_s": "measured: timed steps' wall time / steps, between two block_until_ready",
    "step_time_median_s": "measured: median of the Trainer's pipelined step intervals",
    "tokens_per_s": "derived: batch x seq / step_time_s",
    "flops_per_token": "theory: 6N + 12·L·H·Q·T (PaLM app. B)",
    "peak_flops": "datasheet bf16 peak of the device kind (null where unknown, e.g. CPU)",
    "mfu": "derived: tokens_per_s x flops_per_token / peak_flops",
    "ms_per_step": "measured: (median call for N tokens - median for 1) / (N - 1)",
    "weight_bytes": "derived: the weights one decode step reads, at the compute dtype (all but wpe)",
    "cache_bytes": "derived: keys + values of the live context, prompt + new/2 positions on average",
    "floor_ms": "derived: (weight_bytes + cache_bytes) / copy_bandwidth_bytes_per_s",
    "ratio_to_floor": "derived: ms_per_step / floor_ms",
    "s_per_token": "measured: median seconds per token of the naive loop (each re-jits: compile included)",
    "first_token_ms": "measured: median call for 1 new token (prefill + the phases' cache copies)",
    "total_ms": "measured: median call for new_tokens tokens",
    "temp_bytes": "compiled program (memory_analysis)",
    "first_loss": "measured: loss of the first step on random tokens (a sanity check: about ln(vocab))",
    "last_loss": "measured: loss of the last timed step",
    "wall_s": "measured: wall time of the whole part, compile and warmup included",
    "goal_mfu": "issue 13's goal",
    "goal_ratio": "issue 13's goal (ms_per_step / floor_ms at most this)",
    "reference_mfu": "not this run: DESIGN.md anchors, plain JAX gpt2, one H100 (shared/anchors/gpu_ref.py)",
    "reference_ms_per_step": "not this run: as reference_mfu",
    "reference_s_per_token": "not this run: as reference_mfu",
}

TRAIN_KEYS = ("layers", "attention", "batch", "seq", "status", "error", "compile_s", "step_time_s")
TRAIN_KEYS += ("step_time_median_s", "tokens_per_s", "flops_per_token", "peak_flops", "mfu")
TRAIN_KEYS += ("goal_mfu", "reference_mfu", "first_loss", "last_loss", "temp_bytes", "wall_s")
DECODE_KEYS = ("batch", "prompt_len", "new_tokens", "status", "error", "compile_s", "first_token_ms")
DECODE_KEYS += ("total_ms", "ms_per_step", "compiles", "weight_bytes", "cache_bytes", "floor_ms")
DECODE_KEYS += ("ratio_to_floor", "goal_ratio", "reference_ms_per_step", "wall_s")
NAIVE_KEYS = ("batch", "prompt_len", "tokens", "status", "error", "s_per_token", "per_token_s")
NAIVE_KEYS += ("compiles", "reference_s_per_token", "wall_s")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the full gpt2 benchmark, or the tiny CPU smoke run."""

    model: str
    seq: int
    warmup: int
    steps: int
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    iters: int
    naive_tokens: int
    naive_cap_s: float
    copy_elements: int
    overrides: tuple[tuple[str, Any], ...] = ()


FULL = Sizes("gpt2", 1024, 3, 10, (1, 64), 128, 256, 5, 4, 30.0, 2**30)
# Tiny: each train config costs ~2.5 s of init and compile on a 2-core CPU, so one batch by default.
TINY = Sizes("gpt-pico", 32, 1, 2, (1, 4), 8, 48, 5, 2, 10.0, 2**20, (("block_size", 64), ("n_layer", 1)))


def train_matrix(layers: list[str], attention: list[str], batches: list[int]) -> list[tuple[str, str, int]]:
    """Every (layers, attention, batch), the headline (each list's first value) first, then by how many
    axes differ from it: each single change is measured before the combinations."""
    configs = [(la, at, b) for la in layers for at in attention for b in batches]
    head = (layers[0], attention[0], batches[0])
    return sorted(configs, key=lambda c: sum(x != h for x, h in zip(c, head, strict=True)))  # stable


def _row(keys: tuple[str, ...], **values: Any) -> dict[str, Any]:
    return {k: None for k in keys} | values  # every row has every key; a skipped row's figures are null


def _error(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def copy_bandwidth(elements: int, iters: int) -> float:
    """Bytes read + written per second by x * s over a bf16 array (s an argument: XLA keeps the multiply)."""
    x, s = jnp.ones((elements,), jnp.bfloat16), jnp.asarray(1, jnp.bfloat16)
    scale = jax.jit(lambda x, s: x * s)
    jax.block_until_ready(scale(x, s))  # compile
    return 2 * x.nbytes / median_s(lambda: scale(x, s), iters)


def decode_bytes(cfg: config.ModelConfig, params: Any, batch: int, positions: float) -> tuple[int, int]:
    """(weight, cache) bytes one decode step must read at the compute dtype: every weight but the position
    table (one row of it), and keys + values of `positions` cache slots per row and layer."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    # Untied, wte is only a lookup (B rows per step); tied, it is also the head's matmul, read in full.
    skipped = ("wpe",) if cfg.tie_embeddings else ("wpe", "wte")
    leaves = jax.tree_util.tree_leaves_with_path(params)
    weights = sum(x.size for path, x in leaves if path[-1].key not in skipped)
    cache = 2 * cfg.n_layer * batch * positions * cfg.n_embd
    return int(weights * itemsize), int(cache * itemsize)


def bench_decode(model: GPT, params: Any, mesh, batch: int, s: Sizes, bandwidth: float) -> dict[str, Any]:
    """The compiled generator's ms per decode step (the public call, so host work drops out of the
    difference) beside the bandwidth floor."""
    cfg = model.config
    generator = Generator(model, mesh, "dp", batch)
    prompts = list(
        np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, s.prompt_len)).astype(np.int32)
    )
    start = time.perf_counter()
    generator(params, prompts, s.new_tokens)  # compile (and one run)
    compile_s = time.perf_counter() - start
    call = lambda n: generator(params, prompts, n)
    call(1)  # the first call of a count pays one-time host work: warm both before timing
    one, many = (median_s(lambda n=n: call(n), s.iters) for n in (1, s.new_tokens))
    step_ms = 1e3 * (many - one) / (s.new_tokens - 1)
    weight_bytes, cache_bytes = decode_bytes(cfg, params, batch, s.prompt_len + s.new_tokens / 2)
    floor_ms = 1e3 * (weight_bytes + cache_bytes) / bandwidth
    return dict(
        compile_s=compile_s,
        first_token_ms=1e3 * one,
        total_ms=1e3 * many,
        ms_per_step=step_ms,
        compiles=generator.traces,
        weight_bytes=weight_bytes,
        cache_bytes=cache_bytes,
        floor_ms=floor_ms,
        ratio_to_floor=step_ms / floor_ms,
    )


def bench_naive(model: GPT, params: Any, s: Sizes) -> dict[str, Any]:
    """generation_bench's naive loop one token at a time (each new length re-jits), batch 1, time-capped."""
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, s.prompt_len)).astype(np.int32)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < s.naive_tokens and (not times or time.perf_counter() - start < s.naive_cap_s):
        seconds, ids = generation_bench._timed(generation_bench._greedy_loop, forward, params, ids, 1, None)
        times.append(seconds)
    compiles = forward._cache_size()  # one per length: the cost this loop exists to show
    return dict(tokens=len(times), s_per_token=statistics.median(times), per_token_s=times, compiles=compiles)


def bench_train(cfg: config.ModelConfig, mesh, batch: int, s: Sizes) -> dict[str, Any]:
    """One config compiled once, `warmup` steps, then `steps` timed between two block_until_ready."""
    model = GPT(cfg)
    tx = optim.make_optimizer(optim.OptimConfig(warmup_steps=1, total_steps=s.warmup + s.steps))
    state, shardings = train.init_state(model, tx, mesh, "dp")
    step = train.make_train_step(model, tx, mesh, "dp", shardings)
    tokens_BxL = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, s.seq + 1)).astype(np.int32)
    placed = jax.device_put(
        {"inputs": tokens_BxL[:, :-1], "targets": tokens_BxL[:, 1:]}, sharding.batch_sharding(mesh, "dp")
    )
    start = time.perf_counter()
    compiled = step.jitted.lower(state, placed).compile()
    compile_s = time.perf_counter() - start
    temp_bytes = (metrics.compiled_memory(compiled) or {}).get("temp_bytes")
    trainer = train.Trainer(compiled, state, lambda _: placed, batch * s.seq, progress=False)
    jax.block_until_ready(trainer.run(s.warmup))
    start = time.perf_counter()
    jax.block_until_ready(trainer.run(s.steps))
    step_time = (time.perf_counter() - start) / s.steps
    history = trainer.history[s.warmup :]
    tokens_per_s = batch * s.seq / step_time
    flops = metrics.flops_per_token(cfg, s.seq)
    peak = metrics.peak_flops(mesh.devices.flat[0].device_kind)
    return dict(
        compile_s=compile_s,
        step_time_s=step_time,
        step_time_median_s=statistics.median(batch * s.seq / h["tokens_per_s"] for h in history),
        tokens_per_s=tokens_per_s,
        flops_per_token=flops,
        peak_flops=peak,
        mfu=metrics.mfu(tokens_per_s, flops, peak, 1),
        first_loss=trainer.history[0]["loss"],
        last_loss=trainer.history[-1]["loss"],
        temp_bytes=temp_bytes,
    )


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/gpu", help="folder for results.json and table.txt")
    p.add_argument("--tiny", action="store_true", help="gpt-pico, seq 32, a few steps: a CPU smoke run")
    p.add_argument(
        "--no-gpu-flags", action="store_true", help="leave out XLA's GPU flags (shardgpt.xla_flags.GPU_FLAGS)"
    )
    p.add_argument("--layers", default="unrolled,scan", help="comma list of unrolled, scan")
    p.add_argument("--attention", default=None, help="comma list of cudnn, xla (default: both on GPU, xla)")
    p.add_argument("--batches", default=None, help="comma list of train batches (default 16,32,8; --tiny 2)")
    p.add_argument(
        "--budget", type=float, default=420.0, help="seconds (default 420); parts past it are skipped"
    )
    args = p.parse_args(argv)
    args.layers = args.layers.split(",")
    if not set(args.layers) <= {"unrolled", "scan"}:
        p.error(f"--layers takes unrolled and/or scan, got {args.layers}")
    gpu = jax.devices()[0].platform == "gpu"
    args.attention = (args.attention or ("cudnn,xla" if gpu else "xla")).split(",")
    if not set(args.attention) <= set(config.ATTENTION_IMPLS):
        p.error(f"--attention takes {' and/or '.join(config.ATTENTION_IMPLS)}, got {args.attention}")
    try:
        args.batches = [int(b) for b in (args.batches or ("2" if args.tiny else "16,32,8")).split(",")]
    except ValueError:
        p.error(f"--batches takes a comma list of integers, got {args.batches!r}")
    if min(args.batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    return args


class Budget:
    """Runs the parts under the wall-clock budget, records each one's outcome and rewrites results.json."""

    def __init__(self, results: dict[str, Any], out: Path, budget_s: float):
        self.results, self.out, self.budget_s = results, out, budget_s
        self.started = time.perf_counter()

    def save(self):
        self.results["meta"]["wall_s"] = time.perf_counter() - self.started
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def attempt(self, row: dict[str, Any], measure, projected_s: float = 0.0) -> dict[str, Any]:
        """Fill `row` from measure(): skipped past the budget, its error if it fails; saved either way."""
        begin = time.perf_counter()
        if begin - self.started + projected_s > self.budget_s:
            row |= dict(status="skipped", error=f"past the {self.budget_s:.0f} s budget")
        else:
            try:
                row |= measure() | dict(status="ok")
            except Exception as e:  # cuDNN unsupported, out of memory: recorded, and the run goes on
                row |= dict(status="error", error=_error(e))
            row["wall_s"] = time.perf_counter() - begin
        print(json.dumps({k: v for k, v in row.items() if k != "per_token_s"}), flush=True)
        self.save()
        return row


def measure_generation(run: Budget, cfg: config.ModelConfig, mesh, s: Sizes, tiny: bool):
    """Decode at each batch beside its floor, then the naive loop: into run.results."""
    results, bandwidth = run.results, run.results["copy_bandwidth_bytes_per_s"]
    model = GPT(cfg)
    params = jax.jit(lambda rng: train.init_params(model, rng))(jax.random.key(0))
    for batch in s.decode_batches:
        goal = GOAL_FLOOR_RATIO.get(batch, DEFAULT_FLOOR_GOAL)
        reference = None if tiny else REFERENCE_DECODE_MS.get(batch)
        row = _row(DECODE_KEYS, batch=batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens)
        row |= dict(goal_ratio=goal, reference_ms_per_step=reference)
        if bandwidth is None:
            row |= dict(status="skipped", error="no copy bandwidth was measured: no floor")
        else:
            row = run.attempt(row, lambda b=batch: bench_decode(model, params, mesh, b, s, bandwidth))
        results["decode"].append(row)
    results["naive"]["reference_s_per_token"] = None if tiny else REFERENCE_NAIVE_S
    run.attempt(results["naive"], lambda: bench_naive(model, params, s))


def measure_training(run: Budget, cfg: config.ModelConfig, mesh, s: Sizes, args: argparse.Namespace):
    """Every config of the matrix, headline first, each skipped where its layout's slowest config so far
    would overrun the budget (an unrolled model compiles slower than a scanned one)."""
    platform = mesh.devices.flat[0].platform
    slowest: dict[str, float] = {}  # per layout; before a layout's first config, the other's
    for layers, attention, batch in train_matrix(args.layers, args.attention, args.batches):
        reference = None if args.tiny else REFERENCE_MFU.get((layers, attention, batch))
        row = _row(TRAIN_KEYS, layers=layers, attention=attention, batch=batch, seq=s.seq)
        row |= dict(goal_mfu=GOAL_MFU, reference_mfu=reference)
        if attention == "cudnn" and platform != "gpu":
            row |= dict(status="skipped", error=f"cudnn attention needs an NVIDIA GPU, not {platform}")
        else:
            run_cfg = cfg.replace(attention=attention, scan_layers=layers == "scan")
            measure = lambda c=run_cfg, b=batch: bench_train(c, mesh, b, s)
            projected = slowest.get(layers, max(slowest.values(), default=0.0))
            row = run.attempt(row, measure, projected)
            if row["status"] == "ok":
                slowest[layers] = max(slowest.get(layers, 0.0), row["wall_s"])
        run.results["train"].append(row)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what it wrote to OUT/results.json."""
    args = parse_args(argv)
    s = TINY if args.tiny else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    mesh = make_mesh("dp=1", [device])  # one device, whatever else is present
    cfg = config.preset(s.model, dtype="bfloat16", **dict(s.overrides))
    command = " ".join(["experiments/gpu_bench.py", *(sys.argv[1:] if argv is None else argv)])
    meta = lab.meta(command) | dict(model=s.model, n_params=cfg.n_params(), seq=s.seq, dtype=cfg.dtype)
    meta |= dict(device=str(device), budget_s=args.budget, tiny=args.tiny, sizes=dataclasses.asdict(s))
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")  # what this run's XLA was started with
    results = dict(meta=meta, sources=SOURCES, copy_bandwidth_bytes_per_s=None, copy={}, train=[], decode=[])
    results["naive"] = _row(NAIVE_KEYS, batch=1, prompt_len=s.prompt_len)
    run = Budget(results, out, args.budget)

    results["copy"] = dict(array_bytes=2 * s.copy_elements, bytes_per_s=None, status=None, error=None)
    run.attempt(results["copy"], lambda: dict(bytes_per_s=copy_bandwidth(s.copy_elements, 10)))
    results["copy_bandwidth_bytes_per_s"] = results["copy"]["bytes_per_s"]
    measure_generation(run, cfg, mesh, s, args.tiny)  # bounded and cheap: measured before training
    measure_training(run, cfg, mesh, s, args)
    run.save()
    text = table(results)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
