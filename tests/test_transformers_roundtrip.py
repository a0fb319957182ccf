"""transformers' own loader reads the Metal directories metalq writes; metalq reads the rest, and both spellings.

Saved by metalq (from a float tiny Llama through a MetalConfig, or after metalq.quantize_), loaded by
transformers.AutoModelForCausalLM.from_pretrained after metalq.transformers.use_metalq_kernel(), on CPU. Oracles:
transformers' own choice of float modules (get_keys_to_not_convert), safetensors' reader, and a float64 Llama holding
the checkpoint's tensors dequantized in plain torch (no metalq code).
"""
import copy
import dataclasses
import json
import re
import sys
import warnings

import pytest
import torch

import metalq
from metalq import MetalConfig, MetalLinear

transformers = pytest.importorskip("transformers")
import metalq.transformers as mt  # noqa: E402
from metalq import checkpoint as ckpt  # noqa: E402
from test_transformers import metalq_kernel  # noqa: E402,F401  (use_metalq_kernel() for one test, then restored)
from transformers.integrations import metal_quantization  # noqa: E402

UNREADABLE = "transformers' own loader cannot read this Metal checkpoint"
PROMPTS = torch.tensor([[5, 17, 33, 9, 70, 101, 4], [250, 3, 44, 45, 46, 47, 1]])
PROJECTIONS = {
    f"model.layers.{i}.{name}" for i in range(2)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
}


def llama_config(tie: bool, **extra):
    return transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.15, tie_word_embeddings=tie,
        dtype="float32", pad_token_id=0, **extra,
    )


def tiny_llama(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(llama_config(tie)).eval()
    with torch.no_grad():  # norms away from 1, so that every tensor matters
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.1 + 1.0)
    return model


def tensors(directory):
    """Every tensor of a checkpoint directory, read by safetensors itself."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def config_of(directory):
    return json.loads((directory / "config.json").read_text())


def unpack64(packed, scales, biases, group_size, bits):
    """The float64 matrix of MLX's affine layout: each row's uint32 words are one little-endian stream of
    ``bits``-bit codes, and a group's value is ``code * scale + bias``."""
    stream = packed.contiguous().view(torch.uint8).to(torch.int64)
    bit = ((stream.unsqueeze(-1) >> torch.arange(8)) & 1).flatten(-2)
    codes = (bit.unflatten(-1, (-1, bits)) << torch.arange(bits)).sum(-1)
    grouped = codes.double().unflatten(-1, (-1, group_size))
    return (grouped * scales.double().unsqueeze(-1) + biases.double().unsqueeze(-1)).flatten(-2)


def float64_reference(directory):
    """A float64 Llama holding the checkpoint's tensors, each packed ``weight`` or ``qweight`` dequantized by
    :func:`unpack64`; tied when the checkpoint has no head of its own."""
    quantization = config_of(directory)["quantization_config"]
    stored = tensors(directory)
    state = {}
    for name, tensor in stored.items():
        path, _, leaf = name.rpartition(".")
        if f"{path}.scales" not in stored:
            state[name] = tensor.double()
        elif leaf in ("weight", "qweight"):
            state[f"{path}.weight"] = unpack64(tensor, stored[f"{path}.scales"], stored[f"{path}.qbiases"],
                                               quantization["group_size"], quantization["bits"])
    tie = "lm_head.weight" not in state
    model = transformers.AutoModelForCausalLM.from_config(llama_config(tie)).double().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) == ({"lm_head.weight"} if tie else set())
    return model


def assert_logits(directory, loaded):
    """``loaded`` (transformers' loader) computes what metalq.transformers.from_pretrained's model and the
    float64 reference compute."""
    ours = mt.from_pretrained(directory, device="cpu")
    with torch.no_grad():
        logits = loaded(PROMPTS).logits
        torch.testing.assert_close(logits, ours(PROMPTS).logits, rtol=1e-5, atol=1e-5)
        exact = float64_reference(directory)(PROMPTS).logits
    error = (logits.double() - exact).abs().max().item()
    assert error <= 1e-4 * exact.abs().max().item(), error
    assert exact.std() > 0.5  # logits large enough for the tolerance to mean something


