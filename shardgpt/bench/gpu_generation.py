"""Generation on one accelerator: shardgpt's compiled generator beside the plain-JAX anchor, gpt2 in bf16.

Random weights; one JSON line per measurement (BENCHMARKS.md, "gpt2 on one H200"). ms/step = (time for N new
tokens - time for 1) / (N - 1), each the median of --iters calls of the compiled program, so compile and
prefill drop out. `python3 experiments/gpu_generation.py --anchor PATH` also times a plain-JAX anchor file
(our benchmarks used ../shared/anchors/gpu_ref.py, which is not part of this project); `--tiny` is a quick
check on any machine.
"""

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np


def measure(compiled, args: tuple, new: int, iters: int) -> dict:
    """Compiled memory and timings of `compiled(*args, n, *rest)` for n = 1 and `new` tokens; `args` holds
    the arguments with None where the token count goes."""

    def call(n):
        return compiled(*(np.int32(n) if a is None else a for a in args))

    from shardgpt.bench.gpu_parts import median_s

    one, many = (median_s(lambda n=n: call(n), iters) for n in (1, new))
    return {
        "first_token_ms": 1e3 * one,
        "total_ms": 1e3 * many,
        "ms_per_step": 1e3 * (many - one) / (new - 1),
        "temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
    }


def load_anchor(path: str):
    """The anchor module in `path` (a plain-JAX gpt2 with Config, init_params, cast and make_generate)."""
    spec = importlib.util.spec_from_file_location("gpu_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="experiments/gpu_generation.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--anchor", metavar="PATH", help="also time the plain-JAX anchor in this file (e.g. gpu_ref.py)"
    )
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a quick check, any machine")
    parser.add_argument("--batch", default="1,64", help="comma list of batch sizes (default 1,64)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length (default 128)")
    parser.add_argument("--new", type=int, default=256, help="new tokens (default 256)")
    parser.add_argument("--iters", type=int, default=5, help="calls per timing; the median is kept")
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be >= 2: ms/step is the difference between N tokens and 1")
    if args.anchor and not Path(args.anchor).is_file():
        parser.error(f"--anchor {args.anchor}: no such file (give the path of the anchor, e.g. gpu_ref.py)")
    gpu_ref = load_anchor(args.anchor) if args.anchor else None

    import jax
    import jax.numpy as jnp

    from shardgpt.generation.generate import Generator
    from shardgpt.model import config
    from shardgpt.model.gpt import GPT
    from shardgpt.parallel.mesh import make_mesh
    from shardgpt.training import train

    if args.tiny:
        cfg = config.ModelConfig(
            n_layer=2, n_head=4, n_embd=64, vocab_size=256, block_size=512, dtype="bfloat16"
        )
    else:
        cfg = config.preset("gpt2", dtype="bfloat16")
    model, mesh = GPT(cfg), make_mesh("dp=1", jax.devices()[:1])
    params = jax.jit(lambda r: train.init_params(model, r))(jax.random.key(0))
    head = {
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "prompt": args.prompt,
        "new": args.new,
    }
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, args.prompt)).astype(np.int32)
        if gpu_ref is not None:
            ref = gpu_ref.Config(
                cfg.n_layer, cfg.n_head, cfg.n_embd, vocab=cfg.vocab_size, block=cfg.block_size
            )
            ref_params = gpu_ref.cast(gpu_ref.init_params(ref, jax.random.key(0)), jnp.bfloat16)
            tokens = jnp.asarray(prompts)
            start = time.perf_counter()
            make = gpu_ref.make_generate(ref, batch, args.prompt, args.new, stacked=False)
            compiled = make.lower(ref_params, tokens, np.int32(args.new)).compile()
            compile_s = time.perf_counter() - start
            timings = measure(compiled, (ref_params, tokens, None), args.new, args.iters)
            print(json.dumps(head | {"what": "anchor", "batch": batch, "compile_s": compile_s} | timings))
        generator = Generator(model, mesh, "dp", batch)
        tokens, lengths = generator.pad(list(prompts), args.new)
        key = jax.random.key(0)
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            compiled = generator._jitted.lower(params, tokens, lengths, np.int32(args.new), key).compile()
            compile_s = time.perf_counter() - start
            timings = measure(compiled, (params, tokens, lengths, None, key), args.new, args.iters)
        print(json.dumps(head | {"what": "shardgpt", "batch": batch, "compile_s": compile_s} | timings))


if __name__ == "__main__":
    main()
