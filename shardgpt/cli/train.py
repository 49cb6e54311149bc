"""Train one (mesh, strategy, impl) to --steps, with checkpoints, resume onto any mesh, and a NaN guard.

    python experiments/train.py --task chars:README.md --model gpt-micro --mesh dp=2,tp=4 --strategy zero3 \\
        --steps 300 --ckpt-dir ckpt --save-every 50
    python experiments/train.py ... --resume --mesh dp=8 --strategy zero1   # continues, resharded

Every --eval-every steps it prints the loss on held-out data (the task's val split) and, on a chars task,
a text sample.

Exit status: 0 done, 2 bad input (one line, before anything compiles), 3 a NaN or inf loss or grad norm.
"""

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from shardgpt.cli import flags
from shardgpt.cli.flags import say
from shardgpt.cli.train_callbacks import Evaluate, MetricsLog, Preemption, logged_losses, write_report

SCRIPT = "experiments/train.py"
EXIT_NON_FINITE = 3
DEFAULT_OUT = "results/train"  # --out without --ckpt-dir


def build_parser() -> argparse.ArgumentParser:
    """run.py's model and device flags, plus one run's layout, length and checkpoints."""
    p = argparse.ArgumentParser(
        prog=flags.prog(SCRIPT),
        description=__doc__.split("\n")[0],
        epilog="Overrides: --model.FIELD=VALUE and --optim.FIELD=VALUE, as in the run command.",
    )
    what = p.add_argument_group("layout")
    what.add_argument("--mesh", default=None, help="mesh spec (default: dp=2,tp=4 on 8 devices, else dp=-1)")
    what.add_argument(
        "--strategy",
        default="dp",
        help=f"one of {', '.join(flags.STRATEGIES)}, fsdp; +sp for sequence parallelism (e.g. zero1+sp)",
    )
    what.add_argument("--sp", action="store_true", help="Megatron sequence parallelism (= --strategy S+sp)")
    what.add_argument(
        "--impl",
        choices=("gspmd", "shard_map", "explicit"),
        default="gspmd",
        help="GSPMD (jit shardings), shard_map (explicit collectives) or explicit (sharding in types)",
    )
    flags.add_model_flags(p, compare=False)
    run_flags = p.add_argument_group("training")
    run_flags.add_argument(
        "--steps", type=int, default=100, help="total steps to reach (a resumed run stops there)"
    )
    run_flags.add_argument("--batch", type=int, default=64, help="global batch size")
    run_flags.add_argument(
        "--microbatches",
        type=int,
        default=1,
        metavar="M",
        help="gradient accumulation: each step's batch as M microbatches (M divides the per-dp batch)",
    )
    run_flags.add_argument(
        "--lr", type=float, default=3e-3, help="peak learning rate (= --optim.learning_rate)"
    )
    run_flags.add_argument("--seed", type=int, default=0)
    run_flags.add_argument(
        "--eval-every", type=int, default=100, metavar="N",
        help="held-out loss (and a text sample on chars tasks) every N steps and at the end; 0: never",
    )  # fmt: skip
    run_flags.add_argument(
        "--eval-batches", type=int, default=4, metavar="B", help="held-out batches per evaluation"
    )
    run_flags.add_argument(
        "--out",
        metavar="DIR",
        help=f"where the run's files go: metrics.jsonl when there is no --ckpt-dir (with one, the log "
        f"lives beside the checkpoints) (default: the --ckpt-dir, else {DEFAULT_OUT})",
    )
    flags.add_log_every(run_flags)
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--ckpt-dir", metavar="DIR", help="checkpoints and metrics.jsonl (default: none)")
    ckpt.add_argument("--save-every", type=int, metavar="K", help="save every K steps (default 100)")
    ckpt.add_argument("--keep", type=int, metavar="N", help="keep the last N checkpoints (default 3)")
    ckpt.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR's latest checkpoint (resharded if needed), or start if it holds none yet",
    )
    ckpt.add_argument(
        "--step",
        type=int,
        metavar="N",
        help="with --resume: continue from checkpoint step N instead of the latest (the newer steps are "
        "moved aside, into DIR.after-N, not deleted)",
    )
    p.add_argument(
        "--export", metavar="PATH", help="write GPT-2-named weights at the end (.safetensors or .npz)"
    )
    flags.add_device_flags(p)
    return p


