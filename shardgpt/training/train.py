"""State created sharded from birth, the loss of a batch, and GSPMD's implementation of the one train step
(step.py), jitted once.

The loop that drives a step, its callbacks and progress, is loop.py's Trainer."""

import contextlib
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.model import moe
from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, microbatch, sharding
from shardgpt.parallel.gspmd_plan import GSPMDPlan
from shardgpt.training import data, loss, step
from shardgpt.training.step import TrainState


def loss_sum(model: GPT, params: Any, batch: dict, targets_BxL=None) -> tuple[jax.Array, jax.Array]:
    """(token-loss sum, token count) of `batch` in the model's plan: the forward pass, then the head fused
    with the chunked cross-entropy (shardgpt.training.loss), so the whole batch's logits never exist.
    `targets_BxL` replaces the batch's own (cp: this device's positions). A mixture of experts adds its
    load-balancing term to the sum, and its count is [token count, choices dropped past the capacity]."""
    targets_BxL = batch["targets"] if targets_BxL is None else targets_BxL
    cfg = model.config
    with jax.named_scope("forward"):  # the backward pass's ops are named transpose(jvp(forward))
        if cfg.moe:  # and the experts' load-balancing loss, a term of the sum
            (x_BxLxD, head_DxV), stats = model.apply(
                {"params": params}, batch["inputs"], head=False, mutable=[moe.STATS]
            )
        else:
            x_BxLxD, head_DxV = model.apply({"params": params}, batch["inputs"], head=False)
        loss_sum, count = loss.head_cross_entropy_sum(
            x_BxLxD, head_DxV, targets_BxL, cfg.vocab_size, model.plan
        )
        if cfg.moe:
            loss_sum = loss_sum + moe.aux_loss_sum(cfg, stats[moe.STATS], batch["inputs"].shape[1])
            dropped = moe.total(stats[moe.STATS], "dropped")
            count = jnp.stack([count, jax.lax.stop_gradient(dropped)])  # carried beside the count
        return loss_sum, count


@flax.struct.dataclass
class StateShardings:
    """The state's shardings, and the params' logical names they were derived from."""

    state: TrainState
    grads: Any
    params_axes: Any = flax.struct.field(pytree_node=False)


def param_axes(model: GPT) -> Any:
    """Logical axis names (one P of names per param) read from an abstract init: nothing is allocated."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
    return nn.get_partition_spec(boxed)


def init_params(model: GPT, rng: jax.Array) -> Any:
    """The model's freshly initialised params (unboxed); wrap in jax.eval_shape for shapes only."""
    return nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])


def param_shardings(model: GPT, mesh: Mesh, strategy: str, target: str = "params") -> Any:
    """NamedShardings of a params-shaped tree under `strategy`'s rules for `target`, validated."""
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return sharding.tree_shardings(abstract, param_axes(model), mesh, sharding.rules(strategy, target))


def state_shardings(
    model: GPT, tx: optax.GradientTransformation, mesh: Mesh, strategy: str
) -> StateShardings:
    """NamedShardings of every state leaf (and of the grads) for `strategy` on `mesh`, validated."""
    axes = param_axes(model)
    abstract = jax.eval_shape(lambda: _init(model, tx, jax.random.key(0)))
    opt_axes = sharding.param_subtree_axes(abstract.opt_state, axes)
    shard = lambda target, tree, tree_axes: sharding.tree_shardings(
        tree, tree_axes, mesh, sharding.rules(strategy, target)
    )
    # One abstract init serves every target: params, grads and opt_state differ only in their rules.
    state = TrainState(
        step=NamedSharding(mesh, P()),
        params=shard("params", abstract.params, axes),
        opt_state=shard("opt_state", abstract.opt_state, opt_axes),
    )
    return StateShardings(state=state, grads=shard("grads", abstract.params, axes), params_axes=axes)


