"""The strategies again by hand: jax.shard_map with explicit collectives, equal to train.py's GSPMD step.

Each device runs the one model (model.py) on its own shards through `ShardHooks`: Megatron's f and g around
the column- and row-parallel layers and a vocab-parallel embedding over tp, ZeRO-3's per-layer gathers over
dp (in the compute dtype). Around it the step computes a vocab-parallel cross-entropy (no device holds full
logits), reduces the gradients to the layout the rule tables give them (all-reduce after the backward pass,
or reduce-scatter inside it, each layer's as soon as it exists), updates only the optimizer-state shard it
owns, and gathers the new params back. Per-device locals end in `_`; every collective sits in a
jax.named_scope, which the compiled HLO keeps in its op names.
"""

import functools
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax.extend.core.primitives import custom_vjp_call_p
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt import microbatch, pipeline, ring_attention, sharding, train
from shardgpt.data import IGNORE_INDEX
from shardgpt.mesh import spans_processes
from shardgpt.model import GPT, Hooks, use_hooks


def _active_axes(mesh: Mesh) -> dict[str, int]:
    """Mesh axes of size > 1: a size-1 axis holds no shards, and XLA keeps a collective over it as a no-op."""
    return {axis: size for axis, size in mesh.shape.items() if size > 1}


def _drop_inactive(spec: P, active: dict[str, int]) -> P:
    keep = lambda a: a if a in active else None
    return P(*(tuple(filter(keep, a)) or None if isinstance(a, tuple) else keep(a) for a in spec))


def _dim_on(spec: P, axis: str | None) -> int | None:
    """The dim that `spec` splits over mesh `axis`, or None."""
    for dim, entry in enumerate(spec):
        if axis is not None and (entry == axis or (isinstance(entry, tuple) and axis in entry)):
            return dim
    return None


# jax issue 40830: across processes on CPU, gloo's reduce-scatter returns wrong values for large chunks
# (seen at 4 MiB a chunk on jax 0.10.2, right at 256 KiB). Above this, those meshes all-reduce and slice.
GLOO_SAFE_CHUNK_BYTES = 256 * 1024


def scatter_limit(mesh: Mesh) -> int | None:
    """The largest reduce-scatter chunk (bytes) to trust on `mesh`: GLOO_SAFE_CHUNK_BYTES on a CPU mesh
    that spans processes (gloo), else None (no limit)."""
    cpu = mesh.devices.flat[0].platform == "cpu"
    return GLOO_SAFE_CHUNK_BYTES if cpu and spans_processes(mesh) else None


