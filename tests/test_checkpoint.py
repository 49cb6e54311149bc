"""Checkpoints and experiments/train.py: bit-exact save/restore, resharding on restore, exact resume (also
after kill -9, replaying at least one step), the NaN exit, and refusing corrupt or foreign directories
without deleting."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardgpt.cli import train as cli
from shardgpt.io import checkpoint
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import data, loss, optim, train

ROOT = Path(__file__).resolve().parents[1]

# A deliberately corrupted restore leaves tensorstore callbacks aimed at orbax's closed event loop; they fail
# later, harmlessly, in whichever test is running then.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning"
)

# gpt-pico with one layer (one compile is a few seconds here), sort task, 8 simulated devices.
BASE = ["--model", "gpt-pico", "--model.n_layer=1", "--batch", "8", "--mesh", "dp=2,tp=4"]


def _losses(ckpt_dir: Path) -> dict[int, float]:
    losses = {}
    for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut by kill -9
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    return losses


def _tree_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _files(where: Path) -> dict[str, int]:
    """Every file's size, but the writers' lock (it records each writer's pid while it holds it)."""
    files = (p for p in where.rglob("*") if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(where)): p.stat().st_size for p in files}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """A run killed with kill -9 once it has logged 12 steps, then resumed to the last step it logged from
    the newest checkpoint before that step (--resume --step moves newer ones aside), so at least one step
    trains again wherever the kill fell: (ckpt dir, losses before the kill, the step resumed from, the last
    step). The schedule is fixed (total 400) so that --steps, which is only where each run stops, leaves
    the losses comparable."""
    ckpt_dir = tmp_path_factory.mktemp("killed") / "ckpt"
    argv = [*BASE, "--optim.total_steps=400", "--optim.warmup_steps=10", "--save-every", "2"]
    argv += ["--ckpt-dir", str(ckpt_dir)]
    # --resume on an empty directory starts from step 0: one command for a job's first start and restarts.
    command = [sys.executable, str(ROOT / "experiments" / "train.py"), *argv, "--steps", "400", "--resume"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        log = ckpt_dir / "metrics.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 12):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run to kill never reached 12 steps"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # no chance to finish a save or close anything
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    before = _losses(ckpt_dir)
    last = max(before)  # a step is logged before it is saved, so no checkpoint lies beyond it
    probe = checkpoint.Checkpointer(ckpt_dir)
    saved = sorted(probe.manager.all_steps())
    probe.close()
    start = max((s for s in saved if s < last), default=None)
    assert start is not None, f"no checkpoint before the last logged step {last}: {saved}"
    export = ckpt_dir.parent / "final.npz"
    resume = ["--resume", "--step", str(start), "--export", str(export)]
    assert cli.main([*argv, "--steps", str(last), *resume]) == 0
    assert "lm_head.weight" in np.load(export)
    return ckpt_dir, before, start, last


def test_kill_9_then_resume_equals_the_uninterrupted_run_loss_for_loss(killed):
    ckpt_dir, before, start, last = killed
    replayed = range(start + 1, last + 1)
    assert start % 2 == 0 and len(replayed) >= 1, f"resumed from {start}, the last step: nothing replayed"
    after = _losses(ckpt_dir)
    assert sorted(after) == list(range(1, last + 1))
    assert after == before, f"steps {start + 1}-{last} must replay bit for bit (fp32, same mesh)"
    records = [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "val_loss" in r]
    assert evaluated == [last] and np.isfinite(records[-1]["val_loss"]), (
        "held-out loss at the last step only (--eval-every 100), not at every save"
    )
    ckpt = checkpoint.Checkpointer(ckpt_dir)
    assert ckpt.latest_step() == last and ckpt.description()["model"]["n_layer"] == 1
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpt_dir.iterdir()), os.listdir(ckpt_dir)
    ckpt.close()


@pytest.fixture(scope="module")
def pico():
    model = GPT(config.preset("gpt-pico", n_layer=1, vocab_size=3, block_size=11))
    return model, optim.make_optimizer(optim.OptimConfig(total_steps=10))


@pytest.fixture(scope="module")
def host_state(pico):
    """A state on the host with no leaf at its init value (random params and moments, step 1)."""
    model, tx = pico
    shapes = jax.eval_shape(lambda: train._init(model, tx, jax.random.key(0)))
    rng = np.random.default_rng(0)
    floats = lambda s: rng.standard_normal(s.shape).astype(s.dtype)
    leaf = lambda s: floats(s) if np.issubdtype(s.dtype, np.inexact) else np.ones(s.shape, s.dtype)
    return jax.tree.map(leaf, shapes)


