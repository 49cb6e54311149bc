"""GSPMD's plan: the model written for the global arrays, its activations constrained by logical rules on
a mesh, and XLA's partitioner inserting whatever collectives make the layouts meet.

The mesh and the rules are the plan's own, passed in, never flax's ambient ones, so a call says which
layout it computes in and a program lowered anywhere is the one that runs.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh

from shardgpt.model.moe import EXPERT_SLOTS, TOKEN_SLOTS
from shardgpt.model.plan import Plan, saving_all_but
from shardgpt.parallel import sharding


class GSPMDPlan(Plan):
    """The global view under `rules` (logical name -> mesh axis, sharding.rules' activations) on `mesh`."""

    def __init__(self, mesh: Mesh, rules: Sequence[tuple[str, str | None]], param_rules: Sequence = ()):
        self.mesh, self.rules, self.param_rules = mesh, tuple(rules), tuple(param_rules)
        # The logical names whose params ZeRO-3 splits over dp (and gathers when used).
        self.gathered = {name for name, axis in self.param_rules if axis == sharding.ZERO_AXIS}
        if self.gathered:  # ZeRO-3: params on dp
            # The blocks' backward pass reads each param again through its named constraint (recomputed,
            # never saved), so newer XLA names the backward re-gathers too.
            self.remat_policy = saving_all_but("sharding_constraint")

    def param(self, module, name, init, shape, names, dtype=None):
        value = super().param(module, name, init, shape, names, dtype)
        if not self.gathered.intersection(names):
            # Stored as computed: no constraint, whose result the layer loop would save as a copy of the
            # weight for the backward pass (+10% temporaries on dp=8).
            return value
        # The param as stored, said inside the scope (a no-op constraint): from jax 0.11 XLA names ZeRO-3's
        # gather after its operand's producer, which is then this scope's (up to 0.10, after the matmul).
        with jax.named_scope("zero3_gather"):
            return nn.with_logical_constraint(value, names, rules=self.param_rules, mesh=self.mesh)

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return nn.with_logical_constraint(x, names, rules=self.rules, mesh=self.mesh)

    def to_experts(self, x_ExNxCxD):
        # Both layouts stated in the scope: the all-to-all between them, and its transpose, are named by it
        # (and GSPMD cannot let the experts' layout propagate back into the dispatch's einsum).
        with jax.named_scope("moe.dispatch"):
            x_ExNxCxD = self.constrain(x_ExNxCxD, (*TOKEN_SLOTS, "embed"))
            return self.constrain(x_ExNxCxD, (*EXPERT_SLOTS, "embed"))

    def from_experts(self, y_ExNxCxD):
        with jax.named_scope("moe.combine"):
            y_ExNxCxD = self.constrain(y_ExNxCxD, (*EXPERT_SLOTS, "embed"))
            return self.constrain(y_ExNxCxD, (*TOKEN_SLOTS, "embed"))

    def batch_shards(self) -> int:
        return sharding.axes_size(self.mesh, dict(self.rules).get("batch"))

    def with_rules(self, rules: Sequence[tuple[str, str | None]]) -> "GSPMDPlan":
        """The same mesh under other rules (the microbatch loop's blocks keep the batch off dp)."""
        # Without the params' constraint: inside the loop's vmap over dp, a constraint may not name dp.
        return GSPMDPlan(self.mesh, rules)
