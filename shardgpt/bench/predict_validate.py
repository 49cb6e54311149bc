"""Validate the cost model on this CPU: predict each config with the cpu profile (calibrated by
shardgpt.bench.cpu_calibrate's microbenchmarks only), then train it with the lab's runner and compare.

The host may be shared, so each config is measured in --rounds rounds (default 2), each round in a fresh
random order (another process's load then falls on different configs each round): a config's measured step
time is the least of its rounds' medians, and Spearman's rho between two rounds is the measurement's own
repeatability, the ceiling for any model's rho. Prints one row per config (predicted bounds, each round,
error) and rho; writes the rows as JSON to --out. Run it on a quiet machine: under load the rounds disagree.
"""

import argparse
import json
import os
import random
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np

from shardgpt.analysis import cost, hardware
from shardgpt.lab import plan, runner
from shardgpt.model import config

MESHES = ("dp=8", "dp=2,tp=4", "dp=4,tp=2", "tp=8")
STRATEGIES = ("dp", "zero3")
MICROBATCHES = (1, 2)
ROUNDS = 2


def spearman(a, b) -> float:
    """Spearman's rank correlation (no ties expected among timings)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def predicted(spec: runner.RunSpec, cluster: hardware.Cluster) -> dict:
    """The cost model's prediction for one config, from its step compiled (nothing runs)."""
    s = runner.prepare(spec)
    seq, m = s.task.seq_len, spec.microbatches
    lowered = plan.lower_step(s.make_step, s.model, s.tx, s.mesh, s.strategy, spec.batch, seq, m)
    return cost.predict(
        lowered.compile().as_text(), s.config, s.strategy, dict(s.mesh.shape), spec.batch, seq, m, cluster
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, each checked before any jax work."""
    p = argparse.ArgumentParser(
        prog="experiments/predict_validate.py", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    p.add_argument("--model", default="gpt-micro", help="a preset (default gpt-micro)")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"measurements per config (default {ROUNDS})")
    p.add_argument("--out", default="/tmp/validate.json", help="where the rows go, as JSON")
    args = p.parse_args(argv)
    if args.model not in config.PRESETS:
        p.error(f"--model takes a preset ({', '.join(config.PRESETS)}), got {args.model!r}")
    if args.steps < 2 or args.rounds < 1:
        p.error(f"--steps must be >= 2 and --rounds >= 1, got {args.steps} and {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Predict every config, then run each in --rounds shuffled rounds."""
    args = parse_args(argv)
    model, steps, rounds_n, out = args.model, args.steps, args.rounds, args.out
    cluster = hardware.cluster("cpux8")
    specs, rows = [], []
    for mesh in MESHES:
        for strategy in STRATEGIES:
            for m in MICROBATCHES:
                spec = runner.RunSpec(mesh=mesh, strategy=strategy, microbatches=m, model=model, steps=steps)
                try:
                    p = predicted(spec, cluster)
                except ValueError as e:  # e.g. gpt-micro's 4 heads on tp=8
                    print(f"skipped {mesh} {strategy} M={m}: {str(e).splitlines()[0]}", flush=True)
                    continue
                specs.append(spec)
                rows.append(
                    {
                        "name": runner.run_name(spec),
                        "predicted_no_overlap_s": p["step_time_s"]["no_overlap"],
                        "predicted_full_overlap_s": p["step_time_s"]["full_overlap"],
                        "terms_s": p["terms_s"],
                        "binding": p["binding"],
                        "measured_rounds_s": [],
                    }
                )
    order = random.Random(0)
    for r in range(rounds_n):
        for i in order.sample(range(len(specs)), len(specs)):
            measured = runner.run(specs[i], progress=False)["step_time_s"]
            rows[i]["measured_rounds_s"].append(measured)
            print(f"round {r + 1}: {rows[i]['name']:24s} measured {1e3 * measured:7.2f} ms", flush=True)
    for row in rows:
        row["measured_s"] = min(row["measured_rounds_s"])
        rounds = "  ".join(f"{1e3 * t:7.2f}" for t in row["measured_rounds_s"])
        print(
            f"{row['name']:24s} none {1e3 * row['predicted_no_overlap_s']:7.2f} ms  full "
            f"{1e3 * row['predicted_full_overlap_s']:7.2f} ms  measured (rounds) {rounds} ms  binds "
            f"{row['binding']}"
        )
    measured = [r["measured_s"] for r in rows]
    rounds = [[r["measured_rounds_s"][k] for r in rows] for k in range(rounds_n)]
    if rounds_n > 1:
        repeat = spearman(rounds[0], rounds[1])
        print(f"measurement repeatability: Spearman rho {repeat:.3f} between rounds 1 and 2")
    for bound in ("no_overlap", "full_overlap"):
        predicted_s = [r[f"predicted_{bound}_s"] for r in rows]
        errors = [p / m - 1 for p, m in zip(predicted_s, measured, strict=True)]
        print(
            f"{bound}: Spearman rho {spearman(predicted_s, measured):.3f} (against the least of the rounds), "
            f"median |error| {100 * np.median(np.abs(errors)):.0f}%"
        )
    with open(out, "w") as f:
        json.dump({"model": model, "steps": steps, "rounds": rounds_n, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
