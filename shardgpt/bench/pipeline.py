"""The pipeline's bubble, measured: GPipe (pp=2 and pp=4) at M = pp, 2 pp and 4 pp microbatches of one
fixed size, so every tick does the same work and the step time's slope over ticks is the tick time.

    python experiments/pipeline_bench.py [--rows 2] [--steps 15] [--out results/pipeline]

Prints, per run, the bubble's theory (pp - 1) / (M + pp - 1) beside the measured (pp - 1) x tick time /
step time (shardgpt.lab.report.pipeline_bubbles), and writes results.json. gpt-pico with 4 layers on the sort
task, dp = 8 / pp simulated CPU devices (or the accelerators present).
"""

import argparse
import os
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="experiments/pipeline_bench.py", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=2, help="rows per microbatch on each dp shard (default 2)")
    p.add_argument("--steps", type=int, default=15, help="steps per run (the first 5 are warm-up)")
    p.add_argument("--pp", default="2,4", help="pipeline sizes, a comma list (default 2,4)")
    p.add_argument("--out", default="results/pipeline", metavar="DIR")
    args = p.parse_args(argv)
    if args.rows < 1 or args.steps < 6:
        p.error("--rows must be >= 1 and --steps >= 6 (5 warm-up steps are left out of the timing)")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()

    import jax

    from shardgpt.lab import report, runner

    runs = []
    for pp in (int(x) for x in args.pp.split(",")):
        dp = jax.device_count() // pp
        for m in (pp, 2 * pp, 4 * pp):
            spec = runner.RunSpec(
                mesh=f"pp={pp},dp={dp}", impl="shard_map", strategy="dp", model="gpt-pico",
                overrides=(("n_layer", "4"),), batch=m * args.rows * dp, microbatches=m, steps=args.steps,
            )  # fmt: skip
            try:
                runner.prepare(spec)
            except ValueError as e:
                p.error(str(e))
            result = runner.run(spec, progress=False)
            print(f"{result['name']}: step {1e3 * result['step_time_s']:.2f} ms", file=sys.stderr)
            runs.append(result)
    bubbles = report.pipeline_bubbles(runs)
    print("\n".join(report.bubble_table(bubbles)))
    command = shlex.join(["python", "experiments/pipeline_bench.py", *(argv or sys.argv[1:])])
    results = {"meta": runner.meta(command), "runs": runs, "pipeline_bubbles": bubbles}
    print(f"wrote {report.write(results, args.out, plots=False)[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
