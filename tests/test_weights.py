"""Weights in and out: exact round trips, parity with a numpy GPT-2, and clear errors on bad files."""

import importlib.util
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from shardgpt.io import weight_files, weights
from shardgpt.lab import runner
from shardgpt.model.gpt import GPT
from shardgpt.parallel import sharding
from shardgpt.parallel.gspmd_plan import GSPMDPlan
from shardgpt.parallel.mesh import make_mesh
from shardgpt.training import train
from shardgpt.training.optim import OptimConfig, make_optimizer

# Tiny and awkward on purpose: vocab 50 is a multiple of nothing, so padding rows are exercised.
N_LAYER, N_HEAD, N_EMBD, VOCAB, BLOCK = 2, 8, 64, 50, 16
ATOL = 1e-4  # fp32 shardgpt vs the float64 numpy reference; logits are O(1-10) here
HAVE_TORCH = importlib.util.find_spec("torch") is not None
NEEDS_TORCH = "writing .pt fixtures and torch's strict load_state_dict need torch (pip install torch)"


def one_device():
    return make_mesh("dp=1", jax.devices()[:1])


def gpt2_state_dict(seed=0, *, layout="linear", bias=True, tied=False, prefix="transformer.") -> dict:
    """Random weights in GPT-2 naming, scaled so activations (and attention patterns) are O(1)."""
    rng = np.random.default_rng(seed)
    d, f = N_EMBD, 4 * N_EMBD
    normal = lambda *shape, std=1.0: (std * rng.standard_normal(shape)).astype(np.float32)

    def matmul(n_in, n_out):  # nn.Linear stores out x in, Conv1D in x out
        w = normal(n_in, n_out, std=1 / math.sqrt(n_in))
        return w.T.copy() if layout == "linear" else w

    sd = {"wte.weight": normal(VOCAB, d, std=0.5), "wpe.weight": normal(BLOCK, d, std=0.5)}
    for i in range(N_LAYER):
        sd |= {f"h.{i}.ln_1.weight": 1 + normal(d, std=0.1), f"h.{i}.ln_2.weight": 1 + normal(d, std=0.1)}
        sd |= {f"h.{i}.attn.c_attn.weight": matmul(d, 3 * d), f"h.{i}.attn.c_proj.weight": matmul(d, d)}
        sd |= {f"h.{i}.mlp.c_fc.weight": matmul(d, f), f"h.{i}.mlp.c_proj.weight": matmul(f, d)}
        if bias:
            sd |= {f"h.{i}.ln_1.bias": normal(d, std=0.1), f"h.{i}.ln_2.bias": normal(d, std=0.1)}
            sd |= {
                f"h.{i}.attn.c_attn.bias": normal(3 * d, std=0.1),
                f"h.{i}.attn.c_proj.bias": normal(d, std=0.1),
            }
            sd |= {f"h.{i}.mlp.c_fc.bias": normal(f, std=0.1), f"h.{i}.mlp.c_proj.bias": normal(d, std=0.1)}
    sd["ln_f.weight"] = 1 + normal(d, std=0.1)
    if bias:
        sd["ln_f.bias"] = normal(d, std=0.1)
    sd = {prefix + k: v for k, v in sd.items()}
    if not tied:
        sd["lm_head.weight"] = normal(VOCAB, d, std=0.5)
    return sd


