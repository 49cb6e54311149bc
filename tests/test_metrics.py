"""Collectives read from compiled HLO against programs with known collectives; FLOPs against a hand count."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.analysis import metrics
from shardgpt.model.config import ModelConfig

X = np.arange(128 * 4, dtype=np.float32).reshape(128, 4)  # split over 8 devices: f32[16,4] = 256 bytes each


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))


def hlo(mesh, f, in_specs, out_specs, *args) -> str:
    mapped = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=True)
    return jax.jit(mapped).lower(*args).compile().as_text()


def only(**found: tuple[int, int]) -> dict[str, dict[str, int]]:
    """The full expected result: the named kinds (underscores for dashes) with (count, bytes), others zero."""
    found = {kind.replace("_", "-"): value for kind, value in found.items()}
    return {k: dict(zip(("count", "bytes"), found.get(k, (0, 0)), strict=True)) for k in metrics.KINDS}


def test_psum_is_one_all_reduce_of_the_local_buffer(mesh):
    text = hlo(mesh, lambda x: jax.lax.psum(x, "x"), P("x"), P(), X)
    assert metrics.collectives(text) == only(all_reduce=(1, 16 * 4 * 4))


def test_all_gather_counts_the_gathered_size(mesh):
    text = hlo(mesh, lambda x: jax.lax.all_gather(x, "x", tiled=True), P("x"), P("x"), X)
    assert metrics.collectives(text) == only(all_gather=(1, 128 * 4 * 4))


def test_psum_scatter_counts_the_scattered_size(mesh):
    text = hlo(mesh, lambda x: jax.lax.psum_scatter(x, "x", tiled=True), P(), P("x"), X)
    assert metrics.collectives(text) == only(reduce_scatter=(1, 16 * 4 * 4))


def test_ppermute_and_all_to_all(mesh):
    ring = [(i, (i + 1) % 8) for i in range(8)]
    text = hlo(mesh, lambda x: jax.lax.ppermute(x, "x", ring), P("x"), P("x"), X)
    assert metrics.collectives(text) == only(collective_permute=(1, 256))
    # CPU lowers all_to_all to a tuple of 8 f32[2,4] pieces: the elements sum to the local buffer.
    text = hlo(mesh, lambda x: jax.lax.all_to_all(x, "x", 0, 0, tiled=True), P("x"), P("x"), X)
    assert metrics.collectives(text) == only(all_to_all=(1, 256))


def test_loops_multiply_by_their_trip_count(mesh):
    def loop(x):  # c + psum(c) keeps the carry device-varying, as check_vma requires of a loop carry
        return jax.lax.fori_loop(0, 5, lambda i, c: c + jax.lax.psum(c, "x"), x)

    text = hlo(mesh, loop, P("x"), P("x"), X)
    assert '"known_trip_count":{"n":"5"}' in text, "XLA stopped annotating trip counts: update collectives()"
    assert metrics.collectives(text) == only(all_reduce=(5, 5 * 256))
    assert metrics.collectives(text, per_execution=False) == only(all_reduce=(1, 256))

    def nested(x):
        inner = lambda i, c: jax.lax.fori_loop(0, 4, lambda j, d: d + jax.lax.psum(d, "x"), c)
        return jax.lax.fori_loop(0, 3, inner, x)

    assert metrics.collectives(hlo(mesh, nested, P("x"), P("x"), X)) == only(all_reduce=(12, 12 * 256))
    # A loop that states no trip count is counted once, a lower bound, and said so (was silent).
    unstated = re.sub(r'"known_trip_count":\{"n":"\d+"\},?', "", text)
    with pytest.warns(UserWarning, match="states no trip count"):
        assert metrics.collectives(unstated) == only(all_reduce=(1, 256))


# GPU-style async collectives (CPU emits none): a start/done pair counts once, with the result buffer.
ASYNC_HLO = """HloModule m, is_scheduled=true

%add (p0: f32[], p1: f32[]) -> f32[] {
  %p0 = f32[] parameter(0)
  %p1 = f32[] parameter(1)
  ROOT %add = f32[] add(%p0, %p1)
}

%async_computation (p: bf16[2,2]) -> bf16[2,2] {
  %p = bf16[2,2]{1,0} parameter(0)
  ROOT %a2a = bf16[2,2]{1,0} all-to-all(%p), channel_id=5, replica_groups={{0,1}}, dimensions={0}
}

