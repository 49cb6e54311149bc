"""Fixed-shape generation: chunked prefill into a KV cache, then a jitted decode loop; one compile per batch.

Prompts are right-padded to the context length and their lengths passed as data; the prefill is a loop
over fixed-size chunks, as many as the longest prompt needs, and decoding is a few loops over growing
prefixes of the cache, the number of new tokens their bound, so no prompt length or token count causes a
new trace. The params are kept whole over dp (the "dp" strategy's layout, whatever the training strategy)
and the cache is sharded by the model's logical names (batch over dp, heads over tp). Past the context, a
full row's last tokens are re-prefilled inside the same program (rolling.py).
"""

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from shardgpt.generation import rolling
from shardgpt.generation.sampling import GREEDY, Sampling, sample
from shardgpt.model.gpt import CACHE_AXES, GPT, init_cache, unstack_layers
from shardgpt.parallel import distributed, sharding
from shardgpt.parallel.gspmd_plan import GSPMDPlan
from shardgpt.parallel.mesh import spans_processes
from shardgpt.training import data, train

# The prefill feeds the prompts through the cache in chunks of max(16, block_size / 8) positions: at most 8
# steps, each big enough to keep an accelerator busy, and a prompt pays for at most one chunk past its end.
PREFILL_STEPS, MIN_PREFILL_CHUNK = 8, 16
# The decode loop runs in phases over growing prefixes of the cache, S/8, S/4, S/2 and S slots (those >= 16):
# a step reads the shortest prefix that holds the context so far, so its cost follows the context, not
# block_size. Phases are loops one after another, not a branch per step (a GPU waits on the host for every
# lax.cond); each is one more loop body in the one compile.
DECODE_PHASES, MIN_WINDOW = 4, 16
# Generation reads every weight on every token, so it keeps them whole over dp (heads, mlp and vocab over
# tp): a ZeRO-3 model is gathered once per `generate` call, not once per decode step. It has no pipeline
# schedule and one token has no sequence to split, so the layers are whole over pp and the positions over
# cp too: whatever layout trained the params, they are converted once per call into this one.
GENERATION_LAYOUT = "dp"
_WHOLE = {("layers", "pp"), ("length", "cp")}  # rules generation drops


def generation_rules(strategy: str, target: str) -> tuple[tuple[str, str | None], ...]:
    """`strategy`'s rules for `target` without the pipeline's and the context's splits."""
    return tuple(
        (name, None if (name, axis) in _WHOLE else axis) for name, axis in sharding.rules(strategy, target)
    )


