"""Where the bytes go: every compiled collective attributed to its cause, beside theory's bytes for it.

A collective's cause is read from what XLA kept of the program: the jax named scopes and module paths in
its op_name (`megatron_g`, `blocks/attn/out`, `zero3_gather`, `optimizer`...), whether it runs in the
backward pass (`transpose(`), and the mesh axes its device groups span. Every impl names the same places
(the model, the loss and the steps scope them), so its programs attribute alike. A tuple collective XLA
combined from several is split into its elements, each attributed by its own name; what no rule explains
is "unattributed", never dropped.

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
    "moe.dispatch": "MoE: routing slots all-to-all to their experts' devices, and the gradient back (ep)",
    "moe.combine": "MoE: the experts' outputs all-to-all back to their tokens, and the gradient (ep)",
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
    """The mesh axes an op's device groups (partition ids, in mesh order) vary along: it talks over them."""
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    varying = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.array(group), sizes)).T
        varying |= {names[i] for i in range(len(names)) if len(set(coords[:, i].tolist())) > 1}
    return tuple(a for a in names if a in varying)


class ParamShapes:
    """Which params an op's module path names, and the shapes a device holds of each: a collective under
    `blocks/mlp/up` whose result is up's kernel as one device holds it moves that param (or its gradient).

    `shapes` maps each param's path (("blocks", "mlp", "up", "kernel")) to every per-device shape it takes
    in the step (params, grads and compute layouts; one layer's and the stack's). Shapes compare as sorted
    dims without the 1s: XLA may move a result's dims (a kernel's gradient comes out transposed) or keep
    a summed one (a bias's gradient as (1, 1, D)). Plain data: no jax.
    """

    def __init__(self, shapes: dict[tuple[str, ...], set[tuple[int, ...]]]):
        self.by_module: dict[tuple[str, ...], list[set[tuple[int, ...]]]] = defaultdict(list)
        for path, options in shapes.items():
            self.by_module[tuple(path[:-1])].append({_key(dims) for dims in options})
        self.modules = {m[:i] for m in self.by_module for i in range(len(m) + 1)}

    def _module(self, op_name: str) -> tuple[str, ...] | None:
        """The longest module path of the params written contiguously in the op name (pp's stage runs
        `Block`, the stacked `blocks`); () for the model's top level (wte, wpe); None outside the model."""
        parts = ["blocks" if p == "Block" else p for p in re.split(r"[/()]", op_name) if p]
        best = () if "GPT" in parts else None
        for i in range(len(parts)):
            for j in range(len(parts), i, -1):
                if j - i > len(best or ()) and tuple(parts[i:j]) in self.modules:
                    best = tuple(parts[i:j])
                    break
        return best

    def names_param(self, op_name: str, dims: tuple[int, ...]) -> bool:
        """True where `dims` is a shape of a param of the op's module, or of n params of its child modules
        of one shape stacked along a new dim of size n (q, k and v's kernels read by one matmul)."""
        module = self._module(op_name)
        if module is None:
            return False
        if any(_key(dims) in o for o in self.by_module.get(module, ())):
            return True
        children = [o for m, opts in self.by_module.items() if m[:-1] == module for o in opts]
        for i, n in enumerate(dims):
            rest = _key(dims[:i] + dims[i + 1 :])
            if n > 1 and sum(rest in o for o in children) >= n:
                return True
        return False


def _key(dims) -> tuple[int, ...]:
    return tuple(sorted(d for d in dims if d != 1))


# Named scopes that state a cause, placed by the code that issues the collective (shard_map) or induces it
# (the model, the loss and the steps, under GSPMD); Megatron's are resolved by the block around them.
_CAUSE_SCOPES = {"loss_sum": "loss", "pp_send": "pp_send", "ring_kv_pass": "ring_kv"}
_CAUSE_SCOPES |= {scope: scope for scope in ("kv_gather", "cp_gather", "moe.dispatch", "moe.combine")}
_GRAD_SCOPES = {"grad_reduce", "grad_all_reduce", "grad_reduce_scatter"}
_MEGATRON_SCOPES = {"megatron_f", "megatron_g", "sp_all_gather", "sp_reduce_scatter"}
_EMBED_SCOPES = {"embed", "vocab_embed", "sp_vocab_embed"}
_CE_SCOPES = {"cross_entropy", "vocab_ce_max", "vocab_ce_sum"}
BY_NAME, BY_AXES = "name", "axes"  # how a cause was found


