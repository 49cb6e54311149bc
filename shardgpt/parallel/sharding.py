"""Strategies as logical-axis rule tables, and their strict translation into NamedShardings.

A strategy is a ZeRO stage on the `dp` axis composed with Megatron tensor parallelism on `tp`, optionally
with Megatron sequence parallelism (the "+sp" suffix, e.g. "zero1+sp"). Each maps logical axis names to
mesh axes separately for four targets: the state at rest (params, grads, optimizer state) and the
activations. `print(strategy_table())` is the documentation.
"""

import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.model.gpt import LOGICAL_AXES
from shardgpt.parallel.mesh import check_axes

TARGETS = ("activations", "params", "grads", "opt_state")

# ZeRO stage of each strategy: the stage is the number of state targets whose `embed` dim lives on dp.
STRATEGIES = {"dp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
ALIASES = {"fsdp": "zero3"}

# Megatron: heads, mlp and vocab split over tp in every target (column-parallel qkv/up, row-parallel
# out/down, vocab-parallel embedding and head), so each layer's activations need 2 all-reduces per pass.
_MEGATRON = (("heads", "tp"), ("mlp", "tp"), ("vocab", "tp"))
# Which state target shards `embed` over dp from which ZeRO stage on:
# ZeRO-1 the Adam moments, ZeRO-2 also the gradients, ZeRO-3 (FSDP) also the params.
EMBED_ON_DP_FROM_STAGE = {"opt_state": 1, "grads": 2, "params": 3}

# Megatron sequence parallelism (Korthikanti et al. 2022): between the tensor-parallel regions (the residual
# stream, LayerNorms, the embedding output) activations are split along `length` over tp, so entering a
# region all-gathers and leaving it reduce-scatters where Megatron alone all-reduces. It is one activation
# rule, listed after Megatron's: rules apply in order, as in flax, and a rule whose mesh axis an earlier rule
# gave to another dim of the same array does not apply, so inside a region heads/mlp/vocab keep tp.
SEQUENCE_PARALLEL = "+sp"
_SEQUENCE_ON_TP = (("length", "tp"),)

# Pipeline parallelism: the stacked layers of every state target split into pp stages. Context parallelism:
# every activation's sequence split over cp (attention then needs the other positions' K/V: ring_attention.py
# under shard_map, an all-gather of K/V under GSPMD). On a mesh whose pp or cp is 1 they split nothing.
_LAYERS_ON_PP = (("layers", "pp"),)
_LENGTH_ON_CP = (("length", "cp"),)

# Expert parallelism (model/moe.py): the experts split over ep in every target. The batch splits over dp
# and ep together (every device its own tokens), ZeRO over dp alone; tokens travel to their experts'
# devices and back by an all-to-all over ep, after which each expert's slots split over dp (`moe_groups`).
ZERO_AXIS = "dp"
BATCH_AXES = ("dp", "ep")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def canonical(strategy: str) -> str:
    """The strategy's canonical name ("fsdp" -> "zero3", "fsdp+sp" -> "zero3+sp"); raises on unknown names."""
    sp = strategy.endswith(SEQUENCE_PARALLEL)
    base = strategy.removesuffix(SEQUENCE_PARALLEL)
    name = ALIASES.get(base, base)
    if name not in STRATEGIES:
        known = ", ".join([*STRATEGIES, *ALIASES])
        raise ValueError(
            f"unknown strategy {strategy!r}; choose one of {known}, each optionally with "
            f"{SEQUENCE_PARALLEL} (sequence parallelism)"
        )
    return name + (SEQUENCE_PARALLEL if sp else "")


def base_strategy(strategy: str) -> str:
    """The ZeRO/Megatron strategy without sequence parallelism ("zero1+sp" -> "zero1")."""
    return canonical(strategy).removesuffix(SEQUENCE_PARALLEL)


def zero_stage(strategy: str) -> int:
    """The strategy's ZeRO stage on dp (0 for plain data parallelism)."""
    return STRATEGIES[base_strategy(strategy)]


def is_sequence_parallel(strategy: str) -> bool:
    """True for the "+sp" strategies (Megatron sequence parallelism on tp)."""
    return canonical(strategy).endswith(SEQUENCE_PARALLEL)


def rules(strategy: str, target: str) -> Rules:
    """Logical-axis rules (logical name -> mesh axis or None) for one target of one strategy, in the order
    they apply (see SEQUENCE_PARALLEL)."""
    stage = zero_stage(strategy)
    if target not in TARGETS:
        raise ValueError(f"unknown sharding target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "activations":
        data = (("batch", BATCH_AXES), ("embed", None))
        # The sequence: over tp between Megatron's regions with +sp, else over cp (context parallelism).
        length = _SEQUENCE_ON_TP if is_sequence_parallel(strategy) else _LENGTH_ON_CP
        experts = (("expert", "ep"), ("moe_groups", ZERO_AXIS), ("route", None))
        return data + _MEGATRON + length + (("kv", None), ("layers", None)) + experts
    on_dp = stage >= EMBED_ON_DP_FROM_STAGE[target]
    data = (("batch", None), ("embed", ZERO_AXIS if on_dp else None))
    experts = (("expert", "ep"), ("moe_groups", None), ("route", None))
    return data + _MEGATRON + (("length", None), ("kv", None)) + _LAYERS_ON_PP + experts


def strategy_table() -> str:
    """Every strategy's rules as a text table: target rows, logical-axis columns; then what +sp changes."""
    names = list(LOGICAL_AXES)
    row = lambda strategy, target, table: (
        f"{strategy:<8} {target:<12} " + " ".join(f"{show_axes(table[n]):>7}" for n in names)
    )
    lines = [f"{'strategy':<8} {'target':<12} " + " ".join(f"{n:>7}" for n in names)]
    for strategy in STRATEGIES:
        lines += [row(strategy, target, dict(rules(strategy, target))) for target in TARGETS]
    sp = dict(rules(f"dp{SEQUENCE_PARALLEL}", "activations"))
    lines.append(row(f"any{SEQUENCE_PARALLEL}", "activations", sp | {"length": "tp*"}))
    lines.append(
        f"* {SEQUENCE_PARALLEL}: length -> tp between the tensor-parallel regions (residual stream, "
        "LayerNorms, embedding output); inside them heads, mlp and vocab keep tp. State rules as without +sp."
    )
    return "\n".join(lines)


def logical_to_spec(names: Sequence[str | None], rules_: Rules, where: str = "array") -> P:
    """Strict translation of one array's logical names to a PartitionSpec.

    Raises on a name outside the vocabulary and on two dims landing on one mesh axis, which would
    otherwise be silently replicated: a lab must not give wrong numbers quietly.
    """
    table = dict(rules_)
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in table:
            raise ValueError(f"{where}: logical axis {name!r} has no rule; known: {', '.join(table)}")
        axes.append(table[name])
    used = [
        a for entry in axes if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))
    ]
    if len(used) != len(set(used)):
        raise ValueError(f"{where}: logical axes {tuple(names)} put two dims on one mesh axis ({axes})")
    return P(*axes)


