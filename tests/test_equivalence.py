"""Every strategy on every mesh trains exactly like one device (GSPMD, fp32).

Tolerances: losses and grad norms within 1e-5 absolute; step 1's gradients leaf by leaf within 1e-5 of
each leaf's largest value, and after 3 AdamW steps at lr 1e-3 with clipping active every params and Adam
moment leaf within 2e-4 of its largest (tests/_runs.py leaf_errors; observed at most 6.6e-7 on gradients,
6.5e-5 on params, 1.2e-5 on moments). Only the order of floating-point reductions differs between meshes.
A relative tolerance per leaf holds Adam's second moments (largest values 3e-10 to 1e-3) and a gradient
whose scale is wrong on one leaf only (which Adam's update and the global norm hide) to account.
"""

import _runs
import jax
import numpy as np
import pytest
from _runs import SINGLE, assert_grads_match, assert_state_matches, initial_state, run

from shardgpt.parallel import sharding


def test_reference_learns_so_the_comparison_is_not_vacuous():
    ref = run("gspmd", SINGLE, "dp")
    assert ref.losses[-1] < ref.losses[0] and ref.grad_norms.min() > 1, "no learning, or clipping inactive"
    moved = max(
        np.abs(a - b).max()
        for a, b in zip(
            jax.tree.leaves(ref.state.params), jax.tree.leaves(initial_state().params), strict=True
        )
    )
    assert moved > 1e-3, f"params moved only {moved:.2g}"
    # The gradients read back from Adam's first moment (first_grads) have the norm the step reported.
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(ref.grads)))
    np.testing.assert_allclose(norm, ref.grad_norms[0], rtol=1e-6)


# On tp=8 (dp=1) zero1 and zero2 have nothing to shard and compile to dp's program: left out (time budget).
CASES = [(spec, s) for spec in ("dp=8", "dp=2,tp=4", "dp=4,tp=2") for s in sharding.STRATEGIES]
CASES += [("tp=8", "dp"), ("tp=8", "zero3")]


@pytest.mark.parametrize("spec, strategy", CASES)
def test_strategy_matches_single_device(spec, strategy):
    ref, got = run("gspmd", SINGLE, "dp"), run("gspmd", spec, strategy)
    where = f"{spec} {strategy}"
    np.testing.assert_allclose(got.losses, ref.losses, rtol=0, atol=1e-5, err_msg=f"{where} losses")
    np.testing.assert_allclose(got.grad_norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg=f"{where} norms")
    assert_state_matches(got, ref, where)


@pytest.mark.parametrize("spec, strategy", CASES)
def test_strategy_gradients_match_single_device_leaf_by_leaf(spec, strategy):
    """Step 1's gradients, read from Adam's first moment (no extra compile), within 1e-5 of each leaf's
    largest value."""
    assert_grads_match(run("gspmd", spec, strategy), run("gspmd", SINGLE, "dp"), f"{spec} {strategy}")


def test_the_compared_program_carries_the_activation_shardings():
    """The runs above lower the step without an outer jax.set_mesh, as a test would: their program must
    still hold the model's activation constraints (flax drops them silently when no mesh is set)."""
    program = run("gspmd", "dp=2,tp=4", "zero3").program
    b, length, h, k, d = _runs.BATCH, _runs.TASK.seq_len, 8, 8, 64
    # Shardy's form first, then GSPMD's (jax may lower either): q/k/v split (batch -> dp x ep, length ->
    # cp, both of size 1 here, heads -> tp), and the residual stream split over dp only.
    lead = '{"dp", "ep"}, {"cp"}'
    qkv = [f'[{lead}, {{"tp"}}, {{}}]> : tensor<{b}x{length}x{h}x{k}xf32>', "{devices=[2,1,4,1]"]
    residual = [f"[{lead}, {{}}]> : tensor<{b}x{length}x{d}xf32>", "{devices=[2,1,1,4]"]
    for what, forms in (("q/k/v", qkv), ("residual", residual)):
        assert any(form in program for form in forms), f"no {what} activation constraint in the program"


def test_the_layout_comes_from_the_plan_passed_in_never_from_ambient_rules():
    """A model traced under flax's global rules but given no plan computes on one device's view (no
    constraint: the rules are not read); given a GSPMDPlan, its own mesh and rules place the activations
    with no mesh in context."""
    import flax.linen as nn
    import jax.numpy as jnp

    from shardgpt.parallel.gspmd_plan import GSPMDPlan
    from shardgpt.parallel.mesh import make_mesh

    params = initial_state().params
    tokens = jnp.zeros((8, 4), jnp.int32)
    rules = sharding.rules("dp", "activations")
    with nn.logical_axis_rules(rules):
        ambient = jax.jit(lambda p: _runs.MODEL.apply({"params": p}, tokens)).lower(params).as_text()
    assert "sharding_constraint" not in ambient and "Sharding" not in ambient, "ambient rules were read"
    planned = _runs.MODEL.clone(plan=GSPMDPlan(make_mesh("dp=8"), rules))
    program = jax.jit(lambda p: planned.apply({"params": p}, tokens)).lower(params).as_text()
    assert "sharding_constraint" in program or "Sharding" in program, "the plan's constraints are missing"
