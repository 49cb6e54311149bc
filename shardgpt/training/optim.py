"""The optimizer: AdamW with a weight-decay mask, warmup + cosine schedule, global-norm clipping.

It knows nothing of the model class: which params decay is read from the parameter tree's leaf names.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from shardgpt.model.config import replace_typed


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters; minGPT's betas (0.9, 0.95) and clipping at global norm 1."""

    learning_rate: float = 3e-4
    warmup_steps: int = 10
    total_steps: int = 1000
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self):
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.total_steps >= 1, "total_steps must be >= 1"),
            (0 <= self.warmup_steps <= self.total_steps, "warmup_steps must be in [0, total_steps]"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1 and b2 must be in [0, 1)"),
            (self.grad_clip > 0, "grad_clip must be > 0 (clipping at a norm <= 0 zeroes every update)"),
        ]
        # `not ok` rather than a negated comparison, so NaN fails every check.
        wrong = [message for ok, message in checks if not ok]
        if wrong:
            raise ValueError(f"OptimConfig: {'; '.join(wrong)} (got {self})")

    def replace(self, **overrides: Any) -> "OptimConfig":
        """A copy with fields replaced; each value is checked against (or coerced to) the field's type."""
        return replace_typed(self, "optim", overrides)


def decay_mask(params):
    """True for matmul weights (leaves named "kernel"); biases, LayerNorm and embeddings do not decay."""

    def is_kernel(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup to the peak learning rate, then cosine decay to min_lr_ratio of it.

    Step t (optax's count, from 0) trains at the curve's value at t + 1: the first step at peak/warmup,
    the peak at step warmup - 1, the floor at the last step (total_steps - 1). At its value at t it would
    train step 0 at lr 0, a step that does nothing.
    """
    curve = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=max(config.warmup_steps, 1),
        decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.min_lr_ratio,
    )
    return lambda count: curve(count + 1)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm, but a caller holding only shards of the updates passes their global norm:
    `tx.update(grads, state, params, grad_norm=norm)` (shard_map_step.py psums it across devices)."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(norm < max_norm)
        clip = lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm -> AdamW (decoupled weight decay on kernels only), scheduled."""
    return optax.chain(
        clip_by_global_norm(config.grad_clip),
        optax.adamw(
            schedule(config), b1=config.b1, b2=config.b2, weight_decay=config.weight_decay, mask=decay_mask
        ),
    )
