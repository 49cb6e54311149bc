"""The layout recommender (lab/recommend.py) and its analytic estimates (analysis/estimate.py): hand-made
inputs and abstract layouts, no compile; one tiny end-to-end CLI run on gpt-pico."""

import pytest

from shardgpt.analysis import estimate, hardware
from shardgpt.lab import recommend
from shardgpt.model import config

H100X2 = hardware.cluster("2xh100x1")  # two nodes, few layouts: a fast search


def test_groups_follow_the_flat_device_order_tp_fastest():
    mesh = {"dp": 2, "tp": 4}
    assert estimate.groups(mesh, ("tp",)) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert estimate.groups(mesh, ("dp",)) == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert estimate.groups({"dp": 2, "pp": 2, "tp": 2}, ("dp", "pp")) == ((0, 2, 4, 6), (1, 3, 5, 7))


def test_theory_rows_become_ops_on_their_axes_and_sp_grad_sums_go_to_tp():
    rows = {
        ("attn.fwd", "all-reduce"): {"count": 4, "bytes": 400},
        ("grad_reduce", "all-reduce"): {"count": 6, "bytes": 900},
        ("pp_send", "collective-permute"): {"count": 2, "bytes": 20},
    }
    mesh = {"dp": 2, "pp": 2, "tp": 2}
    base = {("grad_reduce", "all-reduce"): {"count": 2, "bytes": 800}}  # the same step without +sp
    ops = {op.op_name: op for op in estimate.ops(rows, mesh, base)}
    assert (ops["attn.fwd"].group_size, ops["attn.fwd"].executions, ops["attn.fwd"].bytes) == (2, 4, 100)
    assert ops["grad_reduce"].group_size == 4 and ops["grad_reduce"].bytes * 2 == 800  # dp x pp
    assert ops["grad_reduce.sp"].groups[0] == (0, 1) and ops["grad_reduce.sp"].executions == 4
    assert ops["pp_send"].group_size is None and ops["pp_send"].groups[0] == (0, 2)  # stage 0 -> 1
    assert not estimate.ops(rows, {"dp": 1})  # one device: nothing to communicate


def test_the_memory_model_saves_less_with_remat_sp_and_more_with_a_pipeline():
    cfg = config.preset("gpt2", dtype="bfloat16")
    state = dict.fromkeys(
        ("params_bytes_per_device", "grads_bytes_per_device", "opt_state_bytes_per_device"), 0
    )
    acts = lambda c, strategy="dp", mesh={"dp": 8}, m=1: estimate.memory(
        c, strategy, mesh, 64, 1024, m, state
    )["activations"]
    plain = acts(cfg)
    assert acts(cfg.replace(remat=True)) < plain / 5
    assert acts(cfg, "dp+sp", {"dp": 2, "tp": 4}) == pytest.approx(4 * plain / 4)  # 4x the rows, /4 by tp
    assert acts(cfg, m=4) == pytest.approx(plain / 4)  # one microbatch at a time
    assert acts(cfg, mesh={"dp": 4, "pp": 2}, m=4) == pytest.approx(plain)  # GPipe stashes every one
    assert acts(cfg.replace(attention="cudnn")) < plain  # no attention scores kept


