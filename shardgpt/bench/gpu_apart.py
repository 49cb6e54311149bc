"""The one-GPU benchmark's sections that run another process: the plain-JAX anchor (a script outside the
project, run beside ours with the same configs), the planner's figures against the same step compiled and
run live (a fresh process, so no earlier measurement sets the memory peak), and plans compiled for a mock
GPU topology (which restarts jax's backends, so it cannot share this process). The last two are
gpu_child.py's jobs; the planner's runs in this process where the device keeps no peak (a CPU).

On a GPU this process holds jax's preallocated 75% of the memory; the others run with preallocation off,
in what it leaves. Nothing here imports the anchor: it only runs, and its JSON is read.
"""

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import shardgpt
from shardgpt.analysis import hardware, metrics
from shardgpt.bench import gpu_child
from shardgpt.bench.gpu_run import Run, Skipped, read_json, run_process
from shardgpt.bench.gpu_sections import Context, find, headline_config, train_row

ANCHOR = "gpu_ref.py"
CHECKOUT = Path(shardgpt.__file__).resolve().parents[1]
# A session copies the anchor into the ignored .anchors/ (`make anchors`), which a device machine's copy of
# the checkout carries; ../shared/ is where it lives beside a checkout.
ANCHOR_PLACES = (CHECKOUT / ".anchors" / ANCHOR, CHECKOUT.parent / "shared" / "anchors" / ANCHOR)
MOCK_MESHES = ("dp=8", "dp=2,tp=4")  # more devices than one GPU host has: h200x8-like
GOAL_PLANNER = 0.10  # issue 24: the planner within 10% of the compiled program and of the live peak
GOAL_ANCHOR_TRAIN = 1.11  # issue 30: ahead of the anchor by this much in training MFU
GOAL_ANCHOR_DECODE = 1.0  # and no slower in decode
CHILD = ("-m", "shardgpt.bench.gpu_child")  # the child's entry after the interpreter (a test's fake swaps in)
PROCESS_WHY = dict(
    planner="a fresh peak",
    mock="it clears jax's backends",
    lever="XLA's flags and jax's options are read once per process",
)


def find_anchor(given: str | None) -> tuple[Path | None, str]:
    """(the anchor script, or None and why not): --anchor's path, else the first of ANCHOR_PLACES."""
    places = [Path(given)] if given else list(ANCHOR_PLACES)
    found = next((p for p in places if p.is_file()), None)
    why = f"no plain-JAX anchor at {' or '.join(str(p) for p in places)}: a clone without it skips this"
    return (
        found,
        "" if found else why + " (`make anchors` copies ../shared/anchors/gpu_ref.py where it exists)",
    )


def _check_time(run: Run, ctx: Context) -> float:
    left = run.left_s()
    if left < ctx.s.child_s:
        raise Skipped(f"{left:.0f} s left, under the {ctx.s.child_s:.0f} s worth starting a process with")
    return left


FATAL = ("Illegal value", "Unknown flag")  # XLA's words for a bad XLA_FLAGS, atop its usage listing


def _ended(status: int | None, tail: str, left: float, what: str, log: Path | None = None) -> str | None:
    """None for a clean exit; else why the process ended: XLA's complaint about its flags where `log` has
    one (its usage listing follows it), else the output's last line."""
    if status is None:
        return f"{what} killed at its {left:.0f} s limit; what it had written is kept"
    if status == 0:
        return None
    lines = log.read_text(errors="replace").splitlines() if log and log.exists() else []
    last = next((ln for ln in lines if any(f in ln for f in FATAL)), tail.splitlines()[-1] if tail else "")
    return f"{what} exited {status}: {last.strip()[:200]}"


