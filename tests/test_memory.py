"""What each ZeRO stage shards away is gone from what XLA compiles, in GSPMD and in shard_map.

Compile-only: the step is lowered on abstract state and batch (shapes and shardings, nothing allocated) and
compiled once per (impl, strategy, dtype). The model is sized so the state dominates XLA's temporaries:
4 layers of n_embd 512 (12.7M params, 48 MiB in fp32) at batch 8 x 16 on dp=8.
"""

import math
import pathlib
import tempfile
from typing import NamedTuple

import jax
import pytest

from shardgpt.analysis import metrics
from shardgpt.lab import plan
from shardgpt.model import config
from shardgpt.model.gpt import GPT
from shardgpt.parallel import sharding
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import optim, shard_map_step, train

DP, BATCH, SEQ = 8, 8, 16
CONFIG = config.ModelConfig(n_layer=4, n_head=8, n_embd=512, vocab_size=64, block_size=SEQ)
TX = optim.make_optimizer(optim.OptimConfig())
MAKE = {"gspmd": train.make_train_step, "shard_map": shard_map_step.make_train_step}
MiB = 2**20

# XLA:CPU has no bf16 collectives: its float-normalization-bf16 pass widens every bf16 all-gather to f32
# (GPU and TPU keep them). The gathers are read from the partitioned program just before that pass.
_WIDENING_PASS = "float-normalization-bf16"


class Compiled(NamedTuple):
    memory: dict[str, int]  # metrics.compiled_memory
    hlo: str  # after SPMD partitioning, before XLA:CPU widens bf16 collectives


def _compile(impl: str, strategy: str, dtype: str) -> Compiled:
    model, mesh = GPT(CONFIG.replace(dtype=dtype)), make_mesh(f"dp={DP}")
    lowered = plan.lower_step(MAKE[impl], model, TX, mesh, strategy, BATCH, SEQ)
    with tempfile.TemporaryDirectory() as dump:
        compiled = lowered.compile({"xla_dump_to": dump, "xla_dump_hlo_pass_re": _WIDENING_PASS})
        before = sorted(pathlib.Path(dump).glob(f"*before_{_WIDENING_PASS}.txt"))
        hlo = before[0].read_text() if before else compiled.as_text()  # no such pass: nothing widened
    return Compiled(metrics.compiled_memory(compiled), hlo)


@pytest.fixture(scope="module")
def compiled():
    """compiled(impl, strategy, dtype="float32") -> Compiled, each compiled at most once in this module."""
    cache: dict[tuple[str, str, str], Compiled] = {}

    def get(impl: str, strategy: str, dtype: str = "float32") -> Compiled:
        if (impl, strategy, dtype) not in cache:
            cache[impl, strategy, dtype] = _compile(impl, strategy, dtype)
        return cache[impl, strategy, dtype]

    return get


def _param_bytes(strategy: str, target: str) -> tuple[int, int]:
    """fp32 bytes of the params whose `target` rules put a dim on dp, and of the rest (replicated on dp)."""
    model = GPT(CONFIG)
    shapes = jax.eval_shape(lambda: train.init_params(model, jax.random.key(0)))
    rules = dict(sharding.rules(strategy, target))
    on_dp = replicated = 0
    for leaf, names in zip(jax.tree.leaves(shapes), jax.tree.leaves(train.param_axes(model)), strict=True):
        nbytes = 4 * math.prod(leaf.shape)
        if any(rules[name] == "dp" for name in names):
            on_dp += nbytes
        else:
            replicated += nbytes
    return on_dp, replicated


@pytest.mark.parametrize("impl", list(MAKE))
def test_zero2_frees_the_gradient_it_shards(impl, compiled):
    zero1, zero2 = (compiled(impl, strategy).memory["temp_bytes"] for strategy in ("zero1", "zero2"))
    sharded_away = _param_bytes("zero2", "grads")[0] * (DP - 1) / DP
    assert zero2 <= zero1 - 0.8 * sharded_away, (
        f"{impl}: zero2's temporaries are {zero2 / MiB:.1f} MiB, zero1's {zero1 / MiB:.1f} MiB, but zero2 "
        f"shards {sharded_away / MiB:.1f} MiB of gradient away: a whole gradient is still live somewhere "
        "(reduce-scatter each layer's gradient as the backward pass produces it)"
    )


@pytest.mark.parametrize("impl", list(MAKE))
def test_zero3_holds_a_dp_share_of_the_state(impl, compiled):
    on_dp, replicated = _param_bytes("zero3", "params")
    expected = 3 * (on_dp / DP + replicated)  # params and Adam's two moments; counts and batch are noise
    arguments = compiled(impl, "zero3").memory["argument_bytes"]
    assert abs(arguments - expected) <= 0.03 * expected, (
        f"{impl}: zero3's arguments are {arguments / MiB:.2f} MiB, expected {expected / MiB:.2f} MiB "
        "(3 x params / dp, plus the leaves the rules replicate): the state is not laid out as the rules say"
    )


@pytest.mark.parametrize("impl", list(MAKE))
def test_zero3_gathers_weights_in_the_compute_dtype(impl, compiled):
    gathered = {
        dtype: metrics.collectives(compiled(impl, "zero3", dtype).hlo, per_execution=False)["all-gather"]
        for dtype in ("float32", "bfloat16")
    }
    # Only the embeddings and LayerNorms (fp32 compute, 0.6% of the bytes) are gathered in fp32 in bf16.
    ratio = gathered["bfloat16"]["bytes"] / gathered["float32"]["bytes"]
    assert gathered["bfloat16"]["count"] == gathered["float32"]["count"] and 0.49 <= ratio <= 0.51, (
        f"{impl}: zero3 gathers {ratio:.2f}x fp32's bytes in bf16 ({gathered}): cast each shard to the "
        "compute dtype, then gather it"
    )
