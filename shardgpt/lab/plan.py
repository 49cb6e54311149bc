"""Will it fit: each strategy's memory per device from compile-only runs, and the largest batch that fits.

Nothing is allocated and no step runs: the train step is lowered on abstract arrays (shapes, dtypes and
shardings only) and compiled, and XLA's buffer assignment says what one device would hold. The state
(params, grads, optimizer state) is exact, read from the layout; the temporaries are what XLA's compiler
for *this* backend assigns, so compiled anywhere but the target's backend (target.py chooses) they are an
estimate, and are labelled so.
"""

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from shardgpt.analysis import metrics
from shardgpt.lab import report, runner
from shardgpt.lab.plots import plan_plot
from shardgpt.lab.target import ESTIMATE
from shardgpt.model import config
from shardgpt.model.config import ModelConfig
from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, sharding
from shardgpt.parallel.mesh import describe, make_mesh
from shardgpt.training import optim, train

_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_UNITS |= {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "TIB": 2**40}
MAX_BATCH = 2**16  # the search's ceiling: a larger global batch is not a memory question any more


def parse_bytes(text: str) -> int:
    """ "80GiB" -> 85899345920: units B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB, K/M/G/T (of 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match and (match.group(2).upper() or "B")
    if not match or unit not in _UNITS:
        raise ValueError(
            f"cannot read the memory size {text!r}: write a number and a unit, e.g. 80GiB, 24G or 16GB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def lower_step(make_step, model, tx, mesh, strategy: str, batch: int, seq: int, microbatches: int = 1) -> Any:
    """The train step lowered for abstract state and batch: `.compile()` it, nothing is allocated."""
    state, shardings = train.abstract_state(model, tx, mesh, strategy)
    where: NamedSharding = sharding.batch_sharding(mesh, strategy)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=where)
    step = make_step(model, tx, mesh, strategy, shardings, microbatches=microbatches)
    return step.jitted.lower(state, {"inputs": tokens, "targets": tokens})


@dataclasses.dataclass
class Planner:
    """Compile-only memory estimates of one (model, mesh, strategy, impl) at any global batch."""

    spec: Any  # the runner.RunSpec it was made from
    config: ModelConfig
    mesh: Mesh
    strategy: str
    seq: int
    model: GPT
    tx: Any
    make_step: Any
    microbatches: int = 1  # gradient accumulation: batches step by dp x microbatches
    compiled: dict[int, dict[str, int]] = dataclasses.field(default_factory=dict)  # by global batch
    hlo: dict[int, str] = dataclasses.field(default_factory=dict)  # the compiled step's text, by global batch

    @classmethod
    def prepare(cls, spec: Any, devices: Sequence[jax.Device]) -> "Planner":
        """Resolve and validate a runner.RunSpec for planning (the preset's own vocab and context, seq =
        --seq or the context); raises ValueError on anything that cannot be laid out, before any compile."""
        run_fields = dict(dtype=spec.dtype, attention=spec.attention, scan_layers=spec.scan, remat=spec.remat)
        cfg = config.preset(spec.model, **(run_fields | dict(spec.overrides)))
        seq = spec.seq or cfg.block_size
        mesh, strategy, model = make_mesh(spec.mesh, devices), sharding.canonical(spec.strategy), GPT(cfg)
        base = optim.OptimConfig(learning_rate=spec.lr, warmup_steps=1, total_steps=max(spec.steps, 1))
        tx = optim.make_optimizer(base.replace(**dict(spec.optim)))
        layout.check(mesh, strategy, spec.impl, cfg, spec.batch, seq, spec.microbatches)
        train.state_shardings(model, tx, mesh, strategy)  # every param dim checked against the mesh
        make_step = runner.step_builder(spec.impl)
        return cls(spec, cfg, mesh, strategy, seq, model, tx, make_step, spec.microbatches)

    def memory(self, batch: int) -> dict[str, int]:
        """XLA's buffer assignment for one device at this global batch (metrics.compiled_memory's keys).

        Compiled once per batch: the search and the report share every compile.
        """
        if batch not in self.compiled:
            microbatches = self.microbatches
            layout.check_batch(self.config, self.mesh, self.strategy, batch, self.seq, microbatches)
            step = (self.make_step, self.model, self.tx, self.mesh, self.strategy)
            compiled = lower_step(*step, batch, self.seq, microbatches).compile()
            memory, self.hlo[batch] = metrics.compiled_memory(compiled), compiled.as_text()
            if memory is None:
                raise RuntimeError(
                    f"{self.mesh.devices.flat[0].platform} reports no memory_analysis to plan with"
                )
            self.compiled[batch] = memory
        return self.compiled[batch]

    def largest_batch(self, budget: int) -> int:
        """The largest global batch (a multiple of dp x microbatches) whose compiled total fits `budget`
        bytes, or 0.

        The total grows linearly with the batch (the temporaries do: measured on gpt2, CPU and H200), so
        each probe is where a line meets the budget, through the last two probes and then through the
        bracket's ends, kept strictly inside the bracket of batches known to fit and not to fit. A probe
        that fails to halve the bracket is followed by a bisection step, so a curve that bends costs about
        what a bisection would. On a line it takes 4 compiles; it ends when the bracket is one unit (dp x
        microbatches) wide.
        """
        unit = sharding.batch_shards(self.mesh) * self.microbatches  # every batch must split this way
        ceiling = MAX_BATCH // unit * unit
        total = lambda batch: self.memory(batch)["total_bytes"]
        if total(unit) > budget:
            return 0
        low, high, width = unit, None, math.inf  # low fits; high, once found, does not
        last, probe = unit, 2 * unit
        while True:
            if total(probe) <= budget:
                low = probe
            else:
                high = probe
            if (high is not None and high - low <= unit) or (high is None and low >= ceiling):
                return low
            # The line through the bracket's ends (before a high is known, the last two probes).
            a, b = (last, probe) if high is None else (low, high)
            slope = max(total(b) - total(a), 1) / (b - a)  # bytes per example
            step = int(a + (budget - total(a)) / slope) // unit * unit  # where the line meets the budget
            if high is not None:
                if high - low > width / 2:  # the last probe did not halve the bracket: bisect
                    step = (low + high) // 2 // unit * unit
                width = high - low
            top = ceiling if high is None else high - unit
            last, probe = probe, min(max(step, low + unit), top)


def plan(planner: Planner, budget: int | None, where: dict[str, Any]) -> dict[str, Any]:
    """One row of the plan: exact state bytes, compiled memory at the spec's batch, and (given a budget)
    whether it fits and the largest global batch that does; `where` (target.Placement.record: compiled_for,
    target, estimate, budget_source) is copied in."""
    started = time.perf_counter()
    spec = planner.spec
    state, shardings = train.abstract_state(planner.model, planner.tx, planner.mesh, planner.strategy)
    compiled = planner.memory(spec.batch)
    row = {
        "name": f"{runner.model_label(spec)} {describe(planner.mesh)} {planner.strategy}"
        + (f" M={spec.microbatches}" if spec.microbatches > 1 else "")
        + ("" if spec.impl == "gspmd" else f" {spec.impl}"),
        "model": runner.model_label(spec),
        "n_params": planner.config.n_params(),
        "mesh": dict(planner.mesh.shape),
        "strategy": planner.strategy,
        "impl": spec.impl,
        "batch": spec.batch,
        "microbatches": spec.microbatches,
        "seq": planner.seq,
        "dtype": planner.config.dtype,
        "attention": planner.config.attention,
        **where,
        "state": metrics.state_bytes(state, shardings),  # exact: from the layout
        "compiled": compiled,  # XLA's buffer assignment on this backend: an estimate elsewhere
        "budget_bytes": budget,
        "fits": None if budget is None else compiled["total_bytes"] <= budget,
        "max_batch": None,
    }
    if budget is not None:
        row["max_batch"] = planner.largest_batch(budget)
    row["totals_by_batch"] = {b: m["total_bytes"] for b, m in sorted(planner.compiled.items())}
    row["compiles"], row["wall_s"] = len(planner.compiled), time.perf_counter() - started
    return row


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows best first: those that fit first, then by the larger max batch, then by less memory."""
    key = lambda r: (r["fits"] is False, -(r["max_batch"] or 0), r["compiled"]["total_bytes"])
    ranked = sorted(rows, key=key)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


