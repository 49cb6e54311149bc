"""Short training runs shared by test_equivalence, test_shard_map and test_multiprocess's workers, each
compiled and run once per session (per process), and the leaf-by-leaf comparison of their states.

Every run starts from the same host state and sees the same batches: the sort task, with row r also
ignoring its first r % 4 sorted targets, so dp shards hold unequal token counts and a per-shard mean loss
(instead of the global one) would show. Each run also keeps step 1's gradients, read from Adam's first
moment (`first_grads`): no second program is compiled for them.
"""

import functools
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from shardgpt.analysis import metrics, theory
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import distributed, sharding
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import data, explicit_step, optim, shard_map_step, train

STEPS, BATCH = 3, 16
TASK = data.SortTask()
MODEL = GPT(config.preset("gpt-pico", vocab_size=TASK.vocab_size, block_size=TASK.seq_len))
# Sequence parallelism needs a length tp divides: sort's 11 tokens plus one whose target is ignored.
SP_SEQ = 12
MODELS = {TASK.seq_len: MODEL, SP_SEQ: GPT(MODEL.config.replace(block_size=SP_SEQ))}
# A mixture of experts (8 experts, top-1, capacity 1.25): the sort task's 11-token rows are its routing
# groups, 2 slots an expert, so batches drop tokens (test_moe checks that they do).
MOE = GPT(config.preset("gpt-moe-pico", vocab_size=TASK.vocab_size, block_size=TASK.seq_len))


def model_for(seq: int, moe: bool = False) -> GPT:
    return MOE if moe else MODELS[seq]


OPTIM = optim.OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10)
TX = optim.make_optimizer(OPTIM)
SINGLE = "single"  # the mesh spec of the one-device reference


class Run(NamedTuple):
    losses: np.ndarray
    grad_norms: np.ndarray
    state: train.TrainState  # on the host
    hlo: str  # the compiled step's HLO text
    program: str  # the lowered step (StableHLO, before partitioning): its sharding constraints
    temp_bytes: int  # XLA's temporaries per device (compiled memory_analysis)
    grads: Any  # step 1's gradients on the host, before clipping (first_grads)
    types: tuple[tuple[str, ...], ...]  # jax.typeof of every state leaf after step 1 and after the last
    dropped: np.ndarray  # an MoE's choices dropped past the capacity at each step (empty: dense)


def mesh_for(spec: str):
    return make_mesh("dp=1", jax.local_devices()[:1]) if spec == SINGLE else make_mesh(spec)


def batch(step: int, mesh, seq: int = TASK.seq_len) -> dict:
    inputs, targets = TASK.rows(step, range(BATCH))
    for r in range(BATCH):
        targets[r, TASK.length - 1 : TASK.length - 1 + r % 4] = data.IGNORE_INDEX
    pad = ((0, 0), (0, seq - TASK.seq_len))
    inputs, targets = np.pad(inputs, pad), np.pad(targets, pad, constant_values=data.IGNORE_INDEX)
    batch_sharding = sharding.batch_sharding(mesh, "dp")
    return distributed.place({"inputs": inputs, "targets": targets}, batch_sharding)


@functools.cache
def initial_state(seq: int = TASK.seq_len, moe: bool = False) -> train.TrainState:
    """The step-0 state on the host, initialised once (on one device) and placed per mesh and strategy."""
    return jax.device_get(train.init_state(model_for(seq, moe), TX, mesh_for(SINGLE), "dp")[0])


