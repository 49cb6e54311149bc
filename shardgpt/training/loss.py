"""The training loss: next-token cross-entropy fused with the LM head, chunked over the sequence; one
cross-entropy for every implementation.

`head_cross_entropy_sum` never holds the whole batch's logits: a scan over chunks of `CHUNK` positions
applies the head to one chunk, takes its losses in fp32 and, when differentiated, its gradients in the same
pass (a custom_vjp whose forward keeps d/dx and d/dhead, so the backward pass only scales them: no logits
are saved for it and none recomputed). At most one chunk's logits live at once, B x CHUNK x V, where the
whole batch's fp32 logits alone are B x L x V x 4 bytes (gpt2 at batch 16 x 1024: 3.3 GB).

The plan passed in says where the vocab lives: whole (one device, GSPMD, whose partitioner splits it over
tp by the logits' constraint) or as this device's slice inside shard_map, where the max, the sum of
exponentials and the target's logit are combined across the slices (`plan.vocab_max`, `plan.vocab_sum`),
so no device ever holds a token's full logits. `cross_entropy_sum` is the same loss on logits a caller
already has.
"""

import functools

import jax
import jax.numpy as jnp

from shardgpt.model.gpt import mask_padded_vocab
from shardgpt.model.plan import GLOBAL_VIEW, Plan
from shardgpt.parallel.sharding import vary, varying_axes
from shardgpt.training.data import IGNORE_INDEX

CHUNK = 128  # sequence positions per chunk; a sequence up to this long is one chunk
LOGITS = ("batch", "length", "vocab")


def _token_losses(logits_BxCxV, targets_BxC, vocab_size: int, plan: Plan):
    """(losses_BxC, lse_BxC, hit_BxC, local_BxC, logits_BxCxV): each position's cross-entropy and
    log-sum-exp (fp32), whether its target is a real one among this device's logits and its index there
    (0 where not), and the logits as the loss saw them (padding masked, fp32)."""
    logits_BxCxV = mask_padded_vocab(logits_BxCxV, vocab_size, plan).astype(jnp.float32)
    v = logits_BxCxV.shape[-1]
    local_BxC = targets_BxC - plan.vocab_ids(v)[0]  # the target's index among this device's ids
    hit_BxC = (targets_BxC != IGNORE_INDEX) & (local_BxC >= 0) & (local_BxC < v)
    local_BxC = jnp.where(hit_BxC, local_BxC, 0)
    max_BxC = jax.lax.stop_gradient(plan.vocab_max(logits_BxCxV.max(-1)))  # only for stability
    # The target's logit as a masked sum over the vocab, not a gather: a sum over a split vocab has one
    # layout in every implementation (a gather's output sharding would be ambiguous in explicit mode).
    picked_BxC = jnp.where(jnp.arange(v) == local_BxC[..., None], logits_BxCxV, 0).sum(-1)
    # One reduction across the vocab's slices for both sums.
    exp_sum_BxC = jnp.exp(logits_BxCxV - max_BxC[..., None]).sum(-1)
    sums_2xBxC = plan.vocab_sum(jnp.stack([exp_sum_BxC, jnp.where(hit_BxC, picked_BxC, 0)]))
    lse_BxC = jnp.log(sums_2xBxC[0]) + max_BxC
    return lse_BxC - sums_2xBxC[1], lse_BxC, hit_BxC, local_BxC, logits_BxCxV


def _sums(losses_BxL, targets_BxL, axis):
    # One reduction for both sums, so the count's cross-device sum waits for the forward pass instead of
    # running beside its first collectives: on XLA:CPU that race starved its thread pool (BENCHMARKS.md).
    mask_BxL = targets_BxL != IGNORE_INDEX
    return jnp.sum(jnp.stack([jnp.where(mask_BxL, losses_BxL, 0), mask_BxL.astype(jnp.float32)]), axis=axis)


