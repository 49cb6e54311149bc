"""GPipe over 4 CPU devices equals the 4 stages applied in sequence on one device, forward and gradients,
with the collective-permute count the module docstring states.

Tolerances (fp32): outputs within 1e-6 and gradients within 1e-5 absolute; the pipeline runs the same ops
on the same rows in the same order, so only XLA's fusion choices can move the rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from shardgpt.analysis import hlo
from shardgpt.parallel import pipeline

PP, B, D = 4, 2, 8  # stages (devices), rows per microbatch, width


def _mesh(pp: int) -> jax.sharding.Mesh:
    return jax.make_mesh((pp,), ("pp",), devices=jax.devices()[:pp], axis_types=(AxisType.Auto,))


def _layer(w_DxD, x_BxD):
    return x_BxD + jnp.tanh(x_BxD @ w_DxD)


def _stage(w_1xDxD_, x_BxD):
    """One device's stage: its slice of the stacked params holds one layer."""
    return _layer(w_1xDxD_[0], x_BxD)


def _sequential(w_SxDxD, x_MxBxD):
    for w_DxD in w_SxDxD:
        x_MxBxD = _layer(w_DxD, x_MxBxD)
    return x_MxBxD


def _pipelined(w_SxDxD, x_MxBxD, pp: int = PP):
    """The last stage's outputs: out_specs P("pp") stacks each stage's, of which the last is valid."""
    body = lambda w_, x_: pipeline.gpipe(_stage, w_, x_, "pp")[None]
    mapped = jax.shard_map(body, mesh=_mesh(pp), in_specs=(P("pp"), P()), out_specs=P("pp"))
    return mapped(w_SxDxD, x_MxBxD)[-1]


def _loss(y_MxBxD):
    return jnp.sum(jnp.sin(y_MxBxD) * y_MxBxD)


def _pipelined_loss(w_SxDxD, x_MxBxD):
    def body(w_, x_):
        y_ = pipeline.gpipe(_stage, w_, x_, "pp")
        last = jax.lax.axis_index("pp") == PP - 1
        return jax.lax.psum(jnp.where(last, _loss(y_), 0.0), "pp")

    return jax.shard_map(body, mesh=_mesh(PP), in_specs=(P("pp"), P()), out_specs=P())(w_SxDxD, x_MxBxD)


def _inputs(microbatches: int, pp: int = PP):
    rng = np.random.default_rng(microbatches)
    w_SxDxD = (rng.normal(size=(pp, D, D)) / np.sqrt(D)).astype(np.float32)
    return w_SxDxD, rng.normal(size=(microbatches, B, D)).astype(np.float32)


def _sends(jitted, *args) -> int:
    """The pipeline's collective-permutes per call. Reading the last stage's block out of the stacked
    outputs is one more (outside the shard_map), hence the scope."""
    ops = hlo.collective_ops(jitted.lower(*args).compile().as_text())
    return sum(op.executions for op in ops if op.kind == "collective-permute" and pipeline.SEND in op.op_name)


@pytest.mark.parametrize("microbatches", [4])  # M = pp: the longest fill and drain for its length
def test_gpipe_equals_the_stages_in_sequence(microbatches):
    w, x = _inputs(microbatches)
    forward = jax.jit(_pipelined)
    np.testing.assert_allclose(forward(w, x), _sequential(w, x), rtol=0, atol=1e-6)
    ticks = microbatches + PP - 1
    assert _sends(forward, w, x) == ticks, "docstring: one collective-permute per tick, M + pp - 1"

    grads = jax.jit(jax.grad(_pipelined_loss, argnums=(0, 1)))
    expected = jax.grad(lambda w, x: _loss(_sequential(w, x)), argnums=(0, 1))(w, x)
    for got, want, name in zip(grads(w, x), expected, ("d/dw", "d/dx"), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"M={microbatches} {name}")
    assert _sends(grads, w, x) == 2 * ticks, "docstring: M + pp - 1 permutes each way"


def test_one_stage_is_a_loop_over_microbatches():
    w, x = _inputs(3, pp=1)
    forward = jax.jit(functools.partial(_pipelined, pp=1))
    np.testing.assert_allclose(forward(w, x), _sequential(w, x), rtol=0, atol=1e-6)
    assert _sends(forward, w, x) == 0


@pytest.mark.parametrize(
    "args, fix",
    [
        ((6, 4, 4, 8), "choose pp in 1, 2, 3, 6"),
        ((8, 4, 2, 8), "--microbatches M must be >= pp"),
        ((8, 4, 4, 6), "does not divide the per-dp batch 6"),
    ],
)
def test_check_names_the_fix(args, fix):
    with pytest.raises(ValueError, match=fix):
        pipeline.check(*args)
    pipeline.check(8, 4, 4, 8)  # and a good one passes


def test_bubble_fraction():
    assert pipeline.bubble_fraction(4, 4) == 3 / 7
    assert pipeline.bubble_fraction(1, 4) == 0
