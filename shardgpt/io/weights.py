"""Weights in and out: GPT-2-named state dicts (minGPT, nanoGPT, Hugging Face) onto any mesh, and back.

Names are GPT-2's (`transformer.h.{i}.attn.c_attn.weight`, ...). Two layouts of the four matmul weights:
"linear" (torch nn.Linear, out x in: minGPT, nanoGPT) and "conv1d" (Hugging Face's Conv1D, in x out).
Everything is validated on the host before the first byte is placed, so an error leaves nothing half-loaded.
"""

import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh

from shardgpt.io.weight_files import read_weight_file
from shardgpt.model.config import ModelConfig
from shardgpt.model.gpt import GPT
from shardgpt.parallel import distributed
from shardgpt.training import train

LAYOUTS = ("linear", "conv1d")
# Export flavours: whose strict load_state_dict the file is for -> (matmul layout, write causal masks?).
# minGPT registers a persistent `attn.bias` mask per layer (so does nanoGPT without flash attention, torch<2);
# nanoGPT with flash attention registers none, and Hugging Face's GPT2 masks are non-persistent, so neither
# wants them. Import drops the masks either way.
FLAVOURS = {"mingpt": ("linear", True), "nanogpt": ("linear", False), "hf": ("conv1d", False)}
# The matmul weights whose layout differs; embeddings and lm_head are (vocab, embed) in every layout.
_MATMULS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Prefixes that name no tensor: torch.compile's wrapper and the GPT2LMHeadModel body.
_PREFIXES = ("_orig_mod.", "transformer.")
_LAYER = re.compile(r"^h\.(\d+)\.")

Flat = dict[tuple[str, ...], np.ndarray]


