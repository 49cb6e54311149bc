"""The one-GPU benchmark's summary (OUT/table.txt) from its results.json: every section's outcome, every
measurement beside its goal, ours beside the anchor's, the planner's and the cost model's errors. No jax."""

from typing import Any

GIB = 2**30


def fmt(value: Any, spec: str, scale: float = 1) -> str:
    """`value` x scale in `spec`, "n/a" for None."""
    return "n/a" if value is None else format(value * scale, spec)


def status(row: dict[str, Any]) -> str:
    """A row's status, with its reason where it has one."""
    return str(row.get("status")) + (f": {row['error']}" if row.get("error") else "")


def columns(rows: list[dict[str, Any]], spec: list[tuple[str, str, str, float]]) -> list[str]:
    """A header and one line per row; a column is (title, key, format, scale); the first is left-aligned."""
    width = lambda title: max(len(title) + 2, 9)
    first = max([len(spec[0][0])] + [len(fmt(r.get(spec[0][1]), spec[0][2])) for r in rows]) + 2
    head = [f"  {spec[0][0]:<{first}}"] + [f"{t:>{width(t)}}" for t, *_ in spec[1:]]
    statuses = any("status" in r for r in rows)
    lines = ["".join(head) + ("  status" if statuses else "")]
    for r in rows:
        cells = [f"  {fmt(r.get(spec[0][1]), spec[0][2]):<{first}}"]
        cells += [f"{fmt(r.get(k), f, s):>{width(t)}}" for t, k, f, s in spec[1:]]
        lines.append("".join(cells) + (f"  {status(r)}" if statuses else ""))
    return lines


def _sections(results: dict[str, Any]) -> list[str]:
    lines = ["sections (priority order; wall / limit s)"]
    for name, r in results["sections"].items():
        lines.append(f"  {name:<11} {fmt(r['wall_s'], '.0f'):>4} / {fmt(r['limit_s'], '.0f'):<4} {status(r)}")
    return lines


def _train_and_decode(results: dict[str, Any]) -> list[str]:
    predicted = lambda r: ((r.get("predicted") or {}).get("step_time_s") or {}).get("no_overlap")
    lines = ["train (MFU against the device's bf16 peak; predicted: the cost model, no-overlap bound)"]
    lines += columns(
        [r | dict(predicted_ms=predicted(r)) for r in results["train"]],
        [("config", "name", "", 1), ("section", "section", "", 1), ("compile s", "compile_s", ".1f", 1)]
        + [("step ms", "step_time_s", ".1f", 1e3), ("tok/s", "tokens_per_s", ",.0f", 1)]
        + [
            ("MFU", "mfu", ".1%", 1),
            ("goal", "goal_mfu", ".0%", 1),
            ("predicted ms", "predicted_ms", ".1f", 1e3),
        ]
        + [("temps GiB", "temp_bytes", ".2f", 1 / GIB)],
    )
    lines.append(
        "decode (KV cache, prompt + new; floor: weight + cache bytes / the measured copy, and / PyTorch's "
        "4.3 TB/s; goal: x floor)"
    )
    lines += columns(
        results["decode"],
        [("config", "name", "", 1), ("ms/step", "ms_per_step", ".3f", 1), ("floor ms", "floor_ms", ".3f", 1)]
        + [("x floor", "ratio_to_floor", ".2f", 1), ("goal", "goal_ratio", ".1f", 1)]
        + [("x 4.3TB/s", "ratio_to_floor_pytorch", ".2f", 1), ("of copy", "bandwidth_fraction", ".0%", 1)]
        + [("compile s", "compile_s", ".1f", 1)],
    )
    return lines