@dataclasses.dataclass
class Job:
    """What validation resolved: the lab setup, the run's description, and the checkpoint to resume."""

    spec: object
    setup: object
    description: dict
    checkpointer: object = None
    resume_step: int | None = None
    preempted: bool = False  # SIGTERM ended the run early: save, no export
    metrics_path: Path | None = None  # metrics.jsonl: in --ckpt-dir, else in --out


def validate(args: argparse.Namespace) -> Job:
    """Initialise jax, resolve the run, open and check the checkpoint directory: nothing compiles."""
    import jax

    from shardgpt.io import checkpoint
    from shardgpt.lab import runner
    from shardgpt.parallel import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from shardgpt.parallel.mesh import describe

    if not args.ckpt_dir and (args.save_every is not None or args.keep is not None or args.step is not None):
        raise ValueError("--save-every, --keep and --step need --ckpt-dir DIR: the directory to save in")
    if args.step is not None and not args.resume:
        raise ValueError("--step N chooses the checkpoint to continue from: give --resume too")
    args.save_every = 100 if args.save_every is None else args.save_every
    args.keep = 3 if args.keep is None else args.keep
    if args.save_every < 1 or args.keep < 1 or args.eval_batches < 1:
        raise ValueError(
            f"--save-every, --keep and --eval-batches must be >= 1 (got {args.save_every}, {args.keep}, "
            f"{args.eval_batches})"
        )
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0 (0: no evaluation), got {args.eval_every}")
    if args.export:
        if Path(args.export).suffix not in (".safetensors", ".npz"):
            raise ValueError(f"--export {args.export}: give a .safetensors or .npz path")
        flags.check_writable("--export", str(Path(args.export).resolve().parent))
    if args.resume and not args.ckpt_dir:
        raise ValueError("--resume needs --ckpt-dir DIR: the directory to continue from")
    platform = jax.devices()[0].platform
    spec = runner.RunSpec(
        mesh=args.mesh or ("dp=2,tp=4" if jax.device_count() == 8 else "dp=-1"),
        strategy=args.strategy + ("+sp" if args.sp and not args.strategy.endswith("+sp") else ""),
        impl=args.impl, model=args.model, overrides=args.overrides, optim=args.optim,
        task=args.task, seq=args.seq, steps=args.steps, batch=args.batch, microbatches=args.microbatches,
        dtype=args.dtype or ("float32" if platform == "cpu" else "bfloat16"),
        attention=args.attention or flags.default_attention(jax.devices()[0]),
        scan=args.scan, remat=args.remat, lr=args.lr, seed=args.seed, init_from=args.init_from,
    )  # fmt: skip
    setup = runner.prepare(spec)
    flags.note_tp_across_hosts(setup.mesh)
    if args.eval_every:
        setup.task.rows(0, range(1), "val")  # a missing held-out split (bin:DIR without val.bin) fails now
    description = {
        "model": dataclasses.asdict(setup.config),
        "strategy": setup.strategy,
        "mesh": describe(setup.mesh),
        "impl": spec.impl,
        "optim": dataclasses.asdict(setup.optim),
        "seed": spec.seed,
        "task": spec.task,
        "seq": setup.task.seq_len,
        "batch": spec.batch,
        "microbatches": spec.microbatches,
    }
    if hasattr(setup.task, "chars"):  # a chars task: its vocabulary, so sampling needs no text file
        description["chars"] = setup.task.chars
    job = Job(spec, setup, description)
    args.out = args.out or args.ckpt_dir or DEFAULT_OUT
    if jax.process_index() == 0 and args.out != args.ckpt_dir:
        flags.check_writable("--out", args.out)
    # Beside the checkpoints when there are some: a NaN's last good step and --resume read it there.
    job.metrics_path = Path(args.ckpt_dir or args.out) / "metrics.jsonl"
    if not args.ckpt_dir:
        return job
    try:
        job.checkpointer = checkpoint.Checkpointer(args.ckpt_dir, keep=args.keep)
    except checkpoint.CheckpointError as e:
        raise ValueError(f"--ckpt-dir {args.ckpt_dir}: {e}") from None
    try:
        _check_resume(job, args)
    except Exception:
        job.checkpointer.close()  # leaves the directory as found, its lock free and unrecorded
        raise
    return job


