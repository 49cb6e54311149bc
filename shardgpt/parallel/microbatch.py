"""Gradient accumulation: one step's batch as M microbatches scanned inside the jitted step, with the
gradient reduced across the data axis once per step where its layout allows.

Where the grads rules keep a gradient whole over dp (dp, zero1), every dp shard adds up its own partial
gradient over the M microbatches and the one reduction (all-reduce) runs after the loop, as with M = 1.
Where they split it over dp (zero2, zero3: the `embed` dim), the gradients live only as shards, so each
microbatch's gradient is reduce-scattered into its shard as it is made: ZeRO's gradient memory at M times
its reduce-scatter traffic (DeepSpeed's and FSDP's default; keeping whole unreduced gradients instead
would undo ZeRO-2's saving). Either way the loss is the mean over the non-ignored tokens of the whole
batch: each microbatch contributes its token-loss sum over the whole batch's count, never a mean of means.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.parallel import sharding
from shardgpt.parallel.gspmd_plan import GSPMDPlan


def check(batch_size: int, microbatches: int, dp: int) -> None:
    """Raise before compiling unless `microbatches` >= 1 divides each dp shard's rows of the batch."""
    if microbatches < 1:
        raise ValueError(f"--microbatches must be >= 1, got {microbatches}")
    per_shard = batch_size // dp
    if per_shard % microbatches:
        divisors = [m for m in range(1, per_shard + 1) if per_shard % m == 0]
        raise ValueError(
            f"--microbatches {microbatches} does not divide the per-dp batch {per_shard} (batch "
            f"{batch_size} over dp={dp}): choose one of {', '.join(map(str, divisors))}, or another --batch"
        )


def split(batch: dict, microbatches: int, groups: int | None = None) -> dict:
    """(B, ...) arrays -> (M, B / M, ...), or with `groups` (M, groups, B / (M groups), ...): microbatch m
    takes rows from each of `groups` contiguous blocks (each dp shard's own rows), so splitting moves no
    data between devices."""

    def one(x):
        rows = x.shape[0] // ((groups or 1) * microbatches)
        x = x.reshape(groups or 1, microbatches, rows, *x.shape[1:]).swapaxes(0, 1)
        return x if groups else x[:, 0]

    return jax.tree.map(one, batch)


def zeros_like(tree: Any, lead: tuple[int, ...] = ()) -> Any:
    """fp32 zeros shaped like `tree`'s leaves, with `lead` dims in front; without them, inside shard_map,
    they vary over the same mesh axes as the leaves, so they can start a scan's carry that adds them."""
    if lead:
        return jax.tree.map(lambda x: jnp.zeros((*lead, *x.shape), jnp.float32), tree)
    return jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), tree)


def accumulate(value_and_grad: Callable, params: Any, microbatches: dict, init: Any) -> Any:
    """Scan `value_and_grad(params, microbatch) -> (values, grads)` over the leading axis of
    `microbatches`, adding every leaf to `init`'s; the sums stay where value_and_grad leaves them (no
    reduction here). Gradients add in fp32."""

    def body(carry, microbatch):
        new = value_and_grad(params, microbatch)
        return jax.tree.map(lambda acc, x: acc + x.astype(acc.dtype), carry, new), None

    with jax.named_scope("microbatches"):
        carry, _ = jax.lax.scan(body, init, microbatches)
    return carry


def gspmd_value_and_grad(
    loss_fn: Callable,
    params: Any,
    batch: dict,
    microbatches: int,
    plan: GSPMDPlan,
    grad_shardings: Any,
    place: Callable = jax.lax.with_sharding_constraint,
) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """((loss sum, token count), grads of the loss sum) of `loss_fn(params, microbatch, plan) -> (loss
    sum, count)` summed over `microbatches` splits of `batch`, under GSPMD's `plan` (gspmd_plan.GSPMDPlan:
    its mesh and rules); grads in `grad_shardings`. `place(tree, shardings)` lays a tree out: a sharding
    constraint under GSPMD; explicit sharding passes `jax.sharding.reshard` and its own plan (a mesh, rules
    and `with_rules` are all this needs of one).

    GSPMD reduces a gradient as soon as its sharding says it is whole, so a plain scan would all-reduce
    inside the loop. Instead each microbatch is split into one block per dp shard and the gradient is
    vmapped over the blocks (`spmd_axis_name` puts the block dim on dp): every device computes its own
    partial gradient, the accumulator keeps one per dp shard, and summing them after the loop is the
    step's one reduction. Gradients whose layout splits them over dp (ZeRO-2/3) are summed over the blocks
    inside the loop instead: a reduce-scatter into their shard per microbatch (module docstring).
    """
    mesh, data_axis = plan.mesh, dict(plan.rules)["batch"]
    groups = plan.batch_shards()
    values_and_grads = jax.value_and_grad(loss_fn, has_aux=True)
    zero = jnp.zeros((), jnp.float32)
    if groups == 1:  # nothing to keep apart: accumulate in the grads' own layout
        init = ((zero, zero), place(zeros_like(params), grad_shardings))
        value_and_grad = lambda p, m: values_and_grads(p, m, plan)
        return accumulate(value_and_grad, params, split(batch, microbatches), init)

    # The blocks carry dp: inside them the batch is split over nothing.
    inner = plan.with_rules(tuple((name, None if name == "batch" else axis) for name, axis in plan.rules))
    data_axes = set(sharding.spec_axes(P(data_axis)))  # dp x ep
    whole = jax.tree.map(lambda s: not data_axes & set(sharding.spec_axes(s.spec)), grad_shardings)
    per_block = jax.tree.map(
        lambda s, w: NamedSharding(mesh, P(data_axis, *s.spec)) if w else s, grad_shardings, whole
    )

    def value_and_grad(p, microbatch):
        block = lambda p_, m_: values_and_grads(p_, m_, inner)
        values_G, grads = jax.vmap(block, in_axes=(None, 0), spmd_axis_name=data_axis)(p, microbatch)
        with jax.named_scope("grad_reduce"):  # ZeRO-2/3: reduced now (the scope names the cause)
            grads = jax.tree.map(lambda g, w: g if w else g.sum(0), grads, whole)
        return values_G, place(grads, per_block)

    lead = lambda w: (groups,) if w else ()
    zeros = jax.tree.map(lambda p, w: zeros_like(p, lead(w)), params, whole)
    zeros_G = place(jnp.zeros((groups,), jnp.float32), NamedSharding(mesh, P(data_axis)))  # a sum per block
    init = ((zeros_G, zeros_G), place(zeros, per_block))
    blocks = place(split(batch, microbatches, groups), NamedSharding(mesh, P(None, data_axis)))
    (total_G, count_G), acc = accumulate(value_and_grad, params, blocks, init)
    with jax.named_scope("grad_reduce"):  # the step's one reduction of the whole-over-dp gradients
        grads = place(jax.tree.map(lambda a, w: a.sum(0) if w else a, acc, whole), grad_shardings)
    with jax.named_scope("loss_sum"):
        return (total_G.sum(), count_G.sum()), grads
