"""The training loop: a Trainer that drives any compiled step (either implementation's) with callbacks,
progress and honest step times. It knows nothing of the model, the mesh or the strategy.
"""

import collections
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

PROGRESS_LINES = 10  # without a terminal the Trainer prints this many progress lines, not a live bar
# Progress shows tokens/s over the last this many steps, time in callbacks (an evaluation) left out: one
# step's rate swings 3x just after an evaluation, which is the evaluation's cost, not the step's.
SMOOTHING_STEPS = 20


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
        log_every: int | None = None,
    ):
        self.train_step, self.state, self.batch_for = train_step, state, batch_for
        # Asked before each step is dispatched (with its index): True ends the run after the steps so far.
        self.stop, self.stopped = stop, False
        self.tokens_per_step = tokens_per_step
        self.callbacks, self.progress, self.description = list(callbacks), progress, description
        # A progress line every `log_every` steps (default: PROGRESS_LINES lines per run, and only without a
        # terminal; given, also under a terminal's live bar).
        self.log_every = log_every
        self.history: list[dict[str, float]] = []

    def run(self, steps: int) -> Any:
        """Train `steps` steps from the state's current step; returns the final state."""
        for cb in self.callbacks:
            cb.on_train_begin(self)
        first = int(self.state.step)
        # A live bar only on a terminal: in a log its carriage-return frames would fill hundreds of lines.
        live = self.progress and sys.stderr.isatty()
        self._every = self.log_every or max(1, steps // PROGRESS_LINES)
        self._first, self._steps = first, steps
        self._bar = tqdm(
            total=steps, desc=self.description, disable=not live, leave=False, **_fallback_size()
        )
        self._live, self._started = live, time.perf_counter()
        self._last_time, self._callback_s = self._started, 0.0
        self._recent: collections.deque = collections.deque(maxlen=SMOOTHING_STEPS)  # seconds per step
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
        interval = now - self._last_time
        values["tokens_per_s"] = self.tokens_per_step / max(interval, 1e-9)  # this step's own (history)
        self._recent.append(max(interval - self._callback_s, 0.0))  # less the callbacks since the last
        self._last_time, self._callback_s = now, 0.0
        self.history.append(values)
        smoothed = self.tokens_per_step * len(self._recent) / max(sum(self._recent), 1e-9)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{smoothed:,.0f}")
        done = step - self._first + 1
        at_line = done % self._every == 0 or done == self._steps
        if self.progress and at_line and (not self._live or self.log_every):
            self._bar.write(self._line(step, values["loss"], smoothed, now), file=sys.stderr)
            sys.stderr.flush()
        for cb in self.callbacks:
            cb.on_step_end(self, step, values, state)
        self._callback_s = time.perf_counter() - now

    def _line(self, step: int, loss: float, smoothed: float, now: float) -> str:
        """A progress line: step, loss, tokens/s over the recent steps, elapsed time and the time left."""
        left = self._first + self._steps - step - 1
        eta = left * sum(self._recent) / len(self._recent)
        return (
            f"{self.description}: step {step + 1}/{self._first + self._steps}, loss {loss:.4f}, "
            f"{smoothed:,.0f} tokens/s (last {len(self._recent)} steps), elapsed {clock(now - self._started)}"
            + (f", ETA {clock(eta)}" if left else "")
        )


def clock(seconds: float) -> str:
    """Seconds as a clock: 7s, 3:05, 1:02:09."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}:{m:02d}:{s:02d}" if hours else f"{m}:{s:02d}"


def _fallback_size() -> dict[str, int]:
    """tqdm's ncols and nrows where the terminal reports 0 (some pseudo-terminals do): tqdm then draws
    nothing at all. Empty where the terminal reports its size, or where there is none."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: v for k, v, given in (("ncols", 80, size.columns), ("nrows", 24, size.lines)) if not given}
