"""Reading weight files: .safetensors, .npz, torch .pt/.bin and Hugging Face model directories.

Each becomes a numpy state dict plus the hints its metadata gives (n_head, GELU, eps...), read on the host
before anything else happens; weights.py maps the tensors onto the model.
"""

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# nanoGPT's model_args and a Hugging Face GPT2Config's keys -> ModelConfig fields (dropout has no twin).
_NANOGPT_ARGS = dict(n_layer="n_layer", n_head="n_head", n_embd="n_embd", block_size="block_size")
_NANOGPT_ARGS |= dict(vocab_size="vocab_size", bias="use_bias")
_HF_CONFIG = dict(n_layer="n_layer", n_embd="n_embd", n_positions="block_size", vocab_size="vocab_size")
# Hugging Face's activation names -> gelu_approximate: its three tanh GELUs are one function, "gelu" is erf.
_HF_GELUS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}


class WeightFile(NamedTuple):
    """A state dict and what its file says beyond the shapes, as ModelConfig fields (n_head, GELU, ...)."""

    state_dict: dict[str, np.ndarray]
    hints: dict[str, Any]


def read_weight_file(path: str | Path) -> WeightFile:
    """Read .safetensors, .npz, .pt/.bin (with torch) or a Hugging Face model directory, with its hints."""
    path = Path(path)
    if path.is_dir():
        return _load_hf_dir(path)
    suffix = path.suffix.lower()
    # A missing path without a suffix is most likely a directory that is not there: say so.
    if suffix not in (".safetensors", ".npz", ".pt", ".bin", ".pth") and (suffix or path.exists()):
        raise ValueError(
            f"{path}: unknown checkpoint format {suffix!r}; use .safetensors, .npz, .pt, .bin or a "
            "Hugging Face model directory"
        )
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if suffix in (".pt", ".bin", ".pth"):
        return _load_torch(path)
    try:
        if suffix == ".safetensors":
            import safetensors.numpy

            return WeightFile(safetensors.numpy.load_file(path), {})
        with np.load(path, allow_pickle=False) as npz:
            return WeightFile({name: npz[name] for name in npz.files}, {})  # read all now: truncation raises
    except Exception as e:  # safetensors, zipfile and numpy each raise their own kinds
        raise ValueError(f"{path}: not a readable {suffix} checkpoint (truncated or corrupt?): {e}") from e


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of read_weight_file(path), as numpy arrays, without its hints."""
    return read_weight_file(path).state_dict


def _load_torch(path: Path) -> WeightFile:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading .pt/.bin checkpoints needs torch, which is not installed; install it, or "
            "convert the file to .safetensors where torch is available"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    hints = {}
    if isinstance(state.get("model_args"), dict):  # nanoGPT's ckpt.pt: {"model": sd, "model_args": {...}}
        args = state["model_args"]
        hints = {ours: args[theirs] for theirs, ours in _NANOGPT_ARGS.items() if args.get(theirs) is not None}
        hints["gelu_approximate"] = False  # nanoGPT's MLP is nn.GELU(): exact erf
    state = state.get("model", state)
    # numpy has no bfloat16: floats go through fp32, which our params use anyway.
    sd = {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}
    return WeightFile(sd, hints)


def _load_hf_dir(path: Path) -> WeightFile:
    """A `save_pretrained` directory: config.json for the hints, model.safetensors (or its shards)."""
    index = path / "model.safetensors.index.json"
    files = [path / "model.safetensors"]
    if index.exists():  # save_pretrained shards models over its max_shard_size
        files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not (path / "config.json").exists() or not all(f.exists() for f in files):
        raise ValueError(
            f"{path}: a checkpoint directory must be a Hugging Face save_pretrained one, with config.json "
            f"and model.safetensors; it has {sorted(p.name for p in path.iterdir()) or 'nothing'}"
        )
    hints = _hf_hints(json.loads((path / "config.json").read_text()), path)
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd |= read_weight_file(f).state_dict
    return WeightFile(sd, hints)


def _hf_hints(hf: dict[str, Any], path: Path) -> dict[str, Any]:
    """ModelConfig fields from a GPT2Config's config.json; GPT2Config's defaults where a key is absent."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}: config.json has model_type {hf['model_type']!r}; only gpt2 is supported")
    # Attention variants our model does not compute: importing them would give wrong numbers silently.
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            f"{path}: scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True is not supported"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in _HF_GELUS:
        raise ValueError(
            f"{path}: activation_function {act!r} is not supported; use one of {', '.join(_HF_GELUS)}"
        )
    hints = {ours: hf[theirs] for theirs, ours in _HF_CONFIG.items() if hf.get(theirs) is not None}
    hints |= dict(n_head=hf.get("n_head", 12), ln_eps=hf.get("layer_norm_epsilon", 1e-5))
    return hints | dict(gelu_approximate=_HF_GELUS[act])
