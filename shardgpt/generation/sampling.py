"""Choosing the next token from logits: greedy, temperature, top-k and exact top-p (nucleus) sampling,
with explicit PRNG keys; the decode loop (generate.py) calls `sample` once per step.
"""

import dataclasses

import jax
import jax.numpy as jnp

# Top-p first looks for the nucleus among this many most likely tokens (without top_k): a top-k window is
# far cheaper per token than sorting the whole vocabulary, which it falls back to only when needed.
TOP_P_WINDOW = 256


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k keeps the k most likely tokens; top_p the smallest nucleus >= p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"top_k must be an integer, got {self.top_k!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()  # the default: argmax, no key needed


def _nucleus_threshold(probs_BxV: jax.Array, top_p: float, window: int) -> jax.Array:
    """Per row, the probability of the least likely token in the smallest set holding >= top_p of the mass.

    Exact: the nucleus is read from a top-k window when every row's window holds >= top_p of the mass
    (the common case, no full-vocabulary sort), and from a full sort otherwise.
    """

    def from_sorted(sorted_BxK):  # probabilities in descending order
        mass_before_BxK = jnp.cumsum(sorted_BxK, axis=-1) - sorted_BxK
        n_keep_B = jnp.sum(mass_before_BxK < top_p, axis=-1)  # the top token always stays
        return jnp.take_along_axis(sorted_BxK, (n_keep_B - 1)[:, None], -1)[:, 0]

    top_BxW = jax.lax.top_k(probs_BxV, window)[0]
    return jax.lax.cond(
        jnp.all(top_BxW.sum(-1) >= top_p),
        lambda: from_sorted(top_BxW),
        lambda: from_sorted(-jnp.sort(-probs_BxV, axis=-1)),
    )


def sample(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens (B,): temperature, then top-k, then top-p over the renormalised rest."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    if sampling.temperature == 0 or sampling.top_k == 1:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    vocab = logits_BxV.shape[-1]
    logits_BxV = logits_BxV / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < vocab:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
        window = min(sampling.top_k or TOP_P_WINDOW, vocab)
        threshold_B = _nucleus_threshold(probs_BxV, sampling.top_p, window)
        logits_BxV = jnp.where(probs_BxV >= threshold_B[:, None], logits_BxV, -jnp.inf)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)
