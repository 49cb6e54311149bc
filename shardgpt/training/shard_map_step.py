"""The strategies again by hand: shard_map's implementation of the one train step (step.py), with explicit
collectives, equal to GSPMD's.

Each device runs the one model (model/gpt.py) on its own shards through shard_map_plan.ShardMapPlan
(Megatron, Megatron-SP, ZeRO-2/3's per-layer collectives, ring attention over cp, GPipe's stages over pp),
and the same fused loss (loss.py) over its vocab slice. Around them the implementation reduces the
gradients to the layout the rule tables give them (all-reduce after the backward pass, over every axis
holding partial sums, or reduce-scatter inside it, each layer's as soon as it exists), updates only the
optimizer-state shard it owns, and gathers the new params back. Per-device locals end in `_`; every
collective sits in a jax.named_scope, which the compiled HLO keeps in its op names.
"""

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, microbatch, sharding
from shardgpt.parallel.shard_map_plan import GRAD_SHARD, ShardMapPlan, active_axes, dim_on, drop_inactive
from shardgpt.training import step, train
from shardgpt.training.step import TrainState


def _global_norm(tree_: Any, specs: Any) -> jax.Array:
    """The global L2 norm of a tree of shards: each leaf's squares are summed over the axes it is split on
    only, so a leaf replicated over an axis is counted once, not once per replica."""
    groups: dict[tuple[str, ...], list[jax.Array]] = defaultdict(list)
    for leaf_, spec in zip(jax.tree.leaves(tree_), jax.tree.leaves(specs), strict=True):
        groups[sharding.spec_axes(spec)].append(jnp.sum(jnp.square(leaf_.astype(jnp.float32))))
    total = jnp.float32(0)
    for axes, squares_ in sorted(groups.items()):
        partial_ = sum(squares_)
        if axes:
            with jax.named_scope("grad_norm"):
                partial_ = jax.lax.psum(partial_, axes)
        total = total + partial_
    return jnp.sqrt(total)


