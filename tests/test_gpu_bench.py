"""The one-GPU benchmark (experiments/gpu_bench.py) on CPU: --tiny runs every section in priority order and
writes every field of results.json with sensible values (the anchor a fake script of the real one's output
shape); a section past its limit or the run's budget is skipped with the reason, one that fails records its
error and the next one runs."""

import dataclasses
import json
import math
import textwrap
import time

import pytest

from shardgpt.bench import gpu as bench
from shardgpt.bench import gpu_apart as apart
from shardgpt.bench import gpu_levers as levers
from shardgpt.bench import gpu_parts as parts
from shardgpt.bench import gpu_sections as sections
from shardgpt.bench import gpu_table
from shardgpt.bench.gpu_run import Run, Skipped

META_KEYS = {"jax_version", "platform", "device_kind", "num_devices", "command", "date", "model", "n_params"}
META_KEYS |= {"seq", "dtype", "budget_s", "limits_s", "wall_s", "tiny", "sizes", "xla_flags", "hardware"}
TOP_KEYS = {"meta", "sources", "sections", "copy", "copy_bandwidth_bytes_per_s", "train", "decode", "anchor"}
TOP_KEYS |= {"planner", "mock", "cost_model", "xl", "levers", "naive"}
# The anchor's output shape (gpu_ref.py's $OUT/gpu_ref.json), with the argv it was given and the env it saw.
FAKE_ANCHOR = """
    import json, os, sys, time
    argv = sys.argv[1:]
    batches = [int(b) for b in argv[argv.index("--decode-batch") + 1].split(",")]
    attn = argv[argv.index("--attn") + 1]
    result = {"meta": {"argv": argv, "prealloc": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")},
              "ceilings": {"bandwidth_gbs": 3.0},
              "train": [{"attn": attn, "batch": 2, "step_ms": 8.0, "mfu_peak": 0.25}],
              "decode": [{"cache": "stacked", "batch": b, "ms_per_step": 0.5 * b, "vs_floor": 2.0}
                         for b in batches]}
    open(os.path.join(os.environ["OUT"], "gpu_ref.json"), "w").write(json.dumps(result))
    time.sleep(float(os.environ.get("FAKE_ANCHOR_SLEEP", "0")))
"""


def fake_anchor(folder):
    path = folder / "gpu_ref.py"
    path.write_text(textwrap.dedent(FAKE_ANCHOR))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(results returned, results.json as written, table.txt) of one --tiny run, the anchor a fake; the
    levers' processes (jax started twice more) are tested with fakes below."""
    out = tmp_path_factory.mktemp("gpu_bench")
    anchor = fake_anchor(tmp_path_factory.mktemp("anchor"))
    results = bench.main(["--tiny", "--out", str(out), "--anchor", str(anchor), "--limit", "levers=0"])
    return results, json.loads((out / "results.json").read_text()), (out / "table.txt").read_text()


def _positive(row: dict, *keys: str):
    for key in keys:
        assert isinstance(row[key], float | int) and row[key] > 0 and math.isfinite(row[key]), (key, row)


def test_tiny_runs_every_section_and_writes_every_field(tiny):
    results, written, _ = tiny
    assert written == json.loads(json.dumps(results, default=str))
    assert set(written) == TOP_KEYS
    assert META_KEYS <= set(written["meta"]), META_KEYS - set(written["meta"])
    assert written["meta"]["platform"] == "cpu" and written["meta"]["tiny"] is True
    assert list(written["sections"]) == list(bench.LIMITS_S)  # in priority order
    statuses = {name: r["status"] for name, r in written["sections"].items()}
    assert statuses == dict.fromkeys(bench.LIMITS_S, "ok") | {"mock": "skipped", "levers": "skipped"}
    _positive(written, "copy_bandwidth_bytes_per_s")
    assert [set(r) for r in written["train"]] == [set(parts.TRAIN_KEYS)]
    assert [set(r) for r in written["decode"]] == [set(parts.DECODE_KEYS)]
    assert set(written["naive"]) == set(parts.NAIVE_KEYS)
    # Every figure names its source, and none derived is labelled measured.
    rows = written["train"] + written["decode"] + [written["naive"]]
    figures = {k for r in rows for k, v in r.items() if isinstance(v, float | dict)}
    assert figures <= set(written["sources"]), figures - set(written["sources"])
    for key in ("mfu", "tokens_per_s", "floor_ms", "floor_ms_pytorch", "bandwidth_fraction", "weight_bytes"):
        assert written["sources"][key].startswith(("derived", "theory")), key


