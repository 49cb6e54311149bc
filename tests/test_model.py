import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardgpt.model import config
from shardgpt.model.gpt import GPT

TOKENS = np.array([[1, 5, 2, 7, 3, 0, 4, 6], [6, 6, 1, 0, 2, 3, 3, 5]], np.int32)


def _init(cfg, seed=0):
    return nn.unbox(jax.jit(GPT(cfg).init)(jax.random.key(seed), TOKENS)["params"])


def _apply(cfg, params, tokens=TOKENS):
    return jax.jit(GPT(cfg).apply)({"params": params}, tokens)


def test_presets_and_overrides():
    assert config.preset("gpt2").n_params() == 124_439_808  # GPT-2 small: its head is tied to wte
    assert config.preset("gpt2", tie_embeddings=False).n_params() == 124_439_808 + 768 * 50257
    mini = config.preset("gpt-mini", vocab_size=3, block_size="11")
    assert (mini.n_layer, mini.n_head, mini.n_embd, mini.block_size) == (6, 6, 192, 11)
    assert config.preset("gpt2").padded_vocab_size == 50304
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'; choose one of gpt-pico"):
        config.preset("gpt5")
    with pytest.raises(ValueError, match="unknown model field 'n_layers'"):
        config.preset("gpt-pico", n_layers=2)
    with pytest.raises(ValueError, match="takes a int, got 'two'"):
        config.preset("gpt-pico", n_layer="two")
    with pytest.raises(ValueError, match="not divisible by n_head"):
        config.preset("gpt-pico", n_embd=60)
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        config.preset("gpt-pico", attention="flash")


def test_mingpt_init_scales_residual_projections():
    cfg = config.preset("gpt-micro", scan_layers=False, vocab_size=65, block_size=8)
    params = _init(cfg)
    block = params["block_0"]
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for kernel, std in [
        (block["attn"]["query"]["kernel"], 0.02),
        (block["mlp"]["up"]["kernel"], 0.02),
        (params["wte"], 0.02),
        (block["attn"]["out"]["kernel"], residual_std),
        (block["mlp"]["down"]["kernel"], residual_std),
    ]:
        assert abs(float(np.std(kernel)) - std) < 0.05 * std
    assert not np.any(block["mlp"]["up"]["bias"]) and np.all(block["ln_1"]["scale"] == 1)
    assert block["attn"]["query"]["kernel"].shape == (cfg.n_embd, cfg.n_head, cfg.head_dim)
    assert block["attn"]["out"]["kernel"].shape == (cfg.n_head, cfg.head_dim, cfg.n_embd)


def test_causality_by_gradient():
    """The loss at position t has zero gradient w.r.t. every later position's input (via wpe rows)."""
    cfg = config.preset("gpt-pico", vocab_size=8, block_size=8)
    model, params = GPT(cfg), _init(cfg)

    def loss_per_position(wpe_LxD):
        logits_BxLxV = model.apply({"params": {**params, "wpe": wpe_LxD}}, TOKENS)
        return jax.nn.log_softmax(logits_BxLxV)[:, :, 1].sum(0)

    jacobian_LxLxD = jax.jit(jax.jacrev(loss_per_position))(params["wpe"])
    influence_LxL = np.abs(np.asarray(jacobian_LxLxD)).sum(-1)  # [t, s]: d loss_t / d input_s
    assert np.all(np.triu(influence_LxL, k=1) == 0), "a position sees the future"
    assert np.all(np.diag(influence_LxL) > 0) and np.all(influence_LxL[-1] > 0)


def test_padded_vocab_gets_no_probability():
    cfg = config.preset("gpt-pico", vocab_size=10, block_size=8)
    logits = _apply(cfg, _init(cfg))
    assert logits.shape == (2, 8, 64)
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    np.testing.assert_allclose(probs[..., :10].sum(-1), 1.0, rtol=1e-6)
    assert np.all(probs[..., 10:] == 0)


def _unstack(scanned, n_layer):
    """Scanned params (layers stacked under "blocks") -> the unrolled layout (block_i)."""
    out = {k: v for k, v in scanned.items() if k != "blocks"}
    for i in range(n_layer):
        out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], scanned["blocks"])
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_scanned_and_unrolled_agree(tie):
    cfg = config.preset("gpt-pico", vocab_size=8, block_size=8, tie_embeddings=tie)
    params = _init(cfg)
    expected = _apply(cfg, params)
    unrolled = cfg.replace(scan_layers=False)
    np.testing.assert_allclose(_apply(unrolled, _unstack(params, cfg.n_layer)), expected, atol=1e-5)


def test_remat_changes_nothing_but_memory():
    cfg = config.preset("gpt-pico", vocab_size=8, block_size=8)
    params = _init(cfg)

    def grads(c):
        return jax.jit(jax.grad(lambda p: GPT(c).apply({"params": p}, TOKENS)[..., :8].sum()))(params)

    for with_remat, without in zip(
        jax.tree.leaves(grads(cfg.replace(remat=True))), jax.tree.leaves(grads(cfg)), strict=True
    ):
        np.testing.assert_allclose(with_remat, without, atol=1e-5)


def test_bf16_compute_keeps_fp32_params():
    cfg = config.preset("gpt-pico", vocab_size=8, block_size=8, dtype="bfloat16")
    params = _init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits = _apply(cfg, params)
    assert logits.dtype == jnp.bfloat16
    ref = _apply(cfg.replace(dtype="float32"), params)
    np.testing.assert_allclose(np.asarray(logits[..., :8], np.float32), ref[..., :8], atol=0.05)


def test_untied_model_has_head_and_no_bias_variant_has_no_biases():
    cfg = config.preset("gpt-pico", vocab_size=8, block_size=8, use_bias=False, tie_embeddings=True)
    params = _init(cfg)
    paths = [
        "/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    assert not any(p.endswith("bias") for p in paths) and "lm_head/kernel" not in paths
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.n_params() + (64 - 8) * cfg.n_embd