class ShardMap(step.Implementation):
    """One device's shards of everything, inside jax.shard_map: the specs come from the rule tables (size-1
    mesh axes left out), every collective is this class's or the plan's."""

    def __init__(
        self, model: GPT, mesh: Mesh, strategy: str, shardings: train.StateShardings, microbatches: int
    ):
        self.active = active = active_axes(mesh)
        self.piped = "pp" in active  # pp: the microbatches are the pipeline's, not an accumulation loop's
        self.plan = ShardMapPlan(mesh, strategy, microbatches if self.piped else 1, model.config.ring_layout)
        self.model = model.clone(plan=self.plan)
        self.dp = sharding.ZERO_AXIS if sharding.ZERO_AXIS in active else None  # ZeRO's axis
        ep = "ep" if "ep" in active else None
        # Axes over which a param's gradient has partial sums to add up: dp and ep (its rows of the batch),
        # cp (its positions) and pp (stages other than the one using it: the embedding, the head), each
        # unless the param is split over it (an expert over ep). ZeRO-2/3's dp part is reduce-scattered
        # inside the backward pass instead.
        self.partial_axes = tuple(a for a in (self.dp, ep, self.plan.stages, self.plan.context) if a)

        def specs(target: str) -> Any:
            rules = sharding.rules(strategy, target)
            to_spec = lambda names: drop_inactive(sharding.logical_to_spec(names, rules), active)
            return jax.tree.map(to_spec, shardings.params_axes, is_leaf=lambda x: isinstance(x, P))

        self.param_specs, self.grad_specs = specs("params"), specs("grads")
        # Where Adam's moments live is where a device updates its params.
        self.update_specs = specs("opt_state")
        flat_params, flat_grads = map(traverse_util.flatten_dict, (self.param_specs, self.grad_specs))
        self.zero2_paths = [
            path for path, spec in flat_params.items() if self._scattered(spec, flat_grads[path])
        ]

    def _replica_axes(self, spec) -> tuple[str, ...]:
        return tuple(a for a in self.partial_axes if dim_on(spec, a) is None)

    def _scattered(self, p_spec, g_spec) -> bool:
        """ZeRO-2: the param is whole on every device but its gradient lives split over dp."""
        return dim_on(g_spec, self.dp) is not None and dim_on(p_spec, self.dp) is None

    def differentiable(self, params_):
        """(wrt_, whole_): the params made varying over the axes holding partial gradients (so autodiff
        leaves them per device and `reduce` is the one explicit collective), and what autodiff
        differentiates: each param itself, or for ZeRO-2 a zero shard in the grads layout into which the
        backward pass reduce-scatters the gradient (ShardMapPlan.param): no whole gradient is ever made."""

        def vary(p_, spec):
            axes = self._replica_axes(spec)
            return jax.lax.pcast(p_, axes, to="varying") if axes else p_

        def grad_shard_or_param(p_, p_spec, g_spec):
            if not self._scattered(p_spec, g_spec):
                return p_
            shape = list(p_.shape)
            shape[dim_on(g_spec, self.dp)] //= self.active[self.dp]
            axes = tuple(sorted(set(sharding.spec_axes(g_spec)) | set(self._replica_axes(g_spec))))
            return jax.lax.pcast(jnp.zeros(shape, p_.dtype), axes, to="varying")

        whole_ = jax.tree.map(vary, params_, self.param_specs)
        return jax.tree.map(grad_shard_or_param, whole_, self.param_specs, self.grad_specs), whole_

    def loss(self, wrt_, batch_, whole_):
        """This device's (token-loss sum, token count); the params the model reads are `wrt_` with each
        ZeRO-2 param taken whole and its grad shard put beside it under GRAD_SHARD's name."""
        flat, flat_whole = traverse_util.flatten_dict(wrt_), traverse_util.flatten_dict(whole_)
        for path in self.zero2_paths:
            flat[(*path[:-1], GRAD_SHARD.format(path[-1]))] = flat[path]
            flat[path] = flat_whole[path]
        targets_BxL_ = batch_["targets"]
        if self.plan.context:  # cp: the targets of this device's positions
            targets_BxL_ = self.plan.local_positions(targets_BxL_, self.plan.context)
        loss_sum_, count_ = train.loss_sum(
            self.model, traverse_util.unflatten_dict(flat), batch_, targets_BxL_
        )
        if self.plan.stages:  # pp: only the last stage's output is the model's (pipeline.gpipe)
            last = jax.lax.axis_index(self.plan.stages) == self.active[self.plan.stages] - 1
            loss_sum_, count_ = jnp.where(last, loss_sum_, 0), jnp.where(last, count_, 0)
        return loss_sum_, count_

    def accumulated(self, microbatches):
        return 1 if self.piped else microbatches

    def accumulate(self, wrt_, batch_, whole_, microbatches):
        # The sums vary like this device's batch (over dp); the grads like what they differentiate.
        scalar_ = batch_["targets"][0, 0].astype(jnp.float32)
        if self.plan.context:  # cp: each device sums its own positions' losses
            scalar_ = jax.lax.pcast(scalar_, self.plan.context, to="varying")
        count_ = jnp.stack([scalar_, scalar_]) if self.model.config.moe else scalar_  # train.loss_sum's
        init = microbatch.zeros_like(((scalar_, count_), wrt_))
        value_and_grad = jax.value_and_grad(lambda w_, b_: self.loss(w_, b_, whole_), has_aux=True)
        return microbatch.accumulate(value_and_grad, wrt_, microbatch.split(batch_, microbatches), init)

    def reduce_sums(self, sums_2):
        if not self.partial_axes:
            return sums_2
        with jax.named_scope("loss_sum"):  # one psum for both, after the backward pass (never beside the
            return jax.lax.psum(sums_2, self.partial_axes)  # forward's collectives)

    def reduce_grads(self, grads_):
        def reduce_grad(g_, g_spec):
            """A device's partial gradient -> the summed gradient in the grads layout (its shard, or
            whole). ZeRO-2 and -3's dp part was reduce-scattered by the backward pass already."""
            axes = self._replica_axes(g_spec)
            if not axes:
                return g_
            with jax.named_scope("grad_all_reduce"):
                return jax.lax.psum(g_, axes)

        return jax.tree.map(reduce_grad, grads_, self.grad_specs)

    def to_update_layout(self, tree_, of):
        """Keep only the slice of the optimizer-state shard this device owns (no communication)."""
        specs = {"grads": self.grad_specs, "params": self.param_specs}[of]

        def slice_(x_, from_spec, u_spec):
            dim = dim_on(u_spec, self.dp)
            if dim is None or dim_on(from_spec, self.dp) is not None:
                return x_
            size = x_.shape[dim] // self.active[self.dp]
            return jax.lax.dynamic_slice_in_dim(x_, jax.lax.axis_index(self.dp) * size, size, dim)

        return jax.tree.map(slice_, tree_, specs, self.update_specs)

    def global_norm(self, grads_):
        return _global_norm(grads_, self.update_specs)

    def to_param_layout(self, params_):
        """Gather the updated shards back into the params' layout (ZeRO-1 and -2)."""

        def gather(x_, u_spec, p_spec):
            dim = dim_on(u_spec, self.dp)
            if dim is None or dim_on(p_spec, self.dp) is not None:
                return x_
            with jax.named_scope("param_all_gather"):
                return jax.lax.all_gather(x_, self.dp, axis=dim, tiled=True, to="invarying")

        return jax.tree.map(gather, params_, self.update_specs, self.param_specs)


