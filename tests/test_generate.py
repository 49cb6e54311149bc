"""Fixed-shape KV-cache generation: exact against the full forward, one compile, sharded like training."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SORT_STEPS

from shardgpt.analysis import metrics
from shardgpt.generation.generate import Generator, decode_windows, generate, generate_text
from shardgpt.generation.rolling import buffer_length, roll_keep
from shardgpt.generation.sampling import Sampling, sample
from shardgpt.model import config
from shardgpt.model.gpt import GPT, init_cache, unstack_layers
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import data, train

CFG = config.preset("gpt-pico", vocab_size=50, block_size=32)
MODEL = GPT(CFG)
ONE_DEVICE = make_mesh("dp=1", jax.devices()[:1])


@pytest.fixture(scope="module")
def params():
    """Random params with matmul weights scaled 8x, so attention is sharp and a cache bug changes tokens."""
    fresh = jax.jit(lambda rng: train.init_params(MODEL, rng))(jax.random.key(1))
    return jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, fresh)


@pytest.fixture(scope="module")
def forward():
    return jax.jit(lambda p, tokens: MODEL.apply({"params": p}, tokens))


def _full_greedy(forward, params, prompt, n):
    """Greedy decoding by re-running the full forward on the whole sequence for every token."""
    tokens = list(prompt)
    for _ in range(n):
        buffer = np.zeros((1, CFG.block_size), np.int32)
        buffer[0, : len(tokens)] = tokens
        tokens.append(int(jnp.argmax(forward(params, buffer)[0, len(tokens) - 1])))
    return np.array(tokens)


def test_cached_greedy_equals_full_forward_greedy_with_one_compile(params, forward):
    gen = Generator(MODEL, ONE_DEVICE, batch_size=3)
    for prompts, n in [
        ([[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]], 12),
        ([[7] * 20, [3, 1], [2, 2, 2, 2]], 5),
    ]:
        outputs = gen(params, prompts, n)
        for prompt, out in zip(prompts, outputs, strict=True):
            np.testing.assert_array_equal(out, _full_greedy(forward, params, prompt, n))
    single = Generator(MODEL, ONE_DEVICE, batch_size=1)
    full = _full_greedy(forward, params, [9, 8, 7, 6], 29)  # reads 4 + 29 - 1 = 32 positions: all of them
    np.testing.assert_array_equal(single(params, [[9, 8, 7, 6]], 29)[0], full)
    assert gen.traces == 1 and single.traces == 1, "a new prompt length or token count recompiled"
    assert gen._jitted._cache_size() == 1


def _cropped_greedy(forward, params, prompts, n, block):
    """Greedy decoding past the context without a cache: each token from the full forward over the window
    the generator keeps, the whole sequence up to `block` tokens, then the last roll_keep(block) growing
    back to `block` and cropped again (every block - roll_keep + 1 tokens). All rows in one forward."""
    keep, rows = roll_keep(block), [list(p) for p in prompts]
    for _ in range(n):
        buffer, widths = np.zeros((len(rows), block), np.int32), []
        for row, tokens in enumerate(rows):
            t = len(tokens)  # the index of the token to predict
            widths.append(t if t <= block else keep + (t - block - 1) % (block - keep + 1))
            buffer[row, : widths[-1]] = tokens[t - widths[-1] :]
        logits = np.asarray(forward(params, buffer))
        for row, tokens in enumerate(rows):
            tokens.append(int(np.argmax(logits[row, widths[row] - 1])))
    return [np.array(tokens) for tokens in rows]


def test_generation_past_the_context_re_prefills_within_one_compile():
    """300 greedy tokens from a 64-token model, two rows whose caches fill at different steps: one compile,
    and every token equals a no-cache reference's full forward over the same cropped window (tokens 65 on
    come from re-prefilled windows)."""
    cfg = config.preset("gpt-pico", vocab_size=50, block_size=64)
    model = GPT(cfg)
    fresh = jax.jit(lambda rng: train.init_params(model, rng))(jax.random.key(1))
    params = jax.tree.map(lambda x: x * 8 if x.ndim >= 2 else x, fresh)  # sharp: a bug changes tokens
    gen = Generator(model, ONE_DEVICE, batch_size=2)
    prompts = [[3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4]]
    outputs = gen(params, prompts, 300)
    assert gen.traces == 1 and gen._jitted._cache_size() == 1, "generating past the context recompiled"
    forward = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))
    expected = _cropped_greedy(forward, params, prompts, 300, cfg.block_size)
    for out, want in zip(outputs, expected, strict=True):
        np.testing.assert_array_equal(out, want)
    assert len(set(outputs[0][65:].tolist())) > 10, "a degenerate model would not test the windows"
    assert buffer_length(64, 1 + 300) == 512 and buffer_length(64, 65) == 65


def test_cached_logits_equal_full_forward_logits(params, forward):
    """Prefill 5 tokens, then feed 15 more one at a time: every position's logits match (fp32, 1e-4)."""
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 20)).astype(np.int32)
    expected = np.asarray(forward(params, tokens))
    step = jax.jit(lambda p, t, pos, cache: MODEL.apply({"params": p}, t, pos, cache))
    positions = np.broadcast_to(np.arange(20), (2, 20))
    logits, cache = step(params, tokens[:, :5], positions[:, :5], init_cache(CFG, 2))
    got = [logits]
    for t in range(5, 20):
        logits, cache = step(params, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=1e-4, rtol=1e-4)


