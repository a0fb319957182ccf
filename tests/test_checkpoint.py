"""Checkpoint I/O: save/load round trips, sharding, atomic writes, load errors, mlx-lm directories.

Oracles: safetensors' and MLX's own readers for the files metalq writes; ``mlx_lm.convert`` / ``mlx_lm.load``
for the mlx-lm format; metalq's quantizer (itself checked bit-exact against ``mx.quantize``) for the tensors.
"""
import importlib.util
import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import metalq
from conftest import require, require_mlx
from metalq import MetalConfig, MetalLinear, load_quantized, save_quantized
from metalq import checkpoint as ckpt


# ---- helpers ------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """Quantizable layers with and without bias, a layer whose in_features fits no group size, a norm."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64, bias=False)
        self.odd = nn.Linear(64, 48)
        self.head = nn.Linear(48, 32)  # 48 % 32 != 0: stays float
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.norm(self.head(self.odd(self.down(torch.relu(self.up(x))))))


def tiny(seed=0, device=None):
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return Tiny()


def quantized_tiny(mixed=False):
    model = tiny()
    if mixed:
        config = {"up": MetalConfig(bits=3, group_size=32), "_default": MetalConfig(bits=6, group_size=64)}
        metalq.quantize_(model, config, filter_fn=lambda m, fqn: fqn != "head")
    else:
        metalq.quantize_(model, MetalConfig(bits=4, group_size=32), filter_fn=lambda m, fqn: fqn != "head")
    return model


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def snapshot(model: nn.Module):
    """Module objects and tensor values, to prove that a failed load changed nothing."""
    return dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before):
    modules, state = before
    assert dict(model.named_modules()) == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key in state:
        assert torch.equal(now[key], state[key]), key


def leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def rewrite_safetensors(path: Path, change):
    """Rewrite a safetensors file with ``change(dict of tensors) -> dict`` (through safetensors itself)."""
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(str(path)))
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---- round trips -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "fmt,mixed", [("metal", False), ("mlx", False), ("mlx", True)], ids=["metal", "mlx", "mlx-mixed"]
)
def test_round_trip_bit_exact(tmp_path, fmt, mixed):
    model = quantized_tiny(mixed)
    save_quantized(model, tmp_path / "out", format=fmt)
    fresh = tiny(seed=1, device="meta")
    assert load_quantized(fresh, tmp_path / "out") is fresh
    assert_same_state(model, fresh)
    for name in ("up", "down", "odd"):
        got, want = fresh.get_submodule(name), model.get_submodule(name)
        assert isinstance(got, MetalLinear)
        assert (got.bits, got.group_size) == (want.bits, want.group_size)
    assert type(fresh.head) is nn.Linear
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_save_with_config_quantizes_while_writing_and_leaves_model_float(tmp_path):
    model = tiny()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="head"):
        save_quantized(model, tmp_path / "out", MetalConfig(bits=4, group_size=32, modules_to_not_convert=["down"]))
    assert_untouched(model, before)
    expected = tiny()
    with pytest.warns(UserWarning, match="head"):
        metalq.quantize_(expected, MetalConfig(bits=4, group_size=32, modules_to_not_convert=["down"]))
    loaded = load_quantized(tiny(seed=1, device="meta"), tmp_path / "out")
    assert_same_state(expected, loaded)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # exactly transformers' MetalConfig.to_dict(); the layers left float are listed so transformers skips them
    assert config["quantization_config"] == {
        "quant_method": "metal", "bits": 4, "group_size": 32, "modules_to_not_convert": ["down", "head"],
    }


def test_save_streams_one_layer_at_a_time(tmp_path, monkeypatch):
    """Quantizing while writing: each layer's packed tensors are gone before the next layer is quantized."""
    import gc
    import weakref

    alive = []

    def tracked(weight, group_size, bits):
        gc.collect()
        assert not [ref for ref in alive if ref() is not None], "a previous layer is still in memory"
        result = metalq.affine_quantize(weight, group_size, bits)
        alive.extend(weakref.ref(t) for t in result)
        return result

    monkeypatch.setattr(ckpt, "affine_quantize", tracked)
    model = tiny()
    with pytest.warns(UserWarning, match="head"):
        save_quantized(model, tmp_path / "out", MetalConfig(bits=4, group_size=32))
    assert len(alive) == 3 * 3
    expected = tiny()
    with pytest.warns(UserWarning, match="head"):
        metalq.quantize_(expected, MetalConfig(bits=4, group_size=32))
    assert_same_state(expected, load_quantized(tiny(seed=1, device="meta"), tmp_path / "out"))


