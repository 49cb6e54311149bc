"""The numbers experiments report: collectives read from compiled HLO, FLOPs and MFU, bytes per device.

Practice is read from what XLA really compiled; theory (textbook collectives, the ZeRO paper's memory) is
computed beside it so a table can show both.
"""

import math
import re
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp

from shardgpt.config import ModelConfig
from shardgpt.sharding import EMBED_ON_DP_FROM_STAGE, zero_stage

# Collectives in post-partitioning HLO (`jitted.lower(*args).compile().as_text()`).

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([^\]]*)\]")  # f32[16,4], bf16[], f8e4m3fn[8]
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->.*)?\{$")  # computation header line
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_CALLS = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation|branch_computations|"
    r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_METADATA = re.compile(r"metadata=\{[^}]*\}")  # op names like "while/body/..." are not calls
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string; tuples sum their elements, tokens and opaque shapes count 0."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        for dim in filter(None, dims.replace("<=", "").split(",")):
            size *= int(dim)
        total += size
    return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
    """Split an instruction's right-hand side into (result shape, text after it)."""
    rest = re.sub(r"/\*.*?\*/", "", rest)  # tuple index comments: /*index=5*/
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += ch in "({"
        depth -= ch in ")}"
        if depth == 0:
            return rest[: i + 1], rest[i + 1 :].lstrip()
    return rest, ""


def _tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape "(a, (b, c), d)" -> ["a", "(b, c)", "d"]."""
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape[1:-1], start=1):
        depth += ch in "({"
        depth -= ch in ")}"
        if ch == "," and depth == 0:
            parts.append(shape[start:i].strip())
            start = i + 1
    return parts + [shape[start:-1].strip()]


def _result_bytes(kind: str, shape: str, is_start: bool) -> int:
    """Bytes of the collective's result buffer.

    Async starts other than all-reduce-start return (operands, result, context...) tuples, e.g.
    `(f32[2], f32[16]) all-gather-start`, `((f32[8]), f32[1]) reduce-scatter-start`,
    `(f32[4], f32[4], u32[], u32[]) collective-permute-start`: the result is element 1.
    """
    if is_start and kind != "all-reduce" and shape.startswith("("):
        return _shape_bytes(_tuple_elements(shape)[1])
    return _shape_bytes(shape)


def _parse(hlo_text: str) -> tuple[str | None, dict[str, list[str]]]:
    """(entry name, {computation name: its instruction right-hand sides})."""
    entry, comps, current = None, {}, None
    for line in hlo_text.splitlines():
        if (header := _HEADER.match(line)) and not line[0].isspace():
            current = comps.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (instr := _INSTR.match(line)):
            current.append(instr.group(1))
    return entry, comps


def collectives(hlo_text: str, per_execution: bool = True) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} for every collective kind, zeros included, in one compiled program.

    Bytes are each op's result buffer per device (all-reduce: the reduced buffer; all-gather: the gathered
    size; reduce-scatter: the scattered shard). An async start/done pair counts once (at the start).
    Ops are found by following calls from ENTRY. A while body appears once in the text however often it
    runs: `per_execution=True` multiplies it by XLA's `known_trip_count` (present on CPU/GPU since at least
    jax 0.10; a loop without one counts once), so an nn.scan over 12 layers counts its collectives 12x:
    per device per call of the program. `per_execution=False` gives the static count, one per op.
    Both branches of a conditional are counted.
    """
    entry, comps = _parse(hlo_text)
    memo: dict[str, dict[str, list[int]]] = {}

    def visit(name: str) -> dict[str, list[int]]:
        if name in memo:
            return memo[name]
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for rhs in comps.get(name, ()):
            shape, tail = _split_shape(rhs)
            opcode = tail.partition("(")[0].strip()
            base = opcode.removesuffix("-start")
            if base in KINDS:  # the start carries the result; its wrapped computation is not followed
                totals[base][0] += 1
                totals[base][1] += _result_bytes(base, shape, opcode.endswith("-start"))
                continue
            if opcode in ("async-update", "async-done"):  # the async-start already followed the callee
                continue
            trips = _TRIP_COUNT.search(tail) if opcode == "while" and per_execution else None
            for attr, callees in _CALLS.findall(_METADATA.sub("", tail)):
                times = int(trips.group(1)) if trips and attr == "body" else 1
                for callee in re.findall(r"[\w.\-]+", callees.replace("%", "")):
                    for kind, (count, nbytes) in visit(callee).items():
                        totals[kind][0] += times * count
                        totals[kind][1] += times * nbytes
        memo[name] = totals
        return totals

    found = visit(entry) if entry else {}
    return {kind: dict(zip(("count", "bytes"), found.get(kind, (0, 0)), strict=True)) for kind in KINDS}


# FLOPs and MFU: analytic, since XLA's cost_analysis() FLOPs are unreliable across backends.

# Dense bf16 datasheet peaks (no sparsity) per chip, matched by substring of jax's `device.device_kind`,
# lowercased; first match wins, so the more specific names come first.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM
    ("h200", 989e12),
    ("a100", 312e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("tpu v5", 459e12),  # TPU v5p reports "TPU v5"
    ("v6 lite", 918e12),  # TPU v6e (Trillium)
    ("v6e", 918e12),
    ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Datasheet bf16 FLOP/s of one chip of this kind; None for CPUs and unknown kinds."""
    kind = device_kind.lower()
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu).

    N counts every parameter except the token and position embeddings: the blocks (attention, MLP,
    LayerNorms, biases), the final LayerNorm and the lm_head (n_embd x vocab_size, unpadded vocab), which
    is counted even when tied to the embedding, since its matmul is real compute. 12·L·H·Q·T is attention's
    QK^T and AV (forward 2x, backward 4x), counted for the full T x T scores as the paper does (no causal
    discount).
    """
    n = config.n_params(include_embeddings=False)
    if config.tie_embeddings:  # n_params leaves a tied head out; its matmul still runs
        n += config.n_embd * config.vocab_size
    attention = 12 * config.n_layer * config.n_head * config.head_dim * seq_len
    return float(6 * n + attention)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' summed peak; None if peak unknown."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


def bytes_per_device(tree: Any) -> int:
    """Max over devices of the bytes that device holds of the tree's jax.Array leaves (addressable shards).

    A replicated array counts in full on every device, a sharded one only its shard; other leaves count 0.
    """
    per_device: dict[Any, int] = defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            for shard in leaf.addressable_shards:
                per_device[shard.device] += shard.data.nbytes
    return max(per_device.values(), default=0)


def shard_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree (arrays or ShapeDtypeStructs) laid out by `shardings`, from the
    layout alone: each leaf's shard shape x itemsize. Derived, not measured: nothing need exist."""
    leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
    return sum(math.prod(where.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x, where in leaves)


def state_bytes(state: Any, shardings: Any) -> dict[str, int]:
    """Per-device bytes of a TrainState's params, grads and optimizer state (train.StateShardings), from the
    layout: exact for what the rules place, with nothing allocated."""
    return {
        "params_bytes_per_device": shard_bytes(state.params, shardings.state.params),
        "grads_bytes_per_device": shard_bytes(state.params, shardings.grads),
        "opt_state_bytes_per_device": shard_bytes(state.opt_state, shardings.state.opt_state),
    }


def device_peak_bytes(device: Any) -> int | None:
    """The live device's peak bytes in use so far (memory_stats()); None where the backend has none (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # some backends raise rather than return None
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def _memory_analysis(compiled: Any) -> Any:
    try:
        return compiled.memory_analysis()
    except Exception:  # some backends raise rather than return None
        return None


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """Bytes per device of a compiled program, from XLA's memory_analysis(); None where unavailable.

    {"argument_bytes", "output_bytes", "alias_bytes" (outputs written into donated arguments),
    "temp_bytes" (XLA's temporaries: gradients, activations, workspaces), "total_bytes" (arguments +
    outputs - aliased + temporaries: all live at once, an upper bound on the peak)}. Compiling is enough:
    lower with jax.ShapeDtypeStruct inputs (sharding= set) and nothing is allocated.
    """
    stats = _memory_analysis(compiled)
    if stats is None:
        return None
    field = lambda name: int(getattr(stats, f"{name}_size_in_bytes", None) or 0)
    memory = {f"{name}_bytes": field(name) for name in ("argument", "output", "alias", "temp")}
    memory["total_bytes"] = (
        memory["argument_bytes"] + memory["output_bytes"] - memory["alias_bytes"] + memory["temp_bytes"]
    )
    return memory


def peak_bytes(compiled: Any) -> int | None:
    """Peak device memory of a compiled program from XLA's memory_analysis(); None where unavailable.

    Uses `peak_memory_in_bytes` where it is consistent, else compiled_memory's total (everything live at
    once, an upper bound): on CPU (jax 0.10) the peak field leaves temporaries out.
    """
    memory = compiled_memory(compiled)
    if memory is None:
        return None
    peak = getattr(_memory_analysis(compiled), "peak_memory_in_bytes", None)
    if peak and peak >= memory["temp_bytes"]:
        return int(peak)
    return memory["total_bytes"] or None


# Theory beside practice.

# ZeRO paper (Rajbhandari et al. 2020): stage 1 shards the optimizer state over dp, stage 2 also the
# gradients, stage 3 also the parameters.


# Per ZeRO stage on dp; {whole} is a device's (1/tp) share of the params, {shard} that share / dp.
_TEXTBOOK = (
    "dp: all-reduce of the gradients ({whole})",
    "zero1: all-reduce of the gradients ({whole}; the ZeRO paper reduce-scatters them) "
    "+ all-gather of the updated params ({whole})",
    "zero2: reduce-scatter of the gradients ({shard}) + all-gather of the updated params ({whole})",
    "zero3: all-gather of the params in forward and in backward (2 x {whole}) "
    "+ reduce-scatter of the gradients ({shard})",
)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def expected_collectives(
    strategy: str, mesh_shape: dict[str, int], param_bytes: int, activation_bytes: int = 0, n_layer: int = 0
) -> str:
    """The textbook collectives of one training step, as one line; sizes are result buffers per device.

    `param_bytes`: the whole model's parameter bytes; `activation_bytes`: one layer's output on one device
    (local batch x seq x n_embd x dtype bytes). Ring traffic per device is about 2(n-1)/n x the buffer for
    an all-reduce and (n-1)/n x the larger side for a gather or scatter.
    """
    stage = zero_stage(strategy)
    dp, tp = mesh_shape.get("dp", 1), mesh_shape.get("tp", 1)
    local = param_bytes / tp  # each device holds 1/tp of every tensor-parallel weight
    parts = [_TEXTBOOK[stage].format(whole=_mb(local), shard=_mb(local / dp))] if dp > 1 else []
    if tp > 1:
        size = f" of {_mb(activation_bytes)}" if activation_bytes else ""
        total = f" ({4 * n_layer} in all)" if n_layer else ""
        parts.append(f"megatron: 2 all-reduces of activations{size} per layer forward + 2 backward{total}")
    return "; ".join(parts) or "no collectives (one device)"


def zero_expected_bytes(
    params_bytes_total: int,
    opt_state_bytes_total: int,
    grads_bytes_total: int,
    strategy: str,
    dp: int,
    tp: int,
) -> dict[str, int]:
    """The ZeRO paper's idealised bytes per device: every state / tp, and / dp where the stage shards it.

    Idealised: our rule tables shard only heads/mlp/vocab over tp (LayerNorms and the embed-only biases are
    replicated) and only the `embed` dim over dp, so measured figures sit somewhat above these.
    """
    stage = zero_stage(strategy)
    totals = {"params": params_bytes_total, "grads": grads_bytes_total, "opt_state": opt_state_bytes_total}
    return {
        f"{name}_bytes_per_device": total // (tp * (dp if stage >= EMBED_ON_DP_FROM_STAGE[name] else 1))
        for name, total in totals.items()
    }
