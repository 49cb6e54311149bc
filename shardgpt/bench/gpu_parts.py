"""The one-GPU benchmark's measurements (shardgpt.bench.gpu_sections calls them): copy bandwidth, training
MFU, decode against its floor, the naive generator; and the sizes of a full (gpt2) and a tiny (CPU smoke) run.

Imports jax: shardgpt.bench.gpu sets XLA's flags before it imports this module.
"""

import dataclasses
import statistics
import time
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

GOAL_FLOOR_RATIO = {1: 3.0}  # decode step / floor; every other batch: DEFAULT_FLOOR_GOAL
DEFAULT_FLOOR_GOAL = 1.5
PYTORCH_COPY_BYTES_PER_S = 4.3e12  # issue 30: PyTorch's copy on one H200, where JAX's reaches 2.6-2.75 TB/s
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
    "floor_ms_pytorch": "derived: (weight_bytes + cache_bytes) / 4.3e12 B/s, the copy bandwidth PyTorch "
    "reaches on an H200 (issue 30, measured by a session on one H200, 2026-12-04; not this run)",
    "ratio_to_floor_pytorch": "derived: ms_per_step / floor_ms_pytorch",
    "bandwidth_fraction": "derived: (weight_bytes + cache_bytes) / ms_per_step / copy_bandwidth_bytes_per_s",
    "s_per_token": "measured: median seconds per token of the naive loop (each re-jits: compile included)",
    "first_token_ms": "measured: median call for 1 new token (prefill + the phases' cache copies)",
    "total_ms": "measured: median call for new_tokens tokens",
    "temp_bytes": "compiled program (memory_analysis)",
    "memory": "compiled program (memory_analysis, metrics.compiled_memory): arguments, outputs, aliased, "
    "temporaries, total",
    "predicted": "cost model: shardgpt.analysis.cost.predict on the compiled step's HLO for this device's "
    "hardware profile; one device has no collectives, so its communication term is unvalidated on GPU",
    "first_loss": "measured: loss of the first step on random tokens (a sanity check: about ln(vocab))",
    "last_loss": "measured: loss of the last timed step",
    "wall_s": "measured: wall time of the whole measurement, compile and warmup included",
    "projected_s": "the time the run's clock expected the measurement to take (shardgpt.bench.gpu_run)",
    "goal_mfu": "issue 30's goals: 45% at the headline batch, 47% at the second, 50% for gpt2-xl",
    "goal_ratio": "issue 30's goal (ms_per_step / floor_ms at most this)",
    "reference_mfu": "not this run: DESIGN.md anchors, plain JAX gpt2, one H100 (shared/anchors/gpu_ref.py)",
    "reference_ms_per_step": "not this run: as reference_mfu",
    "reference_s_per_token": "not this run: as reference_mfu",
    "anchor": "not ours: the plain-JAX anchor's own figures (its gpu_ref.json), run in this run at our "
    "configs with its own timing; speedup = its time / ours",
    "planner": "planned: run.py --plan's compiled memory (compile only, another process); compiled: this "
    "run's compile of the same step (memory_analysis); live peak: memory_stats peak_bytes_in_use after a "
    "few steps of the planned program in that fresh process (null where the backend has none)",
    "mock": "run.py --plan compiled on a mock GPU topology (compile only, another process); its prediction: "
    "cost.predict on that program's HLO (collective terms unvalidated on GPU)",
    "cost_model": "predicted: each train row's `predicted`; measured: its step_time_s; rel_error = predicted "
    "/ measured - 1; median over the configs both exist for",
    "levers": "measured: each candidate speed-up (issue 30) as a variant of a config this run measured, "
    "in a process of its own where it is an XLA flag or a jax option (read once per process), else in "
    "this one; beside the same run's figure for that config",
    "baseline_ms": "measured: this run's figure for the lever's config (the headline's row; where it has "
    "none, a process of its own without the lever): decode ms_per_step or train step_time_s x 1e3",
    "variant_ms": "measured: the same figure, the same way, with the lever's setting",
    "speedup": "derived: baseline_ms / variant_ms (above 1: the lever helps)",
}