def _canonical(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    """Strip wrapper prefixes and drop known non-parameter buffers (causal masks)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state_dict.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        value = np.asarray(value)
        # Causal-mask buffers (minGPT's, nanoGPT's without flash, older HF's): (1, 1, T, T) and a scalar.
        if name.endswith(".attn.masked_bias") or (name.endswith(".attn.bias") and value.ndim == 4):
            continue
        if name in out:
            raise ValueError(f"state dict names {name!r} twice (with and without a prefix)")
        out[name] = value
    return out


def detect_layout(state_dict: dict[str, Any], layout: str | None = None) -> str:
    """The given layout, checked; else the one c_attn's shape says: (3D, D) linear, (D, 3D) conv1d."""
    if layout is not None:
        return _checked(layout)
    sd = _canonical(state_dict)
    for name in ("wte.weight", "h.0.attn.c_attn.weight"):
        if name not in sd:
            raise ValueError(f"state dict has no {name}: not a GPT-2-named state dict ({_some_keys(sd)})")
    d = sd["wte.weight"].shape[1]
    shape = sd["h.0.attn.c_attn.weight"].shape
    layouts = {(3 * d, d): "linear", (d, 3 * d): "conv1d"}
    if shape not in layouts:
        raise ValueError(f"h.0.attn.c_attn.weight has shape {shape}; expected {(3 * d, d)} or {(d, 3 * d)}")
    return layouts[shape]


def config_from_state_dict(
    state_dict: dict[str, Any],
    n_head: int | None = None,
    *,
    hints: dict[str, Any] | None = None,
    **overrides: Any,
) -> ModelConfig:
    """The ModelConfig of the shapes, then the file's hints (n_head, GELU, eps), then n_head and overrides."""
    hints = hints or {}
    if n_head is not None:
        overrides = dict(overrides, n_head=n_head)
    if "n_head" not in overrides and "n_head" not in hints:
        raise ValueError("n_head cannot be read from the tensor shapes: pass it (GPT-2 124M has 12 heads)")
    sd = _canonical(state_dict)
    layout = detect_layout(sd)
    vocab, d = sd["wte.weight"].shape
    c_fc = sd.get("h.0.mlp.c_fc.weight")
    if c_fc is None:
        raise ValueError(f"state dict has no h.0.mlp.c_fc.weight ({_some_keys(sd)})")
    width = c_fc.shape[0] if layout == "linear" else c_fc.shape[1]
    if width % d:
        raise ValueError(f"MLP width {width} (h.0.mlp.c_fc.weight) is not a multiple of n_embd={d}")
    head = sd.get("lm_head.weight")
    inferred = dict(
        n_layer=1 + max(int(m.group(1)) for k in sd if (m := _LAYER.match(k))),
        n_embd=d,
        vocab_size=vocab,
        block_size=sd["wpe.weight"].shape[0] if "wpe.weight" in sd else ModelConfig.block_size,
        mlp_ratio=width // d,
        use_bias="h.0.attn.c_attn.bias" in sd,
        # Tied when the head is absent (HF safetensors) or is the same tensor (nanoGPT's state_dict).
        tie_embeddings=head is None or np.array_equal(head, sd["wte.weight"]),
    )
    # Metadata that contradicts the tensors describes some other model: trust neither.
    clash = [
        f"{k}={v!r} but the tensors say {inferred[k]!r}" for k, v in hints.items() if inferred.get(k, v) != v
    ]
    if clash:
        raise ValueError("checkpoint metadata does not match its tensors: " + "; ".join(clash))
    return ModelConfig().replace(**(inferred | hints | overrides))


def _gpt2_shapes(config: ModelConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the config needs, by canonical GPT-2 name, with its shape in `layout`."""
    d, f, v = config.n_embd, config.mlp_dim, config.vocab_size
    io = (lambda i, o: (i, o)) if layout == "conv1d" else (lambda i, o: (o, i))
    shapes = {"wte.weight": (v, d), "wpe.weight": (config.block_size, d), "ln_f.weight": (d,)}
    layer = {
        "ln_1.weight": (d,),
        "attn.c_attn.weight": io(d, 3 * d),
        "attn.c_proj.weight": io(d, d),
        "ln_2.weight": (d,),
        "mlp.c_fc.weight": io(d, f),
        "mlp.c_proj.weight": io(f, d),
    }
    if config.use_bias:
        shapes["ln_f.bias"] = (d,)
        layer |= {"ln_1.bias": (d,), "attn.c_attn.bias": (3 * d,), "attn.c_proj.bias": (d,)}
        layer |= {"ln_2.bias": (d,), "mlp.c_fc.bias": (f,), "mlp.c_proj.bias": (d,)}
    for i in range(config.n_layer):
        shapes |= {f"h.{i}.{name}": shape for name, shape in layer.items()}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _validate(sd: dict[str, np.ndarray], config: ModelConfig, layout: str):
    """Raise listing every missing, unexpected or mis-shaped tensor; say why a tied head is refused."""
    expected = _gpt2_shapes(config, layout)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected) - optional)
    if missing or unexpected:
        hint = ""
        if "lm_head.weight" in missing:
            hint = " (a checkpoint without lm_head.weight ties it to wte: set tie_embeddings=True)"
        if any(k.endswith(".bias") for k in unexpected) and not config.use_bias:
            hint += " (bias tensors present: set use_bias=True)"
        raise ValueError(
            f"state dict does not match the config{hint}: missing {missing or 'none'}; "
            f"unexpected {unexpected or 'none'}"
        )
    wrong = [f"{k}: file {sd[k].shape} vs config {s}" for k, s in expected.items() if sd[k].shape != s]
    if wrong:
        raise ValueError(f"shape mismatch with the config ({layout} layout): " + "; ".join(wrong))
    head = sd.get("lm_head.weight")
    if config.tie_embeddings and head is not None and not np.array_equal(head, sd["wte.weight"]):
        raise ValueError("lm_head.weight differs from wte.weight but tie_embeddings=True: set it False")


def _layer_to_ours(t: dict[str, np.ndarray], config: ModelConfig) -> Flat:
    """One layer's GPT-2 tensors (matmuls in x out) -> our per-layer params, heads kept as their own dim."""
    d, h, k = config.n_embd, config.n_head, config.head_dim
    qkv = t["attn.c_attn.weight"].reshape(d, 3, h, k)  # GPT-2 splits q|k|v, then each into heads h-major
    ours = {
        ("ln_1", "scale"): t["ln_1.weight"],
        ("attn", "query", "kernel"): qkv[:, 0],
        ("attn", "key", "kernel"): qkv[:, 1],
        ("attn", "value", "kernel"): qkv[:, 2],
        ("attn", "out", "kernel"): t["attn.c_proj.weight"].reshape(h, k, d),
        ("ln_2", "scale"): t["ln_2.weight"],
        ("mlp", "up", "kernel"): t["mlp.c_fc.weight"],
        ("mlp", "down", "kernel"): t["mlp.c_proj.weight"],
    }
    if config.use_bias:
        qkv_b = t["attn.c_attn.bias"].reshape(3, h, k)
        ours |= {("ln_1", "bias"): t["ln_1.bias"], ("ln_2", "bias"): t["ln_2.bias"]}
        ours |= {("attn", name, "bias"): qkv_b[i] for i, name in enumerate(("query", "key", "value"))}
        ours |= {("attn", "out", "bias"): t["attn.c_proj.bias"]}
        ours |= {("mlp", "up", "bias"): t["mlp.c_fc.bias"], ("mlp", "down", "bias"): t["mlp.c_proj.bias"]}
    return ours


def _layer_to_gpt2(p: Flat, config: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of _layer_to_ours."""
    d, f = config.n_embd, config.mlp_dim
    qkv = [p[("attn", name, "kernel")] for name in ("query", "key", "value")]
    t = {
        "ln_1.weight": p[("ln_1", "scale")],
        "attn.c_attn.weight": np.stack(qkv, axis=1).reshape(d, 3 * d),
        "attn.c_proj.weight": p[("attn", "out", "kernel")].reshape(d, d),
        "ln_2.weight": p[("ln_2", "scale")],
        "mlp.c_fc.weight": p[("mlp", "up", "kernel")].reshape(d, f),
        "mlp.c_proj.weight": p[("mlp", "down", "kernel")].reshape(f, d),
    }
    if config.use_bias:
        qkv_b = [p[("attn", name, "bias")] for name in ("query", "key", "value")]
        t |= {"ln_1.bias": p[("ln_1", "bias")], "ln_2.bias": p[("ln_2", "bias")]}
        t |= {
            "attn.c_attn.bias": np.stack(qkv_b).reshape(3 * d),
            "attn.c_proj.bias": p[("attn", "out", "bias")],
        }
        t |= {"mlp.c_fc.bias": p[("mlp", "up", "bias")], "mlp.c_proj.bias": p[("mlp", "down", "bias")]}
    return t


def _to_ours(sd: dict[str, np.ndarray], config: ModelConfig, layout: str) -> dict[str, Any]:
    """A validated canonical state dict -> our params tree as host fp32 arrays (vocab padded with zeros)."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    pad = config.padded_vocab_size - config.vocab_size
    flat: Flat = {("wte",): np.pad(sd["wte.weight"], ((0, pad), (0, 0))), ("wpe",): sd["wpe.weight"]}
    flat[("ln_f", "scale")] = sd["ln_f.weight"]
    if config.use_bias:
        flat[("ln_f", "bias")] = sd["ln_f.bias"]
    if not config.tie_embeddings:
        flat[("lm_head", "kernel")] = np.pad(sd["lm_head.weight"], ((0, pad), (0, 0))).T
    layers = []
    for i in range(config.n_layer):
        t = {k.removeprefix(f"h.{i}."): a for k, a in sd.items() if k.startswith(f"h.{i}.")}
        if layout == "linear":
            t |= {name: t[name].T for name in _MATMULS}
        layers.append(_layer_to_ours(t, config))
    for path in layers[0]:
        if config.scan_layers:  # nn.scan stacks each param on a leading `layers` axis
            flat[("blocks", *path)] = np.stack([layer[path] for layer in layers])
        else:
            flat |= {(f"block_{i}", *path): layer[path] for i, layer in enumerate(layers)}
    return traverse_util.unflatten_dict({k: np.ascontiguousarray(v) for k, v in flat.items()})


def import_params(
    state_dict: dict[str, Any], config: ModelConfig, mesh: Mesh, strategy: str, layout: str | None = None
) -> Any:
    """GPT-2-named tensors -> our params, each placed straight into its sharding for mesh and strategy.

    Every check (keys, shapes, tied head, divisibility on the mesh) runs before anything is placed, and
    each device receives only its own slice (jax.make_array_from_callback), never the whole model.
    """
    sd = _canonical(state_dict)
    layout = detect_layout(sd, layout)
    _validate(sd, config, layout)
    model = GPT(config)
    abstract = jax.eval_shape(lambda: train.init_params(model, jax.random.key(0)))
    shardings = train.param_shardings(model, mesh, strategy)
    host = _to_ours(sd, config, layout)
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract).items()}
    got = {k: v.shape for k, v in traverse_util.flatten_dict(host).items()}
    if got != expected:  # a bug here, not in the file: the file already matched the config
        raise ValueError(f"internal: converted params {got} do not match the model's {expected}")
    return distributed.place(host, shardings)


def to_state_dict(
    params: Any, config: ModelConfig, layout: str | None = None, flavour: str | None = None
) -> dict[str, np.ndarray]:
    """Our params (sharded or not) -> GPT-2-named host arrays, vocab padding dropped.

    `flavour` ("mingpt", "nanogpt", "hf") writes what that library's strict load_state_dict wants (see
    FLAVOURS); without one, the tensors alone in `layout` (default "linear").
    """
    layout, masks = _flavoured(layout, flavour)
    if flavour == "nanogpt" and (not config.tie_embeddings or config.gelu_approximate):
        # nanoGPT ties lm_head to wte and uses exact GELU: a file of another model would load strictly and
        # compute another function.
        raise ValueError(
            "nanoGPT's GPT ties its head to wte and uses exact GELU; this model has "
            f"tie_embeddings={config.tie_embeddings}, gelu_approximate={config.gelu_approximate}: export "
            "another flavour (mingpt, hf), or train with --model.tie_embeddings=true "
            "--model.gelu_approximate=false"
        )
    # minGPT's registered causal mask, one per layer: tril of ones, float32 like its torch.ones.
    mask_1x1xTxT = np.tril(np.ones((1, 1, config.block_size, config.block_size), np.float32))
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(distributed.to_host(params)).items()}
    v = config.vocab_size
    wte = flat[("wte",)][:v]
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": flat[("wpe",)]}
    sd["transformer.ln_f.weight"] = flat[("ln_f", "scale")]
    if config.use_bias:
        sd["transformer.ln_f.bias"] = flat[("ln_f", "bias")]
    for i in range(config.n_layer):
        if config.scan_layers:
            p = {k[1:]: a[i] for k, a in flat.items() if k[0] == "blocks"}
        else:
            p = {k[1:]: a for k, a in flat.items() if k[0] == f"block_{i}"}
        t = _layer_to_gpt2(p, config)
        if layout == "linear":
            t |= {name: t[name].T for name in _MATMULS}
        sd |= {f"transformer.h.{i}.{name}": a for name, a in t.items()}
        if masks:
            sd[f"transformer.h.{i}.attn.bias"] = mask_1x1xTxT
    # Written even when tied: every strict load_state_dict expects the key (nanoGPT's and HF's state_dict()
    # list the tied tensor under both names).
    sd["lm_head.weight"] = wte.copy() if config.tie_embeddings else flat[("lm_head", "kernel")][:, :v].T
    return {k: np.ascontiguousarray(a) for k, a in sd.items()}


