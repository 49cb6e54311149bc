"""An MoE run's routing, measured: each layer's load per expert (choices routed to it, before the capacity)
and the choices dropped past the capacity, for results.json's "moe" record and the report.

Read by one forward pass of the trained model's own routing (model/moe.py sows it) on a given batch and
params, compiled once per run under GSPMD on the run's mesh: the routing does not depend on the layout,
so every implementation's params give the same figures as its own step would.
"""

from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shardgpt.lab import html_report
from shardgpt.model import moe
from shardgpt.model.gpt import GPT
from shardgpt.parallel import sharding
from shardgpt.parallel.gspmd_plan import GSPMDPlan


class RoutingProbe:
    """`probe(params, batch) -> {"load": [[per expert] per layer], "dropped": [per layer], "choices": n}`:
    the routing of `batch`'s inputs by `params`, one compile."""

    def __init__(self, model: GPT, mesh: Mesh, strategy: str):
        self.mesh = mesh
        plan = GSPMDPlan(mesh, sharding.rules(strategy, "activations"))
        probe = model.clone(plan=plan)

        def routing(params, inputs_BxL):
            _, stats = probe.apply({"params": params}, inputs_BxL, head=False, mutable=[moe.STATS])
            return {name: moe.sown(stats[moe.STATS], name) for name in ("load", "dropped")}

        self._jitted = jax.jit(routing)
        self.top_k = model.config.moe_top_k

    def __call__(self, params: Any, batch: dict) -> dict[str, Any]:
        # Params trained under explicit sharding are typed on Explicit axes: the same layout, on this mesh
        # (host arrays: replicated).
        spec = lambda x: getattr(getattr(x, "sharding", None), "spec", PartitionSpec())
        params = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(self.mesh, spec(x))), params)
        found = jax.device_get(self._jitted(params, batch["inputs"]))
        load = np.concatenate([np.reshape(x, (-1, np.shape(x)[-1])) for x in found["load"]])
        dropped = np.concatenate([np.reshape(x, (-1,)) for x in found["dropped"]])
        return {
            "load": load.astype(int).tolist(),
            "dropped": dropped.astype(int).tolist(),
            "choices": int(np.size(batch["inputs"])) * self.top_k,
        }


def summary(record: dict[str, Any]) -> str:
    """One line: the share of choices dropped, and the busiest expert's load over the mean, per layer."""
    per_layer = ", ".join(f"{d:.0%}/{m:.2f}x" for d, m in html_report.routing_per_layer(record))
    return f"dropped / busiest expert over the mean, per layer: {per_layer}"


def share(params: Any) -> float:
    """The experts' share of the params' bytes (0 for a dense model): the part ep splits."""
    flat = traverse_util.flatten_dict(params)
    size = lambda paths: sum(np.prod(np.shape(flat[p])) for p in paths)
    expert = [p for p in flat if "moe" in p and p[-1] != "router"]
    return float(size(expert) / max(size(flat), 1))
