"""Gradient accumulation: M microbatches of B/M equal one batch of B, in both impls, with the dp gradient
reduction outside the microbatch loop (dp, zero1) and the activation temporaries shrinking with M.

Tolerances: losses and grad norms within 1e-5 relative of the M=1 run over 3 AdamW steps (fp32; observed
~2e-7: only the order of the token-loss sums differs). Each dp shard's rows hold unequal token counts
(tests/_runs.py), so a mean of microbatch means would miss by far more.
"""

import _runs
import numpy as np
import pytest
from _runs import by_cause, run, unattributed_share

from shardgpt.analysis import hlo
from shardgpt.parallel import layout, microbatch

MESH, DP, M = "dp=2,tp=4", 2, 4
CASES = [(impl, s) for impl in ("gspmd", "shard_map") for s in ("dp", "zero3")]


@pytest.mark.parametrize("impl, strategy", CASES)
def test_microbatches_equal_one_batch(impl, strategy):
    one, split = run(impl, MESH, strategy), run(impl, MESH, strategy, microbatches=M)
    where = f"{impl} {strategy} M={M}"
    np.testing.assert_allclose(split.losses, one.losses, rtol=1e-5, atol=0, err_msg=f"{where} losses")
    np.testing.assert_allclose(split.grad_norms, one.grad_norms, rtol=1e-5, atol=0, err_msg=f"{where} norms")


def _dp_ops(text: str, kind: str) -> list[hlo.CollectiveOp]:
    """The program's `kind` ops over dp groups (size 2 on dp=2,tp=4; tp groups have 4 devices)."""
    return [op for op in hlo.collective_ops(text) if op.kind == kind and op.group_size == DP]


@pytest.mark.parametrize("impl", ["gspmd", "shard_map"])
def test_dp_gradients_are_reduced_once_per_step_after_the_loop(impl):
    one, split = run(impl, MESH, "dp").hlo, run(impl, MESH, "dp", microbatches=M).hlo
    ops = {n: _dp_ops(text, "all-reduce") for n, text in ((1, one), (M, split))}
    assert ops[1], "no dp all-reduce found: did the replica-group format change? (hlo._group_size)"
    totals = {n: hlo.totals(found)["all-reduce"] for n, found in ops.items()}
    # Same bytes; GSPMD at M=1 reduces each scanned layer's gradients inside the layer loop (2 ops a step),
    # and after the microbatch loop XLA combines them into one op, so the count can only drop.
    assert totals[M]["bytes"] == totals[1]["bytes"], f"dp all-reduces at M={M} {totals[M]} vs M=1 {totals[1]}"
    assert totals[M]["count"] <= totals[1]["count"], f"dp all-reduces at M={M} {totals[M]} vs M=1 {totals[1]}"
    in_loop = [op for op in ops[M] if M in op.loops]
    assert not in_loop, f"dp reductions inside the {M}-trip microbatch loop: {in_loop}"
    # The tp (Megatron) all-reduces do run per microbatch: same bytes in M times the ops.
    megatron = [op for op in hlo.collective_ops(split) if op.kind == "all-reduce" and op.group_size == 4]
    assert any(M in op.loops for op in megatron)


def test_zero3_reduce_scatters_each_microbatch_into_its_shard():
    """shard_map zero3: every gradient reduce-scatter (and param gather) runs once per microbatch."""
    one, split = run("shard_map", MESH, "zero3").hlo, run("shard_map", MESH, "zero3", microbatches=M).hlo
    scatters = {
        n: hlo.totals(_dp_ops(t, "reduce-scatter"))["reduce-scatter"] for n, t in ((1, one), (M, split))
    }
    assert scatters[M] == {"count": M * scatters[1]["count"], "bytes": M * scatters[1]["bytes"]}, scatters


@pytest.mark.parametrize("impl, strategy", CASES)
def test_activation_temporaries_shrink_with_microbatches(impl, strategy):
    one, split = run(impl, MESH, strategy).temp_bytes, run(impl, MESH, strategy, microbatches=M).temp_bytes
    # Activations dominate the temporaries at this size; the gradients and accumulators do not shrink.
    assert split < 0.6 * one, f"temporaries {one} B at M=1, {split} B at M={M}: activations not split?"


def test_microbatches_must_divide_each_dp_shard():
    with pytest.raises(ValueError, match="--microbatches 3 does not divide the per-dp batch 8 .* 1, 2, 4, 8"):
        microbatch.check(16, 3, 2)
    with pytest.raises(ValueError, match="--microbatches must be >= 1"):
        microbatch.check(16, 0, 2)
    mesh = _runs.mesh_for(MESH)
    with pytest.raises(ValueError, match="does not divide the per-dp batch"):
        layout.check_batch(_runs.MODEL.config, mesh, "dp", 16, _runs.TASK.seq_len, microbatches=16)


def test_split_keeps_each_dp_shards_rows_together():
    rows = np.arange(16)[:, None]
    blocks = np.asarray(microbatch.split({"x": rows}, 4, groups=2)["x"])[..., 0]
    assert blocks.shape == (4, 2, 2)
    assert set(blocks[:, 0].ravel()) == set(range(8)) and set(blocks[:, 1].ravel()) == set(range(8, 16))
    assert sorted(np.asarray(microbatch.split({"x": rows}, 4)["x"]).ravel()) == list(range(16))


def test_gspmd_microbatch_reductions_are_attributed():
    """The ZeRO-3 gradient sums of each microbatch and the loss sums after the loop carry their scopes."""
    rows = by_cause("gspmd", MESH, "zero3", microbatches=M)
    assert unattributed_share(rows) == 0 and rows["loss", "all-reduce"]["bytes"] == 8
    assert rows["grad_reduce", "reduce-scatter"]["bytes"] > 0
