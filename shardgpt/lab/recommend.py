"""`run.py --predict --hardware SPEC --recommend`: the layouts of a cluster searched for the fastest that
fits, analytically first, then the best few compiled to confirm them.

The search: every mesh dp x pp x tp whose sizes multiply to the cluster's devices and divide the model (tp
the heads, MLP and vocab; pp the layers; dp the batch) x strategy (dp, zero1-3; their +sp variants where tp
> 1 divides the sequence) x microbatches (powers of 2 dividing each dp shard's rows; M >= pp) x remat.
Each candidate is laid out on an AbstractMesh (no devices: 16 GPUs are searched on an 8-device host), the
strict translator rejecting what does not divide; its state bytes are exact, and theory's collectives and
the temporaries model (analysis/estimate.py) give the memory and, through cost.predict, the step time.
Those within the memory budget are ranked by predicted tokens/s at the no-overlap bound (the conservative
one, and the closer on this CPU); the top CONFIRM are then compiled by the planner where the devices are
present, for compiled memory and a prediction from the compiled collectives, and up to CONFIRM more where
none of those fits as compiled (recommend_table.confirm).
"""

import dataclasses
import functools
from typing import Any

from jax.sharding import AbstractMesh, AxisType

from shardgpt.analysis import cost, estimate, hardware, metrics, theory
from shardgpt.model import config as model_config
from shardgpt.model.config import ModelConfig
from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, sharding
from shardgpt.training import optim, train

