"""The GPT (flax.linen, minGPT architecture); every param and key activation carries logical axis names.

Shape key, used in names throughout: B batch, L sequence length (queries), S key/cache length, D n_embd,
H heads, K head dim, F mlp width, V padded vocab, N layers.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from shardgpt.model.config import ModelConfig
from shardgpt.model.moe import STATS, MoE
from shardgpt.model.plan import GLOBAL_VIEW, Plan, megatron_scope

# The closed vocabulary of logical axis names (DESIGN.md); sharding rules map these to mesh axes.
LOGICAL_AXES = (
    "batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers", "expert", "moe_groups", "route"
)  # fmt: skip

BxL = ("batch", "length")
BxLxD = ("batch", "length", "embed")
_LETTERS = "abcdefghijklmn"  # einsum subscripts, enough for any Dense
BxLxHxK = ("batch", "length", "heads", "kv")


def mask_padded_vocab(logits_BxLxV, vocab_size: int, plan: Plan):
    """Padding ids (past `vocab_size`) get the lowest logit: no probability for the loss, for sampling or
    for users. `plan.vocab_ids` gives this device's ids where the vocab is split."""
    v = logits_BxLxV.shape[-1]
    if plan.global_size(v, "vocab") == vocab_size:  # no padding: nothing to mask
        return logits_BxLxV
    real_V = plan.vocab_ids(v) < vocab_size
    return jnp.where(real_V, logits_BxLxV, jnp.finfo(logits_BxLxV.dtype).min)


def _param(module: nn.Module, name: str, init, shape: tuple[int, ...], names: tuple[str, ...], dtype=None):
    """A float32 param with its logical axis names attached where it is created, read through the
    module's plan as `dtype` (None: fp32)."""
    return module.plan.param(module, name, init, shape, names, dtype)


_normal = nn.initializers.normal  # minGPT's N(0, std) init
_zeros, _ones = nn.initializers.zeros_init(), nn.initializers.ones_init()


class Dense(nn.Module):
    """x @ kernel (+ bias), contracting x's trailing `in_axes` dims; the kernel keeps every named dim."""

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    std: float
    config: ModelConfig
    plan: Plan  # required on every submodule: one built without its model's plan would compute unplaced
    use_bias: bool | None = None  # None: the config's choice

    @nn.compact
    def __call__(self, x, weights_only: bool = False):
        """y = x @ kernel (+ bias); with `weights_only`, (kernel, bias or None) as read, for a caller that
        fuses several projections into one matmul."""
        plan, n_in = self.plan, len(self.in_axes)
        features = plan.compute_shape(self.features, self.out_axes)
        names = (*self.in_axes, *self.out_axes)
        dtype = jnp.dtype(self.config.dtype)
        # Read in the compute dtype: a weight gathered over dp (ZeRO-3) is cast as a shard, then gathered.
        kernel = _param(self, "kernel", _normal(self.std), x.shape[-n_in:] + features, names, dtype)
        bias = None
        if self.config.use_bias if self.use_bias is None else self.use_bias:
            bias = _param(self, "bias", _zeros, features, self.out_axes, dtype)
        if weights_only:
            return kernel, bias
        # Row-parallel (contracting a split dim) sums the shards' partial products before the bias.
        lead = x.ndim - n_in  # x's leading dims: (batch, length)
        x_in, k_out = _LETTERS[lead : lead + n_in], _LETTERS[lead + n_in : lead + n_in + len(features)]
        subscripts = f"{_LETTERS[:lead]}{x_in},{x_in}{k_out}->{_LETTERS[:lead]}{k_out}"
        names = (*BxL[:lead], *(None,) * (lead - len(BxL)), *self.out_axes)
        with megatron_scope(self.in_axes, self.out_axes):
            y = plan.reduce_from_shards(plan.einsum(subscripts, x.astype(dtype), kernel, names), self.in_axes)
        return y if bias is None else y + bias


