"""Checkpoint costs: save (async vs blocking), bytes, restore, and the step time lost to saving every K steps.

    python experiments/checkpoint_bench.py --models gpt-mini,gpt2 --mesh dp=8 --strategy zero3 --out DIR
    python experiments/checkpoint_bench.py --models gpt2 --mesh dp=1 --out DIR   # one device

Per model, in one process: train --steps without saving, then --steps saving every --every steps through
shardgpt.io.checkpoint.SaveEvery (async), --rounds times, and compare the wall time of the same number of
steps; then time Checkpointer.save on the trained state (Adam's moments are no longer zeros, which would
compress to nothing), async and blocking, and restore it into train.abstract_state's layout. All times are
wall-clock."""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from shardgpt.cli import flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/checkpoint_bench.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default="gpt-mini,gpt2", help="comma list of presets")
    p.add_argument("--mesh", default="dp=8", help="one mesh; its size sets the simulated CPU devices")
    p.add_argument("--strategy", default="zero3", help="dp, zero1, zero2, zero3 (or fsdp)")
    p.add_argument("--task", default="chars:README.md", help="sort, chars:PATH or bin:DIR")
    p.add_argument("--seq", type=int, default=64, help="sequence length of a chars/bin task")
    p.add_argument("--batch", type=int, default=8, help="global batch size")
    p.add_argument(
        "--vocab-size", type=int, help="override the task's vocabulary (50257: GPT-2's real 124M params)"
    )
    p.add_argument("--steps", type=int, default=40, help="steps per segment, with and without saving")
    p.add_argument("--every", type=int, default=10, help="save every K steps in the saving segments")
    p.add_argument("--rounds", type=int, default=1, help="(no-save, save) segment pairs, interleaved")
    p.add_argument("--repeats", type=int, default=3, help="timed saves and restores per mode (median)")
    p.add_argument("--ckpt-root", help="where checkpoints are written (default: a temporary directory)")
    p.add_argument("--out", metavar="DIR", help="write DIR/checkpoint_bench.json")
    p.add_argument("--show", metavar="JSON", help="print the tables of an earlier run's JSON; run nothing")
    return p


def simulated_devices(mesh: str) -> int:
    """The device count a mesh spec names ("dp=2,tp=4" -> 8); runner.prepare wants a mesh of them all."""
    sizes = [int(v) for v in re.findall(r"=\s*(-?\d+)", mesh)]
    if not sizes or any(v < 1 for v in sizes):
        raise ValueError(f"--mesh {mesh!r}: give every axis an explicit size, e.g. dp=8")
    return math.prod(sizes)


