"""The cost model: one training step's time on a hardware cluster, predicted from a compiled program's
collectives, the model config and a hardware profile, with every constant and its source.

Terms, each in seconds per step on one device:
- compute: analytic training FLOPs (metrics.flops_per_token, PaLM appendix B; with remat the blocks'
  forward again, `recompute_factor`) over achievable FLOP/s: a measured matmul figure where the profile has
  one, else the datasheet peak x DATASHEET_EFFICIENCY. Not cost_analysis' FLOPs: it counts a scanned body
  once;
- memory: analytic bytes the non-matmul kernels move (the optimizer's update, gradient accumulation,
  activations saved and read back, logits) over the measured copy bandwidth, else the datasheet HBM's. A
  matmul's own operands (params, grads) are taken as hidden under its FLOPs. Analytic again:
  cost_analysis' bytes accessed also counts a scan's body once;
- communication: each collective by an alpha-beta model, alpha + factor(kind, n) x bytes / one-way link
  bandwidth, the link intra-node unless one of the op's device groups spans nodes;
- launch: the profile's measured cost of starting one program, where it states one (cpu).
compute and memory are one device's local work, added: a device runs its kernels one after another, each
bound by its own FLOPs (a matmul) or its own bytes (the rest): a roofline per kernel, summed. A roofline
over the whole step (their max) would hide the elementwise kernels under matmuls they never run beside.
Communication overlaps the local work fully (full_overlap: the max) or not at all (no_overlap: the sum). A
pipeline's GPipe bubble scales both by (M + pp - 1) / M. Plain data in and out.
"""

from collections.abc import Sequence
from typing import Any

from shardgpt.analysis import hlo, metrics
from shardgpt.analysis.hardware import Cluster, Figure
from shardgpt.model.config import ModelConfig
from shardgpt.parallel.sharding import zero_stage

DATASHEET_EFFICIENCY = 0.7  # achievable / peak where nothing was measured: H100's 708 / 989 TFLOP/s ≈ 0.72
# A collective's fixed cost by backend and link, where the profile measured none: assumptions, unmeasured.
ALPHA_S = {
    ("gpu", "intra"): (10e-6, "assumed: NCCL's small-message all-reduce latency within a node, order 10 us"),
    ("gpu", "inter"): (25e-6, "assumed: NCCL over InfiniBand, order 25 us"),
    ("tpu", "intra"): (5e-6, "assumed: an ICI collective's fixed cost, order 5 us"),
    ("tpu", "inter"): (25e-6, "assumed: the data-center network between slices, order 25 us"),
    ("cpu", "intra"): (50e-6, "assumed"),
    ("cpu", "inter"): (50e-6, "assumed"),
}
ACTIVATION_BYTES_SOURCE = "Korthikanti et al. 2022, per layer per token (34·D + 5·H·T) bytes at 16 bits"


def factor(kind: str, n: int, backend: str = "gpu") -> float:
    """Bytes one device sends per result byte: ring all-reduce 2(n-1)/n, all-gather and all-to-all (n-1)/n of
    the result, reduce-scatter (n-1) x its shard (n-1)/n of the gathered size, collective-permute 1.

    XLA:CPU's reduce-scatter (kind all-reduce+slice: an all-reduce then a slice, the result bytes the
    all-reduce's) costs a reduce-scatter elsewhere, but on cpu what runs is the all-reduce.
    """
    if kind == hlo.SLICED_ALL_REDUCE:
        kind = "all-reduce" if backend == "cpu" else "all-gather"  # (n-1)/n of the full size
    if kind == "collective-permute":
        return 1.0
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n}.get(
        kind, n - 1 if kind == "reduce-scatter" else 0.0
    )