def test_candidates_respect_divisibility():
    found = recommend.candidates(config.preset("gpt2-xl"), 8, 64, 1024)  # 25 heads, 48 layers
    assert {c.tp for c in found} == {1} and {c.pp for c in found} == {1, 2, 4, 8}
    assert all(c.microbatches >= c.pp and 64 // c.dp % c.microbatches == 0 for c in found)
    assert all(c.strategy == "dp" for c in found if c.dp == 1)  # ZeRO shards nothing without dp
    pico = recommend.candidates(config.preset("gpt-pico"), 8, 8, 32)
    assert {c.tp for c in pico} == {1, 2, 4, 8} and all(c.tp > 1 for c in pico if c.strategy.endswith("+sp"))


def test_search_ranks_what_fits_and_explains_the_winner():
    cfg, seq = recommend.resolve("gpt-pico", (), "bfloat16", "xla", 32)
    result = recommend.search(cfg, H100X2, 8, seq, 80 * 2**30)
    ranked = result["ranked"]
    assert ranked and not result["over"] and ranked[0]["rank"] == 1
    steps = [r["prediction"]["step_time_s"]["no_overlap"] for r in ranked]
    assert steps == sorted(steps)
    why = recommend.reason(result, H100X2, 80 * 2**30)
    assert why.startswith(ranked[0]["candidate"].label() + ": ")
    tight = recommend.search(cfg, H100X2, 8, seq, 1)
    assert not tight["ranked"] and len(tight["over"]) == len(ranked)
    assert "nothing fits" in recommend.reason(tight, H100X2, 1)


def _row(rank, candidate, step, parts, memory=1):
    prediction = {"step_time_s": {"no_overlap": step}}
    return {"rank": rank, "candidate": candidate, "prediction": prediction, "parts_s": parts,
            "memory": {"total_bytes": memory}}  # fmt: skip


def test_the_reason_names_the_term_that_grew_and_a_faster_layout_that_does_not_fit():
    win = recommend.Candidate(8, 1, 1, "zero3", 1, False)
    tp = recommend.Candidate(2, 1, 4, "dp", 1, False)
    parts = {"compute": (0.10, 0), "zero3": (0.02, 0)}
    slower = {"compute": (0.10, 0), "tp": (0.06, 0.05)}
    result = {
        "ranked": [_row(1, win, 0.12, parts), _row(2, tp, 0.16, slower)],
        "over": [_row(None, recommend.Candidate(8, 1, 1, "dp", 1, False), 0.11, {}, memory=90 * 2**30)],
    }
    why = recommend.reason(result, hardware.cluster("2xh100x4"), 80 * 2**30)
    assert why.startswith("zero3 on dp=8: dp on dp=2,tp=4 (#2) is 33% slower: tp's per-layer all-reduces")
    assert "crossing IB at 2 nodes" in why and "the faster dp on dp=8 needs 90.0 GiB of 80.0 GiB" in why


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recommend"], "add --predict --hardware SPEC"),
        (["--predict", "--hardware", "h100x8", "--recommend", "--mesh", "dp=8"], "drop --mesh"),
        (
            ["--predict", "--hardware", "h100x8", "--recommend", "--remat", "--microbatches", "2"],
            "drop --remat",
        ),
        (["--predict", "--hardware", "h100x8", "--recommend", "--model", "gpt2,gpt-pico"], "one --model"),
        (["--measure"], "give --predict --hardware SPEC"),
        (["--predict", "--hardware", "cpux8", "--measure", "--plan"], "without --plan or --recommend"),
    ],
)
def test_bad_combinations_are_refused_before_jax_starts(extra, message, capsys):
    from shardgpt.cli import run as cli

    with pytest.raises(SystemExit) as e:
        cli.main(extra)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_recommend_cli_on_gpt_pico(tmp_path, capsys, monkeypatch):
    """Searched analytically for 2 h100s, the winner compiled (one compile, for time) on 2 of the 8
    simulated devices."""
    import json

    from shardgpt.cli import run as cli

    monkeypatch.setattr(recommend, "CONFIRM", 1)
    argv = ["--predict", "--hardware", "h100x2", "--recommend", "--model", "gpt-pico", "--seq", "32"]
    argv += ["--batch", "8", "--no-plots", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "a PREDICTION for h100x2" in out and "recommended: " in out and "XLA:CPU estimate" in out
    record = json.loads((tmp_path / "results.json").read_text())["recommendation"]
    confirmed = [r["confirmed"] for r in record["ranked"][: recommend.CONFIRM]]
    assert all(c["compiled_for"] == "cpu" and c["memory"]["total_bytes"] > 0 for c in confirmed)
    assert record["winner"]["rank"] == 1 and record["reason"] in out


def test_confirmation_goes_on_down_the_ranking_until_a_layout_fits_as_compiled(monkeypatch):
    """Stub planner (no compile): compiled totals 9, 9, 9, 9, 9, 9, 4, 4, ... against a budget of 5: the
    top CONFIRM are over it, so rows are compiled until the first that fits (#7), and no further."""
    from types import SimpleNamespace

    from shardgpt.analysis import cost
    from shardgpt.lab import plan, recommend_table, runner

    totals = iter([9] * (recommend.CONFIRM + 1) + [4] * recommend.CONFIRM)

    def prepare(spec, devices):
        memory = {"total_bytes": next(totals)}
        return SimpleNamespace(
            memory=lambda batch: memory,
            hlo={1: ""},
            config=None,
            strategy="dp",
            mesh=mesh,
            seq=1,
            microbatches=1,
        )

    mesh = SimpleNamespace(shape={"dp": 1})
    monkeypatch.setattr(plan.Planner, "prepare", staticmethod(prepare))
    monkeypatch.setattr(cost, "predict", lambda *args: {})
    candidate = recommend.Candidate(1, 1, 1, "dp", 1, False)
    ranked = [{"rank": i + 1, "candidate": candidate} for i in range(3 * recommend.CONFIRM)]
    base = runner.RunSpec(model="gpt-pico", batch=1)
    recommend_table.confirm(ranked, base, [None], {}, H100X2, lambda _: None, budget=5)
    compiled = [r["rank"] for r in ranked if "confirmed" in r]
    assert compiled == list(range(1, recommend.CONFIRM + 3)), compiled
    totals = iter([9] * 3 * recommend.CONFIRM)
    fresh = [{"rank": i + 1, "candidate": candidate} for i in range(3 * recommend.CONFIRM)]
    recommend_table.confirm(fresh, base, [None], {}, H100X2, lambda _: None)  # no budget: the top CONFIRM
    assert [r["rank"] for r in fresh if "confirmed" in r] == list(range(1, recommend.CONFIRM + 1))