def by_name(op_name: str, kind: str, dims: tuple[int, ...] = (), params: ParamShapes | None = None):
    """The cause an op's name states (a cause scope, or a module path naming a param of the op's shape),
    or None. Never reads mesh axes: renaming them changes nothing here."""
    if not op_name:
        return None
    scopes, backward = _scopes(op_name), "transpose(" in op_name
    phase = "bwd" if backward else "fwd"
    if "optimizer" in scopes:  # the update: ZeRO-1/2 gather the new params, or the norm's reduction
        return "param_gather" if kind == "all-gather" else "optimizer"
    for scope, cause in _CAUSE_SCOPES.items():
        if scope in scopes:
            return cause
    if scopes & _GRAD_SCOPES:
        return "grad_reduce"
    if "zero3_gather" in scopes:  # ZeRO-3's gather; its transpose, the gradient's reduce-scatter
        return f"zero3_gather.{phase}" if kind == "all-gather" else "grad_reduce"
    if params is not None and params.names_param(op_name, dims):
        if kind == "all-gather":  # a param gathered where it is read (GSPMD's ZeRO-3)
            return f"zero3_gather.{phase}"
        if backward:  # a param's gradient summed over the devices holding parts of it
            return "grad_reduce"
    if scopes & _MEGATRON_SCOPES:
        for scope, block in (("attn", "attn"), ("mlp", "mlp"), ("moe", "mlp")):  # experts are MLPs
            if scope in scopes:
                return f"{block}.{phase}"
    if scopes & _CE_SCOPES:
        return "cross_entropy"
    if "head" in scopes:
        return "head"
    if scopes & _EMBED_SCOPES:
        return "embed"
    return None


def by_axes(op_name: str, kind: str, axes: tuple[str, ...]) -> str:
    """The cause guessed from the mesh axes an op spans and its phase (and a bare module path): what
    GSPMD's unnamed collectives fall back on; UNATTRIBUTED where nothing fits."""
    scopes, backward = _scopes(op_name), "transpose(" in op_name
    phase = "bwd" if backward else "fwd"
    if axes == ("dp",) and kind == "all-gather":
        # At the program's output (no op name), the new params taking their layout; else ZeRO-3's.
        return f"zero3_gather.{phase}" if op_name else "param_gather"
    if axes == ("cp",):
        if "attention" in scopes and (kind != "all-reduce" or not backward):
            return "kv_gather"
        if not backward and kind == "all-gather":
            return "cp_gather"
    if axes == ("tp",):
        for scope, cause in (("attn", f"attn.{phase}"), ("mlp", f"mlp.{phase}")):
            if scope in scopes:
                return cause
    if axes and set(axes) <= {"dp", "cp", "tp"} and backward and kind != "collective-permute":
        return "grad_reduce"  # GSPMD reduces each gradient where the backward makes it
    return UNATTRIBUTED


def classify(
    op_name: str,
    kind: str,
    axes: tuple[str, ...],
    dims: tuple[int, ...] = (),
    params: ParamShapes | None = None,
) -> tuple[str, str | None]:
    """(cause, BY_NAME or BY_AXES) of one collective (or one element of a combined one); (UNATTRIBUTED,
    None) when no rule fits."""
    cause = by_name(op_name, kind, dims, params)
    if cause is not None:
        return cause, BY_NAME
    cause = by_axes(op_name, kind, axes)
    return cause, (None if cause == UNATTRIBUTED else BY_AXES)