def _shard_map(
    fn: Callable, impl: ShardMap, mesh: Mesh, strategy: str, first: Any, out_specs: Any
) -> Callable:
    """`fn(first, batch)` inside jax.shard_map: `first` (a state or params) and the batch split as their
    shardings say, size-1 mesh axes left out."""
    in_specs = jax.tree.map(lambda s: drop_inactive(s.spec, impl.active), first)
    batch_spec = drop_inactive(sharding.batch_sharding(mesh, strategy).spec, impl.active)
    batch_specs = {"inputs": batch_spec, "targets": batch_spec}
    return jax.shard_map(fn, mesh=mesh, in_specs=(in_specs, batch_specs), out_specs=out_specs, check_vma=True)


def make_train_step(
    model: GPT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    strategy: str,
    shardings: train.StateShardings,
    microbatches: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """train.make_train_step's twin: same signature, state and shardings; the one train step (step.build)
    in shard_map's implementation, inside jax.shard_map and jitted once.

    With M `microbatches` each device scans its rows as M microbatches and adds up its partial gradients;
    the dp reduction after the loop is the step's one (ZeRO-2/3 reduce-scatter each microbatch's: see
    shardgpt.parallel.microbatch). On a pp mesh the microbatches are the pipeline's.
    """
    strategy = sharding.canonical(strategy)
    layout.check_mesh_axes(mesh, strategy, "shard_map", model.config)
    impl = ShardMap(model, mesh, strategy, shardings, microbatches)
    # The state's specs are its shardings' (train.state_shardings), size-1 mesh axes left out.
    state_specs = jax.tree.map(lambda s: drop_inactive(s.spec, impl.active), shardings.state)
    if impl.param_specs != state_specs.params:
        raise ValueError(
            f"the shardings were not made for strategy {strategy!r} on this mesh: build them "
            "with train.state_shardings (or train.init_state) for the same strategy and mesh"
        )
    mapped = _shard_map(
        step.build(impl, tx, microbatches), impl, mesh, strategy, shardings.state, (state_specs, P())
    )
    jitted = train.jit_with_batch(
        mapped, mesh, strategy, shardings.state, (shardings.state, P()), donate=True
    )
    return train.bind_step(jitted, model, mesh, strategy, microbatches)


def make_eval_sums(
    model: GPT, mesh: Mesh, strategy: str, shardings: train.StateShardings, microbatches: int = 1
):
    """train.make_eval_sums's twin: the forward and loss of the one step (step.build_eval) in shard_map's
    implementation, so a pp model evaluates on the pipeline's schedule (its `microbatches`, as trained)."""
    strategy = sharding.canonical(strategy)
    impl = ShardMap(model, mesh, strategy, shardings, microbatches)
    mapped = _shard_map(step.build_eval(impl), impl, mesh, strategy, shardings.state.params, P())
    jitted = train.jit_with_batch(mapped, mesh, strategy, shardings.state.params, P())
    return train.MeshBound(jitted, mesh)