def test_tiny_train_rows_are_sensible_and_each_config_is_measured_once(tiny):
    rows = tiny[0]["train"]
    assert [(r["name"], r["section"], r["goal_mfu"]) for r in rows] == [
        ("gpt-pico unrolled xla b2", "headline", 0.45)
    ]  # on CPU: xla only; the cost model, gpt2-xl's stand-in and the rest reuse it
    for r in rows:
        assert r["status"] == "ok" and r["error"] is None, r
        _positive(r, "compile_s", "step_time_s", "step_time_median_s", "tokens_per_s", "flops_per_token")
        _positive(r, "first_loss", "last_loss", "temp_bytes", "wall_s")
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq"] / r["step_time_s"])
        assert r["peak_flops"] is None and r["mfu"] is None  # no peak is known for a CPU
        assert r["memory"]["temp_bytes"] == r["temp_bytes"] and r["memory"]["total_bytes"] > r["temp_bytes"]
        assert r["predicted"]["hardware"] == "cpux1" and set(r["predicted"]["step_time_s"]) == {
            "no_overlap",
            "full_overlap",
        }


def test_tiny_decode_beside_both_floors_and_the_naive_generator(tiny):
    results = tiny[0]
    (r,) = results["decode"]
    assert r["batch"] == 1 and r["status"] == "ok" and r["compiles"] == 1, r
    _positive(r, "compile_s", "first_token_ms", "total_ms", "ms_per_step", "weight_bytes", "cache_bytes")
    moved = r["weight_bytes"] + r["cache_bytes"]
    assert r["floor_ms"] == pytest.approx(1e3 * moved / results["copy_bandwidth_bytes_per_s"])
    assert r["floor_ms_pytorch"] == pytest.approx(1e3 * moved / 4.3e12)
    assert r["ratio_to_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms"])
    assert r["ratio_to_floor_pytorch"] == pytest.approx(r["ms_per_step"] / r["floor_ms_pytorch"])
    assert r["bandwidth_fraction"] == pytest.approx(1 / r["ratio_to_floor"]) and r["goal_ratio"] == 3.0
    naive = results["naive"]
    assert naive["status"] == "ok" and naive["tokens"] == naive["compiles"] == 2  # one compile per length
    assert len(naive["per_token_s"]) == 2


def test_a_decode_step_reads_the_weights_once_and_the_cache_per_row():
    import jax

    cfg = sections.model_config(_context(None), "gpt-pico")
    params = jax.eval_shape(lambda: sections.train.init_params(sections.GPT(cfg), jax.random.key(0)))
    (w1, c1), (w4, c4) = (parts.decode_bytes(cfg, params, batch, 40) for batch in (1, 4))
    assert w1 == w4 and c4 == 4 * c1 == 4 * 2 * cfg.n_layer * 40 * cfg.n_embd * 2  # bf16 keys and values
    lookups = params["wpe"].size + (0 if cfg.tie_embeddings else params["wte"].size)  # one row read each
    assert w1 == 2 * (sum(x.size for x in jax.tree_util.tree_leaves(params)) - lookups)