def _reduce_scatter(x_, axis: str, dim: int, limit: int | None):
    """psum_scatter over `axis` along `dim`; where a chunk would exceed `limit`, a psum then this device's
    slice, the same values at twice the traffic."""
    n = jax.lax.axis_size(axis)
    if limit is None or x_.size * x_.dtype.itemsize // n <= limit:
        return jax.lax.psum_scatter(x_, axis, scatter_dimension=dim, tiled=True)
    size = x_.shape[dim] // n
    return jax.lax.dynamic_slice_in_dim(jax.lax.psum(x_, axis), jax.lax.axis_index(axis) * size, size, dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _gather(shard_, dtype, axis: str, dim: int, limit: int | None):
    """ZeRO-3's read: all-gather the shard cast to `dtype` (half the bytes in bf16); the backward pass
    reduce-scatters the gradient in fp32, as GSPMD does."""
    with jax.named_scope("zero3_gather"):
        return jax.lax.all_gather(shard_.astype(dtype), axis, axis=dim, tiled=True)


def _gather_bwd(dtype, axis, dim, limit, _, ct_):
    with jax.named_scope("zero3_gather"):
        return (_reduce_scatter(ct_.astype(jnp.float32), axis, dim, limit),)


_gather.defvjp(lambda *args: (_gather(*args), None), _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _scatter_grad(value_, grad_shard_, axis: str, dim: int, limit: int | None):
    """ZeRO-2's read: `value_` itself; the backward pass reduce-scatters its gradient into `grad_shard_`'s
    place, so each layer's gradient is split as soon as it exists and no whole one is ever live."""
    return value_


def _scatter_grad_bwd(axis, dim, limit, _, ct_):
    with jax.named_scope("grad_reduce_scatter"):
        return None, _reduce_scatter(ct_, axis, dim, limit)


_scatter_grad.defvjp(lambda value_, *_: (value_, None), _scatter_grad_bwd)

# Casts, broadcasts, reshapes and stacks (the q/k/v kernel) are cheap to redo, and may be of a gathered
# param: saving one would save the param. By name: jax 0.10 has a `stack` primitive, older ones concatenate.
_NOT_SAVED = {"all_gather", "convert_element_type", "broadcast_in_dim", "reshape", "concatenate", "stack"}


def _save_all_but_gathers(primitive, *_, **params) -> bool:
    """ZeRO-3's remat policy: save every residual but the all-gathered params (and casts and broadcasts),
    so the backward pass gathers each layer's params again instead of keeping whole weights alive."""
    if primitive is custom_vjp_call_p:  # `_gather` is one; another (cuDNN attention) is saved
        return not any(eqn.primitive is jax.lax.all_gather_p for eqn in params["call_jaxpr"].eqns)
    return primitive.name not in _NOT_SAVED


GRAD_SHARD = "{}_grad_shard"  # ZeRO-2: the zero param beside a whole one that receives its gradient shard


class ShardHooks(Hooks):
    """The model on one device's shards, inside shard_map; what is split where comes from the rule tables.

    Params arrive split as sharding.rules(strategy, "params") says. An axis that also splits the batch (dp)
    cannot split a weight during compute, since each of its shards needs the whole weight for its own rows:
    those dims are all-gathered when the param is used (ZeRO-3). The rest (tp) stay split: Megatron.
    Where the grads rules split a dim over dp that the params keep whole (ZeRO-2), the param is read with
    its `GRAD_SHARD` beside it, into which the backward pass reduce-scatters the gradient.
    """

    def __init__(self, mesh: Mesh, strategy: str, microbatches: int = 1):
        self.sizes = _active_axes(mesh)
        at_rest = {name: axis for name, axis in sharding.rules(strategy, "params") if axis in self.sizes}
        batch_axis = dict(sharding.rules(strategy, "activations"))["batch"]
        self.gathered = {name: axis for name, axis in at_rest.items() if axis == batch_axis}
        # (`layers` over pp is not a split a layer computes with: each device runs its own stage's layers.)
        self.split = {n: a for n, a in at_rest.items() if a != batch_axis and n != "layers"}
        grads = {name: axis for name, axis in sharding.rules(strategy, "grads") if axis in self.sizes}
        self.scattered = {n: a for n, a in grads.items() if a == batch_axis and n not in self.gathered}
        self.split_axes = tuple(sorted(set(self.split.values())))
        self.remat_policy = _save_all_but_gathers if self.gathered else None
        self.limit = scatter_limit(mesh)
        # Where the activation rules split `length`: over tp between its regions (Megatron-SP, `sequence`),
        # or over cp everywhere (context parallelism, `context`: attention passes K/V round the ring).
        length = dict(sharding.rules(strategy, "activations"))["length"]
        length = length if length in self.sizes else None
        self.sequence = length if sharding.is_sequence_parallel(strategy) else None
        self.context = None if self.sequence else length
        # Pipeline parallelism: the stacked layers run as stages over pp, the batch as `microbatches`.
        self.stages = "pp" if "pp" in self.sizes else None
        self.pipelined, self.microbatches = self.stages is not None, microbatches

    def _divide(self, shape, names, table):
        return tuple(
            n // self.sizes[table[x]] if x in table else n for n, x in zip(shape, names, strict=True)
        )

    def compute_shape(self, shape, names):
        return self._divide(shape, names, self.split)

    def param(self, module, name, init, shape, names, dtype=None):
        init = nn.with_logical_partitioning(init, names)
        value_ = module.param(name, init, self._divide(shape, names, self.gathered), jnp.float32)
        for dim, logical in enumerate(names):  # the rules put at most one dim on dp
            if logical in self.gathered:
                return _gather(value_, dtype or jnp.float32, self.gathered[logical], dim, self.limit)
            if logical in self.scattered:
                shard_shape = self._divide(shape, names, self.scattered)
                zeros = nn.initializers.zeros_init()  # never run: the step passes the shard in
                grad_shard_ = module.param(GRAD_SHARD.format(name), zeros, shard_shape, jnp.float32)
                value_ = _scatter_grad(value_, grad_shard_, self.scattered[logical], dim, self.limit)
        return value_ if dtype is None else value_.astype(dtype)

    def copy_to_shards(self, x_):
        if self.sequence:  # Megatron-SP's f: gather the sequence (its transpose reduce-scatters it back)
            with jax.named_scope("sp_all_gather"):
                return jax.lax.all_gather(x_, self.sequence, axis=1, tiled=True)
        if not self.split_axes:
            return x_
        with jax.named_scope("megatron_f"):  # its transpose, the backward all-reduce, keeps this name
            return jax.lax.pcast(x_, self.split_axes, to="varying")

    def reduce_from_shards(self, y_, contracted):
        axes = tuple(sorted({self.split[x] for x in contracted if x in self.split}))
        if not axes:
            return y_
        if axes == (self.sequence,):  # Megatron-SP's g: sum the partial products, keep a sequence slice
            with jax.named_scope("sp_reduce_scatter"):
                return _reduce_scatter(y_, self.sequence, 1, self.limit)
        with jax.named_scope("megatron_g"):
            return jax.lax.psum(y_, axes)

    def embed(self, table_VxD_, ids):
        if self.context:  # cp: look up this device's positions only
            ids = self.local_positions(ids, self.context)
        if "vocab" not in self.split:
            rows_ = table_VxD_[ids]
            return rows_ if self.context else self.split_length(rows_)
        axis, rows = self.split["vocab"], table_VxD_.shape[0]
        local = ids - jax.lax.axis_index(axis) * rows  # ids outside this shard's rows contribute zeros
        hit = (local >= 0) & (local < rows)
        rows_ = jnp.where(hit[..., None], table_VxD_[jnp.clip(local, 0, rows - 1)], 0)
        if axis == self.sequence:
            with jax.named_scope("sp_vocab_embed"):
                return _reduce_scatter(rows_, axis, 1, self.limit)
        with jax.named_scope("vocab_embed"):
            return jax.lax.psum(rows_, axis)

    def split_length(self, x_BxLxD):
        axis = self.sequence or self.context
        return self.local_positions(x_BxLxD, axis) if axis else x_BxLxD

    def local_positions(self, x_BxL, axis: str):
        """This device's contiguous slice of the sequence (dim 1) split over `axis`."""
        size = x_BxL.shape[1] // self.sizes[axis]
        return jax.lax.dynamic_slice_in_dim(x_BxL, jax.lax.axis_index(axis) * size, size, axis=1)

    def attention(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation):
        if not self.context:
            return super().attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation)
        return ring_attention.ring_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, self.context)

    def run_blocks(self, block, stacked_params, x_BxLxD, remat: bool):
        policy = None if remat else self.remat_policy
        return pipeline.run_blocks(
            block, stacked_params, x_BxLxD, self.microbatches, self.stages, policy, remat
        )

    def vocab_ids(self, n):
        if "vocab" not in self.split:
            return jnp.arange(n)
        return jax.lax.axis_index(self.split["vocab"]) * n + jnp.arange(n)


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
    shardgpt.microbatch).
    """
    strategy = sharding.canonical(strategy)
    sharding.check_mesh_axes(mesh, strategy, "shard_map", model.config.n_layer, model.config.scan_layers)
    active = _active_axes(mesh)
    piped = "pp" in active  # pp: the microbatches are the pipeline's, not an accumulation loop's
    hooks = ShardHooks(mesh, strategy, microbatches if piped else 1)
    data_axis = dict(sharding.rules(strategy, "activations"))["batch"]
    dp = data_axis if data_axis in active else None
    vocab_axis = hooks.split.get("vocab")
    # Axes over which a param's gradient has partial sums to add up: dp (its rows of the batch), cp (its
    # positions) and pp (stages other than the one using it: the embedding, the head), each unless the
    # param is split over it. ZeRO-2/3's dp part is reduce-scattered inside the backward pass instead.
    partial_axes = tuple(a for a in (dp, hooks.stages, hooks.context) if a)

    def replica_axes(spec) -> tuple[str, ...]:
        return tuple(a for a in partial_axes if _dim_on(spec, a) is None)

    def scattered(p_spec, g_spec) -> bool:
        """ZeRO-2: the param is whole on every device but its gradient lives split over dp."""
        return _dim_on(g_spec, dp) is not None and _dim_on(p_spec, dp) is None

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
        dim = _dim_on(u_spec, dp)
        if dim is None or _dim_on(from_spec, dp) is not None:
            return x_
        size = x_.shape[dim] // active[dp]
        return jax.lax.dynamic_slice_in_dim(x_, jax.lax.axis_index(dp) * size, size, dim)

    def to_param_layout(x_, u_spec, p_spec):
        """Gather the updated shards back into the params' layout (ZeRO-1 and -2)."""
        dim = _dim_on(u_spec, dp)
        if dim is None or _dim_on(p_spec, dp) is not None:
            return x_
        with jax.named_scope("param_all_gather"):
            return jax.lax.all_gather(x_, dp, axis=dim, tiled=True, to="invarying")

    def grad_shard_or_param(p_, p_spec, g_spec):
        """What autodiff differentiates for one param: itself, or for ZeRO-2 a zero shard in the grads
        layout, into which the backward pass reduce-scatters the gradient (ShardHooks.param)."""
        if not scattered(p_spec, g_spec):
            return p_
        shape = list(p_.shape)
        shape[_dim_on(g_spec, dp)] //= active[dp]
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
    state_specs = jax.tree.map(lambda s: _drop_inactive(s.spec, active), shardings.state)

    def specs(target: str) -> Any:
        rules = sharding.rules(strategy, target)
        to_spec = lambda names: _drop_inactive(sharding.logical_to_spec(names, rules), active)
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
    batch_spec = _drop_inactive(sharding.batch_sharding(mesh, strategy).spec, active)
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