def test_head_runs_only_at_the_positions_asked_for(params, forward):
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
    at = np.array([[11, 3], [0, 5]])
    got = MODEL.apply({"params": params}, tokens, logits_at_BxM=at)
    assert got.shape == (2, 2, CFG.padded_vocab_size)
    expected = np.take_along_axis(np.asarray(forward(params, tokens)), at[:, :, None], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_chunked_prefill_with_an_overlapping_last_chunk(params, forward):
    """Chunks of 7 over a 32-slot context: the fifth starts at 25 (not 28) and rewrites 3 positions."""
    gen = Generator(MODEL, ONE_DEVICE, batch_size=2, prefill_chunk=7)
    prompts = [list(range(1, 31)), [5, 4]]  # five chunks for the first; the second's are junk past 2
    for prompt, out in zip(prompts, gen(params, prompts, 3), strict=True):
        np.testing.assert_array_equal(out, _full_greedy(forward, params, prompt, 3))


@pytest.mark.parametrize("spec, strategy", [("dp=2,tp=4", "dp"), ("dp=2,tp=4", "zero3"), ("tp=8", "zero1")])
def test_sharded_generation_equals_one_device(params, spec, strategy):
    prompts = [[1, 2, 3, 4], [5, 6]]
    expected = generate(MODEL, params, prompts, 10, mesh=ONE_DEVICE)
    got = generate(MODEL, params, prompts, 10, mesh=make_mesh(spec), strategy=strategy)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(g, e)


def _compiled_generator(mesh, strategy: str = "dp") -> str:
    """HLO text of the compiled 2-row generator, for params laid out as `strategy` trains them."""
    gen = Generator(MODEL, mesh, strategy, batch_size=2)
    shapes = jax.eval_shape(lambda: train.init_params(MODEL, jax.random.key(0)))
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, gen.param_shardings
    )
    tokens, lengths = gen.pad([[1, 2, 3], [4, 5]], 4)
    with jax.set_mesh(mesh):
        compiled = gen._jitted.lower(params, tokens, lengths, np.int32(4), gen._default_key).compile()
    return compiled.as_text()


def _generator_collectives(strategy: str) -> dict:
    """Collectives of the compiled generator on dp=2,tp=4, for params laid out as `strategy` trains them."""
    return metrics.collectives(_compiled_generator(make_mesh("dp=2,tp=4"), strategy), per_execution=False)