def compiled_by_cause(
    ops: list[hlo.CollectiveOp], mesh_shape: dict[str, int], params: ParamShapes | None = None
) -> dict:
    """{(cause, kind): {"count", "bytes", "bytes_by_name", "bytes_by_axes", "sliced_bytes", "ops",
    "dtypes", "hoisted_bytes"}} per device per step: each element of each op attributed by its own name
    (or, failing that, its axes); an op counts once per (cause, kind) it feeds, per execution. "ops" maps
    each element's op_name (after the jit(...) prefix) and [mesh axes] to the bytes it moved; "dtypes" the
    bytes by element type; "hoisted_bytes" those of ops jax traced in a loop body that XLA runs outside
    any loop (loop-invariant code motion)."""
    table: dict = {}
    for op in ops:
        axes = mesh_axes(op.groups, mesh_shape)
        seen = set()
        for part in op.parts or (hlo.Part(op.kind, op.op_name, op.bytes),):
            cause, how = classify(part.op_name, part.kind, axes, part.dims, params)
            key = (cause, _AS_THEORY.get(part.kind, part.kind))
            row = table.get(key) or table.setdefault(key, _empty_row())
            nbytes = part.bytes * op.executions
            row["bytes"] += nbytes
            if how:
                row[f"bytes_by_{how}"] += nbytes
            row["ops"][f"{_short(part.op_name)} [{','.join(axes) or '-'}]"] += nbytes
            row["dtypes"][part.dtype or "?"] += nbytes
            if part.kind == hlo.SLICED_ALL_REDUCE:
                row["sliced_bytes"] += nbytes
            if "while/body" in part.op_name and not op.loops:
                row["hoisted_bytes"] += nbytes
            if key not in seen:
                row["count"] += op.executions
                seen.add(key)
    return {key: row | {"ops": dict(row["ops"]), "dtypes": dict(row["dtypes"])} for key, row in table.items()}


def _empty_row() -> dict:
    zeros = dict.fromkeys(
        ("count", "bytes", "bytes_by_name", "bytes_by_axes", "sliced_bytes", "hoisted_bytes"), 0
    )
    return zeros | {"ops": defaultdict(int), "dtypes": defaultdict(int)}


def _in_block(op_name: str) -> bool:
    """True for an op of a transformer block (scanned `blocks/`, unrolled `block_i/`, pp's `Block/`, or from
    jax 0.11 the layer scan's own slicing, `while/body/`)."""
    return bool(re.search(r"(^|/)(blocks|block_\d+|Block|while/body)/", op_name))


def _short(op_name: str) -> str:
    """An op name without its jit(...)/shard_map/ prefix and while-loop plumbing."""
    name = re.sub(r"^jit\([^)]*\)/(shard_map/)?", "", op_name)
    # The scan body's wrapper: closed_call up to jax 0.10, eval_jaxpr from 0.11.
    name = name.replace("while/body/closed_call/", "").replace("while/body/eval_jaxpr/", "")
    return name or "(no op name: inserted by XLA)"


def _module_of(op: str) -> str:
    """The innermost scope of an --explain op entry ("GPT/ln_f/mul [dp]" -> "ln_f"); an op named after an
    argument (jax >= 0.11 names some gathers so: "state.params['wte']") is itself."""
    parts = op.split(" ")[0].split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def reconcile(
    compiled: dict, expected: dict, textbook: dict | None = None, platform: str | None = None
) -> list[dict[str, Any]]:
    """One row per (cause, kind) compiled, in theory or needed by the textbook, in CAUSES order: compiled
    and theory count and bytes (and how the compiled bytes were attributed: by name or by axes), the
    textbook's bytes (`textbook`: {(cause, kind): {"bytes": int or None, "why"}}; a row it lacks needs
    0), the ratios, the op names that moved the bytes, and a note where compiled bytes are off theory's
    by more than TOLERANCE: what the HLO shows, or "unexplained". `platform` ("cpu", "gpu"...): where
    the program was compiled."""
    textbook = textbook or {}
    needed = {key for key, row in textbook.items() if row["bytes"]}
    order = lambda key: (list(CAUSES).index(key[0]), key[1])
    keys = sorted(set(compiled) | set(expected) | needed, key=order)
    rows = []
    for cause, kind in keys:
        got = compiled.get((cause, kind)) or _empty_row()
        want = expected.get((cause, kind), {"count": 0, "bytes": 0, "dtypes": {}})
        book = textbook.get((cause, kind), {"bytes": 0, "why": "the strategy needs none of these"})
        row = {
            "cause": cause,
            "kind": kind,
            "count": got["count"],
            "bytes": got["bytes"],
            "bytes_by_name": got["bytes_by_name"],
            "bytes_by_axes": got["bytes_by_axes"],
            "sliced_bytes": got["sliced_bytes"],
            "theory_count": want["count"],
            "theory_bytes": want["bytes"],
            "ratio": got["bytes"] / want["bytes"] if want["bytes"] else None,
            "textbook_bytes": book["bytes"],
            "textbook_ratio": got["bytes"] / book["bytes"] if book["bytes"] else None,
            "textbook_note": book.get("why", ""),  # why the textbook has no figure, or what it counts
            "ops": dict(sorted(dict(got["ops"]).items(), key=lambda item: -item[1])),
            "dtypes": dict(got["dtypes"]),
        }
        evidence = {"hoisted_bytes": got["hoisted_bytes"], "theory_dtypes": want.get("dtypes", {})}
        rows.append(row | {"note": _note(row, evidence, platform)})
    return _across_kinds(rows)