def _anchor(record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    lines = [f"anchor: {record['command']}" + (f" ({record['note']})" if record.get("note") else "")]
    lines += columns(
        record["comparisons"],
        [("measure", "what", "", 1), ("ours ms", "ours_ms", ".3f", 1), ("anchor ms", "anchor_ms", ".3f", 1)]
        + [("speedup", "speedup", ".2f", 1), ("goal", "goal", ".2f", 1), ("our MFU", "ours_mfu", ".1%", 1)]
        + [("its MFU", "anchor_mfu", ".1%", 1), ("MFU ratio", "mfu_ratio", ".2f", 1)],
    )
    lines[-len(record["comparisons"]) - 1] += " (speedup: its time / ours)"
    return lines


def _planner(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    gib = lambda key: fmt(r.get(key), ".2f", 1 / GIB)
    ratio = lambda key: fmt(r.get(key), ".3f")
    note = f" ({r['live_note']})" if r.get("live_note") else ""
    return [
        f"planner (issue 24, goal within {r['goal']:.0%}): {r['command']}",
        f"  planned total {gib('planned_total_bytes')} GiB (temps {gib('planned_temp_bytes')}); the run's "
        f"compile {gib('compiled_total_bytes')} (temps {gib('compiled_temp_bytes')}); live peak "
        f"{gib('live_peak_bytes')}{note}",
        f"  planned / compiled {ratio('ratio_to_compiled')} (temps {ratio('temp_ratio_to_compiled')}), "
        f"planned / live peak {ratio('ratio_to_live_peak')}; within goal {r.get('within_goal')}",
    ]


def _mock(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    lines = [f"mock topology: {r.get('placement') or r.get('error')}"]
    for row in r.get("rows") or []:
        p = row.get("prediction") or {}
        ms = lambda bound, p=p: fmt((p.get("step_time_s") or {}).get(bound), ".1f", 1e3)
        lines.append(
            f"  {row['name']}: total {fmt(row['compiled']['total_bytes'], '.2f', 1 / GIB)} GiB per device, "
            f"fits {row.get('fits')}; predicted on {p.get('hardware')} {ms('no_overlap')} / "
            f"{ms('full_overlap')} ms (no / full overlap; collectives unvalidated on GPU)"
        )
    return lines


def _cost(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    bounds = ("no_overlap", "full_overlap")
    rows = [
        row
        | {f"{b}_ms": (row.get("predicted_step_s") or {}).get(b) for b in bounds}
        | {f"{b}_err": (row.get("rel_error") or {}).get(b) for b in bounds}
        for row in r["rows"]
    ]
    lines = [f"cost model on {r['hardware']} (issue 28; {r['note']})"]
    lines += columns(
        rows,
        [("config", "name", "", 1), ("measured ms", "measured_step_s", ".1f", 1e3)]
        + [("no overlap", "no_overlap_ms", ".1f", 1e3), ("error", "no_overlap_err", "+.0%", 1)]
        + [("full overlap", "full_overlap_ms", ".1f", 1e3), ("error", "full_overlap_err", "+.0%", 1)]
        + [("binds", "binding", "", 1)],
    )
    median = lambda bound: fmt((r.get("median_abs_error") or {}).get(bound), ".0%")
    lines.append(
        f"  median |error| over {r.get('configs')} configs: no overlap {median('no_overlap')}, full "
        f"{median('full_overlap')} (goal {r['goal_abs_error']:.0%})"
    )
    return lines


def _xl(r: dict[str, Any] | None, results: dict[str, Any]) -> list[str]:
    if not r:
        return []
    train = next((t for t in results["train"] if t["name"] == r.get("train")), {})
    decode = next((d for d in results["decode"] if d["name"] == r.get("decode")), {})
    tried = "; ".join(f"{t['name']}: {status(t)}" for t in r["tried"])
    return [
        f"{r['model']}: train {r.get('train')} MFU {fmt(train.get('mfu'), '.1%')} (goal "
        f"{r['goal_mfu']:.0%}); tried {tried}",
        f"  decode b1: {fmt(decode.get('ms_per_step'), '.3f')} ms/step, bytes moved at "
        f"{fmt(decode.get('bandwidth_fraction'), '.0%')} of the copy bandwidth (goal "
        f"{r['goal_bandwidth_fraction']:.0%})  {status(decode) if decode else ''}",
    ]


def _levers(r: dict[str, Any] | None) -> list[str]:
    if not r:
        return []
    note = f"; {r['note']}" if r.get("note") else ""
    lines = [f"levers (issue 30: each variant beside this run's figure; speedup = that / the variant{note})"]
    rows = [row | dict(what=f"{row['lever']}: {row['config']}") for row in r["rows"]]
    lines += columns(
        rows,
        [("lever: config", "what", "", 1), ("baseline ms", "baseline_ms", ".3f", 1)]
        + [("variant ms", "variant_ms", ".3f", 1), ("speedup", "speedup", ".2f", 1)],
    )
    for row in rows:
        warned = ((row.get("variant") or {}).get("warnings") or [""])[0][:90].rstrip()  # PGLE's empty profile
        lines.append(f"    {row['what']}: {row['settings']}; predicted {row['predicted']}")
        lines += [f"      the variant warned: {warned}"] if warned else []
    return lines


def table(results: dict[str, Any]) -> str:
    """The human summary of one run."""
    m, bw, naive = results["meta"], results["copy_bandwidth_bytes_per_s"], results["naive"]
    out = [
        f"gpu_bench: {m['model']} ({m['n_params'] / 1e6:.2f}M params), {m['device_kind']}, jax "
        f"{m['jax_version']}, seq {m['seq']}, {m['dtype']}, {m['date']}",
        *_sections(results),
        f"copy bandwidth (measured, read + write): {fmt(bw, '.4g', 1e-9)} GB/s",
        *_train_and_decode(results),
        *_anchor(results["anchor"]),
        *_planner(results["planner"]),
        *_mock(results["mock"]),
        *_cost(results["cost_model"]),
        *_xl(results["xl"], results),
        *_levers(results.get("levers")),
    ]
    if naive:
        out.append(
            f"naive generator, batch 1: {fmt(naive['s_per_token'], '.3f')} s/token over "
            f"{fmt(naive['tokens'], 'd')} tokens (compile included)  {status(naive)}"
        )
    out.append(f"wall {m['wall_s']:.0f} s of a {m['budget_s']:.0f} s budget")
    return "\n".join(out)
