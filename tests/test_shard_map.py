"""shard_map == GSPMD: every strategy written by hand trains exactly like its GSPMD twin, with the collectives
it promises and no others.

Tolerances (fp32, 3 AdamW steps at lr 1e-3 with clipping active, the grad norms being ~3-4 > 1): losses and
grad norms within 1e-5 absolute; step 1's gradients leaf by leaf within 1e-5 of each leaf's largest value,
and the params and Adam's moments after 3 steps within 2e-4 of each leaf's largest (tests/_runs.py
leaf_errors), the step counts exactly. Only the order of floating-point reductions differs: observed max
differences are ~1e-7 on losses, 6.6e-7 (relative) on gradients and 6.5e-5 on state. The GSPMD twin is
itself compared with one device leaf by leaf (test_equivalence), so each shard_map run is too, with no
compile of its own. The batches ignore a different number of targets on every row, so the dp shards hold
unequal token counts and a per-shard mean (instead of the global one) would fail the comparison.
"""

import re

import _runs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _runs import (
    MODEL,
    TASK,
    TX,
    assert_grads_match,
    assert_state_matches,
    by_cause,
    initial_state,
    off_theory,
    run,
    unattributed_share,
)
from jax.sharding import PartitionSpec as P

from shardgpt.analysis import metrics
from shardgpt.parallel import layout, sharding
from shardgpt.parallel.mesh import make_mesh
from shardgpt.parallel.shard_map_plan import ShardMapPlan
from shardgpt.training import data, loss, optim, shard_map_step, train

N_LAYER = MODEL.config.n_layer
STRATEGIES = list(sharding.STRATEGIES)
# On tp=8 (dp=1) the ZeRO stages have nothing to shard: every one compiles to dp's program there, so tp=8
# runs dp only (the suite's time; test_equivalence runs zero3 there under GSPMD); the others run all four.
CASES = [(spec, s) for spec in ("dp=2,tp=4", "dp=8") for s in STRATEGIES] + [("tp=8", "dp")]


@pytest.mark.parametrize("spec, strategy", CASES)
def test_shard_map_trains_like_gspmd(spec, strategy):
    ref, got, where = run("gspmd", spec, strategy), run("shard_map", spec, strategy), f"{spec} {strategy}"
    assert ref.losses[-1] < ref.losses[0] and ref.grad_norms.min() > 1, "vacuous: no learning or no clipping"
    np.testing.assert_allclose(got.losses, ref.losses, rtol=0, atol=1e-5, err_msg=f"{where} losses")
    np.testing.assert_allclose(got.grad_norms, ref.grad_norms, rtol=0, atol=1e-5, err_msg=f"{where} norms")
    assert_grads_match(got, ref, where)
    assert_state_matches(got, ref, where)


