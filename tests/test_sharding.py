"""Spec arithmetic: the rule tables on a fake mesh, and the real state's shardings."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from shardgpt.model import config
from shardgpt.model.gpt import GPT, LOGICAL_AXES
from shardgpt.parallel import sharding
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import optim, train

# What DESIGN.md's table says `embed` maps to, per ZeRO stage and target.
EMBED_ON_DP = {
    "dp": {"params": False, "grads": False, "opt_state": False},
    "zero1": {"params": False, "grads": False, "opt_state": True},
    "zero2": {"params": False, "grads": True, "opt_state": True},
    "zero3": {"params": True, "grads": True, "opt_state": True},
}


@pytest.mark.parametrize("strategy", list(sharding.STRATEGIES))
def test_rule_table_matches_design(strategy):
    act = dict(sharding.rules(strategy, "activations"))
    assert act["batch"] == ("dp", "ep") and act["embed"] is None  # every device its own rows
    assert (act["expert"], act["moe_groups"]) == ("ep", "dp")
    for target in ("params", "grads", "opt_state"):
        table = dict(sharding.rules(strategy, target))
        assert table["embed"] == ("dp" if EMBED_ON_DP[strategy][target] else None), (strategy, target)
        assert table["batch"] is None and table["expert"] == "ep" and table["moe_groups"] is None
    for target in sharding.TARGETS:
        table = dict(sharding.rules(strategy, target))
        assert set(table) == set(LOGICAL_AXES)
        assert (table["heads"], table["mlp"], table["vocab"]) == ("tp", "tp", "tp")
        assert table["kv"] is None
        # pp splits the stacked layers of the state; cp the activations' sequence (size 1: nothing).
        assert (table["layers"], table["length"]) == (
            ("pp", None) if target != "activations" else (None, "cp")
        )
    assert dict(sharding.rules(f"{strategy}+sp", "activations"))["length"] == "tp"


def test_fsdp_is_zero3_and_unknown_strategy_raises():
    assert sharding.rules("fsdp", "params") == sharding.rules("zero3", "params")
    with pytest.raises(ValueError, match="unknown strategy 'zero4'; choose one of dp, zero1"):
        sharding.rules("zero4", "params")


def test_translation_is_strict():
    rules = sharding.rules("zero3", "params")
    assert sharding.logical_to_spec(("embed", "heads", "kv"), rules) == P("dp", "tp", None)
    assert sharding.logical_to_spec(("layers", "mlp", "embed"), rules) == P("pp", "tp", "dp")
    with pytest.raises(ValueError, match="'seq' has no rule"):
        sharding.logical_to_spec(("seq",), rules)
    with pytest.raises(ValueError, match="two dims on one mesh axis"):
        sharding.logical_to_spec(("heads", "mlp"), rules)


def test_table_prints_every_strategy_and_target():
    text = sharding.strategy_table()
    for strategy in sharding.STRATEGIES:
        for target in sharding.TARGETS:
            assert f"{strategy:<8} {target}" in text


def _expected_spec(names, strategy, target, mesh_shape):
    """DESIGN.md's table, restated independently of sharding.rules."""
    stage = sharding.STRATEGIES[strategy]
    from_stage = {"opt_state": 1, "grads": 2, "params": 3}[target]
    axes = []
    for name in names:
        if name in ("heads", "mlp", "vocab"):
            axes.append("tp")
        elif name == "layers":
            axes.append("pp")
        elif name == "embed" and stage >= from_stage:
            axes.append("dp")
        else:
            axes.append(None)
    return P(*axes)


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("scan", [True, False])
def test_real_state_shardings_follow_the_table(strategy, scan):
    cfg = config.preset("gpt-pico", scan_layers=scan, n_layer=2)
    model, tx = GPT(cfg), optim.make_optimizer(optim.OptimConfig())
    mesh = make_mesh("dp=2,tp=4")
    shardings = train.state_shardings(model, tx, mesh, strategy)
    axes = shardings.params_axes
    flat_axes = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, P))
    for target, tree in (("params", shardings.state.params), ("grads", shardings.grads)):
        flat = dict(jax.tree_util.tree_leaves_with_path(tree))
        for path, names in flat_axes:
            assert flat[path].spec == _expected_spec(names, strategy, target, mesh.shape), (target, path)
    mu = shardings.state.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's chain -> ScaleByAdamState
    for path, names in flat_axes:
        assert dict(jax.tree_util.tree_leaves_with_path(mu))[path].spec == _expected_spec(
            names, strategy, "opt_state", mesh.shape
        )


def test_every_param_has_one_vocabulary_name_per_dim_and_every_rule_is_used():
    used = set()
    for scan in (True, False):
        for tie, name in ((True, "gpt-pico"), (False, "gpt-pico"), (False, "gpt-moe-pico")):
            cfg = config.preset(name, scan_layers=scan, tie_embeddings=tie)
            axes = train.param_axes(GPT(cfg))
            boxed = jax.eval_shape(GPT(cfg).init, jax.random.key(0), np.zeros((1, 1), np.int32))
            params = jax.tree.leaves(nn.unbox(boxed["params"]))
            flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, P))
            assert len(params) == len(flat_axes)
            for leaf, names in zip(params, flat_axes, strict=True):
                assert len(names) == leaf.ndim, (names, leaf.shape)
                assert all(n in LOGICAL_AXES for n in names), names
                used.update(names)
    # Activation-only names are used by the model's constraints (batch, an MoE's dispatched groups), the
    # cache (length) and params.
    unused = set(LOGICAL_AXES) - used - {"batch", "moe_groups"}
    assert not unused, f"rules no param uses: {unused}"
    for strategy in sharding.STRATEGIES:
        for target in sharding.TARGETS:
            assert {name for name, _ in sharding.rules(strategy, target)} <= set(LOGICAL_AXES)


@pytest.mark.parametrize(
    "model_kw, spec, strategy, message",
    [
        (dict(n_head=6, n_embd=48), "tp=8", "dp", r"heads=6\) is not divisible by mesh axis tp=8"),
        (dict(n_embd=36, n_head=4), "dp=8", "zero1", r"embed=36\) is not divisible by mesh axis dp=8"),
        (
            dict(vocab_multiple=4, vocab_size=10),
            "tp=8",
            "dp",
            r"vocab=12\) is not divisible by mesh axis tp=8",
        ),
        (dict(mlp_ratio=3, n_embd=72, n_head=8), "dp=2,tp=4", "dp", None),
    ],
)
def test_indivisible_dims_raise_before_compiling(model_kw, spec, strategy, message):
    cfg = config.preset("gpt-pico", **model_kw)
    tx = optim.make_optimizer(optim.OptimConfig())
    if message is None:  # mlp 216 and heads 8 both divide by tp=4: no error
        train.state_shardings(GPT(cfg), tx, make_mesh(spec), strategy)
        return
    with pytest.raises(ValueError, match=message):
        train.state_shardings(GPT(cfg), tx, make_mesh(spec), strategy)


def test_embed_on_dp_is_fine_for_plain_dp():
    cfg = config.preset("gpt-pico", n_embd=36, n_head=4)
    train.state_shardings(GPT(cfg), optim.make_optimizer(optim.OptimConfig()), make_mesh("dp=8"), "dp")
