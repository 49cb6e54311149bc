"""Explicit sharding's plan: the model written for global arrays whose sharding is part of their type.

On a mesh of `AxisType.Explicit` axes every array's layout is in its type (`jax.typeof(x)` reads
`f32[16@dp,11,64]`), jax propagates it op by op at trace time, and an op whose result layout would be
ambiguous raises until the program says what it wants. The choices this plan writes down, each where
GSPMD would pick silently:
- a constraint is `jax.sharding.reshard` to the activation rules' layout (a no-op where the type already
  says it): where GSPMD's constraint is a hint, this one is the layout;
- a param is read in its compute layout: `reshard` to the params' rules without the data axis, which for
  ZeRO-3 is the all-gather before use; its transpose, the reduce-scatter of the gradient into the shard,
  comes with it. Without the reshard the dp-split weight would meet the dp-split batch in the matmul and
  jax would reduce partial products instead (the silent failure the issue found);
- a contraction over split dims (Megatron's row-parallel matmuls, the head's backward) states its
  result's layout with `out_sharding=`: the partial products summed into it (all-reduce, or with +sp a
  reduce-scatter);
- the embedding lookup states its rows' layout (`.at[].get(out_sharding=)`): a gather from a vocab-split
  table is ambiguous too.
Under ZeRO-3 the blocks are rematerialised saving all but the reshards and casts, so the backward pass
gathers each layer's params again (shard_map's policy) instead of keeping whole weights alive.
"""

import copy
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from shardgpt.model.moe import EXPERT_SLOTS, TOKEN_SLOTS
from shardgpt.model.plan import Plan, saving_all_but
from shardgpt.parallel import sharding
from shardgpt.parallel.shard_map_plan import active_axes, drop_inactive


def explicit_mesh(mesh: Mesh) -> Mesh:
    """`mesh`'s devices and axes, every axis Explicit (shardgpt's meshes are Auto: flax's logical
    constraints and GSPMD want them)."""
    return Mesh(
        np.asarray(mesh.devices), mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names)
    )


def active_spec(spec: P, mesh: Mesh) -> P:
    """`spec` without the mesh's size-1 axes: in a type they would claim a split that is not there (and
    flax's scan refuses a stacked dim typed as split, even over one device)."""
    return drop_inactive(spec, active_axes(mesh))


def _padded(spec: P, ndim: int) -> tuple:
    """`spec` as one entry per dim (P("dp") and P("dp", None) are one layout but compare unequal)."""
    return tuple(spec) + (None,) * (ndim - len(spec))


GRAD_SHARD = "{}_grad_shard"  # ZeRO-2: the zero param beside a whole one that receives its gradient shard


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _scatter_grad(value, grad_shard, spec: P):
    """ZeRO-2's read: `value` itself; the backward pass reshards its gradient into `grad_shard`'s layout
    (`spec`) where it is made, inside the layer loop, so no layer's whole gradient outlives it. A custom_vjp
    must give each primal a cotangent of its own type: the whole param gets zeros, the shard the gradient."""
    return value


def _scatter_grad_fwd(value, grad_shard, spec):
    return value, None


def _scatter_grad_bwd(spec, _, ct):
    with jax.named_scope("grad_reduce_scatter"):
        return jnp.zeros_like(ct), jax.sharding.reshard(ct.astype(jnp.float32), spec)


_scatter_grad.defvjp(_scatter_grad_fwd, _scatter_grad_bwd)