def dir_bytes(path: Path) -> int:
    """Apparent size of every file under `path` (what `du -sb` reports)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train_segment(step_fn, state, batch_for, tokens_per_step: int, steps: int, callbacks=()):
    """Train `steps` steps from state.step; returns (state, wall seconds, per-step intervals in seconds)."""
    import jax

    from shardgpt.training import loop

    trainer = loop.Trainer(step_fn, state, batch_for, tokens_per_step, callbacks, progress=False)
    t0 = time.perf_counter()
    state = jax.block_until_ready(trainer.run(steps))
    wall = time.perf_counter() - t0
    # The Trainer reads step t's metrics after dispatching t+1: each interval is one step of the pipeline.
    return state, wall, [tokens_per_step / h["tokens_per_s"] for h in trainer.history]


class TimedSaves:
    """A Checkpointer whose save() calls are timed: the part of an async save the training loop waits for
    (the finiteness check, the device-to-host copy, and any earlier save still writing)."""

    def __init__(self, checkpointer):
        self.checkpointer, self.seconds = checkpointer, []

    def save(self, state, description, loss=None) -> int:
        t0 = time.perf_counter()
        step = self.checkpointer.save(state, description, loss)
        self.seconds.append(time.perf_counter() - t0)
        return step


def bench_overhead(step_fn, state, batch_for, tokens_per_step, description, args, root: Path):
    """The same number of steps without and with SaveEvery (async), interleaved; returns (state, figures)."""
    from shardgpt.io import checkpoint

    ckpt = checkpoint.Checkpointer(root / "train", keep=3, async_save=True)
    timed = TimedSaves(ckpt)
    walls = {"none": [], "async": []}
    # A save's host time lands in the interval of the step after it (the Trainer's clock is read before
    # the callbacks run), so those intervals are kept apart from the others.
    intervals = {"none": [], "async": [], "async_after_save": []}
    drain = []
    for _ in range(args.rounds):
        state, wall, steps = train_segment(step_fn, state, batch_for, tokens_per_step, args.steps)
        walls["none"].append(wall)
        intervals["none"] += steps
        first = int(state.step)
        saver = checkpoint.SaveEvery(timed, args.every, description)
        state, wall, steps = train_segment(step_fn, state, batch_for, tokens_per_step, args.steps, [saver])
        walls["async"].append(wall)
        for step, seconds in enumerate(steps, start=first):
            intervals["async_after_save" if saver.wants_state(step - 1) else "async"].append(seconds)
        # The last save may still be writing: finish it outside both timings, or it slows the next no-save
        # segment. Reported: a real run would overlap it with the steps that follow.
        t0 = time.perf_counter()
        ckpt.wait()
        drain.append(time.perf_counter() - t0)
    ckpt.close()
    none, saving, in_loop = sum(walls["none"]), sum(walls["async"]), sum(timed.seconds)
    return state, {
        "steps_per_segment": args.steps,
        "every": args.every,
        "rounds": args.rounds,
        "saves": len(timed.seconds),
        "wall_s": walls,
        "save_calls_s": timed.seconds,
        # What is neither a step nor a save call: the pipeline bubble at each save step and the background
        # write competing with the steps for the CPU.
        "other_s": saving - none - in_loop,
        "drain_after_segment_s": drain,
        "step_intervals_s": intervals,
        "median_step_s": {k: statistics.median(v) for k, v in intervals.items() if v},
        "overhead": saving / none - 1,  # total wall time of the same number of steps
        # Per (no-save, saving) pair: a burst of another job on the 2 cores shows as one outlying round.
        "overhead_per_round": [b / a - 1 for a, b in zip(walls["none"], walls["async"], strict=True)],
    }


def bench_saves(state, description, root: Path, repeats: int) -> tuple[dict, Path]:
    """Save `state` `repeats` times per mode into fresh directories; returns (figures, a checkpoint dir)."""
    from shardgpt.io import checkpoint

    step, figures, kept = int(state.step), {}, None
    # "unverified": async without the per-leaf checksums (their cost is the difference from "async").
    for mode in ("async", "blocking", "unverified"):
        returned, on_disk, disk = [], [], []
        for r in range(repeats):
            where = root / f"{mode}-{r}"
            ckpt = checkpoint.Checkpointer(
                where, keep=1, async_save=mode != "blocking", verify=mode != "unverified"
            )
            t0 = time.perf_counter()
            ckpt.save(state, description)
            returned.append(time.perf_counter() - t0)  # async: after the device-to-host copy
            ckpt.wait()
            on_disk.append(time.perf_counter() - t0)  # orbax's commit done (files renamed in place)
            disk.append(dir_bytes(where / str(step)))
            ckpt.close()
            # Keep one checkpoint with checksums to restore, not every copy.
            if mode == "unverified" or kept is not None:
                shutil.rmtree(where if mode == "unverified" else kept)
            if mode != "unverified":
                kept = where
        figures[mode] = {
            "return_s": statistics.median(returned),
            "on_disk_s": statistics.median(on_disk),
            "return_s_all": returned,
            "on_disk_s_all": on_disk,
            "disk_bytes": statistics.median(disk),
        }
    return figures, kept


def bench_restore(s, state, where: Path, repeats: int) -> dict:
    """Restore the checkpoint in `where` into the current mesh's layout, `repeats` times; check it."""
    import jax
    import numpy as np

    from shardgpt.io import checkpoint
    from shardgpt.training import train

    times, same = {True: [], False: []}, None
    for _ in range(repeats):
        for verify in (True, False):  # verified: each leaf's checksum recomputed and compared
            ckpt = checkpoint.Checkpointer(where, read_only=True, verify=verify)
            target, _ = train.abstract_state(s.model, s.tx, s.mesh, s.strategy)
            t0 = time.perf_counter()
            restored = jax.block_until_ready(ckpt.restore(target, int(state.step)))
            times[verify].append(time.perf_counter() - t0)
            ckpt.close()
            if same is None:
                pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
                same = all(a.sharding == b.sharding and np.array_equal(a, b) for a, b in pairs)
            del restored
    return {
        "restore_s": statistics.median(times[True]),
        "restore_s_all": times[True],
        "restore_unverified_s": statistics.median(times[False]),
        "equal_to_saved": same,
    }


