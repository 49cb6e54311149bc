"""Explicit sharding (--impl explicit, shardgpt.training.explicit_step): every layout in the arrays' types,
every strategy of its scope training like one device, its state keeping its types, its collectives
attributed by name.

Tolerances as in test_equivalence (fp32, 3 AdamW steps at lr 1e-3 with clipping active): losses and grad
norms within 1e-5 absolute of one device; step 1's gradients leaf by leaf within 1e-5 of each leaf's
largest value, the params and Adam's moments within 2e-4 (tests/_runs.py). Observed: losses equal to
GSPMD's bit for bit (the same program, partitioned from the same layouts), gradients within 6.6e-7.
"""

import re

import _runs
import flax.linen as nn
import jax
import numpy as np
import pytest
from _runs import SINGLE, SP_SEQ, TASK, assert_grads_match, assert_state_matches, by_cause, run
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.model import config
from shardgpt.parallel import layout, sharding
from shardgpt.parallel.explicit_plan import ExplicitPlan, active_spec, explicit_mesh
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import train

CASES = [(spec, s, 1) for spec in ("dp=2,tp=4", "dp=8") for s in sharding.STRATEGIES] + [
    ("dp=2,tp=4", "dp+sp", 1)
]
# Gradient accumulation both ways: dp's partial gradients kept apart per dp shard until the loop ends,
# ZeRO-3's reduced into their shards per microbatch (its dp-split params cannot enter a vmap over dp).
CASES += [("dp=2,tp=4", "dp", 2), ("dp=2,tp=4", "zero3", 2)]


def _seq(strategy: str) -> int:
    return SP_SEQ if sharding.is_sequence_parallel(strategy) else TASK.seq_len


@pytest.mark.parametrize("spec, strategy, microbatches", CASES)
def test_explicit_trains_like_one_device_and_keeps_its_types(spec, strategy, microbatches):
    """The state's types after the last step are those after the first and the declared layouts: optax
    updates in the moments' layout, so a ZeRO-1/2 param would drift to dp-split unless resharded back."""
    seq, where = _seq(strategy), f"explicit {spec} {strategy} M={microbatches}"
    ref, got = run("gspmd", SINGLE, "dp", seq=seq), run("explicit", spec, strategy, microbatches, seq=seq)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=0, atol=1e-5, err_msg=f"{where} losses")
    np.testing.assert_allclose(got.grad_norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg=f"{where} norms")
    assert_grads_match(got, ref, where)
    assert_state_matches(got, ref, where)
    first, last = got.types
    assert first == last, f"{where}: a step changed the state's types"
    mesh = make_mesh(spec)
    declared = train.state_shardings(_runs.MODELS[seq], _runs.TX, mesh, strategy).state
    twin = explicit_mesh(mesh)
    for typed, sharding_ in zip(last, jax.tree.leaves(declared), strict=True):
        split = active_spec(sharding_.spec, twin)
        axes = {a for entry in split if entry for a in (entry if isinstance(entry, tuple) else (entry,))}
        # f32[2,64@dp,256@tp] or 64@(dp,tp): exactly the declared axes, none missing and none extra (a
        # ZeRO-1/2 param drifting to its moments' dp split would add dp)
        found = re.findall(r"@(?:\(([^)]*)\)|(\w+))", typed)  # (tuple of axes, one axis) per split dim
        typed_axes = {a for many, one in found for a in (many.split(",") if many else [one])}
        assert typed_axes == axes, (where, typed, split)


def test_explicit_zero3_gathers_what_theory_says_all_by_name():
    """The silent failure explicit mode allows: a dp-split weight meeting the dp-split batch compiles to a
    reduction of partial products instead of a gather. The plan's reshard before use makes ZeRO-3's
    forward gathers exactly theory's bytes, and every byte is attributed by name."""
    rows = by_cause("explicit", "dp=2,tp=4", "zero3")
    gather = rows["zero3_gather.fwd", "all-gather"]
    assert gather["bytes"] == gather["theory_bytes"] > 0, gather
    for cause in ("attn.fwd", "attn.bwd", "mlp.fwd", "mlp.bwd", "embed", "head"):
        assert rows[cause, "all-reduce"]["bytes"] == rows[cause, "all-reduce"]["theory_bytes"], cause
    total = sum(r["bytes"] for r in rows.values())
    assert sum(r["bytes_by_name"] for r in rows.values()) >= 0.95 * total


@pytest.mark.parametrize("spec, message", [("dp=2,cp=4", "--impl explicit runs"), ("pp=2,dp=4", "shard_map")])
def test_explicit_refuses_what_it_does_not_run_yet_before_compiling(spec, message):
    with pytest.raises(ValueError, match=message):
        layout.check_mesh_axes(make_mesh(spec), "dp", "explicit", config.preset("gpt-pico"))


def test_the_planner_compiles_an_explicit_step_on_abstract_arrays():
    """--plan --impl explicit: the step lowered on ShapeDtypeStructs of the Auto mesh (re-typed onto the
    Explicit twin by the step's relayout) compiles, and its state columns are the layout's, as GSPMD's."""
    import dataclasses

    from shardgpt.lab import plan, runner

    spec = runner.RunSpec(
        model="gpt-pico", mesh="dp=2,tp=4", strategy="zero3", impl="explicit", batch=16, seq=16
    )
    rows = {
        impl: plan.plan(plan.Planner.prepare(dataclasses.replace(spec, impl=impl), jax.devices()), None, {})
        for impl in ("explicit", "gspmd")
    }
    assert rows["explicit"]["compiled"]["temp_bytes"] > 0 and rows["explicit"]["impl"] == "explicit"
    assert rows["explicit"]["state"] == rows["gspmd"]["state"]


@pytest.mark.parametrize("strategy, reshards", [("dp", 0), ("zero1", 0), ("zero3", 2)])
def test_a_param_stored_as_computed_is_read_without_a_reshard(strategy, reshards):
    """Even a no-op reshard's result is a new value, which the layer loop saves per layer for the backward
    pass where it would otherwise read the param's own slice: a copy of the stacked weights (288 KiB a
    device on dp=8, gpt-pico). Only ZeRO-3's read reshards: the gather, after a no-op that names it."""

    class Read(nn.Module):
        plan: ExplicitPlan

        @nn.compact
        def __call__(self):
            return self.plan.param(self, "kernel", nn.initializers.ones_init(), (64, 256), ("embed", "mlp"))

    mesh = explicit_mesh(make_mesh("dp=8"))
    stored = P("dp", None) if strategy == "zero3" else P(None, None)
    kernel = jax.ShapeDtypeStruct((64, 256), np.float32, sharding=NamedSharding(mesh, stored))
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda k: Read(ExplicitPlan(mesh, strategy)).apply({"params": {"kernel": k}}))
        eqns = jaxpr(kernel).jaxpr.eqns
    assert [e.primitive.name for e in eqns].count("reshard") == reshards, eqns