# Collectives per step (loops multiplied by their trip count), as XLA's CPU backend compiles them for
# gpt-pico (N=2 layers; 21 param leaves, 17 with an `embed` dim). Derivation, with XLA's all-reduce combiner
# merging independent all-reduces into one tuple op (so several psums can count once):
# - tp: per layer 2 all-reduces forward (Megatron's g after out and down) and 2 backward (f's transpose
#   before qkv and up), + 1 backward before the lm_head, + the vocab-parallel embedding's 1, + the
#   cross-entropy's pmax and psum, + 1 for the grad norm: 4N + 5 = 13 on tp=8.
# - dp adds the combined (gradients + loss and token count [+ norm]) all-reduce; zero1 also a norm psum
#   over its dp-sharded update. (The token count is psummed with the loss after the backward pass: a psum
#   of the targets alone would run beside the forward's collectives, which starved XLA:CPU's threads.)
#   zero2/zero3's grad-norm psum over their dp-sharded gradients waits for that psum (the gradients are
#   scaled by the count first), so it cannot combine with it: one more.
# - zero1/zero2: 17 all-gathers of the updated params (one per embed leaf; not combined on CPU); zero2
#   reduce-scatters those 17 gradients in the backward pass, each layer's as it is made (2 x 12 in the layer
#   loop + 5 outside it: 29), and all-reduces only the 4 bias leaves without an embed dim.
# - zero3: forward gathers all 17 embed leaves (2 x 12 in the layer loop + 5 outside it), backward gathers
#   again the 8 per layer whose gradient needs them (6 kernels, 2 LayerNorm scales: 16); the 29 gathers'
#   transposes are the 29 reduce-scatters.
EXPECTED = {
    ("dp=8", "dp"): dict(all_reduce=1),
    ("dp=8", "zero1"): dict(all_reduce=2, all_gather=17),
    ("dp=8", "zero2"): dict(all_reduce=2, all_gather=17, reduce_scatter=29),
    ("dp=8", "zero3"): dict(all_reduce=2, all_gather=45, reduce_scatter=29),
    ("tp=8", "dp"): dict(all_reduce=13),
    ("dp=2,tp=4", "dp"): dict(all_reduce=14),
    ("dp=2,tp=4", "zero1"): dict(all_reduce=16, all_gather=17),
    ("dp=2,tp=4", "zero2"): dict(all_reduce=16, all_gather=17, reduce_scatter=29),
    ("dp=2,tp=4", "zero3"): dict(all_reduce=16, all_gather=45, reduce_scatter=29),
}
_COLLECTIVE = re.compile(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(-start)?\(")


def _counts(hlo: str) -> dict[str, int]:
    return {k.replace("-", "_"): v["count"] for k, v in metrics.collectives(hlo).items() if v["count"]}


def test_both_implementations_compile_the_one_fused_loss():
    """shard_map and GSPMD run loss.py's chunked head loss (its scopes in both programs); under shard_map
    its vocab-parallel max and sums are the loss's own, over tp, and its temporaries stay within 1% of
    GSPMD's (both hold one chunk's logits, never the whole batch's)."""
    gspmd, manual = run("gspmd", "dp=2,tp=4", "dp"), run("shard_map", "dp=2,tp=4", "dp")
    for impl, program in (("gspmd", gspmd.hlo), ("shard_map", manual.hlo)):
        assert "head_cross_entropy" in program, f"{impl} does not compile the fused loss"
    ops = metrics.collective_ops(manual.hlo)
    in_loss = {
        (op.op_name.rsplit("/", 2)[-2], op.group_size) for op in ops if "head_cross_entropy" in op.op_name
    }
    assert {("vocab_ce_max", 4), ("vocab_ce_sum", 4)} <= in_loss, in_loss
    assert manual.temp_bytes <= 1.01 * gspmd.temp_bytes, (manual.temp_bytes, gspmd.temp_bytes)


def _scoped(hlo: str, scope: str, backward: bool, per_execution: bool = True) -> dict[str, dict[str, int]]:
    """metrics.collectives of only the ops that `scope` (a jax.named_scope) issued, forward or backward."""

    def keep(line: str) -> bool:
        op_name = line.partition('op_name="')[2].partition('"')[0]
        return bool(re.search(rf"[(/:]{scope}[/):]", op_name)) and ("transpose(" in op_name) == backward

    lines = [
        line
        if not (m := _COLLECTIVE.search(line)) or keep(line)
        else line[: m.start()] + "custom-call(" + line[m.end() :]
        for line in hlo.splitlines()
    ]
    return metrics.collectives("\n".join(lines), per_execution)


@pytest.mark.parametrize("impl", ["gspmd", "shard_map"])
def test_the_compiled_step_names_its_phases(impl):
    """Profiles and HLO op names show the step's phases: forward, backward (jax names it the forward's
    transpose), the gradient reduction (GSPMD's scaling and constraint; shard_map's psum) and the update."""
    op_names = re.findall(r'op_name="([^"]*)"', run(impl, "dp=2,tp=4", "dp").hlo)
    reduction = "grad_reduce/" if impl == "gspmd" else "grad_all_reduce/"
    phases = {
        "forward": lambda n: "jvp(forward)/" in n and "transpose(" not in n,
        "backward": lambda n: "transpose(jvp(forward))/" in n,
        "gradient reduction": lambda n: reduction in n,
        "optimizer": lambda n: "/optimizer/" in n,
    }
    missing = [phase for phase, named in phases.items() if not any(map(named, op_names))]
    assert not missing, f"{impl}: no op carries the named scope of {missing}: see train.make_train_step"


@pytest.mark.parametrize("spec, strategy", CASES)
def test_collectives_are_exactly_the_promised_ones(spec, strategy):
    assert _counts(run("shard_map", spec, strategy)[3]) == EXPECTED[spec, strategy]


def _param_bytes(embed_only: bool | None = None) -> int:
    """fp32 bytes of the params (None), of those with an embed dim (True) or of those without (False)."""
    shapes = jax.eval_shape(lambda: train.init_params(MODEL, jax.random.key(0)))
    axes = jax.tree.leaves(train.param_axes(MODEL), is_leaf=lambda x: isinstance(x, P))
    return sum(
        4 * leaf.size
        for leaf, names in zip(jax.tree.leaves(shapes), axes, strict=True)
        if embed_only is None or ("embed" in names) == embed_only
    )


def test_dp_reduces_the_gradients_once():
    hlo = run("shard_map", "dp=8", "dp")[3]
    grads = _scoped(hlo, "grad_all_reduce", backward=False)["all-reduce"]
    # XLA combines the per-leaf psums into one tuple all-reduce (with the loss's psum): one op, all grads.
    assert grads["count"] == 1 and _param_bytes() <= grads["bytes"] <= _param_bytes() + 16


def test_zero2_reduce_scatters_gradients_and_never_all_reduces_them_whole():
    hlo, dp = run("shard_map", "dp=8", "zero2")[3], 8
    scattered = _scoped(hlo, "grad_reduce_scatter", backward=True)["reduce-scatter"]
    assert scattered == {"count": N_LAYER * 12 + 5, "bytes": _param_bytes(embed_only=True) // dp}
    # Inside the backward layer loop, as each layer's gradient is made: its body holds one layer's 12.
    static = _scoped(hlo, "grad_reduce_scatter", backward=True, per_execution=False)["reduce-scatter"]
    assert static["count"] == 12 + 5
    # Only the small bias leaves without an embed dim are all-reduced (in the combined tuple op).
    all_reduced = metrics.collectives(hlo)["all-reduce"]["bytes"]
    assert all_reduced <= _param_bytes(embed_only=False) + 64 < _param_bytes(embed_only=True) // dp


def test_zero3_gathers_each_layer_in_forward_and_again_in_backward():
    hlo = run("shard_map", "dp=8", "zero3")[3]
    forward = _scoped(hlo, "zero3_gather", backward=False)["all-gather"]["count"]
    backward = _scoped(hlo, "zero3_gather", backward=True)
    assert forward == N_LAYER * 12 + 5  # every embed leaf: 12 per layer, 5 outside the layers
    assert backward["all-gather"]["count"] == N_LAYER * 8  # 6 kernels + 2 LayerNorm scales per layer
    assert backward["reduce-scatter"]["count"] == forward  # each gather's transpose
    # Inside the scanned layer loop: the loop body holds one layer's gathers, run N times.
    static = _scoped(hlo, "zero3_gather", backward=False, per_execution=False)["all-gather"]["count"]
    assert static == 12 + 5


def test_megatron_has_two_all_reduces_per_layer_each_way():
    hlo = run("shard_map", "tp=8", "dp")[3]
    assert _scoped(hlo, "megatron_g", backward=False)["all-reduce"]["count"] == 2 * N_LAYER
    assert _scoped(hlo, "megatron_g", backward=False, per_execution=False)["all-reduce"]["count"] == 2
    assert _scoped(hlo, "megatron_f", backward=True)["all-reduce"]["count"] == 2 * N_LAYER + 1  # + lm_head
    assert _scoped(hlo, "vocab_embed", backward=False)["all-reduce"]["count"] == 1


def test_the_one_cross_entropy_over_vocab_slices_matches_optax_on_whole_logits():
    """loss.cross_entropy_sum under shard_map's plan (each device one vocab slice of a padded vocab) equals
    optax's cross-entropy on the whole, unpadded logits."""
    mesh = make_mesh("tp=8")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 64)).astype(np.float32)  # 50 real ids, padded to 64
    targets = rng.integers(0, 50, (2, 5)).astype(np.int32)
    targets[0, :2] = data.IGNORE_INDEX
    plan = ShardMapPlan(mesh, "dp")

    def loss_(logits_, targets_):
        total, count = loss.cross_entropy_sum(logits_, targets_, 50, plan)
        return total / count

    sharded = jax.jit(
        jax.shard_map(loss_, mesh=mesh, in_specs=(P(None, None, "tp"), P()), out_specs=P(), check_vma=True)
    )
    keep = targets != data.IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[..., :50], np.where(keep, targets, 0))
    np.testing.assert_allclose(sharded(logits, targets), per_token[keep].mean(), rtol=1e-6)
    # Without a vocab_size every id of the (global) vocab is real, also when each device holds a slice.
    whole = jax.shard_map(
        lambda l_, t_: loss.cross_entropy_sum(l_, t_, plan=plan), mesh=mesh,
        in_specs=(P(None, None, "tp"), P()), out_specs=(P(), P()), check_vma=True,
    )  # fmt: skip
    total, count = jax.jit(whole)(logits, targets)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, np.where(keep, targets, 0))
    np.testing.assert_allclose(total / count, per_token[keep].mean(), rtol=1e-6)