def _state(model, tx, host_state, mesh, strategy):
    """host_state placed in `strategy`'s layout on `mesh` (device_put: nothing compiles)."""
    return jax.device_put(host_state, train.state_shardings(model, tx, mesh, strategy).state)


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "zero3"])
def test_save_restore_is_bit_exact(pico, host_state, strategy, tmp_path):
    model, tx = pico
    mesh = make_mesh("dp=2,tp=4")
    state = _state(model, tx, host_state, mesh, strategy)
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    assert ckpt.save(state, {"model": {}}) == 1
    target, shardings = train.abstract_state(model, tx, mesh, strategy)
    restored = ckpt.restore(target)
    ckpt.close()
    assert _tree_equal(restored, state)
    placed = jax.tree.map(
        lambda x, want: x.sharding.is_equivalent_to(want, x.ndim), restored, shardings.state
    )
    assert all(jax.tree.leaves(placed)), "restore must place every leaf as the target says"


def test_restore_reshards_onto_another_mesh_and_one_device(pico, host_state, tmp_path):
    model, tx = pico
    state = _state(model, tx, host_state, make_mesh("dp=8"), "zero3")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(state, {"model": {}})
    ckpt.wait()
    for mesh, strategy in [(make_mesh("dp=2,tp=4"), "dp"), (make_mesh("dp=1", jax.devices()[:1]), "dp")]:
        target, shardings = train.abstract_state(model, tx, mesh, strategy)
        restored = ckpt.restore(target)
        assert _tree_equal(restored.params, state.params) and _tree_equal(restored, state)
        leaf, want = jax.tree.leaves(restored.params)[0], jax.tree.leaves(shardings.state.params)[0]
        assert leaf.sharding == want, "restore must place leaves in the current mesh's layout"
    ckpt.close()


def test_held_out_loss_is_the_token_mean_and_equals_one_device(pico, host_state):
    """make_eval_loss on dp=2,tp=4 zero3 params equals the one-device cross-entropy of the batches
    concatenated: a mean over every non-ignored token, not a mean of batch means."""
    model, tx = pico
    task = data.SortTask()
    mesh = make_mesh("dp=2,tp=4")
    shardings = train.state_shardings(model, tx, mesh, "zero3")
    state = jax.device_put(host_state, shardings.state)
    batches = [dict(zip(("inputs", "targets"), task.rows(i, range(8), "val"), strict=True)) for i in range(2)]
    batches[1]["targets"][:4] = data.IGNORE_INDEX  # unequal token counts: a mean of means would differ
    got = train.make_eval_loss(model, train.make_eval_sums(model, mesh, "zero3", shardings))(
        state.params, batches
    )
    inputs, targets = (np.concatenate([b[k] for b in batches]) for k in ("inputs", "targets"))
    logits = model.apply({"params": host_state.params}, inputs)
    assert got == pytest.approx(float(loss.cross_entropy(logits, targets)), rel=1e-6)


def test_a_non_finite_state_is_never_saved(pico, host_state, tmp_path):
    model, tx = pico
    state = _state(model, tx, host_state, make_mesh("dp=2,tp=4"), "dp")
    bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(checkpoint.NonFiniteState, match="NaN or inf"):
        ckpt.save(bad, {"model": {}})
    assert ckpt.latest_step() is None
    ckpt.close()


