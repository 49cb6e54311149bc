"""The one-GPU benchmark's sections that run in this process: the headline figures, the cost model's held-out
configs, gpt2-xl, and what budget is left (the rest of the train matrix, the naive generator). The anchor,
the planner and the mock topology run other processes (gpu_apart.py).

A train or decode config one section measured is reused, by name, by any later section that asks for it (the
cost model's first configs are the headline's); one skipped for time is tried again.
"""

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import jax

from shardgpt.analysis import cost, estimate, hardware, metrics
from shardgpt.bench import gpu_parts as parts
from shardgpt.bench.gpu_run import Run, error_text
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.training import optim, train

GOAL_MFU = (0.45, 0.47)  # issue 30: the headline config at its first and second batch
GOAL_XL_MFU = 0.50
GOAL_XL_BANDWIDTH = 0.70  # gpt2-xl decode at batch 1: bytes moved per second over the copy's
GOAL_PREDICTION = 0.15  # issue 28: the cost model's |error| on held-out one-GPU configs
ESTIMATE_SLACK = 1.15  # gpt2-xl: a candidate estimated past the device's memory by more is not compiled
UNVALIDATED = "communication terms unvalidated on GPU: one device has no collectives"


@dataclasses.dataclass
class Context:
    """What every section needs: the sizes, the one device and its mesh, the headline attention, the cost
    model's cluster (None where the device has no profile), and where outputs go."""

    s: parts.Sizes
    tiny: bool
    device: Any
    mesh: Any
    head_attention: str
    cluster: hardware.Cluster | None
    out: Path
    matrix: tuple[list[str], list[str], list[int]]  # --layers, --attention, --batches (the first: headline)
    anchor: str | None = None  # --anchor
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # the environment before our XLA flags
    params: tuple[str, GPT, Any] | None = None  # the last decode model's: one model's params at a time


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One train measurement at the run's sequence length."""

    model: str
    layers: str  # "unrolled" or "scan"
    attention: str
    batch: int
    remat: bool = False

    @property
    def name(self) -> str:
        return f"{self.model} {self.layers} {self.attention} b{self.batch}" + (" remat" if self.remat else "")


def model_config(ctx: Context, model: str, **fields: Any) -> config.ModelConfig:
    """A preset in bf16 with the run's overrides (tiny's) and `fields`."""
    return config.preset(model, dtype="bfloat16", **(dict(ctx.s.overrides) | fields))


def headline_config(ctx: Context, batch: int) -> TrainConfig:
    """The headline train config (--layers' and --attention's first: unrolled, cuDNN on NVIDIA GPUs)."""
    return TrainConfig(ctx.s.model, ctx.matrix[0][0], ctx.head_attention, batch)


def find(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The row called `name`, or None."""
    return next((r for r in rows if r["name"] == name), None)


def _scaled_s(ctx: Context, row: dict[str, Any], model: str, unrolled: bool) -> float:
    """`row`'s wall time scaled to `model`: by layer count where both are unrolled (the compile grows with
    it), and by the cube root of the parameter ratio where larger (init and steps grow too)."""
    cfg, ref = model_config(ctx, model), model_config(ctx, row["model"])
    depth = cfg.n_layer / ref.n_layer if unrolled else 1.0
    return row["wall_s"] * depth * max(1.0, (cfg.n_params() / ref.n_params()) ** (1 / 3))


def projected_train_s(ctx: Context, rows: list[dict[str, Any]], tc: TrainConfig) -> float:
    """The slowest ok train measurement so far of the same layers (before one, of any), scaled to `tc`'s
    model (_scaled_s); before any, the sizes' guess."""
    ok = [r for r in rows if r["status"] == "ok"]
    scaled = lambda r: _scaled_s(ctx, r, tc.model, tc.layers == "unrolled" == r["layers"])
    same = [scaled(r) for r in ok if r["layers"] == tc.layers]
    return max(same or [scaled(r) for r in ok] or [ctx.s.train_s])


def _predictor(ctx: Context, cfg: config.ModelConfig, batch: int):
    """bench_train's on_compiled: cost.predict on the compiled step's HLO, as lab/predict.py calls it."""
    if ctx.cluster is None:
        return None

    def predict(compiled) -> dict[str, Any]:
        try:
            p = cost.predict(compiled.as_text(), cfg, "dp", {"dp": 1}, batch, ctx.s.seq, 1, ctx.cluster)
        except Exception as e:  # a prediction that fails must not cost the measurement
            return {"predicted": {"error": error_text(e)}}
        return {"predicted": {k: p[k] for k in ("hardware", "step_time_s", "terms_s", "binding", "mfu")}}

    return predict