ENTRY %main (a: f32[8], b: bf16[2,2]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = bf16[2,2]{1,0} parameter(1)
  %ar = f32[8]{0} all-reduce-start(%a), channel_id=1, to_apply=%add
  %ar.done = f32[8]{0} all-reduce-done(%ar)
  %rs = ((f32[8]{0}), f32[4]{0}) reduce-scatter-start(%a), channel_id=2, dimensions={0}, to_apply=%add
  %rs.done = f32[4]{0} reduce-scatter-done(%rs)
  %ag = (f32[4]{0}, f32[8]{0}) all-gather-start(%rs.done), channel_id=3, dimensions={0}
  %ag.done = f32[8]{0} all-gather-done(%ag)
  %cp = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1},{1,0}}
  %cp.done = f32[8]{0} collective-permute-done(%cp)
  %as = ((bf16[2,2]{1,0}), bf16[2,2]{1,0}) async-start(%b), calls=%async_computation
  %as.done = bf16[2,2]{1,0} async-done(%as), calls=%async_computation
  ROOT %out = f32[8]{0} add(%ar.done, %ag.done)
}
"""


def test_async_start_done_pairs_count_once_with_the_result_buffer():
    assert metrics.collectives(ASYNC_HLO) == only(
        all_reduce=(1, 32),
        reduce_scatter=(1, 16),
        all_gather=(1, 32),
        collective_permute=(1, 32),
        all_to_all=(1, 8),
    )


def test_flops_per_token_matches_a_hand_count():
    config = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=16)
    d, f, v, t = 32, 128, 50, 16
    ln = d + d  # scale + bias
    attention = (d * 3 * d + 3 * d) + (d * d + d)  # qkv kernel + bias, out kernel + bias
    mlp = (d * f + f) + (f * d + d)  # up, down
    n = 2 * (2 * ln + attention + mlp) + ln + d * v  # blocks, final LayerNorm, lm_head (no embeddings)
    expected = 6 * n + 12 * 2 * 4 * 8 * t  # L=2, H=4, Q=8
    assert metrics.flops_per_token(config, t) == expected
    # A tied head is the same matmul: the FLOPs do not change.
    assert metrics.flops_per_token(config.replace(tie_embeddings=True), t) == expected


def test_bytes_per_device_sharded_and_replicated(mesh):
    a = np.ones((64, 32), np.float32)
    sharded = jax.device_put(a, NamedSharding(mesh, P("x")))
    replicated = jax.device_put(a, NamedSharding(mesh, P()))
    assert metrics.bytes_per_device(sharded) == 64 * 32 * 4 // 8 == 1024
    assert metrics.bytes_per_device(replicated) == 8192
    assert metrics.bytes_per_device({"s": sharded, "r": replicated, "python": 3.0}) == 1024 + 8192


def test_peak_bytes_reads_memory_analysis():
    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T) @ x).lower(jnp.ones((256, 128))).compile()
    peak = metrics.peak_bytes(compiled)
    assert isinstance(peak, int) and peak >= 256 * 256 * 4  # at least the (256, 256) temporary
    assert metrics.peak_bytes(object()) is None


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("cpu", None),
        ("Quantum abacus", None),
    ],
)
def test_peak_flops(kind, peak):
    assert metrics.peak_flops(kind) == peak


def test_mfu():
    assert metrics.mfu(1000.0, 1e9, 1e12, num_devices=2) == pytest.approx(0.5)
    assert metrics.mfu(1000.0, 1e9, None, num_devices=2) is None


def test_zero_expected_bytes_follow_the_stage():
    p, o, g = 800, 1600, 800
    got = lambda strategy: metrics.zero_expected_bytes(p, o, g, strategy, dp=4, tp=2)
    assert got("dp") == {
        "params_bytes_per_device": 400,
        "grads_bytes_per_device": 400,
        "opt_state_bytes_per_device": 800,
    }
    assert got("zero1")["opt_state_bytes_per_device"] == 200 and got("zero1")["grads_bytes_per_device"] == 400
    assert got("zero2")["grads_bytes_per_device"] == 100 and got("zero2")["params_bytes_per_device"] == 400
    assert got("fsdp") == {
        "params_bytes_per_device": 100,
        "grads_bytes_per_device": 100,
        "opt_state_bytes_per_device": 200,
    }


def test_theory_counts_the_textbook_collectives():
    from shardgpt.analysis import theory

    config = ModelConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=50, block_size=16)
    leaf = theory.Leaf(("blocks", "mlp", "up", "kernel"), 3, True, 1024, 1024, 512, {
        "params": True, "grads": True, "opt_state": True
    })  # fmt: skip
    rows = theory.expected(config, "zero3+sp", {"dp": 2, "tp": 4}, [leaf], batch=8, seq=16, microbatches=2)
    act = 8 // 2 // 2 * 16 * 32 * 4  # one microbatch's rows on one device x seq x n_embd, fp32
    # Megatron-SP: a gather and a scatter for each of 2 regions per layer, each way, per microbatch.
    assert rows["attn.fwd", "all-gather"] == {
        "count": 3 * 2,
        "bytes": 3 * 2 * act,
        "dtypes": {"f32": 3 * 2 * act},
    }
    assert _counted(rows["mlp.bwd", "reduce-scatter"]) == {"count": 3 * 2, "bytes": 3 * 2 * act // 4}
    # ZeRO-3: gathered in forward and again in backward, reduce-scattered, per layer and microbatch.
    assert rows["zero3_gather.fwd", "all-gather"] == rows["zero3_gather.bwd", "all-gather"]
    assert _counted(rows["grad_reduce", "reduce-scatter"]) == {"count": 3 * 2, "bytes": 3 * 2 * 512}
    assert rows["loss", "all-reduce"] == {"count": 1, "bytes": 8, "dtypes": {"f32": 8}}
    bf16 = theory.expected(config.replace(dtype="bfloat16"), "zero3", {"dp": 2}, [leaf], batch=8, seq=16)
    assert bf16["zero3_gather.fwd", "all-gather"]["dtypes"] == {"f32": 3 * 1024}  # as read: its read_bytes
    assert set(bf16["grad_reduce", "reduce-scatter"]["dtypes"]) == {"f32"}  # gradients stay fp32
    assert theory.expected(config, "dp", {"dp": 1, "tp": 1}, [leaf], 8, 16) == {}  # one device


def _counted(row: dict) -> dict:
    return {"count": row["count"], "bytes": row["bytes"]}


# XLA:CPU's form of a reduce-scatter: an all-reduce whose uses all slice it (here inside a fusion).
SLICED_HLO = """HloModule m