@functools.cache
def run(
    impl: str, spec: str, strategy: str, microbatches: int = 1, seq: int = TASK.seq_len, moe: bool = False
) -> Run:
    """STEPS steps of `impl` ("gspmd", "shard_map" or "explicit") on mesh `spec` with `strategy`, each
    step's batch as `microbatches`, on sequences of `seq` (TASK.seq_len or SP_SEQ), of gpt-pico or with
    `moe` of gpt-moe-pico; one compile."""
    mesh, model = mesh_for(spec), model_for(seq, moe)
    shardings = train.state_shardings(model, TX, mesh, strategy)
    state = distributed.place(initial_state(seq, moe), shardings.state)  # also across processes
    make = {"gspmd": train.make_train_step, "shard_map": shard_map_step.make_train_step}.get(
        impl, explicit_step.make_train_step
    )
    # .jitted carries its mesh: lowering it here compiles the very program that run.py trains with.
    step = make(model, TX, mesh, strategy, shardings, microbatches=microbatches)
    lowered = step.jitted.lower(state, batch(0, mesh, seq))
    compiled = lowered.compile()
    losses, norms, types, mu_1, dropped = [], [], [], None, []
    for i in range(STEPS):
        state, step_metrics = compiled(state, batch(i, mesh, seq))
        losses.append(float(step_metrics["loss"]))
        norms.append(float(step_metrics["grad_norm"]))
        if "moe_dropped" in step_metrics:
            dropped.append(float(step_metrics["moe_dropped"]))
        if i in (0, STEPS - 1):  # read before the next call, which donates this state
            types.append(tuple(str(jax.typeof(leaf)) for leaf in jax.tree.leaves(state)))
        if i == 0:
            mu_1 = distributed.to_host(adam_state(state.opt_state).mu)
    return Run(
        np.array(losses),
        np.array(norms),
        distributed.to_host(state),
        compiled.as_text(),
        lowered.as_text(),
        metrics.compiled_memory(compiled)["temp_bytes"],
        first_grads(mu_1, norms[0]),
        tuple(types),
        np.array(dropped),
    )


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """Adam's (count, mu, nu) inside optim.make_optimizer's chain."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s))


def first_grads(mu_1, grad_norm_1: float):
    """Step 1's gradients from Adam's first moment after it. optim.make_optimizer clips, then runs Adam
    (weight decay is added to Adam's output, never to mu), and mu starts at 0: mu_1 = (1 - b1) g c, with
    c = min(1, grad_clip / |g|) and |g| the step's reported grad norm."""
    unclip = max(grad_norm_1, OPTIM.grad_clip) / OPTIM.grad_clip
    return jax.tree.map(lambda m: m * np.float32(unclip / (1 - OPTIM.b1)), mu_1)


# Leaf-by-leaf comparison, each leaf's largest difference over its own largest value: a leaf's wrong scale
# shows however small the leaf (the LayerNorms' gradients are ~1% of the head's) and whatever Adam's
# normalisation and the global norm make of it. Leaves whose gradient is 0 in exact arithmetic (the key
# bias: softmax ignores a shift shared by every key) hold rounding noise (~1e-10 of the largest gradient),
# which Adam turns into steps: they are measured against their tree's largest leaf instead. fp32 across
# every mesh, strategy and impl of the suite, the largest per-leaf errors seen were 6.6e-7 (step-1
# gradients), 6.5e-5 (params after 3 steps at lr 1e-3: the value kernel under +sp; Adam's first steps
# move an element by about lr whatever its gradient's size, so reduction-order noise in a near-zero
# gradient reaches the params), 1.2e-5 (mu) and 1.1e-5 (nu).
GRAD_RTOL, STATE_RTOL = 1e-5, 2e-4
ZERO_GRAD = 1e-6  # a reference gradient leaf below this fraction of the largest one is 0


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def leaf_errors(got: Any, ref: Any, zero: frozenset[str] = frozenset()) -> dict[str, float]:
    """{leaf path: max |got - ref| / max |ref|}, for the paths in `zero` over the tree's largest |ref|."""
    gots, refs = _flat(got), _flat(ref)
    assert gots.keys() == refs.keys(), sorted(gots.keys() ^ refs.keys())
    largest = max(np.abs(r).max() for r in refs.values())
    scale = {k: largest if k in zero else np.abs(r).max() for k, r in refs.items()}
    return {k: float(np.abs(gots[k] - r).max() / max(scale[k], 1e-30)) for k, r in refs.items()}


def zero_grad_leaves(grads: Any) -> frozenset[str]:
    """The paths of the gradient leaves that are 0 but for rounding (below ZERO_GRAD of the largest)."""
    sizes = {k: np.abs(g).max() for k, g in _flat(grads).items()}
    return frozenset(k for k, size in sizes.items() if size <= ZERO_GRAD * max(sizes.values()))


def off_leaves(got: Any, ref: Any, rtol: float, zero: frozenset[str] = frozenset()) -> dict[str, float]:
    """{path: error} of the leaves off by more than `rtol` (leaf_errors); NaN is off."""
    return {k: e for k, e in leaf_errors(got, ref, zero).items() if not e <= rtol}


def assert_grads_match(got: "Run", ref: "Run", where: str, rtol: float = GRAD_RTOL):
    """Step 1's gradients (before clipping), leaf by leaf within `rtol` (leaf_errors)."""
    off = off_leaves(got.grads, ref.grads, rtol, zero_grad_leaves(ref.grads))
    assert not off, f"{where}: step-1 gradients off by more than {rtol:g} of the leaf's largest: {off}"


def assert_state_matches(got: "Run", ref: "Run", where: str, rtol: float = STATE_RTOL):
    """The params and Adam's moments after STEPS steps, leaf by leaf within `rtol` (leaf_errors); the step
    counts exactly."""
    zero = zero_grad_leaves(ref.grads)
    got_adam, ref_adam = adam_state(got.state.opt_state), adam_state(ref.state.opt_state)
    trees = {
        "params": (got.state.params, ref.state.params),
        "Adam's mu": (got_adam.mu, ref_adam.mu),
        "Adam's nu": (got_adam.nu, ref_adam.nu),
    }
    for what, (a, b) in trees.items():
        off = off_leaves(a, b, rtol, zero)
        assert not off, f"{where}: {what} off by more than {rtol:g} of the leaf's largest: {off}"
    assert int(got.state.step) == int(ref.state.step) == int(got_adam.count) == STEPS, where


def by_cause(
    impl: str, spec: str, strategy: str, microbatches: int = 1, seq: int = TASK.seq_len, moe: bool = False
) -> dict:
    """{(cause, kind): reconciliation row} (shardgpt.analysis.theory.by_cause) of run(...)'s compiled step."""
    mesh, model = mesh_for(spec), model_for(seq, moe)
    shardings = train.state_shardings(model, TX, mesh, strategy)
    params = jax.eval_shape(lambda: train.init_params(model, jax.random.key(0)))
    hlo = run(impl, spec, strategy, microbatches, seq, moe).hlo
    rows = theory.by_cause(
        hlo, model.config, strategy, dict(mesh.shape), params, shardings, BATCH, seq, microbatches, impl
    )
    return {(row["cause"], row["kind"]): row for row in rows}


def off_theory(rows: dict) -> dict:
    """The rows whose compiled bytes are not exactly theory's: {(cause, kind): (compiled, theory)}."""
    return {
        key: (r["bytes"], r["theory_bytes"]) for key, r in rows.items() if r["bytes"] != r["theory_bytes"]
    }


def unattributed_share(rows: dict) -> float:
    total = sum(r["bytes"] for r in rows.values())
    return sum(r["bytes"] for (cause, _), r in rows.items() if cause == "unattributed") / max(total, 1)
