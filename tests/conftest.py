"""Test setup, before jax initialises: 8 simulated CPU devices, XLA's CPU backend at -O0, and one
compilation cache for the session.

-O0 cuts compile time 2-4x on this 2-core machine; every comparison in the suite runs both sides under
the same flags, and the suite checks numerics, not speed. The cache (a fresh directory per session, shared
with the processes the tests start) lets a program compiled once, e.g. by a killed train.py and then by its
resume, be compiled once.
"""

import os
import tempfile

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
_present = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_present, *(f for f in _FLAGS if f.split("=")[0] not in _present)]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_CACHE = tempfile.TemporaryDirectory(prefix="shardgpt-test-jit-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE.name
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def trained_sort():
    """gpt-pico trained 300 steps on minGPT's sort task under dp=2: (model, task, state, trainer)."""
    import jax

    from shardgpt.model import config
    from shardgpt.model.gpt import GPT
    from shardgpt.parallel import sharding
    from shardgpt.parallel.mesh import make_mesh
    from shardgpt.training import data, loop, optim, train

    task = data.SortTask()
    model = GPT(config.preset("gpt-pico", vocab_size=task.vocab_size, block_size=task.seq_len))
    tx = optim.make_optimizer(
        optim.OptimConfig(learning_rate=3e-3, warmup_steps=20, total_steps=300, weight_decay=0.0)
    )
    mesh = make_mesh("dp=2", jax.devices()[:2])  # few simulated devices: they share 2 cores
    state, shardings = train.init_state(model, tx, mesh, "dp")
    step_fn = train.make_train_step(model, tx, mesh, "dp", shardings)
    batch_sharding = sharding.batch_sharding(mesh, "dp")
    recorder = []

    class Record(loop.Callback):
        def on_train_begin(self, trainer):
            recorder.append("begin")

        def on_step_end(self, trainer, step, metrics, state=None):
            recorder.append(step)

        def on_train_end(self, trainer):
            recorder.append("end")

    trainer = loop.Trainer(
        step_fn,
        state,
        lambda i: data.global_batch(task, i, 64, batch_sharding),
        tokens_per_step=64 * task.seq_len,
        callbacks=[Record()],
        progress=False,
    )
    state = trainer.run(300)
    trainer.events = recorder
    return model, task, state, trainer
