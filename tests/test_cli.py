"""experiments/run.py end to end: bad input exits 2 with a one-line reason before compiling, a smoke run
writes a complete results.json and the plots, and the report flags runs that should agree but do not."""

import contextlib
import importlib.util
import io
import json
import math

import pytest

from shardgpt.analysis.metrics import KINDS
from shardgpt.cli import flags
from shardgpt.cli import run as cli
from shardgpt.cli import train as train_cli
from shardgpt.lab import plots, report

# DESIGN.md's results schema: the keys every consumer of results.json may rely on.
META_KEYS = {"jax_version", "platform", "device_kind", "num_devices", "command", "date"}
RUN_KEYS = {
    "name", "mesh", "strategy", "impl", "model", "n_params", "batch", "seq", "steps", "dtype", "compile_s",
    "step_time_s", "tokens_per_s", "mfu", "memory", "collectives", "losses", "final_loss", "generate",
    "microbatches", "sequence_parallel", "collectives_by_cause",
}  # fmt: skip
MEMORY_KEYS = {f"{k}_bytes_per_device" for k in ("params", "opt_state", "grads", "peak", "temp")}
MEMORY_KEYS |= {f"{k}_bytes_per_device" for k in ("argument", "output", "alias")} | {"device_peak_bytes"}
SMOKE = ["--compare", "--model", "gpt-pico", "--model.n_layer=1", "--steps", "2", "--batch", "8"]
SMOKE += ["--mesh", "dp=2,tp=4", "--generate", "0"]