def test_the_anchor_runs_apart_at_our_configs_and_its_figures_stand_beside_ours(tiny):
    results = tiny[0]
    anchor = results["anchor"]
    argv = anchor["result"]["meta"]["argv"]
    for flag in ("--unroll", "--skip-naive", "--tiny"):
        assert flag in argv, argv
    assert argv[argv.index("--attn") + 1] == "xla" and argv[argv.index("--cache") + 1] == "stacked"
    assert argv[argv.index("--decode-batch") + 1] == "1" and argv[argv.index("--batch") + 1] == "2"
    assert anchor["result"]["meta"]["prealloc"] == "false"  # beside our process's preallocated memory
    train, *decode = anchor["comparisons"]
    ours = results["train"][0]
    assert train["ours_ms"] == pytest.approx(1e3 * ours["step_time_s"]) and train["anchor_ms"] == 8.0
    assert train["speedup"] == pytest.approx(8.0 / train["ours_ms"]) and train["goal"] == 1.11
    assert [d["what"] for d in decode] == ["decode b1"]
    assert decode[0]["speedup"] == pytest.approx(0.5 / results["decode"][0]["ms_per_step"])
    assert decode[0]["anchor_x_floor"] == 2.0


def test_the_planner_against_the_same_step_compiled_and_live(tiny):
    planner = tiny[0]["planner"]
    assert planner["child"]["status"] == "ok" and "this one" in planner["child"]["process"]  # CPU: no peak
    assert planner["command"].startswith("experiments/run.py --plan --model gpt-pico")
    for flags in ("--target cpu", "--no-scan", "--mesh dp=1", "--no-plots"):  # no matplotlib on a GPU image
        assert flags in planner["command"], flags
    assert planner["compiled_total_bytes"] == tiny[0]["train"][0]["memory"]["total_bytes"]
    assert planner["ratio_to_compiled"] == pytest.approx(
        planner["planned_total_bytes"] / planner["compiled_total_bytes"]
    )
    assert planner["within_goal"]["compiled"] is True  # the planner compiles the step the run compiles
    assert planner["live_peak_bytes"] is None and "no memory_stats" in planner["live_note"]  # CPU


def test_the_mock_topology_is_refused_off_a_gpu_with_its_reason(tiny):
    mock, section = tiny[0]["mock"], tiny[0]["sections"]["mock"]
    assert "mock topology" in section["error"] and section["error"] == mock["error"]
    assert "--mesh dp=8 --mesh dp=2,tp=4" in mock["command"] and "another process" in mock["process"]


def test_the_cost_model_beside_every_held_out_config(tiny):
    record, train = tiny[0]["cost_model"], {r["name"]: r for r in tiny[0]["train"]}
    assert record["hardware"] == "cpux1" and "unvalidated on GPU" in record["note"]
    assert [r["name"] for r in record["rows"]] == list(train)
    errors = []
    for row in record["rows"]:
        measured = train[row["name"]]["step_time_s"]
        assert row["status"] == "ok" and row["measured_step_s"] == measured
        for bound, predicted in row["predicted_step_s"].items():
            assert row["rel_error"][bound] == pytest.approx(predicted / measured - 1)
        errors.append(abs(row["rel_error"]["no_overlap"]))
    assert record["configs"] == 1 and record["median_abs_error"]["no_overlap"] == pytest.approx(errors[0])
    assert record["within_goal"]["no_overlap"] == (errors[0] <= 0.15)


def test_xl_reuses_what_was_measured(tiny):
    xl = tiny[0]["xl"]
    assert xl["tried"] == [{"name": "gpt-pico unrolled xla b2", "status": "ok", "error": None}]
    assert xl["train"] == "gpt-pico unrolled xla b2" and xl["decode"] == "gpt-pico b1"  # tiny's stand-ins


def test_tiny_table_shows_every_section(tiny):
    text = tiny[2]
    words = ["copy bandwidth (measured", "MFU", "x 4.3TB/s", "anchor:", "speedup", "planner (issue 24"]
    words += ["mock topology", "median |error|", "gpt-pico: train", "naive generator", "headline "]
    for word in words:
        assert word in text, word


