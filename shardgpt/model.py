"""The GPT (flax.linen, minGPT architecture); every param and key activation carries logical axis names.

Shape key, used in names throughout: B batch, L sequence length (queries), S key/cache length, D n_embd,
H heads, K head dim, F mlp width, V padded vocab, N layers.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from shardgpt.config import ModelConfig

# The closed vocabulary of logical axis names (DESIGN.md); sharding rules map these to mesh axes.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers")

BxLxD = ("batch", "length", "embed")
BxLxHxK = ("batch", "length", "heads", "kv")


def _normal(std: float, *names: str):
    """minGPT's N(0, std) init, with the param's logical axis names attached where it is created."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _zeros(*names: str):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _ones(*names: str):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class Dense(nn.Module):
    """x @ kernel (+ bias), contracting x's trailing `in_axes` dims; the kernel keeps every named dim."""

    features: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    std: float
    config: ModelConfig
    use_bias: bool | None = None  # None: the config's choice

    @nn.compact
    def __call__(self, x):
        n_in = len(self.in_axes)
        shape = x.shape[-n_in:] + self.features
        kernel = self.param("kernel", _normal(self.std, *self.in_axes, *self.out_axes), shape, jnp.float32)
        dtype = jnp.dtype(self.config.dtype)
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=n_in)
        if self.config.use_bias if self.use_bias is None else self.use_bias:
            y = y + self.param("bias", _zeros(*self.out_axes), self.features, jnp.float32).astype(dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm over `embed`, computed in fp32 whatever the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        d = x_BxLxD.shape[-1]
        x = x_BxLxD.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.config.ln_eps) * self.param("scale", _ones("embed"), (d,))
        if self.config.use_bias:
            y = y + self.param("bias", _zeros("embed"), (d,))
        return y.astype(self.config.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention; with a KV cache it writes this call's keys at `positions` first."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, cache):
        cfg = self.config
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # minGPT's scaled init of residual projections
        heads = functools.partial(Dense, (cfg.n_head, cfg.head_dim), ("embed",), ("heads", "kv"), 0.02, cfg)
        q_BxLxHxK = nn.with_logical_constraint(heads(name="query")(x_BxLxD), BxLxHxK)
        k_BxLxHxK = nn.with_logical_constraint(heads(name="key")(x_BxLxD), BxLxHxK)
        v_BxLxHxK = nn.with_logical_constraint(heads(name="value")(x_BxLxD), BxLxHxK)
        if cache is None:
            with jax.named_scope("attention"):
                out_BxLxHxK = jax.nn.dot_product_attention(
                    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True, implementation=cfg.attention
                )
        else:
            out_BxLxHxK, cache = _cached_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, positions_BxL, cache)
        out_BxLxHxK = nn.with_logical_constraint(out_BxLxHxK, BxLxHxK)
        proj = Dense((cfg.n_embd,), ("heads", "kv"), ("embed",), residual_std, cfg, name="out")
        return nn.with_logical_constraint(proj(out_BxLxHxK), BxLxD), cache


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
    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.config
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        h_BxLxF = Dense((cfg.mlp_dim,), ("embed",), ("mlp",), 0.02, cfg, name="up")(x_BxLxD)
        h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
        h_BxLxF = jax.nn.gelu(h_BxLxF, approximate=cfg.gelu_approximate)
        return Dense((cfg.n_embd,), ("mlp",), ("embed",), residual_std, cfg, name="down")(h_BxLxF)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, cache):
        cfg = self.config
        attn_BxLxD, cache = CausalSelfAttention(cfg, name="attn")(
            LayerNorm(cfg, name="ln_1")(x_BxLxD), positions_BxL, cache
        )
        x_BxLxD = x_BxLxD + attn_BxLxD
        x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(LayerNorm(cfg, name="ln_2")(x_BxLxD))
        return nn.with_logical_constraint(x_BxLxD, BxLxD), cache


class GPT(nn.Module):
    """tokens_BxL -> logits_BxLxV. With a KV cache (see `init_cache`) it also returns the updated cache."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL=None, cache=None):
        cfg = self.config
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        wte_VxD = self.param("wte", _normal(0.02, "vocab", "embed"), (cfg.padded_vocab_size, cfg.n_embd))
        wpe_LxD = self.param("wpe", _normal(0.02, "length", "embed"), (cfg.block_size, cfg.n_embd))
        x_BxLxD = (wte_VxD[tokens_BxL] + wpe_LxD[positions_BxL]).astype(cfg.dtype)
        x_BxLxD = nn.with_logical_constraint(x_BxLxD, BxLxD)

        block = nn.remat(Block, prevent_cse=not cfg.scan_layers) if cfg.remat else Block
        if cfg.scan_layers:
            # One traced block, params stacked on a leading `layers` axis: compile time flat in depth.
            blocks = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0),
                length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxLxD, cache = blocks(cfg, name="blocks")(x_BxLxD, positions_BxL, cache)
        else:
            layer_caches = []
            for i in range(cfg.n_layer):
                layer_cache = None if cache is None else jax.tree.map(lambda c, i=i: c[i], cache)
                x_BxLxD, layer_cache = block(cfg, name=f"block_{i}")(x_BxLxD, positions_BxL, layer_cache)
                layer_caches.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *c: jnp.stack(c), *layer_caches)

        x_BxLxD = LayerNorm(cfg, name="ln_f")(x_BxLxD)
        if cfg.tie_embeddings:
            logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, wte_VxD.astype(cfg.dtype))
        else:
            head = Dense((cfg.padded_vocab_size,), ("embed",), ("vocab",), 0.02, cfg, False, name="lm_head")
            logits_BxLxV = head(x_BxLxD)
        logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("batch", "length", "vocab"))
        if cfg.padded_vocab_size != cfg.vocab_size:
            # Padding ids get no probability: loss, sampling and users all see the unpadded distribution.
            real_V = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
            logits_BxLxV = jnp.where(real_V, logits_BxLxV, jnp.finfo(logits_BxLxV.dtype).min)
        return logits_BxLxV if cache is None else (logits_BxLxV, cache)


def cache_shape(config: ModelConfig, batch: int) -> tuple[int, ...]:
    """Shape of each of the cache's key and value arrays: (layers, batch, max_len, heads, kv)."""
    return (config.n_layer, batch, config.block_size, config.n_head, config.head_dim)


CACHE_AXES = ("layers", "batch", "length", "heads", "kv")


def init_cache(config: ModelConfig, batch: int):
    """An empty (keys, values) KV cache in the compute dtype."""
    zeros = jnp.zeros(cache_shape(config, batch), config.dtype)
    return zeros, zeros