TRAIN_KEYS = ("name", "section", "model", "layers", "attention", "batch", "remat", "seq", "status", "error")
TRAIN_KEYS += ("projected_s", "compile_s", "step_time_s", "step_time_median_s", "tokens_per_s")
TRAIN_KEYS += ("flops_per_token", "peak_flops", "mfu", "goal_mfu", "reference_mfu", "first_loss", "last_loss")
TRAIN_KEYS += ("temp_bytes", "memory", "predicted", "wall_s")
DECODE_KEYS = ("name", "section", "model", "batch", "prompt_len", "new_tokens", "status", "error")
DECODE_KEYS += ("projected_s", "compile_s", "first_token_ms", "total_ms", "ms_per_step", "compiles")
DECODE_KEYS += ("weight_bytes", "cache_bytes", "floor_ms", "ratio_to_floor", "floor_ms_pytorch")
DECODE_KEYS += ("ratio_to_floor_pytorch", "bandwidth_fraction", "goal_ratio", "reference_ms_per_step")
DECODE_KEYS += ("wall_s",)
NAIVE_KEYS = ("batch", "prompt_len", "tokens", "status", "error", "s_per_token", "per_token_s")
NAIVE_KEYS += ("compiles", "reference_s_per_token", "projected_s", "wall_s")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the full gpt2 benchmark, or the tiny CPU smoke run."""

    model: str  # the headline model
    seq: int
    warmup: int
    steps: int
    headline_batches: tuple[int, ...]  # the headline train config at each: goals 45%, then 47%
    decode_batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    iters: int
    naive_tokens: int
    naive_cap_s: float
    copy_elements: int
    # The cost model's (model, layers, attention, batch, remat), most wanted first; attention "head" is the
    # headline's (cuDNN's on an NVIDIA GPU).
    held_out: tuple[tuple[str, str, str, int, bool], ...]
    xl_model: str
    xl_layers: str
    xl_candidates: tuple[tuple[int, bool], ...]  # (batch, remat), best first: the first that fits is measured
    train_s: float  # a train measurement's projected seconds before any has been measured
    decode_s: float  # likewise a decode measurement's
    child_s: float  # the least time worth starting another process with
    overrides: tuple[tuple[str, Any], ...] = ()  # every model's config
    # The levers section's fused-loss chunk sizes (training/loss.py's CHUNK is 128), most wanted first.
    loss_chunks: tuple[int, ...] = (512, 256)


HEAD = "head"  # in held_out: the headline's attention
HELD_OUT = (  # the headline's two (measured there), then scanned ones (their compile is flat in depth)
    ("gpt2", "unrolled", HEAD, 16, False),
    ("gpt2", "unrolled", HEAD, 32, False),
    ("gpt2", "scan", HEAD, 16, False),
    ("gpt2", "scan", HEAD, 16, True),
    ("gpt2-medium", "scan", HEAD, 8, False),
    ("gpt2-medium", "scan", HEAD, 8, True),
    ("gpt2", "scan", "xla", 16, False),
    ("gpt2-medium", "scan", HEAD, 16, False),
    ("gpt2", "unrolled", "xla", 16, False),
    ("gpt2", "unrolled", HEAD, 8, False),
    ("gpt2-medium", "unrolled", HEAD, 8, False),
)
XL_CANDIDATES = ((16, False), (8, False), (16, True), (4, True))
FULL = Sizes(
    "gpt2", 1024, 3, 10, (16, 32), (1, 64), 128, 256, 5, 4, 30.0, 2**30, HELD_OUT, "gpt2-xl", "scan",
    XL_CANDIDATES, 60.0, 30.0, 20.0,
)  # fmt: skip
# Tiny: each train or decode config costs 2-5 s of init and compile on a 2-core CPU, so it measures one of
# each, which the cost model, gpt2-xl's stand-in and the rest reuse (tests/test_gpu_bench.py runs it whole).
TINY = Sizes(
    "gpt-pico", 32, 1, 2, (2,), (1,), 8, 48, 5, 2, 10.0, 2**20, (("gpt-pico", "unrolled", HEAD, 2, False),),
    "gpt-pico", "unrolled", ((2, False),), 5.0, 3.0, 2.0, (("block_size", 64), ("n_layer", 1)), (16,),
)  # fmt: skip


def blank_row(keys: tuple[str, ...], **values: Any) -> dict[str, Any]:
    """A row with every key, null until measured: a skipped row's figures stay null."""
    return {k: None for k in keys} | values


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
    moved = weight_bytes + cache_bytes
    floor_ms, floor_ms_pytorch = (1e3 * moved / b for b in (bandwidth, PYTORCH_COPY_BYTES_PER_S))
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
        floor_ms_pytorch=floor_ms_pytorch,
        ratio_to_floor_pytorch=step_ms / floor_ms_pytorch,
        bandwidth_fraction=floor_ms / step_ms,
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


