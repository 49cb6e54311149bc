"""A training step's cost before anything compiles: theory's collectives laid on the mesh's device groups
(ops for cost.predict), and memory per device from the layout plus a model of the temporaries.

The recommender (lab/recommend.py) prunes its search with these, then compiles the few it keeps to confirm
them. Both are estimates and say so:
- the ops are theory.expected's rows, one op per tensor per layer and pass, before XLA combines any (so
  alpha, the fixed cost per op, is counted more often than a compiled program pays it), each on the groups
  of the mesh axes its cause runs over (CAUSE_AXES);
- the memory is the state, exact from the layout (metrics.state_bytes), plus temporaries modelled term by
  term in `memory` (activations after Korthikanti et al. 2022, one loss chunk, the accumulator, casts),
  which the compile confirms or corrects.
"""

import math
from typing import Any

import numpy as np

from shardgpt.analysis import hlo
from shardgpt.model.config import ModelConfig
from shardgpt.parallel import sharding
from shardgpt.parallel.mesh import AXES as MESH_AXES  # the flat device order runs the last (tp) fastest

_TP = ("tp",)
# The mesh axes each of theory's causes communicates over; a cause not listed is taken over every axis.
CAUSE_AXES = {
    **dict.fromkeys(("embed", "attn.fwd", "attn.bwd", "mlp.fwd", "mlp.bwd", "head", "cross_entropy"), _TP),
    **dict.fromkeys(("zero3_gather.fwd", "zero3_gather.bwd", "param_gather"), ("dp",)),
    "ring_kv": ("cp",),
    "kv_gather": ("cp",),
    "pp_send": ("pp",),
    # dp's (and cp's) gradient sums; with pp, also the embeddings' across stages. theory lumps them in one
    # row, so in-block gradients are taken over the larger group too (an upper bound on its size).
    "grad_reduce": ("dp", "pp", "cp"),
}
LOSS_CHUNK = 128  # training/loss.py's CHUNK: positions whose logits live at once
MEMORY_SOURCE = (
    "analytic: state exact from the layout; temporaries modelled: activations saved for the backward pass "
    "(Korthikanti et al. 2022, Table 2: s·b·h·(34 + 5·a·s/h) bytes per layer at 16 bits, tp without +sp "
    "(10 + 24/t + 5as/(ht)), with +sp all /t; remat keeps each layer's input 2·s·b·h and one layer's whole; "
    "GPipe stashes all M microbatches), one loss chunk of fp32 logits, the gradient accumulator (M > 1), "
    "the compute-dtype copy of the params, the update's buffer, ZeRO-3's gathered layers"
)


