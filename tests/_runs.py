"""Short training runs shared by test_equivalence, test_spmd and test_multiprocess's workers, each compiled
and run once per session (per process).

Every run starts from the same host state and sees the same batches: the sort task, with row r also
ignoring its first r % 4 sorted targets, so dp shards hold unequal token counts and a per-shard mean loss
(instead of the global one) would show.
"""

import functools
from typing import NamedTuple

import jax
import numpy as np

from shardgpt import config, data, distributed, optim, sharding, spmd, train
from shardgpt.mesh import make_mesh
from shardgpt.model import GPT

STEPS, BATCH = 3, 16
TASK = data.SortTask()
MODEL = GPT(config.preset("gpt-pico", vocab_size=TASK.vocab_size, block_size=TASK.seq_len))
TX = optim.make_optimizer(optim.OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
SINGLE = "single"  # the mesh spec of the one-device reference


class Run(NamedTuple):
    losses: np.ndarray
    grad_norms: np.ndarray
    state: train.TrainState  # on the host
    hlo: str  # the compiled step's HLO text
    program: str  # the lowered step (StableHLO, before partitioning): its sharding constraints


def mesh_for(spec: str):
    return make_mesh("dp=1", jax.local_devices()[:1]) if spec == SINGLE else make_mesh(spec)


def batch(step: int, mesh) -> dict:
    inputs, targets = TASK.rows(step, range(BATCH))
    for r in range(BATCH):
        targets[r, TASK.length - 1 : TASK.length - 1 + r % 4] = data.IGNORE_INDEX
    batch_sharding = sharding.batch_sharding(mesh, "dp")
    return distributed.place({"inputs": inputs, "targets": targets}, batch_sharding)


@functools.cache
def initial_state() -> train.TrainState:
    """The step-0 state on the host, initialised once (on one device) and placed per mesh and strategy."""
    return jax.device_get(train.init_state(MODEL, TX, mesh_for(SINGLE), "dp")[0])


@functools.cache
def run(impl: str, spec: str, strategy: str) -> Run:
    """STEPS steps of `impl` ("gspmd" or "shard_map") on mesh `spec` with `strategy`; one compile."""
    mesh = mesh_for(spec)
    shardings = train.state_shardings(MODEL, TX, mesh, strategy)
    state = distributed.place(initial_state(), shardings.state)  # also across processes
    make = train.make_train_step if impl == "gspmd" else spmd.make_train_step
    # .jitted carries its mesh: lowering it here compiles the very program that run.py trains with.
    lowered = make(MODEL, TX, mesh, strategy, shardings).jitted.lower(state, batch(0, mesh))
    compiled = lowered.compile()
    losses, norms = [], []
    for i in range(STEPS):
        state, metrics = compiled(state, batch(i, mesh))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return Run(
        np.array(losses), np.array(norms), distributed.to_host(state), compiled.as_text(), lowered.as_text()
    )
