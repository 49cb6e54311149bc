"""Generation benchmark: naive re-jit vs fixed-shape recompute vs KV cache, side by side.

The benchmark itself is shardgpt.lab.generation_bench (every run of the run command reports it too); this
prints its table for one model on one mesh. `python experiments/generation.py --help`.
"""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="experiments/generation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-mini", help="preset (default gpt-mini)")
    parser.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--mesh", default="dp=1", help="mesh for the KV-cache generator (default dp=1)")
    parser.add_argument(
        "--strategy", default="dp", help="training strategy the params come from (default dp)"
    )
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch takes a comma list of integers, got {args.batch!r}")

    import jax

    from shardgpt.lab.generation_bench import benchmark
    from shardgpt.model import config
    from shardgpt.model.gpt import GPT
    from shardgpt.parallel.mesh import make_mesh
    from shardgpt.training import train

    try:
        cfg = config.preset(args.model, block_size=args.block_size, vocab_size=args.vocab_size)
    except ValueError as e:
        parser.error(str(e))
    model = GPT(cfg)
    params = jax.jit(lambda r: train.init_params(model, r))(jax.random.key(0))
    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    params = jax.device_put(params, train.param_shardings(model, mesh, args.strategy))  # as trained
    device = jax.devices()[0].device_kind
    print(
        f"{args.model} ({cfg.n_params() / 1e6:.1f}M params), {device}, mesh {args.mesh}, params as "
        f"{args.strategy} trains them, greedy, prompt {args.prompt_len}, jax {jax.__version__}"
    )
    print(f"{'batch':>5} {'generator':>10} {'tok/s':>10} {'ms/step':>9} {'compiles':>8} {'vs naive':>9}")
    for batch in batches:
        r = benchmark(model, params, mesh, args.strategy, batch, args.prompt_len, args.new_tokens)
        rows = [
            ("naive", r["naive_tokens_per_s"], r["naive_compiles"]),
            ("recompute", r["recompute_tokens_per_s"], r["recompute_compiles"]),
            ("kv_cache", r["tokens_per_s"], r["compiles"]),
        ]
        for name, rate, compiles in rows:
            ms = 1e3 * batch / rate
            print(
                f"{batch:>5} {name:>10} {rate:>10,.1f} {ms:>9.2f} {compiles:>8} {rate / rows[0][1]:>8,.0f}x"
            )
        if r["greedy_matches_recompute"] is False:
            print("WARNING: KV-cache tokens differ from the full-recompute tokens", file=sys.stderr)


if __name__ == "__main__":
    main()