%add (p0: f32[], p1: f32[]) -> f32[] {
  %p0 = f32[] parameter(0)
  %p1 = f32[] parameter(1)
  ROOT %add = f32[] add(%p0, %p1)
}

%fused_slice (param_0: f32[8,4], param_1: s32[]) -> f32[2,4] {
  %param_0 = f32[8,4]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %ds = f32[2,4]{1,0} dynamic-slice(%param_0, %param_1, %zero), dynamic_slice_sizes={2,4}
}

ENTRY %main (a: f32[8,4], i: s32[]) -> (f32[2,4], f32[8,4]) {
  %a = f32[8,4]{1,0} parameter(0)
  %i = s32[] parameter(1)
  %sliced = f32[8,4]{1,0} all-reduce(%a), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  %bc = f32[8,4]{1,0} bitcast(%sliced)
  %shard = f32[2,4]{1,0} fusion(%bc, %i), kind=kLoop, calls=%fused_slice
  %whole = f32[8,4]{1,0} all-reduce(%a), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  %used = f32[2,4]{1,0} fusion(%whole, %i), kind=kLoop, calls=%fused_slice
  %both = f32[8,4]{1,0} add(%whole, %whole)
  ROOT %out = (f32[2,4]{1,0}, f32[8,4]{1,0}) tuple(%shard, %both)
}
"""


def test_an_all_reduce_only_sliced_reads_as_a_reduce_scatter():
    ops = {op.name: op for op in metrics.collective_ops(SLICED_HLO)}
    assert ops["sliced"].kind == "all-reduce+slice" and ops["sliced"].bytes == 8 * 4 * 4
    assert ops["whole"].kind == "all-reduce"  # one of its uses reads the whole buffer
    assert (ops["sliced"].group_size, ops["whole"].group_size) == (4, 2)
    assert metrics.collectives(SLICED_HLO)["all-reduce+slice"] == {"count": 1, "bytes": 128}


def test_group_sizes_in_every_form_xla_prints():
    from shardgpt.analysis.hlo import _group_size

    assert _group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%a") == 4
    assert _group_size("replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%a") == 2
    mesh = "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true"
    assert _group_size(mesh) == 2
    permuted = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}"
    assert _group_size(permuted) == 4
    assert _group_size("source_target_pairs={{0,1}}") is None


# Issue 14: a combined async all-gather (two ops' names joined by XLA) and a tuple all-reduce one of whose
# elements is only ever sliced (XLA:CPU's reduce-scatter), each element attributed by its own name.
COMBINED_HLO = """HloModule m, is_scheduled=true