def cross_entropy_sum(logits_BxLxV, targets_BxL, vocab_size: int | None = None, plan: Plan = GLOBAL_VIEW):
    """Summed next-token cross-entropy over targets != IGNORE_INDEX (fp32), and how many there are; ids
    from `vocab_size` up (default: none) are padding and get no probability."""
    vocab_size = plan.global_size(logits_BxLxV.shape[-1], "vocab") if vocab_size is None else vocab_size
    losses_BxL = _token_losses(logits_BxLxV, targets_BxL, vocab_size, plan)[0]
    sums_2 = _sums(losses_BxL, targets_BxL, axis=(1, 2))
    return sums_2[0], sums_2[1]


def cross_entropy(logits_BxLxV, targets_BxL, vocab_size: int | None = None):
    """Mean next-token cross-entropy over targets != IGNORE_INDEX, computed in fp32."""
    total, count = cross_entropy_sum(logits_BxLxV, targets_BxL, vocab_size)
    return total / jnp.maximum(count, 1)


def head_cross_entropy_sum(
    x_BxLxD, head_DxV, targets_BxL, vocab_size: int, plan: Plan = GLOBAL_VIEW, chunk: int = CHUNK
):
    """cross_entropy_sum of the logits x @ head (padded vocab ids masked, as GPT masks them), computed
    `chunk` positions at a time: (token-loss sum, token count) over targets != IGNORE_INDEX, in fp32.

    `(x_BxLxD, head_DxV)` is GPT's output with head=False (the head's weight as the plan reads it, this
    device's vocab slice inside shard_map), both in the compute dtype; each chunk's logits are laid out
    as (batch, length, vocab), so tp splits the vocab.
    """
    sums_2 = _fused(x_BxLxD, head_DxV.astype(x_BxLxD.dtype), targets_BxL, vocab_size, chunk, plan)
    return sums_2[0], sums_2[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, plan):
    return _scan(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, plan, grads=False)[0]


def _fused_fwd(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, plan):
    sums_2, dx_BxLxD, dhead_DxV = _scan(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, plan, grads=True)
    return sums_2, (dx_BxLxD, dhead_DxV)


def _fused_bwd(vocab_size, chunk, plan, residuals, ct_2):
    dx_BxLxD, dhead_DxV = residuals
    g, dtype = ct_2[0], dx_BxLxD.dtype  # the count does not depend on the inputs; x and head share a dtype
    return (g * dx_BxLxD).astype(dtype), (g * dhead_DxV).astype(dtype), None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _chunks(a_BxL, chunk: int, n: int, fill):
    """(B, L, ...) -> (N, B, C, ...): the sequence cut into n chunks, its end padded with `fill`."""
    pad = [(0, 0), (0, n * chunk - a_BxL.shape[1])] + [(0, 0)] * (a_BxL.ndim - 2)
    a_BxL = jnp.pad(a_BxL, pad, constant_values=fill)
    return a_BxL.reshape(a_BxL.shape[0], n, chunk, *a_BxL.shape[2:]).swapaxes(0, 1)


