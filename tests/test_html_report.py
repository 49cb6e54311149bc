"""report.html: a page that parses with balanced tags, references nothing outside itself, escapes every text,
and shows the very numbers of results.json (a comparison or a plan) and of a train run's metrics.jsonl."""

import json
import math
from html.parser import HTMLParser

from shardgpt.analysis.hlo import KINDS
from shardgpt.lab import html_page, html_report, html_training
from shardgpt.lab.report import GENERATE_COLUMNS, agreement, size

VOID = {"meta", "br", "hr", "img", "input", "link"}  # HTML elements without a closing tag
EVIL = "dp=2,tp=4 <b>zero3</b> & co"  # a run name that must come out as text, never as markup


class Page(HTMLParser):
    """Checks nesting as it parses; collects each table's rows of cell texts (by id) and every attribute."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.tags, self.attrs, self.tables, self.errors = [], [], [], {}, []
        self._table, self._cell = None, None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag not in VOID:
            self.stack.append(tag)
        ident = dict(attrs).get("id")
        if tag == "table":
            self._table = self.tables.setdefault(ident or f"table{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_startendtag(self, tag, attrs):  # <rect .../>: opens and closes at once
        self.tags.append(tag)
        self.attrs += attrs

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unbalanced </{tag}>")
        if tag in ("td", "th") and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def rows(self, ident: str) -> dict[str, list[str]]:
        """A table's body rows (the header and sources rows dropped), keyed by their first cell."""
        return {row[0]: row for row in self.tables[ident][2:]}


def check_page(text: str) -> Page:
    """Parses with every tag closed in order; no reference outside the file; no injected markup."""
    page = Page(text)
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text
    assert not {"script", "link", "img", "iframe", "object", "b"} & set(page.tags), set(page.tags)
    assert not [(k, v) for k, v in page.attrs if k in ("src", "href", "xlink:href")], "an external reference"
    assert "http:" not in text and "https:" not in text and "url(" not in text and "@import" not in text
    return page


def _by_cause(cause, kind, nbytes, theory, textbook=-1, **extra) -> dict:
    ratio = nbytes / theory if theory else None
    return {
        "cause": cause, "kind": kind, "count": 2, "bytes": nbytes, "bytes_by_name": nbytes // 2,
        "bytes_by_axes": nbytes - nbytes // 2, "sliced_bytes": 0, "theory_count": 2, "theory_bytes": theory,
        "ratio": ratio, "textbook_bytes": theory if textbook == -1 else textbook, "textbook_ratio": ratio,
        "textbook_note": "why not", "ops": {"jvp(forward)/GPT/blocks/attn/out/megatron_g [tp]": nbytes},
        "dtypes": {"f32": nbytes}, "note": "", **extra,
    }  # fmt: skip


def _run(name: str, strategy: str, losses: list[float], tokens_per_s: float, **extra) -> dict:
    memory = {f"{k}_bytes_per_device": 1000 * (i + 1) for i, k in enumerate(html_report.MEMORY_COLUMNS)}
    by_cause = [
        _by_cause("attn.fwd", "all-reduce", 180224, 180224),
        _by_cause("grad_reduce", "reduce-scatter", 126976, 63488, note="XLA:CPU <all-reduce> + slice"),
        _by_cause("optimizer", "all-reduce", 48, 4, textbook=None),
    ]
    return {
        "name": name, "model": "gpt-pico", "task": "sort", "strategy": strategy, "impl": "gspmd",
        "mesh": {"dp": 2, "pp": 1, "cp": 1, "tp": 4}, "config": {"n_layer": 1}, "optim": {"b2": 0.95},
        "n_params": 54912, "dtype": "float32", "seed": 0, "batch": 8, "seq": 11, "steps": len(losses),
        "timed_steps": len(losses) - 1, "lr": 3e-3, "microbatches": 1, "compile_s": 8.0912,
        "step_time_s": 0.032704, "tokens_per_s": tokens_per_s, "mfu": None, "flops_per_token": 618624,
        "peak_flops": None, "memory": memory | {"device_peak_bytes": None},
        "memory_sources": dict.fromkeys(memory, "compiled program (memory_analysis)"),
        "expected_memory": {f"{k}_bytes_per_device": 900 for k in ("params", "grads", "opt_state")},
        "collectives": {k: {"count": 0, "bytes": 0} for k in KINDS}
        | {"all-reduce": {"count": 16, "bytes": 1033216}},
        "collectives_by_cause": by_cause, "losses": losses, "final_loss": losses[-1],
        "grad_norms": [3.7, 3.3, math.nan], "wall_s": 12.3,
        "generate": {"batch": 8, "prompt_len": 6, "new_tokens": 8, "tokens_per_s": 3276.93, "compiles": 1,
                     "naive_tokens_per_s": 6.81, "recompute_tokens_per_s": 1761.04,
                     "greedy_matches_recompute": True},
        **extra,
    }  # fmt: skip


def _results() -> dict:
    runs = [_run("dp=2,tp=4 dp", "dp", [1.0378, 0.7727, 0.628496], 21532.4)]
    runs.append(_run(EVIL, "zero3", [1.0378, 0.7727, 0.628497], 23690.2))
    meta = {"jax_version": "0.10.2", "platform": "cpu", "device_kind": "cpu", "num_devices": 8}
    meta |= {"command": "experiments/run.py --strategy dp,zero3 --out '<dir>'", "date": "2026-12-04"}
    # Through JSON, as write() reads it: NaN survives as NaN, like json.dumps writes results.json.
    return json.loads(json.dumps({"meta": meta, "runs": runs, "agreement": agreement(runs)}))


