"""Theory beside practice: the collectives one training step needs, per cause, from the layout.

Each param's per-device layout comes from the rule tables (`train.StateShardings`); with the batch and the
model config it gives, per cause of shardgpt.analysis.attribution, the textbook collectives (Megatron's f and
g, Megatron-SP's gathers and scatters, the vocab-parallel embedding and cross-entropy, ZeRO's reductions and
gathers): structured rows {(cause, kind): {"count", "bytes"}}, per device per step, bytes as result buffers
(hlo.py's convention). Counts are one op per tensor per layer and microbatch, before XLA combines any."""

import dataclasses
import math
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from shardgpt.analysis import attribution, hlo, textbook
from shardgpt.model.config import ModelConfig
from shardgpt.parallel import sharding


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One param as the rules lay it out on one device."""

    path: tuple[str, ...]
    layers: int  # stacked over `layers` (nn.scan): this device's layers (n_layer / pp); else 1
    in_block: bool  # a transformer block's (remat re-gathers these for the backward pass)
    local_bytes: int  # fp32 bytes of the params layout with dp's split undone (what a gather yields)
    read_bytes: int  # the same in the dtype the model reads it in (Dense weights: the compute dtype)
    grad_shard_bytes: int  # fp32 bytes of its gradient in the grads layout
    on_dp: dict[str, bool]  # target -> does that target's layout split it over the data axis
    on_tp: bool = False  # do the params split it over tp (Megatron's heads, mlp, vocab)
    on_ep: bool = False  # an expert's, split over ep (its gradient's partial sums are over dp alone)


def leaves(config: ModelConfig, params: Any, shardings: Any, data_axis: str = "dp") -> list[Leaf]:
    """Every param of `params` (arrays or ShapeDtypeStructs) with its per-device layout, one slice per
    layer for the stacked blocks, from `shardings` (train.StateShardings)."""
    flat = traverse_util.flatten_dict(params)
    specs = {
        "params": traverse_util.flatten_dict(shardings.state.params),
        "grads": traverse_util.flatten_dict(shardings.grads),
        "opt_state": traverse_util.flatten_dict(_adam_moment(shardings.state.opt_state, params)),
    }
    compute = jnp.dtype(config.dtype).itemsize
    out = []
    for path, leaf in flat.items():
        where = specs["params"][path]
        # Scanned: one stacked leaf for every layer, of which pp leaves this device its stage's.
        layers = where.shard_shape(leaf.shape)[0] if path[0] == "blocks" else 1
        whole = where.update(spec=_without(where.spec, data_axis))
        local = math.prod(whole.shard_shape(leaf.shape)) * 4 // layers
        # Dense kernels and biases are read in the compute dtype; LayerNorms and embeddings in fp32.
        dense = path[-1] in ("kernel", "bias") and not any(p.startswith("ln_") for p in path)
        grad = math.prod(specs["grads"][path].shard_shape(leaf.shape)) * 4 // layers
        on_dp = {t: data_axis in sharding.spec_axes(specs[t][path].spec) for t in specs}
        in_block = path[0] == "blocks" or path[0].startswith("block_")
        read = local * compute // 4 if dense else local
        axes = sharding.spec_axes(where.spec)
        on_tp, on_ep = "tp" in axes, "ep" in axes
        out.append(Leaf(path, layers, in_block, local, read, grad, on_dp, on_tp, on_ep))
    return out


def _without(spec, axis: str):
    drop = lambda e: (
        tuple(a for a in e if a != axis) or None if isinstance(e, tuple) else (None if e == axis else e)
    )
    return jax.sharding.PartitionSpec(*(drop(e) for e in spec))


def _adam_moment(opt_shardings: Any, params: Any) -> Any:
    """The first params-shaped subtree of the optimizer state's shardings (Adam's mu): where the update
    of each param is computed."""
    target = jax.tree.structure(params)
    found = []

    def visit(node):
        if not found and jax.tree.structure(node) == target:
            found.append(node)
            return True
        return False

    jax.tree.map(lambda _: None, opt_shardings, is_leaf=visit)
    return found[0]


def expected(
    config: ModelConfig,
    strategy: str,
    mesh_shape: dict[str, int],
    param_leaves: list[Leaf],
    batch: int,
    seq: int,
    microbatches: int = 1,
    impl: str = "shard_map",
) -> dict[tuple[str, str], dict[str, int]]:
    """{(cause, kind): {"count", "bytes"}}: the collectives one training step needs per device, from the
    layout and the textbook constructions (Megatron, Megatron-SP, ZeRO, GPipe, ring attention or, under
    GSPMD, K/V gathered over cp); counts as one op per tensor per layer and pass, before XLA combines any.

    A pass is one microbatch through the blocks: M of them, or with pp the pipeline's M + pp - 1 ticks
    (each of this device's n_layer / pp layers per tick, bubble ticks included). The embedding, head and
    loss run per microbatch, or with pp once on the whole local batch.
    """
    size = lambda axis: mesh_shape.get(axis, 1)
    dp, tp, pp, cp, m = size("dp"), size("tp"), size("pp"), size("cp"), microbatches
    ep = size("ep")
    passes, whole_times = (m + pp - 1, 1) if pp > 1 else (m, m)
    layers = config.n_layer // pp
    item, length = jnp.dtype(config.dtype).itemsize, seq // cp
    rows = batch // (dp * ep) // m  # one microbatch's rows on one device (the batch splits over dp x ep)
    act = rows * length * config.n_embd * item  # one layer's output for one microbatch
    whole = batch // (dp * ep) * length * config.n_embd  # elements of the whole local batch's layer output
    slots = moe_slots_bytes(config, rows, length)  # an MoE layer's dispatched slots on one device
    out: dict = defaultdict(lambda: {"count": 0, "bytes": 0, "dtypes": defaultdict(int)})
    compute = hlo_dtype(config.dtype)

    def add(cause, kind, count, nbytes, dtype=compute):
        out[(cause, kind)]["count"] += count
        out[(cause, kind)]["bytes"] += nbytes
        out[(cause, kind)]["dtypes"][dtype] += nbytes

    per_layer = layers * passes
    read = lambda leaf: compute if leaf.read_bytes != leaf.local_bytes else "f32"  # the dtype it is read in
    uses = lambda leaf: leaf.layers * passes if leaf.in_block else whole_times  # reads of a param a step
    if tp > 1:
        embed32, head = whole * 4, whole * item  # the embedding's rows are fp32 (its table is read so)
        if sharding.is_sequence_parallel(strategy):  # each all-reduce becomes a gather and a scatter
            add("embed", "reduce-scatter", whole_times, embed32 // tp, "f32")
            add("embed", "all-gather", whole_times, embed32, "f32")  # its backward
            for block in ("attn", "mlp"):
                for phase in ("fwd", "bwd"):
                    add(f"{block}.{phase}", "all-gather", per_layer, per_layer * act)
                    add(f"{block}.{phase}", "reduce-scatter", per_layer, per_layer * act // tp)
            add("head", "all-gather", whole_times, head)
            add("head", "reduce-scatter", whole_times, head // tp)
        else:
            add("embed", "all-reduce", whole_times, embed32, "f32")
            for cause in ("attn.fwd", "attn.bwd", "mlp.fwd", "mlp.bwd"):
                # an MoE's experts reduce their slots (at the experts), not the tokens
                block = slots if config.moe and cause.startswith("mlp") else act
                add(cause, "all-reduce", per_layer, per_layer * block)
            add("head", "all-reduce", whole_times, head)
        ce = 3 * batch // (dp * ep) * length * 4  # max, sum of exponentials, target logit: fp32 a position
        add("cross_entropy", "all-reduce", 3 * whole_times, ce, "f32")
        if sharding.is_sequence_parallel(strategy):
            # A param tp does not split, read beside a sequence slice, has its gradient summed over tp at
            # each use (LayerNorms, row-parallel biases, wpe), in the dtype it is read in.
            for leaf in param_leaves:
                if not leaf.on_tp:
                    add("grad_reduce", "all-reduce", uses(leaf), uses(leaf) * leaf.read_bytes, read(leaf))
    if cp > 1:
        kv = rows * length * (config.n_head // tp) * config.head_dim * item  # one of K, V: local positions
        if impl == "shard_map":  # ring attention: cp - 1 passes of K and V stacked, each way
            passes_kv = 2 * (cp - 1) * per_layer
            add("ring_kv", "collective-permute", passes_kv, passes_kv * 2 * kv)
        else:  # K and V gathered whole along the sequence; their cotangents reduce-scattered back
            add("kv_gather", "all-gather", 2 * per_layer, 2 * per_layer * kv * cp)
            add("kv_gather", "reduce-scatter", 2 * per_layer, 2 * per_layer * kv)
    if pp > 1:  # GPipe: one send a tick forward, one back
        add("pp_send", "collective-permute", 2 * passes, 2 * passes * act)
    if config.moe and ep > 1:  # the slots to their experts and back, each way again in the backward pass
        for cause in ("moe.dispatch", "moe.combine"):
            add(cause, "all-to-all", 2 * per_layer, 2 * per_layer * slots)
    for leaf in param_leaves if dp * pp * cp * ep > 1 else ():
        reads = uses(leaf)
        # Partial sums to add over cp, over ep but for an expert (each device its own tokens), and over pp
        # where only some stages use the param (not their own).
        others = cp > 1 or (ep > 1 and not leaf.on_ep) or (pp > 1 and not leaf.in_block)
        if dp > 1 and leaf.on_dp["grads"]:  # ZeRO-2/3: each use's gradient into its shard
            add("grad_reduce", "reduce-scatter", reads, reads * leaf.grad_shard_bytes, "f32")
            if others:
                add("grad_reduce", "all-reduce", leaf.layers, leaf.layers * leaf.grad_shard_bytes, "f32")
        elif dp > 1 or others:
            add("grad_reduce", "all-reduce", leaf.layers, leaf.layers * leaf.local_bytes, "f32")
        if dp > 1 and leaf.on_dp["params"]:
            add("zero3_gather.fwd", "all-gather", reads, reads * leaf.read_bytes, read(leaf))
            if leaf.in_block and leaf.path[-1] != "bias":  # a bias's backward never reads it
                add("zero3_gather.bwd", "all-gather", reads, reads * leaf.read_bytes, read(leaf))
        elif dp > 1 and leaf.on_dp["opt_state"]:
            add("param_gather", "all-gather", leaf.layers, leaf.layers * leaf.local_bytes, "f32")
    if dp * pp * cp * ep > 1:
        # (loss sum, token count), and in shard_map an MoE's dropped choices: one vector (step.as_vector)
        add("loss", "all-reduce", 1, 12 if config.moe and impl == "shard_map" else 8, "f32")
        if config.moe and impl != "shard_map":  # each layer's load-balancing term and dropped choices,
            add("loss", "all-reduce", per_layer, per_layer * 8, "f32")  # summed over the groups
    return {key: row | {"dtypes": dict(row["dtypes"])} for key, row in out.items()}


def moe_slots_bytes(config: ModelConfig, rows: int, length: int) -> int:
    """Bytes of one MoE layer's dispatched slots on a device holding `rows` rows of `length` tokens: every
    expert's capacity in each of its routing groups, (E, groups, C, D) in the compute dtype; 0 if dense."""
    if not config.moe:
        return 0
    groups, group = rows // config.moe_group_rows, config.moe_group_rows * length
    capacity = config.expert_capacity(group)
    return config.n_experts * groups * capacity * config.n_embd * jnp.dtype(config.dtype).itemsize


def hlo_dtype(name: str) -> str:
    """A jax dtype's name as HLO writes it: "bfloat16" -> "bf16"."""
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(jnp.dtype(name).name, name)


def norm_reductions(update_shardings: Any, mesh_shape: dict[str, int]) -> dict:
    """The global norm's reductions: one fp32 scalar psum per distinct set of axes (of size > 1) that
    the update layout splits params over (shard_map_step._global_norm's construction)."""
    active = lambda spec: tuple(a for a in sharding.spec_axes(spec) if mesh_shape.get(a, 1) > 1)
    count = len({active(s.spec) for s in jax.tree.leaves(update_shardings)} - {()})
    row = {"count": count, "bytes": 4 * count, "dtypes": {"f32": 4 * count}}
    return {("optimizer", "all-reduce"): row} if count else {}


def param_shapes(params: Any, shardings: Any, data_axis: str = "dp") -> attribution.ParamShapes:
    """Every per-device shape each param takes in the step (its params and grads layouts, and the params'
    with the data axis's split undone: what a gather yields), one layer's and the stack's: what an op must
    move to be that param's gather or gradient reduction (attribution.ParamShapes)."""
    flat = traverse_util.flatten_dict(params)
    layouts = (
        traverse_util.flatten_dict(shardings.state.params),
        traverse_util.flatten_dict(shardings.grads),
    )
    shapes = {}
    for path, leaf in flat.items():
        where = layouts[0][path]
        options = {tuple(s[path].shard_shape(leaf.shape)) for s in layouts}
        options.add(tuple(where.update(spec=_without(where.spec, data_axis)).shard_shape(leaf.shape)))
        if path[0] == "blocks":  # stacked over layers: a scanned body moves one layer's
            options |= {dims[1:] for dims in options}
        shapes[path] = options
    return attribution.ParamShapes(shapes)


def by_cause(
    hlo_text: str,
    config: ModelConfig,
    strategy: str,
    mesh_shape: dict[str, int],
    params: Any,
    shardings: Any,
    batch: int,
    seq: int,
    microbatches: int = 1,
    impl: str = "shard_map",
    platform: str | None = None,
) -> list[dict[str, Any]]:
    """attribution.reconcile() for one compiled training step: results.json's `collectives_by_cause`,
    theory's (our construction's) bytes and the textbook's beside the compiled ones. `platform` ("cpu",
    "gpu"...): where the program was compiled, which a note may name as evidence."""
    param_leaves = leaves(config, params, shardings)
    rows = expected(config, strategy, mesh_shape, param_leaves, batch, seq, microbatches, impl)
    rows |= norm_reductions(_adam_moment(shardings.state.opt_state, params), mesh_shape)
    ops = hlo.collective_ops(hlo_text)
    compiled = attribution.compiled_by_cause(ops, mesh_shape, param_shapes(params, shardings))
    book = textbook.expected(config, strategy, mesh_shape, batch, seq, microbatches, impl)
    return attribution.reconcile(compiled, rows, book, platform)