def test_quantization_config_matches_transformers(tmp_path):
    require(importlib.util.find_spec("transformers") is not None, "transformers")
    import transformers

    save_quantized(quantized_tiny(), tmp_path / "out", model_config={"model_type": "x", "hidden_size": 64})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    theirs = transformers.MetalConfig(bits=4, group_size=32, modules_to_not_convert=["head"]).to_dict()
    assert config["quantization_config"] == json.loads(json.dumps(theirs))
    assert config["model_type"] == "x" and config["hidden_size"] == 64
    assert MetalConfig.from_dict(config["quantization_config"]) == MetalConfig(4, 32, ["head"])


def test_metal_format_rejects_mixed_widths(tmp_path):
    with pytest.raises(ValueError, match=r"up has bits=3, group_size=32 but the Metal format.*--to mlx"):
        save_quantized(quantized_tiny(mixed=True), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_files_read_by_safetensors_and_mlx(tmp_path):
    """The streaming writer's files, read by the independent readers."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = quantized_tiny()
    save_quantized(model, tmp_path / "metal")
    save_quantized(model, tmp_path / "mlx", format="mlx")
    state = model.state_dict()
    assert load_file(str(tmp_path / "metal" / "model.safetensors")).keys() == state.keys()
    for key, value in load_file(str(tmp_path / "metal" / "model.safetensors")).items():
        assert torch.equal(value, state[key]), key
    with safe_open(str(tmp_path / "mlx" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "mlx"}
        assert "up.biases" in f.keys() and "up.qbiases" not in f.keys() and "up.bias" in f.keys()
    mx = require_mlx()
    import numpy as np

    arrays = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    assert arrays["up.weight"].dtype == mx.uint32
    assert np.array_equal(np.array(arrays["up.weight"]).view(np.int32), state["up.weight"].view(torch.int32).numpy())
    assert np.array_equal(np.array(arrays["up.biases"]), state["up.qbiases"].numpy())
    # and MLX's dequantize of them is metalq's
    w = mx.dequantize(arrays["up.weight"], arrays["up.scales"], arrays["up.biases"], group_size=32, bits=4)
    assert np.array_equal(np.array(w), model.up.dequantize().weight.detach().numpy())


def test_sharding(tmp_path):
    from safetensors.torch import load_file

    model = quantized_tiny()
    save_quantized(model, tmp_path / "out", max_shard_size="10kB")
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["weight_map"].keys() == state.keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    for name in files:
        shard = load_file(str(tmp_path / "out" / name))
        assert {k for k, f in index["weight_map"].items() if f == name} == shard.keys()
        size = sum(v.numel() * v.element_size() for v in shard.values())
        assert size <= 10_000 or len(shard) == 1  # one tensor larger than the limit gets a shard of its own
    loaded = load_quantized(tiny(seed=1, device="meta"), tmp_path / "out")
    assert_same_state(model, loaded)


def tied_model():
    model = nn.ModuleDict(
        {"embed": nn.Embedding(16, 64), "proj": nn.Linear(64, 64), "head": nn.Linear(64, 16, bias=False)}
    )
    model.head.weight = model.embed.weight  # a tied output head
    return model


def test_tied_weights_stored_once(tmp_path):
    torch.manual_seed(0)
    model = tied_model()
    metalq.quantize_(model, MetalConfig(bits=4, group_size=64), filter_fn=lambda m, fqn: fqn == "proj")
    save_quantized(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["head"]
    from safetensors.torch import load_file

    assert "head.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))
    with torch.device("meta"):
        fresh = tied_model()
    load_quantized(fresh, tmp_path / "out")
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)


def test_parse_size():
    assert ckpt.parse_size(123) == 123
    assert ckpt.parse_size("2GB") == 2_000_000_000
    assert ckpt.parse_size("1GiB") == 1 << 30
    assert ckpt.parse_size("500 MB") == 500_000_000
    for bad in ("lots", "-1GB", 0, True):
        with pytest.raises(ValueError, match="max_shard_size"):
            ckpt.parse_size(bad)


# ---- atomic writes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"]
)
def test_failure_mid_write_leaves_no_directory(tmp_path, monkeypatch, error):
    model = quantized_tiny()
    real = ckpt._write_safetensors
    calls = []

    def failing(path, entries, metadata, bar):
        calls.append(path)
        if len(calls) == 2:  # the first shard is complete on disk, the second one fails
            raise error
        real(path, entries, metadata, bar)

    monkeypatch.setattr(ckpt, "_write_safetensors", failing)
    with pytest.raises(type(error)):
        save_quantized(model, tmp_path / "out", max_shard_size="10kB")
    assert len(calls) == 2
    assert not (tmp_path / "out").exists()
    assert not leftovers(tmp_path, "out")


@pytest.mark.filterwarnings("ignore:save_quantized. kept 1 layer")
def test_failure_while_quantizing_keeps_previous_directory(tmp_path, monkeypatch):
    model = quantized_tiny()
    save_quantized(model, tmp_path / "out")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir())

    def broken(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "affine_quantize", broken)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(tiny(), tmp_path / "out", MetalConfig(bits=4, group_size=32), overwrite=True)
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir()) == before
    assert not leftovers(tmp_path, "out")


def test_existing_directory_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(quantized_tiny(), tmp_path / "out")
    save_quantized(quantized_tiny(), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not leftovers(tmp_path, "out")


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"format": "gguf"}, ValueError, "format must be one of"),
        ({"config": {"bits": 4}}, TypeError, "MetalConfig"),
        ({"max_shard_size": "huge"}, ValueError, "max_shard_size"),
    ],
    ids=["format", "config-type", "shard-size"],
)
def test_bad_save_arguments(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        save_quantized(quantized_tiny(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_float_model_without_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no quantized layer"):
        save_quantized(tiny(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- load errors: each names the problem and leaves the model untouched --------------------------------

def _break_missing_scales(directory):
    rewrite_safetensors(directory / "model.safetensors", lambda t: {k: v for k, v in t.items() if k != "down.scales"})


def _break_shape(directory):
    rewrite_safetensors(directory / "model.safetensors", lambda t: {**t, "up.scales": t["up.scales"][:, :1].clone()})


def _break_float_shape(directory):
    rewrite_safetensors(directory / "model.safetensors", lambda t: {**t, "norm.weight": torch.ones(31)})


def _break_truncate(directory):
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _break_quant_method(directory):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    path.write_text(json.dumps(config))


def _break_bits(directory):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["bits"] = 7
    path.write_text(json.dumps(config))


def _break_missing_config(directory):
    (directory / "config.json").unlink()


def _break_extra_tensor(directory):
    rewrite_safetensors(directory / "model.safetensors", lambda t: {**t, "ghost.weight": torch.zeros(2)})


def _break_header(directory):
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8:8 + length] = b"x" * length
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "breaker,match",
    [
        (_break_missing_scales, r"missing tensor 'down\.scales'"),
        (_break_shape, r"tensor 'up\.scales'.*shape \(128, 1\), expected \(128, 2\)"),
        (_break_float_shape, r"tensor 'norm\.weight'.*shape \(31,\), the model expects \(32,\)"),
        (_break_truncate, r"model\.safetensors: not a complete safetensors file"),
        (_break_header, r"model\.safetensors: not a complete safetensors file"),
        (_break_quant_method, r"quantization_config\.quant_method='gptq' is not supported"),
        (_break_bits, r"quantization_config: .*bits must be one of"),
        (_break_missing_config, r"config\.json: missing"),
        (_break_extra_tensor, r"unexpected tensors.*'ghost\.weight'"),
    ],
    ids=["missing-scales", "scales-shape", "float-shape", "truncated", "bad-header", "quant-method", "bits",
         "no-config", "unexpected"],
)
def test_load_errors_leave_model_untouched(tmp_path, breaker, match):
    save_quantized(quantized_tiny(), tmp_path / "out")
    breaker(tmp_path / "out")
    target = tiny(seed=3)
    before = snapshot(target)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_quantized(target, tmp_path / "out")
    assert_untouched(target, before)


def test_missing_shard_is_named(tmp_path):
    save_quantized(quantized_tiny(), tmp_path / "out", max_shard_size="10kB")
    next((tmp_path / "out").glob("model-00002-of-*.safetensors")).unlink()
    target = tiny(seed=3)
    before = snapshot(target)
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-\d+\.safetensors: listed in"):
        load_quantized(target, tmp_path / "out")
    assert_untouched(target, before)


def test_non_strict_load_ignores_extra_tensors(tmp_path):
    model = quantized_tiny()
    save_quantized(model, tmp_path / "out")
    _break_extra_tensor(tmp_path / "out")
    assert_same_state(model, load_quantized(tiny(seed=1, device="meta"), tmp_path / "out", strict=False))


# ---- mlx-lm directories (oracle: mlx_lm.convert and mlx_lm.load) ---------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def make_tiny_llama(path: Path, tie: bool = False):
    """A 2-layer Llama (hidden 64) with random weights and a word-level tokenizer, saved as a HF directory."""
    require(importlib.util.find_spec("transformers") is not None, "transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, dtype="float32",
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(128)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2")
    wrapped.save_pretrained(path)
    return path


def meta_llama(directory: Path, device="cpu"):
    """The float architecture of ``directory`` (load_quantized swaps the layers). On ``cpu`` by default: on
    ``meta`` the non-persistent rotary buffers, which no checkpoint holds, would stay unusable."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(directory))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config)


def float_llama(directory: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)


def require_mlx_lm():
    require_mlx()
    require(importlib.util.find_spec("mlx_lm") is not None, "mlx-lm (pip install mlx-lm)")
    import mlx_lm

    return mlx_lm


def mlx_lm_convert(hf: Path, out: Path, **kwargs):
    mlx_lm = require_mlx_lm()
    mlx_lm.convert(str(hf), str(out), quantize=True, **kwargs)
    return out


def torch_of(array):
    import mlx.core as mx
    import numpy as np

    if array.dtype == mx.uint32:
        return torch.from_numpy(np.array(array.view(mx.int32))).view(torch.uint32)
    return torch.from_numpy(np.array(array))


def mlx_weights(directory: Path):
    import mlx.core as mx

    weights = {}
    for file in sorted(directory.glob("model*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    require_mlx_lm()
    root = tmp_path_factory.mktemp("llama")
    hf = make_tiny_llama(root / "hf")
    dirs = {"hf": hf}
    dirs["gs32"] = mlx_lm_convert(hf, root / "mlx-gs32", q_group_size=32, q_bits=4)
    dirs["gs64"] = mlx_lm_convert(hf, root / "mlx-gs64", q_group_size=64, q_bits=8)
    dirs["mixed"] = mlx_lm_convert(hf, root / "mlx-mixed", q_group_size=64, quant_predicate="mixed_3_6")
    return dirs


def expected_layers(directory: Path):
    """(bits, group_size) that mlx-lm gives each module path, from its config (overrides, else default)."""
    quantization = json.loads((directory / "config.json").read_text())["quantization"]
    default = (quantization["bits"], quantization["group_size"])
    return default, {k: (v["bits"], v["group_size"]) for k, v in quantization.items() if isinstance(v, dict)}


@pytest.mark.parametrize("which", ["gs32", "gs64", "mixed"])
def test_mlx_lm_directory_loads_bit_exact(llama_dirs, which):
    directory = llama_dirs[which]
    model = load_quantized(meta_llama(directory), directory)
    state = model.state_dict()
    weights = mlx_weights(directory)
    # every mlx-lm tensor, renamed, is the metalq tensor (and nothing else is in the model)
    renamed = {k[: -len("biases")] + "qbiases" if k.endswith(".biases") else k: v for k, v in weights.items()}
    assert renamed.keys() == {k for k in state if k != "lm_head.weight" or "lm_head.weight" in renamed}
    for key, array in renamed.items():
        assert torch.equal(torch_of(array), state[key]), key
    default, overrides = expected_layers(directory)
    if which == "mixed":
        assert {b for b, _ in overrides.values()} == {3, 6}  # mixed_3_6 lists every layer
        assert overrides["lm_head"] == (6, 64) and overrides["model.layers.1.mlp.down_proj"] == (6, 64)
        assert overrides["model.layers.0.self_attn.q_proj"] == (3, 64)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, MetalLinear)]
    assert len(linears) == 2 * 7 + 1
    for name, module in linears:
        assert (module.bits, module.group_size) == overrides.get(name, default), name
    assert isinstance(model.model.embed_tokens, metalq.MetalEmbedding)
    # the loaded model computes what mlx-lm's does
    import mlx.core as mx
    import numpy as np

    mlx_model, _ = require_mlx_lm().load(str(directory))
    tokens = [[1, 5, 7, 9, 11, 13]]
    expected = np.array(mlx_model(mx.array(tokens)))
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits
    torch.testing.assert_close(logits, torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
    # and metalq's own quantization of the float weights gives the same tensors
    reference = float_llama(llama_dirs["hf"])
    metalq.quantize_(
        reference,
        lambda module, fqn: MetalConfig(*overrides.get(fqn, default)),
        embeddings=True,
    )
    reference_state = reference.state_dict()
    for key in state:
        assert torch.equal(state[key], reference_state[key]), key


def test_meta_model_loads_every_checkpoint_tensor(llama_dirs):
    directory = llama_dirs["gs32"]
    model = load_quantized(meta_llama(directory, device="meta"), directory)
    assert not any(tensor.is_meta for tensor in model.state_dict().values())
    # non-persistent buffers are in no checkpoint: they stay meta (metalq.transformers recomputes them)
    assert model.model.rotary_emb.inv_freq.is_meta


def test_mlx_lm_round_trip_and_mlx_lm_load(llama_dirs, tmp_path):
    mlx_lm = require_mlx_lm()
    import numpy as np
    from mlx.utils import tree_flatten

    source = llama_dirs["mixed"]
    model = load_quantized(meta_llama(source), source)
    extra = [llama_dirs["hf"] / name for name in TOKENIZER_FILES]
    save_quantized(model, tmp_path / "export", format="mlx", extra_files=extra, max_shard_size="100kB")
    # metalq -> mlx-lm dir -> metalq is bit-exact
    again = load_quantized(meta_llama(tmp_path / "export"), tmp_path / "export")
    assert_same_state(model, again)
    # the export's quantization block gives every layer the format mlx-lm's did
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["quantization"] == exported["quantization_config"]
    default, overrides = expected_layers(source)
    new_default, new_overrides = expected_layers(tmp_path / "export")
    paths = {key[: -len(".scales")] for key in mlx_weights(source) if key.endswith(".scales")}
    assert len(paths) == 2 * 7 + 2
    assert {p: new_overrides.get(p, new_default) for p in paths} == {p: overrides.get(p, default) for p in paths}
    # mlx_lm.load accepts it (strict: every parameter present, every module quantized as declared)
    mlx_model, _ = mlx_lm.load(str(tmp_path / "export"))
    loaded = dict(tree_flatten(mlx_model.parameters()))
    weights = mlx_weights(source)
    assert loaded.keys() == weights.keys()
    for key, array in weights.items():
        assert np.array_equal(np.array(loaded[key]), np.array(array)), key
    reference, _ = mlx_lm.load(str(source)) if (source / "tokenizer.json").exists() else (None, None)
    if reference is not None:
        import mlx.core as mx

        tokens = mx.array([[1, 5, 7, 9, 11]])
        assert np.array_equal(np.array(mlx_model(tokens)), np.array(reference(tokens)))


def test_tied_embeddings_from_mlx_lm(tmp_path):
    require_mlx_lm()
    hf = make_tiny_llama(tmp_path / "hf", tie=True)
    source = mlx_lm_convert(hf, tmp_path / "mlx", q_group_size=64, q_bits=4)
    assert "lm_head.weight" not in mlx_weights(source)
    model = load_quantized(meta_llama(source), source)
    assert isinstance(model.model.embed_tokens, metalq.MetalEmbedding)
    head = model.lm_head
    assert isinstance(head, metalq.MetalTiedHead) and head.embedding is model.model.embed_tokens
    x = torch.randn(2, 64)
    expected = x @ model.model.embed_tokens.dequantize().weight.T
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    # and back to mlx-lm: still no lm_head tensors
    save_quantized(model, tmp_path / "export", format="mlx")
    assert set(mlx_weights(tmp_path / "export")) == set(mlx_weights(source))


def test_quantized_embedding_without_metal_embedding_is_dequantized(llama_dirs, monkeypatch):
    mx = require_mlx()
    import numpy as np

    monkeypatch.delattr(metalq, "MetalEmbedding")
    monkeypatch.delattr(metalq, "MetalTiedHead")
    directory = llama_dirs["gs32"]
    with pytest.warns(UserWarning, match=r"model\.embed_tokens were dequantized"):
        model = load_quantized(meta_llama(directory), directory)
    embed = model.model.embed_tokens
    assert type(embed) is nn.Embedding
    w = mlx_weights(directory)
    table = mx.dequantize(w["model.embed_tokens.weight"], w["model.embed_tokens.scales"],
                          w["model.embed_tokens.biases"], group_size=32, bits=4)
    assert np.array_equal(embed.weight.detach().numpy(), np.array(table))


def test_mlx_lm_unsupported_mode_is_named(llama_dirs, tmp_path):
    import shutil

    directory = tmp_path / "copy"
    shutil.copytree(llama_dirs["gs32"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["quantization"]["mode"] = "int4"
    (directory / "config.json").write_text(json.dumps(config))
    model = meta_llama(llama_dirs["gs32"])
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"quantization: Invalid quantization mode 'int4'"):
        load_quantized(model, directory)
    assert dict(model.named_modules()) == before
    # a supported mode that the tensors do not hold (affine scales declared mxfp4) names the tensor
    config["quantization"]["mode"] = "mxfp4"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"scales.*has dtype torch.float32, expected one of \(torch.uint8,\)"):
        load_quantized(model, directory)
    assert dict(model.named_modules()) == before
