"""A mixture of experts (model/moe.py) and the `ep` mesh axis: every implementation trains like one device,
dropped tokens included; the all-to-alls are attributed and equal theory; layouts it cannot run are refused
before any compile; generation routes with one compile.

Tolerances as in test_equivalence (fp32): losses and grad norms within 1e-5 absolute of one device, step
1's gradients leaf by leaf within 1e-5 of each leaf's largest value; the params and Adam's moments after 3
steps within 1e-3 (not 2e-4): an expert that few tokens reach has gradients near zero, which Adam divides
by their own root mean square, so their rounding shows in the update (observed up to 2.5e-4).
"""

import jax
import numpy as np
import pytest
from _runs import (
    MOE,
    SINGLE,
    TASK,
    assert_grads_match,
    assert_state_matches,
    by_cause,
    initial_state,
    mesh_for,
    run,
    unattributed_share,
)
from _runs import batch as sort_batch

from shardgpt.generation import generate
from shardgpt.lab import experts, html_report
from shardgpt.model import config, moe
from shardgpt.model.gpt import GPT
from shardgpt.model.plan import GLOBAL_VIEW
from shardgpt.parallel import layout
from shardgpt.parallel.explicit_plan import explicit_mesh
from shardgpt.parallel.mesh import make_mesh

STATE_RTOL = 1e-3
# (impl, mesh, strategy, microbatches): ep with dp and ZeRO, tp inside the experts, dp alone, accumulation.
CASES = [
    ("gspmd", "dp=2,ep=4", "dp", 1),
    ("shard_map", "dp=2,ep=4", "zero3", 1),
    ("explicit", "dp=2,ep=4", "zero2", 1),
    ("shard_map", "dp=2,ep=2,tp=2", "dp", 2),
    ("gspmd", "dp=8", "zero3", 1),
]


@pytest.mark.parametrize("impl, spec, strategy, microbatches", CASES)
def test_moe_trains_like_one_device(impl, spec, strategy, microbatches):
    where = f"{impl} {spec} {strategy} M={microbatches}"
    ref, got = run("gspmd", SINGLE, "dp", moe=True), run(impl, spec, strategy, microbatches, moe=True)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=0, atol=1e-5, err_msg=f"{where} losses")
    np.testing.assert_allclose(got.grad_norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg=f"{where} norms")
    assert_grads_match(got, ref, where)
    assert_state_matches(got, ref, where, STATE_RTOL)
    # Each step counts the choices it dropped (its metrics' moe_dropped): the same on every layout.
    assert len(got.dropped) == len(ref.dropped) > 0 and (got.dropped == ref.dropped).all(), where


def test_the_reference_batches_drop_tokens_and_the_probe_counts_them():
    """The equivalence above covers dropping only if tokens are dropped: the first batch drops some, and
    every choice is either kept or counted dropped (loads add up to tokens x top_k)."""
    mesh = mesh_for(SINGLE)
    found = experts.RoutingProbe(MOE, mesh, "dp")(initial_state(moe=True).params, sort_batch(0, mesh))
    load = np.array(found["load"])
    assert load.shape == (MOE.config.n_layer, MOE.config.n_experts)
    assert (load.sum(1) == found["choices"]).all() and found["choices"] == sort_batch(0, mesh)["inputs"].size
    assert all(0 < d < found["choices"] for d in found["dropped"]), found
    assert run("gspmd", SINGLE, "dp", moe=True).dropped[0] == sum(found["dropped"])  # the step's own count
    assert "dropped / busiest expert" in experts.summary(found)


@pytest.mark.parametrize("impl, strategy", [("gspmd", "dp"), ("shard_map", "zero3"), ("explicit", "zero2")])
def test_all_to_alls_are_attributed_and_equal_theory(impl, strategy):
    rows = by_cause(impl, "dp=2,ep=4", strategy, moe=True)
    for cause in ("moe.dispatch", "moe.combine"):
        row = rows[(cause, "all-to-all")]
        assert row["bytes"] == row["theory_bytes"] > 0, (cause, row)
        assert row["bytes_by_name"] == row["bytes"], (cause, row)
        # The textbook's top_k copies of each token; capacity pads the slots by the capacity factor.
        assert 1 <= row["bytes"] / row["textbook_bytes"] <= 2 * MOE.config.moe_capacity_factor, row
    assert unattributed_share(rows) <= 0.05


DENSE = config.preset("gpt-pico")


@pytest.mark.parametrize(
    "spec, impl, cfg, batch, microbatches, message",
    [
        ("dp=2,ep=4", "gspmd", DENSE, 8, 1, "this model is dense"),
        ("dp=1,ep=8", "shard_map", MOE.config.replace(n_experts=4), 8, 1, "does not split over ep=8"),
        ("pp=2,ep=4", "shard_map", MOE.config, 8, 2, "not yet with pp=2"),
        ("dp=2,ep=4", "gspmd", MOE.config, 16, 2, "runs under --impl shard_map"),
        ("dp=2,ep=4", "shard_map", MOE.config.replace(moe_group_rows=3), 16, 1, "moe_group_rows=3"),
    ],
)
def test_layouts_an_moe_cannot_run_are_refused_before_compiling(
    spec, impl, cfg, batch, microbatches, message
):
    with pytest.raises(ValueError, match=message):
        layout.check(make_mesh(spec), "dp", impl, cfg, batch, TASK.seq_len, microbatches)