def make_setup(model: str, args):
    """runner.prepare's setup for one model: ValueError on a bad flag, before anything compiles."""
    from shardgpt.lab import runner

    overrides = (("vocab_size", str(args.vocab_size)),) if args.vocab_size else ()
    spec = runner.RunSpec(
        mesh=args.mesh, strategy=args.strategy, model=model, overrides=overrides, task=args.task,
        seq=None if args.task == "sort" else args.seq, steps=1 + 2 * args.rounds * args.steps,
        batch=args.batch, dtype="float32",
    )  # fmt: skip
    return runner.prepare(spec)


def bench_model(model: str, s, args, root: Path) -> dict:
    import jax

    from shardgpt.io import checkpoint
    from shardgpt.parallel import sharding
    from shardgpt.training import data, train

    state, shardings = train.init_state(s.model, s.tx, s.mesh, s.strategy)
    step_fn = s.make_step(s.model, s.tx, s.mesh, s.strategy, shardings)
    batch_sharding = sharding.batch_sharding(s.mesh, s.strategy)
    batch_for = lambda i: data.global_batch(s.task, i, args.batch, batch_sharding, s.config.vocab_size)
    tokens_per_step = args.batch * s.task.seq_len
    description = {
        "model": dataclasses.asdict(s.config),
        "strategy": s.strategy,
        "mesh": args.mesh,
        "task": args.task,
        "seq": s.task.seq_len,
        "batch": args.batch,
    }
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    print(
        f"{model}: {s.config.n_params() / 1e6:.1f}M params, state {state_bytes / 2**20:.0f} MiB", flush=True
    )

    # One-time costs a long run pays once, kept out of the timings: the step's compile (a 1-step segment),
    # the finiteness check's compile and orbax's first save (thread pools, metadata).
    state, compile_s, _ = train_segment(step_fn, state, batch_for, tokens_per_step, 1)
    checkpoint.is_finite(state)
    warm = checkpoint.Checkpointer(root / "warmup", keep=1)
    warm.save(state, description)
    warm.close()
    shutil.rmtree(root / "warmup")

    state, overhead = bench_overhead(step_fn, state, batch_for, tokens_per_step, description, args, root)
    shutil.rmtree(root / "train")
    saves, kept = bench_saves(state, description, root, args.repeats)
    restore = bench_restore(s, state, kept, args.repeats)
    shutil.rmtree(kept)
    return {
        "model": model,
        "n_params": s.config.n_params(),
        "vocab_size": s.config.vocab_size,
        "mesh": args.mesh,
        "strategy": s.strategy,
        "batch": args.batch,
        "seq": s.task.seq_len,
        "state_bytes": state_bytes,
        "first_step_s": compile_s,
        "save": saves,
        "restore": restore,
        "overhead": overhead,
    }


