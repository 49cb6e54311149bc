"""The textbook's collectives: what each strategy must move from the parallelism math alone.

theory.py writes down what our construction is meant to move (which params are read in fp32, where +sp's
reductions sit, how often a pipeline sends); matching it shows that two descriptions of our code agree.
This module does not read our layout or our code's choices: it takes the config's sizes, the mesh, the
batch and the papers' constructions, and gives each cause's minimum, so `--explain` can flag where our
construction moves more than the strategy needs.

The constructions, per device per step, bytes as result buffers (hlo.py's convention: algorithm factors
such as a ring's 2(n-1)/n belong to a cost model, not here); activations and gathered params in the
compute dtype, gradients in fp32; M microbatches, each of B/dp/M rows of L/cp positions:
- data parallelism (Li et al. 2020): one all-reduce of the fp32 gradients a step, after accumulation;
- ZeRO (Rajbhandari et al. 2020): stage 1 gathers the updated params once a step; stages 2 and 3 keep only
  a gradient shard, so each microbatch's gradient is reduce-scattered; stage 3 gathers every param for
  each microbatch's forward and again for its backward;
- Megatron-LM (Shoeybi et al. 2019): per block two all-reduces of B.L.D forward (after attention and the
  MLP) and two backward; the vocab-parallel embedding one forward, the head's f one backward, the
  vocab-parallel cross-entropy three fp32 all-reduces per position (max, sum of exponentials, target);
- Megatron-SP (Korthikanti et al. 2022): each all-reduce becomes an all-gather and a reduce-scatter, and
  the gradients of params tp does not split are all-reduced over tp once a step;
- GPipe (Huang et al. 2019): each microbatch's activations sent forward and its cotangents back, once;
- ring attention (Liu et al. 2023): per layer, cp - 1 passes of K and V forward and cp - 1 of their
  cotangents backward; all-gather context parallelism (Llama 3) gathers K and V and reduce-scatters their
  cotangents.
Simplification: the top-level params (embeddings, final LayerNorm, head) are counted on every pipeline
stage, and tied embeddings' cross-stage reduction is left out.
"""

from typing import Any

import jax.numpy as jnp

from shardgpt.model.config import ModelConfig

NO_FIGURE = {
    "loss": "a scalar pair (loss sum, token count): no textbook figure",
    "optimizer": "scalars of the global gradient norm: no textbook figure",
}


