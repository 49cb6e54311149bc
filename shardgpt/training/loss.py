"""The training loss: next-token cross-entropy fused with the LM head, chunked over the sequence.

`head_cross_entropy_sum` never holds the whole batch's logits: a scan over chunks of `CHUNK` positions
applies the head to one chunk, takes its losses in fp32 and, when differentiated, its gradients in the same
pass (a custom_vjp whose forward keeps d/dx and d/dhead, so the backward pass only scales them: no logits
are saved for it and none recomputed). At most one chunk's logits live at once, B x CHUNK x V, where the
whole batch's fp32 logits alone are B x L x V x 4 bytes (gpt2 at batch 16 x 1024: 3.3 GB).
`cross_entropy_sum` is the same loss on logits a caller already has, and the reference the test holds the
fused one to.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from shardgpt.model.gpt import constrain
from shardgpt.training.data import IGNORE_INDEX

CHUNK = 128  # sequence positions per chunk; a sequence up to this long is one chunk
LOGITS = ("batch", "length", "vocab")


def _sums(losses_BxL, mask_BxL, axis):
    # One reduction for both sums, so the count's cross-device sum waits for the forward pass instead of
    # running beside its first collectives: on XLA:CPU that race starved its thread pool (BENCHMARKS.md).
    return jnp.sum(jnp.stack([losses_BxL * mask_BxL, mask_BxL.astype(jnp.float32)]), axis=axis)


def cross_entropy_sum(logits_BxLxV, targets_BxL, ignore_index: int = IGNORE_INDEX):
    """Summed next-token cross-entropy over targets != ignore_index (fp32), and how many there are."""
    mask_BxL = targets_BxL != ignore_index
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), jnp.where(mask_BxL, targets_BxL, 0)
    )
    sums_2 = _sums(losses_BxL, mask_BxL, axis=(1, 2))
    return sums_2[0], sums_2[1]


def cross_entropy(logits_BxLxV, targets_BxL, ignore_index: int = IGNORE_INDEX):
    """Mean next-token cross-entropy over targets != ignore_index, computed in fp32."""
    total, count = cross_entropy_sum(logits_BxLxV, targets_BxL, ignore_index)
    return total / jnp.maximum(count, 1)


def head_cross_entropy_sum(x_BxLxD, head_DxV, targets_BxL, vocab_size: int, chunk: int = CHUNK):
    """cross_entropy_sum of the logits x @ head (padded vocab ids masked, as GPT masks them), computed
    `chunk` positions at a time: (token-loss sum, token count) over targets != IGNORE_INDEX, in fp32.

    `x_BxLxD` is GPT's output with head=False, `head_DxV` its head weight (model.head_DxV), both in the
    compute dtype; each chunk's logits are constrained to (batch, length, vocab), so tp splits the vocab.
    """
    sums_2 = _fused(x_BxLxD, head_DxV.astype(x_BxLxD.dtype), targets_BxL, vocab_size, chunk)
    return sums_2[0], sums_2[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk):
    return _scan(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, grads=False)[0]


def _fused_fwd(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk):
    sums_2, dx_BxLxD, dhead_DxV = _scan(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, grads=True)
    return sums_2, (dx_BxLxD, dhead_DxV)


def _fused_bwd(vocab_size, chunk, residuals, ct_2):
    dx_BxLxD, dhead_DxV = residuals
    g, dtype = ct_2[0], dx_BxLxD.dtype  # the count does not depend on the inputs; x and head share a dtype
    return (g * dx_BxLxD).astype(dtype), (g * dhead_DxV).astype(dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _chunks(a_BxL, chunk: int, n: int, fill):
    """(B, L, ...) -> (N, B, C, ...): the sequence cut into n chunks, its end padded with `fill`."""
    pad = [(0, 0), (0, n * chunk - a_BxL.shape[1])] + [(0, 0)] * (a_BxL.ndim - 2)
    a_BxL = jnp.pad(a_BxL, pad, constant_values=fill)
    return a_BxL.reshape(a_BxL.shape[0], n, chunk, *a_BxL.shape[2:]).swapaxes(0, 1)


def _scan(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, grads: bool):
    """(sums_2, and with `grads` d sums_2[0] / dx_BxLxD and / dhead_DxV (fp32)), one chunk at a time."""
    (b, length, _), v = x_BxLxD.shape, head_DxV.shape[1]
    c = min(chunk, length)
    n = -(-length // c)
    # The head reads whole rows: gather a sequence split over tp (+sp) once, before the loop.
    x_NxBxCxD = _chunks(constrain(x_BxLxD, ("batch", None, "embed")), c, n, 0)
    targets_NxBxC = _chunks(targets_BxL, c, n, IGNORE_INDEX)  # padded positions carry no loss
    head_DxV = constrain(head_DxV, ("embed", "vocab"))  # ZeRO-3: gathered once, not once per chunk
    real_V = jnp.arange(v) < vocab_size
    lowest = jnp.finfo(x_BxLxD.dtype).min
    # d/dhead sums over the batch, which dp splits: a carry whole over dp would be all-reduced once per
    # chunk, so each dp shard keeps its own partial sum in a leading dim G (on dp) and the sum over G after
    # the loop is the one reduction (shardgpt.parallel.microbatch does the same for whole gradients).
    g = _batch_shards()
    per_shard = ("batch", "embed", "vocab")

    def body(carry, chunk_):
        sums_2xB, dhead_GxDxV = carry
        x_BxCxD, targets_BxC = chunk_
        with jax.named_scope(
            "head"
        ):  # the scopes name each collective's cause (shardgpt.analysis.attribution)
            logits_BxCxV = constrain(jnp.einsum("bcd,dv->bcv", x_BxCxD, head_DxV), LOGITS)
        with jax.named_scope("cross_entropy"):
            if v != vocab_size:  # padding ids get no probability, as in GPT
                logits_BxCxV = jnp.where(real_V, logits_BxCxV, lowest)
            logits_BxCxV = logits_BxCxV.astype(jnp.float32)
            mask_BxC = targets_BxC != IGNORE_INDEX
            safe_BxC = jnp.where(mask_BxC, targets_BxC, 0)
            max_BxC = jax.lax.stop_gradient(logits_BxCxV.max(-1))  # only for stability
            lse_BxC = jnp.log(jnp.exp(logits_BxCxV - max_BxC[..., None]).sum(-1)) + max_BxC
            picked_BxC = jnp.take_along_axis(logits_BxCxV, safe_BxC[..., None], -1)[..., 0]
            sums_2xB = sums_2xB + _sums(lse_BxC - picked_BxC, mask_BxC, axis=2)
        if not grads:
            return (sums_2xB, None), None
        with jax.named_scope("head"):  # its backward, computed here in the forward pass
            # d loss / d logits = softmax - one_hot(target), on the tokens that count (padded ids: 0 - 0).
            dlogits_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None]) - jax.nn.one_hot(safe_BxC, v)
            dlogits_BxCxV = constrain((dlogits_BxCxV * mask_BxC[..., None]).astype(x_BxCxD.dtype), LOGITS)
            dx_BxCxD = jnp.einsum("bcv,dv->bcd", dlogits_BxCxV, head_DxV)
            x_GxBxCxD, dlogits_GxBxCxV = (
                a.reshape(g, b // g, *a.shape[1:]) for a in (x_BxCxD, dlogits_BxCxV)
            )
            dhead_GxDxV = dhead_GxDxV + constrain(
                jnp.einsum("gbcd,gbcv->gdv", x_GxBxCxD, dlogits_GxBxCxV, preferred_element_type=jnp.float32),
                per_shard,
            )
        return (sums_2xB, dhead_GxDxV), dx_BxCxD

    sums_2xB = constrain(jnp.zeros((2, b), jnp.float32), (None, "batch"))
    dhead_GxDxV = constrain(jnp.zeros((g, *head_DxV.shape), jnp.float32), per_shard) if grads else None
    with jax.named_scope("head_cross_entropy"):
        (sums_2xB, dhead_GxDxV), dx_NxBxCxD = jax.lax.scan(
            body, (sums_2xB, dhead_GxDxV), (x_NxBxCxD, targets_NxBxC)
        )
        with jax.named_scope("loss_sum"):
            sums_2 = sums_2xB.sum(1)  # the one reduction across the batch (and its devices)
        if not grads:
            return sums_2, None, None
        dx_BxLxD = dx_NxBxCxD.swapaxes(0, 1).reshape(b, n * c, -1)[:, :length]
        with jax.named_scope("grad_reduce"):
            return sums_2, dx_BxLxD, dhead_GxDxV.sum(0)


def _batch_shards() -> int:
    """How many devices the current logical rules split `batch` over (1 without rules or a mesh)."""
    axis = dict(nn.get_logical_axis_rules()).get("batch")
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if axis is None or mesh.empty else mesh.shape[axis]
