"""Generation benchmark: the KV-cache generator beside the two it exists to replace, so their cost is visible.

- naive: a beginner's loop, the full forward over the growing context, jitted per length (one compile
  per new token);
- recompute: the full forward over the context padded to block_size, one compile, no cache;
- kv_cache: shardgpt.generation.generate, chunked prefill + fixed-shape decode loop over a KV cache, one
  compile.

`benchmark` is what `runner.run` calls after training and what experiments/generation.py prints.
"""

import hashlib
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from shardgpt.generation.generate import Generator
from shardgpt.model.gpt import GPT
from shardgpt.parallel import distributed

# The naive loop compiles once per token (~0.9 s each for gpt-pico on 2 CPU cores), so its rate is measured
# over this many: 16 made it most of `make run`'s time (4 runs x 16 compiles); the table states the count.
NAIVE_MAX_TOKENS = 4
KV_REPEATS = 3  # the KV-cache generator is timed as the median of this many calls (it takes milliseconds)


def greedy_loop(forward, params, prompts_BxL: np.ndarray, new_tokens: int, pad_to: int | None) -> np.ndarray:
    """Greedy decoding by full forward passes; `pad_to` fixes the input shape (else it grows)."""
    tokens = np.asarray(prompts_BxL)
    for _ in range(new_tokens):
        length = tokens.shape[1]
        inputs = tokens if pad_to is None else np.pad(tokens, ((0, 0), (0, pad_to - length)))
        logits_BxLxV = forward(params, inputs)
        next_B = np.asarray(jnp.argmax(logits_BxLxV[:, length - 1], axis=-1))
        tokens = np.concatenate([tokens, next_B[:, None].astype(np.int32)], axis=1)
    return tokens


def timed(fn, *args) -> tuple[float, Any]:
    """(seconds, result) of one call; results come back to the host, so the time includes the work."""
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def benchmark(
    model: GPT, params: Any, mesh: Mesh, strategy: str, batch: int, prompt_len: int, new_tokens: int
) -> dict:
    """Tokens/s and compiles of the KV-cache generator, with the naive and full-recompute ones beside it."""
    cfg = model.config
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    params = getattr(params, "params", params)

    generator = Generator(model, mesh, strategy, batch)
    generator(params, list(prompts), new_tokens)  # compile (and warm up)
    runs = [timed(generator, params, list(prompts), new_tokens) for _ in range(KV_REPEATS)]
    kv_s, cached = statistics.median(s for s, _ in runs), runs[-1][1]

    # The baselines run on one device: they show the cost of re-tracing, not of sharding.
    params_1 = jax.device_put(distributed.to_host(params), jax.local_devices()[0])
    recompute = jax.jit(lambda p, t: model.apply({"params": p}, t))
    greedy_loop(recompute, params_1, prompts, 1, cfg.block_size)  # compile
    recompute_s, full = timed(greedy_loop, recompute, params_1, prompts, new_tokens, cfg.block_size)

    naive = jax.jit(lambda p, t: model.apply({"params": p}, t))
    naive_tokens = min(new_tokens, NAIVE_MAX_TOKENS)
    naive_s, _ = timed(greedy_loop, naive, params_1, prompts, naive_tokens, None)

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
        # The generated tokens in brief: equal wherever the trained params are (any impl or process count).
        "tokens_sha256": hashlib.sha256(np.concatenate(cached).tobytes()).hexdigest()[:16],
    }
