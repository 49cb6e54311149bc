import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardgpt.analysis import metrics
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import layout, sharding
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import data, loop, loss, optim, train


def test_cross_entropy_ignores_masked_targets():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    targets = jnp.array([[0, 1, data.IGNORE_INDEX]])
    expected = -(np.log(0.5) + np.log(0.8)) / 2
    np.testing.assert_allclose(loss.cross_entropy(logits, targets), expected, rtol=1e-6)
    assert loss.cross_entropy(logits, jnp.full((1, 3), data.IGNORE_INDEX)) == 0


def test_weight_decay_only_on_kernels():
    cfg = config.preset("gpt-pico")
    params = jax.eval_shape(
        lambda: train._init(GPT(cfg), optim.make_optimizer(optim.OptimConfig()), jax.random.key(0)).params
    )
    mask = optim.decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['blocks']['attn']['query']['kernel']"] and flat["['lm_head']['kernel']"]
    assert not flat["['wte']"] and not flat["['wpe']"]
    assert not flat["['blocks']['ln_1']['scale']"] and not flat["['blocks']['mlp']['up']['bias']"]


def test_schedule_warms_up_then_decays_to_the_floor():
    lr = optim.schedule(
        optim.OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    )
    # The first step already trains (at peak / warmup: an lr of 0 would make it a no-op), the peak is
    # reached at the warm-up's last step and the floor at the last of total_steps.
    assert float(lr(0)) == pytest.approx(0.1) and float(lr(9)) == pytest.approx(1.0)
    assert float(lr(55)) < 1.0 and float(lr(99)) == pytest.approx(0.1)
    assert float(optim.schedule(optim.OptimConfig(learning_rate=1.0, warmup_steps=0))(0)) == 1.0


def test_sort_task_rows_are_deterministic_and_sorted():
    task = data.SortTask(length=6, num_digits=3)
    x, y = task.rows(7, range(4, 8))
    x2, _ = task.rows(7, range(0, 8))
    np.testing.assert_array_equal(x, x2[4:])  # a row depends on (seed, step, row) only
    assert not np.array_equal(task.rows(8, range(4, 8))[0], x)
    full = np.concatenate([x, y[:, -1:]], axis=1)
    np.testing.assert_array_equal(full[:, 6:], np.sort(full[:, :6], axis=1))
    assert np.all(y[:, :5] == data.IGNORE_INDEX) and np.all(y[:, 5:] >= 0)
    seen = {tuple(task.problem(step, row)) for step in range(8) for row in range(64)}
    held_out = {tuple(task.problem(step, row, "val")) for step in range(8) for row in range(64)}
    assert seen and held_out and not seen & held_out  # a problem is in one split only
    with pytest.raises(ValueError, match="unknown split 'test'"):
        task.rows(0, range(2), "test")


def test_char_task_windows_and_codec(tmp_path):
    path = tmp_path / "t.txt"
    text = "hello world, hello shardgpt\n" * 10 + "HELD OUT!\n" * 3  # the last 10% (31 chars) is val
    path.write_text(text)
    task = data.make_task(f"chars:{path}", seq_len=16)
    x, y = task.rows(0, range(3))
    assert x.shape == y.shape == (3, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    train_text = "".join(task.decode(row) for step in range(20) for row in task.rows(step, range(8))[0])
    val_text = task.decode(task.rows(0, range(1), "val")[0][0])
    assert not set("HELDOUT!") & set(train_text) and val_text in text[-31:]
    path.write_text("x" * 169)
    with pytest.raises(ValueError, match="at least 170 characters"):
        data.make_task(f"chars:{path}", seq_len=16)
    assert task.decode(task.encode("hello")) == "hello"
    with pytest.raises(ValueError, match="do not occur in"):
        task.encode("hello?")
    with pytest.raises(ValueError, match="not found"):
        data.make_task("chars:/no/such/file.txt")
    with pytest.raises(ValueError, match="unknown task 'lm'"):
        data.make_task("lm")


def test_bin_task_reads_nanogpt_train_bin_windows(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 40, 5000).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")  # as nanoGPT's prepare.py writes it
    task = data.make_task(f"bin:{tmp_path}", seq_len=16, seed=3)
    assert task.vocab_size == data.GPT2_VOCAB  # no meta.pkl: GPT-2 BPE ids
    x, y = task.rows(7, range(2, 6))
    assert x.dtype == np.int32 and x.shape == y.shape == (4, 16)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(x, task.rows(7, range(0, 6))[0][2:])  # a row is (seed, step, row) only
    start = np.flatnonzero([np.array_equal(tokens[i : i + 16], x[0]) for i in range(len(tokens) - 16)])
    assert len(start) == 1, "each row is one window of the file"
    with pytest.raises(ValueError, match="needs nanoGPT's val.bin"):
        task.rows(0, range(1), "val")
    np.full(100, 39, np.uint16).tofile(tmp_path / "val.bin")
    assert np.all(task.rows(0, range(2), "val")[0] == 39)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 40, "itos": {0: "a"}}))
    assert data.make_task(f"bin:{tmp_path}").vocab_size == 40
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 40, "bad": np.int64(1)}))
    with pytest.raises(ValueError, match="only plain data is read"):
        data.make_task(f"bin:{tmp_path}")
    with pytest.raises(ValueError, match="nanoGPT's prepared train.bin"):
        data.make_task(f"bin:{tmp_path / 'none'}")


