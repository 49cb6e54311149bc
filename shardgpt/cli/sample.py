"""Sample from what you trained: a train.py checkpoint directory or a weight file (also `shardgpt-sample`).

    python experiments/sample.py ckpt --prompt "The " --max-new 300
    python experiments/sample.py ckpt --step 200 --num-samples 4 --temperature 1.0 --top-k 40 --mesh tp=4
    python experiments/sample.py --init-from gpt2.safetensors --prompt "Hello"   # tiktoken, else ids

A checkpoint directory is opened read-only: the writers' lock is never taken, so a run still training there
is neither blocked nor disturbed. Its latest step that verifies (checksums) is sampled unless --step says
which. Text is decoded with the task's own tokenizer (a chars task: the characters of its text file).
Generation runs past the model's context (the last 3/4 of it re-read when it fills), in one compile.

Exit status: 0 done, 2 bad input (one line, before the generator compiles).
"""

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from shardgpt.cli import flags
from shardgpt.cli.flags import say

SCRIPT = "experiments/sample.py"


def build_parser() -> argparse.ArgumentParser:
    """What to load, where to run it, and what to generate."""
    p = argparse.ArgumentParser(prog=flags.prog(SCRIPT), description=__doc__.split("\n")[0])
    source = p.add_argument_group("model")
    source.add_argument(
        "ckpt_dir", nargs="?", metavar="CKPT_DIR", help="a train.py --ckpt-dir (read-only, no lock taken)"
    )
    source.add_argument(
        "--step", type=int, metavar="N", help="sample checkpoint step N (default: the latest that verifies)"
    )
    source.add_argument(
        "--init-from", metavar="PATH", help="GPT-2-named weights instead (as train.py's --init-from)"
    )
    source.add_argument(
        "--task", metavar="SPEC", help="the tokenizer's task, e.g. chars:PATH (default: the checkpoint's own)"
    )
    source.add_argument("--mesh", help="mesh spec over the first devices it needs (default: one device)")
    source.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: as saved)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--prompt", help="text to continue (ids, e.g. '1 2 3', where there is no tokenizer)")
    gen.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file")
    gen.add_argument("--max-new", type=int, default=200, metavar="N", help="new tokens per sample (200)")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples (one batch)")
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8)")
    gen.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens")
    gen.add_argument("--top-p", type=float, metavar="P", help="sample within the smallest nucleus >= P")
    gen.add_argument("--seed", type=int, default=0, help="the sampling key's seed")
    flags.add_device_flags(p)
    return p


@dataclasses.dataclass
class Job:
    """What validation resolved: the model and its params on the mesh, the tokenizer, the prompt's ids."""

    model: object
    params: object
    mesh: object
    tokenizer: object
    generator: object
    prompt: object  # token ids
    source: str  # "DIR/STEP" or the weight file
    notes: list[str] = dataclasses.field(default_factory=list)  # printed after the line saying what loaded


def _check_flags(args: argparse.Namespace):
    """Errors in the flags alone, before anything is read."""
    if (args.ckpt_dir is None) == (args.init_from is None):
        raise ValueError("give a checkpoint directory (CKPT_DIR) or --init-from PATH: one of the two")
    if args.step is not None and args.ckpt_dir is None:
        raise ValueError("--step N chooses a checkpoint of CKPT_DIR: give the directory")
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.max_new < 1 or args.num_samples < 1:
        raise ValueError(f"--max-new and --num-samples must be >= 1 (got {args.max_new}, {args.num_samples})")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.optim:
        raise ValueError("--optim.FIELD overrides mean nothing to sampling: drop them")


def _mesh(spec: str | None):
    """The mesh `spec` over the first devices it needs (all of them for an axis of -1); default dp=1."""
    import jax

    from shardgpt.parallel.mesh import make_mesh

    devices, wanted = jax.devices(), 1
    for part in (spec or "dp=1").split(","):
        value = part.partition("=")[2].strip()
        wanted = None if value == "-1" or wanted is None else wanted * (int(value) if value.isdigit() else 1)
    return make_mesh(spec or "dp=1", devices if wanted is None or wanted > len(devices) else devices[:wanted])


