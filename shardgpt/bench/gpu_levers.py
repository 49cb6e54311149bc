"""The one-GPU benchmark's levers section (issue 30: "predict each change's effect, then measure it"): each
candidate speed-up measured as a variant of a config this run already measured, beside that figure.

  command buffers  decode at each decode batch with XLA's command buffers (CUDA graphs) over the whole
                   generate loop, its while and conditionals included (COMMAND_BUFFER)
  pgle             the headline train config with jax's profile-guided latency estimator (PGLE)
  loss chunk       the headline train config with the fused loss at other chunk sizes (Sizes.loss_chunks)

XLA reads its flags, and this run's jax its options, once per process: those variants run in a process of
their own (gpu_child.py's `lever` job), measured by the same gpu_parts code
as the baseline; a child that fails (an XLA that rejects the flag aborts at startup) is that lever's error,
with its log's tail, and the next lever runs. The chunk is the loss's own argument, so it runs here. Each
lever is one attempt under the section's limit, in order; one whose projected time does not fit is skipped.
The baseline is the headline's row; where the headline has none, the child's job without the lever.
"""

import contextlib
import dataclasses
import functools
import json
import os
from typing import Any

from shardgpt.bench import gpu_apart as apart
from shardgpt.bench import gpu_parts as parts
from shardgpt.bench import gpu_sections as sections
from shardgpt.bench.gpu_run import Run
from shardgpt.training import loss

# XLA's syntax (xla/debug_options_flags.cc, setter_for_xla_gpu_enable_command_buffer): a comma list of
# DebugOptions.CommandBufferCmdType names (xla/xla.proto), any case, replacing XLA's default set (FUSION,
# CUBLAS, CUSTOM_CALL, CUDNN in the sources read; "+NAME" adds to it instead). WHILE and CONDITIONAL replaced
# CONDITIONALS in openxla/xla#19528 (Nov 2024), so jaxlib 0.4.36 (Dec 2024) on should take this value, older
# ones abort at startup ("Illegal value for --xla_gpu_enable_command_buffer"); jaxlib 0.10.2 takes it (run).
COMMAND_BUFFER = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
# jax/_src/config.py (jax 0.10.2): PGLE profiles the first N calls, then recompiles with the profile. It
# acts only on jit's own dispatch (pjit.py; .lower() passes no profiler), so that child trains through it.
PGLE = {"jax_enable_pgle": True, "jax_pgle_profiling_runs": 3}  # 3 is jax's default
LEVER_KEYS = ("lever", "config", "settings", "predicted", "status", "error", "projected_s", "baseline_ms")
LEVER_KEYS += ("baseline_from", "variant_ms", "speedup", "variant", "log_tail", "wall_s")
KEPT = parts.DECODE_KEYS + parts.TRAIN_KEYS + ("warnings", "xla_flags", "process")  # of a child's result
# Written before any is measured. Decode at batch 1 is launch-bound (issue 30: 0.715 ms, 7.35x the floor):
# XLA's default already records each loop iteration's kernels as a graph, so what WHILE saves is the host's
# per-token round trip for the loop's predicate and the launches between graphs.
PREDICTED = {
    "command buffers b1": "1.3x: the per-token host round trip and launch gaps go",
    "command buffers": "1.1x: a bigger step hides more of the launch cost already",
    "pgle": "1.00x (within 2%): one GPU has no collectives for the estimator to overlap",
    "loss chunk": "1.00x (within 2%): the same logits bytes, in {n} scan steps instead of {was}",
}


@dataclasses.dataclass(frozen=True)
class Lever:
    """One variant of a measured config: what to change, and what it is expected to do."""

    lever: str
    config: str  # the row of results["train"] or results["decode"] it varies
    settings: str  # the change, as set
    predicted: str


def _blank(lever: Lever) -> dict[str, Any]:
    return parts.blank_row(LEVER_KEYS, **dataclasses.asdict(lever))


def _speedup(baseline_ms: float, variant_ms: float | None) -> dict[str, Any]:
    if not variant_ms:
        raise RuntimeError("the variant measured no time")
    return dict(variant_ms=variant_ms, speedup=baseline_ms / variant_ms)


def _ms(result: dict[str, Any]) -> float | None:
    """A child's or a row's figure in ms: decode's ms per step, else train's step time."""
    if result.get("ms_per_step"):
        return result["ms_per_step"]
    return 1e3 * result["step_time_s"] if result.get("step_time_s") else None


def _child(run: Run, ctx: sections.Context, row: dict, spec: dict, name: str, env: dict) -> dict[str, Any]:
    """gpu_child.py's lever job on `spec` in `env`; its figures, or RuntimeError with the log's tail kept
    in `row` where it failed."""
    env = env | dict(XLA_PYTHON_CLIENT_PREALLOCATE="false")  # beside this process's preallocated memory
    result = apart.run_child(run, ctx, "lever", [json.dumps(spec)], name=name, env=env)
    if result.get("status") != "ok":
        row["log_tail"] = result.get("log_tail")
        raise RuntimeError(result.get("error") or f"the {name} process wrote no result")
    return result


def _measure(run, ctx, row, spec, name, env, base_row) -> dict[str, Any]:
    """The variant in a child beside the baseline: `base_row` where it was measured, else the same job in
    a child without the lever."""
    figures = dict(baseline_ms=_ms(base_row), baseline_from=f"this run's {base_row.get('section')} row")
    if base_row.get("status") != "ok" or not figures["baseline_ms"]:
        base = _child(run, ctx, row, spec | dict(jax={}), f"{name}_baseline", dict(os.environ))
        figures = dict(baseline_ms=_ms(base), baseline_from="a process of its own, without the lever")
    variant = _child(run, ctx, row, spec, name, env)
    kept = {k: v for k, v in variant.items() if k in KEPT and k != "memory"}
    return figures | _speedup(figures["baseline_ms"], _ms(variant)) | dict(variant=kept)