def test_bad_bin_data_is_refused_at_open_naming_the_file(tmp_path, monkeypatch):
    """Every id is checked once when the task opens (in chunks: here 1,000 tokens a chunk), not when a
    step's batch first reads it; odd-sized or empty files name the file."""
    monkeypatch.setattr(data, "CHECK_CHUNK", 1000)
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 40}))
    tokens = np.random.default_rng(0).integers(0, 40, 5000).astype(np.uint16)
    tokens[3456] = 40  # past meta.pkl's vocab, in the fourth chunk
    tokens.tofile(tmp_path / "train.bin")
    with pytest.raises(ValueError, match=r"train.bin: token id 40 at offset 3456 .* \[0, 40\)"):
        data.make_task(f"bin:{tmp_path}", seq_len=16)
    tokens[3456] = 0
    tokens.tofile(tmp_path / "train.bin")
    task = data.make_task(f"bin:{tmp_path}", seq_len=16)
    (tmp_path / "val.bin").write_bytes(b"\x01\x00\x02")  # a token and a half
    with pytest.raises(ValueError, match="val.bin holds 3 bytes, not a whole number of uint16 tokens"):
        task.rows(0, range(1), "val")
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="train.bin is empty"):
        data.make_task(f"bin:{tmp_path}", seq_len=16)


def test_global_batch_is_sharded_over_dp_and_equal_across_meshes():
    task = data.SortTask()
    mesh = make_mesh("dp=2,tp=4")
    batch = data.global_batch(task, 3, 8, sharding.batch_sharding(mesh, "zero2"))
    assert batch["inputs"].sharding.spec == jax.sharding.PartitionSpec(("dp", "ep"), None)
    assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(4, task.seq_len)}
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), task.rows(3, range(8))[0])
    with pytest.raises(ValueError, match="batch size 7 is not divisible by the 2 shards of the batch"):
        data.global_batch(task, 0, 7, sharding.batch_sharding(mesh, "dp"))


def test_bad_batches_raise_before_compiling():
    model = GPT(config.preset("gpt-pico", block_size=8))
    mesh = make_mesh("dp=4,tp=2")
    with pytest.raises(ValueError, match="sequence length 11 exceeds the model's block_size 8"):
        layout.check_batch(model.config, mesh, "dp", 8, 11)
    with pytest.raises(ValueError, match=r"batch=6\) is not divisible by mesh axis dp\*ep=4"):
        layout.check_batch(model.config, mesh, "zero1", 6, 8)
    layout.check_batch(model.config, mesh, "zero1", 8, 8)


@pytest.mark.parametrize("spec", ["dp=8", "dp=2,tp=4"])
def test_zero_stages_shrink_state_by_exactly_the_expected_bytes(spec):
    cfg = config.preset("gpt-pico", vocab_size=3, block_size=11)
    model, tx = GPT(cfg), optim.make_optimizer(optim.OptimConfig())
    mesh = make_mesh(spec)
    axes = jax.tree.leaves(
        train.param_axes(model), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )
    shapes = jax.eval_shape(lambda: train._init(model, tx, jax.random.key(0)))
    sizes = [int(np.prod(leaf.shape)) * 4 for leaf in jax.tree.leaves(shapes.params)]

    def expected(embed_on_dp: bool) -> int:
        """Bytes per device of one param-shaped fp32 tree, from the names alone."""
        total = 0
        for names, size in zip(axes, sizes, strict=True):
            divisor = 1
            for name in names:
                divisor *= mesh.shape["tp"] if name in ("heads", "mlp", "vocab") else 1
                divisor *= mesh.shape["dp"] if (name == "embed" and embed_on_dp) else 1
            total += size // divisor
        return total

    host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    for strategy, stage in sharding.STRATEGIES.items():
        # Placed in init_state's layout (its out_shardings) without compiling an init per strategy.
        state = jax.device_put(host, train.state_shardings(model, tx, mesh, strategy).state)
        adam = state.opt_state[1][0]
        assert metrics.bytes_per_device(state.params) == expected(stage >= 3), strategy
        assert metrics.bytes_per_device((adam.mu, adam.nu)) == 2 * expected(stage >= 1), strategy
    if mesh.shape["dp"] == 8:  # the headline figure: ZeRO-1 cuts Adam's moments 8x on 8-way dp
        assert expected(True) * 8 < expected(False) * 1.2