CONFIRM = 5  # compiles after the analytic search: about 10 s each for gpt2-xl on this host
MICROBATCHES = (1, 2, 4, 8, 16)
STRATEGIES = tuple(sharding.STRATEGIES)
RANK_BOUND = "no_overlap"
TIE = 0.005  # predicted times this close rank as one, by memory
# The terms a step's time is made of, for the winner's reason: the words for each.
PHRASES = {
    "compute": "compute",
    "recompute": "remat's recomputed forward",
    "memory": "memory traffic",
    "tp": "tp's per-layer all-reduces",
    "tp+sp": "tp's per-layer gathers and scatters",
    "zero3": "ZeRO-3's parameter gathers",
    "grads": "the gradient reduction",
    "param_gather": "ZeRO-1/2's parameter all-gather",
    "pp_send": "the pipeline's sends",
    "bubble": "the pipeline's bubble",
    "other": "the other collectives",
}
_GROUP = {"zero3_gather.fwd": "zero3", "zero3_gather.bwd": "zero3", "grad_reduce": "grads"}
_GROUP |= {"param_gather": "param_gather", "pp_send": "pp_send", "grad_reduce.sp": "tp"}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One layout to predict: a mesh, a strategy, microbatches and remat."""

    dp: int
    pp: int
    tp: int
    strategy: str
    microbatches: int
    remat: bool

    @property
    def mesh(self) -> dict[str, int]:
        return {a: {"dp": self.dp, "pp": self.pp, "tp": self.tp}.get(a, 1) for a in estimate.MESH_AXES}

    @property
    def mesh_spec(self) -> str:
        """As --mesh takes it, the axes that split: "dp=4,tp=2", "pp=8"."""
        sizes = (("dp", self.dp), ("pp", self.pp), ("tp", self.tp))
        return ",".join(f"{a}={n}" for a, n in sizes if n > 1) or "dp=1"

    @property
    def impl(self) -> str:
        return "shard_map" if self.pp > 1 else "gspmd"  # GPipe is written in shard_map

    @property
    def devices(self) -> int:
        return self.dp * self.pp * self.tp

    def label(self) -> str:
        """ "zero3 on dp=8,tp=1 M=2 remat"."""
        return (
            f"{self.strategy} on {self.mesh_spec}"
            + (f" M={self.microbatches}" if self.microbatches > 1 else "")
            + (" remat" if self.remat else "")
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(config: ModelConfig, devices: int, batch: int, seq: int) -> list[Candidate]:
    """Every combination whose sizes divide (tp the heads, MLP and padded vocab; pp the layers, M >= pp;
    dp the batch; M each dp shard's rows; +sp: tp > 1 dividing seq); the layout's own checks come later."""
    out = []
    for tp in _divisors(devices):
        if config.n_head % tp or config.mlp_dim % tp or config.padded_vocab_size % tp:
            continue
        for pp in _divisors(devices // tp):
            dp = devices // tp // pp
            if config.n_layer % pp or batch % dp:
                continue
            sp = ("", "+sp") if tp > 1 and seq % tp == 0 else ("",)
            zero = STRATEGIES if dp > 1 else STRATEGIES[:1]  # without dp, ZeRO shards nothing: all are dp
            for strategy in (s + v for v in sp for s in zero):
                for m in MICROBATCHES:
                    if (batch // dp) % m == 0 and m >= pp:
                        out += [Candidate(dp, pp, tp, strategy, m, r) for r in (False, True)]
    return out


@functools.cache
def _optimizer() -> Any:
    """AdamW as the runs build it: its moments are the state the layout sizes (the schedule is irrelevant)."""
    return optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=2))


@functools.cache
def _layout(config: ModelConfig, dp: int, pp: int, tp: int, strategy: str) -> tuple:
    """(state bytes, theory's leaves, the AbstractMesh) of a (mesh, strategy), no devices needed; ValueError
    where the strict translator finds a dim the mesh does not divide."""
    sizes = Candidate(dp, pp, tp, strategy, 1, False).mesh
    axes = estimate.MESH_AXES
    mesh = AbstractMesh(tuple(sizes.values()), axes, axis_types=(AxisType.Auto,) * len(axes))
    state, shardings = train.abstract_state(GPT(config), _optimizer(), mesh, strategy)
    return metrics.state_bytes(state, shardings), theory.leaves(config, state.params, shardings), mesh


def evaluate(
    config: ModelConfig, c: Candidate, batch: int, seq: int, cluster: hardware.Cluster
) -> dict[str, Any]:
    """One candidate's analytic memory (estimate.memory) and prediction (cost.predict on theory's
    collectives), with its step time split into the terms its reason is told from; ValueError where it
    does not lay out."""
    # Neither remat nor the attention kernel changes a layout (and cuDNN's cannot trace without a GPU).
    base = dataclasses.replace(config, remat=False, attention="xla")
    state, leaves, mesh = _layout(base, c.dp, c.pp, c.tp, c.strategy)
    cfg = dataclasses.replace(config, remat=c.remat)
    layout.check(mesh, c.strategy, c.impl, cfg, batch, seq, c.microbatches)
    rows = theory.expected(cfg, c.strategy, c.mesh, leaves, batch, seq, c.microbatches, c.impl)
    base_rows = None
    if sharding.is_sequence_parallel(c.strategy):  # +sp's gradient sums over tp, apart from dp's
        plain = sharding.base_strategy(c.strategy)
        base_rows = theory.expected(cfg, plain, c.mesh, leaves, batch, seq, c.microbatches, c.impl)
    ops = estimate.ops(rows, c.mesh, base_rows)
    prediction = cost.predict(ops, cfg, c.strategy, c.mesh, batch, seq, c.microbatches, cluster)
    return {
        "candidate": c,
        "memory": estimate.memory(cfg, c.strategy, c.mesh, batch, seq, c.microbatches, state),
        "prediction": prediction,
        "parts_s": parts(ops, prediction, cluster, c),
    }


def parts(ops: list, prediction: dict[str, Any], cluster: hardware.Cluster, c: Candidate) -> dict:
    """The no-overlap step time by what takes it, {name: (seconds, inter-node seconds)}: the local work as
    compute (remat's share apart) plus memory, each group of collectives, the bubble."""
    terms, constants = prediction["terms_s"], prediction["constants"]
    compute, local = terms["compute"], terms["compute"] + terms["memory"]
    recompute = constants.get("recompute_factor", {}).get("value", 1.0)
    out = {
        "compute": [compute / recompute, 0.0],
        "recompute": [compute - compute / recompute, 0.0],
        "memory": [terms["memory"], 0.0],
    }
    for op in ops:
        group = _GROUP.get(op.op_name, "tp" if estimate.CAUSE_AXES.get(op.op_name) == ("tp",) else "other")
        seconds = cost.communication([op], cluster, c.devices, constants)
        entry = out.setdefault(group, [0.0, 0.0])
        entry[0] += seconds["intra"] + seconds["inter"]
        entry[1] += seconds["inter"]
    bubble = constants["bubble_factor"]["value"]
    if bubble > 1:
        out["bubble"] = [(bubble - 1) * (local + terms["communication"]), 0.0]
    return {k: tuple(v) for k, v in out.items()}


def search(
    config: ModelConfig, cluster: hardware.Cluster, batch: int, seq: int, budget: int
) -> dict[str, Any]:
    """Every candidate evaluated: {"ranked": those within `budget` bytes, fastest first (the no-overlap
    bound), "over": those that lay out but do not fit, fastest first, "searched", "refused" (did not lay
    out: {label: reason})}."""
    fits, over, refused = [], [], {}
    everything = candidates(config, cluster.devices, batch, seq)
    for c in everything:
        try:
            row = evaluate(config, c, batch, seq, cluster)
        except ValueError as e:
            refused[c.label()] = str(e).splitlines()[0]
            continue
        (fits if row["memory"]["total_bytes"] <= budget else over).append(row)
    # Equal times (a term that does not bind changed): no remat first (its cost may be hidden behind a
    # binding term here, not on the device), then the one with more memory to spare.
    key = lambda r: (_step(r), r["candidate"].remat, r["memory"]["total_bytes"])
    ranked = sorted(fits, key=key)
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return {"ranked": ranked, "over": sorted(over, key=key), "searched": len(everything), "refused": refused}


def _step(row: dict[str, Any]) -> float:
    return row["prediction"]["step_time_s"][RANK_BOUND]


def _clause(winner: dict[str, Any], other: dict[str, Any], cluster: hardware.Cluster, why: str) -> str:
    """Why `other` is slower: the part of its step that grew most over the winner's, in words."""
    a, b = winner["parts_s"], other["parts_s"]
    extra = {k: b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0] for k in b}
    top = max(extra, key=extra.get)
    seconds, inter = b[top][0] - a.get(top, (0, 0))[0], b[top][1]
    where = f", crossing IB at {cluster.nodes} nodes" if inter > seconds / 2 and cluster.nodes > 1 else ""
    slower = _step(other) / _step(winner) - 1
    sp = top == "tp" and sharding.is_sequence_parallel(other["candidate"].strategy)
    words = PHRASES["tp+sp" if sp else top]
    return (
        f"{other['candidate'].label()} ({why}) is {100 * slower:.0f}% slower: {words} "
        f"+{1e3 * seconds:.3g} ms{where}"
    )


def reason(result: dict[str, Any], cluster: hardware.Cluster, budget: int) -> str:
    """The winner's reason in one line, from the terms that differ from the runner-up, from the best on
    another mesh, and from a faster layout that does not fit."""
    ranked = result["ranked"]
    if not ranked:
        return "nothing fits: a larger cluster, a smaller batch or --device-memory"
    win, clauses = ranked[0], []
    ties = [r for r in ranked[1:] if _step(r) <= _step(win) * (1 + TIE)]
    if ties:
        names = ", ".join(f"#{r['rank']}" for r in ties[:3]) + (" ..." if len(ties) > 3 else "")
        clauses.append(f"ties with {names} (predicted within {100 * TIE:.1g}%)")
    slower = ranked[1 + len(ties) :]
    if slower:
        clauses.append(_clause(win, slower[0], cluster, f"#{slower[0]['rank']}"))
    mesh = lambda r: (r["candidate"].dp, r["candidate"].pp, r["candidate"].tp)
    elsewhere = next((r for r in slower if mesh(r) != mesh(win)), None)
    if elsewhere is not None and elsewhere is not slower[0]:
        clauses.append(_clause(win, elsewhere, cluster, f"#{elsewhere['rank']}, best on another mesh"))
    faster = next((r for r in result["over"] if _step(r) < _step(win)), None)
    if faster is not None:
        clauses.append(
            f"the faster {faster['candidate'].label()} needs {_gib(faster['memory']['total_bytes'])} of "
            f"{_gib(budget)}"
        )
    return f"{win['candidate'].label()}: " + "; ".join(clauses or ["the only layout that fits"])


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def resolve(model: str, overrides: tuple, dtype: str, attention: str, seq: int | None) -> tuple:
    """(config, seq) as the planner resolves a spec (Planner.prepare): the preset, its overrides, seq =
    the context unless given."""
    cfg = model_config.preset(model, dtype=dtype, attention=attention, **dict(overrides))
    return cfg, seq or cfg.block_size


def needs_devices(c: Candidate, present: int) -> str | None:
    """The note for a candidate this host cannot compile, or None."""
    if c.devices <= present:
        return None
    return f"not confirmed (needs {c.devices} devices; --devices {c.devices} compiles it on XLA:CPU here)"


def record(result: dict[str, Any], cluster: hardware.Cluster, budget: int, why: str) -> dict[str, Any]:
    """results.json's "recommendation": the winner, its reason and the ranked table (plain data)."""
    row = lambda r: {
        "rank": r.get("rank"),
        **dataclasses.asdict(r["candidate"]),
        "mesh": r["candidate"].mesh,
        "impl": r["candidate"].impl,
        "memory_analytic": r["memory"],
        "prediction": r["prediction"],
        "confirmed": r.get("confirmed"),
    }
    ranked = result["ranked"]
    return {
        "hardware": cluster.spec,
        "budget_bytes": budget,
        "ranked_by": f"predicted tokens/s, {RANK_BOUND} bound",
        "winner": row(ranked[0]) if ranked else None,
        "reason": why,
        "searched": result["searched"],
        "refused": result["refused"],
        "over_budget": len(result["over"]),
        "memory_source": estimate.MEMORY_SOURCE,
        "ranked": [row(r) for r in ranked],
    }
