"""One train step, written once: the microbatch loop, the loss sum and token count, the point where the
gradients are reduced, the optimizer update and the metrics. An implementation supplies only how it places
and communicates (`Implementation`): GSPMD's in train.py, shard_map's in shard_map_step.py.

The step's phases carry named scopes, kept in the compiled HLO's op names (shardgpt.analysis.attribution
reads them): `forward` (autodiff names the backward pass's ops `transpose(jvp(forward))`), `grad_reduce`
and `optimizer`.
"""

from collections.abc import Callable
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

from shardgpt.model.plan import Plan


@flax.struct.dataclass
class TrainState:
    """Everything that lives on device between steps; the optimizer and model are closed over."""

    step: jax.Array
    params: Any
    opt_state: Any


class Implementation:
    """What differs between implementations, and nothing else. This base computes in the global view with
    no communication of its own (GSPMD's partitioner, or a one-device run, places the collectives)."""

    plan: Plan  # how the model and the loss are laid out (the implementation passes it to both)

    def loss(self, wrt: Any, batch: dict, read: Any) -> tuple[jax.Array, jax.Array]:
        """(token-loss sum, token count) of `batch` as this device or program sees it, the model reading
        `wrt` (differentiated) and `read` (not), as `differentiable` split the params (an MoE's count:
        [count, choices dropped], train.loss_sum)."""
        raise NotImplementedError

    def differentiable(self, params: Any) -> tuple[Any, Any]:
        """(wrt, read): what autodiff differentiates for `params`, and what the model reads beside it
        undifferentiated (shard_map: ZeRO-2's whole params, whose gradients live only as shards)."""
        return params, None

    def accumulated(self, microbatches: int) -> int:
        """How many microbatches the step's own loop adds up (a pipeline runs its microbatches itself)."""
        return microbatches

    def accumulate(self, wrt: Any, batch: dict, read: Any, microbatches: int) -> tuple[tuple, Any]:
        """((sum, count), grads) of `loss` added up over `microbatches` splits of `batch`, each device's
        partial gradients kept apart for as long as their layout allows (whole-over-dp ones until
        `reduce`; shard_map's all of them, GSPMD's ZeRO-2/3 ones reduced into their shard per microbatch)."""
        raise NotImplementedError

    def reduce_sums(self, sums_2: jax.Array) -> jax.Array:
        """The (loss sum, token count) pair summed over the devices holding partial ones."""
        return sums_2

    def reduce_grads(self, grads: Any) -> Any:
        """The gradients summed over the devices holding partial ones, in the grads' layout."""
        return grads

    def to_update_layout(self, tree: Any, of: Literal["grads", "params"]) -> Any:
        """`tree` (the grads, or the params: `of`) in the optimizer state's layout: what a device updates."""
        return tree

    def global_norm(self, grads: Any) -> jax.Array:
        """The gradients' global L2 norm, whatever part of them a device holds."""
        return optax.tree.norm(grads)

    def to_param_layout(self, params: Any) -> Any:
        """The updated params back in their own layout (ZeRO-1/2 gather what each device updated)."""
        return params


def as_vector(sums: tuple[jax.Array, jax.Array]) -> jax.Array:
    """(loss sum, count) -> [loss sum, count]: one array for one reduction. An MoE's count comes as
    [count, choices dropped] (train.loss_sum), which the vector carries on: every entry a sum over tokens."""
    total, count = sums
    return jnp.stack(sums) if jnp.ndim(count) == 0 else jnp.concatenate([total[None], count])


def build(impl: Implementation, tx: optax.GradientTransformation, microbatches: int = 1) -> Callable:
    """`train_step(state, batch) -> (state, metrics)` for `impl`, not yet placed (jit it, or shard_map
    and jit it). `tx` gets the global norm as `tx.update(..., grad_norm=)`: optim.make_optimizer's clips
    by it, any other optax transformation may ignore it. An implementation whose devices hold only shards
    of the gradients (shard_map) needs a clip that takes it: optax's own would clip by a shard's norm."""
    tx = optax.with_extra_args_support(tx)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        wrt, read = impl.differentiable(state.params)
        value_and_grad = jax.value_and_grad(lambda wrt, batch: impl.loss(wrt, batch, read), has_aux=True)
        m = impl.accumulated(microbatches)
        sums, grads = value_and_grad(wrt, batch) if m == 1 else impl.accumulate(wrt, batch, read, m)
        with jax.named_scope("grad_reduce"):
            sums_k, grads = impl.reduce_sums(as_vector(sums)), impl.reduce_grads(grads)
            # The mean over every non-ignored token of the batch (never a mean of microbatch means).
            scale = 1 / jnp.maximum(sums_k[1], 1)
            loss, grads = sums_k[0] * scale, jax.tree.map(lambda g: g * scale, grads)
        with jax.named_scope("optimizer"):
            grads, params = (
                impl.to_update_layout(grads, "grads"),
                impl.to_update_layout(state.params, "params"),
            )
            grad_norm = impl.global_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, params, grad_norm=grad_norm)
            params = impl.to_param_layout(optax.apply_updates(params, updates))
        state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if sums_k.shape[0] > 2:  # an MoE's choices dropped past the experts' capacity, summed like the loss
            metrics["moe_dropped"] = sums_k[2]
        return state, metrics

    return train_step


def build_eval(impl: Implementation) -> Callable:
    """`eval_sums(params, batch) -> (loss sum, token count)`: the step's forward and loss alone, through
    the same implementation (a pipeline's loss runs on its schedule), not yet placed."""

    def eval_sums(params: Any, batch: dict) -> jax.Array:
        wrt, read = impl.differentiable(params)
        return impl.reduce_sums(as_vector(impl.loss(wrt, batch, read)))[:2]

    return eval_sums
