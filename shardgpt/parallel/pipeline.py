"""Pipeline parallelism: GPipe's schedule over one mesh axis, inside jax.shard_map.

Each of the pp devices on `axis` holds one stage (e.g. n_layer / pp layers). The batch goes through as M
microbatches in M + pp - 1 ticks of one jax.lax.scan: at tick t stage s works on microbatch t - s, stage 0
reading microbatch t (zeros once t >= M) and every other stage what its left neighbour made at tick t - 1,
sent over one collective-permute; the last stage's output at tick t is microbatch t - (pp - 1)'s result.
All stages compute on every tick (one SPMD program): the pp - 1 ticks where a stage has no microbatch yet
(fill) or any more (drain) compute on zeros, so the bubble is (pp - 1) / (M + pp - 1) of each device's time.

Memory: autodiff through the scan saves every tick's stage activations, M + pp - 1 microbatches' worth per
stage (bubble ticks included); remat inside `stage_fn` trades them for recompute as usual.

Collectives: one collective-permute per tick, M + pp - 1 in the forward pass, each of one microbatch
activation. The tick-0 send carries only the zero initial carry; peeling it off would save one permute at
the price of a second copy of the stage in the program. The backward pass is jax's transpose of the scan:
the ticks in reverse, each permute's transpose sending the cotangent back one stage, M + pp - 1 again.
An x_MxB the same on every stage is cast to varying, so its gradient comes back as one all-reduce over pp.

Not expressed: the interleaved schedule (Megatron's virtual stages: device s runs stages s + k pp, so the
bubble shrinks to (pp - 1) / (v M + pp - 1)). Our params lie on pp by the `layers -> pp` rule, contiguous
blocks of layers; device s would need every pp-th block instead, a storage order that differs per schedule
(a checkpoint would no longer reshard onto any mesh) or an all-to-all of the block params every step.
Not expressed: 1F1B (one forward, one backward per tick once the pipe is full, which caps saved activations
at pp microbatches instead of M + pp - 1). It interleaves the forward of one microbatch with the backward of
another inside one loop, so the backward pass would have to be written by hand; here it is jax's transpose
of the forward scan, which runs only after the whole forward scan, as GPipe does.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shardgpt.parallel.sharding import vary, varying_axes

StageFn = Callable[[Any, jax.Array], jax.Array]  # (stage params, x_B) -> y_B, x's shape and dtype
SEND = "pp_send"  # the named scope of the stage-to-stage permute, kept in the HLO's op names


def bubble_fraction(pp: int, microbatches: int) -> float:
    """The share of each device's ticks spent on fill and drain: (pp - 1) / (M + pp - 1)."""
    return (pp - 1) / (microbatches + pp - 1)


def check(n_layer: int, pp: int, microbatches: int, batch_per_dp: int) -> None:
    """Raise before compiling unless pp stages of equal depth fill with M microbatches of equal rows."""
    if n_layer % pp:
        divisors = [d for d in range(1, n_layer + 1) if n_layer % d == 0]
        raise ValueError(
            f"n_layer {n_layer} does not split into pp={pp} equal stages: choose pp in "
            f"{', '.join(map(str, divisors))}, or another n_layer"
        )
    if microbatches < pp:
        raise ValueError(
            f"--microbatches M must be >= pp: M={microbatches} < pp={pp} never fills the pipe; use "
            f"--microbatches {pp} or more (bubble {bubble_fraction(pp, pp):.0%} at M={pp}, less as M grows)"
        )
    if batch_per_dp % microbatches:
        divisors = [m for m in range(pp, batch_per_dp + 1) if batch_per_dp % m == 0]
        raise ValueError(
            f"--microbatches {microbatches} does not divide the per-dp batch {batch_per_dp}: choose one of "
            f"{', '.join(map(str, divisors)) or 'none (>= pp)'}, or another --batch"
        )


def _zero_output(stage_fn, stage_params, x_B) -> jax.Array:
    """Zeros typed like stage_fn's output, to start the carry: that may vary over more axes than x_B (e.g.
    over its params' axes), and a scan's carry must keep one type."""
    out = jax.eval_shape(stage_fn, stage_params, x_B)
    return vary(jnp.zeros(out.shape, out.dtype), tuple(varying_axes(out)))


def gpipe(stage_fn: StageFn, stage_params: Any, x_MxB, axis: str) -> jax.Array:
    """This device's stage over M microbatches on GPipe's schedule, inside shard_map over `axis`.

    `stage_fn(stage_params, x_B) -> y_B` (x's shape and dtype) applies this device's stage; `x_MxB` holds
    the M microbatches (only stage 0 reads them). Returns the M outputs y_MxB, valid on the last stage
    and zeros on the others: the caller masks its loss by stage and psums it over `axis`.
    """
    pp, stage = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    x_MxB = vary(x_MxB, (axis,))  # the carry varies over `axis`, and so what stage 0 feeds into it
    x_TxB = jnp.concatenate([x_MxB, jnp.zeros((pp - 1, *x_MxB.shape[1:]), x_MxB.dtype)])
    sent_B = _zero_output(stage_fn, stage_params, x_MxB[0])
    # Non-circular: the wrap-around link (last stage -> stage 0) would carry only values stage 0 ignores,
    # and in the backward pass its transpose would send zero cotangents back; without it pp - 1 transfers.
    perm = [(i, i + 1) for i in range(pp - 1)]

    def tick(sent_B, xt_B):
        if pp > 1:
            with jax.named_scope(SEND):
                got_B = jax.lax.ppermute(sent_B, axis, perm)  # stage 0 gets zeros
            xt_B = jnp.where(stage == 0, xt_B, got_B)
        y_B = stage_fn(stage_params, xt_B)
        return y_B, y_B

    _, y_TxB = jax.lax.scan(tick, sent_B, x_TxB)
    # The last stage finishes microbatch m at tick m + pp - 1.
    return jnp.where(stage == pp - 1, y_TxB[pp - 1 :], 0)


def run_blocks(
    block: Any, stage_params: Any, x_BxLxD, microbatches: int, axis: str, policy=None, remat=False
):
    """The model's blocks on GPipe's schedule: this device's stage is its slice of the stacked `blocks`
    params (n_layer / pp layers, the `layers` -> pp rule), applied layer by layer with `block` (an unbound
    model.Block) to each of the local batch's M microbatches. Returns x_BxLxD after every stage, valid on
    the last one (zeros elsewhere). `policy`/`remat`: the jax.checkpoint of each layer the model would use.
    """
    b = x_BxLxD.shape[0]
    rows = b // microbatches
    positions_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), (rows, x_BxLxD.shape[1]))

    def layer(x_BxLxD, params):
        return block.apply({"params": params}, x_BxLxD, positions_BxL, None)[0], None

    if remat or policy is not None:
        layer = jax.checkpoint(layer, policy=policy)

    def stage_fn(params_N, x_BxLxD):
        return jax.lax.scan(layer, x_BxLxD, params_N)[0]

    x_MxBxLxD = x_BxLxD.reshape(microbatches, rows, *x_BxLxD.shape[1:])
    return gpipe(stage_fn, stage_params, x_MxBxLxD, axis).reshape(x_BxLxD.shape)
