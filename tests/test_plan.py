"""The memory planner (`run.py --plan`): compile-only figures, a largest batch that really is the largest, and
bad input refused before any compile."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import jax
import pytest

from shardgpt.analysis import hardware
from shardgpt.cli import flags
from shardgpt.cli import run as cli
from shardgpt.lab import plan
from shardgpt.lab import target as lab_target

BUDGET = "4MiB"
PLAN = ["--plan", "--model", "gpt-pico", "--mesh", "dp=8", "--strategy", "zero3", "--seq", "32"]
PLAN += ["--batch", "8", "--dtype", "float32", "--device-memory", BUDGET]


@pytest.mark.parametrize(
    "text, expected",
    [("80GiB", 80 * 2**30), ("16GB", 16 * 10**9), ("24G", 24 * 2**30), ("1.5MiB", 3 * 2**19), ("512", 512)],
)
def test_sizes_read_with_their_units(text, expected):
    assert plan.parse_bytes(text) == expected


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli.main([*PLAN, "--out", str(out)]) == 0
    return json.loads((out / "results.json").read_text())["plan"], stdout.getvalue(), out


def test_plan_finds_the_largest_batch_that_fits(planned):
    rows, _, _ = planned
    budget = plan.parse_bytes(BUDGET)
    (r,) = rows
    totals = {int(k): v for k, v in r["totals_by_batch"].items()}
    best, dp = r["max_batch"], r["mesh"]["dp"]
    assert best >= 2 * dp and totals[best] <= budget, totals
    assert totals[best + dp] > budget, f"batch {best + dp} fits too, so {best} is not the largest"
    assert r["compiles"] == len(totals) <= 5, "the line's first guess should make the search short"
    assert r["fits"] == (r["compiled"]["total_bytes"] <= budget) and r["rank"] == 1
    # The state is an argument of the compiled step, so the compiled arguments hold at least the state.
    state = r["state"]["params_bytes_per_device"] + r["state"]["opt_state_bytes_per_device"]
    assert r["compiled"]["argument_bytes"] >= state


def test_plan_state_is_exact_and_follows_the_zero_stage():
    """The state columns come from the layout alone: ZeRO-3 on dp=8 holds an eighth of every embed dim."""
    from shardgpt.analysis import metrics
    from shardgpt.model import config
    from shardgpt.model.gpt import GPT
    from shardgpt.parallel.mesh import make_mesh
    from shardgpt.training import optim, train

    model, tx = GPT(config.preset("gpt-pico")), optim.make_optimizer(optim.OptimConfig())
    mesh = make_mesh("dp=8")
    by = {s: metrics.state_bytes(*train.abstract_state(model, tx, mesh, s)) for s in ("dp", "zero3")}
    params = sum(x.size * 4 for x in jax.tree.leaves(train.abstract_state(model, tx, mesh, "dp")[0].params))
    assert by["dp"]["params_bytes_per_device"] == params  # dp replicates
    assert by["zero3"]["params_bytes_per_device"] < params / 4  # the embed dims split 8 ways
    assert by["zero3"]["opt_state_bytes_per_device"] < by["dp"]["opt_state_bytes_per_device"] / 4


def test_rank_puts_what_fits_first_then_the_larger_batch():
    row = lambda name, fits, best, total: {
        "name": name,
        "fits": fits,
        "max_batch": best,
        "compiled": {"total_bytes": total},
    }
    rows = plan.rank(
        [row("a", False, 0, 9), row("b", True, 16, 5), row("c", True, 32, 7), row("d", True, 32, 6)]
    )
    assert [r["name"] for r in rows] == ["d", "c", "b", "a"] and [r["rank"] for r in rows] == [1, 2, 3, 4]


def test_plan_prints_sources_and_writes_the_plot(planned):
    _, stdout, out = planned
    assert "exact, from the layout" in stdout and "an XLA:CPU estimate for a GPU or TPU" in stdout
    assert "an XLA:CPU estimate, no --target (compiled for cpu)" in stdout
    assert re.search(r"zero3 +\d+(\.\d+)?K +\d", stdout), "gpt-pico's params read in K, not as 0.00 GiB"
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_rows_say_what_they_were_compiled_for(planned):
    """On a CPU host without --target: compiled for XLA:CPU, an estimate, the budget --device-memory's."""
    (r,), _, _ = planned
    assert (r["compiled_for"], r["target"], r["estimate"]) == ("cpu", None, True)
    assert r["budget_source"] == "--device-memory" and r["attention"] == "xla"


def _placement(argv, tmp_path):
    """validate_plan's target.Placement for `argv` (jax started, nothing compiled)."""
    argv = ["--plan", "--model", "gpt-pico", "--mesh", "dp=8", "--out", str(tmp_path), "--no-plots", *argv]
    _, placement = cli.validate_plan(flags.parse_args(cli.build_parser(), argv))
    return placement


def test_a_target_on_a_cpu_host_is_an_xla_cpu_estimate_with_the_targets_memory(tmp_path):
    placement = _placement(["--target", "h100"], tmp_path)
    assert (placement.compiled_for, placement.target, placement.estimate) == ("cpu", "h100", True)
    assert placement.budget == hardware.profile("h100").memory_bytes.value == 80e9
    assert placement.describe() == "an XLA:CPU estimate for h100 (compiled for cpu)"
    assert placement.record()["budget_source"] == "--target h100's memory, datasheet"
    given = _placement(["--target", "h100", "--device-memory", "4MiB"], tmp_path)
    assert given.budget == 4 * 2**20, "--device-memory wins over the target's memory"
    cpu = _placement(["--target", "cpu"], tmp_path)
    assert not cpu.estimate and cpu.budget == hardware.profile("cpu").memory_bytes.value


