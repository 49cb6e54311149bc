"""Short training runs shared by test_equivalence, test_shard_map and test_multiprocess's workers, each
compiled and run once per session (per process).

Every run starts from the same host state and sees the same batches: the sort task, with row r also
ignoring its first r % 4 sorted targets, so dp shards hold unequal token counts and a per-shard mean loss
(instead of the global one) would show.
"""

import functools
from typing import NamedTuple

import jax
import numpy as np

from shardgpt.analysis import metrics, theory
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import distributed, sharding
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import data, optim, shard_map_step, train

STEPS, BATCH = 3, 16
TASK = data.SortTask()
MODEL = GPT(config.preset("gpt-pico", vocab_size=TASK.vocab_size, block_size=TASK.seq_len))
# Sequence parallelism needs a length tp divides: sort's 11 tokens plus one whose target is ignored.
SP_SEQ = 12
MODELS = {TASK.seq_len: MODEL, SP_SEQ: GPT(MODEL.config.replace(block_size=SP_SEQ))}
TX = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
SINGLE = "single"  # the mesh spec of the one-device reference


class Run(NamedTuple):
    losses: np.ndarray
    grad_norms: np.ndarray
    state: train.TrainState  # on the host
    hlo: str  # the compiled step's HLO text
    program: str  # the lowered step (StableHLO, before partitioning): its sharding constraints
    temp_bytes: int  # XLA's temporaries per device (compiled memory_analysis)


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
def initial_state(seq: int = TASK.seq_len) -> train.TrainState:
    """The step-0 state on the host, initialised once (on one device) and placed per mesh and strategy."""
    return jax.device_get(train.init_state(MODELS[seq], TX, mesh_for(SINGLE), "dp")[0])


@functools.cache
def run(impl: str, spec: str, strategy: str, microbatches: int = 1, seq: int = TASK.seq_len) -> Run:
    """STEPS steps of `impl` ("gspmd" or "shard_map") on mesh `spec` with `strategy`, each step's batch as
    `microbatches`, on sequences of `seq` (TASK.seq_len or SP_SEQ); one compile."""
    mesh, model = mesh_for(spec), MODELS[seq]
    shardings = train.state_shardings(model, TX, mesh, strategy)
    state = distributed.place(initial_state(seq), shardings.state)  # also across processes
    make = train.make_train_step if impl == "gspmd" else shard_map_step.make_train_step
    # .jitted carries its mesh: lowering it here compiles the very program that run.py trains with.
    step = make(model, TX, mesh, strategy, shardings, microbatches=microbatches)
    lowered = step.jitted.lower(state, batch(0, mesh, seq))
    compiled = lowered.compile()
    losses, norms = [], []
    for i in range(STEPS):
        state, step_metrics = compiled(state, batch(i, mesh, seq))
        losses.append(float(step_metrics["loss"]))
        norms.append(float(step_metrics["grad_norm"]))
    return Run(
        np.array(losses),
        np.array(norms),
        distributed.to_host(state),
        compiled.as_text(),
        lowered.as_text(),
        metrics.compiled_memory(compiled)["temp_bytes"],
    )


def by_cause(impl: str, spec: str, strategy: str, microbatches: int = 1, seq: int = TASK.seq_len) -> dict:
    """{(cause, kind): reconciliation row} (shardgpt.analysis.theory.by_cause) of run(...)'s compiled step."""
    mesh, model = mesh_for(spec), MODELS[seq]
    shardings = train.state_shardings(model, TX, mesh, strategy)
    params = jax.eval_shape(lambda: train.init_params(model, jax.random.key(0)))
    hlo = run(impl, spec, strategy, microbatches, seq).hlo
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