def command_buffers(run: Run, ctx: sections.Context, batch: int) -> dict[str, Any]:
    """Decode at `batch` with COMMAND_BUFFER added to XLA_FLAGS (the last setting of a flag wins)."""
    flags = f"--xla_gpu_enable_command_buffer={COMMAND_BUFFER}"
    name = f"{ctx.s.model} b{batch}"
    predicted = PREDICTED.get(f"command buffers b{batch}", PREDICTED["command buffers"])
    row = _blank(Lever("command buffers", name, f"XLA_FLAGS += {flags}", predicted))
    run.results["levers"]["rows"].append(row)
    base_row = sections.find(run.results["decode"], name) or {}
    bandwidth = run.results["copy_bandwidth_bytes_per_s"]
    spec = dict(kind="decode", tiny=ctx.tiny, model=ctx.s.model, batch=batch, bandwidth=bandwidth)
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
    one = (base_row.get("wall_s") if base_row.get("status") == "ok" else None) or ctx.s.decode_s
    projected = (1 if base_row.get("status") == "ok" else 2) * (one + ctx.s.child_s)  # child_s: its start
    measure = lambda: _measure(run, ctx, row, spec, f"lever_cb_b{batch}", env, base_row)
    return run.attempt(row, measure, projected)


def pgle(run: Run, ctx: sections.Context) -> dict[str, Any]:
    """The headline train config with PGLE: PGLE's profiled calls, its recompile, then the timed steps."""
    tc = sections.headline_config(ctx, ctx.s.headline_batches[0])
    settings = ", ".join(f"{k}={v}" for k, v in PGLE.items())
    row = _blank(Lever("pgle", tc.name, f"jax.config: {settings}", PREDICTED["pgle"]))
    run.results["levers"]["rows"].append(row)
    base_row = sections.find(run.results["train"], tc.name) or {}
    spec = dict(kind="train", tiny=ctx.tiny, model=tc.model, batch=tc.batch, layers=tc.layers)
    spec |= dict(attention=tc.attention, jax=PGLE, untimed=PGLE["jax_pgle_profiling_runs"] + 1)
    one = sections.projected_train_s(ctx, run.results["train"], tc)
    baseline = 0.0 if base_row.get("status") == "ok" else one + ctx.s.child_s
    projected = baseline + 2 * one + ctx.s.child_s  # compiled twice: before the profile and with it
    measure = lambda: _measure(run, ctx, row, spec, "lever_pgle", dict(os.environ), base_row)
    return run.attempt(row, measure, projected)


@contextlib.contextmanager
def loss_chunk(chunk: int):
    """training/loss.py's fused loss at `chunk` positions per chunk (its own argument, default loss.CHUNK)
    in every step traced inside; the loss as it was after."""
    original = loss.head_cross_entropy_sum
    loss.head_cross_entropy_sum = functools.partial(original, chunk=chunk)
    try:
        yield
    finally:
        loss.head_cross_entropy_sum = original


def chunk(run: Run, ctx: sections.Context, size: int) -> dict[str, Any]:
    """The headline train config with the fused loss at `size` positions per chunk, in this process."""
    tc = sections.headline_config(ctx, ctx.s.headline_batches[0])
    settings = f"loss chunk {loss.CHUNK} -> {size} (head_cross_entropy_sum's chunk)"
    steps = lambda c: -(-ctx.s.seq // min(c, ctx.s.seq))  # the loss's scan length at chunk c
    predicted = PREDICTED["loss chunk"].format(n=steps(size), was=steps(loss.CHUNK))
    row = _blank(Lever("loss chunk", tc.name, settings, predicted))
    run.results["levers"]["rows"].append(row)
    base_row = sections.train_row(run, ctx, tc, "levers")  # the headline's, or measured now
    if base_row["status"] != "ok":
        row |= dict(status="skipped", error=f"no baseline: {tc.name} {base_row['status']}")
        run.save()
        return row
    cfg = sections.model_config(ctx, tc.model, attention=tc.attention, scan_layers=tc.layers == "scan")

    def measure() -> dict[str, Any]:
        with loss_chunk(size):
            variant = parts.bench_train(cfg, ctx.mesh, tc.batch, ctx.s)
        figures = dict(baseline_ms=_ms(base_row), baseline_from=f"this run's {base_row['section']} row")
        kept = {k: v for k, v in variant.items() if k != "memory"}
        return figures | _speedup(figures["baseline_ms"], _ms(variant)) | dict(variant=kept)

    return run.attempt(row, measure, sections.projected_train_s(ctx, run.results["train"], tc))


def levers(run: Run, ctx: sections.Context):
    """Every lever in order: command buffers at each decode batch, PGLE, then each loss chunk size."""
    note = "tiny on CPU: XLA's GPU flags and PGLE do nothing here; the rows prove the plumbing only"
    run.results["levers"] = dict(rows=[], note=note if ctx.device.platform == "cpu" else None)
    for batch in ctx.s.decode_batches:
        command_buffers(run, ctx, batch)
    pgle(run, ctx)
    for size in ctx.s.loss_chunks:
        chunk(run, ctx, size)
