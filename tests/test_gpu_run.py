"""The one-GPU benchmark's clock (shardgpt/bench/gpu_run.py) and a run that leaves sections out: no jax
work, no GPU."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from shardgpt.bench import gpu as bench
from shardgpt.bench import gpu_run


def test_a_run_of_only_left_out_sections_still_writes_its_table_and_results(tmp_path):
    """--sections without the headline (BENCHMARKS' rerun hint): every section skipped, nothing measured,
    and table.txt and results.json written all the same."""
    results = bench.main(
        ["--tiny", "--out", str(tmp_path), "--sections", "cost_model", "--limit", "cost_model=0"]
    )
    assert {s["status"] for s in results["sections"].values()} == {"skipped"}
    assert "not in --sections" in results["sections"]["headline"]["error"]
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["wall_s"] >= 0
    assert "cost_model" in (tmp_path / "table.txt").read_text()


def test_results_are_written_whole_and_a_torn_file_reads_as_none(tmp_path):
    path = tmp_path / "r.json"
    gpu_run.write_json(path, {"a": 1})
    assert gpu_run.read_json(path) == {"a": 1} and not list(tmp_path.glob("*.partial"))
    path.write_text('{"a": ')  # a writer killed mid-write
    assert gpu_run.read_json(path) is None and gpu_run.read_json(tmp_path / "missing.json") is None


def test_a_measurement_that_cannot_start_is_skipped_not_an_error(tmp_path):
    run = gpu_run.Run({"meta": {}, "sections": {}}, tmp_path, 100.0, {"s": 50.0})

    def body(run):
        def measure():
            raise gpu_run.Skipped("2 s left, under the 5 s worth starting a process with")

        row = run.attempt({}, measure)
        assert (row["status"], row["error"]) == (
            "skipped",
            "2 s left, under the 5 s worth starting a process with",
        )

    assert run.section("s", body)["status"] == "ok"


def test_an_interrupted_wait_kills_the_child_in_its_own_session(tmp_path):
    """Ctrl-C (or SIGTERM, which gpu.main turns into an exit) while a child runs: the child's process group is
    killed, not left holding the device."""
    pid_file = tmp_path / "pid"
    child = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    driver = (
        "import sys; from pathlib import Path; from shardgpt.bench import gpu_run; "
        f"gpu_run.run_process([sys.executable, '-c', {child!r}], None, 60, Path({str(tmp_path / 'log')!r}))"
    )
    parent = subprocess.Popen([sys.executable, "-c", driver])
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.05)
    parent.send_signal(signal.SIGINT)
    parent.wait(timeout=30)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # SIGKILL'd and reaped by the parent: gone within moments
            os.kill(pid, 0)
            time.sleep(0.05)
