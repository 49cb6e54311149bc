"""Where a plan compiles and which machine it is for: the --target profile, the devices its meshes compile on
(the accelerator present, a mock GPU topology over it, or XLA:CPU's simulated devices), its memory budget,
and whether its figures are an estimate.

A plan's temporaries are what one backend's XLA compiler assigns, so they hold for that backend only. On a
CPU host they are an XLA:CPU estimate for any GPU or TPU (against an H200 on gpt2: 1.6-6.5x high, and no
cuDNN attention at all; BENCHMARKS.md).
"""

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from shardgpt.analysis import hardware

ESTIMATE = "XLA:CPU estimate"


@dataclasses.dataclass(frozen=True)
class Placement:
    """The devices a plan's meshes are laid over, what they compile for, and the target they stand for."""

    devices: list[Any]
    compiled_for: str  # "cpu", "gpu", "tpu" or "gpu-mock:1x8x1"
    target: str | None  # a hardware profile's name
    budget: int | None  # bytes per device: --device-memory, else the present device's limit or the target's
    budget_source: str | None

    @property
    def estimate(self) -> bool:
        return is_estimate(self.compiled_for, self.target)

    def record(self) -> dict[str, Any]:
        """The fields every plan row carries (results.json)."""
        return {
            "compiled_for": self.compiled_for,
            "target": self.target,
            "estimate": self.estimate,
            "budget_source": self.budget_source,
        }

    def describe(self) -> str:
        """What the figures are, in a line: "an XLA:CPU estimate for h100 (compiled for cpu)"."""
        where = f"compiled for {self.compiled_for}"
        if not self.estimate:
            return f"for {self.target}, {where}: the target's own backend"
        kind = f"an {ESTIMATE}" if backend(self.compiled_for) == "cpu" else "an estimate"
        return f"{kind} for {self.target} ({where})" if self.target else f"{kind}, no --target ({where})"


def backend(compiled_for: str) -> str:
    """ "gpu-mock:1x8x1" -> "gpu": the XLA backend a plan compiled with."""
    return re.match(r"[a-z]*", compiled_for).group()


def is_estimate(compiled_for: str, target: str | None) -> bool:
    """True when no target was given, or the compile's backend is not the target's."""
    return target is None or backend(compiled_for) != hardware.profile(target).backend


def default_target(platform: str, device_kind: str) -> str | None:
    """The present accelerator's profile (e.g. "NVIDIA H200" -> h200); None on a CPU or an unknown device."""
    return None if platform == "cpu" else hardware.for_device_kind(device_kind)


def devices_needed(mesh_spec: str, present: int) -> int:
    """Devices a mesh spec asks for: the product of its sizes, or all `present` where one is -1."""
    sizes = [int(size) for size in re.findall(r"=\s*(-?\d+)", mesh_spec)]
    return present if -1 in sizes else math.prod(sizes)


def compile_on(platform: str, present: int, needed: int, target: str | None) -> str:
    """Where to compile meshes of up to `needed` devices: "cpu" (no accelerator, or a cpu target), the
    accelerator's platform when it has the devices, "gpu-mock" past a GPU's count; else ValueError."""
    if platform == "cpu" or (target is not None and hardware.profile(target).backend == "cpu"):
        return "cpu"
    if needed <= present:
        return platform
    if platform == "gpu":
        return "gpu-mock"
    raise ValueError(
        f"--plan: the meshes need {needed} devices but {present} {platform} devices are present: plan meshes "
        "of at most that many here, or on a CPU host (JAX_PLATFORMS=cpu) for an XLA:CPU estimate"
    )


def mock_topology(local: int, needed: int) -> str:
    """jax_mock_gpu_topology's "slices x hosts x devices per host": hosts like this one, enough of them."""
    return f"1x{-(-needed // local)}x{local}"


def choose_budget(
    given: int | None, present_limit: int | None, target: str | None
) -> tuple[int | None, str | None]:
    """(bytes, where from): --device-memory wins; then the present device's own limit (passed only where the
    plan is for it); then the target profile's memory."""
    if given is not None:
        return given, "--device-memory"
    if present_limit:
        return present_limit, "the present device's memory_stats bytes_limit"
    if target is None:
        return None, None
    memory = hardware.profile(target).memory_bytes
    return int(memory.value), f"--target {target}'s memory, {memory.kind}"


def place(meshes: Sequence[str], target: str | None, given_budget: int | None) -> Placement:
    """Start jax and choose the devices to compile `meshes` on (see compile_on), the target (default: the
    present accelerator's profile) and the budget. ValueError (one line) where the devices cannot be had."""
    import jax

    first = jax.devices()[0]  # starts the default backend
    present, platform, kind = jax.devices(), first.platform, first.device_kind
    target = target or default_target(platform, kind)
    needed = max(devices_needed(mesh, len(present)) for mesh in meshes)
    where = compile_on(platform, len(present), needed, target)
    if where == "cpu":
        devices, compiled_for = jax.devices("cpu"), "cpu"
    elif where == "gpu-mock":
        devices, compiled_for = _mock_gpus(needed)
    else:
        devices, compiled_for = present, platform
    # The present device's own limit stands for the target only where the plan is for that device.
    on_present = compiled_for == platform and target in (None, default_target(platform, kind))
    limit = (first.memory_stats() or {}).get("bytes_limit") if on_present else None
    budget, source = choose_budget(given_budget, limit, target)
    return Placement(list(devices), compiled_for, target, budget, source)


def _mock_gpus(needed: int) -> tuple[list[Any], str]:
    """Restart jax's GPU client on a mock topology of `needed` GPUs (XLA compiles for them; none runs).

    jax reads jax_mock_gpu_topology only when it creates its backends (on a CPU host it is ignored), so
    they are cleared and created again, then the device count checked. Not yet run on a GPU: on one H200,
    "1x8x1" set before jax started gave 8 devices (issue 24).
    """
    import jax

    local = jax.local_device_count()
    topology = mock_topology(local, needed)
    asked = (
        f"--plan: the meshes need {needed} GPUs, this host has {local}, and jax's mock topology {topology}"
    )
    instead = (
        f"plan meshes of up to {local} devices here, or on a CPU host (JAX_PLATFORMS=cpu) for an {ESTIMATE}"
    )
    try:
        from jax.extend import backend as backends

        jax.config.update("jax_mock_gpu_topology", topology)
        backends.clear_backends()  # jax reads the option when it next creates its clients
        devices = jax.devices()
    except Exception as e:  # an option or function this jax lacks, or a client that fails to start
        reason = f"{type(e).__name__}: {(str(e) or '-').splitlines()[0]}"
        raise ValueError(f"{asked} failed ({reason}): {instead}") from None
    if len(devices) < needed or devices[0].platform != "gpu":
        raise ValueError(f"{asked} gave {len(devices)} {devices[0].platform} devices: {instead}")
    return devices, f"gpu-mock:{topology}"