def _model_config(saved_model: dict, args: argparse.Namespace, platform: str):
    """The saved model's config, with the compute fields this run may change (--dtype, --model.X)."""
    from shardgpt.io.checkpoint import COMPUTE_FIELDS
    from shardgpt.model import config

    shape_fields = sorted(k for k, _ in args.overrides if k not in COMPUTE_FIELDS)
    if shape_fields:
        raise ValueError(
            f"the checkpoint fixes the model's {', '.join(shape_fields)}: only "
            f"{', '.join(COMPUTE_FIELDS)} may be overridden"
        )
    cfg = config.ModelConfig(**saved_model)
    if cfg.attention == "cudnn" and platform != "gpu":  # decode reads its cache with XLA's attention anyway
        cfg = cfg.replace(attention="xla")
    return cfg.replace(**dict(args.overrides), **({"dtype": args.dtype} if args.dtype else {}))


def _restore(args: argparse.Namespace, mesh) -> tuple[object, object, str, str | None, str | None]:
    """(model, params, "DIR/STEP", task, the chars task's recorded characters or None) from the checkpoint
    directory, opened read-only (no lock)."""
    import jax

    from shardgpt.generation.generate import GENERATION_LAYOUT
    from shardgpt.io import checkpoint
    from shardgpt.model.gpt import GPT
    from shardgpt.training import optim, train

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # orbax warns that the directory it was told is read-only is read-only
    try:
        ckpt = checkpoint.Checkpointer(args.ckpt_dir, read_only=True)  # CheckpointError: no such directory
    finally:
        absl.setLevel(level)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise ValueError(f"{ckpt.directory} holds no checkpoint yet")
        if args.step is not None and args.step not in steps:
            raise ValueError(f"--step {args.step}: no such checkpoint in {ckpt.directory}; it holds {steps}")
        saved = ckpt.description(steps[-1] if args.step is None else args.step)
        cfg = _model_config(saved["model"], args, jax.devices()[0].platform)
        model = GPT(cfg)
        # The whole state, so every leaf's checksum is verified; params land in the generation layout.
        tx = optim.make_optimizer(optim.OptimConfig(**saved["optim"]))
        target, _ = train.abstract_state(model, tx, mesh, GENERATION_LAYOUT)
        for step in [args.step] if args.step is not None else steps[::-1]:
            try:
                state = ckpt.restore(target, step)
                break
            except checkpoint.CheckpointError as e:
                problem = str(e).splitlines()[0].replace("resume it with --resume", "sample it with")
                if args.step is not None or step == steps[0]:
                    raise ValueError(problem) from None
                say(f"note: step {step} does not verify, trying the one before: {problem}", file=sys.stderr)
    finally:
        ckpt.close()
    chars = None if args.task else saved.get("chars")  # a checkpoint saved before they were recorded: none
    return model, state.params, f"{ckpt.directory}/{step}", args.task or saved.get("task"), chars


def _load_weights(args: argparse.Namespace, mesh) -> tuple[object, object, str, str | None, None]:
    """(model, params, path, task, None) from --init-from's file, placed in the generation layout."""
    import jax

    from shardgpt.generation.generate import GENERATION_LAYOUT
    from shardgpt.io import weight_files, weights
    from shardgpt.model import config
    from shardgpt.model.gpt import GPT

    sd, hints = weight_files.read_weight_file(args.init_from)
    overrides = dict(args.overrides) | ({"dtype": args.dtype} if args.dtype else {})
    n_head = overrides.pop("n_head", None)
    if n_head is None and "n_head" not in hints:  # as train.py: a preset of the file's width and depth
        shapes = weights.config_from_state_dict(sd, 1)
        same = [
            c
            for c in map(config.preset, config.PRESETS)
            if (c.n_embd, c.n_layer) == (shapes.n_embd, shapes.n_layer)
        ]
        n_head = same[0].n_head if same else None
        if n_head is None:
            raise ValueError(f"{args.init_from} does not say its head count: give --model.n_head=H")
    if jax.devices()[0].platform != "cpu":
        overrides.setdefault("dtype", "bfloat16")  # as train.py computes on accelerators
    cfg = weights.config_from_state_dict(sd, n_head, hints=hints, **overrides)
    params = weights.import_params(sd, cfg, mesh, GENERATION_LAYOUT)
    return GPT(cfg), params, args.init_from, args.task, None


