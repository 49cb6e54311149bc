"""The train command's callbacks: the held-out loss and samples at each evaluation, the strict-JSON
metrics log, and SIGTERM's orderly stop. Each is a loop.Callback (or, for SIGTERM, the Trainer's `stop`).
"""

import argparse
import json
import math
import os
import signal
import threading
from pathlib import Path

from shardgpt.cli.flags import say

SAMPLE_CHARS = 200  # characters generated at each evaluation of a chars task
SAMPLING = dict(temperature=1.0, top_k=10)  # minGPT's chargpt samples so


class Evaluate:
    """Every --eval-every steps and at the last: the held-out loss (metrics' val_loss) and a text sample.

    The held-out batches are the val split's first --eval-batches, the same at every evaluation, so the
    losses compare; they are built once and kept on the devices.
    """

    def __init__(self, job, args: argparse.Namespace, shardings):
        from shardgpt.lab import runner
        from shardgpt.parallel import sharding
        from shardgpt.training import data
        from shardgpt.training import train as training

        s = job.setup
        self.job, self.every, self.last = job, args.eval_every, args.steps
        # Through the implementation that trains (a pp model evaluates on its pipeline's schedule).
        make_eval = runner.eval_builder(job.spec.impl)
        eval_sums = make_eval(s.model, s.mesh, s.strategy, shardings, job.spec.microbatches)
        self.loss = training.make_eval_loss(s.model, eval_sums)
        batch_sharding = sharding.batch_sharding(s.mesh, s.strategy)
        self.batches = [
            data.global_batch(s.task, i, job.spec.batch, batch_sharding, s.config.vocab_size, split="val")
            for i in range(args.eval_batches)
        ]
        self.sample = isinstance(s.task, data.CharTask)

    def on_train_begin(self, trainer): ...

    def wants_state(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step + 1 == self.last

    def on_step_end(self, trainer, step, metrics, state=None):
        import math

        import jax

        from shardgpt.generation import generate
        from shardgpt.parallel import sharding

        if state is None or not self.wants_state(step) or not math.isfinite(metrics["loss"]):
            return  # not an evaluation step (another callback's), or a NaN step that StopOnNonFinite ends
        metrics["val_loss"] = self.loss(state.params, self.batches)
        say(f"step {step + 1}: held-out loss {metrics['val_loss']:.4f} (train {metrics['loss']:.4f})")
        if self.sample:  # generated on the training mesh (every process takes part): one row per dp shard
            s = self.job.setup
            prompt = s.task.splits["val"][:8]
            room = s.config.block_size + 1 - len(prompt)
            (tokens, *_) = generate.generate(  # a fixed key per step: a resumed run prints the same sample
                s.model, state.params, [prompt] * sharding.batch_shards(s.mesh), min(SAMPLE_CHARS, room),
                mesh=s.mesh, strategy=s.strategy, sampling=generate.Sampling(**SAMPLING),
                key=jax.random.key(step),
            )  # fmt: skip
            say(f"sample:\n{s.task.decode(tokens)}\n")

    def on_train_end(self, trainer): ...


class Preemption:
    """SIGTERM (a scheduler's preemption, a requeue) while training: finish the step in flight, save, exit
    0. `asked(step)` tells the Trainer whether to stop before `step`; several processes must all stop at
    the same step, so they agree through a collective, and only at save steps (a host sync each time)."""

    def __init__(self, every: int):
        self.every, self.signalled, self._previous = every, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        self.signalled = True

    def asked(self, step: int) -> bool:
        import jax

        if jax.process_count() == 1:
            return self.signalled
        if step % self.every:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        return bool(multihost_utils.process_allgather(np.array(self.signalled)).any())

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class MetricsLog:
    """DIR/metrics.jsonl: one strict JSON object per step (step counted from 1, loss, grad_norm,
    tokens_per_s, lr); a NaN or inf value is written as null and named in "non_finite".

    On resume the lines of steps that run again are dropped first, through a temporary file renamed over
    the log, so a kill then leaves the old log or the new one, never half of one.
    """

    def __init__(self, path: Path, lr_schedule, first: int):
        self.path, self.lr = path, lr_schedule
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= first]
        fresh = path.with_name(path.name + ".tmp")
        fresh.write_text("".join(f"{line}\n" for line in kept))
        os.replace(fresh, path)

    def on_train_begin(self, trainer): ...

    def wants_state(self, step: int) -> bool:
        return False

    def on_step_end(self, trainer, step, metrics, state=None):
        record = {"step": step + 1, **metrics, "lr": float(self.lr(step))}
        bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
        record = {k: None if k in bad else v for k, v in record.items()} | (
            {"non_finite": bad} if bad else {}
        )
        with self.path.open("a") as log:  # a line at a time: a kill loses at most the line being written
            log.write(json.dumps(record, allow_nan=False) + "\n")

    def on_train_end(self, trainer): ...


def logged_losses(path: Path) -> dict[int, float | None]:
    """{step: loss} from a metrics.jsonl (None where it was NaN or inf); {} without one."""
    losses = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            record = json.loads(line)
            losses[int(record["step"])] = record["loss"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    return losses


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line cut by a kill: dropped


def write_report(job, args: argparse.Namespace, command: list[str]) -> Path | None:
    """report.html beside the run's metrics.jsonl (--ckpt-dir's, else --out's), from the first process;
    None where no metrics.jsonl was written."""
    import shlex

    import jax

    from shardgpt.lab import html_training, runner

    dirs = [Path(d) for d in (args.ckpt_dir, getattr(args, "out", None)) if d]
    metrics = next((d / "metrics.jsonl" for d in dirs if (d / "metrics.jsonl").is_file()), None)
    if metrics is None or jax.process_index() != 0:
        return None
    path = html_training.write(metrics, job.description, runner.meta(shlex.join(command)))
    say(f"wrote {path}")
    return path
