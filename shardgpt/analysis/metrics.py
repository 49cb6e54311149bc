"""The numbers experiments report: collectives read from compiled HLO, FLOPs and MFU, bytes per device.

Practice is read from what XLA really compiled; theory (textbook collectives, the ZeRO paper's memory) is
computed beside it so a table can show both.
"""

import math
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp

from shardgpt.analysis.hlo import KINDS, CollectiveOp, collective_ops, collectives  # noqa: F401  (re-exported)
from shardgpt.model.config import ModelConfig
from shardgpt.parallel.sharding import EMBED_ON_DP_FROM_STAGE, zero_stage

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
    n = config.n_params(include_embeddings=False, active=True)  # an MoE: the experts a token runs
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


def zero_expected_bytes(
    params_bytes_total: int,
    opt_state_bytes_total: int,
    grads_bytes_total: int,
    strategy: str,
    dp: int,
    tp: int,
    pp: int = 1,
    ep: int = 1,
    expert_share: float = 0.0,
) -> dict[str, int]:
    """The ZeRO paper's idealised bytes per device: every state / (tp x pp), and / dp where the stage
    shards it; the `expert_share` of it that is an MoE's experts also / ep.

    Idealised: our rule tables shard only heads/mlp/vocab over tp (LayerNorms and the embed-only biases are
    replicated), only the `embed` dim over dp, and only the stacked layers over pp (each stage holds the
    embeddings and the head whole), so measured figures sit somewhat above these.
    """
    stage = zero_stage(strategy)
    totals = {"params": params_bytes_total, "grads": grads_bytes_total, "opt_state": opt_state_bytes_total}
    spread = 1 - expert_share + expert_share / ep  # what is left on a device of a state ep splits in part
    return {
        f"{name}_bytes_per_device": int(
            total * spread // (tp * pp * (dp if stage >= EMBED_ON_DP_FROM_STAGE[name] else 1))
        )
        for name, total in totals.items()
    }
