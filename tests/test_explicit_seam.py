"""The step's seam holds a third implementation: a minimal dp-only step in explicit sharding (mesh axes of
AxisType.Explicit, every array's sharding part of its type) plugs into step.build through a plan and an
Implementation alone, and trains like GSPMD's dp on the same mesh.

Tolerance: losses and grad norms within 1e-5 absolute over the 3 steps of tests/_runs.py (fp32; only the
order of the reductions differs). The real explicit implementation is the explicit-sharding issue's.
"""

import _runs
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.model.plan import Plan
from shardgpt.parallel import sharding
from shardgpt.parallel.shard_map_plan import active_axes, drop_inactive
from shardgpt.training import step, train

AXES = ("dp", "pp", "cp", "tp")


class ExplicitPlan(Plan):
    """The global view whose layout is in the arrays' types: a constraint is a reshard (a no-op where the
    type already says it), and a lookup says where its rows go."""

    def __init__(self, mesh, rules):
        self.mesh, self.rules = mesh, tuple(rules)

    def constrain(self, x, names):
        spec = drop_inactive(nn.logical_to_mesh_axes(names, self.rules), active_axes(self.mesh))
        return jax.sharding.reshard(x, spec)

    def embed(self, table_VxD, ids_BxL):  # a gather's output sharding must be stated in explicit mode
        spec = jax.typeof(ids_BxL).sharding.spec
        return table_VxD.at[ids_BxL].get(mode="fill", fill_value=0, out_sharding=P(*spec, None))

    def batch_shards(self):
        return self.mesh.shape["dp"]


class ExplicitDP(step.Implementation):
    """Params replicated, the batch split over dp: jax types each gradient as replicated and reduces it."""

    def __init__(self, model, mesh):
        self.plan = ExplicitPlan(mesh, sharding.rules("dp", "activations"))
        self.model = model.clone(plan=self.plan)

    def loss(self, params, batch, read):
        return train.loss_sum(self.model, params, batch)


def test_an_explicit_dp_step_plugs_into_the_seam_and_trains_like_gspmd():
    mesh = jax.make_mesh((8, 1, 1, 1), AXES, axis_types=(AxisType.Explicit,) * 4)
    host_state = _runs.initial_state()
    batches = [jax.device_get(_runs.batch(i, _runs.mesh_for("dp=8"))) for i in range(_runs.STEPS)]
    losses, norms = [], []
    with jax.set_mesh(mesh):
        state = jax.device_put(host_state, NamedSharding(mesh, P()))
        train_step = jax.jit(step.build(ExplicitDP(_runs.MODEL, mesh), _runs.TX), donate_argnums=0)
        for batch in batches:
            state, metrics = train_step(state, jax.device_put(batch, P("dp")))
            losses.append(float(metrics["loss"]))
            norms.append(float(metrics["grad_norm"]))
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state)), "state left its layout"
    ref = _runs.run("gspmd", "dp=8", "dp")
    np.testing.assert_allclose(losses, ref.losses, rtol=0, atol=1e-5, err_msg="losses")
    np.testing.assert_allclose(norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg="grad norms")