def _train_setup(cfg: config.ModelConfig, mesh, batch: int, s: Sizes):
    """(the train step as run.py builds it, its fresh state, one placed batch of random tokens)."""
    model = GPT(cfg)
    tx = optim.make_optimizer(optim.OptimConfig(warmup_steps=1, total_steps=s.warmup + s.steps))
    state, shardings = train.init_state(model, tx, mesh, "dp")
    step = train.make_train_step(model, tx, mesh, "dp", shardings)
    tokens_BxL = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, s.seq + 1)).astype(np.int32)
    placed = jax.device_put(
        {"inputs": tokens_BxL[:, :-1], "targets": tokens_BxL[:, 1:]}, sharding.batch_sharding(mesh, "dp")
    )
    return step, state, placed


def _timed_steps(step_fn, state, placed, cfg: config.ModelConfig, mesh, batch: int, s: Sizes, untimed: int):
    """`untimed` + `warmup` steps of `step_fn`, then `steps` timed between two block_until_ready: the
    row's step time, throughput, MFU and losses."""
    trainer = loop.Trainer(step_fn, state, lambda _: placed, batch * s.seq, progress=False)
    jax.block_until_ready(trainer.run(untimed + s.warmup))
    start = time.perf_counter()
    jax.block_until_ready(trainer.run(s.steps))
    step_time = (time.perf_counter() - start) / s.steps
    history = trainer.history[untimed + s.warmup :]
    tokens_per_s = batch * s.seq / step_time
    flops = metrics.flops_per_token(cfg, s.seq)
    peak = metrics.peak_flops(mesh.devices.flat[0].device_kind)
    return dict(
        step_time_s=step_time,
        step_time_median_s=statistics.median(batch * s.seq / h["tokens_per_s"] for h in history),
        tokens_per_s=tokens_per_s,
        flops_per_token=flops,
        peak_flops=peak,
        mfu=metrics.mfu(tokens_per_s, flops, peak, 1),
        first_loss=trainer.history[0]["loss"],
        last_loss=trainer.history[-1]["loss"],
    )


def bench_train(
    cfg: config.ModelConfig, mesh, batch: int, s: Sizes, on_compiled=None, limit_bytes: int | None = None
) -> dict[str, Any]:
    """One config compiled once, `warmup` steps, then `steps` timed between two block_until_ready.

    `on_compiled(compiled)` returns more fields for the row (the cost model's prediction of this program);
    a program whose compiled total exceeds `limit_bytes` raises before it runs.
    """
    step, state, placed = _train_setup(cfg, mesh, batch, s)
    start = time.perf_counter()
    compiled = step.jitted.lower(state, placed).compile()
    compile_s = time.perf_counter() - start
    memory = metrics.compiled_memory(compiled)
    if limit_bytes and memory and memory["total_bytes"] > limit_bytes:
        raise MemoryError(
            f"does not fit: the compiled step needs {memory['total_bytes'] / 2**30:.1f} GiB, the device "
            f"allows {limit_bytes / 2**30:.1f} GiB"
        )
    extra = on_compiled(compiled) if on_compiled else {}
    figures = _timed_steps(compiled, state, placed, cfg, mesh, batch, s, 0)
    memory_fields = dict(temp_bytes=(memory or {}).get("temp_bytes"), memory=memory)
    return dict(compile_s=compile_s) | figures | memory_fields | extra


def bench_train_dispatched(
    cfg: config.ModelConfig, mesh, batch: int, s: Sizes, untimed: int
) -> dict[str, Any]:
    """bench_train through jit's own dispatch, as run.py trains, not a program compiled ahead: `untimed`
    calls before the warmup. jax's PGLE profiles and recompiles only on this path (.lower() takes no
    profiler). compile_s: the first call's wall time, one step included."""
    step, state, placed = _train_setup(cfg, mesh, batch, s)
    start = time.perf_counter()
    state, _ = step.jitted(state, placed)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - start
    return dict(compile_s=compile_s) | _timed_steps(step.jitted, state, placed, cfg, mesh, batch, s, untimed)
