"""One experiment run: a RunSpec in, one results.json record out (timing, MFU, memory, collectives, losses).

Everything a spec can get wrong is checked by `prepare` (no compiling), so a list of specs can be validated
before the first one spends minutes compiling. Numbers come from what ran: step times from the Trainer's
pipelined loop, bytes from the arrays' shards, collectives and peak memory from the compiled program.
"""

import dataclasses
import datetime
import functools
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from shardgpt.analysis import metrics, theory
from shardgpt.io import weight_files, weights
from shardgpt.lab import experts, generation_bench
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, pipeline, sharding
from shardgpt.parallel.mesh import describe, make_mesh
from shardgpt.training import data, explicit_step, loop, optim, shard_map_step, train

IMPLS = ("gspmd", "shard_map", "explicit")
FLOPS_SOURCE = "6N + 12·L·H·Q·T (PaLM app. B)"
DEFAULT_WARMUP = 5
PROFILE_STEPS = 3  # steps traced by --profile, run after the timed ones so the trace costs them nothing


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run: what to train, on which mesh, with which strategy and implementation."""

    mesh: str = "dp=2,tp=4"
    strategy: str = "dp"
    impl: str = "gspmd"
    model: str = "gpt-pico"
    overrides: tuple[tuple[str, str], ...] = ()  # --model.X=V pairs, type-checked by ModelConfig.replace
    optim: tuple[tuple[str, str], ...] = ()  # --optim.X=V pairs, type-checked by OptimConfig.replace
    task: str = "sort"
    seq: int | None = None  # chars tasks only; sort's length is fixed
    steps: int = 100
    batch: int = 64
    microbatches: int = 1  # gradient accumulation: the batch as M microbatches inside the one step
    dtype: str = "float32"
    attention: str = "xla"
    scan: bool = True
    remat: bool = False
    lr: float = 3e-3
    seed: int = 0
    warmup: int | None = None  # leading steps left out of the median step time; None: up to 5
    generate: int = 0  # new tokens for the generation benchmark; 0: none
    init_from: str | None = None
    profile: str | None = None


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a spec resolves to before anything compiles."""

    task: Any
    mesh: jax.sharding.Mesh
    strategy: str
    config: config.ModelConfig
    model: GPT
    tx: Any
    make_step: Callable
    prompt_len: int
    generate_batch: int
    optim: optim.OptimConfig
    warmup: int  # timed steps start after this many


@functools.lru_cache(maxsize=1)
def _weight_file(path: str) -> weight_files.WeightFile:
    return weight_files.read_weight_file(path)  # cached: every run of a comparison starts from the same file


_MODULES = {"gspmd": train, "shard_map": shard_map_step, "explicit": explicit_step}


def _module(impl: str):
    if impl not in _MODULES:
        raise ValueError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)} (or both, or all)")
    return _MODULES[impl]


def step_builder(impl: str) -> Callable:
    """make_train_step of the chosen implementation (one signature for the three)."""
    return _module(impl).make_train_step


def eval_builder(impl: str) -> Callable:
    """make_eval_sums of the chosen implementation (one signature for the three)."""
    return _module(impl).make_eval_sums


def _model_config(spec: RunSpec, task: Any) -> config.ModelConfig:
    overrides = dict(spec.overrides)
    run_fields = dict(dtype=spec.dtype, attention=spec.attention, scan_layers=spec.scan, remat=spec.remat)
    if spec.init_from:
        # Shapes come from the file, and n_head, GELU and eps from its metadata when it has some (nanoGPT's
        # model_args, HF's config.json); else n_head from --model.n_head, or from the preset only when the
        # preset has the checkpoint's width and depth (else its head count means nothing).
        sd, hints = _weight_file(spec.init_from)
        n_head = overrides.pop("n_head", None)
        if n_head is None and "n_head" not in hints:
            shapes, base = weights.config_from_state_dict(sd, 1), config.preset(spec.model)
            if (base.n_embd, base.n_layer) != (shapes.n_embd, shapes.n_layer):
                raise ValueError(
                    f"{spec.init_from} has n_embd={shapes.n_embd}, n_layer={shapes.n_layer}, unlike preset "
                    f"{spec.model!r}: give its head count with --model.n_head=H (or the matching --model)"
                )
            n_head = base.n_head
        # --model.X beats the run's own flags (--dtype, --scan, ...) here as it does for presets.
        cfg = weights.config_from_state_dict(sd, n_head, hints=hints, **(run_fields | overrides))
    else:
        # The preset's context, widened to the task's sequence, unless --model.block_size says otherwise.
        block = max(config.preset(spec.model).block_size, task.seq_len)
        derived = dict(vocab_size=task.vocab_size, block_size=block, **run_fields)
        cfg = config.preset(spec.model, **(derived | overrides))
    if task.vocab_size > cfg.vocab_size:
        source = spec.init_from or "--model.vocab_size"
        raise ValueError(
            f"task {spec.task!r} has {task.vocab_size} tokens but the model ({source}) only "
            f"{cfg.vocab_size}: use a task whose vocabulary fits, or a larger vocab_size"
        )
    return cfg


