"""XLA's GPU flags: added only where jax will start on a GPU, never over the user's own, off on request."""

import os
import subprocess
import sys
from pathlib import Path

from shardgpt.parallel import xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_flags_join_the_users_without_overriding_them():
    mine = "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false"
    flags = xla_flags.with_gpu_flags(mine)
    assert flags.startswith(mine) and "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert xla_flags.named(flags) == xla_flags.named(mine) | set(xla_flags.GPU_FLAGS)
    assert xla_flags.with_gpu_flags(flags) == flags  # nothing is added twice
    bare = "--xla_gpu_enable_pipelined_all_gather"  # a bool flag given without a value is the user's too
    assert xla_flags.with_gpu_flags(bare).split().count(bare) == 1
    assert "pipelined_all_gather=" not in xla_flags.with_gpu_flags(bare)


def test_the_platform_is_judged_before_jax_starts():
    assert xla_flags.gpu_expected({"JAX_PLATFORMS": "cuda"})
    assert xla_flags.gpu_expected({"JAX_PLATFORMS": "gpu,cpu"})
    assert not xla_flags.gpu_expected({"JAX_PLATFORMS": "cpu"})
    assert not xla_flags.gpu_expected({"JAX_PLATFORMS": "cpu,cuda"})  # jax takes the first it can start


def _xla_flags_after(argv: list[str], environ: dict[str, str]) -> str:
    """XLA_FLAGS as experiments/run.py leaves them for `argv`, in a process that never imports jax."""
    code = (
        "import os, sys; from shardgpt.cli import flags, run; "
        "args = flags.parse_args(run.build_parser(), sys.argv[1:]); "
        "flags.set_xla_flags(args.devices, args.plan, args.gpu_flags); "
        "assert 'jax' not in sys.modules; print(os.environ['XLA_FLAGS'])"
    )
    env = {**os.environ, **environ}
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_run_py_sets_them_on_a_gpu_only_and_not_with_no_gpu_flags():
    user = {"XLA_FLAGS": "--xla_gpu_enable_while_loop_double_buffering=false"}
    on_gpu = _xla_flags_after([], {"JAX_PLATFORMS": "cuda", **user})
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in on_gpu
    assert "double_buffering=false" in on_gpu and "double_buffering=true" not in on_gpu
    for argv, platform in (([], "cpu"), (["--no-gpu-flags"], "cuda")):
        flags = _xla_flags_after(argv, {"JAX_PLATFORMS": platform, **user})
        assert not xla_flags.named(flags) & (set(xla_flags.GPU_FLAGS) - xla_flags.named(user["XLA_FLAGS"]))