def test_comparison_page_shows_results_json_numbers_and_escapes(tmp_path):
    results = _results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    path = html_report.write(tmp_path)
    text = path.read_text()
    assert path.name == "report.html" and text == html_report.render(results)  # deterministic
    page = check_page(text)
    assert "dp=2,tp=4 &lt;b&gt;zero3&lt;/b&gt; &amp; co" in text and "&lt;all-reduce&gt;" in text

    table = page.rows("comparison")
    assert page.tables["comparison"][1][2:5] == [
        "measured (wall)",
        "measured (median)",
        "derived from step time",
    ]
    for run in results["runs"]:
        row = table[run["name"]]
        assert row[2:5] == [
            f"{run['compile_s']:.2f}",
            f"{1e3 * run['step_time_s']:.2f}",
            f"{run['tokens_per_s']:,.0f}",
        ]
        assert row[11] == f"{run['final_loss']:.6f}" and row[12] == "ok"
        assert row[6] == f"{size(run['memory']['params_bytes_per_device'])} ({size(900)})"
        generated = page.rows("generation")[run["name"]]
        assert (
            generated[list(GENERATE_COLUMNS).index("tokens_per_s") + 1] == "3,276.9"
            and generated[-1] == "yes"
        )
        causes = {(r[0], r[1]): r for r in page.rows(f"causes-{run['name']}").values()}
        rs = causes["grad_reduce", "reduce-scatter"]
        assert rs[3] == size(126976) and rs[7] == size(63488) and rs[8] == "2.00x" and rs[4] == "62K (50%)"
        assert "no textbook figure: why not" in causes["optimizer", "all-reduce"][11]
        assert page.rows("memory")[run["name"]][8] == size(run["memory"]["peak_bytes_per_device"])
    assert page.tables["memory"][1][1] == "compiled program (memory_analysis)"  # each figure's source
    assert page.rows("meta")["command"][1] == results["meta"]["command"]
    assert text.count("<polyline") >= 4  # two loss curves, two grad-norm curves cut short by the NaN


def test_a_disagreeing_run_is_flagged_and_a_plan_page_shows_its_rows(tmp_path):
    results = _results()
    results["runs"][1]["losses"][1] = 5.0
    results["agreement"] = agreement(results["runs"])
    table = check_page(html_report.render(results)).rows("comparison")
    assert table[EVIL][12] == "DISAGREES"

    row = {
        "rank": 1, "name": "gpt-pico dp=8 zero3", "model": "gpt-pico", "batch": 8, "seq": 11, "fits": False,
        "max_batch": 0, "compiles": 2, "compiled_for": "cpu", "target": "h100", "estimate": True,
        "budget_bytes": 2**20, "budget_source": "--device-memory", "dtype": "bfloat16", "attention": "xla",
        "state": {"params_bytes_per_device": 6864, "grads_bytes_per_device": 6864,
                  "opt_state_bytes_per_device": 13728},
        "compiled": {"temp_bytes": 3_000_000, "total_bytes": 3_100_000},
        "totals_by_batch": {"16": 5_000_000, "8": 3_100_000},
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps({"meta": {"date": "d"}, "plan": [row]}))
    page = check_page(html_report.write(tmp_path).read_text())
    plan = page.rows("plan")["1"]
    assert plan[2:9] == [size(6864), size(6864), size(13728), size(3e6), size(3.1e6), "NO", "none"]
    assert "compiled program (cpu: an estimate)" in page.tables["plan"][1]
    assert f"8: {size(3.1e6)}, 16: {size(5e6)}" in (tmp_path / "report.html").read_text()


def test_training_page_from_metrics_jsonl(tmp_path):
    lines = [
        {"step": 1, "loss": 1.05, "grad_norm": 4.0, "tokens_per_s": 23.2, "lr": 3e-3},
        {"step": 2, "loss": 0.98, "grad_norm": 4.8, "tokens_per_s": 310.7, "lr": 2.9e-3, "val_loss": 0.99},
        {"step": 3, "loss": None, "grad_norm": None, "tokens_per_s": 300.0, "lr": 2.8e-3,
         "non_finite": ["grad_norm", "loss"]},
    ]  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # a cut last line
    config = {"mesh": "dp=2,tp=4", "strategy": "zero3", "task": "chars:<a>.txt", "model": {"n_layer": 2}}
    path = html_training.write(metrics, config, {"command": "experiments/train.py --steps 3"})
    assert path == tmp_path / "report.html"
    page = check_page(path.read_text())
    (summary,) = page.rows("summary").values()
    assert summary == ["1-3", "n/a", "0.9900", "300", "0.0028", "3"]
    assert "chars:&lt;a&gt;.txt" in path.read_text() and path.read_text().count("<svg") == 4


def test_charts_draw_dots_gaps_and_say_when_nothing_is_finite():
    one = html_page.line_chart({"a": [(1, 2.0)]}, "step", "loss")
    assert "<circle" in one and "<polyline" not in one
    gap = html_page.line_chart(
        {"a": [(1, 2.0), (2, 1.0), (3, None), (4, 0.5), (5, 0.4)]}, "s", "l", log_y=True
    )
    assert gap.count("<polyline") == 2
    assert "no finite values" in html_page.line_chart({"a": [(1, math.nan)]}, "step", "loss")
    bars = html_page.bar_chart([("x", [1, 2])], ["p", "q"], "bytes", size, limit=4, limit_label="budget")
    assert bars.count("<rect") == 4 and "stroke-dasharray" in bars  # 2 bars, 2 legend swatches, the limit