def _across_kinds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A cause XLA compiled as other kinds than theory's (part of an all-reduce as a reduce-scatter) but
    with theory's bytes over all its kinds: each such row says so, in place of "unexplained"."""
    total = defaultdict(lambda: [0, 0])
    for row in rows:
        total[row["cause"]][0] += row["bytes"]
        total[row["cause"]][1] += row["theory_bytes"]
    for row in rows:
        got, want = total[row["cause"]]
        plain = row["note"].startswith("unexplained") or row["note"] in (
            "not in theory",
            "theory's op was not compiled",
        )
        if plain and want and abs(got / want - 1) <= TOLERANCE:
            row["note"] = (
                f"XLA split this cause between kinds otherwise than theory; over all its kinds it moves "
                f"{got:,} bytes, theory {want:,}"
            )
    return rows


def _note(row: dict, evidence: dict, platform: str | None) -> str:
    """Why compiled and theory differ, where the HLO shows it: op names and kinds, element types against
    theory's, ops moved out of their loop. Without such evidence: "unexplained"."""
    names = " ".join(row["ops"])
    if row["bytes"] == row["theory_bytes"]:
        return "" if row["count"] == row["theory_count"] else "the same bytes in another number of ops"
    if row["cause"] == UNATTRIBUTED:
        return "no named scope or rule explains these: their op names are listed by --explain"
    if not row["theory_bytes"]:
        return "not in theory"
    if not row["bytes"]:
        return "theory's op was not compiled"
    if row["sliced_bytes"]:
        share = row["sliced_bytes"] / row["bytes"]
        return (
            "XLA:CPU compiles this reduce-scatter as an all-reduce + dynamic-slice: bytes are the whole "
            f"all-reduce's, group size x the shard ({share:.0%} of these bytes)"
        )
    low_precision = {k: v for k, v in evidence["theory_dtypes"].items() if k in ("bf16", "f16")}
    widened = row["dtypes"].get("f32", 0) - evidence["theory_dtypes"].get("f32", 0)
    if platform == "cpu" and low_precision and not set(row["dtypes"]) & set(low_precision):
        if abs(widened - 2 * sum(low_precision.values())) <= TOLERANCE * row["bytes"]:
            return (
                f"its ops are f32 where theory moves {' and '.join(low_precision)}: XLA:CPU runs these "
                "collectives in fp32 (2x their bytes); GPUs and TPUs keep the compute dtype"
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
    outside = sorted({_module_of(n) for n in row["ops"] if not _in_block(n)})
    if row["cause"] == "zero3_gather.bwd" and row["bytes"] > row["theory_bytes"] and outside:
        return (
            f"GSPMD gathers a top-level param again for the backward pass ({', '.join(outside)}): not saved "
            "from forward"
        )
    if (
        row["cause"] == "zero3_gather.fwd"
        and row["bytes"] < row["theory_bytes"]
        and evidence["hoisted_bytes"]
    ):
        share = evidence["hoisted_bytes"] / row["bytes"]
        return (
            f"XLA moved loop-invariant gathers ({share:.0%} of these bytes) out of their loop (pp's ticks, "
            "the microbatches): each runs once a step, not once a pass, and the gathered params stay live "
            "through the forward pass"
        )
    if (
        row["cause"] in ("attn.bwd", "mlp.bwd")
        and row["kind"] == "all-gather"
        and row["ratio"] == 2
        and "sp_all_gather" in names
        and "checkpoint" in names
    ):
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
    whole = [w for w in ("head_cross_entropy", "embed") if w in names]
    if row["cause"] == "cp_gather" and whole:
        return (
            f"GSPMD gathers the sequence whole for {' and '.join(whole)} (the fused loss's chunk loop runs "
            "along the sequence; the lookup reads whole rows); shard_map keeps both split"
        )
    if abs(row["bytes"] / row["theory_bytes"] - 1) <= TOLERANCE:
        return ""
    return "unexplained: nothing in the HLO shows why (the op names are listed by --explain)"
