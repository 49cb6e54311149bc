"""The cost model (analysis/cost.py) and cluster specs (hardware.cluster): hand-made ops, no compile."""

import pytest

from shardgpt.analysis import cost, hardware
from shardgpt.analysis.hlo import CollectiveOp
from shardgpt.model import config


def _op(kind: str, nbytes: int, groups: tuple[tuple[int, ...], ...], executions: int = 1) -> CollectiveOp:
    size = None if kind == "collective-permute" else len(groups[0])
    return CollectiveOp(kind, "op", nbytes, executions, (), size, "jit(step)", groups)


def test_alpha_beta_factors_by_kind():
    assert cost.factor("all-reduce", 8) == pytest.approx(2 * 7 / 8)
    assert cost.factor("all-gather", 4) == pytest.approx(3 / 4)
    assert cost.factor("reduce-scatter", 4) == 3  # of its shard: (n-1)/n of the gathered size
    assert cost.factor("all-to-all", 2) == pytest.approx(1 / 2)
    assert cost.factor("collective-permute", 2) == 1
    assert cost.factor("all-reduce", 1) == 0
    # XLA:CPU's reduce-scatter is an all-reduce on cpu, a reduce-scatter of the full size elsewhere
    assert cost.factor("all-reduce+slice", 8, "cpu") == pytest.approx(2 * 7 / 8)
    assert cost.factor("all-reduce+slice", 8, "gpu") == pytest.approx(7 / 8)


def test_a_group_inside_a_node_uses_nvlink_one_across_nodes_infiniband():
    cluster = hardware.cluster("2xh100x8")
    constants = cost.rates(cluster, "bfloat16")
    inside = _op("all-reduce", 2**20, ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)))
    across = _op("all-reduce", 2**20, ((0, 8), (1, 9)), executions=3)
    assert not cost.crosses_nodes(inside, 8, 16) and cost.crosses_nodes(across, 8, 16)
    seconds = cost.communication([inside, across], cluster, 16, constants)
    nvlink, ib = 900e9 / 2, 100e9 / 2  # the profile's both-direction figures, one way
    alpha = {k: constants[f"{k}_alpha_s"]["value"] for k in ("intra", "inter")}
    assert seconds["intra"] == pytest.approx(alpha["intra"] + 1.5 * 2**20 / nvlink)
    assert seconds["inter"] == pytest.approx(3 * (alpha["inter"] + 1.0 * 2**20 / ib))


def test_bounds_are_ordered_and_the_bubble_scales_the_step():
    cfg = config.preset("gpt2")
    ops = [_op("all-reduce", 50 * 2**20, (tuple(range(8)),))]
    mesh = {"dp": 8, "tp": 1, "pp": 1}
    p = cost.predict(ops, cfg, "dp", mesh, 64, 1024, 1, hardware.cluster("h100x8"))
    step, terms = p["step_time_s"], p["terms_s"]
    assert step["full_overlap"] <= step["no_overlap"]
    assert step["no_overlap"] == pytest.approx(terms["compute"] + terms["memory"] + terms["communication"])
    assert p["binding"] == max(("compute", "memory", "communication"), key=terms.get)
    assert 0 < p["mfu"]["no_overlap"] <= p["mfu"]["full_overlap"] < 1
    assert cost.bubble_factor(1, 1) == 1 and cost.bubble_factor(4, 4) == pytest.approx(7 / 4)
    piped = cost.predict(ops, cfg, "dp", {"dp": 2, "tp": 1, "pp": 4}, 64, 1024, 4, hardware.cluster("h100x8"))
    assert piped["constants"]["bubble_factor"]["value"] == pytest.approx(7 / 4)
    with pytest.raises(ValueError, match="needs 8 devices"):
        cost.predict(ops, cfg, "dp", mesh, 64, 1024, 1, hardware.cluster("h100x4"))