def _prompt_ids(args: argparse.Namespace, tokenizer, block_size: int, notes: list[str]):
    """The prompt's ids: --prompt, --prompt-file or the tokenizer's default; a longer one than the
    context keeps its last block_size tokens (with a note)."""
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--prompt-file {args.prompt_file}: {e.strerror or e}") from None
    else:
        text = tokenizer.default_prompt if args.prompt is None else args.prompt
    ids = tokenizer.encode(text)
    if len(ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if len(ids) > block_size:
        notes.append(
            f"the prompt's {len(ids)} tokens exceed the context ({block_size}): it reads the last ones"
        )
        ids = ids[-block_size:]
    return ids


def validate(args: argparse.Namespace) -> Job:
    """Read the model and check every input; nothing but the restore's checksums compiles."""
    from shardgpt.generation import tokenizer as tokenizers
    from shardgpt.generation.generate import Generator
    from shardgpt.generation.sampling import Sampling
    from shardgpt.parallel import distributed

    _check_flags(args)
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    mesh = _mesh(args.mesh)
    flags.note_tp_across_hosts(mesh)
    model, params, source, task, chars = (_restore if args.ckpt_dir else _load_weights)(args, mesh)
    tokenizer = tokenizers.for_task(task, model.config.vocab_size, chars)
    notes = [tokenizer.note] if tokenizer.note else []
    prompt = _prompt_ids(args, tokenizer, model.config.block_size, notes)
    generator = Generator(model, mesh, "dp", args.num_samples, sampling)  # a batch dp does not divide: error
    generator.pad([prompt] * args.num_samples, args.max_new)  # out-of-vocabulary ids and the rest, now
    return Job(model, params, mesh, tokenizer, generator, prompt, source, notes)


def sample(job: Job, args: argparse.Namespace) -> int:
    """Generate and print the samples (the prompt and its continuation, separated by a line of dashes)."""
    import jax

    from shardgpt.generation.rolling import roll_keep
    from shardgpt.parallel.mesh import describe

    cfg, tok = job.model.config, job.tokenizer
    say(
        f"sampling {job.source}: {_model_name(cfg)} ({cfg.n_params() / 1e6:.2f}M params, context "
        f"{cfg.block_size}, {cfg.dtype}) on {describe(job.mesh)} ({job.mesh.size} device"
        f"{'s' if job.mesh.size > 1 else ''}); {tok.name}",
        file=sys.stderr,
    )
    for note in job.notes:
        say(f"note: {note}", file=sys.stderr)
    start = time.perf_counter()
    rows = job.generator(job.params, [job.prompt] * args.num_samples, args.max_new, jax.random.key(args.seed))
    seconds = time.perf_counter() - start
    for i, row in enumerate(rows):
        say(("-" * 40 + "\n" if i else "") + tok.decode(row))
    new = sum(len(row) - len(job.prompt) for row in rows)
    past = ""
    if len(job.prompt) + args.max_new - 1 > cfg.block_size:
        keep = roll_keep(cfg.block_size)
        every = cfg.block_size - keep + 1
        past = f"; past the context, each sample re-read its last {keep} tokens every {every}"
    say(f"{new} new tokens in {seconds:.1f} s, {job.generator.traces} compile{past}", file=sys.stderr)
    return 0


def _model_name(cfg) -> str:
    """The preset the config's shape matches ("gpt-pico"), else its shape in words."""
    from shardgpt.model import config

    for name, fields in config.PRESETS.items():
        if all(getattr(cfg, k) == v for k, v in fields.items()):
            return name
    return f"GPT (n_layer={cfg.n_layer}, n_head={cfg.n_head}, n_embd={cfg.n_embd})"


def main(argv: list[str] | None = None) -> int:
    """Sample; exit 2 with a one-line reason on bad input."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = flags.parse_args(parser, argv)
    launched = flags.launch_if_asked("shardgpt.cli.sample", parser, args, argv)
    if launched is not None:
        return launched
    flags.set_xla_flags(args.devices, plan=False, gpu_flags=args.gpu_flags)  # before jax is imported
    try:
        job = validate(args)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e).splitlines()[0])
    return sample(job, args)


if __name__ == "__main__":
    sys.exit(main())