def anchor(run: Run, ctx: Context):
    """The anchor at the headline's configs (train unrolled at the headline batch with its attention; the
    stacked-cache decoder at each decode batch), its figures beside ours with the ratio."""
    path, why = find_anchor(ctx.anchor)
    if path is None:
        raise Skipped(why)
    s, left = ctx.s, _check_time(run, ctx)
    command = [sys.executable, str(path), "--unroll", "--attn", ctx.head_attention, "--cache", "stacked"]
    command += ["--skip-naive", "--batch", str(s.headline_batches[0]), "--seq", str(s.seq)]
    command += ["--decode-batch", ",".join(map(str, s.decode_batches)), "--prompt-len", str(s.prompt_len)]
    budget = f"{0.75 * left:.0f}"  # its own clock: no part starts past it, so one in flight has time to end
    command += ["--decode-tokens", str(s.new_tokens), "--budget", budget]
    peak = metrics.peak_flops(ctx.device.device_kind)
    command += (["--peak-tflops", f"{peak / 1e12:g}"] if peak else []) + (["--tiny"] if ctx.tiny else [])
    record = dict(path=str(path), command=shlex.join(command), returncode=None, result=None, comparisons=[])
    record["note"] = "tiny: the anchor's toy model is not ours; the ratios mean nothing" if ctx.tiny else None
    run.results["anchor"] = record
    written = ctx.out / "gpu_ref.json"  # the anchor writes $OUT/gpu_ref.json after every part
    written.unlink(missing_ok=True)
    env = ctx.env | dict(OUT=str(ctx.out), XLA_PYTHON_CLIENT_PREALLOCATE="false")
    status, tail = run_process(command, env, left, ctx.out / "anchor.log")
    record["returncode"] = status
    record["result"] = read_json(written)
    record["comparisons"] = compare(run.results, record["result"], ctx)
    run.save()
    ended = _ended(status, tail, left, "the anchor")
    if ended:
        raise RuntimeError(ended)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(results: dict[str, Any], ref: dict[str, Any] | None, ctx: Context) -> list[dict[str, Any]]:
    """Ours beside the anchor's: train ms/step and MFU at the headline config, decode ms/step at each batch;
    speedup = the anchor's time / ours (above 1: ours is faster)."""
    if not ref:
        return []
    out = []
    ours = find(results["train"], headline_config(ctx, ctx.s.headline_batches[0]).name) or {}
    theirs = next((t for t in ref.get("train", []) if t.get("attn") == ctx.head_attention), {})
    ours_ms = ours["step_time_s"] * 1e3 if ours.get("step_time_s") else None
    out.append(
        dict(
            what=f"train {ours.get('name')}", ours_ms=ours_ms, anchor_ms=theirs.get("step_ms"),
            speedup=_ratio(theirs.get("step_ms"), ours_ms), ours_mfu=ours.get("mfu"),
            anchor_mfu=theirs.get("mfu_peak"), mfu_ratio=_ratio(ours.get("mfu"), theirs.get("mfu_peak")),
            goal=GOAL_ANCHOR_TRAIN, anchor_error=theirs.get("error"),
        )
    )  # fmt: skip
    for batch in ctx.s.decode_batches:
        ours = find(results["decode"], f"{ctx.s.model} b{batch}") or {}
        decoded = (
            d for d in ref.get("decode", []) if d.get("batch") == batch and d.get("cache") == "stacked"
        )
        theirs = next(decoded, {})
        out.append(
            dict(
                what=f"decode b{batch}", ours_ms=ours.get("ms_per_step"), anchor_ms=theirs.get("ms_per_step"),
                speedup=_ratio(theirs.get("ms_per_step"), ours.get("ms_per_step")),
                ours_x_floor=ours.get("ratio_to_floor"), anchor_x_floor=theirs.get("vs_floor"),
                goal=GOAL_ANCHOR_DECODE, anchor_error=theirs.get("error"),
            )
        )  # fmt: skip
    return out


def run_child(
    run: Run,
    ctx: Context,
    job: str,
    argv: list[str],
    steps: int = 0,
    name: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """gpu_child.py's `job` on `argv` (run.py's --plan flags; a lever's spec) under what is left of the
    section, its result and log named `name` (default: the job), in `env` (default: ours, our XLA flags
    included); its result (rewritten by the child as it goes), with status error, the reason and the log's
    tail where it ended badly."""
    left, name = _check_time(run, ctx), name or job
    result, log = ctx.out / f"{name}.json", ctx.out / f"{name}.log"
    result.unlink(missing_ok=True)
    command = [sys.executable, *CHILD, job, str(result), "--steps", str(steps)]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT), env.get("PYTHONPATH")) if p)
    status, tail = run_process([*command, "--", *argv], env, left, log)
    data = read_json(result) or {}
    data["process"] = "another process: " + PROCESS_WHY[job]
    ended = _ended(status, tail, left, f"the {name} process", log)
    if ended:
        data |= dict(status="error", error=ended, log_tail=tail)
    return data