def crosses_nodes(op: hlo.CollectiveOp, devices_per_node: int, num_devices: int) -> bool:
    """True where one of the op's device groups (mesh positions, laid over the cluster in device order, so
    position i is on node i // devices_per_node) spans nodes; no groups stated means all devices."""
    groups = op.groups or (tuple(range(num_devices)),)
    return any(len({d // devices_per_node for d in g}) > 1 for g in groups)


def _figure(value: float, source: str) -> dict[str, Any]:
    return {"value": value, "source": source}


def _from(fig: Figure, note: str = "") -> str:
    return f"{fig.kind}: {fig.source}" + (f"; {note}" if note else "")


def rates(cluster: Cluster, dtype: str) -> dict[str, dict[str, Any]]:
    """Per device: achievable FLOP/s, bytes/s, one-way link bandwidths and alphas, each with its source.

    A cpu profile is the host's: its simulated devices (devices_per_node of them) share its cores and
    memory, so each gets 1/devices_per_node of the host's compute and bandwidth.
    """
    p, backend = cluster.profile, cluster.profile.backend
    share = cluster.devices_per_node if backend == "cpu" else 1
    shared = f"/ {share}: the host's simulated devices share it" if share > 1 else ""
    measured = p.matmul_f32_flops if dtype == "float32" and p.matmul_f32_flops else p.matmul_bf16_flops
    if measured is not None:
        flops = _figure(measured.value / share, _from(measured, shared))
    else:
        note = f"x {DATASHEET_EFFICIENCY} (achievable fraction, H100's measured 708/989)"
        flops = _figure(
            p.peak_bf16_flops.value * DATASHEET_EFFICIENCY / share, _from(p.peak_bf16_flops, note)
        )
    copy = p.copy_bytes_per_s or p.hbm_bytes_per_s
    out = {
        "flops_per_s": flops,
        "peak_flops_per_s": _figure(p.peak_bf16_flops.value / share, _from(p.peak_bf16_flops, shared)),
        "memory_bytes_per_s": _figure(copy.value / share, _from(copy, shared)),
    }
    for link, fig in (("intra", p.intra_node_bytes_per_s), ("inter", p.inter_node_bytes_per_s)):
        fig = fig or p.intra_node_bytes_per_s  # a profile without a second network: the one it has
        if fig is not None:
            out[f"{link}_bytes_per_s"] = _figure(fig.value / 2, _from(fig, "/ 2: one direction"))
        alpha, source = ALPHA_S[(backend, link)]
        if link == "intra" and p.intra_node_latency_s is not None:
            alpha, source = p.intra_node_latency_s.value, _from(p.intra_node_latency_s)
        out[f"{link}_alpha_s"] = _figure(alpha, source)
    if p.step_overhead_s is not None:
        out["launch_s"] = _figure(p.step_overhead_s.value, _from(p.step_overhead_s))
    return out


def communication(
    ops: Sequence[hlo.CollectiveOp], cluster: Cluster, num_devices: int, constants: dict[str, Any]
) -> dict[str, float]:
    """Seconds per step of the ops, by link ("intra", "inter"), by the alpha-beta model."""
    seconds = {"intra": 0.0, "inter": 0.0}
    backend = cluster.profile.backend
    for op in ops:
        n = op.group_size or (2 if op.kind == "collective-permute" else num_devices)
        if n <= 1 and op.kind != "collective-permute":
            continue  # a group of one moves nothing
        link = "inter" if crosses_nodes(op, cluster.devices_per_node, num_devices) else "intra"
        bandwidth = constants.get(f"{link}_bytes_per_s")
        if bandwidth is None:
            raise ValueError(f"hardware profile {cluster.profile.name} states no link bandwidth")
        parts = op.parts or (hlo.Part(op.kind, op.op_name, op.bytes),)
        moved = sum(factor(part.kind, n, backend) * part.bytes for part in parts)
        seconds[link] += op.executions * (constants[f"{link}_alpha_s"]["value"] + moved / bandwidth["value"])
    return seconds


def memory_parts(
    config: ModelConfig, strategy: str, mesh: dict[str, int], batch: int, seq: int, microbatches: int
) -> dict[str, float]:
    """Analytic bytes one device reads and writes in a step, by what moves them (MEMORY_SOURCE):
    "matmul_operands" (hidden under the matmuls' FLOPs, not in the memory term) and the non-matmul kernels'
    "update", "accumulation", "activations" and "logits"."""
    dp, tp, pp, cp = (mesh.get(a, 1) for a in ("dp", "tp", "pp", "cp"))
    params = config.n_params() * 4  # params are always float32, and so are their grads
    shards = metrics.zero_expected_bytes(params, 2 * params, params, strategy, dp, tp, pp)
    model_split = tp * pp  # what the forward and backward read: the compute layout, whole over dp
    update = 2 * shards["params_bytes_per_device"] + shards["grads_bytes_per_device"]
    update += 2 * shards["opt_state_bytes_per_device"]  # the moments read and written
    tokens = batch * seq / (dp * cp)
    item = 2 if config.dtype == "bfloat16" else 4
    per_token_layer = (34 * config.n_embd + 5 * config.n_head * seq) * item / 2
    return {
        # params read forward and backward, grads read + written, per microbatch
        "matmul_operands": microbatches * 4 * params / model_split,
        "update": update,
        # M > 1: each microbatch's grads added to the accumulator (both read, the sum written), in the
        # accumulator's layout: a ZeRO-2/3 one holds only its dp shard (microbatch.py)
        "accumulation": 3 * microbatches * shards["grads_bytes_per_device"] if microbatches > 1 else 0.0,
        "activations": 2 * tokens * config.n_layer / pp * per_token_layer / tp,  # saved, read backward
        "logits": 3 * tokens * config.vocab_size * item / tp,  # written, softmaxed, their gradient
    }


def memory_bytes(
    config: ModelConfig, strategy: str, mesh: dict[str, int], batch: int, seq: int, microbatches: int
) -> float:
    """The bytes the memory term moves: memory_parts' all but the matmuls' own operands."""
    parts = memory_parts(config, strategy, mesh, batch, seq, microbatches)
    return sum(v for k, v in parts.items() if k != "matmul_operands")


MEMORY_SOURCE = (
    "analytic: the non-matmul kernels' bytes, i.e. the update's params, grads and AdamW moments in the "
    "strategy's shards, gradient accumulation (M > 1: 3 x the grads' shard per microbatch), activations "
    f"saved and read back ({ACTIVATION_BYTES_SOURCE}), logits 3x; the matmuls' operands (params read "
    "forward and backward, grads written) count as hidden under their FLOPs; not cost_analysis (a scanned "
    "body is counted once)"
)


def recompute_factor(config: ModelConfig, seq: int) -> float:
    """FLOPs run over the model's FLOPs: 1, or with remat (each block's forward run again in the backward)
    1 + the blocks' forward share, a third of everything but the head's 6·D·V."""
    if not config.remat:
        return 1.0
    flops = metrics.flops_per_token(config, seq)
    return 1 + (flops - 6 * config.n_embd * config.vocab_size) / 3 / flops


def bubble_factor(pp: int, microbatches: int) -> float:
    """GPipe's step time over its bubble-free time: (M + pp - 1) / M, i.e. 1 / (1 - (pp-1)/(M+pp-1))."""
    return (microbatches + pp - 1) / microbatches if pp > 1 else 1.0


def check_fits(mesh: dict[str, int], cluster: Cluster) -> int:
    """The mesh's device count; ValueError where the cluster has fewer."""
    num_devices = 1
    for size in mesh.values():
        num_devices *= size
    if num_devices > cluster.devices:
        raise ValueError(
            f"the mesh {mesh} needs {num_devices} devices; {cluster.spec} has {cluster.devices}: "
            "give a larger cluster (--hardware) or a smaller mesh"
        )
    return num_devices


def predict(
    ops: Sequence[hlo.CollectiveOp] | str,
    config: ModelConfig,
    strategy: str,
    mesh: dict[str, int],
    batch: int,
    seq: int,
    microbatches: int,
    cluster: Cluster,
) -> dict[str, Any]:
    """One step's predicted time on `cluster` (both overlap bounds), tokens/s, MFU and the binding term.

    `ops`: the compiled step's collectives, or its HLO text. The mesh is laid over the cluster's first
    devices in order; ValueError where it needs more than the cluster has.
    """
    num_devices = check_fits(mesh, cluster)
    if isinstance(ops, str):
        ops = hlo.collective_ops(ops)
    constants = rates(cluster, config.dtype)
    flops_per_token = metrics.flops_per_token(config, seq)
    tokens = batch * seq
    comm = communication(ops, cluster, num_devices, constants)
    recompute = recompute_factor(config, seq)
    terms = {
        "compute": recompute * flops_per_token * tokens / num_devices / constants["flops_per_s"]["value"],
        "memory": memory_bytes(config, strategy, mesh, batch, seq, microbatches)
        / constants["memory_bytes_per_s"]["value"],
        "communication": comm["intra"] + comm["inter"],
        "communication_intra_node": comm["intra"],
        "communication_inter_node": comm["inter"],
        "launch": constants.get("launch_s", {}).get("value", 0.0),
    }
    local = terms["compute"] + terms["memory"]  # kernel after kernel: see the module's docstring
    bubble = bubble_factor(mesh.get("pp", 1), microbatches)
    step = {
        "no_overlap": (local + terms["communication"]) * bubble + terms["launch"],
        "full_overlap": max(local, terms["communication"]) * bubble + terms["launch"],
    }
    binding = max(("compute", "memory", "communication"), key=terms.get)
    peak = max(constants["peak_flops_per_s"]["value"], constants["flops_per_s"]["value"])  # MFU's denominator
    tokens_per_s = {bound: tokens / t for bound, t in step.items()}
    constants["bubble_factor"] = _figure(bubble, "GPipe: (M + pp - 1) / M")
    if recompute > 1:
        constants["recompute_factor"] = _figure(recompute, "remat: the blocks' forward (1/3 of 6N) again")
    constants["memory_bytes"] = _figure(
        terms["memory"] * constants["memory_bytes_per_s"]["value"], MEMORY_SOURCE
    )
    constants["flops_per_token"] = _figure(flops_per_token, "6N + 12·L·H·Q·T (PaLM app. B)")
    return {
        "hardware": cluster.spec,
        "profile": cluster.profile.name,
        "cluster": {"nodes": cluster.nodes, "devices_per_node": cluster.devices_per_node},
        "zero_stage": zero_stage(strategy),
        "terms_s": terms,
        "step_time_s": step,
        "tokens_per_s": tokens_per_s,
        "mfu": {
            bound: metrics.mfu(t, flops_per_token, peak, num_devices) for bound, t in tokens_per_s.items()
        },
        "binding": binding,
        "overlap": "no_overlap: compute + memory + communication; full_overlap: max(compute + memory, "
        "communication)",
        "constants": constants,
    }