@pytest.mark.parametrize("spec", ["pp=2,dp=4"])  # dp and tp alone: test_metrics.py's stage test
def test_the_zero_ideal_never_exceeds_the_measured_state(spec):
    """The ZeRO paper's ideal is a floor: on a pp mesh it read 439K beside a measured 244K (layers -> pp)."""
    cfg = config.preset("gpt-pico", vocab_size=3, block_size=11)
    model, tx = GPT(cfg), optim.make_optimizer(optim.OptimConfig())
    mesh = make_mesh(spec)
    shapes = jax.eval_shape(lambda: train._init(model, tx, jax.random.key(0)))
    host = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    totals = [sum(leaf.nbytes for leaf in jax.tree.leaves(t)) for t in (host.params, host.opt_state)]
    for strategy in sharding.STRATEGIES:
        state = jax.device_put(host, train.state_shardings(model, tx, mesh, strategy).state)
        ideal = metrics.zero_expected_bytes(
            totals[0], totals[1], totals[0], strategy, *(mesh.shape[a] for a in ("dp", "tp", "pp"))
        )
        assert ideal["params_bytes_per_device"] <= metrics.bytes_per_device(state.params), strategy
        assert ideal["opt_state_bytes_per_device"] <= metrics.bytes_per_device(state.opt_state), strategy


@pytest.mark.parametrize("impl", ["gspmd", "shard_map"])
def test_out_of_range_token_ids_are_rejected_before_compiling(impl):
    """A plain gather clamps such ids and the vocab-parallel one zeroes them: both impls refuse them."""
    from shardgpt.training import shard_map_step

    task = data.SortTask()
    model = GPT(config.preset("gpt-pico", vocab_size=task.vocab_size, block_size=task.seq_len))
    tx, mesh = optim.make_optimizer(optim.OptimConfig()), make_mesh("dp=2,tp=4")
    shardings = train.state_shardings(model, tx, mesh, "zero1")
    make = train.make_train_step if impl == "gspmd" else shard_map_step.make_train_step
    step = make(model, tx, mesh, "zero1", shardings)
    inputs, targets = task.rows(0, range(8))
    bad_inputs, bad_targets = inputs.copy(), targets.copy()
    bad_inputs[3, 2], bad_targets[5, -1] = task.vocab_size, -7
    # The state is never touched: the check runs before anything is traced or compiled.
    with pytest.raises(ValueError, match=r"batch inputs: token ids outside \[0, 3\), e.g. 3"):
        step(None, {"inputs": bad_inputs, "targets": targets})
    with pytest.raises(ValueError, match=r"batch targets: token ids outside \[0, 3\) or -1 \(ignored\)"):
        step(None, {"inputs": inputs, "targets": bad_targets})
    assert step.jitted.jitted._cache_size() == 0


def test_global_batch_checks_ids_against_the_models_vocabulary():
    task, mesh = data.SortTask(num_digits=5), make_mesh("dp=2,tp=4")
    batch_sharding = sharding.batch_sharding(mesh, "dp")
    data.global_batch(task, 0, 8, batch_sharding, vocab_size=5)
    with pytest.raises(ValueError, match=r"SortTask inputs: token ids outside \[0, 4\)"):
        data.global_batch(task, 0, 8, batch_sharding, vocab_size=4)


def test_donation_warning_is_silenced_on_cpu_steps_only():
    """XLA:CPU implements no donation, so the warning is noise there; on GPU/TPU the state is held twice."""
    import subprocess
    import sys
    import warnings

    code = (
        "import warnings, shardgpt.lab.runner; print(any('donated' in str(f[1]) for f in warnings.filters))"
    )
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False", "importing shardgpt must not hide the donation warning"

    def donating(x):
        warnings.warn("Some donated buffers were not usable: f32[4]", stacklevel=1)
        return x

    mesh = make_mesh("dp=8")
    for quiet, expected in ((True, 0), (False, 1)):  # CPU meshes are quiet; accelerators are not
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            train.MeshBound(donating, mesh, quiet_donation=quiet)(1)
            assert len(seen) == expected, (quiet, [str(w.message) for w in seen])
    assert not any("donated" in str(f[1]) for f in warnings.filters)  # nothing left process-wide
    model, tx = GPT(config.preset("gpt-pico")), optim.make_optimizer(optim.OptimConfig())
    step = train.make_train_step(model, tx, mesh, "dp", train.state_shardings(model, tx, mesh, "dp"))
    assert step.jitted.quiet_donation  # a train step on this (CPU) mesh is the quiet kind


