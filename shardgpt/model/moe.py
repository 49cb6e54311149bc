"""A mixture-of-experts MLP (Switch top-1 / GShard top-2 routing with a capacity), in place of a block's MLP
where config.n_experts > 0; the experts carry the logical axis `expert`, which the rules put on `ep`.

Routing is per group of `moe_group_rows` whole sequences: each expert takes at most its capacity of a
group's tokens (ModelConfig.expert_capacity), first choices first in token order, then second choices;
the rest are dropped (they pass through the residual). Groups are whole rows, and the batch splits into
whole rows on every mesh, so the dropped set is the same on every layout. Decoding gives every expert
room for a group's every token: generation drops nothing.

Dispatch and combine are one-hot einsums (GShard's formulation): (groups, tokens) -> (experts, groups,
capacity) slots and back. The plan moves the slots to the experts' devices and back (`to_experts`,
`from_experts`: an all-to-all over ep). Shape key as in gpt.py, plus E experts, N groups, G tokens a
group, C capacity, T = top_k x G choices.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.ad_checkpoint import checkpoint_name

from shardgpt.model.config import ModelConfig
from shardgpt.model.plan import Plan, megatron_scope

# The collection the layer sows into: `aux_sum` (the load-balancing loss summed over this call's groups),
# `load` (choices per expert, before the capacity) and `dropped` (choices past it), per layer. The loss
# reads aux_sum and dropped (training.train.loss_sum: a term of the sum, a count beside the token count);
# the lab reads load (lab/experts.py).
STATS = "moe"

# A layer's slots (experts, groups, capacity; then the features) at their experts (split over ep, the groups
# over dp) and at their tokens (the groups over dp x ep, as the batch): between the two, an all-to-all.
EXPERT_SLOTS = ("expert", "moe_groups", None)
TOKEN_SLOTS = (None, "batch", None)


class MoE(nn.Module):
    """n_experts MLPs (each the dense MLP's size) and a router; column- and row-parallel inside each
    expert over tp, as the dense MLP."""

    config: ModelConfig
    plan: Plan

    @nn.compact
    def __call__(self, x_BxLxD, decoding: bool = False):
        cfg, plan = self.config, self.plan
        b, length, d = x_BxLxD.shape
        rows = 1 if decoding else cfg.moe_group_rows  # dropless decoding: any grouping routes alike
        if b % rows:
            raise ValueError(f"{b} rows do not split into routing groups of model.moe_group_rows={rows}")
        n, g, e = b // rows, rows * length, cfg.n_experts
        capacity = g if decoding else cfg.expert_capacity(g)
        x_NxGxD = plan.constrain(x_BxLxD.reshape(n, g, d), ("batch", None, "embed"))

        router_DxE = plan.param(self, "router", nn.initializers.normal(0.02), (d, e), ("embed", "route"))
        with jax.named_scope("router"):
            masks = self._route(x_NxGxD, router_DxE, capacity)
            # Routing is each group's own business: kept where its tokens are (GSPMD would otherwise let
            # the experts' layout propagate back into it and gather the tokens over ep).
            dispatch_NxGxExC, combine_NxGxExC = (
                plan.constrain(m, ("batch", None, None, None)) for m in masks
            )

        dtype = jnp.dtype(cfg.dtype)
        with jax.named_scope("dispatch"):  # each group's slots, made where its tokens are
            slots_ExNxCxD = jnp.einsum(
                "ngec,ngd->encd", dispatch_NxGxExC.astype(dtype), x_NxGxD.astype(dtype)
            )
        # Named, so a remat policy that recomputes the layouts it states (ZeRO-3's, which re-gather the
        # params) saves these two instead of redoing their all-to-alls in the backward pass.
        slots_ExNxCxD = checkpoint_name(plan.copy_to_shards(plan.to_experts(slots_ExNxCxD)), "moe_slots")
        y_ExNxCxD = checkpoint_name(plan.from_experts(self._experts(slots_ExNxCxD, dtype)), "moe_outputs")
        with jax.named_scope("combine"):
            y_NxGxD = jnp.einsum("ngec,encd->ngd", combine_NxGxExC.astype(dtype), y_ExNxCxD)
        return plan.constrain(y_NxGxD, ("batch", None, "embed")).reshape(b, length, d)

    def _route(self, x_NxGxD, router_DxE, capacity: int):
        """(dispatch, combine), each (N, G, E, C): where each kept choice goes, and with its gate. Sows the
        load-balancing loss and the load statistics (STATS). In fp32 throughout."""
        k, e = self.config.moe_top_k, self.config.n_experts
        n, g = x_NxGxD.shape[:2]
        probs_NxGxE = jax.nn.softmax(jnp.einsum("ngd,de->nge", x_NxGxD.astype(jnp.float32), router_DxE))
        probs_NxGxE = self.plan.constrain(probs_NxGxE, ("batch", None, None))  # each group's own (top_k)
        gates_NxGxK, experts_NxGxK = _top_k(probs_NxGxE, k)
        if k > 1:  # GShard: the chosen experts' gates renormalised to sum to 1
            gates_NxGxK = gates_NxGxK / gates_NxGxK.sum(-1, keepdims=True)
        # Choices in priority order: every token's first, in token order, then every token's second.
        chosen_NxTxE = jax.nn.one_hot(experts_NxGxK.swapaxes(1, 2).reshape(n, k * g), e, dtype=jnp.float32)
        slot_NxTxE = jnp.cumsum(chosen_NxTxE, axis=1) - 1  # each choice's place in its expert's queue
        kept_NxTxE = chosen_NxTxE * (slot_NxTxE < capacity)
        slot_NxT = (slot_NxTxE * kept_NxTxE).sum(-1).astype(jnp.int32)
        place_NxTxExC = (
            kept_NxTxE[..., None] * jax.nn.one_hot(slot_NxT, capacity, dtype=jnp.float32)[:, :, None]
        )
        place_NxKxGxExC = place_NxTxExC.reshape(n, k, g, e, capacity)
        gates_NxKxG = gates_NxGxK.swapaxes(1, 2)
        dispatch_NxGxExC = place_NxKxGxExC.sum(1)  # 0 or 1: a token's choices are distinct experts
        combine_NxGxExC = (place_NxKxGxExC * gates_NxKxG[..., None, None]).sum(1)

        # Switch's load-balancing loss per group, E x sum_e f_e P_e (f: the share of first choices, P: the
        # mean router probability); 1 when balanced. Summed over groups here, averaged by the loss.
        first_NxE = chosen_NxTxE[:, :g].mean(1)
        # Terms of the step's sums (the loss's, the count's: train.loss_sum), summed over the groups here
        # (GSPMD: an all-reduce each, named for the loss's).
        with jax.named_scope("loss_sum"):
            self.sow(STATS, "aux_sum", e * jnp.sum(first_NxE * probs_NxGxE.mean(1)))
            self.sow(STATS, "dropped", (chosen_NxTxE - kept_NxTxE).sum())
        self.sow(STATS, "load", chosen_NxTxE.sum((0, 1)))
        return dispatch_NxGxExC, combine_NxGxExC

    def _experts(self, slots_ExNxCxD, dtype):
        """Every local expert's MLP on its slots: up (column-parallel over tp), GELU, down (row-parallel);
        the hidden slots stated at the experts, where the plan's to_experts put them."""
        cfg, plan = self.config, self.plan
        e, f, d = cfg.n_experts, cfg.mlp_dim, cfg.n_embd
        zeros = nn.initializers.zeros_init()

        def param(name, init, shape, names):
            return plan.param(self, name, init, plan.compute_shape(shape, names), names, dtype)

        def dense(subscripts, x, name, shape, names, std):
            kernel = param(f"{name}_kernel", nn.initializers.normal(std), shape, names)
            with megatron_scope(names[1:2], names[2:]):
                y = plan.einsum(subscripts, x, kernel, (*EXPERT_SLOTS, names[2]))
                y = plan.reduce_from_shards(y, names[1:2])
            if cfg.use_bias:
                y = y + param(f"{name}_bias", zeros, (e, shape[2]), (names[0], names[2]))[:, None, None]
            return y

        h_ExNxCxF = dense("encd,edf->encf", slots_ExNxCxD, "up", (e, d, f), ("expert", "embed", "mlp"), 0.02)
        h_ExNxCxF = jax.nn.gelu(
            plan.constrain(h_ExNxCxF, (*EXPERT_SLOTS, "mlp")), approximate=cfg.gelu_approximate
        )
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # minGPT's scaled init of residual projections
        return dense("encf,efd->encd", h_ExNxCxF, "down", (e, f, d), ("expert", "mlp", "embed"), residual_std)


def _top_k(probs_NxGxE, k: int):
    """(values, indices) of the k largest probabilities, lowest index first among equals (lax.top_k's
    order), by k argmaxes: a reduction each, which GSPMD partitions over the groups, where it gathers
    lax.top_k's whole input to every device."""
    values, indices, left = [], [], probs_NxGxE
    for _ in range(k):
        index_NxG = jnp.argmax(left, axis=-1)
        values.append(jnp.take_along_axis(left, index_NxG[..., None], axis=-1)[..., 0])
        indices.append(index_NxG)
        left = jnp.where(jax.nn.one_hot(index_NxG, left.shape[-1], dtype=bool), -jnp.inf, left)
    return jnp.stack(values, -1), jnp.stack(indices, -1)


def sown(stats, name: str) -> list[jax.Array]:
    """Every layer's sown `name` (STATS' aux_sum, load or dropped) from the collection `stats`, in layer
    order (a scanned model's are stacked over layers)."""
    flat = traverse_util.flatten_dict(stats)
    return [leaf for path, value in sorted(flat.items()) if path[-1] == name for leaf in value]


def total(stats, name: str) -> jax.Array:
    """The sum of `name` over every layer (and every group: each layer's is already summed over them)."""
    return sum(jnp.sum(leaf) for leaf in sown(stats, name))


def aux_loss_sum(config: ModelConfig, stats, seq_len: int) -> jax.Array:
    """The load-balancing loss as a term of the token-loss sum: weight x (mean over groups and layers of
    each group's loss) x tokens, so that the step's division by the token count leaves weight x the mean
    (exactly, where no target is ignored); a sum, so the devices' parts add up as the loss's do."""
    aux = total(stats, "aux_sum")
    return config.moe_aux_weight * config.moe_group_rows * seq_len * aux / config.n_layer
