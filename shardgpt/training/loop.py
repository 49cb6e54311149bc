"""The training loop: a Trainer that drives any compiled step (either implementation's) with callbacks,
progress and honest step times. It knows nothing of the model, the mesh or the strategy.
"""

import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

PROGRESS_LINES = 10  # without a terminal the Trainer prints this many progress lines, not a live bar


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
        state: Any,  # any pytree with a `step` (step.TrainState)
        batch_for: Callable[[int], dict],
        tokens_per_step: int,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        description: str = "train",
        stop: Callable[[int], bool] | None = None,
    ):
        self.train_step, self.state, self.batch_for = train_step, state, batch_for
        # Asked before each step is dispatched (with its index): True ends the run after the steps so far.
        self.stop, self.stopped = stop, False
        self.tokens_per_step = tokens_per_step
        self.callbacks, self.progress, self.description = list(callbacks), progress, description
        self.history: list[dict[str, float]] = []

    def run(self, steps: int) -> Any:
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
                if self.stop is not None and self.stop(step):
                    self.stopped = True
                    break
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

    def _report(self, step: int, metrics: dict, state: Any | None):
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