def reference_logits(sd, tokens, n_head, layout, exact_gelu, eps=1e-5):
    """GPT-2's forward from its equations, in float64 numpy, reading the state dict directly."""
    sd = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in sd.items()}

    def linear(x, name):
        w = sd[name + ".weight"]
        y = x @ (w.T if layout == "linear" else w)
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * sd[name + ".weight"] + sd.get(name + ".bias", 0.0)

    def gelu(x):
        if exact_gelu:
            return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b, t = tokens.shape
    x = sd["wte.weight"][tokens] + sd["wpe.weight"][:t]
    d = x.shape[-1]
    k = d // n_head
    heads = lambda a: a.reshape(b, t, n_head, k).transpose(0, 2, 1, 3)
    n_layer = len({key.split(".")[1] for key in sd if key.startswith("h.")})
    for i in range(n_layer):
        q, key, v = np.split(linear(layer_norm(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, axis=-1)
        att = heads(q) @ heads(key).transpose(0, 1, 3, 2) / math.sqrt(k)
        att = np.where(np.tril(np.ones((t, t), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ heads(v)).transpose(0, 2, 1, 3).reshape(b, t, d)
        x = x + linear(y, f"h.{i}.attn.c_proj")
        x = x + linear(gelu(linear(layer_norm(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")), f"h.{i}.mlp.c_proj")
    x = layer_norm(x, "ln_f")
    return x @ sd.get("lm_head.weight", sd["wte.weight"]).T


def shardgpt_logits(params, config, mesh, strategy, tokens):
    """Our logits for the real vocab, run under the mesh with the strategy's activation rules."""
    model = GPT(config, GSPMDPlan(mesh, sharding.rules(strategy, "activations")))
    with jax.set_mesh(mesh):
        logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    return np.asarray(logits)[..., : config.vocab_size]


def tokens_for(seed=1, batch=2):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, BLOCK)).astype(np.int32)


@pytest.fixture
def placements(monkeypatch):
    """Counts device placements, to show a failed import placed nothing."""
    calls = []
    real = jax.make_array_from_callback
    monkeypatch.setattr(jax, "make_array_from_callback", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


# Both layouts x biased/unbiased x tied/untied, GELU exact or tanh, scanned and unrolled layers; the names
# say whose checkpoints each case looks like.
CASES = {
    "mingpt": dict(layout="linear", bias=True, tied=False, exact_gelu=False, scan=True),
    "nanogpt-nobias": dict(layout="linear", bias=False, tied=True, exact_gelu=True, scan=True),
    "nanogpt-bias": dict(layout="linear", bias=True, tied=True, exact_gelu=True, scan=False),
    "linear-nobias-untied": dict(layout="linear", bias=False, tied=False, exact_gelu=False, scan=False),
    "hf-gpt2": dict(layout="conv1d", bias=True, tied=True, exact_gelu=False, scan=True),
    "conv1d-bias-untied": dict(layout="conv1d", bias=True, tied=False, exact_gelu=True, scan=False),
    "conv1d-nobias-tied": dict(layout="conv1d", bias=False, tied=True, exact_gelu=False, scan=False),
    "conv1d-nobias-untied": dict(layout="conv1d", bias=False, tied=False, exact_gelu=True, scan=True),
}


@pytest.mark.parametrize("case", CASES)
def test_parity_with_numpy_gpt2_on_one_device(case):
    c = CASES[case]
    sd = gpt2_state_dict(layout=c["layout"], bias=c["bias"], tied=c["tied"])
    config = weights.config_from_state_dict(
        sd, N_HEAD, gelu_approximate=not c["exact_gelu"], scan_layers=c["scan"]
    )
    assert weights.detect_layout(sd) == c["layout"]
    assert (config.use_bias, config.tie_embeddings) == (c["bias"], c["tied"])
    assert (config.n_layer, config.n_embd, config.vocab_size, config.block_size) == (
        N_LAYER,
        N_EMBD,
        VOCAB,
        BLOCK,
    )
    params = weights.import_params(sd, config, one_device(), "dp")
    tokens = tokens_for()
    expected = reference_logits(sd, tokens, N_HEAD, c["layout"], c["exact_gelu"])
    np.testing.assert_allclose(
        shardgpt_logits(params, config, one_device(), "dp", tokens), expected, atol=ATOL
    )


@pytest.mark.parametrize("case", ["hf-gpt2", "linear-nobias-untied"])
def test_parity_with_numpy_gpt2_under_dp2_tp4(case):
    c = CASES[case]
    sd = gpt2_state_dict(seed=2, layout=c["layout"], bias=c["bias"], tied=c["tied"])
    config = weights.config_from_state_dict(
        sd, N_HEAD, gelu_approximate=not c["exact_gelu"], scan_layers=c["scan"]
    )
    mesh = make_mesh("dp=2,tp=4")
    params = weights.import_params(sd, config, mesh, "zero3")
    tokens = tokens_for(batch=4)
    expected = reference_logits(sd, tokens, N_HEAD, c["layout"], c["exact_gelu"])
    np.testing.assert_allclose(shardgpt_logits(params, config, mesh, "zero3", tokens), expected, atol=ATOL)


def assert_same_params(imported, original, config):
    """Bit-identical leaf by leaf, except vocab padding rows, which import fills with zeros."""
    flat_in = traverse_util.flatten_dict(jax.device_get(imported))
    flat_out = traverse_util.flatten_dict(jax.device_get(original))
    assert flat_in.keys() == flat_out.keys()
    v = config.vocab_size
    for path, a in flat_in.items():
        b = np.asarray(flat_out[path])
        a = np.asarray(a)
        if path == ("wte",):
            a, b, pad = a[:v], b[:v], a[v:]
        elif path == ("lm_head", "kernel"):
            a, b, pad = a[:, :v], b[:, :v], a[:, v:]
        else:
            pad = np.zeros(0)
        assert a.dtype == b.dtype == np.float32, path
        assert np.array_equal(a, b), f"{path} changed in the round trip"
        assert not pad.any(), f"{path}: padding rows must import as zeros"


@pytest.mark.parametrize("layout, suffix", [("linear", ".safetensors"), ("conv1d", ".npz")])
def test_round_trip_on_one_device_is_exact(tmp_path, layout, suffix):
    config = weights.config_from_state_dict(gpt2_state_dict(), N_HEAD, use_bias=True, tie_embeddings=False)
    init = jax.jit(lambda key: nn.unbox(GPT(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]))
    params = init(jax.random.key(3))  # random padding rows too, which import must not bring back
    path = weights.export_params(params, config, tmp_path / f"model{suffix}", layout=layout)
    sd = weight_files.load_state_dict(path)
    assert "lm_head.weight" in sd and "transformer.wte.weight" in sd
    assert weights.config_from_state_dict(sd, N_HEAD) == config
    imported = weights.import_params(sd, config, one_device(), "dp")
    assert_same_params(imported, params, config)
    # and file -> import -> export gives the file's tensors back exactly
    again = weights.to_state_dict(imported, config, layout)
    assert again.keys() == sd.keys() and all(np.array_equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_under_dp2_tp4_zero3_is_exact_and_sharded(tmp_path, tied):
    mesh = make_mesh("dp=2,tp=4")
    config = weights.config_from_state_dict(gpt2_state_dict(tied=tied), N_HEAD)
    model, tx = GPT(config), make_optimizer(OptimConfig())
    state, shardings = train.init_state(model, tx, mesh, "zero3", seed=4)
    path = weights.export_params(state.params, config, tmp_path / "model.safetensors")
    imported = weights.import_params(weight_files.load_state_dict(path), config, mesh, "zero3")
    assert_same_params(imported, state.params, config)
    placed = jax.tree.map(lambda a: a.sharding, imported)
    assert jax.tree.all(jax.tree.map(lambda a, b: a == b, placed, shardings.state.params))
    # zero3 x tp: each device holds an eighth of the head-split kernels, never the whole tensor
    query = imported["blocks"]["attn"]["query"]["kernel"]
    assert query.addressable_shards[0].data.shape == (N_LAYER, N_EMBD // 2, N_HEAD // 4, N_EMBD // N_HEAD)

    # --init-from: a TrainState at step 0 whose optimizer state is sharded like init_state's
    new_state, new_shardings = weights.state_from_params(imported, model, tx, mesh, "zero3")
    assert int(new_state.step) == 0 and new_state.params is not None
    same = jax.tree.map(lambda a, s: a.sharding == s, new_state.opt_state, new_shardings.state.opt_state)
    assert jax.tree.all(same)


def test_wrappers_and_buffers_are_ignored(placements):
    """torch.compile's `_orig_mod.` prefix, HF's prefix-less keys and causal-mask buffers all import."""
    clean = gpt2_state_dict(layout="conv1d", tied=True)
    messy = {"_orig_mod." + k: v for k, v in gpt2_state_dict(layout="conv1d", tied=True, prefix="").items()}
    for i in range(N_LAYER):
        messy[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, BLOCK, BLOCK), bool))
        messy[f"h.{i}.attn.masked_bias"] = np.float32(-1e4)
    config = weights.config_from_state_dict(messy, N_HEAD)
    assert config == weights.config_from_state_dict(clean, N_HEAD)
    a = weights.import_params(messy, config, one_device(), "dp")
    b = weights.import_params(clean, config, one_device(), "dp")
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_truncated_or_corrupt_file_raises(tmp_path, suffix):
    config = weights.config_from_state_dict(gpt2_state_dict(), N_HEAD)
    params = weights.import_params(gpt2_state_dict(), config, one_device(), "dp")
    path = weights.export_params(params, config, tmp_path / f"model{suffix}")
    data = path.read_bytes()
    for broken in (data[: len(data) - 100], data[: len(data) // 2], b"not a checkpoint" * 4):
        path.write_bytes(broken)
        with pytest.raises(ValueError, match=rf"model\{suffix}.*truncated or corrupt"):
            weight_files.load_state_dict(path)


def test_wrong_keys_are_listed_and_nothing_is_placed(placements):
    sd = gpt2_state_dict()
    config = weights.config_from_state_dict(sd, N_HEAD)
    del sd["transformer.h.1.mlp.c_fc.weight"]
    sd["transformer.h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"missing \['h.1.mlp.c_fc.weight'\].*unexpected \['h.0.attn.rotary"):
        weights.import_params(sd, config, one_device(), "dp")
    untied = config.replace(tie_embeddings=False)
    with pytest.raises(ValueError, match="tie_embeddings=True"):
        weights.import_params(gpt2_state_dict(tied=True), untied, one_device(), "dp")
    with pytest.raises(ValueError, match="use_bias=True"):
        weights.import_params(gpt2_state_dict(), config.replace(use_bias=False), one_device(), "dp")
    assert not placements


def test_wrong_shapes_name_the_tensor_and_nothing_is_placed(placements):
    sd = gpt2_state_dict()
    config = weights.config_from_state_dict(sd, N_HEAD)
    sd["transformer.wpe.weight"] = np.zeros((BLOCK + 1, N_EMBD), np.float32)
    with pytest.raises(ValueError, match=r"wpe.weight: file \(17, 64\) vs config \(16, 64\)"):
        weights.import_params(sd, config, one_device(), "dp")
    with pytest.raises(ValueError, match=r"h.0.attn.c_attn.weight: file \(192, 64\) vs config \(64, 192\)"):
        weights.import_params(gpt2_state_dict(), config, one_device(), "dp", layout="conv1d")
    tied = weights.config_from_state_dict(gpt2_state_dict(tied=True), N_HEAD)
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        weights.import_params(gpt2_state_dict(), tied, one_device(), "dp")
    with pytest.raises(ValueError, match="not divisible by mesh axis tp=8"):
        weights.import_params(gpt2_state_dict(), config.replace(n_head=4), make_mesh("tp=8"), "dp")
    assert not placements


def test_config_needs_n_head_and_known_formats(tmp_path):
    with pytest.raises(ValueError, match="n_head cannot be read"):
        weights.config_from_state_dict(gpt2_state_dict(), None)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        weight_files.load_state_dict(tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="unknown layout"):
        weights.detect_layout(gpt2_state_dict(), "transposed")
    with pytest.raises(ValueError, match="not a GPT-2-named state dict"):
        weights.config_from_state_dict({"model.embed_tokens.weight": np.zeros((4, 4))}, N_HEAD)
    with pytest.raises(ValueError, match="block_size=32 but the tensors say 16"):
        weights.config_from_state_dict(gpt2_state_dict(), hints=dict(n_head=N_HEAD, block_size=32))


@pytest.mark.skipif(
    HAVE_TORCH, reason="torch is installed: test_nanogpt_pt_brings_its_heads_and_exact_gelu reads real .pt"
)
def test_pt_without_torch_says_what_to_install(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"\x80\x02")
    with pytest.raises(ImportError, match="needs torch"):
        weight_files.load_state_dict(tmp_path / "model.pt")


def test_export_flavours_write_what_each_strict_load_wants(tmp_path):
    """minGPT's flavour adds its attn.bias causal masks; nanoGPT's and HF's have none; import drops them."""
    sd = gpt2_state_dict(seed=5)
    config = weights.config_from_state_dict(sd, N_HEAD)
    params = weights.import_params(sd, config, one_device(), "dp")
    plain = weights.to_state_dict(params, config)
    path = weights.export_params(params, config, tmp_path / "mingpt.safetensors", flavour="mingpt")
    mingpt = weight_files.load_state_dict(path)
    masks = {f"transformer.h.{i}.attn.bias" for i in range(N_LAYER)}
    assert mingpt.keys() == plain.keys() | masks
    for name in masks:
        assert mingpt[name].shape == (1, 1, BLOCK, BLOCK) and mingpt[name].dtype == np.float32
        assert np.array_equal(mingpt[name][0, 0], np.tril(np.ones((BLOCK, BLOCK))))
    exact = config.replace(gelu_approximate=False, tie_embeddings=True)  # what nanoGPT computes
    assert weights.to_state_dict(params, exact, flavour="nanogpt").keys() == plain.keys()
    for other in (config, exact.replace(tie_embeddings=False)):  # tanh GELU; an untied head
        with pytest.raises(ValueError, match="nanoGPT's GPT ties its head to wte and uses exact GELU"):
            weights.to_state_dict(params, other, flavour="nanogpt")
    hf = weights.to_state_dict(params, config, flavour="hf")
    assert hf.keys() == plain.keys() and weights.detect_layout(hf) == "conv1d"
    assert_same_params(weights.import_params(mingpt, config, one_device(), "dp"), params, config)
    with pytest.raises(ValueError, match="flavour 'hf' writes the conv1d layout, not 'linear'"):
        weights.to_state_dict(params, config, "linear", flavour="hf")
    with pytest.raises(ValueError, match="unknown flavour 'megatron'"):
        weights.to_state_dict(params, config, flavour="megatron")


def torch_gpt2(torch, masks: bool):
    """An empty torch module tree with minGPT's names (masks=True) or nanoGPT's with flash attention."""
    nn_, d = torch.nn, N_EMBD

    def block():
        attn = nn_.ModuleDict(dict(c_attn=nn_.Linear(d, 3 * d), c_proj=nn_.Linear(d, d)))
        if masks:  # minGPT's persistent causal-mask buffer
            attn.register_buffer("bias", torch.tril(torch.ones(BLOCK, BLOCK)).view(1, 1, BLOCK, BLOCK))
        mlp = nn_.ModuleDict(dict(c_fc=nn_.Linear(d, 4 * d), c_proj=nn_.Linear(4 * d, d)))
        return nn_.ModuleDict(dict(ln_1=nn_.LayerNorm(d), attn=attn, ln_2=nn_.LayerNorm(d), mlp=mlp))

    h = nn_.ModuleList([block() for _ in range(N_LAYER)])
    body = dict(wte=nn_.Embedding(VOCAB, d), wpe=nn_.Embedding(BLOCK, d), h=h, ln_f=nn_.LayerNorm(d))
    return nn_.ModuleDict(dict(transformer=nn_.ModuleDict(body), lm_head=nn_.Linear(d, VOCAB, bias=False)))


def test_strict_torch_loads_take_their_flavour():
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    sd = gpt2_state_dict(seed=6)
    config = weights.config_from_state_dict(sd, N_HEAD)
    params = weights.import_params(sd, config, one_device(), "dp")
    nano = config.replace(gelu_approximate=False, tie_embeddings=True)  # the model nanoGPT can compute
    export = lambda flavour: {
        k: torch.tensor(v)
        for k, v in weights.to_state_dict(params, nano if flavour == "nanogpt" else config, flavour).items()
    }
    mingpt, nanogpt = torch_gpt2(torch, masks=True), torch_gpt2(torch, masks=False)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*transformer.h.0.attn.bias"):
        mingpt.load_state_dict(export("nanogpt"))  # the issue: the plain export is refused
    mingpt.load_state_dict(export("mingpt"))
    nanogpt.load_state_dict(export("nanogpt"))
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*attn.bias"):
        nanogpt.load_state_dict(export("mingpt"))
    for model in (mingpt, nanogpt):
        w = model["transformer"]["h"][1]["attn"]["c_attn"].weight.detach().numpy()
        np.testing.assert_array_equal(w, sd["transformer.h.1.attn.c_attn.weight"])


def nanogpt_ckpt(torch, path, sd, **model_args):
    """nanoGPT's ckpt.pt: the state dict of a torch.compile'd model, its model_args and run metadata."""
    model = {"_orig_mod." + k: torch.from_numpy(v) for k, v in sd.items()}
    if "lm_head.weight" not in sd:  # nanoGPT ties by sharing one tensor, which state_dict lists twice
        model["_orig_mod.lm_head.weight"] = model["_orig_mod.transformer.wte.weight"]
    args = dict(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK, bias=False, vocab_size=VOCAB)
    ckpt = dict(model=model, model_args=args | dict(dropout=0.0) | model_args, iter_num=5)
    torch.save(ckpt | dict(best_val_loss=torch.tensor(1.5), config=dict(dataset="shakespeare_char")), path)
    return path


def test_nanogpt_pt_brings_its_heads_and_exact_gelu(tmp_path):
    torch = pytest.importorskip("torch", reason=NEEDS_TORCH)
    sd = gpt2_state_dict(seed=7, bias=False, tied=True)
    path = nanogpt_ckpt(torch, tmp_path / "ckpt.pt", sd)
    state_dict, hints = weight_files.read_weight_file(path)
    assert hints == dict(
        n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=BLOCK, vocab_size=VOCAB, use_bias=False
    ) | dict(gelu_approximate=False)
    config = weights.config_from_state_dict(state_dict, hints=hints)
    assert (config.n_head, config.gelu_approximate, config.tie_embeddings) == (N_HEAD, False, True)
    params = weights.import_params(state_dict, config, one_device(), "dp")
    tokens = tokens_for()
    expected = reference_logits(sd, tokens, N_HEAD, "linear", exact_gelu=True)
    np.testing.assert_allclose(
        shardgpt_logits(params, config, one_device(), "dp", tokens), expected, atol=ATOL
    )
    # --init-from needs no --model.n_head, even beside a preset of another width; --model.X still wins
    spec = runner.RunSpec(
        init_from=str(path), model="gpt-micro", mesh="dp=8", overrides=(("dtype", "bfloat16"),)
    )
    assert runner.prepare(spec).config == config.replace(dtype="bfloat16")
    explicit = weights.config_from_state_dict(state_dict, 4, hints=hints, gelu_approximate=True)
    assert (explicit.n_head, explicit.gelu_approximate) == (4, True)
    with pytest.raises(ValueError, match="n_embd=128 but the tensors say 64"):
        weights.load_params(nanogpt_ckpt(torch, tmp_path / "bad.pt", sd, n_embd=128), one_device(), "dp")


def hf_directory(path, sd, **config):
    """A save_pretrained directory: GPT2Config's config.json and model.safetensors (tied: no lm_head)."""
    path.mkdir()
    hf = dict(model_type="gpt2", n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, n_positions=BLOCK)
    hf |= dict(vocab_size=VOCAB, layer_norm_epsilon=1e-5, activation_function="gelu_new") | config
    (path / "config.json").write_text(json.dumps(hf))
    safetensors.numpy.save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("activation, exact", [("gelu_new", False), ("gelu", True)])
def test_hf_directory_brings_its_config(tmp_path, activation, exact):
    sd = gpt2_state_dict(seed=8, layout="conv1d", tied=True)
    path = hf_directory(tmp_path / "gpt2", sd, activation_function=activation, layer_norm_epsilon=1e-3)
    state_dict, hints = weight_files.read_weight_file(path)
    config = weights.config_from_state_dict(state_dict, hints=hints)
    assert (config.n_head, config.gelu_approximate, config.ln_eps) == (N_HEAD, not exact, 1e-3)
    params = weights.import_params(state_dict, config, one_device(), "dp")
    tokens = tokens_for()
    expected = reference_logits(sd, tokens, N_HEAD, "conv1d", exact, eps=1e-3)
    np.testing.assert_allclose(
        shardgpt_logits(params, config, one_device(), "dp", tokens), expected, atol=ATOL
    )
    spec = runner.RunSpec(
        init_from=str(path), model="gpt-micro", mesh="dp=8", overrides=(("dtype", "bfloat16"),)
    )
    assert runner.prepare(spec).config == config.replace(dtype="bfloat16")


def test_hf_directory_errors_say_what_is_wrong(tmp_path):
    sd = gpt2_state_dict(layout="conv1d", tied=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="with config.json and model.safetensors; it has nothing"):
        weight_files.read_weight_file(tmp_path / "empty")
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config.json and model.safetensors; it has \['config.json'\]"):
        runner.prepare(runner.RunSpec(init_from=str(tmp_path / "no-weights"), mesh="dp=8"))
    with pytest.raises(ValueError, match="activation_function 'relu' is not supported"):
        weight_files.read_weight_file(hf_directory(tmp_path / "relu", sd, activation_function="relu"))
    with pytest.raises(ValueError, match="model_type 'llama'; only gpt2"):
        weight_files.read_weight_file(hf_directory(tmp_path / "llama", sd, model_type="llama"))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        weight_files.read_weight_file(
            hf_directory(tmp_path / "mistral", sd, scale_attn_by_inverse_layer_idx=True)
        )
    with pytest.raises(ValueError, match="block_size=32 but the tensors say 16"):
        weights.load_params(hf_directory(tmp_path / "long", sd, n_positions=32), one_device(), "dp")


def test_init_from_overrides_beat_run_flags(tmp_path):
    """--model.dtype and friends win over --dtype/--scan with --init-from, as they do for presets."""
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file(gpt2_state_dict(seed=9), path)
    overrides = (("n_head", "8"), ("dtype", "bfloat16"), ("scan_layers", "false"))
    spec = runner.RunSpec(init_from=str(path), mesh="dp=8", dtype="float32", scan=True, overrides=overrides)
    config = runner.prepare(spec).config
    assert (config.n_head, config.dtype, config.scan_layers) == (N_HEAD, "bfloat16", False)
    # A plain file says nothing of its heads, and gpt-micro's width differs: still asked for.
    with pytest.raises(ValueError, match="give its head count with --model.n_head=H"):
        runner.prepare(runner.RunSpec(init_from=str(path), model="gpt-micro", mesh="dp=8"))