def load_with_transformers(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def quantized_names(model, cls):
    return {name for name, module in model.named_modules() if isinstance(module, cls)}


# ---- what metalq writes, transformers reads -----------------------------------------------------------------

CASES = [(bits, tie, source) for bits in (2, 4, 8) for tie in (False, True) for source in ("config", "quantize_")]


@pytest.mark.parametrize(
    "bits,tie,source", CASES, ids=[f"{b}bit-{'tied' if t else 'untied'}-{s}" for b, t, s in CASES]
)
def test_transformers_loads_what_metalq_writes(tmp_path, metalq_kernel, bits, tie, source):
    model = tiny_llama(tie)
    directory = tmp_path / "checkpoint"
    sharded = bits == 4
    shards = {"max_shard_size": "40kB"} if sharded else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if source == "config":
            metalq.save_quantized(model, directory, MetalConfig(bits=bits, group_size=64), **shards)
        else:
            metalq.quantize_(model, MetalConfig(bits=bits, group_size=64))
            metalq.save_quantized(model, directory, **shards)
    assert not [w for w in caught if UNREADABLE in str(w.message)]
    # transformers' default keeps the head float; metalq.quantize_ converts it, and the checkpoint says so
    head_quantized = source == "quantize_"
    assert config_of(directory)["quantization_config"] == {
        "quant_method": "metal", "bits": bits, "group_size": 64,
        "modules_to_not_convert": [] if head_quantized else ["lm_head"],
    }
    files = sorted(path.name for path in directory.glob("*.safetensors"))
    assert (len(files) > 2 and (directory / "model.safetensors.index.json").is_file()) if sharded else (
        files == ["model.safetensors"])

    loaded = load_with_transformers(directory)
    assert loaded.hf_quantizer.is_trainable  # metalq's quantizer: Trainer accepts adapters on the model
    names = quantized_names(loaded, metal_quantization.MetalLinear)
    assert names == PROJECTIONS | ({"lm_head"} if head_quantized else set())
    for name in names:
        layer = loaded.get_submodule(name)
        assert layer.bits == bits and getattr(layer, mt.packed_weight_name()).dtype == torch.uint32
    if not head_quantized:
        assert type(loaded.lm_head) is torch.nn.Linear
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    assert_logits(directory, loaded)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_explicit_empty_list_quantizes_the_head(tmp_path, metalq_kernel, tie):
    """modules_to_not_convert=[] means exactly nothing, as in transformers; a tied head has no weight of its own
    and stays tied to the float embedding."""
    directory = tmp_path / "checkpoint"
    metalq.save_quantized(tiny_llama(tie), directory, MetalConfig(bits=4, modules_to_not_convert=[]))
    assert config_of(directory)["quantization_config"]["modules_to_not_convert"] == (["lm_head"] if tie else [])
    loaded = load_with_transformers(directory)
    assert quantized_names(loaded, metal_quantization.MetalLinear) == PROJECTIONS | (set() if tie else {"lm_head"})
    assert_logits(directory, loaded)


def test_mlx_layout_quantizes_the_head_as_mlx_lm(tmp_path):
    """mlx_lm.convert quantizes every Linear with to_quantized, lm_head included: the mlx layout follows it."""
    directory = tmp_path / "checkpoint"
    metalq.save_quantized(tiny_llama(False), directory, MetalConfig(bits=4), format="mlx")
    stored = tensors(directory)
    assert {"lm_head.weight", "lm_head.scales", "lm_head.biases"} <= stored.keys()
    assert stored["lm_head.weight"].dtype == torch.uint32
    assert isinstance(mt.from_pretrained(directory, device="cpu").lm_head, MetalLinear)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_default_skips_are_transformers(tie):
    from transformers.quantizers.base import get_keys_to_not_convert

    for model in (tiny_llama(tie), transformers.LlamaForSequenceClassification(llama_config(tie, num_labels=3))):
        modules = dict(model.named_modules())
        theirs = sorted(key for key in get_keys_to_not_convert(model) if isinstance(modules.get(key), torch.nn.Linear))
        assert theirs and ckpt.transformers_default_skips(model) == theirs


def test_keep_in_fp32_modules_stay_float(tmp_path, metalq_kernel, monkeypatch):
    """transformers never quantizes a model's _keep_in_fp32_modules, even with an explicit list."""
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_keep_in_fp32_modules", ["o_proj"])
    model = tiny_llama(False)
    directory = tmp_path / "config"
    metalq.save_quantized(model, directory, MetalConfig(bits=4, modules_to_not_convert=[]))
    kept = [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    assert config_of(directory)["quantization_config"]["modules_to_not_convert"] == kept
    loaded = load_with_transformers(directory)
    assert quantized_names(loaded, metal_quantization.MetalLinear) == (PROJECTIONS - set(kept)) | {"lm_head"}
    assert_logits(directory, loaded)
    metalq.quantize_(model, MetalConfig(bits=4))
    with pytest.warns(UserWarning, match=rf"{UNREADABLE}: quantized layers it always keeps float .*{kept[0]}"):
        metalq.save_quantized(model, tmp_path / "quantize_")


def test_metalq_quantizer_is_trainable():
    from transformers.quantizers.quantizer_metal import MetalHfQuantizer

    config = transformers.MetalConfig(bits=4)
    assert MetalHfQuantizer(config).is_trainable is False  # what transformers' Trainer refuses
    assert mt._metalq_quantizer_class()(config).is_trainable is True


# ---- what only metalq reads: one warning when written, metalq.transformers.from_pretrained loads it ----------

# name -> (config, quantize embeddings too, tied head, the reason the warning gives)
UNLOADABLE = {
    **{f"{bits}bit": (MetalConfig(bits=bits), False, False, rf"bits={bits} \(its MetalConfig accepts bits 2, 4, 8\)")
       for bits in (1, 3, 5, 6)},
    **{mode: (MetalConfig(mode=mode), False, False, rf"mode='{mode}' \(its Metal layout is affine only\)")
       for mode in ("mxfp4", "nvfp4", "mxfp8")},
    "embeddings": (MetalConfig(), True, False,
                   r"not nn.Linear layers: model\.embed_tokens \(MetalEmbedding\) \(it quantizes nn.Linear layers "
                   r"only\)\."),
    "tied-head": (MetalConfig(), True, True,
                  r"model\.embed_tokens \(MetalEmbedding\) .*; an output head tied to a quantized embedding: "
                  r"lm_head\."),
}


# save_quantized's config quantizes nn.Linear layers only: embeddings come from metalq.quantize_
SOURCES = [(case, source) for case in sorted(UNLOADABLE) for source in ("config", "quantize_")
           if source == "quantize_" or not UNLOADABLE[case][1]]


@pytest.mark.parametrize("case,source", SOURCES, ids=[f"{case}-{source}" for case, source in SOURCES])
def test_only_metalq_reads_it(tmp_path, case, source):
    config, embeddings, tie, reason = UNLOADABLE[case]
    model = tiny_llama(tie)
    expected = copy.deepcopy(model)
    directory = tmp_path / "checkpoint"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if source == "config":
            metalq.save_quantized(model, directory, config)
            # what it wrote: the layers transformers' default selects, quantized
            metalq.quantize_(expected, dataclasses.replace(config, modules_to_not_convert=["lm_head"]))
        else:
            metalq.quantize_(model, config, embeddings=embeddings)
            metalq.save_quantized(model, directory)
            expected = model
    messages = [str(w.message) for w in caught if UNREADABLE in str(w.message)]
    assert len(messages) == 1, messages
    assert re.search(reason, messages[0]), messages[0]
    assert messages[0].endswith("metalq.transformers.from_pretrained loads it.")
    loaded = mt.from_pretrained(directory, device="cpu")
    saved = expected.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPTS).logits, expected(PROMPTS).logits, rtol=1e-6, atol=1e-6)
    if case == "3bit":  # and transformers' loader does refuse it
        with pytest.raises(ValueError, match=r"bits in \{2, 4, 8\}"):
            load_with_transformers(directory)


