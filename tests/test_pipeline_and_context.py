"""The pp and cp mesh axes in the lab (issue 12): a GPipe pipeline and ring attention under shard_map, K/V
gathered over cp under GSPMD; each trains like one device, with exactly its theory's collectives.

Tolerances: losses and grad norms within 1e-5 absolute of one device over 3 AdamW steps (fp32), step 1's
gradients and the state leaf by leaf within 1e-5 and 2e-4 of each leaf's largest value, as in
test_equivalence. Sequences are sort's 11 tokens plus one ignored
(tests/_runs.py SP_SEQ = 12, which cp=4 divides). gpt-pico has 2 layers: pp=2.
"""

import _runs
import jax
import numpy as np
import pytest
from _runs import (
    BATCH,
    MODELS,
    SINGLE,
    SP_SEQ,
    STEPS,
    TX,
    assert_grads_match,
    assert_state_matches,
    batch,
    by_cause,
    initial_state,
    off_theory,
    run,
)

from shardgpt.analysis import attribution
from shardgpt.generation import generate
from shardgpt.lab import report, runner
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import distributed, pipeline
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import shard_map_step, train

MODEL = MODELS[SP_SEQ]
CASES = [
    ("shard_map", "pp=2,cp=2,dp=2", "zero1", 2),  # GPipe over 2 microbatches of ring attention, ZeRO-1
    ("shard_map", "cp=2,dp=2,tp=2", "zero3", 1),  # the ring with Megatron inside and ZeRO-3's gathers
    ("gspmd", "cp=2,dp=2,tp=2", "dp", 1),  # K/V all-gathered over cp, with Megatron inside
]


@pytest.mark.parametrize("impl, spec, strategy, microbatches", CASES)
def test_pipeline_and_context_parallel_train_like_one_device(impl, spec, strategy, microbatches):
    ref = run("gspmd", SINGLE, "dp", seq=SP_SEQ)
    got = run(impl, spec, strategy, microbatches=microbatches, seq=SP_SEQ)
    where = f"{impl} {spec} {strategy} M={microbatches}"
    np.testing.assert_allclose(got.losses, ref.losses, rtol=0, atol=1e-5, err_msg=f"{where} losses")
    np.testing.assert_allclose(got.grad_norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg=f"{where} norms")
    assert_grads_match(got, ref, where)
    assert_state_matches(got, ref, where)


@pytest.mark.parametrize("case", CASES[:2])
def test_shard_map_pp_and_cp_collectives_equal_theory_cause_by_cause(case):
    impl, spec, strategy, microbatches = case
    assert not off_theory(by_cause(impl, spec, strategy, microbatches, SP_SEQ))


def test_the_ring_passes_and_the_pipeline_sends_as_the_schedules_say():
    """pp=2, cp=2, dp=2, M=2: 3 ticks, each running this stage's 1 layer; per layer and tick cp - 1 = 1 K/V
    pass each way, of this device's K and V; one send of a microbatch's activations per tick each way."""
    rows = by_cause(*CASES[0], SP_SEQ)
    ticks, layers, rows_ = 2 + 2 - 1, MODEL.config.n_layer // 2, BATCH // 2 // 2
    activation = rows_ * (SP_SEQ // 2) * MODEL.config.n_embd * 4  # one microbatch, this device's positions
    ring, sends = rows["ring_kv", "collective-permute"], rows["pp_send", "collective-permute"]
    assert ring["count"] == 2 * (2 - 1) * layers * ticks and ring["bytes"] == ring["count"] * 2 * activation
    assert sends["count"] == 2 * ticks and sends["bytes"] == 2 * ticks * activation


def test_the_load_balanced_ring_trains_like_one_device():
    """--model.ring_layout=zigzag: each cp device holds chunks i and 2 cp - 1 - i, so the causal work is
    even; the same losses as one device."""
    model = GPT(MODEL.config.replace(ring_layout="zigzag"))
    mesh = make_mesh("cp=2,dp=4")
    shardings = train.state_shardings(model, TX, mesh, "zero1")
    state = distributed.place(initial_state(SP_SEQ), shardings.state)
    step = shard_map_step.make_train_step(model, TX, mesh, "zero1", shardings)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, batch(i, mesh, SP_SEQ))
        losses.append(float(metrics["loss"]))
    ref = run("gspmd", SINGLE, "dp", seq=SP_SEQ).losses
    np.testing.assert_allclose(losses, ref, rtol=0, atol=1e-5)