def test_past_the_budget_every_section_is_skipped_with_its_reason(tmp_path):
    results = bench.main(["--tiny", "--out", str(tmp_path), "--budget", "0", "--anchor", str(tmp_path)])
    assert {r["error"] for r in results["sections"].values()} == {"past the run's 0 s budget"}
    assert results["train"] == results["decode"] == [] and not (tmp_path / "planner.json").exists()
    assert "n/a" in (tmp_path / "table.txt").read_text()


def _clock(tmp_path, **limits):
    return Run(
        {"meta": {}, "sections": {}, "train": [], "decode": []}, tmp_path, budget_s=1000, limits=limits
    )


def test_limits_skip_a_failing_section_records_its_error_and_the_next_runs(tmp_path):
    run, ran = _clock(tmp_path, first=10, zero=0, failing=10, skipping=10, last=0.5), []
    run.section("first", lambda run: ran.append(run.attempt({}, lambda: {"x": 1}, projected_s=5)))
    run.section("zero", lambda run: ran.append("zero"))
    run.section("failing", lambda run: 1 / 0)
    run.section("skipping", lambda run: (_ for _ in ()).throw(Skipped("no anchor here")))
    run.section("last", lambda run: ran.append(run.attempt({}, lambda: {"x": 2}, projected_s=5)))
    got = {name: (r["status"], r["error"]) for name, r in run.results["sections"].items()}
    assert got == {
        "first": ("ok", None),
        "zero": ("skipped", "its limit is 0 s (--limit zero=0)"),
        "failing": ("error", "ZeroDivisionError: division by zero"),
        "skipping": ("skipped", "no anchor here"),
        "last": ("ok", None),
    }
    assert ran[0]["status"] == "ok" and ran[0]["x"] == 1
    assert ran[1]["status"] == "skipped" and "past the last section's 0.5 s limit" in ran[1]["error"], ran[1]
    assert json.loads((tmp_path / "results.json").read_text())["sections"]["failing"]["status"] == "error"


def _context(tmp_path, sizes=parts.TINY, anchor=None):
    import jax

    return sections.Context(
        sizes, True, jax.devices()[0], None, "xla", None, tmp_path, (["unrolled"], ["xla"], [2]), anchor
    )


def test_the_anchor_is_skipped_where_absent_and_killed_at_its_limit_keeping_what_it_wrote(
    tmp_path, monkeypatch
):
    run = _clock(tmp_path, anchor=10, slow=0.5)
    results = run.results
    run.section("anchor", lambda run: apart.anchor(run, _context(tmp_path, anchor=str(tmp_path / "none.py"))))
    assert results["sections"]["anchor"]["status"] == "skipped"
    assert "a clone without it skips this" in results["sections"]["anchor"]["error"]
    monkeypatch.setenv("FAKE_ANCHOR_SLEEP", "30")
    ctx = _context(tmp_path, dataclasses.replace(parts.TINY, child_s=0.1), str(fake_anchor(tmp_path)))
    ctx.env = dict(__import__("os").environ)
    begin = time.perf_counter()
    run.section("slow", lambda run: apart.anchor(run, ctx))
    assert time.perf_counter() - begin < 10  # killed at the limit, not after its sleep
    assert "killed at its" in results["sections"]["slow"]["error"]
    assert results["anchor"]["result"]["train"][0]["step_ms"] == 8.0  # what it wrote before


