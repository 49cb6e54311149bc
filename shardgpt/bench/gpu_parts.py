"""The one-GPU benchmark's parts (shardgpt.bench.gpu runs them): copy bandwidth, decode against its floor,
the naive generator and training MFU, each filling one row of results.json under the run's time budget.

Imports jax: shardgpt.bench.gpu sets XLA's flags before it imports this module.
"""

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from shardgpt.analysis import metrics
from shardgpt.generation.generate import Generator
from shardgpt.lab import generation_bench
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import sharding
from shardgpt.training import loop, optim, train

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


def blank_row(keys: tuple[str, ...], **values: Any) -> dict[str, Any]:
    return {k: None for k in keys} | values  # every row has every key; a skipped row's figures are null


def _error(e: Exception) -> str:
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def median_s(fn, iters: int) -> float:
    """Median wall time of `fn()` over `iters` calls, each waited for."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
        seconds, ids = generation_bench.timed(generation_bench.greedy_loop, forward, params, ids, 1, None)
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
    trainer = loop.Trainer(compiled, state, lambda _: placed, batch * s.seq, progress=False)
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
        row = blank_row(DECODE_KEYS, batch=batch, prompt_len=s.prompt_len, new_tokens=s.new_tokens)
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
        row = blank_row(TRAIN_KEYS, layers=layers, attention=attention, batch=batch, seq=s.seq)
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