def test_progress_without_a_terminal_prints_a_few_lines_not_frames(capsys):
    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}

    state = train.TrainState(step=jnp.int32(0), params={}, opt_state=())
    trainer = loop.Trainer(step, state, lambda i: None, tokens_per_step=10, description="t")
    trainer.run(95)
    err = capsys.readouterr().err  # captured: not a terminal
    lines = err.strip().splitlines()
    assert "\r" not in err and len(lines) == loop.PROGRESS_LINES + 1, err  # every 9th step, and the last
    assert lines[-1].startswith("t: step 95/95, loss 1.0000")
    trainer.run(5)  # a resumed run counts on from its first step, as checkpoints and logs do
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("t: step 100/100")


def _counting_state():
    def step(state, batch):
        return state.replace(step=state.step + 1), {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(2.0)}

    return step, train.TrainState(step=jnp.int32(0), params={}, opt_state=())


def test_progress_tokens_per_s_is_smoothed_and_leaves_evaluations_out(capsys):
    """Issue 26: one step's rate read 7.8k after an evaluation against 25k; lines carry elapsed and ETA."""
    import re
    import time

    step, state = _counting_state()
    slow_step = lambda s, b: (time.sleep(0.01), step(s, b))[1]

    class Evaluation(loop.Callback):
        def on_step_end(self, trainer, step, metrics, state=None):
            if step == 2:
                time.sleep(0.5)  # an evaluation: 50 steps' time, which the next step's interval holds

    trainer = loop.Trainer(slow_step, state, lambda i: None, 10, [Evaluation()], description="t", log_every=2)
    trainer.run(6)
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == ["t: step 2/6", "t: step 4/6", "t: step 6/6"], lines
    rates = [float(re.search(r"([\d,]+) tokens/s", line)[1].replace(",", "")) for line in lines]
    assert min(rates) > 400, lines  # 10 tokens per ~10 ms step: ~1000; with the evaluation in, ~110
    assert "elapsed " in lines[1] and ", ETA " in lines[1] and "ETA" not in lines[-1], lines
    assert trainer.history[3]["tokens_per_s"] < 100  # the step's own interval, evaluation included, is kept
    assert [loop.clock(s) for s in (7.4, 185, 3729)] == ["7s", "3:05", "1:02:09"]


def test_progress_shows_on_a_terminal_that_reports_0_columns(monkeypatch):
    """Some pseudo-terminals report 0 columns; tqdm then draws nothing: the bar falls back to a width."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    terminal = os.fdopen(child, "w")
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("COLUMNS", raising=False)
    step, state = _counting_state()
    loop.Trainer(step, state, lambda i: None, tokens_per_step=10, description="zero-cols").run(3)
    terminal.flush()
    os.set_blocking(parent, False)
    shown = os.read(parent, 65536).decode()
    terminal.close()
    os.close(parent)
    assert "zero-cols:" in shown and "/3 " in shown, repr(shown)  # the bar drew (its first frame at least)


def test_callbacks_get_the_state_that_produced_their_metrics():
    """A fake step (params count steps) shows which state each callback sees, with the pipeline kept."""

    @jax.jit
    def step_fn(state, batch):
        metrics = {"loss": state.params.astype(jnp.float32), "grad_norm": jnp.float32(0)}
        return state.replace(step=state.step + 1, params=state.params + batch), metrics

    seen = []

    class Record(loop.Callback):
        def wants_state(self, step):
            return step % 3 == 2

        def on_step_end(self, trainer, step, metrics, state=None):
            got = None if state is None else (int(state.step), int(state.params))
            seen.append((step, metrics["loss"], got))

    start = train.TrainState(step=jnp.int32(0), params=jnp.int32(0), opt_state=())
    trainer = loop.Trainer(step_fn, start, lambda i: jnp.int32(1), 1, [Record()], progress=False)
    final = trainer.run(7)
    assert int(final.step) == 7
    # Step t's metrics come from the state before it (params == t); a handed state is the one after it.
    expected = [(t, float(t), (t + 1, t + 1) if t % 3 == 2 or t == 6 else None) for t in range(7)]
    assert seen == expected
