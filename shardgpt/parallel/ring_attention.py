"""Ring attention: causal attention over a sequence split across a mesh axis (context parallelism), inside
jax.shard_map.

Each of the cp devices holds L = L_total / cp positions of q, k and v. The K/V block (k and v stacked into
one array) travels the ring with jax.lax.ppermute, device j sending to j + 1: at ring step s device i holds
the block of source (i - s) mod cp and folds it into an online softmax (running max, running sum and the
weighted values in fp32), masking by global positions. At rest each device holds 1/cp of the K/V (in the
forward at most two blocks besides its own: the one it folds and the one arriving); the price is the ring.

Layouts: "contiguous" (device i holds chunk i) computes every block whole and masks it; the ring's steps are
in lockstep, so the last device, whose blocks are all visible, sets the pace. "zigzag" (device i holds chunks
i and 2cp-1-i of 2cp; the caller permutes the sequence by `zigzag_order` and back) balances the causal work:
off the diagonal every device computes exactly the visible half of each block, so those steps cost half.

Collectives, per layer and call (theory; the test counts them in the compiled program):
- forward: cp - 1 K/V passes (`passes_per_layer`), each a collective-permute of `kv_pass_bytes` =
  2 * B * L * H * K * itemsize per device, in jax.named_scope("ring_kv_pass");
- backward (plain jax autodiff): the ppermutes transpose to cp - 1 passes the other way, carrying the K/V
  blocks' cotangents, of the same size.
Memory of the backward: autodiff saves each ring step's K/V block, so the backward holds cp blocks (the
whole sequence's K/V, 1/cp of it per step) as residuals. Each step's block update is rematerialised
(jax.checkpoint), so its L x L probabilities are recomputed instead of saved: cp of them would be as large as
the whole attention matrix of this device's queries.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from shardgpt.parallel.sharding import vary

# The running (max, sum, weighted values) of an online softmax: B x H x L, B x H x L, B x H x L x K in fp32.
Stats = tuple[jax.Array, jax.Array, jax.Array]


def kv_pass_bytes(batch: int, local_len: int, n_head: int, head_dim: int, itemsize: int) -> int:
    """Bytes one K/V pass delivers to each device: k and v of its local block, stacked."""
    return 2 * batch * local_len * n_head * head_dim * itemsize


def passes_per_layer(cp: int) -> int:
    """K/V passes per attention layer in the forward (the backward makes as many the other way)."""
    return cp - 1


def _attend_block(stats: Stats, q_BxLxHxK, kv_2xBxSxHxK, visible_LxS) -> Stats:
    """Fold one K/V block into the online softmax; `visible_LxS[l, s]`: query l may attend to key s (None:
    to all)."""
    m_BxHxL, l_BxHxL, acc_BxHxLxK = stats
    k_BxSxHxK, v_BxSxHxK = kv_2xBxSxHxK[0], kv_2xBxSxHxK[1]
    scale = 1 / math.sqrt(q_BxLxHxK.shape[-1])  # jax.nn.dot_product_attention's: logits scaled in fp32
    logits_BxHxLxS = jnp.einsum(
        "blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    if visible_LxS is not None:
        logits_BxHxLxS = jnp.where(visible_LxS, logits_BxHxLxS, -jnp.inf)
    # The output does not depend on the max, only its rounding does: no gradient through it. It is finite
    # from the first block on, the device's own, where every query sees at least itself: no exp(-inf + inf).
    new_m_BxHxL = jnp.maximum(m_BxHxL, jax.lax.stop_gradient(logits_BxHxLxS.max(axis=-1)))
    p_BxHxLxS = jnp.exp(logits_BxHxLxS - new_m_BxHxL[..., None])
    rescale_BxHxL = jnp.exp(m_BxHxL - new_m_BxHxL)  # 0 on the first block, where the max was -inf
    pv_BxHxLxK = jnp.einsum(
        "bhls,bshk->bhlk", p_BxHxLxS.astype(v_BxSxHxK.dtype), v_BxSxHxK, preferred_element_type=jnp.float32
    )
    return (
        new_m_BxHxL,
        l_BxHxL * rescale_BxHxL + p_BxHxLxS.sum(axis=-1),
        acc_BxHxLxK * rescale_BxHxL[..., None] + pv_BxHxLxK,
    )


LAYOUTS = ("contiguous", "zigzag")


def zigzag_order(length: int, cp: int) -> np.ndarray:
    """The positions of a sequence in the zigzag layout's order: split it into 2 * cp chunks, device i
    holding chunks i and 2 * cp - 1 - i; the caller takes x[:, order] before shard_map and undoes it after
    (x[:, np.argsort(order)])."""
    if length % (2 * cp):
        raise ValueError(f"zigzag needs the length ({length}) to divide into 2 * cp = {2 * cp} chunks")
    chunk = length // (2 * cp)
    chunks = [c for i in range(cp) for c in (i, 2 * cp - 1 - i)]
    return np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in chunks])


def _positions(device, local_len: int, cp: int, layout: str):
    """Global positions of the sequence block that `device` holds."""
    if layout == "contiguous":
        return device * local_len + jnp.arange(local_len)
    chunk_ = jnp.arange(local_len // 2)
    return jnp.concatenate([device * chunk_.size + chunk_, (2 * cp - 1 - device) * chunk_.size + chunk_])


def ring_attention(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, axis: str, layout: str = "contiguous"):
    """Causal attention of this device's queries to the whole sequence, inside shard_map, where the
    sequence is split over mesh `axis` in `layout`; equals jax.nn.dot_product_attention(is_causal=True) on
    the whole arrays (under zigzag: on the sequence in zigzag_order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    cp = jax.lax.axis_size(axis)
    me = jax.lax.axis_index(axis)
    local_len = q_BxLxHxK.shape[1]
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"zigzag needs an even local length (two chunks a device), got {local_len}")
    q_pos_L = _positions(me, local_len, cp, layout)
    attend = jax.checkpoint(_attend_block)  # the backward recomputes each block's probabilities

    def fold_masked(stats, kv_2xBxLxHxK_, source):
        visible_LxL = _positions(source, local_len, cp, layout)[None, :] <= q_pos_L[:, None]
        return attend(stats, q_BxLxHxK, kv_2xBxLxHxK_, visible_LxL)

    def fold(stats, kv_2xBxLxHxK_, step):
        source = (me - step) % cp  # the ring has carried this block `step` devices forward
        if layout == "contiguous":  # a step lasts as long as its busiest device: skipping saves nothing
            return fold_masked(stats, kv_2xBxLxHxK_, source)
        # Zigzag, off the diagonal: half of the block is visible, on every device; compute only that half.
        half = local_len // 2

        def earlier(stats):  # every query sees the source's first chunk, none its second
            return attend(stats, q_BxLxHxK, kv_2xBxLxHxK_[:, :, :half], None)

        def later(stats):  # the second query chunk sees the whole block, the first none of it
            late = attend(tuple(x[:, :, half:] for x in stats), q_BxLxHxK[:, half:], kv_2xBxLxHxK_, None)
            return tuple(
                jnp.concatenate([x[:, :, :half], y], axis=2) for x, y in zip(stats, late, strict=True)
            )

        case = jnp.where(step == 0, 0, jnp.where(source < me, 1, 2))
        return jax.lax.switch(
            case, (lambda stats: fold_masked(stats, kv_2xBxLxHxK_, me), earlier, later), stats
        )

    q_BxHxL = jnp.moveaxis(q_BxLxHxK[..., 0], 1, 2)  # templates that keep q's varying axes (check_vma)
    stats = (
        jnp.full_like(q_BxHxL, -jnp.inf, jnp.float32),
        jnp.zeros_like(q_BxHxL, jnp.float32),
        jnp.zeros_like(jnp.moveaxis(q_BxLxHxK, 1, 2), jnp.float32),
    )
    kv_2xBxLxHxK_ = jnp.stack([k_BxLxHxK, v_BxLxHxK])
    if cp > 1:
        # The loop's values vary over `axis` (the passes, this device's index): so must its start, which a
        # caller's trace (flax's nn.scan traces its body abstractly) may not know of.
        kv_2xBxLxHxK_, stats = jax.tree.map(lambda x: vary(x, (axis,)), (kv_2xBxLxHxK_, stats))
        perm = [(j, (j + 1) % cp) for j in range(cp)]

        def ring_step(carry, step):
            kv_, stats = carry
            with jax.named_scope("ring_kv_pass"):  # independent of this step's block: the two may overlap
                next_kv_ = jax.lax.ppermute(kv_, axis, perm)
            return (next_kv_, fold(stats, kv_, step)), None

        # Steps 0 .. cp - 2 pass the block they fold; the last block, received by the last pass, is folded
        # after the loop: cp - 1 passes in all.
        (kv_2xBxLxHxK_, stats), _ = jax.lax.scan(ring_step, (kv_2xBxLxHxK_, stats), jnp.arange(cp - 1))
    _, l_BxHxL, acc_BxHxLxK = fold(stats, kv_2xBxLxHxK_, cp - 1)
    out_BxHxLxK = acc_BxHxLxK / l_BxHxL[..., None]
    return jnp.moveaxis(out_BxHxLxK, 1, 2).astype(q_BxLxHxK.dtype)