def test_zero3_generation_gathers_no_params():
    """Generation keeps params whole over dp, resharded once per call outside the compiled loop: the zero3
    generator compiles dp's collectives, whose all-gathers are sampled ids and logit maxima (168 bytes in
    all), where generating from the zero3 layout compiled 99 all-gathers of 315 KiB (95 in the loops)."""
    zero3, dp = _generator_collectives("zero3"), _generator_collectives("dp")
    assert zero3 == dp
    assert zero3["all-gather"]["bytes"] < 1024, zero3["all-gather"]


def test_loop_bodies_write_each_cache_array_once_and_stack_no_weights():
    """The compiled prefill and decode loops (one device, 2 rows) write each layer's keys and values once
    per step, and stack no q/k/v kernels inside a loop: XLA hoists the stack out, so each is stacked once
    per call (were it redone per token, stack once per call beside `matmul_weights_in`)."""
    text = _compiled_generator(ONE_DEVICE)
    computations = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}$", text, re.M | re.S))
    bodies = re.findall(r"body=%?([\w.\-]+)", text)
    assert len(bodies) == 1 + len(decode_windows(CFG.block_size)), bodies  # the prefill, then each phase
    stacked = f"= f32[{CFG.n_embd},3,{CFG.n_head},{CFG.head_dim}]"  # the q/k/v kernel one matmul reads

    def called(line):  # the lines of every computation `line` calls (a fusion's), transitively
        names = re.findall(r"calls=%?([\w.\-]+)", line)
        return [
            sub
            for name in names
            for inner in computations[name].splitlines()
            for sub in (inner, *called(inner))
        ]

    for body in bodies:
        lines = computations[body].splitlines()
        cache = [line for line in lines if re.search(rf"= f32\[2,\d+,{CFG.n_head},{CFG.head_dim}\]", line)]
        runs = lambda line: " ".join([line, *called(line)])  # a top-level op and what it fuses
        writes = [line for line in cache if re.search(r" (scatter|dynamic-update-slice)\(", runs(line))]
        assert len(writes) == 2 * CFG.n_layer, (body, writes)  # keys and values: (B, slots, H, K) each
        everything = lines + [sub for line in lines for sub in called(line)]
        assert not [line for line in everything if stacked in line and "get-tuple-element(" not in line], body


def test_stop_token_ends_a_row_early(params):
    """The second row runs on past the first decode window (16 slots) after the first row has stopped."""
    prompts = [[1, 2, 3], list(range(20, 34))]
    free = generate(MODEL, params, prompts, 10)
    stop = int(free[0][5])  # the first row's third generated token
    for prompt, out, row in zip(
        prompts, generate(MODEL, params, prompts, 10, stop_token=stop), free, strict=True
    ):
        hits = np.flatnonzero(row[len(prompt) :] == stop)
        end = len(prompt) + hits[0] + 1 if hits.size else len(row)
        np.testing.assert_array_equal(out, row[:end])
    assert len(free[1]) == 24 and decode_windows(CFG.block_size) == [16, 32]


def test_sampling_modes(params):
    prompts = [[1, 2, 3]]
    greedy = generate(MODEL, params, prompts, 8)[0]
    np.testing.assert_array_equal(
        generate(MODEL, params, prompts, 8, sampling=Sampling(1.0, top_k=1))[0], greedy
    )
    np.testing.assert_array_equal(generate(MODEL, params, prompts, 8, sampling=Sampling(1e-6))[0], greedy)
    hot = Sampling(temperature=1.0)
    flat = jax.tree.map(lambda x: x / 8 if x.ndim >= 2 else x, params)  # high-entropy model for sampling
    a = generate(MODEL, flat, prompts, 16, sampling=hot, key=jax.random.key(1))[0]
    b = generate(MODEL, flat, prompts, 16, sampling=hot, key=jax.random.key(1))[0]
    c = generate(MODEL, flat, prompts, 16, sampling=hot, key=jax.random.key(2))[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), "different keys gave the same 16 sampled tokens"


