"""Where the bytes go: every compiled collective attributed to its cause, beside theory's bytes for it.

A collective's cause is read from what XLA kept of the program: the jax named scopes and module paths in
its op_name (`megatron_g`, `blocks/attn/out`, `zero3_gather`, `optimizer`...), whether it runs in the
backward pass (`transpose(`), and the mesh axes its device groups span. Both impls name the same places
(the model, the loss and the steps scope them), so a GSPMD program and its shard_map twin attribute alike.
A tuple collective that XLA combined from several is split into its elements, each attributed by its
own name. What no rule explains is "unattributed", never dropped.

`reconcile` sets the compiled rows beside theory's (shardgpt.analysis.theory), cause by cause. Needs no
jax, so a saved results.json can be re-explained anywhere.
"""

import re
from collections import defaultdict
from typing import Any

import numpy as np

from shardgpt.analysis import hlo

# Each cause, in the order tables list them, with what it is.
CAUSES = {
    "embed": "vocab-parallel embedding lookup (tp)",
    "attn.fwd": "Megatron g after attention's out projection (forward, tp)",
    "attn.bwd": "Megatron f before attention's q/k/v (its backward, tp)",
    "mlp.fwd": "Megatron g after the MLP's down projection (forward, tp)",
    "mlp.bwd": "Megatron f before the MLP's up projection (its backward, tp)",
    "head": "Megatron f before the vocab-parallel LM head (its backward, tp)",
    "cross_entropy": "vocab-parallel cross-entropy: max, sum of exponentials, target logit (tp)",
    "zero3_gather.fwd": "ZeRO-3 parameter gathers in the forward pass (dp)",
    "zero3_gather.bwd": "ZeRO-3 re-gathers in the backward pass: params not saved for it (dp)",
    "grad_reduce": "gradient reduction: all-reduce, or reduce-scatter into ZeRO-2/3 shards (dp)",
    "param_gather": "ZeRO-1/2 gather of the updated params (dp)",
    "loss": "the loss sum and token count across the batch (dp)",
    "optimizer": "the global gradient norm for clipping",
    "pp_send": "pipeline: activations to the next stage, cotangents back (pp)",
    "ring_kv": "ring attention: K/V blocks around the ring, cotangents back (cp)",
    "kv_gather": "GSPMD's context parallelism: K/V gathered along the sequence, cotangents scattered (cp)",
    "cp_gather": "GSPMD's context parallelism: other activations gathered along the sequence (cp)",
    "unattributed": "no rule names a cause",
}
UNATTRIBUTED = "unattributed"
# XLA:CPU compiles a reduce-scatter as an all-reduce whose every use is a slice: compared as one.
_AS_THEORY = {hlo.SLICED_ALL_REDUCE: "reduce-scatter"}
TOLERANCE = 0.05  # a row whose compiled bytes are off theory's by more than this gets a note


def _scopes(op_name: str) -> set[str]:
    return set(re.split(r"[/()]", op_name))


def mesh_axes(groups: tuple[tuple[int, ...], ...], mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes along which an op's device groups (partition ids, in the mesh's flat device order)
    vary: the axes it communicates over."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    varying = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.array(group), sizes)).T
        varying |= {names[i] for i in range(len(names)) if len(set(coords[:, i].tolist())) > 1}
    return tuple(a for a in names if a in varying)