def test_gspmd_steps_with_any_optax_optimizer():
    """GSPMD holds whole gradients: a plain optax transformation (one that takes no grad_norm) traces."""
    mesh = make_mesh("dp=8")
    plain = optax.scale(-1e-3)  # plain SGD: a bare GradientTransformation, no extra arguments
    state, shardings = train.abstract_state(MODEL, plain, mesh, "dp")  # lowered only: nothing allocated
    train.make_train_step(MODEL, plain, mesh, "dp", shardings).jitted.lower(state, _runs.batch(0, mesh))


def test_bad_input_gets_the_gspmd_errors():
    mesh = make_mesh("dp=4,tp=2")
    shardings = train.state_shardings(MODEL, TX, mesh, "zero1")
    state = jax.device_put(initial_state(), shardings.state)
    step = shard_map_step.make_train_step(MODEL, TX, mesh, "zero1", shardings)
    for rows, length in ((6, TASK.seq_len), (8, MODEL.config.block_size + 1)):
        with pytest.raises(ValueError) as gspmd:
            layout.check_batch(MODEL.config, mesh, "zero1", rows, length)
        bad = np.zeros((rows, length), np.int32)
        with pytest.raises(ValueError, match=re.escape(str(gspmd.value))):
            step(state, {"inputs": bad, "targets": bad})
    with pytest.raises(ValueError) as gspmd:
        train.make_train_step(MODEL, TX, mesh, "zero4", shardings)
    with pytest.raises(ValueError, match=re.escape(str(gspmd.value))):
        shard_map_step.make_train_step(MODEL, TX, mesh, "zero4", shardings)
    with pytest.raises(ValueError, match="not made for strategy 'zero3'"):
        shard_map_step.make_train_step(MODEL, TX, mesh, "zero3", shardings)