# ---- transformers' main branch spells the packed tensor qweight ---------------------------------------------

class MainMetalLinear(torch.nn.Linear):
    """transformers main's MetalLinear as far as loading and the forward go: the packed tensor is ``qweight``."""

    def __init__(self, in_features, out_features, bias=False, dtype=torch.uint32, bits=4, group_size=128):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size

        def frozen(*shape, dtype=None):
            return torch.nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)

        self.qweight = frozen(out_features, in_features * bits // 32, dtype=torch.uint32)
        self.scales = frozen(out_features, in_features // group_size)
        self.qbiases = frozen(out_features, in_features // group_size)
        self.register_parameter("bias", torch.nn.Parameter(torch.zeros(out_features)) if bias else None)

    def forward(self, x):
        # the kernel call of transformers' newer MetalLinear: MLX's quantized_matmul signature
        y = metal_quantization._get_metal_kernel().quantized_matmul(
            x, self.qweight, self.scales.to(x.dtype), self.qbiases.to(x.dtype), transpose=True,
            group_size=self.group_size, bits=self.bits,
        )
        return y if self.bias is None else y + self.bias


@pytest.fixture
def main_branch(monkeypatch):
    """transformers' main branch: its MetalLinear holds ``qweight`` (and its Metal loader builds that class)."""
    monkeypatch.setattr(metal_quantization, "MetalLinear", MainMetalLinear)


def test_packed_weight_name_follows_installed_transformers(monkeypatch):
    installed = metal_quantization.MetalLinear(in_features=64, out_features=8, bits=4, group_size=64)
    assert installed.state_dict()[mt.packed_weight_name()].dtype == torch.uint32
    with monkeypatch.context() as patch:
        patch.setattr(metal_quantization, "MetalLinear", MainMetalLinear)
        assert mt.packed_weight_name() == "qweight"
    monkeypatch.setitem(sys.modules, "transformers.integrations.metal_quantization", None)  # as if absent
    assert mt.packed_weight_name() == "weight"


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_main_branch_spelling(tmp_path, metalq_kernel, main_branch, tie):
    model = tiny_llama(tie)
    directory = tmp_path / "qweight"
    metalq.save_quantized(model, directory, MetalConfig(bits=4), max_shard_size="40kB")
    stored = tensors(directory)
    packed = {name for name, tensor in stored.items() if tensor.dtype == torch.uint32}
    assert packed == {f"{path}.qweight" for path in PROJECTIONS}
    loaded = load_with_transformers(directory)
    assert quantized_names(loaded, MainMetalLinear) == PROJECTIONS
    assert_logits(directory, loaded)  # metalq.transformers.from_pretrained reads qweight too
    # load_quantized, and convert to the mlx layout (weight, biases) and back (qweight again)
    expected = copy.deepcopy(model)
    metalq.quantize_(expected, MetalConfig(bits=4, modules_to_not_convert=["lm_head"]))
    fresh = metalq.load_quantized(tiny_llama(tie, seed=1), directory)
    assert quantized_names(fresh, MetalLinear) == PROJECTIONS
    saved = expected.state_dict()
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    metalq.convert_checkpoint(directory, tmp_path / "mlx", progress=False)
    mlx = tensors(tmp_path / "mlx")
    assert {f"{path}.{leaf}" for path in PROJECTIONS for leaf in ("weight", "biases")} <= mlx.keys()
    assert not any(name.endswith((".qweight", ".qbiases")) for name in mlx)
    metalq.convert_checkpoint(tmp_path / "mlx", tmp_path / "back", progress=False)
    back = tensors(tmp_path / "back")
    assert back.keys() == stored.keys() and all(torch.equal(back[name], stored[name]) for name in stored)


def test_spelling_errors_name_the_stored_tensor(tmp_path, main_branch):
    from safetensors.torch import save_file

    directory = tmp_path / "checkpoint"
    metalq.save_quantized(tiny_llama(False), directory, MetalConfig(bits=4))
    stored = tensors(directory)
    name = "model.layers.0.mlp.up_proj"
    broken = {**stored, f"{name}.qweight": stored[f"{name}.qweight"][:, :4].clone()}
    save_file(broken, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}\.weight' \(.*stored as '{name}\.qweight'\) has shape \(128, 4\)"):
        metalq.load_quantized(tiny_llama(False), directory)
    both = {**stored, f"{name}.weight": stored[f"{name}.qweight"].clone()}
    save_file(both, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"'{name}\.qweight' .* and '{name}\.weight' .* are both present"):
        metalq.load_quantized(tiny_llama(False), directory)