def _check_resume(job: Job, args: argparse.Namespace):
    """With a checkpoint directory open: refuse a fresh start over saved steps, find the step to resume
    and say what differs from the saved run."""
    if job.checkpointer.lock and job.checkpointer.lock.note:  # a run that died holding it (kill -9)
        say(f"note: {args.ckpt_dir}: {job.checkpointer.lock.note}")
    latest = job.checkpointer.latest_step()
    if latest is not None and not args.resume:  # a fresh run would prune and overwrite that one's files
        raise ValueError(
            f"{args.ckpt_dir} already holds checkpoints up to step {latest}: pass --resume to continue "
            "that run, or choose another --ckpt-dir"
        )
    if args.resume:
        job.resume_step = latest if args.step is None else _chosen_step(job.checkpointer, args.step)
        if job.resume_step is None:  # so one command serves a job's first start and every restart
            say(f"note: --resume: no checkpoint in {args.ckpt_dir} yet: starting from step 0")
            return
        saved = job.checkpointer.description(job.resume_step)
        for note in resume_notes(saved, job.description):
            say(f"note: {note}")


def resume_notes(saved: dict, description: dict) -> list[str]:
    """What differs between the saved run and this one, one line each (CheckpointError for another model)."""
    from shardgpt.io import checkpoint
    from shardgpt.parallel import sharding

    # +sp changes activations only: a strategy note moves state only when the base strategy differs.
    same_layout = sharding.base_strategy(saved.get("strategy", "dp")) == sharding.base_strategy(
        description["strategy"]
    )
    notes = []
    for note in checkpoint.check_compatible(saved, description):
        resharded = note.startswith(("mesh", "impl")) or (note.startswith("strategy") and not same_layout)
        notes.append(note + (" (the state is resharded on restore)" if resharded else ""))
    if saved.get("chars", description.get("chars")) != description.get("chars"):
        raise ValueError(
            "the text's characters are not the checkpoint's (the file changed since it was saved), so its "
            "ids would mean other characters: resume with the text it was trained on"
        )
    if saved.get("seq", description["seq"]) != description["seq"]:
        notes.append(
            f"seq: saved {saved['seq']}, now {description['seq']} (the same weights train on windows of "
            "another length; the loss is not comparable across the change)"
        )
    return notes


def _chosen_step(ckpt, step: int) -> int:
    """--step N: that checkpoint, after moving the newer ones aside (DIR.after-N), so the steps trained
    again are saved afresh and nothing is deleted."""
    steps = sorted(ckpt.manager.all_steps())
    if step not in steps:
        raise ValueError(f"--step {step}: no such checkpoint in {ckpt.directory}; it holds steps {steps}")
    newer = [s for s in steps if s > step]
    if newer:
        import jax

        if jax.process_count() > 1:  # every process would move them: one person should, by hand
            raise ValueError(
                f"--step {step}: move the newer checkpoints {newer} out of {ckpt.directory} first"
            )
        aside = ckpt.directory.with_name(f"{ckpt.directory.name}.after-{step}")
        if aside.exists():
            raise ValueError(
                f"--step {step}: {aside} exists already: move it away first (nothing was changed)"
            )
        aside.mkdir()
        for s in newer:
            os.replace(ckpt.directory / str(s), aside / str(s))
        ckpt.manager.reload()  # the manager forgets the moved steps
        say(f"note: --step {step}: the newer checkpoints {newer} were moved to {aside}")
    return step


def train(job: Job, args: argparse.Namespace) -> int:
    """Restore or initialise the state, train to --steps, then save, export and sample; returns the status."""
    from shardgpt.lab import runner
    from shardgpt.training import loop
    from shardgpt.training import train as training

    s, spec, ckpt = job.setup, job.spec, job.checkpointer
    if job.resume_step is not None:
        target, shardings = training.abstract_state(s.model, s.tx, s.mesh, s.strategy)
        state = ckpt.restore(target, job.resume_step)  # placed straight into the current mesh's layout
        say(f"resumed from {ckpt.directory}/{job.resume_step} onto {job.description['mesh']} {s.strategy}")
    else:
        state, shardings = runner.initial_state(spec, s)
    if int(state.step) >= spec.steps:
        say(f"already at step {int(state.step)} of --steps {spec.steps}: nothing to train")
    else:
        try:
            state = _train_to_the_end(job, args, state, shardings)
        except loop.NonFiniteError as e:
            if ckpt is not None:
                ckpt.wait()  # a save in flight is a good state: name it once it is on disk
            good = ckpt.last_good_step(logged_losses(ckpt.directory / "metrics.jsonl")) if ckpt else None
            kept = ""
            if good is not None:
                kept = f"; the last good checkpoint is step {good}: resume it with --resume --step {good}"
            print(f"{flags.prog(SCRIPT)}: error: {e}{kept}", file=sys.stderr)
            return _finish(ckpt, EXIT_NON_FINITE)
    _conclude(job, args, state)
    return _finish(ckpt, 0)