def test_clip_takes_the_global_norm_and_matches_optax_without_it():
    """optim's clip (the hook shard_map_step passes the global norm through) is optax's without a norm."""
    clip = optim.clip_by_global_norm(1.0)
    grads = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(4)}
    ours, _ = clip.update(grads, clip.init(grads))
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    for mine, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    given, _ = clip.update(grads, clip.init(grads), grad_norm=jnp.float32(20.0))
    np.testing.assert_allclose(given["b"], grads["b"] / 20.0, rtol=1e-6)


@pytest.mark.parametrize("spec, strategy", CASES[:8])
def test_shard_map_collectives_equal_theory_cause_by_cause(spec, strategy):
    """Issue 14: every compiled byte has a cause, and each cause's bytes are exactly theory's (fp32): a
    collective too many (a param gathered twice, a gradient reduced in the wrong place) fails here."""
    rows = by_cause("shard_map", spec, strategy)
    assert not off_theory(rows), f"{spec} {strategy}: compiled vs theory bytes differ for {off_theory(rows)}"
    assert unattributed_share(rows) == 0


@pytest.mark.parametrize("spec, strategy", CASES[:8])
def test_gspmd_collectives_are_attributed_by_name_and_match_theory(spec, strategy):
    """GSPMD inserts its collectives itself: the scopes the model, the loss and the step place, and the
    module paths naming a param of the op's shape, still attribute >= 95% of its bytes by name (not by mesh
    axes). Megatron, ZeRO-3's forward gathers, the ZeRO-1/2 param gathers and the loss match theory's
    bytes; the gradient reduction too, over all its kinds, where XLA:CPU's reduce-scatter (an all-reduce
    whose uses slice it) moves the whole all-reduce: dp x theory's shard; the clipping norm reduces f32
    scalars, at most one per gradient leaf and axis (GSPMD reduces each leaf's partial sum of squares)."""
    rows = by_cause("gspmd", spec, strategy)
    total = sum(r["bytes"] for r in rows.values())
    by_name = sum(r["bytes_by_name"] for r in rows.values())
    assert by_name >= 0.95 * total, f"{spec} {strategy}: {1 - by_name / total:.1%} not attributed by name"
    for (cause, kind), r in rows.items():
        if cause.startswith(("attn", "mlp", "embed", "head", "zero3_gather.fwd", "param_gather", "loss")):
            assert r["bytes"] == r["theory_bytes"], f"{spec} {strategy} {cause} {kind}: {r}"
    dp = make_mesh(spec).shape["dp"]
    grads = {kind: r for (cause, kind), r in rows.items() if cause == "grad_reduce"}
    compiled = sum(r["bytes"] for r in grads.values())
    sliced = sum(r["sliced_bytes"] for r in grads.values())
    theory = sum(r["theory_bytes"] * (dp if kind == "reduce-scatter" and r["sliced_bytes"] else 1)
                 for kind, r in grads.items())  # fmt: skip
    assert compiled == theory and (sliced or dp == 1 or strategy in ("dp", "zero1")), (spec, strategy, grads)
    norm = rows.get(("optimizer", "all-reduce"), {"dtypes": {"f32": 0}, "bytes": 0})  # dp: none to reduce
    leaves = len(jax.tree.leaves(initial_state().params))
    assert set(norm["dtypes"]) == {"f32"} and norm["bytes"] <= 4 * 2 * leaves, norm