BAD = [
    (dict(mesh="pp=2,dp=4", impl="gspmd", microbatches=2), "written in shard_map: use --impl shard_map"),
    (dict(mesh="pp=8", impl="shard_map", microbatches=8), "does not split into pp=8"),
    (dict(mesh="pp=2,dp=4", impl="shard_map", microbatches=1), "--microbatches M must be >= pp"),
    (dict(mesh="pp=2,dp=4", impl="shard_map", microbatches=2, scan=False), "drop --no-scan"),
    (dict(mesh="cp=2,dp=4", impl="shard_map"), "sequence length 11 is not divisible by cp=2"),
    (dict(mesh="cp=2,tp=4", strategy="dp+sp", task="chars:README.md", seq=16), "+sp and cp both split"),
    (
        dict(
            mesh="cp=4,dp=2",
            impl="shard_map",
            task="chars:README.md",
            seq=12,
            overrides=(("ring_layout", "zigzag"),),
        ),
        "not divisible by 2 x cp = 8 chunks",
    ),
]


@pytest.mark.parametrize("fields, message", BAD)
def test_bad_pipeline_and_context_input_is_refused_before_compiling(fields, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        runner.prepare(runner.RunSpec(**{"steps": 2, "batch": 16, **fields}))


def test_the_bubble_is_measured_from_the_slope_of_step_time_over_ticks():
    assert pipeline.bubble_fraction(4, 4) == 3 / 7
    # Step times of a pipeline whose tick costs 10 ms plus 5 ms outside it, at one microbatch size.
    runs = [
        {"name": f"dp=1,pp=4,tp=2 dp M={m} shard_map", "model": "m", "impl": "shard_map", "seq": 8,
         "batch": 2 * m, "microbatches": m, "step_time_s": 0.005 + 0.010 * (m + 3),
         "pipeline": {"pp": 4, "microbatches": m, "ticks": m + 3, "bubble_theory": 3 / (m + 3)}}
        for m in (4, 8)
    ]  # fmt: skip
    bubbles = {b["microbatches"]: b for b in report.pipeline_bubbles(runs)}
    assert bubbles[4]["bubble_measured"] == pytest.approx(0.030 / 0.075)
    assert bubbles[8]["bubble_measured"] == pytest.approx(0.030 / 0.115)
    assert report.pipeline_bubbles(runs[:1])[0]["bubble_measured"] is None  # one run: no slope


def test_generation_runs_from_pp_and_cp_layouts_as_on_dp():
    """Params laid out as pp or cp training holds them are converted into the generation layout (whole
    over pp and cp) and decode the tokens dp=8's do (greedy, fp32)."""
    model = GPT(config.preset("gpt-pico", n_layer=2, vocab_size=16, block_size=16))
    params = jax.device_get(jax.jit(lambda r: train.init_params(model, r))(jax.random.key(3)))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]] * 2
    tokens = {}
    for spec in ("dp=8", "pp=2,dp=4", "cp=4,dp=2"):
        mesh = make_mesh(spec)
        trained = jax.device_put(params, train.param_shardings(model, mesh, "zero3"))  # layers over pp
        tokens[spec] = generate.generate(model, trained, prompts, 6, mesh=mesh, strategy="zero3")
    for spec in ("pp=2,dp=4", "cp=4,dp=2"):
        assert all(np.array_equal(a, b) for a, b in zip(tokens[spec], tokens["dp=8"], strict=True)), spec
    assert attribution.CAUSES["ring_kv"] and attribution.CAUSES["pp_send"]
    assert attribution.CAUSES["ring_kv"] and attribution.CAUSES["pp_send"]


def test_the_held_out_loss_of_a_pp_model_runs_on_its_pipeline_and_equals_one_device():
    """Evaluation goes through the implementation that trains (step.build_eval): on pp=2,dp=4 shard_map's
    pipeline (M=2, as trained), equal to GSPMD's on one device within 1e-5."""
    model, state = _runs.MODEL, initial_state()
    single, piped = make_mesh("dp=1", jax.devices()[:1]), make_mesh("pp=2,dp=4")
    losses = []
    for mesh, make, m in ((single, train.make_eval_sums, 1), (piped, shard_map_step.make_eval_sums, 2)):
        shardings = train.state_shardings(model, TX, mesh, "dp")
        params = jax.device_put(state.params, shardings.state.params)
        eval_loss = train.make_eval_loss(model, make(model, mesh, "dp", shardings, m))
        losses.append(eval_loss(params, [batch(i, mesh) for i in range(2)]))
    assert abs(losses[0] - losses[1]) < 1e-5, losses