def groups(mesh: dict[str, int], axes: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """The device groups (positions in the mesh's flat device order) that vary over `axes` only."""
    sizes = [mesh.get(a, 1) for a in MESH_AXES]
    inner = [MESH_AXES.index(a) for a in axes]
    outer = [i for i in range(len(MESH_AXES)) if i not in inner]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(outer + inner)
    return tuple(tuple(int(d) for d in row) for row in ids.reshape(-1, math.prod(sizes[i] for i in inner)))


def ops(
    rows: dict[tuple[str, str], dict[str, Any]],
    mesh: dict[str, int],
    base_rows: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> list[hlo.CollectiveOp]:
    """theory.expected's rows as CollectiveOps on the mesh's groups, for cost.predict.

    `base_rows`: for a +sp strategy, the same rows without +sp; the gradient all-reduces +sp adds (the
    params tp does not split, summed over tp) are the difference, and run over tp.
    """
    rows = dict(rows)
    extra = None
    if base_rows is not None and ("grad_reduce", "all-reduce") in rows:
        row, base = rows[("grad_reduce", "all-reduce")], base_rows.get(("grad_reduce", "all-reduce"), {})
        count, nbytes = row["count"] - base.get("count", 0), row["bytes"] - base.get("bytes", 0)
        rows[("grad_reduce", "all-reduce")] = {"count": base.get("count", 0), "bytes": base.get("bytes", 0)}
        extra = ("grad_reduce.sp", "all-reduce", count, nbytes, _TP)
    out = []
    entries = [
        (cause, kind, r["count"], r["bytes"], CAUSE_AXES.get(cause, MESH_AXES))
        for (cause, kind), r in rows.items()
    ]
    for cause, kind, count, nbytes, axes in entries + ([extra] if extra else []):
        active = tuple(a for a in axes if mesh.get(a, 1) > 1)
        if count <= 0 or not active:
            continue
        where = groups(mesh, active)
        size, permute = len(where[0]), kind == "collective-permute"
        if permute:  # stage s sends to s + 1: the pairs along each group
            where = tuple((g[i], g[i + 1]) for g in where for i in range(len(g) - 1))
        out.append(
            hlo.CollectiveOp(kind, cause, nbytes // count, count, (), None if permute else size, cause, where)
        )
    return out


def activation_bytes(config: ModelConfig, strategy: str, mesh: dict[str, int], rows: int, seq: int) -> float:
    """One layer's activations saved for the backward pass, for `rows` sequences on one device (Korthikanti
    et al. 2022, Table 2, scaled from 16 bits to the compute dtype; no attention scores under cuDNN's)."""
    tp, d, item = mesh.get("tp", 1), config.n_embd, 2 if config.dtype == "bfloat16" else 4
    scores = 0 if config.attention == "cudnn" else 5 * config.n_head * seq / d
    if sharding.is_sequence_parallel(strategy) or tp == 1:
        per = (34 + scores) / tp
    else:
        per = 10 + 24 / tp + scores / tp
    return seq * rows * d * per * item / 2


def memory(
    config: ModelConfig,
    strategy: str,
    mesh: dict[str, int],
    batch: int,
    seq: int,
    microbatches: int,
    state: dict[str, int],
) -> dict[str, int]:
    """Bytes per device of one step: the state (metrics.state_bytes, exact) plus the modelled temporaries
    (MEMORY_SOURCE), each by name, and "total_bytes"."""
    dp, tp, pp = (mesh.get(a, 1) for a in ("dp", "tp", "pp"))
    item = 2 if config.dtype == "bfloat16" else 4
    rows = batch // dp // microbatches  # one microbatch's sequences on one device
    stashed = rows * microbatches if pp > 1 else rows  # GPipe keeps every microbatch's until its backward
    layers = config.n_layer // pp
    whole = activation_bytes(config, strategy, mesh, 1, seq)
    if config.remat:  # each layer's input kept; one layer's whole activations while it is recomputed
        split = tp if sharding.is_sequence_parallel(strategy) else 1
        saved = stashed * layers * 2 * seq * config.n_embd * item / 2 / split + rows * whole
    else:
        saved = stashed * layers * whole
    vocab = config.padded_vocab_size / tp
    stage = sharding.zero_stage(strategy)
    params, grads = state["params_bytes_per_device"], state["grads_bytes_per_device"]
    terms = {
        "activations": saved,
        # one chunk's fp32 logits, their softmax and gradient; the head's d/dx for the whole sequence
        "loss": 3 * rows * min(seq, LOSS_CHUNK) * vocab * 4 + rows * seq * config.n_embd * 4,
        "accumulator": grads if microbatches > 1 else 0,  # the grads summed over microbatches
        "compute_copy": 0 if item == 4 else params * item / 4,  # the params cast to the compute dtype
        "update": state["opt_state_bytes_per_device"] / 2,  # one params-sized fp32 buffer of the update
        # ZeRO-3 gathers a layer's params (compute dtype) and, in the backward, its fp32 gradient whole
        "gathered": 2 * dp * params / max(layers, 1) * (1 + item / 4) if stage >= 3 and dp > 1 else 0,
    }
    out = {k: int(v) for k, v in (state | terms).items()}
    out["total_bytes"] = sum(out.values())
    return out