def _init(model: GPT, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = init_params(model, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_state(model: GPT, tx: optax.GradientTransformation, mesh: Mesh, strategy: str, seed: int = 0):
    """(state, shardings): every leaf is created directly in its sharding; nothing is replicated first."""
    shardings = state_shardings(model, tx, mesh, strategy)
    init = jax.jit(lambda rng: _init(model, tx, rng), out_shardings=shardings.state)
    return init(jax.random.key(seed)), shardings


def abstract_state(
    model: GPT, tx: optax.GradientTransformation, mesh: Mesh, strategy: str
) -> tuple[TrainState, StateShardings]:
    """(state, shardings) with every leaf a jax.ShapeDtypeStruct carrying its sharding: nothing allocated.

    Lowering a step on it compiles the real program, so its memory can be read without running it.
    """
    shardings = state_shardings(model, tx, mesh, strategy)
    shapes = jax.eval_shape(lambda: _init(model, tx, jax.random.key(0)))
    place = lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)
    return jax.tree.map(place, shapes, shardings.state), shardings


def check_host_batch(model: GPT, batch: dict):
    """Raise on token ids outside the vocabulary in a host (numpy) batch, before it reaches the device.

    Device arrays are left alone (reading them back would stall the pipeline): data.global_batch checks
    its rows as it builds them.
    """
    vocab = model.config.vocab_size
    if not isinstance(batch["inputs"], jax.Array):
        data.check_ids(batch["inputs"], vocab, "batch inputs")
    if not isinstance(batch["targets"], jax.Array):
        data.check_ids(batch["targets"], vocab, "batch targets", allow_ignore=True)


class MeshBound:
    """A jitted function that is traced under its mesh whether it is called or lowered.

    Binding the mesh here makes `step.jitted.lower(...)` in a test compile the very program that training
    runs, under the same mesh context as its calls. With
    `quiet_donation` (CPU meshes: XLA:CPU implements no donation) the "donated buffers were not usable"
    warning is silenced for this function's calls only; on GPU and TPU it means the state is held twice.
    """

    def __init__(
        self, jitted: Callable, mesh: Mesh, quiet_donation: bool = False, relayout: Callable | None = None
    ):
        self.jitted, self.mesh, self.quiet_donation = jitted, mesh, quiet_donation
        self.relayout = relayout or (lambda *args: args)  # the arguments as the function types them

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), warnings.catch_warnings():
            if self.quiet_donation:
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            yield

    def __call__(self, *args):
        with self._context():
            return self.jitted(*self.relayout(*args))

    def lower(self, *args):
        """jax.jit's lower, under the mesh; `.compile()` the result to get the executable."""
        with self._context():
            return self.jitted.lower(*self.relayout(*args))


class GSPMD(step.Implementation):
    """The global arrays under the strategy's rules: the partitioner inserts every collective, the grads'
    layout alone deciding whether they are all-reduced (dp, zero1) or reduce-scattered (zero2, zero3)."""

    def __init__(self, model: GPT, mesh: Mesh, strategy: str, shardings: StateShardings):
        self.plan = GSPMDPlan(
            mesh, sharding.rules(strategy, "activations"), sharding.rules(strategy, "params")
        )
        self.model, self.shardings = model, shardings

    def loss(self, params, batch, read=None, plan: GSPMDPlan | None = None):
        return loss_sum(self.model.clone(plan=plan or self.plan), params, batch)

    def accumulate(self, params, batch, read, microbatches):
        # Each dp shard's partial gradients apart in a leading dim until the loop ends (microbatch.py),
        # whose loop takes the loss under its own rules.
        loss = lambda p, b, plan: self.loss(p, b, read, plan)
        return microbatch.gspmd_value_and_grad(
            loss, params, batch, microbatches, self.plan, self.shardings.grads
        )

    def reduce_grads(self, grads):
        return jax.lax.with_sharding_constraint(grads, self.shardings.grads)

    def to_param_layout(self, params):
        # Said here, inside the step's optimizer scope, rather than left to the output's sharding: ZeRO-1/2's
        # gather of the updated params then carries a name (an op at the output has none).
        return jax.lax.with_sharding_constraint(params, self.shardings.state.params)