def test_by_name_attribution_reads_names_never_axes():
    """With the op names blanked, nothing is attributed by name; with the mesh's axis names swapped, every
    byte attributed by name keeps its cause (GSPMD zero3 on dp=2,tp=4: the program the lab runs by
    default, compiled once for the test above)."""
    import dataclasses

    from shardgpt.analysis import attribution, hlo, theory

    mesh = make_mesh("dp=2,tp=4")
    shardings = train.state_shardings(MODEL, TX, mesh, "zero3")
    params = theory.param_shapes(jax.eval_shape(lambda: initial_state().params), shardings)
    ops = hlo.collective_ops(run("gspmd", "dp=2,tp=4", "zero3").hlo)
    named = lambda rows: {key: r["bytes_by_name"] for key, r in rows.items() if r["bytes_by_name"]}
    as_is = named(attribution.compiled_by_cause(ops, dict(mesh.shape), params))
    swapped = named(attribution.compiled_by_cause(ops, {"tp": 2, "dp": 4}, params))
    assert as_is == swapped and sum(as_is.values()) > 0
    blank = lambda op: dataclasses.replace(
        op, op_name="", parts=tuple(part._replace(op_name="") for part in op.parts)
    )
    blanked = attribution.compiled_by_cause([blank(op) for op in ops], dict(mesh.shape), params)
    assert sum(r["bytes_by_name"] for r in blanked.values()) == 0
    assert sum(r["bytes_by_axes"] for r in blanked.values()) > 0  # the axes still place some