def test_xl_measures_the_first_candidate_that_fits(tmp_path, monkeypatch):
    def fake_train(cfg, mesh, batch, s, on_compiled=None, limit_bytes=None):
        if batch > 8:
            raise MemoryError("does not fit")
        return dict(step_time_s=1.0, mfu=0.5)

    monkeypatch.setattr(parts, "bench_train", fake_train)
    monkeypatch.setattr(parts, "bench_decode", lambda *a: dict(ms_per_step=1.0, bandwidth_fraction=0.8))
    monkeypatch.setattr(sections, "decode_params", lambda ctx, model: (None, None))
    run = _clock(tmp_path, xl=600)
    run.results["copy_bandwidth_bytes_per_s"] = 1.0
    run.section("xl", lambda run: sections.xl(run, _context(tmp_path, parts.FULL)))
    xl = run.results["xl"]
    assert [(t["name"], t["status"]) for t in xl["tried"]] == [
        ("gpt2-xl scan xla b16", "error"),
        ("gpt2-xl scan xla b8", "ok"),
    ]
    assert xl["train"] == "gpt2-xl scan xla b8" and run.results["train"][1]["goal_mfu"] == 0.5
    assert run.results["decode"][0]["bandwidth_fraction"] == 0.8


def test_the_full_run_holds_out_eight_configs_of_two_models_varying_each_axis():
    configs = set(parts.FULL.held_out)
    assert len(configs) == len(parts.FULL.held_out) >= 8
    for axis in range(5):
        assert len({c[axis] for c in configs}) >= 2, axis  # model, layers, attention, batch, remat
    assert {c[0] for c in configs} == {"gpt2", "gpt2-medium"}
    assert parts.FULL.held_out[:2] == tuple(("gpt2", "unrolled", parts.HEAD, b, False) for b in (16, 32))


def test_the_anchor_is_looked_for_in_the_checkout_then_beside_it():
    assert [p.relative_to(apart.CHECKOUT.parent).as_posix() for p in apart.ANCHOR_PLACES] == [
        f"{apart.CHECKOUT.name}/.anchors/gpu_ref.py",
        "shared/anchors/gpu_ref.py",
    ]


def test_train_matrix_runs_the_headline_then_one_change_at_a_time():
    order = sections.train_matrix(["unrolled", "scan"], ["cudnn", "xla"], [16, 32, 8])
    assert len(order) == 12 and len(set(order)) == 12
    assert order[:5] == [
        ("unrolled", "cudnn", 16),
        ("unrolled", "cudnn", 32),
        ("unrolled", "cudnn", 8),
        ("unrolled", "xla", 16),
        ("scan", "cudnn", 16),
    ]
    assert order[-2:] == [("scan", "xla", 32), ("scan", "xla", 8)]


# A lever's process, faked: its spec after "--"; the command-buffer flag in XLA_FLAGS halves decode, the PGLE
# option halves training; with FAKE_REJECT it aborts on the flag as an XLA that does not know it would.
FAKE_CHILD = """
    import json, os, sys, time
    argv = sys.argv[1:]
    result, spec = argv[1], json.loads(argv[argv.index("--") + 1])
    flagged = "xla_gpu_enable_command_buffer" in os.environ.get("XLA_FLAGS", "")
    if flagged and os.environ.get("FAKE_REJECT"):
        print("E1205 debug_options_flags.cc:145] Illegal value for --xla_gpu_enable_command_buffer 'WHILE'")
        print("usage:", *(f"  --xla_flag_{i}=0  a usage line" for i in range(20)), sep=chr(10))
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_CHILD_SLEEP", "0")))
    out = dict(status="ok", spec=spec, prealloc=os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"))
    if spec["kind"] == "decode":
        out["ms_per_step"] = 0.5 if flagged else 1.0
    else:
        out["step_time_s"] = 0.002 if spec["jax"].get("jax_enable_pgle") else 0.004
    open(result, "w").write(json.dumps(out))
"""