def jit_with_batch(
    fn: Callable, mesh: Mesh, strategy: str, first: Any, out: Any, donate: bool = False
) -> Callable:
    """`fn(first, batch)` jitted once: `first` (a state or params) in its shardings, the batch in the
    strategy's, the outputs in `out` (shardings, or PartitionSpecs on `mesh`); `donate`: the first."""
    batch = sharding.batch_sharding(mesh, strategy)
    out = jax.tree.map(
        lambda o: NamedSharding(mesh, o) if isinstance(o, P) else o, out, is_leaf=lambda o: isinstance(o, P)
    )
    return jax.jit(
        fn,
        in_shardings=(first, {"inputs": batch, "targets": batch}),
        out_shardings=out,
        donate_argnums=0 if donate else (),
    )


def make_train_step(
    model: GPT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    strategy: str,
    shardings: StateShardings,
    microbatches: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The one train step (step.build) in GSPMD's implementation, jitted once with the strategy's in/out
    shardings and the state donated. With `microbatches` M > 1 the batch runs as M microbatches inside the
    step (shardgpt.parallel.microbatch)."""
    layout.check_mesh_axes(mesh, strategy, "gspmd", model.config)
    train_step = step.build(GSPMD(model, mesh, strategy, shardings), tx, microbatches)
    jitted = jit_with_batch(train_step, mesh, strategy, shardings.state, (shardings.state, P()), donate=True)
    return bind_step(jitted, model, mesh, strategy, microbatches)


def make_eval_sums(model: GPT, mesh: Mesh, strategy: str, shardings: StateShardings, microbatches: int = 1):
    """GSPMD's `eval_sums(params, batch) -> (loss sum, token count)`, jitted once with the state's param
    shardings (shard_map_step.make_eval_sums is its twin, with the same signature)."""
    eval_sums = step.build_eval(GSPMD(model, mesh, strategy, shardings))
    jitted = jit_with_batch(eval_sums, mesh, strategy, shardings.state.params, P())
    return MeshBound(jitted, mesh)


def make_eval_loss(model: GPT, eval_sums: Callable) -> Callable:
    """`eval_loss(params, batches)`: the mean cross-entropy over all non-ignored tokens of `batches`, one
    `eval_sums` (an implementation's make_eval_sums) per batch, dispatched back to back, read once."""

    def eval_loss(params, batches: Sequence[dict]) -> float:
        sums = []
        for batch in batches:
            check_host_batch(model, batch)
            sums.append(eval_sums(params, batch))
        totals = jax.device_get(sums)
        return sum(float(t) for t, _ in totals) / max(sum(int(c) for _, c in totals), 1)

    return eval_loss


def bind_step(
    jitted: Callable,
    model: GPT,
    mesh: Mesh,
    strategy: str,
    microbatches: int = 1,
    relayout: Callable | None = None,
) -> Callable:
    """`step(state, batch)`: the batch checked on the host, then `jitted` run under its mesh (its arguments
    first through `relayout`, where the function types them otherwise: explicit sharding's mesh).

    The step's `.jitted` (a MeshBound) lowers the same program for tests and benchmarks.
    """
    quiet = mesh.devices.flat[0].platform == "cpu"
    jitted = MeshBound(jitted, mesh, quiet_donation=quiet, relayout=relayout)

    def checked_step(state, batch):
        # Before any compile: the batch's shape against the mesh, the host batch's ids against the vocab.
        layout.check_batch(model.config, mesh, strategy, *batch["inputs"].shape, microbatches)
        check_host_batch(model, batch)
        return jitted(state, batch)

    checked_step.jitted = jitted
    return checked_step