def param_counts(config: ModelConfig, tp: int, pp: int, ep: int = 1) -> tuple[int, int]:
    """(params one device holds under Megatron's split over tp, pp's split of the layers and ep's of the
    experts, the part of them tp does not split: LayerNorms, row-parallel biases, wpe, a router)."""
    d, f, v, b = config.n_embd, config.mlp_dim, config.padded_vocab_size, int(config.use_bias)
    layers = config.n_layer // pp
    experts = config.n_experts // ep if config.moe else 1  # an MoE's MLPs on this device
    split = 3 * d * d + 3 * d * b + d * d + experts * (d * f + f * b + f * d)  # q/k/v, out, up, down: tp
    whole = 2 * d * (1 + b) + d * b + experts * d * b  # two LayerNorms, out's and down's biases
    whole += d * config.n_experts if config.moe else 0  # the router
    top_split = v * d * (1 if config.tie_embeddings else 2)  # wte (vocab-parallel) and an untied head
    top_whole = config.block_size * d + d * (1 + b)  # wpe, ln_f
    held = layers * (split // tp + whole) + top_split // tp + top_whole
    return held, layers * whole + top_whole


def expected(
    config: ModelConfig,
    strategy: str,
    mesh_shape: dict[str, int],
    batch: int,
    seq: int,
    microbatches: int = 1,
    impl: str = "shard_map",
) -> dict[tuple[str, str], dict[str, Any]]:
    """{(cause, kind): {"bytes": int or None, "why": str}} per device per step; causes as
    shardgpt.analysis.attribution names them; None with the reason where no textbook figure exists."""
    size = lambda axis: mesh_shape.get(axis, 1)
    dp, tp, pp, cp, m = size("dp"), size("tp"), size("pp"), size("cp"), microbatches
    ep = size("ep")
    item = jnp.dtype(config.dtype).itemsize
    base, sp = strategy.split("+")[0], "+sp" in strategy
    layers, length = config.n_layer // pp, seq // cp
    act = batch // (dp * ep) // m * length * config.n_embd * item  # one microbatch's B.L.D on one device
    held, unsplit = param_counts(config, tp, pp, ep)
    out: dict = {}

    def add(cause, kind, nbytes, why):
        if nbytes:
            out[(cause, kind)] = {"bytes": nbytes, "why": why}

    if tp > 1 and not sp:
        for cause in ("attn.fwd", "attn.bwd", "mlp.fwd", "mlp.bwd"):
            add(cause, "all-reduce", m * layers * act, "Megatron: one all-reduce of B.L.D a block")
        add("embed", "all-reduce", m * act, "Megatron's vocab-parallel embedding")
        add("head", "all-reduce", m * act, "Megatron's f before the vocab-parallel head (backward)")
    elif tp > 1:
        for cause in ("attn.fwd", "attn.bwd", "mlp.fwd", "mlp.bwd"):
            add(cause, "all-gather", m * layers * act, "Megatron-SP: the sequence gathered before a block")
            add(cause, "reduce-scatter", m * layers * act // tp, "Megatron-SP: scattered after it")
        add("embed", "reduce-scatter", m * act // tp, "Megatron-SP's embedding: scattered forward")
        add("embed", "all-gather", m * act, "and gathered backward")
        add("head", "all-gather", m * act, "Megatron-SP's f before the head")
        add("head", "reduce-scatter", m * act // tp, "and its backward")
        add("grad_reduce", "all-reduce", unsplit * 4, "Megatron-SP: gradients tp does not split, summed")
    if config.moe and ep > 1:
        # Each token's top_k copies to their experts and back (GShard, Lepikhin et al. 2020), forward and
        # backward; a ring's (ep - 1) / ep of it crosses devices: a factor for the cost model, not here.
        moe = 2 * m * layers * act * config.moe_top_k
        add("moe.dispatch", "all-to-all", moe, "MoE: each token's top_k copies to their experts, both passes")
        add("moe.combine", "all-to-all", moe, "and the experts' outputs back")
    if tp > 1:
        ce = 3 * batch // (dp * ep) * length * 4
        add("cross_entropy", "all-reduce", ce, "vocab-parallel cross-entropy: 3 fp32 values a position")
    grads = held * 4
    if dp > 1 and base in ("zero2", "zero3"):
        add("grad_reduce", "reduce-scatter", m * grads // dp, "ZeRO-2/3: each microbatch's gradient")
        if cp * ep > 1:
            add("grad_reduce", "all-reduce", grads // dp, "summed over cp (or ep) too")
    elif dp * cp * ep > 1:
        add("grad_reduce", "all-reduce", grads, "data parallelism: the fp32 gradients, once a step")
    if dp > 1 and base == "zero3":
        add("zero3_gather.fwd", "all-gather", m * held * item, "ZeRO-3: every param before its forward")
        add("zero3_gather.bwd", "all-gather", m * held * item, "and again before its backward")
    elif dp > 1 and base in ("zero1", "zero2"):
        add("param_gather", "all-gather", held * item, "ZeRO-1/2: the updated params, once a step")
    if cp > 1:
        kv = batch // dp // m * length * (config.n_head // tp) * config.head_dim * item  # one of K, V
        if impl == "shard_map":
            ring = 2 * (cp - 1) * m * layers * 2 * kv
            add("ring_kv", "collective-permute", ring, "ring attention: cp - 1 passes of K, V each way")
        else:
            add("kv_gather", "all-gather", m * layers * 2 * kv * cp, "all-gather CP: K and V whole")
            add("kv_gather", "reduce-scatter", m * layers * 2 * kv, "and their cotangents scattered")
    if pp > 1:
        add("pp_send", "collective-permute", 2 * m * act, "GPipe: a microbatch's activations each way")
    for cause, why in NO_FIGURE.items():
        out[(cause, "all-reduce")] = {"bytes": None, "why": why}
    return out
