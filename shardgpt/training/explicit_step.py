"""The train step in explicit sharding: the third implementation, beside GSPMD's (train.py) and shard_map's.

The step skeleton (step.build) runs on global arrays typed with their layouts on the mesh's Explicit
twin (parallel.explicit_plan): the model reads its params through an ExplicitPlan, and each change of
layout the strategy makes is a `reshard` written here, where GSPMD infers it from in/out shardings:
- the gradients into the grads' layout (ZeRO-2: a replicated gradient sliced into its shard; ZeRO-3's
  already are, the transpose of the gather that read them);
- the grads and params into the optimizer state's layout (ZeRO-1/2 update a dp shard of each);
- the updated params back into their own (ZeRO-1/2's gather), because optax's update takes the moments'
  layout: a param's type would otherwise drift to dp-split with no error.
Scope: dp, tp, ZeRO-1/2/3, +sp and microbatches, on one process or several (the state and batch arrive as
global arrays on the Auto mesh, `distributed.place` or `data.global_batch`, and are re-typed onto the twin
where they are: each process's shards stay put); pp and cp are refused before any compile
(layout.check names the implementations that run them).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, microbatch, sharding
from shardgpt.parallel.explicit_plan import GRAD_SHARD, ExplicitPlan, active_spec, explicit_mesh
from shardgpt.training import step, train
from shardgpt.training.train import StateShardings


def _on(mesh: Mesh, tree: Any) -> Any:
    """NamedShardings (or specs) of `tree` on `mesh`, without its size-1 axes."""
    spec = lambda s: s.spec if isinstance(s, NamedSharding) else s
    return jax.tree.map(
        lambda s: NamedSharding(mesh, active_spec(spec(s), mesh)),
        tree,
        is_leaf=lambda s: isinstance(s, NamedSharding | P),
    )


def _is_spec(x) -> bool:
    return isinstance(x, P)


class Explicit(step.Implementation):
    """Every layout in the arrays' types; the strategy's changes of layout written as reshards."""

    def __init__(self, model: GPT, mesh: Mesh, strategy: str, shardings: StateShardings):
        self.mesh = explicit_mesh(mesh)
        self.plan = ExplicitPlan(self.mesh, strategy)
        self.model = model.clone(plan=self.plan)
        self.params = _on(self.mesh, shardings.state.params)
        self.grads = _on(self.mesh, shardings.grads)
        self.zero3 = sharding.canonical(strategy).startswith("zero3")
        # ZeRO-2: params whole over dp whose gradients the grads rules split over it.
        split = lambda tree: {k: v.spec for k, v in traverse_util.flatten_dict(tree).items()}
        at_rest, grad_specs = split(self.params), split(self.grads)
        self.zero2_paths = {path for path, spec in grad_specs.items() if spec != at_rest[path]}
        # Where Adam's moments live is where a device updates its params (ZeRO-1/2: a dp shard).
        rules = sharding.rules(strategy, "opt_state")
        to_spec = lambda names: sharding.logical_to_spec(names, rules)
        self.update = _on(self.mesh, jax.tree.map(to_spec, shardings.params_axes, is_leaf=_is_spec))

    def differentiable(self, params):
        """(wrt, whole): what autodiff differentiates, each param or, for ZeRO-2, a zero shard in the grads
        layout into which the backward pass reshards the gradient (ExplicitPlan.param); and the params."""
        flat, grads = traverse_util.flatten_dict(params), traverse_util.flatten_dict(self.grads)
        shard = lambda path: jnp.zeros(flat[path].shape, jnp.float32, out_sharding=grads[path])
        wrt = {path: shard(path) if path in self.zero2_paths else p for path, p in flat.items()}
        return traverse_util.unflatten_dict(wrt), params

    def loss(self, wrt, batch, whole=None, plan: ExplicitPlan | None = None):
        if whole is not None:  # ZeRO-2: each whole param read with its grad shard beside it
            flat, flat_whole = traverse_util.flatten_dict(wrt), traverse_util.flatten_dict(whole)
            for path in self.zero2_paths:
                flat[(*path[:-1], GRAD_SHARD.format(path[-1]))] = flat[path]
                flat[path] = flat_whole[path]
            wrt = traverse_util.unflatten_dict(flat)
        return train.loss_sum(self.model.clone(plan=plan) if plan else self.model, wrt, batch)

    def accumulate(self, params, batch, read, microbatches):
        # GSPMD's loop (microbatch.py), its layouts said by reshards: each dp shard's partial gradients
        # apart in a leading dim on dp until the loop ends; ZeRO-2/3's reduced into their shard per
        # microbatch.
        if not (self.zero3 or self.zero2_paths):
            loss = lambda p, b, plan: self.loss(p, b, read, plan)
            return microbatch.gspmd_value_and_grad(
                loss, params, batch, microbatches, self.plan, self.grads, jax.sharding.reshard
            )
        # ZeRO-3's params and ZeRO-2's grad shards are split over dp, which a vmap over dp cannot take
        # unmapped: each microbatch's gradients reduced as their types say (into their shards, as GSPMD
        # does; the few params the rules leave whole over dp all-reduced per microbatch). Microbatch m takes
        # rows of every dp shard.
        dp = self.plan.batch_shards()
        blocks = microbatch.split(batch, microbatches, dp)  # (M, dp, rows, ...): dp on the blocks
        merged = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[3:]), blocks)
        value_and_grad = jax.value_and_grad(lambda p, b: self.loss(p, b, read), has_aux=True)
        zero = jnp.zeros((), jnp.float32)
        init = ((zero, zero), jax.sharding.reshard(microbatch.zeros_like(params), self.grads))
        return microbatch.accumulate(value_and_grad, params, merged, init)

    def reduce_grads(self, grads):
        return jax.sharding.reshard(grads, self.grads)

    def to_update_layout(self, tree, of):
        return jax.sharding.reshard(tree, self.update)

    def to_param_layout(self, params):
        return jax.sharding.reshard(params, self.params)


def _jit(fn: Callable, mesh: Mesh, strategy: str, first: Any, out: Any, donate: bool = False):
    """(train.jit_with_batch on the mesh's Explicit twin, the twin, and `relayout`: the arguments from
    `mesh`'s Auto layouts onto the twin's, the same devices and splits (arrays are re-typed, not moved: a
    global array spanning processes too, each process's shards where they are; abstract ones get the
    twin's sharding)."""
    twin = explicit_mesh(mesh)
    first = _on(twin, first)
    batch = NamedSharding(twin, active_spec(sharding.batch_sharding(twin, strategy).spec, twin))
    where = (first, {"inputs": batch, "targets": batch})

    def relayout(*args):
        def place(x, to):
            if isinstance(x, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=to)
            return x if getattr(x, "sharding", None) == to else jax.device_put(x, to)

        return jax.tree.map(place, args, where)

    return train.jit_with_batch(fn, twin, strategy, first, _on(twin, out), donate), twin, relayout


def make_train_step(
    model: GPT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    strategy: str,
    shardings: StateShardings,
    microbatches: int = 1,
) -> Callable:
    """The one train step (step.build) in explicit sharding, jitted once on `mesh`'s Explicit twin with
    the state donated; train.make_train_step's signature."""
    layout.check_mesh_axes(mesh, strategy, "explicit", model.config, microbatches)
    train_step = step.build(Explicit(model, mesh, strategy, shardings), tx, microbatches)
    jitted, twin, relayout = _jit(train_step, mesh, strategy, shardings.state, (shardings.state, P()), True)
    return train.bind_step(jitted, model, twin, strategy, microbatches, relayout)


def make_eval_sums(model: GPT, mesh: Mesh, strategy: str, shardings: StateShardings, microbatches: int = 1):
    """Explicit sharding's `eval_sums(params, batch) -> (loss sum, token count)` (train.make_eval_sums'
    twin)."""
    layout.check_mesh_axes(mesh, strategy, "explicit", model.config, microbatches)
    eval_sums = step.build_eval(Explicit(model, mesh, strategy, shardings))
    jitted, twin, relayout = _jit(eval_sums, mesh, strategy, shardings.state.params, P())
    return train.MeshBound(jitted, twin, relayout=relayout)