def test_top_p_is_exact_beyond_the_window_and_off_at_one():
    """A nucleus wider than the 256-token window is still found exactly; top_p=1 filters nothing."""
    logits = jnp.broadcast_to(-0.002 * jnp.arange(1000.0), (4096, 1000))  # slowly decaying
    probs = np.asarray(jax.nn.softmax(logits[0]))
    nucleus = int(np.sum(np.cumsum(probs) - probs < 0.9))  # ~750 tokens
    tokens = np.asarray(sample(logits, jax.random.key(0), Sampling(1.0, top_p=0.9)))
    assert tokens.max() < nucleus and tokens.max() > 256 and len(set(tokens.tolist())) > 500
    free = np.asarray(sample(logits, jax.random.key(0), Sampling(1.0)))
    np.testing.assert_array_equal(
        np.asarray(sample(logits, jax.random.key(0), Sampling(1.0, top_p=1.0))), free
    )


@pytest.mark.parametrize("top_k", [None, 3])
def test_top_p_stays_inside_the_nucleus(top_k):
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.03, 0.1])  # nucleus at p=0.75: tokens 1 and 3
    logits = jnp.log(jnp.broadcast_to(probs, (4000, 6)))
    tokens = np.asarray(sample(logits, jax.random.key(0), Sampling(1.0, top_k=top_k, top_p=0.75)))
    assert set(tokens.tolist()) == {1, 3}
    assert abs(np.mean(tokens == 1) - 0.5 / 0.8) < 0.03  # renormalised within the nucleus


def test_trained_sort_model_sorts_held_out_inputs(trained_sort):
    """At least 95% of 64 held-out 6-digit problems (the val split: never trained on) sorted exactly."""
    model, task, state, _ = trained_sort
    problems = [task.problem(10_000, row, "val") for row in range(64)]
    outputs = generate(model, state, problems, task.length)
    correct = [
        np.array_equal(out[task.length :], np.sort(p)) for p, out in zip(problems, outputs, strict=True)
    ]
    assert np.mean(correct) >= 0.95, f"sorted {np.mean(correct):.0%} of held-out problems"