def train_row(
    run: Run, ctx: Context, tc: TrainConfig, section: str, goal: float | None = None, limit: int | None = None
) -> dict[str, Any]:
    """`tc`'s row of results["train"]: measured now, or as an earlier section measured it."""
    rows = run.results["train"]
    row = find(rows, tc.name)
    if row is not None and row["status"] != "skipped":
        return row
    if row is None:
        fields = dataclasses.asdict(tc) | dict(name=tc.name, seq=ctx.s.seq)
        row = parts.blank_row(parts.TRAIN_KEYS, **fields)
        rows.append(row)
    unreferenced = ctx.tiny or tc.model != "gpt2" or tc.remat  # the references are gpt2's, without remat
    reference = None if unreferenced else parts.REFERENCE_MFU.get((tc.layers, tc.attention, tc.batch))
    row |= dict(section=section, goal_mfu=goal, reference_mfu=reference)
    if tc.attention == "cudnn" and ctx.device.platform != "gpu":
        row |= dict(status="skipped", error=f"cudnn attention needs an NVIDIA GPU, not {ctx.device.platform}")
        return row
    cfg = model_config(ctx, tc.model, attention=tc.attention, scan_layers=tc.layers == "scan", remat=tc.remat)
    hook = _predictor(ctx, cfg, tc.batch)
    measure = lambda: parts.bench_train(cfg, ctx.mesh, tc.batch, ctx.s, hook, limit)
    return run.attempt(row, measure, projected_train_s(ctx, rows, tc))


def decode_params(ctx: Context, model: str) -> tuple[GPT, Any]:
    """The model and its random params (float32, as training holds them), made once per model in a row."""
    if ctx.params is None or ctx.params[0] != model:
        ctx.params = None  # the last model's params go before the next one's are made
        gpt = GPT(model_config(ctx, model))
        ctx.params = (model, gpt, jax.jit(lambda rng: train.init_params(gpt, rng))(jax.random.key(0)))
    return ctx.params[1], ctx.params[2]


def decode_row(run: Run, ctx: Context, model: str, batch: int, section: str) -> dict[str, Any]:
    """The row of `model` decoding at `batch` (results["decode"]): measured now, or reused."""
    rows, name = run.results["decode"], f"{model} b{batch}"
    row = find(rows, name)
    if row is not None and row["status"] != "skipped":
        return row
    if row is None:
        row = parts.blank_row(parts.DECODE_KEYS, name=name, model=model, batch=batch)
        row |= dict(prompt_len=ctx.s.prompt_len, new_tokens=ctx.s.new_tokens)
        rows.append(row)
    goal = parts.GOAL_FLOOR_RATIO.get(batch, parts.DEFAULT_FLOOR_GOAL)
    reference = None if ctx.tiny or model != "gpt2" else parts.REFERENCE_DECODE_MS.get(batch)
    row |= dict(section=section, goal_ratio=goal, reference_ms_per_step=reference)
    bandwidth = run.results["copy_bandwidth_bytes_per_s"]
    if bandwidth is None:
        row |= dict(status="skipped", error="no copy bandwidth was measured: no floor")
        return row
    measure = lambda: parts.bench_decode(*decode_params(ctx, model), ctx.mesh, batch, ctx.s, bandwidth)
    # The generator always unrolls its layers: a deeper model's decode compiles longer.
    projected = max([_scaled_s(ctx, r, model, True) for r in rows if r["status"] == "ok"] or [ctx.s.decode_s])
    return run.attempt(row, measure, projected)


def headline(run: Run, ctx: Context):
    """Copy bandwidth; the headline train config at its first batch; decode at each batch beside its floors
    (the measured copy's and PyTorch's 4.3 TB/s); the headline config at its second batch."""
    s, results = ctx.s, run.results
    results["copy"] = dict(array_bytes=2 * s.copy_elements, bytes_per_s=None, status=None, error=None)
    run.attempt(results["copy"], lambda: dict(bytes_per_s=parts.copy_bandwidth(s.copy_elements, 10)))
    results["copy_bandwidth_bytes_per_s"] = results["copy"]["bytes_per_s"]
    first, *more = s.headline_batches
    train_row(run, ctx, headline_config(ctx, first), "headline", GOAL_MFU[0])
    for batch in s.decode_batches:
        decode_row(run, ctx, s.model, batch, "headline")
    for i, batch in enumerate(more, 1):
        train_row(run, ctx, headline_config(ctx, batch), "headline", GOAL_MFU[min(i, len(GOAL_MFU) - 1)])


def prediction_row(train_row: dict[str, Any]) -> dict[str, Any]:
    """One held-out config: measured step time, the prediction's two overlap bounds, the error of each."""
    p, measured = train_row["predicted"] or {}, train_row["step_time_s"]
    predicted = p.get("step_time_s")
    status, reason = train_row["status"], train_row["error"] or p.get("error")
    if status == "ok" and not predicted:
        status = "error"
    error = {bound: t / measured - 1 for bound, t in predicted.items()} if predicted and measured else None
    return dict(
        name=train_row["name"], measured_in=train_row["section"], status=status, error=reason,
        measured_step_s=measured, predicted_step_s=predicted, rel_error=error, binding=p.get("binding"),
        terms_s=p.get("terms_s"),
    )  # fmt: skip