@pytest.mark.parametrize(
    "platform, present, needed, target, expected",
    [
        ("cpu", 8, 8, "h100", "cpu"),  # a CPU host compiles on XLA:CPU, whatever the target
        ("gpu", 8, 4, None, "gpu"),  # meshes up to the devices present compile on them
        ("gpu", 1, 8, "h200", "gpu-mock"),  # past them, a mock topology
        ("gpu", 8, 8, "cpu", "cpu"),  # a cpu target compiles on XLA:CPU anywhere
        ("tpu", 4, 4, "tpu-v5p", "tpu"),
    ],
)
def test_where_a_plan_compiles(platform, present, needed, target, expected):
    assert lab_target.compile_on(platform, present, needed, target) == expected


def test_a_tpu_without_the_devices_refuses_in_one_line():
    with pytest.raises(ValueError, match="need 16 devices but 4 tpu devices are present"):
        lab_target.compile_on("tpu", 4, 16, "tpu-v5p")


def test_what_is_an_estimate_and_what_a_plan_compiles_for():
    t = lab_target
    assert t.is_estimate("cpu", None) and t.is_estimate("cpu", "h100") and t.is_estimate("gpu", "tpu-v5p")
    assert not t.is_estimate("gpu", "h200") and not t.is_estimate("gpu-mock:1x8x1", "h100")
    assert not t.is_estimate("cpu", "cpu") and t.is_estimate("gpu", None)
    assert [t.mock_topology(local, n) for local, n in [(1, 8), (8, 16), (4, 6)]] == [
        "1x8x1",
        "1x2x8",
        "1x2x4",
    ]
    assert [t.devices_needed(m, 8) for m in ("dp=2,tp=4", "dp=-1", "tp=2", "dp=2 , pp=2,tp=2")] == [
        8,
        8,
        2,
        8,
    ]
    assert t.default_target("gpu", "NVIDIA H200") == "h200" and t.default_target("cpu", "cpu") is None
    assert t.default_target("gpu", "NVIDIA GeForce RTX 4090") is None
    assert t.choose_budget(5, 7, "h100") == (5, "--device-memory")
    assert t.choose_budget(None, 7, "h100")[0] == 7 and t.choose_budget(None, None, None) == (None, None)


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--device-memory", "80 gigs"], "cannot read the memory size '80 gigs'"),
        (["--model", "gpt-nano", "--mesh", "tp=8"], "not divisible by mesh axis tp=8"),
        (["--init-from", "x.safetensors"], "--plan takes a preset"),
        (
            ["--attention", "cudnn"],
            "cuDNN's attention compiles only for NVIDIA GPUs, and this plan compiles for cpu",
        ),
        (["--model.attention=cudnn"], "cuDNN's attention compiles only for NVIDIA GPUs"),
    ],
)
def test_bad_plan_input_exits_2_before_compiling(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--plan", *argv])
    assert exit_.value.code == 2
    assert reason in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_mock_topology_that_gives_no_gpus_is_refused_in_one_line():
    """On a CPU host jax ignores jax_mock_gpu_topology: the device count it gives is checked, not trusted (in
    a fresh process: the backends are cleared and started again)."""
    code = "from shardgpt.lab import target\ntry:\n target._mock_gpus(8)\nexcept ValueError as e:\n print(e)"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "this host has 1, and jax's mock topology 1x8x1 gave 1 cpu devices" in out.stdout, out.stderr[
        -500:
    ]


def test_an_unknown_target_exits_2_listing_the_profiles(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--plan", "--target", "nonsense"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "--target: invalid choice: 'nonsense'" in last
    assert all(name in last for name in hardware.names()), last


@pytest.mark.parametrize("dp", [1, 8])
@pytest.mark.parametrize(
    "curve, most",
    [
        (lambda b: 4.2e9 + 2.06e9 * (b - 1), 4),  # gpt2 on one H200 (measured: a line): 4 compiles
        (lambda b: 5e9 + 1e8 * b - 4e9 * (b > 8), 6),  # a jump: small batches laid out differently
        (lambda b: 1e9 + 3e9 * b**0.5, 12),  # bending away: interpolation and bisection take turns
        (lambda b: 1e9 + 3e7 * b + 2e5 * b * b, 17),  # bending up: no worse than a bisection
        (lambda b: 150e9 + b, 1),  # nothing fits
        (lambda b: 1e6 + b, 4),  # everything up to the ceiling fits
    ],
)
def test_largest_batch_search_agrees_with_brute_force_in_few_compiles(curve, most, dp):
    import types

    budget = plan.parse_bytes("139GiB")
    compiled = []
    planner = plan.Planner(None, None, types.SimpleNamespace(shape={"dp": dp}), "dp", 1, None, None, None)
    planner.memory = lambda b: compiled.append(b) or {"total_bytes": curve(b)}
    fits = [b for b in range(dp, plan.MAX_BATCH + 1, dp) if curve(b) <= budget]
    assert planner.largest_batch(budget) == (max(fits) if fits else 0)
    assert len(set(compiled)) <= most, sorted(set(compiled))