def test_text_helper(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabc\n" * 20)
    task = data.make_task(f"chars:{path}", seq_len=16)
    model = GPT(config.preset("gpt-pico", vocab_size=task.vocab_size, block_size=16))
    params = jax.jit(lambda rng: train.init_params(model, rng))(jax.random.key(0))
    text = generate_text(model, params, task, "abc", 5)
    assert text.startswith("abc") and len(text) == 8 and set(text) <= set(task.chars)
    longer = generate_text(model, params, task, "abc", 200)  # past the 16-character context
    assert longer.startswith("abc") and len(longer) == 203


@pytest.mark.parametrize(
    "prompts, n, sampling, message",
    [
        ([[1] * 33], 1, {}, r"33 tokens, longer than the model's context \(32\)"),
        ([[]], 1, {}, "prompt 0 is empty"),
        ([[1, 99]], 1, {}, r"outside \[0, 50\)"),
        ([[1]], 0, {}, "max_new_tokens must be >= 1"),
        ([[1]], 1, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[1]], 1, {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([[1]], 1, {"temperature": -1.0}, "temperature must be >= 0"),
        ([[1]], 1, {"top_k": 0}, "top_k must be >= 1"),
        ([[1]], 1, {"top_k": 2.5}, "top_k must be an integer"),
        ([[1.7, 2.2]], 1, {}, "flat sequence of token ids"),
        ([[[1, 2]]], 1, {}, "flat sequence of token ids"),
        ([[1]], 2.5, {}, "max_new_tokens must be an integer"),
        ([], 1, {}, "at least one prompt"),
    ],
)
def test_bad_requests_raise_before_compiling(params, prompts, n, sampling, message):
    with pytest.raises(ValueError, match=message):
        generate(MODEL, params, prompts, n, sampling=Sampling(**sampling))


def test_stop_token_outside_the_vocabulary_is_an_error(params):
    with pytest.raises(ValueError, match=r"stop_token 50 is outside the vocabulary \[0, 50\)"):
        generate(MODEL, params, [[1]], 1, stop_token=50)


def test_batch_not_divisible_by_dp_is_an_error():
    with pytest.raises(ValueError, match=r"batch=1\) is not divisible by mesh axis dp\*ep=2"):
        Generator(MODEL, make_mesh("dp=2,tp=4"), batch_size=1)


def test_unrolled_model_generates_the_same_tokens(params):
    """Decoding always runs unrolled; a model trained unrolled (no stacked params) takes the same path."""
    unrolled = GPT(CFG.replace(scan_layers=False))
    expected = generate(MODEL, params, [[3, 1, 4, 1, 5]], 12)[0]
    got = generate(unrolled, unstack_layers(params, CFG.n_layer), [[3, 1, 4, 1, 5]], 12)[0]
    np.testing.assert_array_equal(got, expected)


def test_matmul_weights_are_cast_once_per_call_and_nothing_else():
    """Dense kernels and biases go to the compute dtype before the decode loop; LayerNorm params and the
    embedding tables stay fp32, as the model reads them (so the cast changes no value it computes)."""
    from shardgpt.generation.generate import matmul_weights_in

    params = train.init_params(GPT(config.preset("gpt-pico", scan_layers=False)), jax.random.key(0))
    cast = jax.tree_util.tree_leaves_with_path(matmul_weights_in(params, "bfloat16"))
    dtypes = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in cast}
    assert dtypes["['block_0']['attn']['query']['kernel']"] == jnp.bfloat16
    assert dtypes["['block_1']['mlp']['down']['bias']"] == jnp.bfloat16
    assert dtypes["['lm_head']['kernel']"] == jnp.bfloat16
    for name in ("['block_0']['ln_1']['bias']", "['ln_f']['scale']", "['wte']", "['wpe']"):
        assert dtypes[name] == jnp.float32, name
    assert matmul_weights_in(params, "float32") is params


# Here, not in test_train.py: the suite's two workers take whole files, and the SORT_STEPS fixture is paid
# once per worker that asks for it.
def test_sort_task_trains_to_low_loss(trained_sort):
    """gpt-pico learns to sort 6 digits: loss on the sorted half below 0.05 within SORT_STEPS steps."""
    _, _, state, trainer = trained_sort
    assert int(state.step) == SORT_STEPS
    assert trainer.events[0] == "begin" and trainer.events[-1] == "end"
    assert trainer.events[1:-1] == list(range(SORT_STEPS)), "on_step_end must see every step once, in order"
    final = np.mean([h["loss"] for h in trainer.history[-10:]])
    assert final < 0.05, f"sort loss {final:.3f} after {SORT_STEPS} steps: the model or optimizer regressed"


def test_a_model_too_large_for_the_generation_layout_is_refused_before_anything_is_placed(monkeypatch):
    """Where a device states its memory (GPU, TPU), weights whole over dp plus the KV cache must fit:
    else a clear line, never an out-of-memory error mid-sample."""
    from shardgpt.generation import generate as generation

    monkeypatch.setattr(generation, "_device_limit", lambda mesh: 64 * 1024)
    with pytest.raises(ValueError, match=r"GiB per device .* exceed the device's .* larger tp"):
        Generator(MODEL, make_mesh("dp=8"), "zero3", batch_size=8)
    monkeypatch.setattr(generation, "_device_limit", lambda mesh: 2**30)
    Generator(MODEL, make_mesh("dp=8"), "zero3", batch_size=8)  # fits: no error
