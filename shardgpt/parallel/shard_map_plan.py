"""shard_map's plan: the model on one device's shards, inside jax.shard_map, and the collectives it places.

The shard_map step passes a `ShardMapPlan` to the model and the loss, so the one model definition runs per
device:
Megatron's f and g around the column- and row-parallel layers and a vocab-parallel embedding over tp,
Megatron-SP's gathers and scatters, ZeRO-3's per-layer gathers over dp (in the compute dtype) and ZeRO-2's
per-layer reduce-scatters, ring attention over cp and GPipe's stages over pp. Per-device locals end in `_`;
every collective sits in a jax.named_scope, which the compiled HLO keeps in its op names
(shardgpt.analysis.attribution reads them).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.core.primitives import custom_vjp_call_p
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from shardgpt.model.plan import CHEAP_TO_REDO, Plan
from shardgpt.parallel import pipeline, ring_attention, sharding
from shardgpt.parallel.mesh import spans_processes


def active_axes(mesh: Mesh) -> dict[str, int]:
    """Mesh axes of size > 1: a size-1 axis holds no shards, and XLA keeps a collective over it as a no-op."""
    return {axis: size for axis, size in mesh.shape.items() if size > 1}


def drop_inactive(spec: P, active: dict[str, int]) -> P:
    keep = lambda a: a if a in active else None
    return P(*(tuple(filter(keep, a)) or None if isinstance(a, tuple) else keep(a) for a in spec))


def dim_on(spec: P, axis: str | None) -> int | None:
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

_NOT_SAVED = CHEAP_TO_REDO | {"all_gather"}


def _save_all_but_gathers(primitive, *_, **params) -> bool:
    """ZeRO-3's remat policy: save every residual but the all-gathered params (and casts and broadcasts),
    so the backward pass gathers each layer's params again instead of keeping whole weights alive."""
    if primitive is custom_vjp_call_p:  # `_gather` is one; another (cuDNN attention) is saved
        return not any(eqn.primitive is jax.lax.all_gather_p for eqn in params["call_jaxpr"].eqns)
    return primitive.name not in _NOT_SAVED


GRAD_SHARD = "{}_grad_shard"  # ZeRO-2: the zero param beside a whole one that receives its gradient shard


class ShardMapPlan(Plan):
    """The model on one device's shards, inside shard_map; what is split where comes from the rule tables.

    Params arrive split as sharding.rules(strategy, "params") says. An axis that also splits the batch (dp)
    cannot split a weight during compute, since each of its shards needs the whole weight for its own rows:
    those dims are all-gathered when the param is used (ZeRO-3). The rest (tp) stay split: Megatron.
    Where the grads rules split a dim over dp that the params keep whole (ZeRO-2), the param is read with
    its `GRAD_SHARD` beside it, into which the backward pass reduce-scatters the gradient.
    """

    def __init__(self, mesh: Mesh, strategy: str, microbatches: int = 1, ring_layout: str = "contiguous"):
        self.sizes = active_axes(mesh)
        at_rest = {name: axis for name, axis in sharding.rules(strategy, "params") if axis in self.sizes}
        batch_axis = sharding.ZERO_AXIS  # a param split over it is gathered (ZeRO-3): dp splits the batch
        self.gathered = {name: axis for name, axis in at_rest.items() if axis == batch_axis}
        # (`layers` over pp is not a split a layer computes with: each device runs its own stage's layers.)
        self.split = {n: a for n, a in at_rest.items() if a != batch_axis and n != "layers"}
        grads = {name: axis for name, axis in sharding.rules(strategy, "grads") if axis in self.sizes}
        self.scattered = {n: a for n, a in grads.items() if a == batch_axis and n not in self.gathered}
        # Megatron's f makes activations vary over the axes their weights split (tp); an expert split over
        # ep reads slots that vary over ep already (the batch's axis, which the tokens came by).
        self.split_axes = tuple(sorted(set(self.split.values()) - set(sharding.BATCH_AXES)))
        self.remat_policy = _save_all_but_gathers if self.gathered else None
        self.limit = scatter_limit(mesh)
        # Where the activation rules split `length`: over tp between its regions (Megatron-SP, `sequence`),
        # or over cp everywhere (context parallelism, `context`: attention passes K/V round the ring).
        length = dict(sharding.rules(strategy, "activations"))["length"]
        length = length if length in self.sizes else None
        self.sequence = length if sharding.is_sequence_parallel(strategy) else None
        self.context = None if self.sequence else length
        self.ring_layout = ring_layout  # which positions a cp device holds (ring_attention.LAYOUTS)
        # Pipeline parallelism: the stacked layers run as stages over pp, the batch as `microbatches`.
        self.stages = "pp" if "pp" in self.sizes else None
        self.pipelined, self.microbatches = self.stages is not None, microbatches

    def global_size(self, n, name):
        return n * self.sizes[self.split[name]] if name in self.split else n

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
        """This device's positions of the sequence (dim 1) split over `axis`: a contiguous slice, or under
        cp's zigzag layout chunks i and 2 cp - 1 - i of 2 cp (ring_attention.zigzag_order)."""
        n, i = self.sizes[axis], jax.lax.axis_index(axis)
        if axis == self.context and self.ring_layout == "zigzag":
            chunk = x_BxL.shape[1] // (2 * n)
            take = lambda c: jax.lax.dynamic_slice_in_dim(x_BxL, c * chunk, chunk, axis=1)
            return jnp.concatenate([take(i), take(2 * n - 1 - i)], axis=1)
        size = x_BxL.shape[1] // n
        return jax.lax.dynamic_slice_in_dim(x_BxL, i * size, size, axis=1)

    def attention(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation):
        if not self.context:
            return super().attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation)
        return ring_attention.ring_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, self.context, self.ring_layout)

    def run_blocks(self, block, stacked_params, x_BxLxD, remat: bool):
        policy = None if remat else self.remat_policy
        return pipeline.run_blocks(
            block, stacked_params, x_BxLxD, self.microbatches, self.stages, policy, remat
        )

    def to_experts(self, x_ExNxCxD_):
        if "ep" not in self.sizes:
            return x_ExNxCxD_
        # Each device's groups, every expert's slots -> every device's groups, this device's experts' slots.
        with jax.named_scope("moe.dispatch"):
            return jax.lax.all_to_all(x_ExNxCxD_, "ep", split_axis=0, concat_axis=1, tiled=True)

    def from_experts(self, y_ExNxCxD_):
        if "ep" not in self.sizes:
            return y_ExNxCxD_
        with jax.named_scope("moe.combine"):
            return jax.lax.all_to_all(y_ExNxCxD_, "ep", split_axis=1, concat_axis=0, tiled=True)

    def vocab_ids(self, n):
        if "vocab" not in self.split:
            return jnp.arange(n)
        return jax.lax.axis_index(self.split["vocab"]) * n + jnp.arange(n)

    def vocab_max(self, x_):
        if "vocab" not in self.split:
            return x_
        with jax.named_scope("vocab_ce_max"):
            return jax.lax.pmax(x_, self.split["vocab"])

    def vocab_sum(self, x_):
        if "vocab" not in self.split:
            return x_
        with jax.named_scope("vocab_ce_sum"):
            return jax.lax.psum(x_, self.split["vocab"])
