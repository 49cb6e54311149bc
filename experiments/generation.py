"""Generation benchmark: three generators side by side, so the cost of re-tracing is visible.

- naive: a beginner's loop, the full forward over the growing context, jitted per length (one compile
  per new token);
- recompute: the full forward over the context padded to block_size, one compile, no cache;
- kv_cache: shardgpt.generate, prefill + fixed-shape decode loop over a KV cache, one compile.

The first two live here, not in the library: they are what the library exists to avoid.
Run `python experiments/generation.py --help`.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAIVE_MAX_TOKENS = 16  # the naive loop compiles once per token: its rate is measured over this many


def _greedy_loop(forward, params, prompts_BxL, new_tokens: int, pad_to: int | None):
    """Greedy decoding by full forward passes; `pad_to` fixes the input shape (else it grows)."""
    import jax.numpy as jnp
    import numpy as np

    tokens = np.asarray(prompts_BxL)
    for _ in range(new_tokens):
        length = tokens.shape[1]
        inputs = tokens if pad_to is None else np.pad(tokens, ((0, 0), (0, pad_to - length)))
        logits_BxLxV = forward(params, inputs)
        next_B = np.asarray(jnp.argmax(logits_BxLxV[:, length - 1], axis=-1))
        tokens = np.concatenate([tokens, next_B[:, None].astype(np.int32)], axis=1)
    return tokens


def benchmark(model, params, mesh, strategy: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Tokens/s and compiles of the KV-cache generator, with the naive and full-recompute ones beside it."""
    import jax
    import numpy as np

    from shardgpt.generate import Generator

    cfg = model.config
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    params = getattr(params, "params", params)

    generator = Generator(model, mesh, strategy, batch)
    generator(params, list(prompts), new_tokens)  # compile (and warm up)
    start = time.perf_counter()
    cached = generator(params, list(prompts), new_tokens)
    kv_s = time.perf_counter() - start

    # The baselines run on one device: they show the cost of re-tracing, not of sharding.
    params_1 = jax.device_put(params, jax.local_devices()[0])
    recompute = jax.jit(lambda p, t: model.apply({"params": p}, t))
    _greedy_loop(recompute, params_1, prompts, 1, cfg.block_size)  # compile
    start = time.perf_counter()
    full = _greedy_loop(recompute, params_1, prompts, new_tokens, cfg.block_size)
    recompute_s = time.perf_counter() - start

    naive = jax.jit(lambda p, t: model.apply({"params": p}, t))
    naive_tokens = min(new_tokens, NAIVE_MAX_TOKENS)
    start = time.perf_counter()
    _greedy_loop(naive, params_1, prompts, naive_tokens, None)
    naive_s = time.perf_counter() - start

    # Greedy tokens must match exactly in fp32; in bf16, argmax ties between logits that differ only in
    # reduction order make token equality meaningless, so the check is not made (None).
    agree = (
        all(np.array_equal(c, f) for c, f in zip(cached, full, strict=True))
        if cfg.dtype == "float32"
        else None
    )
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "tokens_per_s": batch * new_tokens / kv_s,
        "ms_per_step": 1e3 * kv_s / new_tokens,
        "compiles": generator.traces,
        "recompute_tokens_per_s": batch * new_tokens / recompute_s,
        "recompute_compiles": recompute._cache_size(),
        "naive_tokens_per_s": batch * naive_tokens / naive_s,
        "naive_tokens": naive_tokens,
        "naive_compiles": naive._cache_size(),
        "greedy_matches_recompute": agree,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-mini", help="preset (default gpt-mini)")
    parser.add_argument("--batch", default="1,8", help="comma list of batch sizes (default 1,8)")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=65)
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        parser.error(f"--batch takes a comma list of integers, got {args.batch!r}")

    import jax

    from shardgpt import config, train
    from shardgpt.mesh import make_mesh
    from shardgpt.model import GPT

    try:
        cfg = config.preset(args.model, block_size=args.block_size, vocab_size=args.vocab_size)
    except ValueError as e:
        parser.error(str(e))
    model = GPT(cfg)
    params = jax.jit(lambda r: train.init_params(model, r))(jax.random.key(0))
    mesh = make_mesh("dp=1", jax.devices()[:1])
    device = jax.devices()[0].device_kind
    print(f"{args.model} ({cfg.n_params() / 1e6:.1f}M params), {device}, greedy, jax {jax.__version__}")
    print(f"{'batch':>5} {'generator':>10} {'tok/s':>10} {'ms/step':>9} {'compiles':>8} {'vs naive':>9}")
    for batch in batches:
        r = benchmark(model, params, mesh, "dp", batch, args.prompt_len, args.new_tokens)
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
