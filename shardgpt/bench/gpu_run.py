"""The one-GPU benchmark's clock: sections in priority order, each under its own time limit inside the run's
budget, every measurement's outcome recorded (ok, skipped with the reason, or its error), results.json
rewritten as each one finishes so that a run cut short keeps what it measured.

Cooperative: a section starts only while the run has time left; a measurement starts only if its projected
time fits what is left of its section's limit and of the run's budget. Nothing in this process is
interrupted, so one measurement can overrun by its own length; another process (the anchor, a child) is
killed at the limit. A section that raises records its error and the next one runs. Imports no jax.
"""

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any):
    """`data` as JSON at `path`, whole or not at all: written beside it, then renamed over it, so a process
    killed mid-write leaves the last complete file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=1, default=str))
    os.replace(partial, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """What `path` holds, or None where it is missing or unreadable (a writer without write_json's rename,
    e.g. the anchor, killed mid-write)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def error_text(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


class Skipped(Exception):
    """A section that cannot run here: Run.section records it as skipped, with this reason."""


class Run:
    """The run's results, its budget and the section now running; `save` rewrites OUT/results.json."""

    def __init__(self, results: dict[str, Any], out: Path, budget_s: float, limits: dict[str, float]):
        self.results, self.out, self.budget_s, self.limits = results, out, budget_s, limits
        self.started = time.perf_counter()
        self.results["meta"]["wall_s"] = 0.0  # table.txt may be drawn before the first save
        self.current: str | None = None  # the section running
        self.section_end = math.inf

    def save(self):
        self.results["meta"]["wall_s"] = time.perf_counter() - self.started
        write_json(self.out / "results.json", self.results)

    def left_s(self) -> float:
        """Seconds left to the section running: its limit or the run's budget, whichever ends first."""
        return min(self.started + self.budget_s, self.section_end) - time.perf_counter()

    def why_not(self, projected_s: float) -> str | None:
        """Why a measurement projected to take `projected_s` must not start; None if it may."""
        now = time.perf_counter()
        budget_left = self.started + self.budget_s - now
        if projected_s > budget_left or budget_left <= 0:
            return (
                f"projected {projected_s:.0f} s, past the run's {self.budget_s:g} s budget "
                f"({budget_left:.0f} s left)"
            )
        section_left = self.section_end - now
        if projected_s > section_left or section_left <= 0:
            limit = self.limits[self.current]
            return (
                f"projected {projected_s:.0f} s, past the {self.current} section's {limit:g} s limit "
                f"({section_left:.0f} s left)"
            )
        return None

    def section(self, name: str, body: Callable[["Run"], Any]) -> dict[str, Any]:
        """Run body(self) as section `name` under its limit; record its status, error and wall time."""
        limit, budget_left = self.limits[name], self.budget_s - (time.perf_counter() - self.started)
        record = dict(status=None, error=None, limit_s=limit, wall_s=None)
        self.results["sections"][name] = record
        if limit <= 0:
            record |= dict(status="skipped", error=f"its limit is 0 s (--limit {name}=0)")
        elif budget_left <= 0:
            record |= dict(status="skipped", error=f"past the run's {self.budget_s:g} s budget")
        else:
            begin = time.perf_counter()
            self.current, self.section_end = name, begin + limit
            try:
                body(self)
                record["status"] = "ok"
            except Skipped as e:
                record |= dict(status="skipped", error=str(e))
            except Exception as e:  # a bug or a failure the section did not catch: the next section runs
                record |= dict(status="error", error=error_text(e))
            finally:
                self.current, self.section_end = None, math.inf
            record["wall_s"] = time.perf_counter() - begin
        print(json.dumps({"section": name} | record), flush=True)
        self.save()
        return record

    def attempt(self, row: dict[str, Any], measure: Callable[[], dict], projected_s: float = 0.0) -> dict:
        """Fill `row` from measure(): skipped where its projected time does not fit, its error if it fails;
        saved either way."""
        row["projected_s"] = projected_s
        reason = self.why_not(projected_s)
        if reason:
            row |= dict(status="skipped", error=reason)
        else:
            begin = time.perf_counter()
            try:
                row |= measure() | dict(status="ok")
            except Skipped as e:  # e.g. too little time left to start its second process
                row |= dict(status="skipped", error=str(e))
            except Exception as e:  # cuDNN unsupported, out of memory: recorded, and the run goes on
                row |= dict(status="error", error=error_text(e))
            row["wall_s"] = time.perf_counter() - begin
        shown = {k: v for k, v in row.items() if k not in ("per_token_s", "memory", "predicted")}
        print(json.dumps(shown, default=str), flush=True)
        self.save()
        return row


def run_process(
    command: Sequence[str], env: dict[str, str], timeout_s: float, log: Path
) -> tuple[int | None, str]:
    """Run `command` with its output in `log`; (exit status, or None if killed at `timeout_s`; the log's
    last lines). The process gets its own session so the whole group dies at the timeout."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            list(command), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            status: int | None = process.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
        except BaseException:  # Ctrl-C or SIGTERM here: its own session would outlive us, holding the device
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
    tail = log.read_text(errors="replace").strip().splitlines()[-8:]
    return status, "\n".join(tail)
