"""Model configuration: one frozen dataclass, named presets, type-checked overrides."""

import dataclasses
import math
from typing import Any

_GPT2 = dict(vocab_size=50257, block_size=1024, tie_embeddings=True)  # GPT-2 ties its head to wte

# Architecture presets. minGPT's names and sizes, GPT-2's four, and `gpt-pico`, the smallest model whose
# head count (8) every tp in {1, 2, 4, 8} divides: the tests' workhorse.
PRESETS: dict[str, dict[str, int | bool]] = {
    "gpt-pico": dict(n_layer=2, n_head=8, n_embd=64),
    "gpt-nano": dict(n_layer=3, n_head=3, n_embd=48),
    "gpt-micro": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt-mini": dict(n_layer=6, n_head=6, n_embd=192),
    "gopher-44m": dict(n_layer=8, n_head=16, n_embd=512),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, **_GPT2),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, **_GPT2),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, **_GPT2),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, **_GPT2),
    # Mixture-of-experts: every block's MLP is n_experts experts, each the dense MLP's size, and a router.
    # Top-1, so a token's active params (and FLOPs) equal the dense preset's: the comparison is like for like.
    "gpt-moe-pico": dict(n_layer=2, n_head=8, n_embd=64, n_experts=8),
    "gpt2-moe": dict(n_layer=12, n_head=12, n_embd=768, n_experts=8, **_GPT2),
}