def test_config_validation():
    with pytest.raises(ValueError, match="moe_top_k"):
        config.preset("gpt-moe-pico", moe_top_k=3)
    with pytest.raises(ValueError, match="n_experts"):
        config.preset("gpt-pico", n_experts=1)
    cfg = config.preset("gpt-moe-pico", moe_top_k=2)
    assert cfg.expert_capacity(11) == 4  # ceil(2 x 11 x 1.25 / 8)
    assert cfg.replace(moe_capacity_factor=0).expert_capacity(11) == 11  # dropless
    # top-1 over 8 experts of the dense MLP's size: a token's active params are the dense model's, plus
    # the router
    dense = config.preset("gpt-pico")
    assert cfg.replace(moe_top_k=1).n_params(active=True) == dense.n_params() + 2 * 64 * 8


def test_generation_routes_on_ep_like_one_device_with_one_compile():
    """Greedy tokens on dp=2,ep=4 equal one device's; params typed on the explicit twin mesh (as an explicit
    run leaves them) are placed into the generation layout, not refused."""
    params = initial_state(moe=True).params
    prompts = [list(TASK.rows(0, range(8))[0][r, : TASK.length]) for r in range(8)]
    want = generate.generate(MOE, params, prompts, 4)
    mesh = make_mesh("dp=2,ep=4")
    typed = jax.device_put(
        params, jax.sharding.NamedSharding(explicit_mesh(mesh), jax.sharding.PartitionSpec())
    )
    generator = generate.Generator(MOE, mesh, "dp", len(prompts))
    got = generator(typed, prompts, 4)
    assert [list(t) for t in got] == [list(t) for t in want]
    assert generator._jitted._cache_size() == 1


def test_dense_presets_are_unchanged():
    """The MoE fields default to a dense MLP: the dense presets' params are those of before."""
    params = jax.eval_shape(lambda: GPT(DENSE).init(jax.random.key(0), np.zeros((1, 1), np.int32)))
    assert "mlp" in params["params"]["blocks"] and "moe" not in params["params"]["blocks"]
    assert DENSE.n_params() == DENSE.n_params(active=True) == 112_384  # gpt-pico's count before MoE


def test_the_report_shows_routing_per_layer():
    run = {
        "name": "dp=2,ep=4 dp",
        "moe": {"steps": [1, 5], "at": [{"load": [[3, 1], [2, 2]], "dropped": [1, 0], "choices": 4}] * 2},
    }
    html = "".join(html_report._routing([run, {"name": "dense", "moe": None}]))
    assert "Expert routing" in html and "25%, 0%" in html and "1.50x, 1.00x" in html
    assert html.count("<tr><td>") == 2  # the dense run has no rows


def test_top2_routing_keeps_first_choices_first_and_respects_the_capacity():
    """GShard's top-2 on one group: every expert holds at most its capacity, each slot at most one token,
    a token at most 2 slots whose gates sum to 1 where both are kept; second choices never displace a
    first choice (all first choices are placed before any second)."""
    cfg = MOE.config.replace(moe_top_k=2, n_experts=4)
    module = moe.MoE(cfg, GLOBAL_VIEW)
    x = jax.random.normal(jax.random.key(1), (1, 11, cfg.n_embd))
    router = jax.random.normal(jax.random.key(2), (cfg.n_embd, cfg.n_experts))
    capacity = cfg.expert_capacity(11)  # ceil(2 x 11 x 1.25 / 4) = 7
    (dispatch, combine), stats = module.apply(
        {}, x, router, capacity, method=moe.MoE._route, mutable=[moe.STATS]
    )
    dispatch, combine = np.asarray(dispatch[0]), np.asarray(combine[0])  # (G, E, C)
    assert capacity == 7 and dispatch.sum((0, 2)).max() <= capacity and dispatch.sum(0).max() <= 1
    per_token = dispatch.sum((1, 2))
    assert per_token.max() <= 2
    both = per_token == 2
    np.testing.assert_allclose(combine.sum((1, 2))[both], 1, rtol=1e-6)
    probs = np.asarray(jax.nn.softmax(x[0] @ router))
    first = probs.argmax(-1)
    kept_first = dispatch[np.arange(11), first].sum(-1)
    expert_full = dispatch.sum((0, 2)) >= capacity
    # A first choice is dropped only where its expert is full of first choices.
    assert all(kept_first[t] or expert_full[first[t]] for t in range(11))
    dropped = float(moe.sown(stats[moe.STATS], "dropped")[0])
    assert dropped == 2 * 11 - dispatch.sum()
