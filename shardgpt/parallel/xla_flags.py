"""XLA's GPU performance flags, added to XLA_FLAGS before jax starts and never over the user's own.

XLA reads XLA_FLAGS once, when jax initialises its backends, so the platform is judged before jax is
imported (`gpu_expected`). A wrong guess costs nothing: every jaxlib, the CPU-only one included, knows the
xla_gpu_* flags and a CPU ignores them. A flag name a future XLA drops would abort jax at startup
("Unknown flags in XLA_FLAGS"): turn these off with the scripts' --no-gpu-flags. This module imports no jax.
"""

import importlib.metadata
import importlib.util
import os
import pkgutil
from collections.abc import Mapping

# Each is off by default in XLA 0.10 (jaxlib 0.10.2 accepts them all). Their sources:
GPU_FLAGS = {
    # Overlap collectives with compute: JAX's "GPU performance tips"; NVIDIA's JAX images set it.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # XLA's GPU -O1 bundle (openxla.org/xla/gpu_optimization_levels): pipeline data-parallel collectives
    # across loop iterations, so the layer loop's ZeRO-3 gathers and ZeRO-2/3 reduce-scatters (and dp's
    # all-reduces) overlap a neighbouring layer's compute...
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    # ...and unroll while loops (the scanned layers) by two, so the scheduler can overlap across the
    # loop barrier.
    "xla_gpu_enable_while_loop_double_buffering": "true",
}
GPU_PLATFORMS = ("cuda", "gpu", "rocm")


def named(xla_flags: str) -> set[str]:
    """The flag names an XLA_FLAGS string sets ("--xla_a=1 --xla_b" -> {"xla_a", "xla_b"})."""
    return {word.lstrip("-").partition("=")[0] for word in xla_flags.split() if word.startswith("--")}


def with_gpu_flags(xla_flags: str, flags: Mapping[str, str] = GPU_FLAGS) -> str:
    """`xla_flags` plus each of `flags` it does not already name: the user's own settings always win."""
    present = named(xla_flags)
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([xla_flags.strip(), *added]).strip()


def gpu_expected(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether jax will start on a GPU, judged without importing it: by JAX_PLATFORMS' first choice when
    that is set, else by an installed CUDA or ROCm plugin (jax falls back to the CPU without a device)."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() in GPU_PLATFORMS
    return any(word in name for name in _plugin_names() for word in ("cuda", "rocm"))


def _plugin_names() -> list[str]:
    """Names of the PJRT plugins jax would load: the jax_plugins namespace's modules and entry points."""
    names = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)]
    return [name.lower() for name in names]