def test_cluster_specs_and_their_errors():
    two = hardware.cluster("2xh100x8")
    assert (two.profile.name, two.nodes, two.devices_per_node) == ("h100", 2, 8)
    v5e = hardware.cluster("v5e-16")
    assert (v5e.profile.name, v5e.nodes, v5e.devices) == ("tpu-v5e", 1, 16)
    for bad, why in (("h100", "cannot read"), ("h999x8", "no hardware profile"), ("0xh100x8", ">= 1")):
        with pytest.raises(ValueError, match=why) as e:
            hardware.cluster(bad)
        assert "2xh100x8" in str(e.value) and "tpu-v5e" in str(e.value)  # examples and names listed


def test_predict_cli_prints_a_labelled_table_and_writes_prediction_rows(tmp_path):
    """One gpt-pico compile (as test_plan's), predicted for two nodes: nothing runs."""
    import contextlib
    import io
    import json

    from shardgpt.cli import run as cli

    argv = ["--predict", "--hardware", "2xh100x4", "--model", "gpt-pico", "--mesh", "dp=8", "--seq", "32"]
    argv += [
        "--strategy",
        "zero3",
        "--batch",
        "8",
        "--dtype",
        "float32",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main(argv) == 0
    assert "a PREDICTION for 2xh100x4" in stdout.getvalue() and "compiled for cpu" in stdout.getvalue()
    (row,) = json.loads((tmp_path / "results.json").read_text())["plan"]
    p = row["prediction"]
    assert p["terms_s"]["communication_inter_node"] > 0  # dp=8 over 2 nodes of 4: the gradients cross IB
    assert p["step_time_s"]["full_overlap"] <= p["step_time_s"]["no_overlap"]


def test_remat_adds_the_blocks_forward_to_compute():
    cfg = config.preset("gpt2")
    ops = [_op("all-reduce", 2**20, (tuple(range(8)),))]
    mesh, cluster = {"dp": 8, "tp": 1, "pp": 1}, hardware.cluster("h100x8")
    plain = cost.predict(ops, cfg, "dp", mesh, 64, 1024, 1, cluster)["terms_s"]["compute"]
    remat = cost.predict(ops, cfg.replace(remat=True), "dp", mesh, 64, 1024, 1, cluster)["terms_s"]["compute"]
    assert 1.2 < remat / plain < 4 / 3  # a third more, less the head's share (gpt2: 1.24)
    assert cost.recompute_factor(cfg, 1024) == 1


def test_measure_needs_the_machine_it_times():
    from types import SimpleNamespace

    from shardgpt.lab import predict

    cpus = [SimpleNamespace(platform="cpu", device_kind="cpu")] * 8
    predict.check_measurable("cpux8", cpus, 1)
    for spec, processes in (("h100x8", 1), ("cpux4", 1), ("cpux8", 2)):
        with pytest.raises(ValueError, match="must be it, e.g. cpux8"):
            predict.check_measurable(spec, cpus, processes)


def test_memory_parts_shard_the_accumulator_and_the_update_under_zero3():
    """gpt2 on dp=8, M=2: ZeRO-3's accumulator and update hold a dp shard, 1/8 of dp's; M=1 accumulates
    nothing, and the matmuls' operands (hidden under their FLOPs) stay out of the memory term."""
    cfg, mesh = config.preset("gpt2"), {"dp": 8}
    dp, zero3 = (cost.memory_parts(cfg, s, mesh, 64, 1024, 2) for s in ("dp", "zero3"))
    assert zero3["accumulation"] == pytest.approx(dp["accumulation"] / 8)
    assert dp["accumulation"] == pytest.approx(3 * 2 * cfg.n_params() * 4)
    assert zero3["update"] == pytest.approx(dp["update"] / 8)
    assert cost.memory_parts(cfg, "dp", mesh, 64, 1024, 1)["accumulation"] == 0
    assert cost.memory_bytes(cfg, "dp", mesh, 64, 1024, 2) == pytest.approx(
        sum(v for k, v in dp.items() if k != "matmul_operands")
    )
