"""Calibrate the cpu hardware profile by microbenchmarks only (never by the model runs it predicts).

Times, on this host with 8 simulated XLA:CPU devices: a float32 and a bfloat16 matmul on one device (the
host's throughput: XLA:CPU's thread pool spans every core), a copy through JAX (read + write), and a psum
across the 8 devices at several sizes, fitted as t = alpha + 2(n-1)/n * bytes / beta (a ring all-reduce's
bytes). Prints the figures for shardgpt/analysis/profiles/cpu.toml.
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def best(fn, *args, reps: int = 7) -> float:
    """Best wall time of `fn(*args)` over `reps` runs, after a warm-up (compile)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    """Print the measured figures."""
    dev = jax.devices()[0]
    mesh = jax.make_mesh((8,), ("d",))
    n_dev, chain = 8, 8
    spec = dict(mesh=mesh, in_specs=P("d"), out_specs=P("d"))
    # The 8 devices at once, as a run uses them: each its own matmul and copy; the sum is the host's.
    a = jax.device_put(jnp.ones((n_dev * 512, 512), jnp.float32), NamedSharding(mesh, P("d")))
    t = best(jax.jit(jax.shard_map(lambda x: x @ x, **spec)), a)
    print(f"matmul float32 512^3 on each of 8 devices at once: {n_dev * 2 * 512**3 / t:.3g} FLOP/s in all")
    x = jax.device_put(jnp.ones((64 * 2**20 // 4,), jnp.float32), NamedSharding(mesh, P("d")))
    t = best(jax.jit(jax.shard_map(lambda v: v * 2, **spec)), x)
    print(
        f"copy 8 MiB f32 (x*2) on each of 8 devices at once, read + write: {2 * x.nbytes / t:.3g} B/s in all"
    )
    for dtype, n in (("float32", 1024), ("bfloat16", 1024)):
        a = jax.device_put(jnp.ones((n, n), dtype), dev)
        t = best(jax.jit(lambda x: x @ x), a)
        print(f"matmul {dtype} {n}^3: {2 * n**3 / t:.3g} FLOP/s ({t * 1e3:.2f} ms)")
    x = jax.device_put(jnp.ones((64 * 2**20 // 4,), jnp.float32), dev)  # 64 MiB
    t = best(jax.jit(lambda v: v * 2), x)
    print(f"copy 64 MiB f32 (x*2), read + write: {2 * x.nbytes / t:.3g} B/s ({t * 1e3:.2f} ms)")

    tiny = jax.device_put(jnp.ones((n_dev,), jnp.float32), NamedSharding(mesh, P("d")))
    launch = best(jax.jit(jax.shard_map(lambda v: v + 1, **spec)), tiny)
    print(f"launch: one tiny program on 8 devices: {launch * 1e6:.1f} us")

    def psums(k):  # k psums in a row inside one program: a loop's per-op cost, without the launch
        body = lambda i, v: v * 0.5 + jax.lax.psum(v, "d") * 1e-3  # stays device-varying
        return jax.jit(jax.shard_map(lambda v: jax.lax.fori_loop(0, k, body, v), **spec))

    sizes, times = [], []
    for kib in (4, 64, 1024, 4096, 16384):
        per = kib * 1024 // 4
        arr = jax.device_put(jnp.ones((n_dev * per,), jnp.float32), NamedSharding(mesh, P("d")))
        t = (best(psums(1 + chain), arr) - best(psums(1), arr)) / chain
        sizes.append(per * 4)
        times.append(t)
        print(f"psum over 8 devices, {kib} KiB per device: {t * 1e6:.1f} us per op (chain of {chain})")
    ring = np.array(sizes) * 2 * (n_dev - 1) / n_dev
    slope = np.polyfit(ring[2:], np.array(times[2:]), 1)[0]  # beta from the sizes bandwidth dominates
    alpha = times[0] - ring[0] * slope  # alpha from the smallest
    print(f"fit: alpha {alpha * 1e6:.1f} us, beta {1 / slope:.3g} B/s (ring all-reduce bytes per device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
