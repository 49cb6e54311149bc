"""Megatron sequence parallelism ("+sp"): one activation rule under GSPMD, all-gather/reduce-scatter hooks
under shard_map; either way the losses of one device, with the activations between the tensor-parallel
regions split over tp.

Tolerances: losses and grad norms within 1e-5 absolute of one device over 3 AdamW steps (fp32), as in
test_equivalence. Sequences are sort's 11 tokens plus one ignored (tests/_runs.py SP_SEQ = 12).
"""

import re

import flax.linen as nn
import numpy as np
import pytest
from _runs import SINGLE, SP_SEQ, by_cause, off_theory, run, unattributed_share

from shardgpt.analysis import hlo
from shardgpt.parallel import layout, sharding
from shardgpt.parallel.mesh import make_mesh

MESH, TP, N_LAYER = "dp=2,tp=4", 4, 2


def test_the_rule_splits_length_between_the_tensor_parallel_regions_only():
    rules = sharding.rules("zero1+sp", "activations")
    resolve = lambda names: tuple(nn.logical_to_mesh_axes(names, rules))
    assert resolve(("batch", "length", "embed")) == ("dp", "tp", None)  # the residual stream
    assert resolve(("batch", "length", "heads", "kv")) == ("dp", None, "tp", None)  # inside attention
    assert resolve(("batch", "length", "mlp")) == ("dp", None, "tp")
    assert resolve(("batch", "length", "vocab")) == ("dp", None, "tp")
    for target in ("params", "grads", "opt_state"):  # the state is laid out exactly as without +sp
        assert sharding.rules("zero1+sp", target) == sharding.rules("zero1", target)
    assert (
        sharding.batch_sharding(make_mesh(MESH), "dp+sp").spec
        == sharding.batch_sharding(make_mesh(MESH), "dp").spec
    )  # token ids arrive whole; the embedding output is what is split
    assert sharding.canonical("fsdp+sp") == "zero3+sp" and sharding.zero_stage("zero2+sp") == 2
    assert "any+sp" in sharding.strategy_table() and "tp*" in sharding.strategy_table()


def test_bad_sequence_parallel_input_is_refused_before_compiling():
    with pytest.raises(ValueError, match=r"unknown strategy 'zero9\+sp'"):
        sharding.canonical("zero9+sp")
    with pytest.raises(ValueError, match="this mesh has tp=1: use a mesh with tp > 1"):
        layout.check_sequence_parallel(make_mesh("dp=8"), "dp+sp", 12)
    with pytest.raises(ValueError, match="sequence length 11 is not divisible by tp=4"):
        layout.check_sequence_parallel(make_mesh(MESH), "zero1+sp", 11)


CASES = [("gspmd", "dp+sp"), ("shard_map", "dp+sp"), ("shard_map", "zero3+sp")]


@pytest.mark.parametrize("impl, strategy", CASES)
def test_sequence_parallel_matches_one_device(impl, strategy):
    ref, got = run("gspmd", SINGLE, "dp", seq=SP_SEQ), run(impl, MESH, strategy, seq=SP_SEQ)
    where = f"{impl} {strategy}"
    np.testing.assert_allclose(got.losses, ref.losses, rtol=0, atol=1e-5, err_msg=f"{where} losses")
    np.testing.assert_allclose(got.grad_norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg=f"{where} norms")


def test_shard_map_swaps_each_all_reduce_for_a_reduce_scatter_and_an_all_gather():
    """Per layer 2 regions, each entered (all-gather) and left (reduce-scatter) forward, and the reverse
    backward; plus the embedding (reduce-scatter) and the head (all-gather): 2 (2 N + 1) of each."""
    ops = [
        op
        for op in hlo.collective_ops(run("shard_map", MESH, "dp+sp", seq=SP_SEQ).hlo)
        if op.group_size == TP
    ]
    totals = hlo.totals(ops)
    activation = 8 * SP_SEQ * 64 * 4  # a device's (batch 16 / dp 2, length, n_embd) in fp32
    n = 2 * (2 * N_LAYER + 1)
    assert totals["all-gather"] == {"count": n, "bytes": n * activation}, totals
    assert totals["reduce-scatter"] == {"count": n, "bytes": n * activation // TP}, totals
    # What tp still all-reduces is the vocab-parallel loss and the gradients of the params the regions
    # between share (LayerNorms, biases, wpe), each device having seen its slice of the sequence.
    megatron = [op for op in ops if re.search(r"/(megatron_[fg]|vocab_embed)/", op.op_name)]
    assert not megatron, f"Megatron's activation all-reduces remain: {megatron}"


def test_gspmd_compiles_the_reduce_scatters_xla_cpu_hides():
    """XLA:CPU lowers GSPMD's reduce-scatters as an all-reduce whose uses slice it: read as what it is."""
    totals = hlo.collectives(run("gspmd", MESH, "dp+sp", seq=SP_SEQ).hlo)
    assert totals[hlo.SLICED_ALL_REDUCE]["count"] >= 2 * N_LAYER, totals  # each region's exit, forward
    assert totals["all-gather"]["count"] >= 2 * N_LAYER, totals


def test_sequence_parallel_shrinks_the_activation_temporaries():
    without, with_sp = run("shard_map", MESH, "dp", seq=SP_SEQ), run("shard_map", MESH, "dp+sp", seq=SP_SEQ)
    # Only the activations between the regions (LayerNorms, residual adds) divide by tp: about a quarter
    # of the temporaries at this size.
    assert with_sp.temp_bytes < 0.85 * without.temp_bytes, (with_sp.temp_bytes, without.temp_bytes)


def test_shard_map_sequence_parallel_collectives_equal_theory():
    """Every cause exactly theory's bytes, none unattributed: Megatron-SP's gathers and scatters, and the
    tp sums of the gradients of params tp does not split (LayerNorms, row-parallel biases, wpe), each read
    beside a sequence slice."""
    rows = by_cause("shard_map", MESH, "dp+sp", seq=SP_SEQ)
    assert not off_theory(rows) and unattributed_share(rows) == 0, off_theory(rows)
