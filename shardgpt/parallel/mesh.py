"""Device meshes from specs like "dp=2,tp=4", validated against the devices present."""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

# Mesh axes, outermost first: data parallel (and ZeRO), pipeline stages, context (the sequence), experts
# (an all-to-all each way per MoE layer), then Megatron tensor parallel, the chattiest, innermost (on one
# host's fast links). Every mesh has all five; a spec names the ones it splits.
AXES = ("dp", "pp", "cp", "ep", "tp")
ALWAYS_NAMED = ("dp", "tp")  # describe() names these even at size 1; pp and cp only where they split


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """ "dp=2,tp=4" -> {"dp": 2, "tp": 4}; an omitted axis is 1 and one axis may be -1 (the rest)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or not name:
            raise ValueError(f"malformed mesh spec {spec!r}: write axis=size pairs, e.g. 'dp=2,tp=4'")
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; known axes: {', '.join(AXES)}")
        if name in sizes:
            raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh axis {name}={value.strip()!r} is not an integer (in {spec!r})") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis {name}={size} must be a positive size or -1 (the rest)")
        sizes[name] = size
    if not sizes:
        raise ValueError(f"empty mesh spec {spec!r}: write axis=size pairs, e.g. 'dp=2,tp=4'")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest), got {', '.join(rest)} in {spec!r}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(
                f"mesh {spec!r}: {num_devices} devices do not split into {known} x the rest; "
                f"make the other axes' product divide {num_devices}"
            )
        sizes[rest[0]] = num_devices // known
    shape = {name: sizes.get(name, 1) for name in AXES}
    if math.prod(shape.values()) != num_devices:
        raise ValueError(
            f"mesh {spec!r} has {math.prod(shape.values())} devices but {num_devices} are present; "
            f"give sizes whose product is {num_devices} (e.g. 'dp={num_devices}'), or use -1 for the rest"
        )
    return shape


def make_mesh(spec: str | dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes AXES over `devices` (default: all of them), every axis of type Auto.

    Auto axes because flax's logical rules and with_sharding_constraint want them; jax.make_mesh has
    defaulted to Explicit axes since jax 0.9.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = parse_mesh_spec(spec, len(devices)) if isinstance(spec, str) else spec
    spec_text = ",".join(f"{k}={v}" for k, v in shape.items())
    shape = parse_mesh_spec(spec_text, len(devices))  # validates dicts too
    sizes, types = tuple(shape[a] for a in AXES), (AxisType.Auto,) * len(AXES)
    if not _spans_processes(devices):
        return jax.make_mesh(sizes, AXES, axis_types=types, devices=devices)
    # Across processes (hosts), each process's devices in a row, so the inner axis (tp, the chattiest)
    # stays on one host's fast links wherever its size divides a host's devices, and dp spans hosts.
    by_host = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(by_host, dtype=object).reshape(sizes), AXES, axis_types=types)


def check_axes(mesh: Mesh) -> None:
    """Raise unless `mesh` names every axis the rule tables use (a hand-built mesh may lack some)."""
    missing = [axis for axis in AXES if axis not in mesh.axis_names]
    if missing:
        raise ValueError(
            f"mesh axes {tuple(mesh.axis_names)} lack {', '.join(missing)}: the strategies' rules use "
            f"{', '.join(AXES)}; build the mesh with shardgpt.parallel.mesh.make_mesh (e.g. 'dp=2,tp=4': the "
            "axes it does not name get size 1)"
        )


def _spans_processes(devices) -> bool:
    return len({d.process_index for d in devices}) > 1


def spans_processes(mesh: Mesh) -> bool:
    """True when the mesh's devices belong to more than one process (host)."""
    return _spans_processes(mesh.devices.flat)


def processes_per_group(mesh: Mesh, axis: str) -> int:
    """How many processes the largest group along `axis` spans (1: every group is on one host)."""
    by_process = np.vectorize(lambda d: d.process_index)(mesh.devices)
    groups = np.moveaxis(by_process, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
    return max(len(set(group.tolist())) for group in groups)


def describe(mesh: Mesh) -> str:
    """ "dp=2,tp=4" or "dp=2,pp=4,tp=1" for a mesh (the inverse of make_mesh's spec)."""
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items() if n > 1 or a in ALWAYS_NAMED)