def test_help_exits_0_and_mentions_mesh(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    assert "--mesh" in capsys.readouterr().out


# Bad command lines of both commands: (argv, the reason their one line must give), shared ones first.
BOTH = [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--mesh", "dp=3,tp=4"], "has 12 devices but 8 are present"),
    (["--mesh", "dp=2,xp=4"], "unknown mesh axis 'xp'"),
    (["--strategy", "zero9"], "unknown strategy 'zero9'"),
    (["--model", "gpt-huge"], "unknown model preset 'gpt-huge'"),
    (["--model.n_layers=2"], "unknown model field 'n_layers'"),
    (["--model.n_layer=two"], "model field 'n_layer' takes a int"),
    (["--mesh", "tp=8", "--model", "gpt-nano"], "not divisible by mesh axis tp=8"),
    (["--mesh", "dp=8", "--batch", "12"], "not divisible by mesh axis dp*ep=8"),
    (["--task", "chars:/no/such/file.txt"], "not found"),
    (["--seq", "5"], "--seq applies to chars:PATH tasks"),
    (["--init-from", "/no/such/ckpt.npz"], "no checkpoint at /no/such/ckpt.npz"),
    (["--model.vocab_size=2"], "task 'sort' has 3 tokens but the model (--model.vocab_size) only 2"),
    (["--model.attention=cudnn"], "--attention cudnn needs NVIDIA GPUs"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--dtype", "float16"], "float16 needs loss scaling"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--model.ln_eps=0"], "ln_eps must be > 0"),
    (["--devices", "0"], "--devices must be >= 1"),
    (["--optim.lr=1"], "unknown optim field 'lr'"),
    (["--optim.weight_decay=heavy"], "optim field 'weight_decay' takes a float"),
    (["--optim.grad_clip=0"], "grad_clip must be > 0"),
    (["--optim.b2=1"], "b1 and b2 must be in [0, 1)"),
    (["--optim.warmup_steps=50"], "warmup_steps must be in [0, total_steps]"),
    (["--optim.learning_rate=-1"], "learning_rate must be > 0"),
    (["--optim.min_lr_ratio=2"], "min_lr_ratio must be in [0, 1]"),
    (["--microbatches", "3"], "--microbatches 3 does not divide the per-dp batch 32"),
    (["--sp", "--mesh", "dp=8"], "this mesh has tp=1: use a mesh with tp > 1"),
    (["--sp"], "sequence length 11 is not divisible by tp=4"),
    (["--strategy", "zero9+sp"], "unknown strategy 'zero9+sp'"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--task", "chars:README.md", "--seq", "0"], "--seq must be >= 1"),
    (["--log-every", "0"], "argument --log-every: takes an integer >= 1"),
]
RUN_ONLY = [
    (["--generate", "99"], "exceeds block_size"),
    (["--generate", "-1"], "--generate and --warmup must be >= 0"),
    (["--warmup", "3"], "--warmup 3 leaves none of the 1 steps to time"),
    (["--out", "/dev/null/results"], "--out /dev/null/results: cannot write there"),
    (["--profile", "/dev/null/trace"], "--profile /dev/null/trace: cannot write there"),
    (["--microbatches", "2,x"], "argument --microbatches: takes positive integers"),
    (["--target", "nonsense"], "argument --target: invalid choice: 'nonsense'"),
    (["--target", "h100"], "--target h100 names the machine a --plan is for: give --plan"),
]
TRAIN_ONLY = [
    (["--ckpt-dir", "/proc/no/such"], "--ckpt-dir /proc/no/such: "),
    (["--save-every", "5"], "need --ckpt-dir DIR"),
    (["--model", "gpt-pico,gpt-nano"], "unknown model preset 'gpt-pico,gpt-nano'"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
]
CASES = [("run", *case) for case in BOTH + RUN_ONLY] + [("train", *case) for case in BOTH + TRAIN_ONLY]


@pytest.mark.parametrize("command, argv, reason", CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_exits_2_with_a_one_line_reason(command, argv, reason, capsys):
    main = cli.main if command == "run" else train_cli.main
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--steps", "1"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"experiments/{command}.py: error: ") and reason in last, last


def test_attention_defaults_to_cudnn_on_nvidia_gpus_from_ampere_on():
    import types

    device = lambda platform, version, capability: types.SimpleNamespace(
        platform=platform,
        client=types.SimpleNamespace(platform_version=version),
        compute_capability=capability,
    )
    assert flags.default_attention(device("gpu", "cuda 12080", "9.0")) == "cudnn"  # H100, H200
    assert flags.default_attention(device("gpu", "cuda 12080", "8.0")) == "cudnn"  # A100
    assert flags.default_attention(device("gpu", "cuda 12080", "7.0")) == "xla"  # V100: no flash attention
    assert flags.default_attention(device("gpu", "rocm 6.0", "9.4")) == "xla"  # AMD
    assert flags.default_attention(device("cpu", "cpu", None)) == "xla"
    assert flags.default_attention(types.SimpleNamespace(platform="tpu")) == "xla"


def test_missing_matplotlib_exits_2_before_training_unless_no_plots(capsys, monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--steps", "1", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "--no-plots" in capsys.readouterr().err
    monkeypatch.setattr(cli, "compare", lambda specs, args, argv: len(specs))  # validation alone
    assert cli.main(["--steps", "1", "--out", str(tmp_path), "--no-plots"]) == 4


def test_an_error_during_a_run_keeps_its_traceback(monkeypatch):
    """Only input validation becomes a usage line: a failure inside a run is a bug and must show as one."""
    from shardgpt.lab import runner

    def broken(spec, progress=True, log_every=None):
        raise ValueError("a bug inside the run")

    monkeypatch.setattr(runner, "run", broken)
    with pytest.raises(ValueError, match="a bug inside the run"):
        cli.main(["--steps", "1", "--generate", "0", "--out", ""])


def test_optim_overrides_reach_the_optimizer():
    from shardgpt.lab import runner

    args = flags.parse_args(
        cli.build_parser(), ["--optim.weight_decay=0", "--optim.b2", "0.99", "--steps", "20"]
    )
    (spec,) = cli.make_specs(args, 8, "cpu")[:1]
    setup = runner.prepare(spec)
    assert (setup.optim.weight_decay, setup.optim.b2, setup.optim.total_steps) == (0.0, 0.99, 20)
    assert setup.optim.learning_rate == 3e-3  # --lr's default, the flags left alone keep theirs


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main([*SMOKE, "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text()), stdout.getvalue()


def test_smoke_compare_writes_complete_results(smoke):
    _, results, _ = smoke
    assert META_KEYS <= set(results["meta"]) and results["meta"]["num_devices"] == 8
    runs = results["runs"]
    assert [r["strategy"] for r in runs] == ["dp", "zero1", "zero2", "zero3"]
    for r in runs:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert set(r["memory"]) == MEMORY_KEYS and set(r["collectives"]) == set(KINDS)
        assert (
            r["mesh"] == {"dp": 2, "pp": 1, "cp": 1, "ep": 1, "tp": 4}
            and r["impl"] == "gspmd"
            and r["generate"] is None
        )
        assert len(r["losses"]) == 2 and r["final_loss"] == r["losses"][-1] and math.isfinite(r["final_loss"])
        assert r["compile_s"] > 0 and r["step_time_s"] > 0 and r["mfu"] is None  # no known CPU peak
        assert r["memory"]["device_peak_bytes"] is None  # CPU has no memory_stats
        assert all(
            v > 0 for k, v in r["memory"].items() if k not in ("device_peak_bytes", "alias_bytes_per_device")
        )
        assert set(r["memory_sources"]) == MEMORY_KEYS
    assert all(check["ok"] for check in results["agreement"])


def test_explain_prints_one_runs_collectives_by_cause(smoke, capsys):
    out, results, stdout = smoke
    assert "collectives by cause beside theory" in stdout
    capsys.readouterr()
    assert cli.main(["--explain", "zero3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for cause in ("zero3_gather.fwd", "grad_reduce", "attn.fwd", "the ops behind each row"):
        assert cause in text
    zero3 = next(r for r in results["runs"] if r["strategy"] == "zero3")
    rows = {(r["cause"], r["kind"]): r for r in zero3["collectives_by_cause"]}
    assert (
        rows["zero3_gather.fwd", "all-gather"]["bytes"]
        == rows["zero3_gather.fwd", "all-gather"]["theory_bytes"]
    )
    for which, reason in (("zero", "several runs match"), ("nope", "no run matches")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--explain", which, "--out", str(out)])
        assert exit_.value.code == 2 and reason in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--explain", "dp", "--out", str(out / "missing")])
    assert "does not exist" in capsys.readouterr().err


def test_smoke_numbers_follow_the_zero_stages(smoke):
    _, results, _ = smoke
    mem = {r["strategy"]: r["memory"] for r in results["runs"]}
    opt, grads, params = "opt_state_bytes_per_device", "grads_bytes_per_device", "params_bytes_per_device"
    assert mem["zero1"][opt] < mem["dp"][opt]  # ZeRO-1 shards Adam's moments over dp
    assert mem["zero2"][grads] < mem["zero1"][grads]  # ZeRO-2 also the gradients
    assert mem["zero3"][params] < mem["zero2"][params]  # ZeRO-3 also the params
    coll = {r["strategy"]: r["collectives"] for r in results["runs"]}
    assert coll["dp"]["all-reduce"]["count"] > 0 and coll["dp"]["all-gather"]["count"] == 0
    assert coll["zero3"]["all-gather"]["count"] > coll["zero1"]["all-gather"]["count"] > 0


def test_smoke_prints_the_table_and_writes_the_plots(smoke):
    out, _, stdout = smoke
    assert "equivalent runs agree" in stdout and "6N + 12·L·H·Q·T (PaLM app. B)" in stdout
    assert "measured from the live arrays' shards; grads* derived from" in stdout  # every figure's source
    assert "temps and peak" in stdout and "from the compiled program" in stdout
    for name in plots.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (out / "report.html").read_text()  # beside results.json; test_html_report.py checks its content
    assert html.startswith("<!DOCTYPE html>") and f"{smoke[1]['runs'][0]['final_loss']:.6f}" in html


def _fake_run(name: str, losses: list[float], dtype: str = "float32", seed: int = 0, **extra) -> dict:
    zero = {"count": 0, "bytes": 0}
    return {
        "name": name, "model": "gpt-pico", "config": {"n_layer": 1, "dtype": dtype}, "task": "sort",
        "dtype": dtype, "seed": seed, "batch": 8, "seq": 11, "steps": len(losses), "lr": 1e-3,
        "compile_s": 1.0, "step_time_s": 0.01, "tokens_per_s": 8800.0, "mfu": None,
        "memory": dict.fromkeys(MEMORY_KEYS, 1024), "collectives": {k: zero for k in KINDS},
        "losses": losses, "final_loss": losses[-1],
        "grad_norms": [1.0] * len(losses), **extra,
    }  # fmt: skip


def _verdicts(text: str) -> dict[str, str]:
    lines = text.split("\n\n")[0].splitlines()[2:]
    rows = lines[: next(i for i, line in enumerate(lines) if line.startswith(("M: ", "memory per device")))]
    return {line.split()[0]: line.split()[-1] for line in rows}


def test_report_flags_the_run_that_disagrees():
    runs = [_fake_run("a", [2.0, 1.0]), _fake_run("b", [2.0, 1.0 + 1e-7]), _fake_run("c", [2.0, 1.1])]
    runs += [_fake_run("d", [2.0, math.nan]), _fake_run("e", [2.0, 1.0], grad_norms=[1.0, 2.0])]
    [check] = report.agreement(runs)
    assert check["reference"] == "a" and check["disagree"] == ["c", "d", "e"] and not check["ok"]
    text = report.table({"runs": runs})
    assert "DISAGREE: c, d, e vs a" in text
    assert _verdicts(text) == {"a": "ok", "b": "ok", "c": "DISAGREES", "d": "DISAGREES", "e": "DISAGREES"}


def test_report_tells_late_drift_from_disagreement():
    # Agreeing over the judged steps, then parting: rounding amplified by training, reported but not flagged.
    same = [1.0 - 0.01 * i for i in range(report.CHECKED_STEPS)]
    runs = [_fake_run("a", [*same, 0.5, 0.2]), _fake_run("b", [*same, 0.5, 0.3])]
    [check] = report.agreement(runs)
    assert check["ok"] and check["drift"] == {"b": report.CHECKED_STEPS + 2}
    text = report.table({"runs": runs})
    assert "then they drift" in text and "DISAGREE" not in text
    assert _verdicts(text) == {"a": "ok", "b": f"drifts@{report.CHECKED_STEPS + 2}"}


def test_report_compares_only_equivalent_runs_with_the_dtype_tolerance():
    # Another seed is another experiment; bf16's looser bound accepts rounding-sized differences.
    runs = [_fake_run("a", [2.0, 1.0]), _fake_run("b", [2.0, 2.0], seed=1)]
    runs += [_fake_run("c", [2.0, 1.0], "bfloat16"), _fake_run("d", [2.0, 1.01], "bfloat16")]
    [check] = report.agreement(runs)
    assert check["runs"] == ["c", "d"] and check["ok"]
    assert "DISAGREE" not in report.table({"runs": runs})


def test_init_from_a_checkpoint_starts_from_its_weights_and_generates(tmp_path):
    """--init-from: step 0's loss is the imported weights' loss on batch 0, under zero3; generation runs."""
    import jax
    import numpy as np

    from shardgpt.io import weights
    from shardgpt.model import config
    from shardgpt.model.gpt import GPT
    from shardgpt.training import data, loss, train

    task = data.SortTask()
    cfg = config.preset("gpt-pico", n_layer=1, vocab_size=task.vocab_size, block_size=task.seq_len)
    params = jax.jit(lambda rng: train.init_params(GPT(cfg), rng))(jax.random.key(7))
    path = weights.export_params(params, cfg, tmp_path / "ckpt.safetensors")
    inputs, targets = task.rows(0, range(8))
    expected = float(loss.cross_entropy(GPT(cfg).apply({"params": params}, inputs), targets))

    out = tmp_path / "out"
    argv = ["--init-from", str(path), "--model.n_head=8", "--strategy", "zero3", "--mesh", "dp=2,tp=4"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*argv, "--steps", "1", "--batch", "8", "--generate", "1", "--out", str(out)]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    np.testing.assert_allclose(run["losses"][0], expected, rtol=1e-5)
    assert run["generate"]["compiles"] == 1 and run["generate"]["new_tokens"] == 1

    # Without --model.n_head, a preset of another width cannot lend its head count: a clear error.
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as err:
        cli.main(["--init-from", str(path), "--model", "gpt-micro", "--steps", "1"])
    assert exit_.value.code == 2 and "give its head count with --model.n_head=H" in err.getvalue()


# Issue 26's frictions.


def test_the_agrees_column_is_explained_with_its_tolerance_and_the_final_losses_spread():
    """make run marked zero2/zero3 "drifts@27" with no legend, at final losses ~0.002 apart by 1e-3."""
    same = [1.0 - 0.01 * i for i in range(report.CHECKED_STEPS)]
    runs = [_fake_run("a", [*same, 0.5, 0.0022]), _fake_run("b", [*same, 0.5, 0.0027])]
    text = report.table({"runs": runs})
    assert "ok =" in text and "within 0.0001 relative in float32 over the first 10 steps" in text
    assert "drifts@k: ok there, then a loss parts by more than that at step k" in text
    assert "0.0005 apart (from 0.0022 to 0.0027)" in text


def _cause(cause: str, nbytes: int, theory: int, note: str = "why") -> dict:
    return {"cause": cause, "kind": "all-reduce", "count": 2, "bytes": nbytes, "bytes_by_name": nbytes,
            "theory_count": 2, "theory_bytes": theory, "ratio": nbytes / theory if theory else None,
            "note": note, "ops": {}}  # fmt: skip


def test_compare_prints_one_line_of_collectives_by_cause_per_run():
    """--compare printed ~100 lines of by-cause notes; the reasons live in --explain and the report."""
    rows = [_cause(f"c{i}", 1000 * (i + 2), 1000, note=f"reason {i}") for i in range(5)]
    runs = [_fake_run(n, [2.0, 1.0], collectives_by_cause=rows) for n in ("a", "b")]
    text = report.table({"runs": runs})
    lines = [line for line in text.splitlines() if line.startswith(("  a:", "  b:", "    "))]
    assert len(lines) == 2, lines
    assert (
        "off theory by > 5%: c4 all-reduce 6.00x, c3 all-reduce 5.00x, c2 all-reduce 4.00x +2 more"
        in lines[0]
    )
    assert "reason" not in text and "reason 4" in report.explain(runs[0])


def test_sizes_and_plot_axes_take_the_unit_the_magnitude_needs():
    assert [report.size(b) for b in (512, 3.5 * 2**10, 12 * 2**20, 1.2 * 2**30, 2.1 * 2**40)] == [
        "512B", "3.5K", "12M", "1.2G", "2.1T",
    ]  # fmt: skip
    assert plots.byte_unit(250_000) == (1024, "KiB")  # gpt-pico's state: a MiB axis read 0.00-0.24
    assert plots.byte_unit(3 * 2**30) == (2**30, "GiB") and plots.byte_unit(100) == (1, "B")


def test_a_pipeline_bubble_that_cannot_be_measured_says_why():
    """--microbatches 2,4,8 at one --batch: each M has its own microbatch size, so no slope over ticks."""
    runs = [
        {"name": f"pp=2,dp=4 dp M={m} shard_map", "model": "m", "impl": "shard_map", "seq": 8, "batch": 64,
         "microbatches": m, "step_time_s": 0.01 * (m + 1),
         "pipeline": {"pp": 2, "microbatches": m, "ticks": m + 1, "bubble_theory": 1 / (m + 1)}}
        for m in (2, 4, 8)
    ]  # fmt: skip
    bubbles = report.pipeline_bubbles(runs)
    assert all(b["bubble_measured"] is None for b in bubbles)
    assert bubbles[0]["bubble_note"] == "no other M at this microbatch size (batch / M)"
    assert report.pipeline_bubbles(runs[:1])[0]["bubble_note"] == "one run: no slope"
    text = "\n".join(report.bubble_table(bubbles))
    assert "n/a  no other M at this microbatch size" in text and "scale --batch with M" in text


def test_resuming_with_another_seq_says_so():
    base = {"model": {"n_layer": 1}, "strategy": "dp", "mesh": "dp=8", "impl": "gspmd", "task": "chars:x",
            "seed": 0, "batch": 8, "microbatches": 1, "optim": {}, "seq": 64}  # fmt: skip
    assert train_cli.resume_notes(base, base) == []
    (note,) = train_cli.resume_notes(base, base | {"seq": 128})
    assert note.startswith("seq: saved 64, now 128")


def test_train_writes_metrics_jsonl_to_out_without_a_checkpoint_dir(tmp_path, capsys):
    argv = ["--model.n_layer=1", "--batch", "8", "--steps", "2", "--eval-every", "0", "--log-every", "1"]
    assert train_cli.main([*argv, "--out", str(tmp_path)]) == 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and all(math.isfinite(r["loss"]) for r in logged)
    err = capsys.readouterr().err.splitlines()
    assert [line.split(", loss")[0] for line in err if ": step " in line] == [
        "dp=2,tp=4 dp: step 1/2", "dp=2,tp=4 dp: step 2/2",
    ]  # fmt: skip


def test_the_generation_table_states_the_naive_loops_size():
    """The naive loop compiles once a token: it is timed over a few (4), which the table says."""
    from shardgpt.lab import generation_bench

    assert generation_bench.NAIVE_MAX_TOKENS <= 4  # 16 compiles a run made most of make run's time
    generate = {"batch": 8, "prompt_len": 6, "new_tokens": 32, "naive_tokens": 4, "naive_tokens_per_s": 9.0}
    text = report.table({"runs": [_fake_run("a", [2.0, 1.0], generate=generate)]})
    assert "naive = re-jit per length, one compile a token, timed over its first 4 tokens" in text
