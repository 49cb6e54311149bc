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
# Made by the first process to start (pytest-xdist's controller) and inherited by its workers and by the
# processes tests start: a program two workers compile (the same reference run needed by two test files)
# compiles once. The maker removes it at exit.
if "SHARDGPT_TEST_JIT_CACHE" not in os.environ:
    _CACHE = tempfile.TemporaryDirectory(prefix="shardgpt-test-jit-")
    os.environ["SHARDGPT_TEST_JIT_CACHE"] = _CACHE.name
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SHARDGPT_TEST_JIT_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402  (after the environment is set)

SORT_STEPS = 150


@pytest.fixture(scope="session")
def trained_sort():
    """gpt-pico trained SORT_STEPS steps on minGPT's sort task under dp=2: (model, task, state, trainer).

    150 steps sort every one of 64 held-out problems (loss ~5e-4); 300 did too, at twice the suite time."""
    import jax

    from shardgpt.model import config
    from shardgpt.model.gpt import GPT
    from shardgpt.parallel import sharding
    from shardgpt.parallel.mesh import make_mesh
    from shardgpt.training import data, loop, optim, train

    task = data.SortTask()
    model = GPT(config.preset("gpt-pico", vocab_size=task.vocab_size, block_size=task.seq_len))
    tx = optim.make_optimizer(
        optim.OptimConfig(learning_rate=3e-3, warmup_steps=20, total_steps=SORT_STEPS, weight_decay=0.0)
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
    state = trainer.run(SORT_STEPS)
    trainer.events = recorder
    return model, task, state, trainer