class ExplicitPlan(Plan):
    """The global view on `mesh` (Explicit axes) under `strategy`'s activation rules; params read in the
    layout of `strategy` without its ZeRO split of the data axis."""

    def __init__(self, mesh: Mesh, strategy: str):
        self.mesh, self.strategy = mesh, strategy
        self.rules = tuple(sharding.rules(strategy, "activations"))
        unsplit = "dp+sp" if sharding.is_sequence_parallel(strategy) else "dp"
        self.compute_rules = tuple(sharding.rules(unsplit, "params"))
        self.param_rules, self.grad_rules = (tuple(sharding.rules(strategy, t)) for t in ("params", "grads"))
        if sharding.canonical(strategy).startswith("zero3"):
            self.remat_policy = saving_all_but("reshard")  # the reshards are ZeRO-3's gathers

    def with_rules(self, rules: Sequence[tuple[str, str | None]]) -> "ExplicitPlan":
        """The same mesh and param layouts under other activation rules (the microbatch loop's blocks)."""
        plan = copy.copy(self)
        plan.rules = tuple(rules)
        return plan

    def spec(self, names: Sequence[str | None], rules: Sequence | None = None) -> P:
        """The layout of logical `names` under `rules` (default: the activation rules) on this mesh."""
        return active_spec(nn.logical_to_mesh_axes(tuple(names), rules or self.rules), self.mesh)

    def constrain(self, x, names):
        return jax.sharding.reshard(x, self.spec(names))

    def param(self, module, name, init, shape, names, dtype=None):
        value = module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)
        grad_spec = self.spec(names, self.grad_rules)
        if grad_spec != self.spec(names, self.param_rules):  # ZeRO-2: the step put a grad shard beside it
            grad_shard = module.param(
                GRAD_SHARD.format(name), nn.initializers.zeros_init(), shape, jnp.float32
            )
            value = _scatter_grad(value, grad_shard, grad_spec)
        value = value if dtype is None else value.astype(dtype)  # cast as a shard, then gathered
        compute = self.spec(names, self.compute_rules)
        if _padded(jax.typeof(value).sharding.spec, value.ndim) == _padded(compute, value.ndim):
            # Stored as computed with (dp, ZeRO-1/2, tp): no reshard, not even a no-op one. The layer
            # loop's backward pass then reads the param's own slice; a reshard's result is a new value,
            # which the loop would save for it: a copy of the stacked weights (gpt-pico, dp=8: 288 KiB).
            return value
        with jax.named_scope("zero3_gather"):  # the only collective this reshard may be
            # From jax 0.11 XLA names a gather after its operand's producer: a reshard to the value's own
            # layout (a no-op) makes that producer one of this scope's.
            value = jax.sharding.reshard(value, jax.typeof(value).sharding.spec)
            return jax.sharding.reshard(value, compute)

    def einsum(self, subscripts, a, b, out_names, **kwargs):
        return jnp.einsum(subscripts, a, b, out_sharding=self.spec(out_names), **kwargs)

    def embed(self, table_VxD, ids):
        rows = P(*jax.typeof(ids).sharding.spec, None)  # each id's row where the id is
        return table_VxD.at[ids].get(mode="fill", fill_value=0, out_sharding=rows)

    def lookup(self, table, ids, names):
        return table.at[ids].get(out_sharding=self.spec(names))

    def copy_to_shards(self, x):
        # Megatron-SP's f: the sequence gathered whole before a split matmul; its transpose reduce-scatters
        # the gradient back into the slices. Without +sp nothing to do (an MoE's slots: experts lead).
        if not sharding.is_sequence_parallel(self.strategy):
            return x
        with jax.named_scope("megatron_f"):
            return jax.sharding.reshard(x, self.spec(("batch",) + (None,) * (x.ndim - 1)))

    def to_experts(self, x_ExNxCxD):
        with jax.named_scope("moe.dispatch"):  # the all-to-all this reshard is (and its transpose)
            return self.constrain(x_ExNxCxD, (*EXPERT_SLOTS, "embed"))

    def from_experts(self, y_ExNxCxD):
        with jax.named_scope("moe.combine"):
            return self.constrain(y_ExNxCxD, (*TOKEN_SLOTS, "embed"))

    def batch_shards(self) -> int:
        return sharding.axes_size(self.mesh, dict(self.rules).get("batch"))