# No float16: its 5-bit exponent underflows small gradients without loss scaling, which shardgpt does not do;
# bfloat16 has fp32's range in the same 16 bits.
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn")
RING_LAYOUTS = (
    "contiguous",
    "zigzag",
)  # shardgpt.parallel.ring_attention.LAYOUTS (imported there, not here: no jax)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A minGPT-style GPT. Params are always fp32; `dtype` is the compute dtype."""

    n_layer: int = 2
    n_head: int = 8
    n_embd: int = 64
    vocab_size: int = 64
    block_size: int = 64
    mlp_ratio: int = 4
    # Vocab is padded up to a multiple of this so every tp up to it divides the vocab dim; padded ids are
    # masked out of the logits, so the model computes exactly the unpadded probabilities.
    vocab_multiple: int = 64
    use_bias: bool = True
    tie_embeddings: bool = False  # minGPT: separate lm_head; GPT-2 (Hugging Face): tied.
    ln_eps: float = 1e-5  # minGPT and GPT-2 use PyTorch's 1e-5 (flax defaults to 1e-6).
    gelu_approximate: bool = True  # minGPT and GPT-2: tanh approximation; nanoGPT: exact.
    dtype: str = "float32"
    attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" or "cudnn" (NVIDIA).
    scan_layers: bool = True  # nn.scan over blocks: compile time flat in depth; unrolled can run faster.
    remat: bool = False  # recompute each block's activations in the backward pass.
    # cp under shard_map: which positions each device holds. "zigzag": chunks i and 2 cp - 1 - i of 2 cp,
    # so every device does the same causal work (ring_attention.py); "contiguous": chunk i.
    ring_layout: str = "contiguous"
    # Mixture of experts (model/moe.py; 0 experts: the dense MLP). Tokens are routed in groups of
    # moe_group_rows whole sequences, each expert taking at most its capacity per group,
    # ceil(top_k x group tokens x capacity_factor / n_experts): set by the model and the sequence length,
    # never by the layout (the batch splits into whole rows), so which tokens are dropped does not depend
    # on the mesh. capacity_factor 0: dropless (capacity = the group).
    n_experts: int = 0
    moe_top_k: int = 1  # 1: Switch; 2: GShard (the two gates renormalised to sum to 1)
    moe_capacity_factor: float = 1.25
    moe_group_rows: int = 1
    moe_aux_weight: float = 0.01  # the load-balancing loss's weight (Switch: E x sum_e f_e P_e)

    def __post_init__(self):
        for name in (
            "n_layer",
            "n_head",
            "n_embd",
            "vocab_size",
            "block_size",
            "mlp_ratio",
            "vocab_multiple",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "pick n_embd a multiple of n_head"
            )
        if self.dtype == "float16":
            raise ValueError(
                "dtype float16 needs loss scaling, which shardgpt does not do (its gradients would "
                "underflow): use bfloat16, which has fp32's range in the same 16 bits"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not self.ln_eps > 0:
            raise ValueError(
                f"ModelConfig.ln_eps must be > 0 (LayerNorm divides by sqrt(var + eps)), got {self.ln_eps}"
            )
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(
                f"unknown attention {self.attention!r}: choose one of {', '.join(ATTENTION_IMPLS)}"
            )
        if self.n_experts < 0 or self.n_experts == 1:
            raise ValueError(f"n_experts must be 0 (a dense MLP) or >= 2, got {self.n_experts}")
        if self.n_experts and not 1 <= self.moe_top_k <= min(2, self.n_experts):
            raise ValueError(f"moe_top_k must be 1 or 2 (and at most n_experts), got {self.moe_top_k}")
        if self.n_experts and (self.moe_group_rows < 1 or self.moe_capacity_factor < 0):
            raise ValueError(
                f"moe_group_rows must be >= 1 and moe_capacity_factor >= 0 (0: dropless), got "
                f"{self.moe_group_rows} and {self.moe_capacity_factor}"
            )
        if self.ring_layout not in RING_LAYOUTS:
            raise ValueError(
                f"unknown ring_layout {self.ring_layout!r}: choose one of {', '.join(RING_LAYOUTS)}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_dim(self) -> int:
        return self.mlp_ratio * self.n_embd

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def expert_capacity(self, group: int) -> int:
        """Tokens each expert takes from a routing group of `group` tokens (dropless: the whole group)."""
        if not self.moe_capacity_factor:
            return group
        return min(group, math.ceil(self.moe_top_k * group * self.moe_capacity_factor / self.n_experts))

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with fields replaced; each value is checked against (or coerced to) the field's type."""
        return replace_typed(self, "model", overrides)

    def n_params(self, include_embeddings: bool = True, active: bool = False) -> int:
        """Parameter count (unpadded vocab); without embeddings it is the N of the 6N FLOPs rule. `active`:
        the params one token computes with (an MoE's router and top_k of its experts)."""
        d, f, v = self.n_embd, self.mlp_dim, self.vocab_size
        b = int(self.use_bias)
        ln = d * (1 + b)  # scale (+ bias)
        mlp = (d * f + f * b) + (f * d + d * b)
        if self.moe:
            mlp = d * self.n_experts + (self.moe_top_k if active else self.n_experts) * mlp
        block = 2 * ln + (3 * d * d + 3 * d * b) + (d * d + d * b) + mlp
        body = self.n_layer * block + ln
        head = 0 if self.tie_embeddings else d * v
        embeddings = v * d + self.block_size * d
        return body + head + (embeddings if include_embeddings else 0)


def replace_typed(config: Any, what: str, overrides: dict[str, Any]) -> Any:
    """A copy of the frozen dataclass `config` with fields replaced, each value checked against (or
    coerced from a string to) the field's type: how --model.FIELD=VALUE and --optim.FIELD=VALUE apply."""
    fields = [f.name for f in dataclasses.fields(config)]
    typed = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown {what} field {key!r}; known fields: {', '.join(fields)}")
        typed[key] = _coerce(f"{what} field {key!r}", value, type(getattr(config, key)))
    return dataclasses.replace(config, **typed)


def _coerce(where: str, value: Any, kind: type) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            if kind is bool:
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return kind(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{where} takes a {kind.__name__}, got {value!r}")


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's config with `overrides` applied, e.g. preset("gpt-mini", vocab_size=3)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig().replace(**PRESETS[name]).replace(**overrides)