def export_params(
    params: Any, config: ModelConfig, path: str | Path, layout: str | None = None, flavour: str | None = None
) -> Path:
    """Write to_state_dict(params, config, layout, flavour) as .safetensors or .npz; import reads it back."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".npz"):
        raise ValueError(f"{path}: export writes .safetensors or .npz, not {path.suffix!r}")
    sd = to_state_dict(params, config, layout, flavour)  # every process takes part in the gather
    if jax.process_index() != 0:
        return path  # one writer
    if path.suffix == ".safetensors":
        import safetensors.numpy

        # Hugging Face's loader refuses safetensors files without a framework tag.
        safetensors.numpy.save_file(sd, path, metadata={"format": "pt"})
    else:
        np.savez(path, **sd)
    return path


def load_params(
    path: str | Path,
    mesh: Mesh,
    strategy: str,
    n_head: int | None = None,
    layout: str | None = None,
    **overrides: Any,
) -> tuple[Any, ModelConfig]:
    """(params, config) from a checkpoint; the config from its shapes, hints and `overrides`: --init-from."""
    sd, hints = read_weight_file(path)
    config = config_from_state_dict(sd, n_head, hints=hints, **overrides)
    return import_params(sd, config, mesh, strategy, layout), config


def state_from_params(
    params: Any, model: GPT, tx: optax.GradientTransformation, mesh: Mesh, strategy: str
) -> tuple[train.TrainState, train.StateShardings]:
    """(state, shardings) at step 0 from imported params: the optimizer state is created sharded."""
    shardings = train.state_shardings(model, tx, mesh, strategy)
    params = jax.device_put(params, shardings.state.params)  # a no-op when already placed for `strategy`
    opt_state = jax.jit(tx.init, out_shardings=shardings.state.opt_state)(params)
    step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings.state.step)()
    return train.TrainState(step=step, params=params, opt_state=opt_state), shardings


def _flavoured(layout: str | None, flavour: str | None) -> tuple[str, bool]:
    """(layout, write causal masks?) for an export; a layout the flavour contradicts is an error."""
    if flavour is None:
        return _checked(layout or "linear"), False
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    flavour_layout, masks = FLAVOURS[flavour]
    if layout not in (None, flavour_layout):
        raise ValueError(
            f"flavour {flavour!r} writes the {flavour_layout} layout, not {layout!r}: drop layout"
        )
    return flavour_layout, masks


def _checked(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def _some_keys(sd: dict[str, Any], n: int = 6) -> str:
    keys = list(sd)
    return "keys: " + ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")
