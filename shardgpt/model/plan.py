"""How the model is laid out over devices: the `Plan` every module is given (the base: one device, no
mesh), and the named scopes that say where Megatron's collectives belong.

shardgpt.parallel gives the implementations' plans (GSPMD's, shard_map's); the model calls only these hooks.
"""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp


class Plan:
    """How the model is laid out over devices and crosses between them: passed in (`GPT(config, plan)`),
    never ambient, so a call says which layout it computes in. This base is the global view without a mesh
    (one device): every hook is the identity. shardgpt.parallel gives the implementations' plans: GSPMD's
    constrains activations by logical rules on its mesh; shard_map's runs the model on one device's shards
    (Megatron's collectives, ZeRO-3's gathers). One model definition serves every implementation.
    """

    # A jax.checkpoint policy to remat every block with even when config.remat is off (ZeRO-3 under
    # shard_map: save all but the gathered params, so the backward pass gathers them again).
    remat_policy = None

    def constrain(self, x, names: tuple[str, ...]):
        """`x` laid out as its logical `names` say (block boundaries, q/k/v, logits); the identity here."""
        return x

    def compute_shape(self, shape: tuple[int, ...], names: tuple[str, ...]) -> tuple[int, ...]:
        """The shape this device computes with, for a global shape with these logical names."""
        return shape

    def global_size(self, n: int, name: str) -> int:
        """The global size of a dim named `name` of which this device computes with `n` (compute_shape's
        inverse)."""
        return n

    def param(
        self, module: nn.Module, name: str, init, shape: tuple[int, ...], names: tuple[str, ...], dtype=None
    ):
        """module.param with logical names, read as `dtype` (None: fp32, as stored); `shape` is the compute
        shape (see compute_shape)."""
        value = module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)
        return value if dtype is None else value.astype(dtype)

    def einsum(self, subscripts: str, a, b, out_names: tuple[str | None, ...], **kwargs):
        """jnp.einsum of two operands whose result has the logical `out_names`. Where the contracted dims
        are split, the result's layout is ambiguous: an explicit plan states it from `out_names` (the
        partial products summed into that layout); here, GSPMD's partitioner or shard_map's per-device
        shapes decide, and Megatron's g is `reduce_from_shards`'."""
        return jnp.einsum(subscripts, a, b, **kwargs)

    def copy_to_shards(self, x):
        """Megatron's f, before a layer whose weights are split: identity forward, all-reduce backward."""
        return x

    def reduce_from_shards(self, y, contracted: tuple[str, ...]):
        """Megatron's g, after contracting `contracted` dims: all-reduce where those are split."""
        return y

    def embed(self, table_VxD, ids):
        """Rows of the embedding table: a vocab-parallel lookup where the vocab is split.

        An id outside the table gives a zero row, as the vocab-parallel lookup does (a plain gather would
        clamp it); ids are validated where data enters, so this only keeps the two impls equal.
        """
        return jnp.take(table_VxD, ids, axis=0, mode="fill", fill_value=0)

    def lookup(self, table, ids, names: tuple[str | None, ...]):
        """table[ids] (a position table's rows), laid out as the logical `names` (an explicit plan states
        it: a lookup into a split table is ambiguous)."""
        return table[ids]

    def split_length(self, x_BxLxD):
        """This device's part of the sequence where sequence parallelism splits it (the whole x here)."""
        return x_BxLxD

    def vocab_ids(self, n: int):
        """Global vocab ids of this device's n logits (they differ from arange where vocab is split)."""
        return jnp.arange(n)

    def vocab_max(self, x):
        """The max of x across the vocab's shards (x: this device's max over its logits)."""
        return x

    def vocab_sum(self, x):
        """The sum of x across the vocab's shards (x: this device's sum over its logits)."""
        return x

    def batch_shards(self) -> int:
        """Into how many blocks the loss keeps a batch-summed gradient apart (one per device the batch is
        split over, where a carry whole over them would be reduced once per loop step)."""
        return 1

    def attention(self, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, implementation):
        """Causal attention. Under GSPMD with the sequence split over cp, K and V are gathered whole along
        it (each device attends its own queries to every key: MaxText's default); elsewhere the constraint
        is the layout they already have."""
        kv_names = ("batch", None, "heads", "kv")
        with jax.named_scope("kv_gather"):  # names the gather (and its transpose) for attribution
            k_BxLxHxK, v_BxLxHxK = self.constrain(k_BxLxHxK, kv_names), self.constrain(v_BxLxHxK, kv_names)
        return jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True, implementation=implementation
        )

    def to_experts(self, x_ExNxCxD):
        """Each routing group's dispatched slots (experts first): where the experts are split over ep, sent
        to the devices that hold their experts (an all-to-all over ep); the identity here."""
        return x_ExNxCxD

    def from_experts(self, y_ExNxCxD):
        """The experts' outputs sent back to their tokens' devices: to_experts' inverse."""
        return y_ExNxCxD

    # True where the stacked blocks run as pipeline stages (shard_map_step's pp): GPT then calls run_blocks.
    pipelined = False

    def run_blocks(self, block: nn.Module, stacked_params, x_BxLxD, remat: bool):
        """The stacked blocks applied by an unbound `block` to x, where `pipelined` (parallel.pipeline)."""
        raise NotImplementedError


GLOBAL_VIEW = Plan()


# Cheap to redo in the backward pass, and each may hold a gathered param (a cast, a broadcast, a reshape,
# the q/k/v kernels' stack): saving one would save the param. jax 0.10 has a `stack` primitive.
CHEAP_TO_REDO = frozenset({"convert_element_type", "broadcast_in_dim", "reshape", "concatenate", "stack"})


def saving_all_but(read: str):
    """ZeRO-3's remat policy (a jax.checkpoint policy): save every residual but the primitive `read` that
    brings a param into its compute layout, and what is CHEAP_TO_REDO, so the backward pass reads each
    layer's params again instead of keeping whole weights alive."""
    not_saved = CHEAP_TO_REDO | {read}
    return lambda primitive, *_, **__: primitive.name not in not_saved


# The logical axes Megatron splits over tp: a matmul that contracts one is row-parallel (its g, an
# all-reduce, follows), one that produces one is column-parallel (its f, an all-reduce of x's gradient,
# precedes it in the backward pass).
MEGATRON_SPLIT = frozenset({"heads", "mlp", "vocab"})


def megatron_scope(in_axes: tuple[str, ...], out_axes: tuple[str, ...]):
    """A named scope stating the Megatron collective a matmul may need (megatron_g row-parallel,
    megatron_f column-parallel): GSPMD inserts it at the matmul, whose op name then says why
    (shardgpt.analysis.attribution). No scope for a matmul that needs none."""
    if MEGATRON_SPLIT & set(in_axes):
        return jax.named_scope("megatron_g")
    if MEGATRON_SPLIT & set(out_axes):
        return jax.named_scope("megatron_f")
    return contextlib.nullcontext()