def check_divisible(where: str, shape: Sequence[int], names: Sequence[str | None], spec: P, mesh: Mesh):
    """Raise, naming the dim, the mesh axis and the fix, when a sharded dim is not divisible."""
    axes = tuple(spec) + (None,) * (len(shape) - len(spec))
    for dim, (size, name, axis) in enumerate(zip(shape, names, axes, strict=True)):
        if axis is not None and size % axes_size(mesh, axis):
            shown = show_axes(axis)
            raise ValueError(
                f"{where}: dim {dim} ({name}={size}) is not divisible by mesh axis "
                f"{shown}={axes_size(mesh, axis)}; {_FIX.get(name, f'choose {shown} dividing {size}')}"
            )


def show_axes(axes: str | tuple[str, ...] | None) -> str:
    """A rule's mesh axes as text: "dp", "dp*ep" (a dim split over both), or "-"."""
    if axes is None:
        return "-"
    return axes if isinstance(axes, str) else "*".join(axes)


_FIX = {
    "heads": "choose tp dividing n_head, or a preset with more heads (e.g. gpt-pico has 8)",
    "mlp": "choose tp dividing the MLP width (4 * n_embd)",
    "vocab": "choose tp dividing vocab_multiple, or raise model.vocab_multiple",
    "embed": "choose dp dividing n_embd, or strategy 'dp' (which does not shard embed over dp)",
    "batch": "choose a batch size divisible by dp x ep",
    "expert": "choose ep dividing n_experts",
}


