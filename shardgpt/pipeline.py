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

Interleaved (`circular`, Megatron's virtual stages): each device holds v non-contiguous stages, s + k pp
for k < v, and every microbatch goes round the ring v times, so a tick is 1/v of a GPipe stage and the same
pp - 1 fill and drain ticks cost (pp - 1) / (v M + pp - 1). Stage 0 feeds repeat k > 0 of microbatch m
from a buffer of M microbatches where the last stage's repeat k - 1 landed (the wrap-around permute); with
M >= pp it lands in time. v M + pp - 1 permutes each way, saved activations v M + pp - 1 ticks of 1/v stage.

Not expressed: 1F1B (one forward, one backward per tick once the pipe is full, which caps saved activations
at pp microbatches instead of M + pp - 1). It interleaves the forward of one microbatch with the backward of
another inside one loop, so the backward pass would have to be written by hand; here it is jax's transpose
of the forward scan, which runs only after the whole forward scan, as GPipe does.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from shardgpt.sharding import vary, varying_axes

StageFn = Callable[[Any, jax.Array], jax.Array]  # (stage params, x_B) -> y_B, x's shape and dtype
SEND = "pp_send"  # the named scope of the stage-to-stage permute, kept in the HLO's op names


def bubble_fraction(pp: int, microbatches: int, repeats: int = 1) -> float:
    """The share of each device's ticks spent on fill and drain: (pp - 1) / (repeats M + pp - 1)."""
    return (pp - 1) / (repeats * microbatches + pp - 1)


def check(n_layer: int, pp: int, microbatches: int, batch_per_dp: int, repeats: int = 1) -> None:
    """Raise before compiling unless repeats pp stages of equal depth fill with M microbatches of equal
    rows."""
    if n_layer % (pp * repeats):
        divisors = [d for d in range(1, n_layer + 1) if n_layer % (d * repeats) == 0]
        raise ValueError(
            f"n_layer {n_layer} does not split into pp={pp} x repeats={repeats} equal stages: choose pp in "
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


def circular(stage_fn: StageFn, stage_params_V: Any, x_MxB, axis: str) -> jax.Array:
    """gpipe's interleaved twin: this device's v stages over M >= pp microbatches, going round the ring v
    times, inside shard_map over `axis`.

    `stage_params_V`'s leaves lead with v: entry k is stage s + k pp of this device s, applied by
    `stage_fn(stage_params, x_B)`. Returns y_MxB after all v pp stages, valid on the last device and zeros
    on the others, as gpipe's.
    """
    pp, stage = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
    repeats = jax.tree.leaves(stage_params_V)[0].shape[0]
    microbatches = x_MxB.shape[0]
    x_MxB = vary(x_MxB, (axis,))
    at = lambda k: jax.tree.map(lambda p_V: p_V[k], stage_params_V)
    sent_B = _zero_output(stage_fn, at(0), x_MxB[0])
    loop_MxB = jnp.zeros_like(x_MxB)  # stage 0's inbox for the microbatches coming round again
    perm = [(i, (i + 1) % pp) for i in range(pp)]  # circular: the last stage feeds stage 0's next repeat

    def tick(carry, t):
        sent_B, loop_MxB = carry
        if pp > 1:
            with jax.named_scope(SEND):
                got_B = jax.lax.ppermute(sent_B, axis, perm)
        else:
            got_B = sent_B
        # What stage 0 got is the last stage's work item t - pp; no real one lands in its slot before it.
        loop_MxB = jax.lax.dynamic_update_index_in_dim(loop_MxB, got_B, (t - pp) % microbatches, 0)
        j = t - stage  # this device's work item: microbatch j mod M, repeat j // M (clipped on bubble ticks)
        m, k = j % microbatches, jnp.clip(j // microbatches, 0, repeats - 1)
        # Past its v M items stage 0 recomputes a stale input: what it makes reaches no output.
        fresh = jnp.where(j < microbatches, x_MxB[m], loop_MxB[m])
        xt_B = jnp.where(stage == 0, fresh, got_B)
        y_B = stage_fn(at(k), xt_B)
        return (y_B, loop_MxB), y_B

    ticks = repeats * microbatches + pp - 1
    _, y_TxB = jax.lax.scan(tick, (sent_B, loop_MxB), jnp.arange(ticks))
    # The last device finishes microbatch m's last repeat at tick (v - 1) M + m + pp - 1: the last M ticks.
    return jnp.where(stage == pp - 1, y_TxB[-microbatches:], 0)


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