class LayerNorm(nn.Module):
    """LayerNorm over `embed`, computed in fp32 whatever the compute dtype."""

    config: ModelConfig
    plan: Plan

    @nn.compact
    def __call__(self, x_BxLxD):
        d = x_BxLxD.shape[-1]
        x = x_BxLxD.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        scale = _param(self, "scale", _ones, (d,), ("embed",))
        y = (x - mean) * jax.lax.rsqrt(var + self.config.ln_eps) * scale
        if self.config.use_bias:
            y = y + _param(self, "bias", _zeros, (d,), ("embed",))
        return y.astype(self.config.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; with a KV cache it writes this call's keys at `positions` first."""

    config: ModelConfig
    plan: Plan

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, cache):
        cfg = self.config
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # minGPT's scaled init of residual projections
        plan = self.plan
        heads = functools.partial(
            Dense, (cfg.n_head, cfg.head_dim), ("embed",), ("heads", "kv"), 0.02, cfg, plan=plan
        )
        x_BxLxD = plan.copy_to_shards(x_BxLxD)  # once for q, k and v: one backward all-reduce
        # q, k and v in one matmul, so x's gradient is one dot's: GSPMD reduces a tp-split x's gradient
        # once, not three partial sums one by one (3x Megatron's f bytes: shardgpt.analysis.attribution).
        weights = [heads(name=name)(x_BxLxD, weights_only=True) for name in ("query", "key", "value")]
        kernel_Dx3xHxK = jnp.stack([kernel for kernel, _ in weights], axis=1)
        with megatron_scope(("embed",), ("heads", "kv")):
            qkv_BxLx3xHxK = jnp.tensordot(x_BxLxD.astype(cfg.dtype), kernel_Dx3xHxK, 1)
        if cfg.use_bias:
            qkv_BxLx3xHxK = qkv_BxLx3xHxK + jnp.stack([bias for _, bias in weights])
        q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (plan.constrain(qkv_BxLx3xHxK[:, :, i], BxLxHxK) for i in range(3))
        if cache is None:
            with jax.named_scope("attention"):
                out_BxLxHxK = plan.attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, cfg.attention)
        else:
            out_BxLxHxK, cache = _cached_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL, cache)
        out_BxLxHxK = plan.constrain(out_BxLxHxK, BxLxHxK)
        proj = Dense((cfg.n_embd,), ("heads", "kv"), ("embed",), residual_std, cfg, plan=plan, name="out")
        return plan.constrain(proj(out_BxLxHxK), BxLxD), cache


def _cached_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL, cache):
    """Write this call's keys/values into the fixed-shape cache at each row's positions, then attend to
    every cached position at or before the query's (later slots hold stale or padding entries)."""
    k_BxSxHxK, v_BxSxHxK = cache
    start_B = positions_BxL[:, 0]

    def write(buffer_SxHxK, new_LxHxK, start):
        return jax.lax.dynamic_update_slice(buffer_SxHxK, new_LxHxK.astype(buffer_SxHxK.dtype), (start, 0, 0))

    k_BxSxHxK = jax.vmap(write)(k_BxSxHxK, k_BxLxHxK, start_B)
    v_BxSxHxK = jax.vmap(write)(v_BxSxHxK, v_BxLxHxK, start_B)
    slots_S = jnp.arange(k_BxSxHxK.shape[1])
    mask_Bx1xLxS = (slots_S[None, None, :] <= positions_BxL[:, :, None])[:, None]
    with jax.named_scope("cached_attention"):
        out_BxLxHxK = jax.nn.dot_product_attention(
            q_BxLxHxK, k_BxSxHxK.astype(q_BxLxHxK.dtype), v_BxSxHxK.astype(q_BxLxHxK.dtype), mask=mask_Bx1xLxS
        )
    return out_BxLxHxK, (k_BxSxHxK, v_BxSxHxK)