@pytest.fixture
def lever_run(tmp_path, monkeypatch):
    """(a levers clock with this run's headline rows measured, its context), the lever processes and the
    chunk's train measurement faked (it records the loss chunk it was traced with)."""
    fake = tmp_path / "fake_child.py"
    fake.write_text(textwrap.dedent(FAKE_CHILD))
    monkeypatch.setattr(apart, "CHILD", (str(fake),))
    chunks = []

    def fake_train(cfg, mesh, batch, s, on_compiled=None, limit_bytes=None):
        chunks.append(sections.train.loss.head_cross_entropy_sum.keywords["chunk"])
        return dict(step_time_s=0.010, compile_s=1.0)

    monkeypatch.setattr(parts, "bench_train", fake_train)
    run = _clock(tmp_path, levers=60)
    head = dict(section="headline", status="ok", wall_s=0.1, model="gpt-pico")
    train = dict(name="gpt-pico unrolled xla b2", step_time_s=0.008, layers="unrolled")
    run.results["train"].append(head | train)
    run.results["decode"].append(head | dict(name="gpt-pico b1", ms_per_step=2.0))
    run.results["copy_bandwidth_bytes_per_s"] = 1.0
    return run, _context(tmp_path, dataclasses.replace(parts.TINY, child_s=0.1)), chunks


def test_each_lever_beside_the_runs_own_figure_a_failing_process_is_its_error_and_the_next_runs(
    lever_run, monkeypatch
):
    run, ctx, chunks = lever_run
    monkeypatch.setenv("FAKE_REJECT", "1")
    run.section("levers", lambda run: levers.levers(run, ctx))
    assert run.results["sections"]["levers"]["status"] == "ok"
    cb, pgle, chunk = run.results["levers"]["rows"]
    assert set(cb) == set(levers.LEVER_KEYS) and (cb["lever"], cb["status"]) == ("command buffers", "error")
    assert "Illegal value for --xla_gpu_enable_command_buffer" in cb["error"] and "usage" in cb["log_tail"]
    assert cb["settings"] == f"XLA_FLAGS += --xla_gpu_enable_command_buffer={levers.COMMAND_BUFFER}"
    assert pgle["status"] == "ok" and pgle["baseline_ms"] == 8.0 and pgle["variant_ms"] == 2.0
    assert pgle["speedup"] == 4.0 and pgle["baseline_from"] == "this run's headline row"
    child = json.loads((ctx.out / "lever_pgle.json").read_text())  # what the process was given
    assert child["spec"]["jax"] == levers.PGLE and child["spec"]["untimed"] == 4
    assert child["prealloc"] == "false"  # beside the parent's preallocated memory
    assert chunks == [16] and not hasattr(levers.loss.head_cross_entropy_sum, "keywords")  # restored after
    assert chunk["status"] == "ok" and chunk["speedup"] == pytest.approx(0.8), chunk  # 8 ms / 10 ms
    assert chunk["settings"].startswith("loss chunk 128 -> 16")
    text = "\n".join(gpu_table._levers(run.results["levers"]))
    for word in ("command buffers: gpt-pico b1", "Illegal value", "pgle: gpt-pico", "4.00", "predicted"):
        assert word in text, word


def test_a_lever_without_a_headline_figure_measures_its_own_baseline_apart(lever_run):
    run, ctx, _ = lever_run
    run.results["decode"].clear()
    run.results["levers"] = dict(rows=[])
    run.section("levers", lambda run: levers.command_buffers(run, ctx, 1))
    (row,) = run.results["levers"]["rows"]
    assert row["status"] == "ok" and row["baseline_from"] == "a process of its own, without the lever"
    assert (row["baseline_ms"], row["variant_ms"], row["speedup"]) == (1.0, 0.5, 2.0)


def test_the_levers_stop_at_their_limit(lever_run, monkeypatch):
    run, ctx, chunks = lever_run
    run.limits["levers"] = 0.5
    monkeypatch.setenv("FAKE_CHILD_SLEEP", "30")
    begin = time.perf_counter()
    run.section("levers", lambda run: levers.levers(run, ctx))
    assert time.perf_counter() - begin < 10  # the process killed at the limit, not after its sleep
    cb, pgle, chunk = run.results["levers"]["rows"]
    assert cb["status"] == "error" and "killed at its" in cb["error"]
    for row in (pgle, chunk):
        assert row["status"] == "skipped" and "past the levers section's 0.5 s limit" in row["error"], row
    assert chunks == []
