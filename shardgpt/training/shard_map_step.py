"""The strategies again by hand: jax.shard_map with explicit collectives, equal to train.py's GSPMD step.

Each device runs the one model (model/gpt.py) on its own shards through shard_hooks.ShardHooks (Megatron,
Megatron-SP, ZeRO-2/3's per-layer collectives, ring attention over cp, GPipe's stages over pp). Around it
the step computes a vocab-parallel cross-entropy (no device holds full logits), reduces the gradients to
the layout the rule tables give them (all-reduce after the backward pass, over every axis holding partial
sums, or reduce-scatter inside it, each layer's as soon as it exists), updates only the optimizer-state
shard it owns, and gathers the new params back. Per-device locals end in `_`; every collective sits in a
jax.named_scope, which the compiled HLO keeps in its op names.
"""

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.model.gpt import GPT, use_hooks
from shardgpt.parallel import layout, microbatch, sharding
from shardgpt.parallel.shard_hooks import GRAD_SHARD, ShardHooks, active_axes, dim_on, drop_inactive
from shardgpt.training import train
from shardgpt.training.data import IGNORE_INDEX


def vocab_parallel_cross_entropy(
    logits_BxLxV_, targets_BxL_, vocab_axis: str | None, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of targets != ignore_index) for logits split over `vocab_axis`, in fp32.

    Each device holds a slice of the vocab: the max, the sum of exponentials and the target's logit are
    combined across the slices with a pmax and one psum, so no device ever holds full logits.
    """
    logits_ = logits_BxLxV_.astype(jnp.float32)
    n = logits_.shape[-1]
    first = jax.lax.axis_index(vocab_axis) * n if vocab_axis else 0
    mask_BxL = targets_BxL_ != ignore_index
    local_BxL = targets_BxL_ - first
    hit_BxL = mask_BxL & (local_BxL >= 0) & (local_BxL < n)
    picked_BxL = jnp.take_along_axis(logits_, jnp.clip(local_BxL, 0, n - 1)[..., None], -1)[..., 0]
    target_BxL_ = jnp.where(hit_BxL, picked_BxL, 0.0)
    max_BxL = jax.lax.stop_gradient(logits_.max(-1))  # only for stability: its gradient cancels
    if vocab_axis:
        with jax.named_scope("vocab_ce_max"):
            max_BxL = jax.lax.pmax(max_BxL, vocab_axis)
    sums_2xBxL = jnp.stack([jnp.exp(logits_ - max_BxL[..., None]).sum(-1), target_BxL_])
    if vocab_axis:
        with jax.named_scope("vocab_ce_sum"):  # one all-reduce for both sums
            sums_2xBxL = jax.lax.psum(sums_2xBxL, vocab_axis)
    losses_BxL = jnp.log(sums_2xBxL[0]) + max_BxL - sums_2xBxL[1]
    return jnp.sum(jnp.where(mask_BxL, losses_BxL, 0.0)), mask_BxL.sum()


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


def make_train_step(
    model: GPT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    strategy: str,
    shardings: train.StateShardings,
    microbatches: int = 1,
) -> Callable[[train.TrainState, dict], tuple[train.TrainState, dict]]:
    """train.make_train_step's twin: same signature, state and shardings, written with jax.shard_map.

    `tx` must take the global norm as `tx.update(..., grad_norm=)` (optim.make_optimizer's does): a device
    holds only shards of the gradients, so clipping by their local norm would be wrong. With M
    `microbatches` each device scans its rows as M microbatches and adds up its partial gradients; the dp
    reduction after the loop is the step's one (ZeRO-2/3 reduce-scatter each microbatch's: see
    shardgpt.parallel.microbatch).
    """
    strategy = sharding.canonical(strategy)
    layout.check_mesh_axes(mesh, strategy, "shard_map", model.config)
    active = active_axes(mesh)
    piped = "pp" in active  # pp: the microbatches are the pipeline's, not an accumulation loop's
    hooks = ShardHooks(mesh, strategy, microbatches if piped else 1, model.config.ring_layout)
    data_axis = dict(sharding.rules(strategy, "activations"))["batch"]
    dp = data_axis if data_axis in active else None
    vocab_axis = hooks.split.get("vocab")
    # Axes over which a param's gradient has partial sums to add up: dp (its rows of the batch), cp (its
    # positions) and pp (stages other than the one using it: the embedding, the head), each unless the
    # param is split over it. ZeRO-2/3's dp part is reduce-scattered inside the backward pass instead.
    partial_axes = tuple(a for a in (dp, hooks.stages, hooks.context) if a)

    def replica_axes(spec) -> tuple[str, ...]:
        return tuple(a for a in partial_axes if dim_on(spec, a) is None)

    def scattered(p_spec, g_spec) -> bool:
        """ZeRO-2: the param is whole on every device but its gradient lives split over dp."""
        return dim_on(g_spec, dp) is not None and dim_on(p_spec, dp) is None

    def reduce_grad(g_, g_spec):
        """A device's partial gradient -> the summed gradient in the grads layout (its shard, or whole).
        ZeRO-2 and -3's dp part was reduce-scattered by the backward pass already, layer by layer."""
        axes = replica_axes(g_spec)
        if not axes:
            return g_
        with jax.named_scope("grad_all_reduce"):
            return jax.lax.psum(g_, axes)

    def to_update_layout(x_, from_spec, u_spec):
        """Keep only the slice of the optimizer-state shard this device owns (no communication)."""
        dim = dim_on(u_spec, dp)
        if dim is None or dim_on(from_spec, dp) is not None:
            return x_
        size = x_.shape[dim] // active[dp]
        return jax.lax.dynamic_slice_in_dim(x_, jax.lax.axis_index(dp) * size, size, dim)

    def to_param_layout(x_, u_spec, p_spec):
        """Gather the updated shards back into the params' layout (ZeRO-1 and -2)."""
        dim = dim_on(u_spec, dp)
        if dim is None or dim_on(p_spec, dp) is not None:
            return x_
        with jax.named_scope("param_all_gather"):
            return jax.lax.all_gather(x_, dp, axis=dim, tiled=True, to="invarying")

    def grad_shard_or_param(p_, p_spec, g_spec):
        """What autodiff differentiates for one param: itself, or for ZeRO-2 a zero shard in the grads
        layout, into which the backward pass reduce-scatters the gradient (ShardHooks.param)."""
        if not scattered(p_spec, g_spec):
            return p_
        shape = list(p_.shape)
        shape[dim_on(g_spec, dp)] //= active[dp]
        axes = tuple(sorted(set(sharding.spec_axes(g_spec)) | set(replica_axes(g_spec))))
        return jax.lax.pcast(jnp.zeros(shape, p_.dtype), axes, to="varying")

    def with_grad_shards(whole_, wrt_):
        """The params tree the model reads: `wrt_`, with each ZeRO-2 param taken whole from `whole_` and
        its grad shard from `wrt_` put beside it under GRAD_SHARD's name (ShardHooks.param pairs them)."""
        flat, flat_whole = traverse_util.flatten_dict(wrt_), traverse_util.flatten_dict(whole_)
        for path in zero2_paths:
            flat[(*path[:-1], GRAD_SHARD.format(path[-1]))] = flat[path]
            flat[path] = flat_whole[path]
        return traverse_util.unflatten_dict(flat)

    def train_step_(state_: train.TrainState, batch_: dict) -> tuple[train.TrainState, dict]:
        def loss_fn(wrt_, batch_):  # this device's (token-loss sum, token count)
            params_ = with_grad_shards(whole_, wrt_)
            with jax.named_scope("forward"):  # as in train.loss_sum: backward ops are transpose(jvp(forward))
                with nn.logical_axis_rules(()), use_hooks(hooks):  # no rules: activation constraints no-op
                    logits_BxLxV_ = model.apply({"params": params_}, batch_["inputs"])
                targets_BxL_ = batch_["targets"]
                if hooks.context:  # cp: the logits of this device's positions
                    targets_BxL_ = hooks.local_positions(targets_BxL_, hooks.context)
                loss_sum_, count_ = vocab_parallel_cross_entropy(logits_BxLxV_, targets_BxL_, vocab_axis)
                if hooks.stages:  # pp: only the last stage's logits are the model's (pipeline.gpipe)
                    last = jax.lax.axis_index(hooks.stages) == active[hooks.stages] - 1
                    loss_sum_, count_ = jnp.where(last, loss_sum_, 0), jnp.where(last, count_, 0)
            return loss_sum_, count_.astype(jnp.float32)

        # Params that dp does not split are made dp-varying, so autodiff leaves their gradients per-device
        # (it would psum them silently otherwise) and the reduction below is the one explicit collective.
        def vary(p_, spec):
            axes = replica_axes(spec)
            return jax.lax.pcast(p_, axes, to="varying") if axes else p_

        # ZeRO-2's params are read whole from `whole_` but not differentiated there, so no whole gradient
        # of them is ever made: autodiff differentiates their grad shards instead.
        whole_ = jax.tree.map(vary, state_.params, param_specs)
        wrt_ = jax.tree.map(grad_shard_or_param, whole_, param_specs, grad_specs)
        values_and_grads = jax.value_and_grad(loss_fn, has_aux=True)
        if microbatches == 1 or piped:
            sums_, grads_ = values_and_grads(wrt_, batch_)
        else:
            # The sums vary like this device's batch (over dp); the grads like what they differentiate.
            scalar_ = batch_["targets"][0, 0]
            if hooks.context:  # cp: each device sums its own positions' losses
                scalar_ = jax.lax.pcast(scalar_, hooks.context, to="varying")
            init = microbatch.zeros_like(((scalar_, scalar_), wrt_))
            split_ = microbatch.split(batch_, microbatches)
            sums_, grads_ = microbatch.accumulate(values_and_grads, wrt_, split_, init)
        sums_2 = jnp.stack(sums_)
        if (
            partial_axes
        ):  # one psum for both, after the backward pass (never beside the forward's collectives)
            with jax.named_scope("loss_sum"):
                sums_2 = jax.lax.psum(sums_2, partial_axes)
        # The mean over every non-ignored token of the batch: exactly loss.cross_entropy's.
        scale = 1 / jnp.maximum(sums_2[1], 1)
        loss_ = sums_2[0] * scale
        grads_ = jax.tree.map(lambda g_, spec: reduce_grad(g_, spec) * scale, grads_, grad_specs)
        grads_ = jax.tree.map(to_update_layout, grads_, grad_specs, update_specs)
        params_ = jax.tree.map(to_update_layout, state_.params, param_specs, update_specs)
        with jax.named_scope("optimizer"):
            grad_norm = _global_norm(grads_, update_specs)
            updates_, opt_state_ = tx.update(grads_, state_.opt_state, params_, grad_norm=grad_norm)
            params_ = jax.tree.map(
                to_param_layout, optax.apply_updates(params_, updates_), update_specs, param_specs
            )
        state_ = train.TrainState(step=state_.step + 1, params=params_, opt_state=opt_state_)
        return state_, {"loss": loss_, "grad_norm": grad_norm}

    # The specs, from the rule tables: the state's own (train.state_shardings), each param's layout under
    # the params, grads and opt_state rules, and the batch's. Size-1 mesh axes are left out of all of them.
    state_specs = jax.tree.map(lambda s: drop_inactive(s.spec, active), shardings.state)

    def specs(target: str) -> Any:
        rules = sharding.rules(strategy, target)
        to_spec = lambda names: drop_inactive(sharding.logical_to_spec(names, rules), active)
        return jax.tree.map(to_spec, shardings.params_axes, is_leaf=lambda x: isinstance(x, P))

    param_specs, grad_specs = specs("params"), specs("grads")
    flat_param_specs, flat_grad_specs = map(traverse_util.flatten_dict, (param_specs, grad_specs))
    zero2_paths = [path for path, spec in flat_param_specs.items() if scattered(spec, flat_grad_specs[path])]
    update_specs = specs("opt_state")  # where Adam's moments live is where a device updates its params
    if param_specs != state_specs.params:
        raise ValueError(
            f"the shardings were not made for strategy {strategy!r} on this mesh: build them "
            "with train.state_shardings (or train.init_state) for the same strategy and mesh"
        )
    batch_spec = drop_inactive(sharding.batch_sharding(mesh, strategy).spec, active)
    mapped = jax.shard_map(
        train_step_,
        mesh=mesh,
        in_specs=(state_specs, {"inputs": batch_spec, "targets": batch_spec}),
        out_specs=(state_specs, P()),
        check_vma=True,
    )
    batch_sharding = sharding.batch_sharding(mesh, strategy)
    jitted = jax.jit(
        mapped,
        in_shardings=(shardings.state, {"inputs": batch_sharding, "targets": batch_sharding}),
        out_shardings=(shardings.state, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    return train.bind_step(jitted, model, mesh, strategy, microbatches)