def classify(op_name: str, kind: str, axes: tuple[str, ...]) -> str:
    """The cause of one collective (or one element of a combined one); UNATTRIBUTED when no rule fits."""
    scopes, backward = _scopes(op_name), "transpose(" in op_name
    phase = "bwd" if backward else "fwd"
    if "optimizer" in scopes:  # the update: ZeRO-1/2 gather the new params, or the norm's reduction
        return "param_gather" if kind == "all-gather" else "optimizer"
    for scope, cause in (("loss_sum", "loss"), ("pp_send", "pp_send"), ("ring_kv_pass", "ring_kv")):
        if scope in scopes:
            return cause
    if not op_name and kind == "all-gather" and axes == ("dp",):
        return "param_gather"  # GSPMD's, at the program's output: the new params take their layout
    if scopes & {"grad_reduce", "grad_all_reduce", "grad_reduce_scatter"}:
        return "grad_reduce"
    if "zero3_gather" in scopes or (axes == ("dp",) and kind == "all-gather"):
        # ZeRO-3's gather; its transpose, the gradient's reduce-scatter, keeps the name
        return f"zero3_gather.{phase}" if kind == "all-gather" else "grad_reduce"
    if axes == ("cp",) and not backward:  # GSPMD's context parallelism (shard_map's ring is named)
        if "attention" in scopes:
            return "kv_gather"
        if kind == "all-gather":
            return "cp_gather"
        if "head_cross_entropy" in scopes:  # the fused loss's sums over positions: loss, head gradient
            return "loss" if "cross_entropy" in scopes else "grad_reduce"
    if axes == ("cp",) and "attention" in scopes and kind != "all-reduce":
        return "kv_gather"
    last = op_name.rsplit("/", 1)[-1]
    if axes == ("tp",) and backward and kind == "all-reduce" and last.startswith(("psum", "reduce_sum")):
        if not scopes & {"megatron_f", "megatron_g"}:
            # +sp: the gradient of a param tp does not split (LayerNorms, row-parallel biases, wpe) holds
            # partial sums over the sequence slices (a sum, not Megatron's f, which is a dot's transpose)
            return "grad_reduce"
    if axes == ("tp",):
        for scope, cause in (("attn", f"attn.{phase}"), ("mlp", f"mlp.{phase}"), ("embed", "embed")):
            if scope in scopes:
                return cause
        if "head" in scopes:
            return "head"
        if scopes & {"cross_entropy", "vocab_ce_max", "vocab_ce_sum"}:
            return "cross_entropy"
    if axes and set(axes) <= {"dp", "cp"} and backward and kind != "collective-permute":
        return "grad_reduce"  # GSPMD reduces each gradient over dp (and cp) where the backward makes it
    return UNATTRIBUTED


def compiled_by_cause(ops: list[hlo.CollectiveOp], mesh_shape: dict[str, int]) -> dict:
    """{(cause, kind): {"count", "bytes", "sliced_bytes", "ops"}} per device per step: each element of
    each op attributed by its own name; an op counts once per (cause, kind) it feeds, per execution;
    "ops" maps each element's op_name (after the jit(...) prefix) and [mesh axes] to the bytes it moved."""
    table: dict = {}
    for op in ops:
        axes = mesh_axes(op.groups, mesh_shape)
        seen = set()
        for part in op.parts or (hlo.Part(op.kind, op.op_name, op.bytes),):
            key = (classify(part.op_name, part.kind, axes), _AS_THEORY.get(part.kind, part.kind))
            row = table.setdefault(key, {"count": 0, "bytes": 0, "sliced_bytes": 0, "ops": defaultdict(int)})
            row["bytes"] += part.bytes * op.executions
            row["ops"][f"{_short(part.op_name)} [{','.join(axes) or '-'}]"] += part.bytes * op.executions
            if part.kind == hlo.SLICED_ALL_REDUCE:
                row["sliced_bytes"] += part.bytes * op.executions
            if key not in seen:
                row["count"] += op.executions
                seen.add(key)
    return {key: row | {"ops": dict(row["ops"])} for key, row in table.items()}


def _in_block(op_name: str) -> bool:
    """True for an op of a transformer block (scanned `blocks/`, unrolled `block_i/`, or pp's `Block/`)."""
    return bool(re.search(r"(^|/)(blocks|block_\d+|Block)/", op_name))


def _short(op_name: str) -> str:
    """An op name without its jit(...)/shard_map/ prefix and while-loop plumbing."""
    name = re.sub(r"^jit\([^)]*\)/(shard_map/)?", "", op_name)
    return name.replace("while/body/closed_call/", "") or "(no op name: inserted by XLA)"