def test_nan_exits_3_naming_the_last_good_checkpoint_which_step_resumes(tmp_path, capsys):
    """Two sane steps, then resumed at lr 1e9: step 3's update ruins the params, finite still (saved), and
    a later step is NaN. The good checkpoint is the one the loss *after* it was finite and no spike from
    (step 2), not the newest finite one (step 3, ruined); the log stays strict JSON; --resume --step 2 at
    a sane lr trains on, the newer checkpoints moved aside, not deleted."""
    ckpt_dir = tmp_path / "ckpt"
    saved = [*BASE, "--save-every", "1", "--ckpt-dir", str(ckpt_dir), "--eval-every", "0"]
    assert cli.main([*saved, "--steps", "2", "--lr", "1e-3"]) == 0
    assert cli.main([*saved, "--steps", "8", "--lr", "1e9", "--resume"]) == 3
    message = capsys.readouterr().err.strip().splitlines()[-1]
    failed = int(message.split("error: step ")[1].split(":")[0])
    assert (
        failed > 3
        and "non-finite" in message
        and "last good checkpoint is step 2: resume it with --resume --step 2" in message
    ), message
    strict = lambda line: json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    records = [strict(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    assert (
        records[-1]["step"] == failed
        and records[-1]["non_finite"]  # the loss, the grad norm or both (jax 0.12 overflows the norm first)
        and all(records[-1][name] is None for name in records[-1]["non_finite"])
    )
    argv = [*saved, "--steps", "4", "--lr", "1e-3", "--resume", "--step", "2"]
    assert cli.main(argv) == 0
    assert sorted(int(p.name) for p in (tmp_path / "ckpt.after-2").iterdir()) == list(range(3, failed))
    losses = [strict(line)["loss"] for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses)), losses


def _exits_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_input_exits_2_before_compiling(killed, tmp_path, capsys):
    whole = killed[0]
    another = _exits_2([*BASE, "--model.n_layer=2", "--ckpt-dir", str(whole), "--resume"], capsys)
    assert "holds another model (n_layer: saved 1, now 2)" in another
    assert "pass --resume to continue" in _exits_2([*BASE, "--ckpt-dir", str(whole)], capsys)
    assert "--resume needs --ckpt-dir" in _exits_2([*BASE, "--resume"], capsys)
    fresh = ["--ckpt-dir", str(tmp_path / "fresh")]
    assert "--save-every, --keep and --eval-batches must be" in _exits_2(
        [*BASE, *fresh, "--save-every", "0"], capsys
    )
    for orphan in (["--save-every", "5"], ["--keep", "2"], ["--step", "4", "--resume"]):  # were ignored
        assert "need --ckpt-dir DIR" in _exits_2([*BASE, *orphan], capsys), orphan
    assert "give --resume too" in _exits_2([*BASE, *fresh, "--step", "4"], capsys)
    assert "--step 3: no such checkpoint" in _exits_2(
        [*BASE, "--ckpt-dir", str(whole), "--resume", "--step", "3"], capsys
    )
    assert "--eval-every must be >= 0" in _exits_2([*BASE, "--eval-every", "-1"], capsys)
    assert "give a .safetensors or .npz path" in _exits_2([*BASE, "--export", "w.pt"], capsys)


def test_init_from_exported_weights_trains(killed, tmp_path):
    """train.py --init-from the weights the resumed run exported (a bare .npz: n_head given)."""
    export = killed[0].parent / "final.npz"
    argv = [*BASE, "--init-from", str(export), "--model.n_head=8", "--steps", "1", "--eval-every", "0"]
    assert cli.main([*argv, "--ckpt-dir", str(tmp_path / "ckpt")]) == 0
    assert json.loads((tmp_path / "ckpt" / "metrics.jsonl").read_text())["step"] == 1


def test_a_gspmd_checkpoint_resumes_under_explicit_sharding_to_the_same_loss(killed, tmp_path):
    """The state is saved as plain arrays: explicit sharding resumes it (re-typed onto its mesh) and its
    next step's loss equals GSPMD's resuming the same step (fp32, 1e-6 relative)."""
    losses = {}
    for impl in ("gspmd", "explicit"):
        copy = tmp_path / impl
        shutil.copytree(killed[0], copy)
        argv = [*BASE, "--impl", impl, "--steps", str(killed[3] + 1), "--eval-every", "0"]
        assert cli.main([*argv, "--resume", "--ckpt-dir", str(copy)]) == 0
        losses[impl] = _losses(copy)[killed[3] + 1]
    np.testing.assert_allclose(losses["explicit"], losses["gspmd"], rtol=1e-6)


def test_foreign_or_corrupt_directory_is_a_clear_error_and_nothing_is_lost(killed, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "7").mkdir(parents=True)  # orbax would take a numbered folder for a step, and prune it
    (foreign / "notes.txt").write_text("mine")
    before = _files(foreign)
    reason = _exits_2([*BASE, "--ckpt-dir", str(foreign)], capsys)
    assert "not a shardgpt checkpoint" in reason and _files(foreign) == before and (foreign / "7").is_dir()

    corrupt = tmp_path / "corrupt"
    shutil.copytree(killed[0], corrupt)
    for chunk in (corrupt / str(killed[3]) / "state").rglob("ocdbt.process_*/d/*"):
        chunk.write_bytes(chunk.read_bytes()[:10])  # truncated array data
    before = _files(corrupt)
    assert cli.main([*BASE, "--steps", "400", "--ckpt-dir", str(corrupt), "--resume"]) == 2
    reason = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot restore the state" in reason and "nothing was deleted" in reason, reason
    assert _files(corrupt) == before


def test_one_writer_per_directory_and_readers_change_nothing(pico, host_state, tmp_path, capsys):
    """A second writer (a Checkpointer, or train.py on the same --ckpt-dir) is refused naming the holder;
    a reader restores while the writer holds the directory, and deletes nothing."""
    model, tx = pico
    mesh = make_mesh("dp=2,tp=4")
    state = _state(model, tx, host_state, mesh, "dp")
    writer = checkpoint.Checkpointer(tmp_path)
    writer.save(state, {"model": {}})
    writer.wait()
    holder = f"being written by pid {os.getpid()}"
    with pytest.raises(checkpoint.CheckpointError, match=holder):
        checkpoint.Checkpointer(tmp_path)
    assert holder in _exits_2([*BASE, "--ckpt-dir", str(tmp_path), "--resume"], capsys)
    (tmp_path / "9").mkdir()  # a step folder without its items: a save in flight, to a reader
    before = _files(tmp_path)
    reader = checkpoint.Checkpointer(tmp_path, read_only=True)
    target, _ = train.abstract_state(model, tx, mesh, "dp")
    assert _tree_equal(reader.restore(target, 1), state)
    with pytest.raises(checkpoint.CheckpointError, match="read-only"):
        reader.save(state, {"model": {}})
    reader.close()
    writer.close()
    assert _files(tmp_path) == before and (tmp_path / "9").is_dir()
    (tmp_path / "9").rmdir()
    checkpoint.Checkpointer(tmp_path).close()  # free again once the writer closed


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_note(tmp_path):
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    record = {"host": socket.gethostname(), "pid": int(gone.stdout), "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / ".lock").write_text(json.dumps(record))  # what a kill -9 leaves: the record, not the lock
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert f"took over the lock of pid {record['pid']}" in ckpt.lock.note and "gone" in ckpt.lock.note
    ckpt.close()
    again = checkpoint.Checkpointer(tmp_path)  # a clean close leaves no record behind: no note
    assert again.lock.note is None
    again.close()


def test_sigterm_finishes_the_step_saves_it_and_exits_0(tmp_path):
    """A scheduler's preemption: the step in flight completes, is saved, and the run exits 0, so a
    requeued --resume continues exactly there."""
    ckpt_dir = tmp_path / "ckpt"
    argv = [
        *BASE,
        "--steps",
        "2000",
        "--save-every",
        "1000",
        "--eval-every",
        "0",
        "--ckpt-dir",
        str(ckpt_dir),
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *argv], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline, log = time.monotonic() + 120, ckpt_dir / "metrics.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 5"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "SIGTERM: stopped after step" in out, out[-500:]
    last = max(_losses(ckpt_dir))
    ckpt = checkpoint.Checkpointer(ckpt_dir, read_only=True)
    assert ckpt.latest_step() == last, (ckpt.manager.all_steps(), last)
    ckpt.close()


def test_a_leaf_that_does_not_match_its_checksum_is_refused_naming_the_newest_good_step(
    killed, tmp_path, capsys
):
    """Each save records a checksum per leaf (of its bit patterns, order-free, so it verifies on any
    mesh); a mismatch at restore exits 2 naming the newest older step that verifies, deleting nothing.
    The recorded checksum is altered here: orbax's reads catch most flipped bytes of its compressed chunks
    themselves, and the restore's verdict is the same either way."""
    corrupt = tmp_path / "ckpt"
    shutil.copytree(killed[0], corrupt)
    last = killed[3]
    meta = corrupt / str(last) / "meta" / "metadata"
    record = json.loads(meta.read_text())
    leaf = sorted(record["checksums"])[0]
    record["checksums"][leaf] ^= 1
    meta.write_text(json.dumps(record))
    before = _files(corrupt)
    assert cli.main([*BASE, "--steps", "400", "--ckpt-dir", str(corrupt), "--resume"]) == 2
    reason = capsys.readouterr().err.strip().splitlines()[-1]
    older = max(s for s in checkpoint.Checkpointer(corrupt, read_only=True).manager.all_steps() if s < last)
    assert f"{last}: 1 array(s) do not match their checksums (e.g. {leaf})" in reason, reason
    assert f"newest older step that verifies is {older}: resume it with --resume --step {older}" in reason
    assert _files(corrupt) == before