def tree_shardings(abstract: Any, axes: Any, mesh: Mesh, rules_: Rules) -> Any:
    """NamedShardings for a tree of arrays given a matching tree of logical names (P or tuple per leaf).

    Validates divisibility leaf by leaf, naming the leaf's path in the error.
    """
    check_axes(mesh)

    def one(path, names, leaf):
        where = jax.tree_util.keystr(path) or "array"
        names = tuple(names)
        if len(names) != len(leaf.shape):
            raise ValueError(
                f"{where}: {len(names)} logical names {names} for a rank-{len(leaf.shape)} array"
            )
        spec = logical_to_spec(names, rules_, where)
        check_divisible(where, leaf.shape, names, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, axes, abstract, is_leaf=lambda x: isinstance(x, P))


def param_subtree_axes(tree: Any, params_axes: Any) -> Any:
    """Logical names for a tree (e.g. optimizer state) whose param-shaped subtrees mirror the params.

    Adam's moments have the params' tree structure, so they take the params' names; every other leaf
    (step counts, schedules) is a replicated scalar.
    """
    params_def = jax.tree.structure(params_axes, is_leaf=lambda x: isinstance(x, P))

    def is_param_shaped(node):
        return jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda node: params_axes if is_param_shaped(node) else P(*([None] * len(node.shape))),
        tree,
        is_leaf=is_param_shaped,
    )


def varying_axes(x: Any) -> frozenset[str]:
    """The manual mesh axes a value (or a ShapeDtypeStruct) varies over inside shard_map (check_vma). jax
    has named this `vma` and, since 0.10, `mat.varying`/`manual_axis_type.varying`: whichever is present."""
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    for field in ("mat", "manual_axis_type"):
        if (types := getattr(aval, field, None)) is not None and hasattr(types, "varying"):
            return frozenset(types.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary(x: jax.Array, axes: Sequence[str]) -> jax.Array:
    """`x` cast to vary over `axes` too, inside shard_map: pcast refuses an axis `x` already varies over."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def spec_axes(spec: P) -> tuple[str, ...]:
    """The mesh axes `spec` splits over, sorted."""
    return tuple(sorted(a for e in spec if e for a in (e if isinstance(e, tuple) else (e,))))


def axes_size(mesh: Mesh, axes: str | Sequence[str] | None) -> int:
    """How many shards a rule's mesh axis (or tuple of them, e.g. the batch's dp x ep) makes on `mesh`."""
    if axes is None:
        return 1
    return math.prod(mesh.shape.get(a, 1) for a in ((axes,) if isinstance(axes, str) else axes))


def batch_shards(mesh: Mesh) -> int:
    """Into how many parts the activation rules split the batch on `mesh` (dp x ep)."""
    return axes_size(mesh, BATCH_AXES)


def batch_sharding(mesh: Mesh, strategy: str, rank: int = 2) -> NamedSharding:
    """Sharding of a (batch, length, ...) input: batch over the activations' rule for `batch`; token ids
    arrive whole along `length` (with +sp or cp too: the embedding output is what is split, so positions
    stay global)."""
    activations = rules(base_strategy(strategy), "activations")
    spec = logical_to_spec(("batch",) + (None,) * (rank - 1), activations)
    return NamedSharding(mesh, spec)