def reconcile(compiled: dict, expected: dict) -> list[dict[str, Any]]:
    """One row per (cause, kind) in either table, in CAUSES order: compiled and theory count and bytes,
    their ratio, the op names that moved the bytes, and a note where compiled bytes are off theory's by
    more than TOLERANCE and the HLO shows why."""
    keys = sorted(set(compiled) | set(expected), key=lambda k: (list(CAUSES).index(k[0]), k[1]))
    rows = []
    for cause, kind in keys:
        got = compiled.get((cause, kind), {"count": 0, "bytes": 0, "sliced_bytes": 0, "ops": {}})
        want = expected.get((cause, kind), {"count": 0, "bytes": 0})
        ratio = got["bytes"] / want["bytes"] if want["bytes"] else None
        row = {
            "cause": cause,
            "kind": kind,
            "count": got["count"],
            "bytes": got["bytes"],
            "sliced_bytes": got["sliced_bytes"],
            "theory_count": want["count"],
            "theory_bytes": want["bytes"],
            "ratio": ratio,
            "ops": dict(sorted(got["ops"].items(), key=lambda item: -item[1])),
        }
        rows.append(row | {"note": _note(row)})
    return rows


def _note(row: dict) -> str:
    """Why compiled and theory differ, where the op names and kinds show it ("" where they agree)."""
    names = " ".join(row["ops"])
    if row["bytes"] == row["theory_bytes"]:
        return "" if row["count"] == row["theory_count"] else "the same bytes in another number of ops"
    if row["cause"] == UNATTRIBUTED:
        return "no named scope or rule explains these: their op names are listed by --explain"
    if row["sliced_bytes"]:
        share = row["sliced_bytes"] / row["bytes"]
        return (
            "XLA:CPU compiles this reduce-scatter as an all-reduce + dynamic-slice: bytes are the whole "
            f"all-reduce's, group size x the shard ({share:.0%} of these bytes)"
        )
    if row["cause"] == "attn.bwd" and all(f"attn/{w}/" in names for w in ("query", "key", "value")):
        return (
            "GSPMD all-reduces each of q, k and v's backward dots (3 partial sums) where Megatron's f adds "
            "them first and reduces once"
        )
    if row["cause"] == "optimizer" and all(name.startswith("optimizer/reduce_sum ") for name in row["ops"]):
        return (
            "optax.tree.norm under GSPMD: each gradient leaf's partial sum of squares is reduced, where "
            "shard_map adds the leaves first (one scalar per axis set)"
        )
    outside = sorted({n.split(" ")[0].split("/")[-2] for n in row["ops"] if not _in_block(n)})
    if row["cause"] == "zero3_gather.bwd" and row["bytes"] > row["theory_bytes"] and outside:
        return (
            f"GSPMD gathers a top-level param again for the backward pass ({', '.join(outside)}): not saved "
            "from forward"
        )
    if row["cause"] == "zero3_gather.fwd" and 0 < row["bytes"] < row["theory_bytes"]:
        return (
            "XLA moved loop-invariant gathers out of a loop (pp's ticks, the microbatches): each runs once "
            "a step, not once a pass, and the gathered params stay live through the forward pass"
        )
    if row["cause"] in ("attn.bwd", "mlp.bwd") and row["kind"] == "all-gather" and row["ratio"] == 2:
        return (
            "ZeRO-3's remat policy (shard_map_plan) re-gathers the sequence for the backward pass instead of "
            "saving the gathered activation, as Megatron-LM's sequence parallelism does: one more gather a "
            "region"
        )
    if (
        row["cause"] == "grad_reduce"
        and row["kind"] == "all-reduce"
        and {"[cp]", "[dp]"} <= {name.rsplit(" ", 1)[-1] for name in row["ops"]}
    ):
        return (
            "GSPMD reduces each gradient over cp and then again over dp (two all-reduces of it), where one "
            "over (dp, cp), as shard_map's, would do"
        )
    if row["cause"] == "cp_gather":
        return (
            "GSPMD gathers the sequence whole for the fused loss (its chunk loop runs along the sequence) "
            "and for the embedding lookup; shard_map keeps both split"
        )
    if not row["theory_bytes"]:
        return "not in theory"
    if not row["bytes"]:
        return "theory's op was not compiled"
    return ""