def summarise(record: dict[str, Any]):
    """The median |error| per overlap bound over the configs measured and predicted, against the goal."""
    errors = [r["rel_error"] for r in record["rows"] if r["rel_error"]]
    medians = {b: statistics.median(abs(e[b]) for e in errors) for b in errors[0]} if errors else None
    record["configs"] = len(errors)
    record["median_abs_error"] = medians
    record["within_goal"] = (
        {b: m <= record["goal_abs_error"] for b, m in medians.items()} if medians else None
    )


def cost_model(run: Run, ctx: Context):
    """Issue 28's GPU validation: each held-out config measured (or reused) beside the cost model's
    prediction of the same compiled step for this device's profile; the median |error| against 15%."""
    if ctx.cluster is None:
        raise ValueError(
            f"no hardware profile for {ctx.device.device_kind!r} (analysis/profiles): no prediction"
        )
    record = dict(hardware=ctx.cluster.spec, profile=ctx.cluster.profile.name, goal_abs_error=GOAL_PREDICTION)
    record |= dict(note=UNVALIDATED, rows=[], configs=0, median_abs_error=None, within_goal=None)
    run.results["cost_model"] = record
    for model, layers, attention, batch, remat in ctx.s.held_out:
        attention = ctx.head_attention if attention == parts.HEAD else attention
        tc = TrainConfig(model, layers, attention, batch, remat)
        if find(record["rows"], tc.name) is None:  # "head" is xla off NVIDIA GPUs: a config twice
            record["rows"].append(prediction_row(train_row(run, ctx, tc, "cost_model")))
            summarise(record)
            run.save()


def _bytes_limit(device: Any) -> int | None:
    try:
        return (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU: no memory_stats
        return None


def _estimated_past(ctx: Context, tc: TrainConfig, limit: int | None) -> str | None:
    """Why `tc` is not worth compiling: estimate.memory (state exact, temporaries modelled) well past
    `limit`; None where it may fit or no limit is known."""
    if not limit:
        return None
    cfg = model_config(ctx, tc.model, attention=tc.attention, scan_layers=tc.layers == "scan", remat=tc.remat)
    model, tx = GPT(cfg), optim.make_optimizer(optim.OptimConfig())
    try:
        state = metrics.state_bytes(*train.abstract_state(model, tx, ctx.mesh, "dp"))
        total = estimate.memory(cfg, "dp", {"dp": 1}, tc.batch, ctx.s.seq, 1, state)["total_bytes"]
    except Exception:  # no estimate: the compile's own memory decides
        return None
    if total <= ESTIMATE_SLACK * limit:
        return None
    return (
        f"estimated {total / 2**30:.1f} GiB (analysis/estimate.py), past the device's {limit / 2**30:.1f} GiB"
    )


def xl(run: Run, ctx: Context):
    """gpt2-xl: training at the first (batch, remat) candidate that fits, MFU beside the 50% goal; decode at
    batch 1: bytes moved per second as a fraction of the copy bandwidth (goal >= 70%)."""
    s, limit = ctx.s, _bytes_limit(ctx.device)
    record = dict(model=s.xl_model, tried=[], train=None, decode=None, goal_mfu=GOAL_XL_MFU)
    record |= dict(goal_bandwidth_fraction=GOAL_XL_BANDWIDTH, bytes_limit=limit)
    run.results["xl"] = record
    for batch, remat in s.xl_candidates:
        tc = TrainConfig(s.xl_model, s.xl_layers, ctx.head_attention, batch, remat)
        past = _estimated_past(ctx, tc, limit)
        row = (
            dict(status="skipped", error=past) if past else train_row(run, ctx, tc, "xl", GOAL_XL_MFU, limit)
        )
        record["tried"].append(dict(name=tc.name, status=row["status"], error=row["error"]))
        run.save()
        if row["status"] == "ok":
            record["train"] = tc.name
            break
        if row["status"] == "skipped" and not past:
            break  # out of time: the next candidate would not fit in it either
    record["decode"] = decode_row(run, ctx, s.xl_model, 1, "xl")["name"]


def train_matrix(layers: list[str], attention: list[str], batches: list[int]) -> list[tuple[str, str, int]]:
    """Every (layers, attention, batch), the headline (each list's first value) first, then by how many
    axes differ from it: each single change is measured before the combinations."""
    configs = [(la, at, b) for la in layers for at in attention for b in batches]
    head = (layers[0], attention[0], batches[0])
    return sorted(configs, key=lambda c: sum(x != h for x, h in zip(c, head, strict=True)))  # stable


def rest(run: Run, ctx: Context):
    """What the budget leaves: the rest of the train matrix, then the naive generator."""
    for layers, attention, batch in train_matrix(*ctx.matrix):
        train_row(run, ctx, TrainConfig(ctx.s.model, layers, attention, batch), "rest")
    reference = None if ctx.tiny else parts.REFERENCE_NAIVE_S
    naive = parts.blank_row(parts.NAIVE_KEYS, batch=1, prompt_len=ctx.s.prompt_len)
    run.results["naive"] = naive | dict(reference_s_per_token=reference)
    measure = lambda: parts.bench_naive(*decode_params(ctx, ctx.s.model), ctx.s)
    run.attempt(run.results["naive"], measure, ctx.s.naive_cap_s)