class MLP(nn.Module):
    """Column-parallel up-projection, GELU, row-parallel down-projection (minGPT's 4x width)."""

    config: ModelConfig
    plan: Plan

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.config
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        plan = self.plan
        x_BxLxD = plan.copy_to_shards(x_BxLxD)
        h_BxLxF = Dense((cfg.mlp_dim,), ("embed",), ("mlp",), 0.02, cfg, plan=plan, name="up")(x_BxLxD)
        h_BxLxF = plan.constrain(h_BxLxF, ("batch", "length", "mlp"))
        h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=cfg.gelu_approximate)
        down = Dense((cfg.n_embd,), ("mlp",), ("embed",), residual_std, cfg, plan=plan, name="down")
        return down(h_BxLxF)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (a mixture of experts' where
    config.n_experts > 0)."""

    config: ModelConfig
    plan: Plan

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, cache):
        cfg, plan = self.config, self.plan
        attn_BxLxD, cache = CausalSelfAttention(cfg, plan, name="attn")(
            LayerNorm(cfg, plan, name="ln_1")(x_BxLxD), positions_BxL, cache
        )
        x_BxLxD = x_BxLxD + attn_BxLxD
        h_BxLxD = LayerNorm(cfg, plan, name="ln_2")(x_BxLxD)
        if cfg.moe:
            x_BxLxD = x_BxLxD + MoE(cfg, plan, name="moe")(h_BxLxD, decoding=cache is not None)
        else:
            x_BxLxD = x_BxLxD + MLP(cfg, plan, name="mlp")(h_BxLxD)
        return plan.constrain(x_BxLxD, BxLxD), cache


class GPT(nn.Module):
    """tokens_BxL -> logits_BxLxV. With a KV cache (see `init_cache`) it also returns the updated cache.

    `plan` says how it is laid out over devices (the base Plan: one device, no mesh). `logits_at_BxM`
    (indices into L) applies the head only at those positions: logits_BxMxV. With `head=False` it returns
    the final LayerNorm's output and the head's weight as read, (x_BxLxD, head_DxV), for a loss that
    applies the head itself (shardgpt.training.loss).
    """

    config: ModelConfig
    plan: Plan = GLOBAL_VIEW

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, cache=None, logits_at_BxM=None, head: bool = True):
        cfg, plan = self.config, self.plan
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        vocab_embed, length_embed = ("vocab", "embed"), ("length", "embed")
        wte_shape = plan.compute_shape((cfg.padded_vocab_size, cfg.n_embd), vocab_embed)
        wte_VxD = _param(self, "wte", _normal(0.02), wte_shape, vocab_embed)
        wpe_shape = plan.compute_shape((cfg.block_size, cfg.n_embd), length_embed)
        wpe_LxD = _param(self, "wpe", _normal(0.02), wpe_shape, length_embed)
        with jax.named_scope("embed"):  # scopes name each collective's cause (shardgpt.analysis.attribution)
            # The tables in their compute layout (embed whole: ZeRO-3 gathers them here), else GSPMD splits
            # the lookups over the tables' dp-sharded embed dim and gathers the activations instead.
            wte_VxD, wpe_LxD = plan.constrain(wte_VxD, vocab_embed), plan.constrain(wpe_LxD, length_embed)
            # This device's positions first (+sp, cp): wpe's gradient, not the lookup's, is then summed.
            pos_BxLxD = plan.lookup(wpe_LxD, plan.split_length(positions_BxL), BxLxD)
            x_BxLxD = (plan.embed(wte_VxD, tokens_BxL) + pos_BxLxD).astype(cfg.dtype)
            x_BxLxD = plan.constrain(x_BxLxD, BxLxD)

        block = Block
        if cfg.remat or plan.remat_policy is not None:
            policy = None if cfg.remat else plan.remat_policy  # None: recompute all of the block
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers, policy=policy)
        if plan.pipelined and cache is None:  # pp: this device's stage of the stacked layers (pipeline.py)
            x_BxLxD = plan.run_blocks(
                Block(cfg, plan, parent=None), self.variables["params"]["blocks"], x_BxLxD, cfg.remat
            )
        elif cfg.scan_layers:
            # One traced block, params stacked on a leading `layers` axis: compile time flat in depth.
            blocks = nn.scan(
                block,
                variable_axes={"params": 0, STATS: 0},  # an MoE's statistics per layer
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, cache = blocks(cfg, plan, name="blocks")(x_BxLxD, positions_BxL, cache)
        else:
            layer_caches = []
            for i in range(cfg.n_layer):
                layer_cache = None if cache is None else cache[i]
                x_BxLxD, layer_cache = block(cfg, plan, name=f"block_{i}")(
                    x_BxLxD, positions_BxL, layer_cache
                )
                layer_caches.append(layer_cache)
            cache = None if cache is None else tuple(layer_caches)

        if logits_at_BxM is not None:  # e.g. a prefill needs only each prompt's last position
            x_BxLxD = jnp.take_along_axis(x_BxLxD, logits_at_BxM[:, :, None], axis=1)
        x_BxLxD = LayerNorm(cfg, plan, name="ln_f")(x_BxLxD)
        with jax.named_scope("head"):
            x_BxLxD = plan.copy_to_shards(x_BxLxD)
            if cfg.tie_embeddings:
                head_DxV = wte_VxD.T.astype(cfg.dtype)
            else:
                proj = Dense(
                    (cfg.padded_vocab_size,), ("embed",), ("vocab",), 0.02, cfg, plan, False, name="lm_head"
                )
                head_DxV, _ = proj(x_BxLxD, weights_only=True)
            if not head:
                return (x_BxLxD, head_DxV) if cache is None else ((x_BxLxD, head_DxV), cache)
            logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD.astype(cfg.dtype), head_DxV)
            logits_BxLxV = plan.constrain(logits_BxLxV, ("batch", "length", "vocab"))
        logits_BxLxV = mask_padded_vocab(logits_BxLxV, cfg.vocab_size, plan)
        return logits_BxLxV if cache is None else (logits_BxLxV, cache)


def cache_shape(config: ModelConfig, batch: int) -> tuple[int, ...]:
    """Shape of each of the cache's key and value arrays: (layers, batch, max_len, heads, kv)."""
    return (config.n_layer, batch, config.block_size, config.n_head, config.head_dim)


CACHE_AXES = ("layers", "batch", "length", "heads", "kv")


def init_cache(config: ModelConfig, batch: int):
    """An empty KV cache in the compute dtype, laid out for the model's layer loop.

    Scanned: one (keys, values) pair stacked over layers (CACHE_AXES), which nn.scan slices and restacks
    in place. Unrolled: a tuple of per-layer (keys, values) pairs (CACHE_AXES[1:]), so a decode step never
    restacks (copies) the whole cache.
    """
    shape = cache_shape(config, batch)
    if config.scan_layers:
        zeros = jnp.zeros(shape, config.dtype)
        return zeros, zeros
    layer = jnp.zeros(shape[1:], config.dtype)
    return tuple((layer, layer) for _ in range(config.n_layer))


def unstack_layers(params, n_layer: int):
    """Scanned params (each layer's stacked under "blocks") -> the unrolled layout ("block_0", ...)."""
    unrolled = {name: value for name, value in params.items() if name != "blocks"}
    for i in range(n_layer):
        unrolled[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["blocks"])
    return unrolled