def plan_flags(ctx: Context, batch: int, scan: bool) -> list[str]:
    """run.py --plan's flags for the run's model, strategy dp, in bf16 (the caller adds the meshes). Its
    output checks pass wherever this run writes: --out is ours, no plots (a GPU image has no matplotlib)."""
    argv = ["--plan", "--model", ctx.s.model, "--strategy", "dp", "--batch", str(batch)]
    argv += ["--seq", str(ctx.s.seq), "--dtype", "bfloat16", "--scan" if scan else "--no-scan"]
    argv += ["--out", str(ctx.out), "--no-plots"]
    return argv + [f"--model.{k}={v}" for k, v in ctx.s.overrides]


def planner(run: Run, ctx: Context):
    """Issue 24's like-for-like: run.py --plan's figures for the headline config on this device, against the
    same step as the benchmark compiled it (its memory_analysis) and its live peak in a fresh process."""
    tc = headline_config(ctx, ctx.s.headline_batches[0])
    ours = train_row(run, ctx, tc, "planner")  # the run's own compile: the headline's, reused
    name = "cpu" if ctx.device.platform == "cpu" else hardware.for_device_kind(ctx.device.device_kind)
    argv = plan_flags(ctx, tc.batch, tc.layers == "scan") + ["--mesh", "dp=1", "--attention", tc.attention]
    argv += ["--target", name] if name else []
    record = dict(command="experiments/run.py " + shlex.join(argv), config=tc.name, goal=GOAL_PLANNER)
    run.results["planner"] = record
    steps = max(ctx.s.warmup, 2)  # the peak is the first step's
    if metrics.device_peak_bytes(ctx.device) is None:  # no peak to keep clean (CPU): this process will do
        child = gpu_child.run_job("planner", argv, steps) | dict(process="this one: the device keeps no peak")
    else:
        child = run_child(run, ctx, "planner", argv, steps)
    record["child"] = child
    planned = (child.get("plan") or {}).get("compiled") or {}
    compiled, peak = ours.get("memory") or {}, child.get("live_peak_bytes")
    record["planned_total_bytes"], record["planned_temp_bytes"] = (
        planned.get(k) for k in ("total_bytes", "temp_bytes")
    )
    record["compiled_total_bytes"], record["compiled_temp_bytes"] = (
        compiled.get(k) for k in ("total_bytes", "temp_bytes")
    )
    record["live_peak_bytes"], record["live_note"] = peak, child.get("live_note")
    record["ratio_to_compiled"] = _ratio(planned.get("total_bytes"), compiled.get("total_bytes"))
    record["temp_ratio_to_compiled"] = _ratio(planned.get("temp_bytes"), compiled.get("temp_bytes"))
    record["ratio_to_live_peak"] = _ratio(planned.get("total_bytes"), peak)
    record["within_goal"] = {
        what: None if r is None else abs(r - 1) <= GOAL_PLANNER
        for what, r in (
            ("compiled", record["ratio_to_compiled"]),
            ("live_peak", record["ratio_to_live_peak"]),
        )
    }
    if child.get("status") != "ok":
        raise RuntimeError(child.get("error") or "the planner process wrote no result")


def mock(run: Run, ctx: Context):
    """run.py --plan for meshes larger than this host (MOCK_MESHES): jax_mock_gpu_topology's path
    (lab/target.py); each plan's memory, and the cost model's prediction from the GPU's collectives."""
    batch = max(8, ctx.s.headline_batches[0])  # dp=8 splits it
    argv = plan_flags(ctx, batch, scan=True) + [a for m in MOCK_MESHES for a in ("--mesh", m)]
    record = dict(command="experiments/run.py " + shlex.join(argv), note=None)
    run.results["mock"] = record
    record |= run_child(run, ctx, "mock", argv)
    if record.get("status") == "skipped":
        raise Skipped(record["error"])
    if record.get("status") != "ok":
        raise RuntimeError(record.get("error") or "the mock process wrote no result")
