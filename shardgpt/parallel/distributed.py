"""More than one process: jax.distributed from flags, JAX_* variables or a cluster, a local launcher, and
host copies of arrays that span processes.

`launch` starts N local worker processes over simulated CPU devices, the stand-in for N hosts: each runs
the same script with its own --process-id, coordinated on a free localhost port. The parent streams
worker 0's output, and if any worker fails it stops the others (none is left behind) and names it.
"""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

# Environment variables that say a cluster launched this process, and the one giving the process count
# (None: the cluster's API knows it); jax's own detection (jax.distributed.initialize() without arguments)
# reads the rest from the same places. Kubernetes: an indexed Job (jax asks the API, through the
# `kubernetes` package, for its peers).
CLUSTERS = {
    "SLURM": (("SLURM_JOB_ID",), "SLURM_NTASKS"),
    "Open MPI": (("OMPI_MCA_orte_hnp_uri",), "OMPI_COMM_WORLD_SIZE"),
    "Kubernetes": (("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX"), None),
}
# gloo's C++ prints a connection line per collective group, not ours to show; its pieces may arrive apart
# (a dangling "[Gloo] Rank " glued to another line, the rest on a line of its own).
_GLOO_NOISE = re.compile(
    rb"\[Gloo\] Rank |\d+ is connected to \d+ peer ranks\. Expected number of connected peer ranks is : \d+"
)
STOP_GRACE_S = 3.0  # a stopped worker gets this long to exit on SIGTERM before SIGKILL
FINISH_GRACE_S = 60.0  # once one worker is done, the others must be within this long (else: hung)