%add (p0: f32[], p1: f32[]) -> f32[] {
  %p0 = f32[] parameter(0)
  %p1 = f32[] parameter(1)
  ROOT %add = f32[] add(%p0, %p1)
}

ENTRY %main (a: f32[2,4], b: f32[4], c: f32[8,4], i: s32[]) -> (f32[4,4], f32[2,4], f32[8]) {
  %a = f32[2,4]{1,0} parameter(0)
  %b = f32[4]{0} parameter(1)
  %c = f32[8,4]{1,0} parameter(2)
  %i = s32[] parameter(3)
  %ag = ((f32[2,4]{1,0}, f32[4]{0}), (f32[4,4]{1,0}, f32[8]{0})) all-gather-start(%a, %b), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0), dimensions={0}, metadata={op_name="jit(step)/(jvp(forward)/GPT/zero3_gather/all_gather:optimizer/param_all_gather/all_gather)"}
  %ag.done = (f32[4,4]{1,0}, f32[8]{0}) all-gather-done(%ag)
  %w = f32[4,4]{1,0} get-tuple-element(%ag.done), index=0
  %v = f32[8]{0} get-tuple-element(%ag.done), index=1
  %ar = (f32[8,4]{1,0}, f32[4]{0}) all-reduce(%c, %b), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add, metadata={op_name="jit(step)/(transpose(jvp(forward))/GPT/blocks/mlp/up/dot_general:optimizer/reduce_sum)"}
  %g = f32[8,4]{1,0} get-tuple-element(%ar), index=0
  %n = f32[4]{0} get-tuple-element(%ar), index=1
  %shard = f32[2,4]{1,0} dynamic-slice(%g, %i, %i), dynamic_slice_sizes={2,4}
  ROOT %out = (f32[4,4]{1,0}, f32[2,4]{1,0}, f32[4]{0}) tuple(%w, %shard, %n)
}
"""  # noqa: E501  (HLO lines are as XLA prints them)


def test_combined_and_async_collectives_are_attributed_element_by_element():
    from shardgpt.analysis import attribution, hlo

    ops = {op.name: op for op in hlo.collective_ops(COMBINED_HLO)}
    gather, reduce = ops["ag"], ops["ar"]
    assert gather.kind == "all-gather" and gather.bytes == 4 * 4 * 4 + 8 * 4  # the gathered results
    assert [p.op_name.split("/")[-2] for p in gather.parts] == ["zero3_gather", "param_all_gather"]
    assert [p.kind for p in reduce.parts] == ["all-reduce+slice", "all-reduce"]
    mesh = {"dp": 2, "tp": 4}
    assert attribution.mesh_axes(gather.groups, mesh) == ("dp",)  # [4,2]<=[2,4]T(1,0): {0,4},{1,5}...
    assert attribution.mesh_axes(reduce.groups, mesh) == ("dp",)
    rows = attribution.compiled_by_cause(list(ops.values()), mesh)
    assert rows["zero3_gather.fwd", "all-gather"]["bytes"] == 64
    assert rows["param_gather", "all-gather"]["bytes"] == 32
    # The sliced element reads as the gradient's reduce-scatter, with the all-reduce's bytes.
    sliced = rows["grad_reduce", "reduce-scatter"]
    assert (sliced["count"], sliced["bytes"], sliced["sliced_bytes"], sliced["dtypes"]) == (
        1,
        128,
        128,
        {"f32": 128},
    )
    # A gradient's all-reduce named only by its module path is placed by its axes, unless that path
    # names a param of its shape: up's kernel as a device holds it, (8, 4) or transposed.
    assert (sliced["bytes_by_name"], sliced["bytes_by_axes"]) == (0, 128)
    for dims in ((8, 4), (4, 8)):
        params = attribution.ParamShapes({("blocks", "mlp", "up", "kernel"): {dims, (2, 4)}})
        named = attribution.compiled_by_cause(list(ops.values()), mesh, params)
        assert named["grad_reduce", "reduce-scatter"]["bytes_by_name"] == 128
    elsewhere = attribution.ParamShapes({("blocks", "mlp", "down", "kernel"): {(8, 4)}})
    assert attribution.compiled_by_cause(list(ops.values()), mesh, elsewhere)[
        "grad_reduce", "reduce-scatter"]["bytes_by_name"] == 0  # fmt: skip
    assert rows["optimizer", "all-reduce"]["bytes"] == 16


def _compiled(nbytes: int, ops: dict, **fields) -> dict:
    """One compiled row as attribution.compiled_by_cause writes it, attributed by name."""
    row = {"count": 1, "bytes": nbytes, "bytes_by_name": nbytes, "bytes_by_axes": 0, "sliced_bytes": 0}
    return row | {"hoisted_bytes": 0, "ops": ops, "dtypes": {"f32": nbytes}} | fields


def test_reconciliation_notes_where_compiled_and_theory_differ():
    from shardgpt.analysis import attribution

    compiled = {
        ("grad_reduce", "reduce-scatter"): _compiled(256, {"x": 256}, sliced_bytes=256),
        ("loss", "all-reduce"): _compiled(8, {"loss_sum/psum": 8}),
        ("unattributed", "collective-permute"): _compiled(64, {"y": 64}, count=2, bytes_by_name=0),
    }
    expected = {
        ("grad_reduce", "reduce-scatter"): {"count": 4, "bytes": 128},
        ("loss", "all-reduce"): {"count": 1, "bytes": 8},
    }
    textbook = {("grad_reduce", "reduce-scatter"): {"bytes": 64, "why": "ZeRO"}, ("loss", "all-reduce"): {
        "bytes": None, "why": "a scalar"}}  # fmt: skip
    rows = {r["cause"]: r for r in attribution.reconcile(compiled, expected, textbook)}
    assert list(rows) == ["grad_reduce", "loss", "unattributed"]  # CAUSES order, nothing dropped
    assert rows["grad_reduce"]["ratio"] == 2.0 and "all-reduce + dynamic-slice" in rows["grad_reduce"]["note"]
    assert rows["loss"]["note"] == "" and rows["unattributed"]["ratio"] is None
    assert rows["grad_reduce"]["textbook_ratio"] == 4.0 and rows["loss"]["textbook_bytes"] is None


def test_a_note_names_its_evidence_or_says_unexplained():
    """The same 2x of theory gets XLA:CPU's fp32 note only where the ops are f32 and theory's are bf16; a
    gather shortfall gets the loop note only where an op traced in a loop body runs outside any loop."""
    from shardgpt.analysis import attribution

    key, bf16 = ("attn.fwd", "all-reduce"), {"count": 1, "bytes": 100, "dtypes": {"bf16": 100}}
    f32 = {"count": 1, "bytes": 100, "dtypes": {"f32": 100}}
    twice = {key: _compiled(200, {"blocks/attn/out/megatron_g/psum [tp]": 200})}
    note = lambda expected, platform="cpu", compiled=twice: attribution.reconcile(
        compiled, expected, None, platform
    )[0]["note"]
    assert "XLA:CPU runs these collectives in fp32" in note({key: bf16})
    assert note({key: f32}).startswith("unexplained")  # an fp32 all-reduce that ran twice
    assert note({key: bf16}, platform="gpu").startswith("unexplained")
    gather = ("zero3_gather.fwd", "all-gather")
    short = {gather: _compiled(50, {"while/body/blocks/mlp/up/dot_general [dp]": 50})}
    assert note({gather: f32}, compiled=short).startswith("unexplained")
    short[gather]["hoisted_bytes"] = 50
    assert "out of their loop" in note({gather: f32}, compiled=short)