def table(rows: list[dict[str, Any]], where: str) -> str:
    """The ranked plan as text, every column labelled with where its figure comes from (`where`:
    target.Placement.describe, what the compile stands for)."""
    budget = rows[0]["budget_bytes"] if rows else None
    header = ["#", "run", "params", "grads", "opt state", "temps", "total", "fits", "max batch", "compiles"]
    lines = []
    for r in rows:
        st, c = r["state"], r["compiled"]
        fits = "-" if r["fits"] is None else "yes" if r["fits"] else "NO"
        max_batch = "-" if r["max_batch"] is None else str(r["max_batch"]) if r["max_batch"] else "none"
        lines.append(
            [str(r["rank"]), r["name"]]
            + [report.size(st[f"{k}_bytes_per_device"]) for k in ("params", "grads", "opt_state")]
            + [
                report.size(c["temp_bytes"]),
                report.size(c["total_bytes"]),
                fits,
                max_batch,
                str(r["compiles"]),
            ]
        )
    first = rows[0] if rows else {}
    cpu = first.get("compiled_for") == "cpu" and first.get("estimate")
    notes = [
        f"{where}",
        f"memory per device (bytes; K, M, G = 2^10, 2^20, 2^30) at global batch {first.get('batch')} x seq "
        f"{first.get('seq')}, {first.get('dtype')} compute, {first.get('attention')} attention; nothing was "
        "allocated or run",
        "params, grads, opt state: exact, from the layout (shard shape x itemsize)",
        "temps: XLA's temporaries from the compiled step"
        + (
            f" (an {ESTIMATE} for a GPU or TPU: gpt2's were 1.6-2.2x an H200's with XLA attention, and "
            "cuDNN's attention, 6.7 GiB there, cannot compile on CPU; BENCHMARKS.md)"
            if cpu
            else ""
        ),
        "total: arguments + outputs - aliased + temporaries of the compiled step (the state is an argument)",
    ]
    if budget is not None:
        notes.append(
            f"fits / max batch: total within {report.size(budget)} ({first.get('budget_source')}); the "
            "largest global batch (a multiple of dp) that fits, found by compile-only search (line-guided "
            "bisection)"
        )
    return "\n".join(report.grid(header, lines) + notes)


def write(
    rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: str | Path, plots: bool = True
) -> list[Path]:
    """out_dir/results.json ({"meta", "plan": rows}: a plan where a comparison has runs) and plan.png."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps({"meta": meta, "plan": rows}, indent=2, default=str) + "\n")
    return [path, *([plan_plot(rows, out / "plan.png")] if plots else [])]