def print_tables(results: list[dict]):
    mib = lambda b: f"{b / 2**20:,.1f}"
    head = (
        f"{'model':<9} {'params':>7} {'state MiB':>10} {'disk MiB':>9} {'async ret s':>11} "
        f"{'async disk s':>12} {'blocking s':>10} {'restore s':>9} {'restored':>8} "
        f"{'unverified: async ret s':>23} {'restore s':>9}"
    )
    print(
        f"\nsave and restore, mesh {results[0]['mesh']} {results[0]['strategy']}, median of the repeats "
        "(unverified: without the per-leaf checksums, whose cost is the difference)"
    )
    print(head + "\n" + "-" * len(head))
    for r in results:
        a, b = r["save"]["async"], r["save"]["blocking"]
        print(
            f"{r['model']:<9} {r['n_params'] / 1e6:>6.1f}M {mib(r['state_bytes']):>10} "
            f"{mib(b['disk_bytes']):>9} {a['return_s']:>11.3f} {a['on_disk_s']:>12.3f} "
            f"{b['on_disk_s']:>10.3f} {r['restore']['restore_s']:>9.3f} "
            f"{'equal' if r['restore']['equal_to_saved'] else 'DIFFERS':>8} "
            f"{r['save']['unverified']['return_s']:>23.3f} {r['restore']['restore_unverified_s']:>9.3f}"
        )
    head = (
        f"{'model':<9} {'batch x seq':>11} {'steps':>5} {'saves':>5} {'no-save s':>9} {'saving s':>8} "
        f"{'overhead':>8} {'per save s':>10} {'in steps':>8} {'step ms':>7} {'K for 5%':>8}  goal <5%"
    )
    print("\nsaving every K steps (async) vs not saving: wall time of the same steps, after the compile")
    print(head + "\n" + "-" * len(head))
    for r in results:
        o, step = r["overhead"], r["overhead"]["median_step_s"]["none"]
        none, saving = sum(o["wall_s"]["none"]), sum(o["wall_s"]["async"])
        per_save = (saving - none) / o["saves"]  # the overhead scales as 1/K: this is what K divides
        print(
            f"{r['model']:<9} {r['batch']:>5} x {r['seq']:<3} {o['steps_per_segment'] * o['rounds']:>5} "
            f"{o['saves']:>5} {none:>9.2f} {saving:>8.2f} {o['overhead']:>+8.1%} {per_save:>10.2f} "
            f"{per_save / step:>8.2f} {step * 1e3:>7.0f} {math.ceil(per_save / (0.05 * step)):>8}  "
            + ("met" if o["overhead"] < 0.05 else "NOT met")
            + f" at K={o['every']}"
        )
        pairs = zip(o["wall_s"]["none"], o["wall_s"]["async"], strict=True)
        rounds = ", ".join(f"{b / a - 1:+.1%}" for a, b in pairs)
        calls = statistics.median(o["save_calls_s"])
        print(f"  per round: {rounds}; median save call {calls:.3f} s of the per-save cost")
    print(
        "per save: (saving - no-save) / saves; in steps: that / step; step ms: median step without saving;\n"
        "  K for 5%: the smallest save interval at that cost; save call: host time inside\n"
        "  Checkpointer.save (finiteness check, device-to-host copy, waiting for an earlier save); the rest\n"
        "  of the cost is the pipeline bubble and the background write competing with the steps for the CPU"
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show:
        print_tables(json.loads(Path(args.show).read_text())["results"])
        return 0
    try:
        devices = simulated_devices(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    if min(args.steps, args.every, args.rounds, args.repeats) < 1:
        parser.error("--steps, --every, --rounds and --repeats must be >= 1")
    flags.set_xla_flags(devices, plan=False)  # before jax initialises: the mesh's simulated devices
    import jax

    from shardgpt.lab import runner

    load_at_start = os.getloadavg()  # 2 cores: other jobs skew every figure; the JSON records the load
    models = args.models.split(",")
    try:
        setups = [make_setup(m, args) for m in models]
    except ValueError as e:
        parser.error(str(e).splitlines()[0])
    root = Path(tempfile.mkdtemp(prefix="ckpt_bench_", dir=args.ckpt_root))
    try:
        results = [bench_model(m, s, args, root / m) for m, s in zip(models, setups, strict=True)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_tables(results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        meta = runner.meta(" ".join(["experiments/checkpoint_bench.py", *sys.argv[1:]]))
        meta["load_average"] = {"start": load_at_start, "end": os.getloadavg()}
        path = Path(args.out) / "checkpoint_bench.json"
        path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {path} (jax {jax.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
