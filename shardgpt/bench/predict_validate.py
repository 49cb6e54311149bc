"""Validate the cost model on this CPU: predict each config with the cpu profile (calibrated by
shardgpt.bench.cpu_calibrate's microbenchmarks only), then train it with the lab's runner and compare.

Prints one row per config (predicted bounds, measured median step time, error) and Spearman's rho between
predicted and measured step times; writes the rows as JSON to the path given (default /tmp/validate.json).
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np

from shardgpt.analysis import cost, hardware
from shardgpt.lab import plan, runner

MESHES = ("dp=8", "dp=2,tp=4", "dp=4,tp=2", "tp=8")
STRATEGIES = ("dp", "zero3")
MICROBATCHES = (1, 2)


def spearman(a, b) -> float:
    """Spearman's rank correlation (no ties expected among timings)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None, model: str = "gpt-micro", steps: int = 30) -> int:
    """Predict, then run, every config; argv: [the JSON file to write] (default /tmp/validate.json)."""
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else "/tmp/validate.json"
    cluster = hardware.cluster("cpux8")
    rows = []
    for mesh in MESHES:
        for strategy in STRATEGIES:
            for m in MICROBATCHES:
                spec = runner.RunSpec(mesh=mesh, strategy=strategy, microbatches=m, model=model, steps=steps)
                try:
                    s = runner.prepare(spec)
                except ValueError as e:  # e.g. gpt-micro's 4 heads on tp=8
                    print(f"skipped {mesh} {strategy} M={m}: {str(e).splitlines()[0]}", flush=True)
                    continue
                seq = s.task.seq_len
                lowered = plan.lower_step(s.make_step, s.model, s.tx, s.mesh, s.strategy, spec.batch, seq, m)
                p = cost.predict(
                    lowered.compile().as_text(), s.config, s.strategy, dict(s.mesh.shape), spec.batch, seq,
                    m, cluster,
                )  # fmt: skip
                measured = runner.run(spec, progress=False)["step_time_s"]
                row = {
                    "name": runner.run_name(spec),
                    "predicted_no_overlap_s": p["step_time_s"]["no_overlap"],
                    "predicted_full_overlap_s": p["step_time_s"]["full_overlap"],
                    "terms_s": p["terms_s"],
                    "binding": p["binding"],
                    "measured_s": measured,
                }
                rows.append(row)
                print(
                    f"{row['name']:24s} none {1e3 * row['predicted_no_overlap_s']:7.2f} ms  full "
                    f"{1e3 * row['predicted_full_overlap_s']:7.2f} ms  measured {1e3 * measured:7.2f} ms  "
                    f"binds {p['binding']}",
                    flush=True,
                )
    measured = [r["measured_s"] for r in rows]
    for bound in ("no_overlap", "full_overlap"):
        predicted = [r[f"predicted_{bound}_s"] for r in rows]
        errors = [p / m - 1 for p, m in zip(predicted, measured, strict=True)]
        print(
            f"{bound}: Spearman rho {spearman(predicted, measured):.3f}, median |error| "
            f"{100 * np.median(np.abs(errors)):.0f}%"
        )
    with open(out, "w") as f:
        json.dump({"model": model, "steps": steps, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