def _train_to_the_end(job: Job, args: argparse.Namespace, state, shardings):
    """The Trainer from the state's step to --steps, with the NaN guard, metrics log and checkpoints."""
    import jax

    from shardgpt.io import checkpoint
    from shardgpt.lab import runner
    from shardgpt.parallel import sharding
    from shardgpt.training import data, loop, optim

    s, spec, ckpt, first = job.setup, job.spec, job.checkpointer, int(state.step)
    step_fn = s.make_step(s.model, s.tx, s.mesh, s.strategy, shardings, microbatches=spec.microbatches)
    batch_sharding = sharding.batch_sharding(s.mesh, s.strategy)
    batch_for = lambda i: data.global_batch(s.task, i, spec.batch, batch_sharding, s.config.vocab_size)
    # In this order: the evaluation adds val_loss to the metrics that the log then writes.
    callbacks = [Evaluate(job, args, shardings)] if args.eval_every else []
    if jax.process_index() == 0:
        callbacks.append(MetricsLog(job.metrics_path, optim.schedule(s.optim), first))
    callbacks.append(loop.StopOnNonFinite())
    if ckpt is not None:
        callbacks.append(checkpoint.SaveEvery(ckpt, args.save_every, job.description))
    name = runner.run_name(spec)
    preempted = Preemption(args.save_every)
    trainer = loop.Trainer(
        step_fn, state, batch_for, spec.batch * s.task.seq_len, callbacks,
        progress=jax.process_index() == 0, description=name, stop=preempted.asked, log_every=args.log_every,
    )  # fmt: skip
    with preempted:
        state = trainer.run(spec.steps - first)
    job.preempted = trainer.stopped
    if trainer.stopped:
        kept = "it is saved and --resume continues from it" if ckpt else "nothing is saved (no --ckpt-dir)"
        say(f"note: SIGTERM: stopped after step {int(state.step)}; {kept}")
    losses = [h["loss"] for h in trainer.history]
    say(
        f"step {int(state.step)}: loss {losses[-1]:.4f} (first of this run {losses[0]:.4f}); "
        f"{s.config.dtype} compute, {s.config.attention} attention"
    )
    say(f"every step's metrics: {job.metrics_path}")
    return state


def _conclude(job: Job, args: argparse.Namespace, state):
    """Save the final state (unless just saved) and write --export."""
    from shardgpt.io import weights

    if job.checkpointer is not None:
        job.checkpointer.save(state, job.description)
    if args.export and not job.preempted:
        say(f"wrote {weights.export_params(state.params, job.setup.config, args.export)}")


def _finish(ckpt, status: int) -> int:
    if ckpt is not None:
        ckpt.close()  # wait for saves in flight: a checkpoint is only latest once complete
    return status


def main(argv: list[str] | None = None) -> int:
    """Train one run; exit 2 with a one-line reason on bad input, 3 on a NaN or inf."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = flags.parse_args(parser, argv)
    launched = flags.launch_if_asked("shardgpt.cli.train", parser, args, argv)
    if launched is not None:
        return launched
    flags.set_xla_flags(args.devices, plan=False, gpu_flags=args.gpu_flags)  # before jax is imported
    from shardgpt.io.checkpoint import CheckpointError

    try:  # only validation is caught: an error while training keeps its traceback
        job = validate(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e).splitlines()[0])
    try:
        status = train(job, args)
    except CheckpointError as e:  # a corrupt checkpoint found while restoring: nothing was deleted
        print(f"{flags.prog(SCRIPT)}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return _finish(job.checkpointer, 2)
    write_report(job, args, [flags.prog(SCRIPT), *argv])  # also after a NaN stop: its curves show why
    return status


if __name__ == "__main__":
    sys.exit(main())