def _device_limit(mesh: Mesh) -> int | None:
    """Bytes one device may hold (the allocator's limit), or None where it says none (CPU)."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())  # a remote one
    stats = local.memory_stats() or {}  # has no stats to read
    return stats.get("bytes_limit")


def decode_windows(block_size: int) -> list[int]:
    """The cache prefixes the decode phases read, ascending: block_size / 2^k (rounded up) >= MIN_WINDOW."""
    halvings = [-(-block_size // 2**k) for k in reversed(range(DECODE_PHASES))]
    return sorted({w for w in halvings if w >= MIN_WINDOW} | {block_size})


def matmul_weights_in(params: Any, dtype: str) -> Any:
    """`params` with every Dense kernel and bias (not LayerNorm's, not the embedding tables) in `dtype`.

    The model reads exactly those in the compute dtype (model.Dense), so casting them here is bit-identical;
    inside the decode loop their casts would otherwise run, and read 4 bytes a weight, on every token.
    """
    if jnp.dtype(dtype) == jnp.float32:
        return params

    def cast(path, leaf):
        names = [getattr(key, "key", str(key)) for key in path]
        dense = names[-1] == "kernel" or (names[-1] == "bias" and not names[-2].startswith("ln_"))
        return leaf.astype(dtype) if dense else leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def _placed_as(x: jax.Array, target: NamedSharding) -> bool:
    """True where `x` already has the `target` layout, on a mesh of the same axis types: params trained
    under explicit sharding are equivalent in layout but typed on Explicit axes, which the Auto-axes
    generation program refuses."""
    same_types = getattr(x.sharding, "mesh", target.mesh).axis_types == target.mesh.axis_types
    return same_types and (x.sharding == target or x.sharding.is_equivalent_to(target, x.ndim))


class Generator:
    """Jitted prefill + decode for one (model, mesh, strategy, batch size, sampling): compiled once.

    `traces` counts how often the function was traced (= compiled); it stays 1 across prompt lengths
    and token counts.
    """

    def __init__(
        self,
        model: GPT,
        mesh: Mesh,
        strategy: str = "dp",
        batch_size: int = 1,
        sampling: Sampling = GREEDY,
        stop_token: int | None = None,
        prefill_chunk: int | None = None,
    ):
        # Decoding has no sequence to split: a "+sp" strategy generates as its base strategy (same state).
        self.model, self.mesh, self.strategy = model, mesh, sharding.base_strategy(strategy)
        self.batch_size, self.sampling, self.stop_token = batch_size, sampling, stop_token
        cfg = model.config
        if batch_size < 1:
            raise ValueError(f"generation needs at least one prompt, got batch_size={batch_size}")
        if stop_token is not None and not 0 <= stop_token < cfg.vocab_size:
            raise ValueError(f"stop_token {stop_token} is outside the vocabulary [0, {cfg.vocab_size})")
        if prefill_chunk is None:
            prefill_chunk = max(MIN_PREFILL_CHUNK, -(-cfg.block_size // PREFILL_STEPS))
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = min(prefill_chunk, cfg.block_size)
        # Decoding runs the layers unrolled whatever the training layout: a scan inside the decode loop
        # pays its own loop overhead on every token (measured 1.8x slower per step on CPU for gpt-mini).
        activations = generation_rules(self.strategy, "activations")
        # The decoder's plan: GSPMD's view of the mesh under the generation layout's activation rules.
        self.decode_model = GPT(cfg.replace(scan_layers=False), GSPMDPlan(mesh, activations))
        self.traces = 0
        buffer = sharding.batch_sharding(mesh, self.strategy)
        sharding.check_divisible(
            "generation batch", (batch_size, cfg.block_size), ("batch", "length"), buffer.spec, mesh
        )
        abstract = jax.eval_shape(lambda: train.init_params(model, jax.random.key(0)))
        self.param_shardings = sharding.tree_shardings(
            abstract, train.param_axes(model), mesh, generation_rules(GENERATION_LAYOUT, "params")
        )
        self._check_fits(abstract, batch_size)
        # The decode model is unrolled: its cache holds per-layer arrays, without the `layers` axis.
        cache_sharding = NamedSharding(
            mesh, sharding.logical_to_spec(CACHE_AXES[1:], activations, "KV cache")
        )
        vector = NamedSharding(mesh, sharding.logical_to_spec(("batch",), activations))
        replicated = NamedSharding(mesh, P())
        self._jitted = jax.jit(
            self._generate,
            in_shardings=(self.param_shardings, buffer, vector, replicated, replicated),
            out_shardings=(buffer, vector),
        )
        self._input_shardings = (buffer, vector, replicated)
        self._spans_processes = spans_processes(mesh)
        self._cache_sharding = cache_sharding
        # Made once (~0.1 ms a call otherwise), by a jit: device_put cannot place host values on devices
        # of other processes.
        self._default_key = jax.jit(lambda: jax.random.key(0), out_shardings=replicated)()
        self._placed: list[weakref.ref] = []  # weak references to the params last placed (see reshard)

    def _check_fits(self, abstract_params, batch_size: int):
        """Refuse, before anything is placed, a model whose generation layout (weights whole over dp, in
        the compute dtype as decode reads them, plus the KV cache) exceeds a device's memory."""
        limit = _device_limit(self.mesh)
        if limit is None:
            return
        cfg, tp = self.model.config, self.mesh.shape["tp"]
        weights = sum(x.size for x in jax.tree.leaves(abstract_params)) * 4 // tp  # fp32 as stored
        weights += weights * jnp.dtype(cfg.dtype).itemsize // 4  # and the compute-dtype copy decode reads
        shards = sharding.batch_shards(self.mesh)
        cache = 2 * cfg.n_layer * -(-batch_size // shards) * cfg.block_size * cfg.n_embd // tp
        need = weights + cache * jnp.dtype(cfg.dtype).itemsize
        if need > limit:
            raise ValueError(
                f"generation keeps the weights whole over dp: {need / 2**30:.2f} GiB per device (weights "
                f"and a KV cache of {batch_size} rows) exceed the device's {limit / 2**30:.2f} GiB; "
                "generate on a mesh with a larger tp, or with fewer rows"
            )

    def _generate(self, params, tokens_BxT, lengths_B, max_new_tokens, key):
        self.traces += 1
        cfg, B = self.model.config, tokens_BxT.shape[0]
        rows_B = jnp.arange(B)
        if cfg.scan_layers:
            params = unstack_layers(params, cfg.n_layer)
        params = matmul_weights_in(params, cfg.dtype)  # cast once per call, not once per decoded token
        apply = lambda tokens, positions, cache, logits_at=None: self.decode_model.apply(
            {"params": params}, tokens, positions, cache, logits_at
        )

        def emit(i, tokens_BxT, length_B, last_BxV, done_B):
            """Sample each unfinished row's next token from its last logits and append it; returns the
            buffer, lengths, done flags and each row's last token (what it reads next)."""
            token_B = sample(last_BxV, jax.random.fold_in(key, i), self.sampling)
            token_B = jnp.where(done_B, tokens_BxT[rows_B, length_B - 1], token_B)
            # A finished row rewrites its last token past its length, where no one reads it.
            tokens_BxT = tokens_BxT.at[rows_B, length_B].set(token_B)
            length_B = jnp.where(done_B, length_B, length_B + 1)
            if self.stop_token is not None:
                done_B = done_B | (token_B == self.stop_token)
            return tokens_BxT, length_B, done_B, token_B

        cache = init_cache(self.decode_model.config, B)
        cache = jax.lax.with_sharding_constraint(cache, jax.tree.map(lambda _: self._cache_sharding, cache))
        last_BxV, cache = self._prefill(apply, tokens_BxT, lengths_B, cache)

        def cond(carry):
            i, *_, done_B, _ = carry
            return (i < max_new_tokens - 1) & ~jnp.all(done_B)

        def body(carry):  # emit a token, then read it to get the next logits
            i, tokens_BxT, length_B, last_BxV, cache, done_B, offset_B = carry
            tokens_BxT, length_B, done_B, token_B = emit(i, tokens_BxT, length_B, last_BxV, done_B)
            position_B = length_B - 1 - offset_B
            logits_Bx1xV, cache = apply(token_B[:, None], position_B[:, None], cache)
            return i + 1, tokens_BxT, length_B, logits_Bx1xV[:, 0], cache, done_B, offset_B

        # offset_B: where each row's context starts in tokens_BxT (0 until it first fills the cache).
        i, done_B, offset_B = jnp.int32(0), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32)
        prefix = jax.tree.map(lambda x: x[:, :0], cache)
        rolls = tokens_BxT.shape[1] > cfg.block_size + 1  # static: a buffer past the context (rolling.py)
        unfilled = lambda carry: cond(carry) & rolling.unfilled(carry, cfg.block_size)
        decode = lambda carry: jax.lax.while_loop(unfilled, body, carry)  # until some row's cache is full
        roll = lambda carry: rolling.roll(carry, apply, emit, self._prefill, self._cache_sharding)
        for W in decode_windows(cfg.block_size):
            # Grow the prefix by this phase's new (prefilled) slots; the last phase writes the prefix
            # back into the whole cache instead, in place.
            def grow(x, p, W=W):
                if W == x.shape[1]:
                    return jax.lax.dynamic_update_slice_in_dim(x, p, 0, axis=1)
                return jnp.concatenate([p, x[:, p.shape[1] : W]], axis=1)

            prefix = jax.tree.map(grow, cache, prefix)

            def in_window(carry, W=W):  # every row's next write (its next token's position) fits
                _, _, length_B, _, _, done_B, offset_B = carry
                return cond(carry) & (jnp.max(jnp.where(done_B, length_B - 1, length_B) - offset_B) < W)

            carry = (i, tokens_BxT, lengths_B, last_BxV, prefix, done_B, offset_B)
            if rolls and W == cfg.block_size:  # decode to the end, re-prefilling rows whose cache is full
                carry = jax.lax.while_loop(cond, lambda carry: decode(roll(carry)), decode(carry))
            else:
                carry = jax.lax.while_loop(in_window, body, carry)
            i, tokens_BxT, lengths_B, last_BxV, prefix, done_B, offset_B = carry
        # The last token is emitted without a forward pass: nothing will read it.
        tokens_BxT, lengths_B, *_ = emit(i, tokens_BxT, lengths_B, last_BxV, done_B)
        return tokens_BxT, lengths_B

    def _prefill(self, apply, tokens_BxT, lengths_B, cache):
        """Run the prompts through the cache in fixed chunks, as many as the longest prompt needs; returns
        each row's logits at its last prompt token and the filled cache.

        Slots past a prompt's end hold junk that decoding overwrites before any query can see it (a query
        at t attends to slots <= t only). The last chunk starts early enough to end inside the context: it
        recomputes a few positions already written, with the same values.
        """
        B, S, C = tokens_BxT.shape[0], self.model.config.block_size, self.prefill_chunk
        last_B = lengths_B - 1

        def body(carry):
            start, last_BxV, cache = carry
            start = jnp.minimum(start, S - C)
            positions_BxC = jnp.broadcast_to(start + jnp.arange(C), (B, C))
            chunk_BxC = jax.lax.dynamic_slice_in_dim(tokens_BxT, start, C, axis=1)
            at_B = jnp.clip(last_B - start, 0, C - 1)  # the head runs on one position per row
            logits_Bx1xV, cache = apply(chunk_BxC, positions_BxC, cache, at_B[:, None])
            mine_B = (start <= last_B) & (last_B < start + C)
            return start + C, jnp.where(mine_B[:, None], logits_Bx1xV[:, 0], last_BxV), cache

        last_BxV = jnp.zeros((B, self.model.config.padded_vocab_size), self.decode_model.config.dtype)
        carry = (jnp.int32(0), last_BxV, cache)
        _, last_BxV, cache = jax.lax.while_loop(lambda c: c[0] < jnp.max(lengths_B), body, carry)
        return last_BxV, cache

    def __call__(
        self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, key=None
    ) -> list[np.ndarray]:
        """Each prompt followed by up to `max_new_tokens` generated tokens (fewer after a stop token)."""
        inputs = (*self.pad(prompts, max_new_tokens), np.int32(max_new_tokens))
        key = self._default_key if key is None else key
        params = self.reshard(params)
        if self._spans_processes:  # jit takes host arrays only for devices this process holds
            inputs = distributed.place(inputs, self._input_shardings)
        with jax.set_mesh(self.mesh):
            tokens_BxS, lengths_B = self._jitted(params, *inputs, key)
        if self._spans_processes:  # every process gets every row (a few KiB of token ids)
            tokens_BxS, lengths_B = distributed.to_host((tokens_BxS, lengths_B))
        tokens_BxS, lengths_B = np.asarray(tokens_BxS), np.asarray(lengths_B)  # cheaper than device_get
        return [row[:n] for row, n in zip(tokens_BxS, lengths_B, strict=True)]

    def reshard(self, params):
        """Params in the generation layout, moved once per call where they differ (e.g. ZeRO-3 params)."""
        leaves, targets = jax.tree.leaves(params), jax.tree.leaves(self.param_shardings)
        if len(leaves) == len(self._placed) and all(
            r() is x for r, x in zip(self._placed, leaves, strict=True)
        ):
            return params  # the arrays of the last call, already checked
        if len(leaves) != len(targets) or not all(
            isinstance(x, jax.Array) and _placed_as(x, s) for x, s in zip(leaves, targets, strict=True)
        ):  # device_put costs ~1 ms a call on CPU even where nothing moves: only where something must
            on_host = not all(isinstance(x, jax.Array) for x in leaves)  # placed slice by slice
            params = (distributed.place if on_host else jax.device_put)(params, self.param_shardings)
        self._placed = [weakref.ref(x) for x in jax.tree.leaves(params)]
        return params

    def pad(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Validate prompts and right-pad them into the token buffer (batch, buffer_length), before any
        compile: (batch, block_size + 1) wherever the longest prompt and the new tokens fit the context."""
        cfg = self.model.config
        if len(prompts) != self.batch_size:
            raise ValueError(f"this generator takes {self.batch_size} prompts, got {len(prompts)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = max((np.size(prompt) for prompt in prompts), default=0) + max_new_tokens
        buffer = np.zeros((self.batch_size, rolling.buffer_length(cfg.block_size, total)), np.int32)
        lengths = np.zeros((self.batch_size,), np.int32)
        for row, prompt in enumerate(prompts):
            prompt = np.asarray(prompt)
            if prompt.ndim != 1 or (prompt.size and not np.issubdtype(prompt.dtype, np.integer)):
                raise ValueError(f"prompt {row} must be a flat sequence of token ids (ints), got {prompt!r}")
            if prompt.size == 0:
                raise ValueError(f"prompt {row} is empty: give at least one token")
            if prompt.size > cfg.block_size:
                raise ValueError(
                    f"prompt {row} has {prompt.size} tokens, longer than the model's context "
                    f"({cfg.block_size}): shorten it (shardgpt never truncates silently)"
                )
            data.check_ids(prompt, cfg.vocab_size, f"prompt {row}")
            buffer[row, : prompt.size], lengths[row] = prompt, prompt.size
        return buffer, lengths


_GENERATORS: dict[tuple, Generator] = {}


def generate(
    model: GPT,
    params: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    mesh: Mesh | None = None,
    strategy: str = "dp",
    sampling: Sampling = GREEDY,
    key: jax.Array | None = None,
    stop_token: int | None = None,
) -> list[np.ndarray]:
    """Continue each prompt (token ids) with up to `max_new_tokens` tokens; `params` may be a TrainState.

    Generators are cached, so repeated calls with the same batch size and sampling reuse one compile.
    """
    params = getattr(params, "params", params)
    if mesh is None:
        from shardgpt.parallel.mesh import make_mesh

        mesh = make_mesh("dp=1", jax.devices()[:1])
    cache_key = (model.config, mesh, sharding.base_strategy(strategy), len(prompts), sampling, stop_token)
    if cache_key not in _GENERATORS:
        _GENERATORS[cache_key] = Generator(model, mesh, strategy, len(prompts), sampling, stop_token)
    return _GENERATORS[cache_key](params, prompts, max_new_tokens, key)


def generate_text(model: GPT, params: Any, task, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Char-level helper: encode `prompt` with the task's vocabulary, generate, decode the whole text."""
    (tokens,) = generate(model, params, [task.encode(prompt)], max_new_tokens, **kwargs)
    return task.decode(tokens)
