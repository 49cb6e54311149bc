"""The memory planner (`run.py --plan`): compile-only figures, a largest batch that really is the largest, and
bad input refused before any compile."""

import contextlib
import io
import json

import jax
import pytest

from shardgpt.cli import run as cli
from shardgpt.lab import plan

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
    assert "exact, from the layout" in stdout and "an estimate for a GPU or TPU" in stdout
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--device-memory", "80 gigs"], "cannot read the memory size '80 gigs'"),
        (["--model", "gpt-nano", "--mesh", "tp=8"], "not divisible by mesh axis tp=8"),
        (["--init-from", "x.safetensors"], "--plan takes a preset"),
    ],
)
def test_bad_plan_input_exits_2_before_compiling(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--plan", *argv])
    assert exit_.value.code == 2
    assert reason in capsys.readouterr().err.strip().splitlines()[-1]


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
