"""Two processes x 4 CPU devices (jax.distributed over localhost, started by
shardgpt.parallel.distributed.launch) equal one process x 8: training (zero3 under GSPMD, shard_map and
explicit sharding; the equivalence tests' 1e-5), per-process batch rows, the tp groups' placement,
generation, and checkpoints saved by one set-up and restored by the other. The launcher stops every worker
when one fails."""

import json
import os
import textwrap
import time
from pathlib import Path

import _runs
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _multiprocess_worker import MESH, NEW_TOKENS, PROMPTS, RUNS, digest

from shardgpt.generation import generate
from shardgpt.io import checkpoint
from shardgpt.parallel import distributed, shard_map_plan
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import train

WORKER = Path(__file__).resolve().parent / "_multiprocess_worker.py"


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The workers' report, and the directory of the checkpoint they saved."""
    where = tmp_path_factory.mktemp("multiprocess")
    state = _runs.run("gspmd", MESH, "zero3").state  # saved by this one process, restored by the two
    shardings = train.state_shardings(_runs.MODEL, _runs.TX, make_mesh("dp=8"), "zero3")
    saver = checkpoint.Checkpointer(where / "one", async_save=False)
    saver.save(jax.device_put(state, shardings.state), {"model": {}})
    saver.close()
    argv = [str(where / "out.json"), str(where / "one"), str(where / "two")]
    assert distributed.launch(str(WORKER), argv, processes=2, devices=8, prog="test") == 0
    return json.loads((where / "out.json").read_text()), where / "two", digest(state)


def test_two_processes_train_like_one(workers):
    report, _, _ = workers
    assert (report["processes"], report["devices"]) == (2, 8)
    for impl, strategy in RUNS:
        here, there = _runs.run(impl, MESH, strategy), report[f"{impl} {strategy}"]
        where = f"{impl} {strategy}"
        np.testing.assert_allclose(there["losses"], here.losses, rtol=0, atol=1e-5, err_msg=where)
        np.testing.assert_allclose(there["grad_norms"], here.grad_norms, rtol=0, atol=1e-5, err_msg=where)


def test_each_process_builds_its_own_rows_and_tp_stays_on_one_process(workers):
    report, _, _ = workers
    assert report["batch_equal"], "the global batch assembled from per-process rows differs"
    assert report["rows_built_by_process_0"] == [0, 1, 2, 3], "process 0 holds dp shard 0: rows 0-3 only"
    assert (report["tp_spans"], report["dp_spans"]) == (1, 2), "tp within a process, dp across them"


def test_generation_equals_one_process(workers):
    report, _, _ = workers
    params = _runs.run("gspmd", MESH, "zero3").state.params
    here = generate.generate(_runs.MODEL, params, PROMPTS, NEW_TOKENS, mesh=make_mesh(MESH), strategy="zero3")
    assert report["generated"] == [t.tolist() for t in here]


def test_checkpoints_move_between_one_and_two_processes(workers):
    report, saved_by_two, saved_here = workers
    assert report["restored_digest"] == saved_here, "two processes restored another state than one saved"
    target, _ = train.abstract_state(_runs.MODEL, _runs.TX, make_mesh("dp=8"), "zero3")
    ckpt = checkpoint.Checkpointer(saved_by_two)
    restored = jax.device_get(ckpt.restore(target))
    ckpt.close()
    assert digest(restored) == report["saved_digest"], "one process restored another state than two saved"


def test_a_failed_worker_stops_the_others_within_seconds(tmp_path, capfd):
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        pid = sys.argv[sys.argv.index("--process-id") + 1]
        open(sys.argv[1] + "." + pid, "w").write(str(__import__("os").getpid()))
        if pid == "1":
            time.sleep(0.5)
            sys.exit("worker 1: the disk is full")
        time.sleep(120)
        """)
    )
    started = time.monotonic()
    status = distributed.launch(str(script), [str(tmp_path / "pid")], processes=2, devices=2, prog="test")
    assert status == 1 and time.monotonic() - started < 10
    err = capfd.readouterr().err
    assert "worker 1 of 2 exited with status 1" in err and "the disk is full" in err, err
    survivor = int((tmp_path / "pid.0").read_text())
    with pytest.raises(ProcessLookupError):  # reaped, not orphaned
        os.kill(survivor, 0)


def test_clusters_are_detected_and_partial_settings_refused():
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == "SLURM"
    assert distributed.detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task
    assert (
        distributed.detected_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"})
        == "Open MPI"
    )
    assert distributed.detected_cluster({"KUBERNETES_SERVICE_HOST": "h"}) is None  # a pod, not an indexed Job
    assert distributed.detected_cluster({}) is None
    with pytest.raises(ValueError, match="give --process-id too"):
        distributed.initialize("localhost:1", 2, None)
    with pytest.raises(ValueError, match=r"--process-id 2 must be in \[0, 2\)"):
        distributed.initialize("localhost:1", 2, 2)


def test_a_hung_worker_is_stopped_once_the_others_are_done(tmp_path, capfd, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, time\nif sys.argv[sys.argv.index('--process-id') + 1] == '1':\n    time.sleep(120)\n"
    )
    monkeypatch.setattr(distributed, "FINISH_GRACE_S", 1.0)
    started = time.monotonic()
    assert distributed.launch(str(script), [], processes=2, devices=2, prog="test") == 1
    assert time.monotonic() - started < 10
    assert "worker 1 of 2 was still running 1 s after worker 0 finished" in capfd.readouterr().err


def test_launch_refuses_a_split_that_does_not_divide():
    with pytest.raises(ValueError, match="--processes 3 must divide the 8"):
        distributed.launch("x.py", [], processes=3, devices=8, prog="test")
    with pytest.raises(ValueError, match="1 is the ordinary run"):
        distributed.launch("x.py", [], processes=1, devices=8, prog="test")


def test_the_gloo_guard_reduce_scatters_the_same_values():
    """shard_map_plan._reduce_scatter with a chunk limit (all-reduce, then this device's slice) equals
    psum_scatter."""
    mesh = make_mesh("dp=8")
    x = jnp.arange(8 * 128 * 3, dtype=jnp.float32).reshape(8 * 128, 3)  # each device: 128 rows to scatter

    def both(x_):
        scatter = shard_map_plan._reduce_scatter
        return scatter(x_, "dp", 0, None), scatter(x_, "dp", 0, 0)

    P = jax.sharding.PartitionSpec
    mapped = jax.shard_map(both, mesh=mesh, in_specs=P("dp"), out_specs=(P("dp"), P("dp")))
    plain, guarded = jax.jit(mapped)(x)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(guarded))
    assert shard_map_plan.scatter_limit(mesh) is None, "one process: no guard"


def test_the_cli_refuses_mixed_flags_and_a_split_that_does_not_divide(capsys):
    from shardgpt.cli import run as cli

    with pytest.raises(SystemExit):
        cli.main(["--processes", "2", "--coordinator", "localhost:1234"])
    assert "drop --coordinator" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--processes", "3"])
    assert "--processes 3 must divide the 8 simulated devices" in capsys.readouterr().err
