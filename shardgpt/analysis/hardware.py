"""Hardware profiles: the one list of machines a plan (`run.py --plan --target`) or a cost model is for.

One TOML file per profile in `profiles/`, read with tomllib. Every figure carries its kind, "datasheet"
(the vendor's document named in `source`) or "measured" (what was timed, where and when, in `source`), so a
number a report prints can always say where it came from. Sizes and rates are per device (chip or GPU);
link bandwidths count both directions, as NVLink's and ICI's datasheets quote them. This module imports no
jax.
"""

import dataclasses
import functools
import re
import tomllib
from importlib import resources

KINDS = ("datasheet", "measured")
BACKENDS = ("gpu", "tpu", "cpu")
FIGURES = (  # field -> required; the optional ones are absent where no source states them
    ("memory_bytes", True),  # memory of one device (HBM; the host's RAM for cpu)
    ("peak_bf16_flops", True),  # dense, no sparsity
    ("hbm_bytes_per_s", True),
    ("intra_node_bytes_per_s", False),  # NVLink / ICI, all of one device's links
    ("inter_node_bytes_per_s", False),  # InfiniBand per GPU / data-center network per chip
    ("torus_dims", False),  # TPUs: the interconnect's torus (2 or 3 dimensions)
    ("matmul_bf16_flops", False),  # measured calibration: a large bf16 matmul
    ("copy_bytes_per_s", False),  # measured calibration: a copy through JAX, read + write
    ("matmul_f32_flops", False),  # measured calibration: a large float32 matmul (cpu runs in float32)
    ("intra_node_latency_s", False),  # measured: a collective's fixed cost (alpha) within a node
    ("step_overhead_s", False),  # measured: launching one program on every device of a node
)


@dataclasses.dataclass(frozen=True)
class Figure:
    """One number with where it comes from."""

    value: float
    kind: str  # one of KINDS
    source: str  # the datasheet's name, or what was measured, where and when


@dataclasses.dataclass(frozen=True)
class Profile:
    """One machine, per device: memory, compute and bandwidths, each a Figure (None: no source states it)."""

    name: str
    description: str
    backend: str  # one of BACKENDS: which XLA compiler its programs go through
    vendor: str
    device_kinds: tuple[str, ...]  # jax's `device.device_kind` for this machine, matched whole
    memory_bytes: Figure
    peak_bf16_flops: Figure
    hbm_bytes_per_s: Figure
    intra_node_bytes_per_s: Figure | None = None
    inter_node_bytes_per_s: Figure | None = None
    torus_dims: Figure | None = None
    matmul_bf16_flops: Figure | None = None
    copy_bytes_per_s: Figure | None = None
    matmul_f32_flops: Figure | None = None
    intra_node_latency_s: Figure | None = None
    step_overhead_s: Figure | None = None

    def figures(self) -> dict[str, Figure]:
        """The figures this profile states, by field name."""
        return {name: getattr(self, name) for name, _ in FIGURES if getattr(self, name) is not None}


def _read(name: str, text: str) -> Profile:
    """One profile file's text -> Profile; ValueError naming the file and field on anything malformed."""
    data = tomllib.loads(text)
    figures = {}
    for field, required in FIGURES:
        entry = data.pop(field, None)
        if entry is None:
            if required:
                raise ValueError(f"hardware profile {name}: {field} is missing")
            continue
        if set(entry) != {"value", "kind", "source"} or entry["kind"] not in KINDS or not entry["source"]:
            raise ValueError(
                f"hardware profile {name}: {field} needs value, kind ({' or '.join(KINDS)}) and a source"
            )
        figures[field] = Figure(float(entry["value"]), entry["kind"], entry["source"])
    if data.get("name") != name or data.get("backend") not in BACKENDS:
        raise ValueError(f"hardware profile {name}: name must be the file's, backend one of {BACKENDS}")
    return Profile(
        name=name,
        description=data["description"],
        backend=data["backend"],
        vendor=data["vendor"],
        device_kinds=tuple(data["device_kinds"]),
        **figures,
    )


@functools.cache
def _profiles() -> dict[str, Profile]:
    files = resources.files("shardgpt.analysis") / "profiles"
    found = [f for f in files.iterdir() if f.name.endswith(".toml")]
    return {p.name: p for p in sorted((_read(f.name[:-5], f.read_text()) for f in found), key=_order)}


def _order(p: Profile) -> tuple[int, str]:
    return BACKENDS.index(p.backend), p.name


def names() -> tuple[str, ...]:
    """Every profile's name: GPUs, then TPUs, then cpu."""
    return tuple(_profiles())


def profile(name: str) -> Profile:
    """The profile called `name`; ValueError listing the known names otherwise."""
    try:
        return _profiles()[name]
    except KeyError:
        raise ValueError(f"unknown hardware profile {name!r}: known are {', '.join(names())}") from None


def for_device_kind(device_kind: str) -> str | None:
    """The profile whose device_kinds include jax's `device_kind` (case aside), or None."""
    kind = device_kind.strip().lower()
    return next((p.name for p in _profiles().values() if kind in (k.lower() for k in p.device_kinds)), None)


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A machine to predict for: `nodes` of `devices_per_node` devices of one profile; a TPU slice is one node
    (its chips share the ICI torus)."""

    spec: str  # as given: "h100x8", "2xh100x8", "v5e-16"
    profile: Profile
    nodes: int
    devices_per_node: int

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node


_GPU_SPEC = re.compile(r"(?:(\d+)x)?([a-z][a-z0-9\-]*?)x(\d+)")  # [NODESx]NAMExPER_NODE
_TPU_SPEC = re.compile(r"((?:tpu-)?v[0-9][a-z0-9]*)-(\d+)")  # v5e-16, tpu-v5e-16: a slice of chips
SPEC_EXAMPLES = ("h100x8", "2xh100x8", "a100x4", "v5e-16", "tpu-v4-32", "cpux8")


def cluster(spec: str) -> Cluster:
    """ "2xh100x8" -> 2 nodes of 8 h100s; "v5e-16" -> one tpu-v5e slice of 16 chips; ValueError listing
    examples and the profile names otherwise."""
    text = spec.strip().lower()
    bad = lambda why: ValueError(
        f"hardware spec {spec!r}: {why}; write NAMExN (one node of N), KxNAMExN (K nodes) or, for a TPU "
        f"slice NAME-N, e.g. {', '.join(SPEC_EXAMPLES)}; the names are {', '.join(names())}"
    )
    if m := _TPU_SPEC.fullmatch(text):
        name, nodes, per_node = (
            m.group(1) if m.group(1).startswith("tpu-") else f"tpu-{m.group(1)}",
            1,
            m.group(2),
        )
    elif m := _GPU_SPEC.fullmatch(text):
        name, nodes, per_node = m.group(2), m.group(1) or 1, m.group(3)
    else:
        raise bad("cannot read it")
    if name not in names():
        raise bad(f"no hardware profile {name!r}")
    if int(nodes) < 1 or int(per_node) < 1:
        raise bad("counts must be >= 1")
    return Cluster(spec, profile(name), int(nodes), int(per_node))
