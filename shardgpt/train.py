"""TrainState, the loss, state created sharded from birth, a pure train step jitted once, and a Trainer."""

import contextlib
import math
import sys
import time
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
from tqdm.auto import tqdm

from shardgpt import data, loss, microbatch, pipeline, sharding
from shardgpt.model import GPT, head_DxV

PROGRESS_LINES = 10  # without a terminal the Trainer prints this many progress lines, not a live bar


@flax.struct.dataclass
class TrainState:
    """Everything that lives on device between steps; the optimizer and model are closed over."""

    step: jax.Array
    params: Any
    opt_state: Any


def loss_sum(model: GPT, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(token-loss sum, token count) of `batch`: the forward pass, then the head fused with the chunked
    cross-entropy (shardgpt.loss), so the whole batch's logits never exist. Trace under the logical rules."""
    cfg = model.config
    with jax.named_scope("forward"):  # the backward pass's ops are named transpose(jvp(forward))
        x_BxLxD = model.apply({"params": params}, batch["inputs"], head=False)
        return loss.head_cross_entropy_sum(x_BxLxD, head_DxV(params, cfg), batch["targets"], cfg.vocab_size)


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


def check_batch(model: GPT, mesh: Mesh, strategy: str, batch_size: int, seq_len: int, microbatches: int = 1):
    """Raise before compiling when the batch cannot run: too long for the context, not divisible by dp (or
    its dp shards by `microbatches`), a sequence that +sp cannot split over tp or cp over cp, or a pipeline
    that M microbatches cannot fill (pipeline.check)."""
    if seq_len > model.config.block_size:
        raise ValueError(
            f"sequence length {seq_len} exceeds the model's block_size {model.config.block_size}: "
            f"shorten the sequence or set model.block_size >= {seq_len}"
        )
    spec = sharding.batch_sharding(mesh, strategy).spec
    sharding.check_divisible("batch", (batch_size, seq_len), ("batch", "length"), spec, mesh)
    sharding.check_sequence_parallel(mesh, strategy, seq_len)
    data_axis = dict(sharding.rules(strategy, "activations"))["batch"]
    microbatch.check(batch_size, microbatches, mesh.shape[data_axis])
    cp, zigzag = mesh.shape.get("cp", 1), model.config.ring_layout == "zigzag"
    if cp > 1 and seq_len % (2 * cp if zigzag else cp):
        parts = f"2 x cp = {2 * cp} chunks (ring_layout zigzag)" if zigzag else f"cp={cp}"
        raise ValueError(
            f"sequence length {seq_len} is not divisible by {parts}: choose --seq a multiple of "
            f"{2 * cp if zigzag else cp} (a chars:PATH task; sort's length is odd), or another cp"
        )
    if (pp := mesh.shape.get("pp", 1)) > 1:
        pipeline.check(model.config.n_layer, pp, microbatches, batch_size // mesh.shape[data_axis])


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

    Activation constraints need a mesh in context (model.constrain raises without one), so binding it
    here makes `step.jitted.lower(...)` in a test compile the very program that training runs. With
    `quiet_donation` (CPU meshes: XLA:CPU implements no donation) the "donated buffers were not usable"
    warning is silenced for this function's calls only; on GPU and TPU it means the state is held twice.
    """

    def __init__(self, jitted: Callable, mesh: Mesh, quiet_donation: bool = False):
        self.jitted, self.mesh, self.quiet_donation = jitted, mesh, quiet_donation

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), warnings.catch_warnings():
            if self.quiet_donation:
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            yield

    def __call__(self, *args):
        with self._context():
            return self.jitted(*args)

    def lower(self, *args):
        """jax.jit's lower, under the mesh; `.compile()` the result to get the executable."""
        with self._context():
            return self.jitted.lower(*args)


def make_train_step(
    model: GPT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    strategy: str,
    shardings: StateShardings,
    microbatches: int = 1,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure train step, jitted once with the strategy's in/out shardings and the state donated.

    With `microbatches` M > 1 the batch runs as M microbatches inside the step (shardgpt.microbatch).
    """
    sharding.check_mesh_axes(mesh, strategy, "gspmd", model.config.n_layer, model.config.scan_layers)
    activation_rules = sharding.rules(strategy, "activations")
    batch_sharding = sharding.batch_sharding(mesh, strategy)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params, batch, rules):  # (token-loss sum, token count): summed over microbatches
            with nn.logical_axis_rules(rules):
                return loss_sum(model, params, batch)

        if microbatches == 1:
            (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, batch, activation_rules
            )
        else:
            (total, count), grads = microbatch.gspmd_value_and_grad(
                loss_fn, state.params, batch, microbatches, mesh, activation_rules, shardings.grads
            )
        with jax.named_scope("grad_reduce"):
            # The mean over every non-ignored token of the batch (never a mean of microbatch means).
            scale = 1 / jnp.maximum(count, 1)
            mean, grads = total * scale, jax.tree.map(lambda g: g * scale, grads)
            # The grad rules decide the reduction: all-reduce (dp, zero1) or reduce-scatter (zero2, zero3).
            grads = jax.lax.with_sharding_constraint(grads, shardings.grads)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {"loss": mean, "grad_norm": optax.tree.norm(grads)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    jitted = jax.jit(
        train_step,
        in_shardings=(shardings.state, {"inputs": batch_sharding, "targets": batch_sharding}),
        out_shardings=(shardings.state, NamedSharding(mesh, P())),
        donate_argnums=0,
    )
    return bind_step(jitted, model, mesh, strategy, microbatches)


def make_eval_loss(model: GPT, mesh: Mesh, strategy: str, shardings: StateShardings) -> Callable:
    """`eval_loss(params, batches)`: the mean cross-entropy over all non-ignored tokens of `batches`.

    One forward per batch, jitted once with the state's param shardings, so it serves either impl's state
    (both lay params out by the same rules) without moving them.
    """
    activation_rules = sharding.rules(strategy, "activations")
    batch_sharding = sharding.batch_sharding(mesh, strategy)

    def batch_loss_sum(params, batch):
        with nn.logical_axis_rules(activation_rules):
            return loss_sum(model, params, batch)

    jitted = MeshBound(
        jax.jit(
            batch_loss_sum,
            in_shardings=(shardings.state.params, {"inputs": batch_sharding, "targets": batch_sharding}),
            out_shardings=NamedSharding(mesh, P()),
        ),
        mesh,
    )

    def eval_loss(params, batches: Sequence[dict]) -> float:
        sums = []
        for batch in batches:
            check_host_batch(model, batch)
            sums.append(jitted(params, batch))  # dispatched back to back; read once at the end
        totals = jax.device_get(sums)
        return sum(float(t) for t, _ in totals) / max(sum(int(c) for _, c in totals), 1)

    return eval_loss


def bind_step(jitted: Callable, model: GPT, mesh: Mesh, strategy: str, microbatches: int = 1) -> Callable:
    """`step(state, batch)`: the batch checked on the host, then `jitted` run under its mesh.

    The step's `.jitted` (a MeshBound) lowers the same program for tests and benchmarks.
    """
    jitted = MeshBound(jitted, mesh, quiet_donation=mesh.devices.flat[0].platform == "cpu")

    def step(state, batch):
        check_batch(model, mesh, strategy, *batch["inputs"].shape, microbatches)  # before any compile
        check_host_batch(model, batch)
        return jitted(state, batch)

    step.jitted = jitted
    return step


class Callback:
    """Trainer hooks (minGPT style); override the ones you need. `metrics` holds Python floats."""

    def on_train_begin(self, trainer: "Trainer"): ...

    def wants_state(self, step: int) -> bool:
        """True to receive step `step`'s state in on_step_end (the Trainer then reads that step's metrics
        before dispatching the next, which donates the state)."""
        return False

    def on_step_end(self, trainer: "Trainer", step: int, metrics: dict[str, float], state: Any = None):
        """Step `step` (0-based; its state has state.step == step + 1) produced `metrics`; `state` is that
        step's TrainState when a callback's wants_state(step) said so or the step is the last, else None.
        Entries a callback adds to `metrics` (an evaluation's val_loss) reach the callbacks after it."""

    def on_train_end(self, trainer: "Trainer"): ...


class NonFiniteError(RuntimeError):
    """Training produced a NaN or inf; `step` counts from 1 (the failing step's state.step), as logs do."""

    def __init__(self, step: int, metrics: dict[str, float], what: str | None = None):
        what = what or ", ".join(f"{k} {v}" for k, v in metrics.items() if k in ("loss", "grad_norm"))
        super().__init__(f"step {step}: non-finite {what}: lower the learning rate or check the data")
        self.step = step


class StopOnNonFinite(Callback):
    """Raise NonFiniteError at the first step whose loss or grad norm is NaN or inf."""

    def on_step_end(self, trainer, step, metrics, state=None):
        values = [metrics[k] for k in ("loss", "grad_norm") if k in metrics]
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteError(step + 1, metrics)


class Trainer:
    """Runs `train_step` over `batch_for(step)`; knows nothing of GPT.

    Step t+1 is dispatched before step t's metrics are read, so the host never stalls the device and the
    tokens/s it reports is honest. A callback whose wants_state(t) is true gets step t's own state in
    on_step_end: the Trainer reads that step's metrics before the next dispatch donates the state.
    """

    def __init__(
        self,
        train_step: Callable,
        state: TrainState,
        batch_for: Callable[[int], dict],
        tokens_per_step: int,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        description: str = "train",
    ):
        self.train_step, self.state, self.batch_for = train_step, state, batch_for
        self.tokens_per_step = tokens_per_step
        self.callbacks, self.progress, self.description = list(callbacks), progress, description
        self.history: list[dict[str, float]] = []

    def run(self, steps: int) -> TrainState:
        """Train `steps` steps from the state's current step; returns the final state."""
        for cb in self.callbacks:
            cb.on_train_begin(self)
        first = int(self.state.step)
        # A live bar only on a terminal: in a log its carriage-return frames would fill hundreds of lines.
        live = self.progress and sys.stderr.isatty()
        self._every, self._first, self._steps = max(1, steps // PROGRESS_LINES), first, steps
        self._bar = tqdm(total=steps, desc=self.description, disable=not live, leave=False)
        self._live, self._last_time = live, time.perf_counter()
        pending = None  # (step, metrics) dispatched but not yet read
        try:
            for step in range(first, first + steps):
                self.state, metrics = self.train_step(self.state, self.batch_for(step))
                if pending is not None:  # read the previous step's metrics while this one runs
                    self._report(*pending, state=None)
                    pending = None
                if any(cb.wants_state(step) for cb in self.callbacks):
                    # The next dispatch donates this state: hand it over now, at the cost of one bubble.
                    self._report(step, metrics, state=self.state)
                else:
                    pending = (step, metrics)
            if pending is not None:
                self._report(*pending, state=self.state)
        finally:  # a callback may stop the run by raising (StopOnNonFinite)
            self._bar.close()
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state

    def _report(self, step: int, metrics: dict, state: TrainState | None):
        """Read step `step`'s metrics to the host, show progress, and call every on_step_end."""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        values["tokens_per_s"] = self.tokens_per_step / max(now - self._last_time, 1e-9)
        self._last_time = now
        self.history.append(values)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:,.0f}")
        done = step - self._first + 1
        if self.progress and not self._live and (done % self._every == 0 or done == self._steps):
            print(
                f"{self.description}: step {step + 1}/{self._first + self._steps}, "
                f"loss {values['loss']:.4f}, {values['tokens_per_s']:,.0f} tokens/s",
                file=sys.stderr,
                flush=True,
            )
        for cb in self.callbacks:
            cb.on_step_end(self, step, values, state)