def prepare(spec: RunSpec) -> Setup:
    """Resolve a spec and check mesh, strategy, model, shapes, batch: ValueError if bad; compiles nothing."""
    if spec.steps < 1 or spec.batch < 1:
        raise ValueError(f"--steps and --batch must be >= 1 (got {spec.steps}, {spec.batch})")
    warmup = min(DEFAULT_WARMUP, spec.steps - 1) if spec.warmup is None else spec.warmup
    if spec.seq is not None and spec.seq < 1:
        raise ValueError(f"--seq must be >= 1, got {spec.seq}")
    if spec.seed < 0:
        raise ValueError(
            f"--seed must be >= 0 (numpy's and jax's generators take non-negative seeds), got {spec.seed}"
        )
    if spec.generate < 0 or warmup < 0:
        raise ValueError(f"--generate and --warmup must be >= 0 (got {spec.generate}, {warmup})")
    if warmup >= spec.steps:
        raise ValueError(
            f"--warmup {warmup} leaves none of the {spec.steps} steps to time: use --warmup < --steps"
        )
    if not spec.lr > 0:
        raise ValueError(f"--lr must be > 0, got {spec.lr}")
    if spec.task == "sort" and spec.seq is not None:
        raise ValueError("--seq applies to chars:PATH tasks; the sort task's sequence length is fixed")
    task = data.make_task(spec.task, spec.seq, spec.seed)
    mesh = make_mesh(spec.mesh)
    strategy = sharding.canonical(spec.strategy)
    make_step = step_builder(spec.impl)
    cfg = _model_config(spec, task)
    platform = mesh.devices.flat[0].platform
    if cfg.attention == "cudnn" and platform != "gpu":
        raise ValueError(f"--attention cudnn needs NVIDIA GPUs (cuDNN), not {platform}: use --attention xla")
    model = GPT(cfg)
    lr_warmup = min(10, max(1, spec.steps // 10))
    base = optim.OptimConfig(learning_rate=spec.lr, warmup_steps=lr_warmup, total_steps=spec.steps)
    optim_config = base.replace(**dict(spec.optim))
    tx = optim.make_optimizer(optim_config)
    layout.check(mesh, strategy, spec.impl, cfg, spec.batch, task.seq_len, spec.microbatches)
    train.state_shardings(model, tx, mesh, strategy)  # every param dim checked against the mesh
    prompt_len = getattr(task, "length", min(32, task.seq_len // 2))  # sort: the unsorted digits
    # The last generated token is never read back, so prompt + new tokens may reach block_size + 1.
    if spec.generate and prompt_len + spec.generate - 1 > cfg.block_size:
        raise ValueError(
            f"--generate {spec.generate} after a {prompt_len}-token prompt exceeds block_size "
            f"{cfg.block_size}: generate at most {cfg.block_size + 1 - prompt_len}, or raise "
            "--model.block_size"
        )
    shards = sharding.batch_shards(mesh)
    generate_batch = -(-8 // shards) * shards
    return Setup(
        task, mesh, strategy, cfg, model, tx, make_step, prompt_len, generate_batch, optim_config, warmup
    )


def initial_state(spec: RunSpec, s: Setup) -> tuple[train.TrainState, train.StateShardings]:
    """(state, shardings) at step 0, born in the strategy's layout: from --init-from's weights, or seeded."""
    if spec.init_from:
        params = weights.import_params(_weight_file(spec.init_from).state_dict, s.config, s.mesh, s.strategy)
        return weights.state_from_params(params, s.model, s.tx, s.mesh, s.strategy)
    return train.init_state(s.model, s.tx, s.mesh, s.strategy, seed=spec.seed)


def run_name(spec: RunSpec) -> str:
    """A run's label in tables and plots: "dp=2,tp=4 zero1" (+ " M=4" with microbatches, + " shard_map")."""
    mesh = describe(make_mesh(spec.mesh))
    micro = f" M={spec.microbatches}" if spec.microbatches > 1 else ""
    impl = "" if spec.impl == "gspmd" else f" {spec.impl}"
    return f"{mesh} {sharding.canonical(spec.strategy)}{micro}{impl}"


def model_label(spec: RunSpec) -> str:
    """The preset with its overrides and checkpoint: "gpt-pico[n_layer=1]"."""
    overrides = ",".join(f"{k}={v}" for k, v in spec.overrides)
    label = spec.model + (f"[{overrides}]" if overrides else "")
    return label + (f" from {spec.init_from}" if spec.init_from else "")


def _nbytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


# Where each memory figure comes from: results.json carries this beside the numbers.
MEMORY_SOURCES = {
    "params_bytes_per_device": "live arrays (the state's shards)",
    "opt_state_bytes_per_device": "live arrays (the state's shards)",
    "grads_bytes_per_device": "derived from the layout (gradients never persist)",
    "argument_bytes_per_device": "compiled program (memory_analysis)",
    "output_bytes_per_device": "compiled program (memory_analysis)",
    "alias_bytes_per_device": "compiled program (memory_analysis)",
    "temp_bytes_per_device": "compiled program (memory_analysis)",
    "peak_bytes_per_device": "compiled program (memory_analysis)",
    "device_peak_bytes": "live device (memory_stats, peak since the process started; null where absent)",
}


def _memory(state: train.TrainState, shardings: train.StateShardings, compiled: Any) -> dict[str, Any]:
    """Bytes per device, each figure from its source (MEMORY_SOURCES): the state's live shards, the grads'
    layout, the compiled program's buffers; the device's own peak is added after the run."""
    compiled_memory = metrics.compiled_memory(compiled) or {}
    return {
        "params_bytes_per_device": metrics.bytes_per_device(state.params),
        "opt_state_bytes_per_device": metrics.bytes_per_device(state.opt_state),
        "grads_bytes_per_device": metrics.shard_bytes(state.params, shardings.grads),
        **{
            f"{k}_bytes_per_device": compiled_memory.get(f"{k}_bytes")
            for k in ("argument", "output", "alias")
        },
        "temp_bytes_per_device": compiled_memory.get("temp_bytes"),
        "peak_bytes_per_device": metrics.peak_bytes(compiled),
    }


def run(spec: RunSpec, progress: bool = True, log_every: int | None = None) -> dict[str, Any]:
    """Train one spec and measure it; returns one record of results.json's "runs" (docs/DESIGN.md's schema).
    `progress` and `log_every` are the Trainer's.

    With spec.generate > 0 the trained params are then benchmarked by shardgpt.lab.generation_bench.
    """
    started = time.perf_counter()
    s = prepare(spec)
    name, seq, mesh = run_name(spec), s.task.seq_len, s.mesh
    state, shardings = initial_state(spec, s)
    totals = _nbytes(state.params), _nbytes(state.opt_state)

    step_fn = s.make_step(s.model, s.tx, mesh, s.strategy, shardings, microbatches=spec.microbatches)
    batch_sharding = sharding.batch_sharding(mesh, s.strategy)

    def batch_for(step: int) -> dict:
        return data.global_batch(s.task, step, spec.batch, batch_sharding, s.config.vocab_size)

    first = batch_for(0)
    t0 = time.perf_counter()
    compiled = step_fn.jitted.lower(state, first).compile()  # lowered under the step's own mesh
    compile_s = time.perf_counter() - t0
    memory = _memory(state, shardings, compiled)  # before the first step donates the state
    by_cause = theory.by_cause(
        compiled.as_text(), s.config, s.strategy, dict(mesh.shape), state.params, shardings, spec.batch, seq,
        spec.microbatches, spec.impl, mesh.devices.flat[0].platform,
    )  # fmt: skip

    # An MoE's routing by the run's own params: at step 1 (before its update: the step's own routing), and
    # after training, on the last step's batch.
    probe = experts.RoutingProbe(s.model, mesh, s.strategy) if s.config.moe else None
    routing = {"steps": [1, spec.steps], "at": [probe(state.params, first)]} if probe else None

    # Train through the compiled executable itself: the timed loop can never hide a recompile.
    tokens_per_step = spec.batch * seq
    trainer = loop.Trainer(
        compiled, state, batch_for, tokens_per_step, progress=progress, description=name, log_every=log_every
    )
    state = jax.block_until_ready(trainer.run(spec.steps))
    # The Trainer reads step t's metrics after dispatching t+1: each interval is one step of the pipeline.
    step_times = [tokens_per_step / h["tokens_per_s"] for h in trainer.history]
    timed = step_times[s.warmup :]
    step_time = statistics.median(timed)
    losses = [h["loss"] for h in trainer.history]
    grad_norms = [h["grad_norm"] for h in trainer.history if "grad_norm" in h]
    if probe:  # and every step's choices dropped, as the step itself counted them (exact, every step)
        routing["at"].append(probe(state.params, batch_for(spec.steps - 1)))
        routing["dropped_per_step"] = [h["moe_dropped"] for h in trainer.history]
        routing["choices_per_step"] = tokens_per_step * s.config.moe_top_k * s.config.n_layer

    profile_dir = None
    if spec.profile:
        profile_dir = str(Path(spec.profile) / re.sub(r"[^\w.-]+", "_", name))
        if jax.process_count() > 1:  # each process traces its own devices: one folder each
            profile_dir = str(Path(profile_dir) / f"process_{jax.process_index()}")
        jax.profiler.start_trace(profile_dir)
        for i in range(PROFILE_STEPS):  # extra steps on the trained state; losses above are unaffected
            state, _ = compiled(state, batch_for(spec.steps + i))
        jax.block_until_ready(state)
        jax.profiler.stop_trace()

    generate = None
    if spec.generate:  # on any mesh: the params are converted into the generation layout first
        generate = generation_bench.benchmark(
            s.model, state.params, mesh, s.strategy, s.generate_batch, s.prompt_len, spec.generate
        )

    cfg, dp, tp = s.config, mesh.shape["dp"], mesh.shape["tp"]
    tokens_per_s = tokens_per_step / step_time
    flops_per_token = metrics.flops_per_token(cfg, seq)
    peak_flops = metrics.peak_flops(mesh.devices.flat[0].device_kind)
    return {
        "name": name,
        "mesh": dict(mesh.shape),
        "strategy": s.strategy,
        "impl": spec.impl,
        "model": model_label(spec),
        "config": dataclasses.asdict(cfg),
        "n_params": cfg.n_params(),
        "task": spec.task,
        "batch": spec.batch,
        "microbatches": spec.microbatches,
        "sequence_parallel": sharding.is_sequence_parallel(s.strategy),
        "seq": seq,
        "steps": spec.steps,
        "dtype": cfg.dtype,
        "lr": s.optim.learning_rate,
        "optim": dataclasses.asdict(s.optim),
        "seed": spec.seed,
        "compile_s": compile_s,
        "step_time_s": step_time,
        "step_times_s": step_times,
        "timed_steps": len(timed),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token,
        "peak_flops": peak_flops,
        "mfu": metrics.mfu(tokens_per_s, flops_per_token, peak_flops, mesh.devices.size),
        "memory": memory | {"device_peak_bytes": metrics.device_peak_bytes(mesh.devices.flat[0])},
        "memory_sources": MEMORY_SOURCES,
        "expected_memory": metrics.zero_expected_bytes(
            totals[0],
            totals[1],
            totals[0],
            s.strategy,
            dp,
            tp,
            mesh.shape["pp"],
            mesh.shape["ep"],
            experts.share(state.params),
        ),
        "collectives": metrics.collectives(compiled.as_text()),
        "collectives_by_cause": by_cause,
        "losses": losses,
        "final_loss": losses[-1],
        "grad_norms": grad_norms,
        "generate": generate,
        "moe": routing,
        "pipeline": pipeline_figures(mesh, spec.microbatches),
        "profile_dir": profile_dir,
        "wall_s": time.perf_counter() - started,
    }


def pipeline_figures(mesh: jax.sharding.Mesh, microbatches: int) -> dict[str, Any] | None:
    """A pp run's schedule: stages, microbatches, ticks and the bubble's theory (None without pp)."""
    pp = mesh.shape.get("pp", 1)
    if pp == 1:
        return None
    return {
        "pp": pp,
        "microbatches": microbatches,
        "ticks": microbatches + pp - 1,
        "bubble_theory": pipeline.bubble_fraction(pp, microbatches),
    }


def meta(command: str) -> dict[str, Any]:
    """results.json's "meta": where and how the runs ran."""
    device = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "flops_per_token_source": FLOPS_SOURCE,
        "peak_flops_per_device": metrics.peak_flops(device.device_kind),
    }