def detected_cluster(environ: dict[str, str] | None = None) -> str | None:
    """The name of the cluster that launched more than one process here, from its variables, or None."""
    environ = os.environ if environ is None else environ
    for name, (markers, count) in CLUSTERS.items():
        several = count is None or (environ.get(count, "1").isdigit() and int(environ.get(count, "1")) > 1)
        if all(m in environ for m in markers) and several:
            return name
    return None


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None):
    """Start jax.distributed when this is one of several processes (else do nothing).

    Explicit settings (flags, or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID behind them)
    win; else a cluster's own variables (SLURM, Open MPI, a Kubernetes indexed Job), which jax reads itself.
    """
    import jax

    _die_with_launcher()
    if coordinator or num_processes:
        missing = [flag for flag, v in (("--coordinator", coordinator), ("--num-processes", num_processes),
                                         ("--process-id", process_id)) if v is None]  # fmt: skip
        if missing:
            raise ValueError(
                f"multi-process settings incomplete: give {', '.join(missing)} too (or the JAX_* variables), "
                "or --processes N to start N local processes"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} must be in [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif detected_cluster():
        jax.distributed.initialize()


def to_host(tree: Any) -> Any:
    """numpy copies of a tree of global arrays, on every process, also where they span processes."""
    import jax
    from jax.experimental import multihost_utils

    leaves = jax.tree.leaves(tree)
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def place(tree: Any, shardings: Any) -> Any:
    """Host values that every process holds whole, as global arrays with `shardings` (a tree like `tree`,
    or one sharding for every leaf): each process puts only its own devices' slices (jax.device_put
    cannot reach other processes' devices)."""
    import jax
    import numpy as np

    def one(value, where):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, where, lambda index: value[index])

    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda value: one(value, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def free_port() -> int:
    """A localhost TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHER = "SHARDGPT_LAUNCHER_PID"  # set by launch() in its workers' environment


def _die_with_launcher():
    """In a worker that launch() started: have Linux SIGKILL it when the launcher dies, even by kill -9,
    so no worker outlives it (set here, not in a fork hook: jax's threads make forking unsafe)."""
    launcher = os.environ.pop(_LAUNCHER, None)  # not inherited by this worker's own children
    if launcher is None:
        return
    if int(launcher) != os.getppid():
        sys.exit(f"the launcher (pid {launcher}) is gone; exiting")
    with contextlib.suppress(Exception):  # best effort: elsewhere the launcher's own cleanup must do
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _forward(pipe, out):
    """Copy worker 0's stream line by line, without gloo's connection chatter."""
    for line in iter(pipe.readline, b""):
        line = _GLOO_NOISE.sub(b"", line)
        if line.strip():
            if hasattr(out, "buffer"):
                out.buffer.write(line)
            else:  # a text stream without bytes underneath (e.g. io.StringIO under redirect_stdout)
                out.write(line.decode(errors="replace"))
            out.flush()
    pipe.close()


def launch(script: str, argv: Sequence[str], processes: int, devices: int, prog: str) -> int:
    """Run `script argv` as `processes` local workers over `devices` simulated CPU devices in all; `script`
    is a .py file, or a module's dotted name (run as `python -m`).

    Returns worker 0's exit status, or a failed worker's (1 for a hung one): the others are stopped first.
    """
    if processes < 2:
        raise ValueError(f"--processes must be >= 2 (1 is the ordinary run), got {processes}")
    if devices % processes:
        raise ValueError(
            f"--processes {processes} must divide the {devices} simulated devices: each process holds "
            "the same number (change --devices or --processes)"
        )
    port, local = free_port(), devices // processes
    # Simulated CPU devices only (a GPU is not shared this way).
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_LAUNCHER: str(os.getpid())})
    # XLA_FLAGS pass through (the suite's -O0 included); each worker replaces the device count (--devices).
    workers, threads = [], []
    with contextlib.ExitStack() as files:
        # Worker 0 speaks for the run (its output is streamed); the others' stderr is kept to explain a
        # failure.
        logs = [subprocess.PIPE] + [
            files.enter_context(tempfile.TemporaryFile()) for _ in range(processes - 1)
        ]
        try:
            for i, log in enumerate(logs):
                where = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
                where += ["--process-id", str(i), "--devices", str(local)]
                program = [script] if script.endswith(".py") else ["-m", script]
                command = [sys.executable, *program, *argv, *where]
                out = subprocess.PIPE if i == 0 else subprocess.DEVNULL
                workers.append(subprocess.Popen(command, env=env, stdout=out, stderr=log))
            for pipe, stream in ((workers[0].stdout, sys.stdout), (workers[0].stderr, sys.stderr)):
                threads.append(threading.Thread(target=_forward, args=(pipe, stream), daemon=True))
                threads[-1].start()
            failed = _wait(workers, FINISH_GRACE_S)
        except KeyboardInterrupt:
            return 130
        finally:
            _stop(workers)  # no worker outlives the launcher
            for thread in threads:
                thread.join(timeout=5)
        if failed is None:
            return 0
        index, what = failed
        if index != 0:  # worker 0's own output was streamed already
            logs[index].seek(0)
            lines = logs[index].read().decode(errors="replace").strip().splitlines()
            tail = "".join(f"\n  {line}" for line in lines[-5:] if not _GLOO_NOISE.search(line.encode()))
            print(f"{prog}: error: worker {index} of {processes} {what}{tail}", file=sys.stderr)
    print(f"{prog}: stopped the other workers (worker {index} {what})", file=sys.stderr)
    status = workers[index].returncode
    return status if status > 0 else 1


def _wait(workers: list[subprocess.Popen], grace_s: float) -> tuple[int, str] | None:
    """Wait for every worker: None when all exit 0, else (index, what happened) of the first that failed,
    or of one still running `grace_s` after another finished (a hung worker); the rest still run."""
    finished_at = None
    while True:
        codes = [w.poll() for w in workers]
        for i, code in enumerate(codes):
            if code not in (None, 0):
                return i, f"exited with status {code}"
        if all(code == 0 for code in codes):
            return None
        if finished_at is None and 0 in codes:
            finished_at = time.monotonic()
        if finished_at is not None and time.monotonic() - finished_at > grace_s:
            i = codes.index(None)
            return i, f"was still running {grace_s:.0f} s after worker {codes.index(0)} finished"
        time.sleep(0.05)


def _stop(workers: list[subprocess.Popen]):
    """SIGTERM every worker still running, SIGKILL those that outlive the grace, and reap them all."""
    for w in workers:
        if w.poll() is None:
            w.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for w in workers:
        try:
            w.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
