"""The one-GPU benchmark (experiments/gpu_bench.py) on CPU: --tiny writes every field of results.json, with
sensible values, and a run past its budget, or asking for cuDNN without a GPU, records why each part did not
run."""

import json
import math

import pytest

from shardgpt.bench import gpu as bench
from shardgpt.bench import gpu_parts as parts

META_KEYS = {"jax_version", "platform", "device_kind", "num_devices", "command", "date", "model", "n_params"}
META_KEYS |= {"seq", "dtype", "budget_s", "wall_s", "tiny", "sizes", "xla_flags"}
TOP_KEYS = {"meta", "sources", "copy_bandwidth_bytes_per_s", "copy", "train", "decode", "naive"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(results returned, results.json as written, table.txt) of one --tiny run."""
    out = tmp_path_factory.mktemp("gpu_bench")
    results = bench.main(["--tiny", "--out", str(out)])
    return results, json.loads((out / "results.json").read_text()), (out / "table.txt").read_text()


def _positive(row: dict, *keys: str):
    for key in keys:
        assert isinstance(row[key], float | int) and row[key] > 0 and math.isfinite(row[key]), (key, row)


def test_tiny_writes_every_field(tiny):
    results, written, _ = tiny
    assert written == json.loads(json.dumps(results))
    assert set(written) == TOP_KEYS
    assert META_KEYS <= set(written["meta"]), META_KEYS - set(written["meta"])
    assert written["meta"]["platform"] == "cpu" and written["meta"]["tiny"] is True
    _positive(written, "copy_bandwidth_bytes_per_s")
    assert (
        written["copy"]["status"] == "ok"
        and written["copy"]["bytes_per_s"] == written["copy_bandwidth_bytes_per_s"]
    )
    assert [set(r) for r in written["train"]] == [set(parts.TRAIN_KEYS)] * 2
    assert [set(r) for r in written["decode"]] == [set(parts.DECODE_KEYS)] * 2
    assert set(written["naive"]) == set(parts.NAIVE_KEYS)
    # Every figure names its source, and none derived is labelled measured.
    rows = written["train"] + written["decode"] + [written["naive"]]
    figures = {k for r in rows for k, v in r.items() if isinstance(v, float)}
    assert figures <= set(written["sources"]), figures - set(written["sources"])
    for key in ("mfu", "tokens_per_s", "floor_ms", "ratio_to_floor", "weight_bytes", "cache_bytes"):
        assert written["sources"][key].startswith(("derived", "theory")), key


def test_tiny_train_rows_are_sensible(tiny):
    rows = tiny[0]["train"]
    assert [(r["layers"], r["attention"], r["batch"]) for r in rows] == [
        ("unrolled", "xla", 2),
        ("scan", "xla", 2),
    ]  # on CPU: xla only, headline first
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None, r
        _positive(r, "compile_s", "step_time_s", "step_time_median_s", "tokens_per_s", "flops_per_token")
        _positive(r, "first_loss", "last_loss", "temp_bytes", "wall_s")
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["step_time_s"])
        assert r["peak_flops"] is None and r["mfu"] is None  # no peak is known for a CPU
        assert r["goal_mfu"] == parts.GOAL_MFU and r["reference_mfu"] is None  # references are gpt2's


def test_tiny_decode_and_naive_are_sensible(tiny):
    results = tiny[0]
    for r, batch in zip(results["decode"], (1, 4), strict=True):
        assert r["batch"] == batch and r["status"] == "ok" and r["compiles"] == 1, r
        _positive(r, "compile_s", "first_token_ms", "total_ms", "ms_per_step", "weight_bytes", "cache_bytes")
        _positive(r, "floor_ms", "ratio_to_floor")
        floor_s = (r["weight_bytes"] + r["cache_bytes"]) / results["copy_bandwidth_bytes_per_s"]
        assert r["floor_ms"] == pytest.approx(1e3 * floor_s)
        assert r["ratio_to_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms"])
        assert r["goal_ratio"] == (3.0 if batch == 1 else 1.5)
    # The cache grows with the batch; the weights read per step do not.
    assert results["decode"][1]["cache_bytes"] == 4 * results["decode"][0]["cache_bytes"]
    assert results["decode"][1]["weight_bytes"] == results["decode"][0]["weight_bytes"]
    naive = results["naive"]
    assert naive["status"] == "ok" and naive["tokens"] == naive["compiles"] == 2  # one compile per length
    _positive(naive, "s_per_token")
    assert len(naive["per_token_s"]) == 2


def test_tiny_table_shows_goals(tiny):
    text = tiny[2]
    for words in ("copy bandwidth (measured", "MFU", "goal", "x floor", "naive generator"):
        assert words in text, words
    assert text.count("  ok") == 5  # 2 train rows, 2 decode rows, naive


def test_past_the_budget_everything_is_skipped_with_its_reason(tmp_path):
    results = bench.main(["--tiny", "--out", str(tmp_path), "--budget", "0", "--attention", "xla,cudnn"])
    assert results["copy_bandwidth_bytes_per_s"] is None
    reasons = {r["error"] for r in results["train"] + results["decode"] + [results["naive"]]}
    assert reasons == {
        "past the 0 s budget",
        "no copy bandwidth was measured: no floor",
        "cudnn attention needs an NVIDIA GPU, not cpu",
    }
    assert all(r["status"] == "skipped" for r in results["train"] + results["decode"] + [results["naive"]])
    assert len(results["train"]) == 4 and set(results["train"][0]) == set(parts.TRAIN_KEYS)
    assert "n/a" in (tmp_path / "table.txt").read_text()


def test_a_failing_part_records_its_error_and_the_run_goes_on(tmp_path):
    run = parts.Budget({"meta": {}}, tmp_path, budget_s=60)
    row = run.attempt({"error": None}, lambda: 1 / 0)
    assert row["status"] == "error" and row["error"].startswith("ZeroDivisionError"), row
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["wall_s"] >= 0


def test_train_matrix_runs_the_headline_then_one_change_at_a_time():
    order = parts.train_matrix(["unrolled", "scan"], ["cudnn", "xla"], [16, 32, 8])
    assert len(order) == 12 and len(set(order)) == 12
    assert order[:5] == [
        ("unrolled", "cudnn", 16),
        ("unrolled", "cudnn", 32),
        ("unrolled", "cudnn", 8),
        ("unrolled", "xla", 16),
        ("scan", "cudnn", 16),
    ]
    assert order[-2:] == [("scan", "xla", 32), ("scan", "xla", 8)]
