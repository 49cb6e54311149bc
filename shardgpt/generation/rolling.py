"""Generation past the context: how wide the token buffer is, and the decode step that re-prefills a full
row's last tokens; generate.py's Generator runs it inside its one compiled program.

Positions are a learned table (wpe), so cached keys and values cannot slide along it. A row whose cache is
full restarts at position 0 from its last block_size - block_size // ROLL_DIVISOR tokens, re-prefilled, and
decodes on.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# The model always reads >= 3/4 of the context it was trained on (nanoGPT's crop reads all of it, at a full
# forward per token), and a re-prefill of 3/4 of the context, in parallel chunks, comes once per
# block_size // 4 + 1 tokens. Below 4 positions it re-prefills every token.
ROLL_DIVISOR = 4


def roll_keep(block_size: int) -> int:
    """How many of its last tokens a row keeps when its context is full (ROLL_DIVISOR)."""
    return block_size - block_size // ROLL_DIVISOR


def buffer_length(block_size: int, total: int) -> int:
    """Width of the token buffer for `total` tokens (prompt and new): block_size + 1 where they fit the
    context (the last new token is never read back), else the smallest block_size x 2^j >= total: one
    compile per width."""
    if total <= block_size + 1:
        return block_size + 1
    width = 2 * block_size
    while width < total:
        width *= 2
    return width


def unfilled(carry: tuple, block_size: int) -> jax.Array:
    """Whether every unfinished row's next token has a slot in the cache (finished rows read none)."""
    _, _, length_B, _, _, done_B, offset_B = carry
    return jnp.max(jnp.where(done_B, -1, length_B - offset_B)) < block_size


def roll(carry: tuple, apply: Callable, emit: Callable, prefill: Callable, cache_sharding) -> tuple:
    """One decode step in which some row's cache is full: every row emits its token; the full rows restart
    from their last roll_keep tokens, re-prefilled at positions 0.., the others read theirs.

    `carry` is the decode loop's (i, tokens_BxT, length_B, last_BxV, cache, done_B, offset_B), offset_B
    where each row's context starts in tokens_BxT. The re-prefill runs over every row (fixed shapes) on a
    copy of the cache; a row keeps it only if it was full, so rows may fill at different steps. Slots past a
    restarted row's window hold stale entries, masked until overwritten.
    """
    i, tokens_BxT, length_B, last_BxV, cache, done_B, offset_B = carry
    T, S = tokens_BxT.shape[1], cache[0][0].shape[1]
    keep = roll_keep(S)
    tokens_BxT, length_B, done_B, token_B = emit(i, tokens_BxT, length_B, last_BxV, done_B)
    position_B = length_B - 1 - offset_B
    full_B = ~done_B & (position_B >= S)  # its new token has no slot left: its read is discarded
    logits_Bx1xV, fed = apply(token_B[:, None], jnp.minimum(position_B, S - 1)[:, None], cache)
    offset_B = jnp.where(full_B, length_B - keep, offset_B)
    window_BxS = jnp.take_along_axis(tokens_BxT, jnp.clip(offset_B[:, None] + jnp.arange(S), 0, T - 1), 1)
    refilled_BxV, refilled = prefill(apply, window_BxS, jnp.where(full_B, keep, 0), fed)
    pick = lambda new, old: jnp.where(full_B.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    cache = jax.lax.with_sharding_constraint(
        jax.tree.map(pick, refilled, fed), jax.tree.map(lambda _: cache_sharding, fed)
    )
    return i + 1, tokens_BxT, length_B, pick(refilled_BxV, logits_Bx1xV[:, 0]), cache, done_B, offset_B