def _scan(x_BxLxD, head_DxV, targets_BxL, vocab_size, chunk, plan: Plan, grads: bool):
    """(sums_2, and with `grads` d sums_2[0] / dx_BxLxD and / dhead_DxV (fp32)), one chunk at a time."""
    (b, length, _), v = x_BxLxD.shape, head_DxV.shape[1]
    c = min(chunk, length)
    n = -(-length // c)
    # The head reads whole rows: gather a sequence split over tp (+sp) once, before the loop.
    x_NxBxCxD = _chunks(plan.constrain(x_BxLxD, ("batch", None, "embed")), c, n, 0)
    targets_NxBxC = _chunks(targets_BxL, c, n, IGNORE_INDEX)  # padded positions carry no loss
    with jax.named_scope("zero3_gather"):  # the cause of the only collective it may need
        head_DxV = plan.constrain(head_DxV, ("embed", "vocab"))  # ZeRO-3: gathered once, not once per chunk
    # d/dhead sums over the batch, which dp splits: a carry whole over dp would be all-reduced once per
    # chunk, so each dp shard keeps its own partial sum in a leading dim G (on dp) and the sum over G after
    # the loop is the one reduction (shardgpt.parallel.microbatch does the same for whole gradients).
    g = plan.batch_shards()
    per_shard = ("batch", "embed", "vocab")

    def body(dhead_GxDxV, chunk_):
        x_BxCxD, targets_BxC = chunk_
        with jax.named_scope("head"):  # scopes name each collective's cause (shardgpt.analysis.attribution)
            logits_BxCxV = plan.constrain(jnp.einsum("bcd,dv->bcv", x_BxCxD, head_DxV), LOGITS)
        with jax.named_scope("cross_entropy"):
            losses_BxC, lse_BxC, hit_BxC, local_BxC, logits_BxCxV = _token_losses(
                logits_BxCxV, targets_BxC, vocab_size, plan
            )
            sums_2xB = _sums(losses_BxC, targets_BxC, axis=2)
        if not grads:
            return None, sums_2xB
        with jax.named_scope("head"):  # its backward, computed here in the forward pass
            # d loss / d logits = softmax - one_hot(target), on the tokens that count (padded ids: 0 - 0).
            one_hot_BxCxV = jax.nn.one_hot(local_BxC, v) * hit_BxC[..., None]
            dlogits_BxCxV = jnp.exp(logits_BxCxV - lse_BxC[..., None]) - one_hot_BxCxV
            mask_BxC = targets_BxC != IGNORE_INDEX
            dlogits_BxCxV = (dlogits_BxCxV * mask_BxC[..., None]).astype(x_BxCxD.dtype)
            dlogits_BxCxV = plan.constrain(dlogits_BxCxV, LOGITS)
            dx_BxCxD = plan.einsum("bcv,dv->bcd", dlogits_BxCxV, head_DxV, ("batch", None, "embed"))
        # The head's gradient: a sum over positions, which only cp splits (dp's part waits in G).
        with jax.named_scope("grad_reduce"):
            x_GxBxCxD, dlogits_GxBxCxV = (
                a.reshape(g, b // g, *a.shape[1:]) for a in (x_BxCxD, dlogits_BxCxV)
            )
            dhead_GxDxV = dhead_GxDxV + plan.constrain(
                jnp.einsum("gbcd,gbcv->gdv", x_GxBxCxD, dlogits_GxBxCxV, preferred_element_type=jnp.float32),
                per_shard,
            )
        return dhead_GxDxV, (sums_2xB, dx_BxCxD)

    dhead_GxDxV = None
    if grads:  # inside shard_map the carry varies over the axes its updates do
        zeros_GxDxV = jnp.zeros((g, *head_DxV.shape), jnp.float32)
        zeros_GxDxV = vary(zeros_GxDxV, tuple(sorted(varying_axes(x_BxLxD) | varying_axes(head_DxV))))
        dhead_GxDxV = plan.constrain(zeros_GxDxV, per_shard)
    with jax.named_scope("head_cross_entropy"):
        # Each chunk's sums are an output, not a carry: no carry's type to match inside shard_map.
        dhead_GxDxV, out = jax.lax.scan(body, dhead_GxDxV, (x_NxBxCxD, targets_NxBxC))
        sums_Nx2xB, dx_NxBxCxD = out if grads else (out, None)
        with jax.named_scope("loss_sum"):
            sums_2 = sums_Nx2xB.sum((0, 2))  # the one reduction across the batch (and its devices)
        if not grads:
            return sums_2, None, None
        dx_BxLxD = dx_NxBxCxD.swapaxes(0, 1).reshape(b, n * c, -1)[:, :length]
        with jax.named_scope("grad_reduce"):
            return sums_2, dx_BxLxD, dhead_GxDxV.sum(0)
