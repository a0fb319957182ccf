"""MetalConfig and whole-model conversion: quantize_, dequantize_, replace_with_metal_linear."""
import json
import warnings

import pytest
import torch
from torch import nn

import metalq
from metalq import MetalConfig, MetalLinear, dequantize_, quantize_, replace_with_metal_linear
from metalq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from metalq.quantize import matches_module_name


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up_proj = nn.Linear(width, 2 * width)
        self.down_proj = nn.Linear(2 * width, width, bias=False)

    def forward(self, x):
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class TinyModel(nn.Module):
    """Named like a decoder: layers.{i}.{up,down}_proj, plus an lm_head and an odd-sized projection."""

    def __init__(self, width: int = 128, layers: int = 2, odd: int = 96, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.odd_in = nn.Linear(width, odd)
        self.odd_out = nn.Linear(odd, width)  # in_features=96: group size 32 fits, 64 and 128 do not
        self.lm_head = nn.Linear(width, 40)
        self.to(dtype)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x + self.odd_out(self.odd_in(x)))


def linear_names(model, cls=nn.Linear):
    return sorted(name for name, module in model.named_modules() if type(module) is cls)


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyModel(**kwargs)


# ---- MetalConfig -------------------------------------------------------------------------------------

def test_config_defaults_and_dict_shape():
    config = MetalConfig()
    assert (config.bits, config.group_size, config.modules_to_not_convert, config.dequantize) == (4, 64, None, False)
    # transformers' quantization_config: dequantize is a loading attribute, never serialized
    assert config.to_dict() == {"quant_method": "metal", "bits": 4, "group_size": 64, "modules_to_not_convert": None}


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", SUPPORTED_GROUP_SIZES)
def test_config_accepts_every_supported_format(bits, group_size):
    config = MetalConfig(bits=bits, group_size=group_size, modules_to_not_convert=["lm_head"])
    assert MetalConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("bits", [0, 7, 9, 16, True, 4.5])
def test_config_rejects_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 3, 4, 5, 6, 8\)"):
        MetalConfig(bits=bits)


@pytest.mark.parametrize("group_size", [0, -64, 8, 48, 96, 256])
def test_config_rejects_group_size(group_size):
    with pytest.raises(ValueError, match=r"group_size must be one of \(16, 32, 64, 128\)"):
        MetalConfig(group_size=group_size)


def test_config_rejects_a_single_string_of_module_names():
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        MetalConfig(modules_to_not_convert="lm_head")


def test_config_from_dict_loading_attributes_and_errors():
    saved = MetalConfig(bits=8, group_size=32).to_dict()
    assert MetalConfig.from_dict(saved, dequantize=True) == MetalConfig(bits=8, group_size=32, dequantize=True)
    with pytest.raises(ValueError, match="quant_method"):
        MetalConfig.from_dict({**saved, "quant_method": "gptq"})
    with pytest.raises(ValueError, match="unknown keys"):
        MetalConfig.from_dict({**saved, "sym": True})


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("lm_head", "lm_head", True),
        ("model.lm_head", "lm_head", True),
        ("layers.1.up_proj", "layers.1", True),
        ("layers.1.up_proj", "layers.1.", True),
        ("layers.10.up_proj", "layers.1", False),
        ("layers.1.self_attn.q_proj", "self_attn", False),  # a middle segment is neither prefix nor suffix
        ("layers.1.self_attn", "attn", False),
        ("layers.1.down_proj", "up_proj", False),
    ],
)
def test_module_name_matching(name, pattern, expected):
    assert matches_module_name(name, pattern) is expected


# ---- quantize_ ---------------------------------------------------------------------------------------

def test_quantize_converts_linears_and_warns_once_naming_misfits():
    model = make_model()
    x = torch.randn(3, 128)
    reference = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, MetalConfig(bits=8, group_size=64))
    assert len(caught) == 1 and "odd_out (in_features=96, group_size=64)" in str(caught[0].message)
    assert linear_names(model) == ["odd_out"]
    assert len(linear_names(model, MetalLinear)) == 6
    assert ((model(x) - reference).abs().max() / reference.abs().max()) < 0.02  # 8-bit weights


def test_group_size_16_needs_whole_words_at_odd_bits():
    # in_features=48: three groups of 16, which at 3 bits end inside a uint32 word (4 bits fill them).
    model = make_model(odd=48)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_(model, MetalConfig(bits=3, group_size=16))
    assert len(caught) == 1 and "odd_out (in_features=48, group_size=16, bits=3: a multiple of 32)" in str(
        caught[0].message)
    assert linear_names(model) == ["odd_out"]
    model = make_model(odd=48)
    x = torch.randn(3, 128)
    reference = model(x)
    quantize_(model, MetalConfig(bits=4, group_size=16))
    assert not linear_names(model)
    assert ((model(x) - reference).abs().max() / reference.abs().max()) < 0.1  # 4-bit weights


def test_quantize_filter_fn_sees_module_and_name():
    model = make_model()
    seen = []

    def only_mlp_up(module, fqn):
        seen.append((type(module), fqn))
        return fqn.endswith("up_proj")

    quantize_(model, MetalConfig(), filter_fn=only_mlp_up)
    assert linear_names(model, MetalLinear) == ["layers.0.up_proj", "layers.1.up_proj"]
    assert (nn.Linear, "lm_head") in seen


def test_quantize_honours_modules_to_not_convert():
    model = make_model()
    quantize_(model, MetalConfig(group_size=32, modules_to_not_convert=["lm_head", "layers.1"]))
    assert linear_names(model) == ["layers.1.down_proj", "layers.1.up_proj", "lm_head"]


def test_quantize_per_module_overrides_by_mapping():
    model = make_model()
    quantize_(model, {"lm_head": MetalConfig(bits=8), "down_proj": None, "_default": MetalConfig(bits=3, group_size=32)})
    formats = {name: (m.bits, m.group_size) for name, m in model.named_modules() if isinstance(m, MetalLinear)}
    assert formats == {
        "layers.0.up_proj": (3, 32),
        "layers.1.up_proj": (3, 32),
        "odd_in": (3, 32),
        "odd_out": (3, 32),
        "lm_head": (8, 64),
    }


def test_quantize_per_module_overrides_by_callable():
    model = make_model()
    quantize_(model, lambda module, fqn: MetalConfig(bits=2, group_size=32) if module.out_features > 200 else None)
    assert linear_names(model, MetalLinear) == ["layers.0.up_proj", "layers.1.up_proj"]
    assert all(m.bits == 2 for m in model.modules() if isinstance(m, MetalLinear))


def test_quantize_error_leaves_the_model_untouched():
    model = make_model()
    model.lm_head.double()  # float64 weights are not quantizable; lm_head comes last
    with pytest.raises(TypeError, match="float64|Double"):
        quantize_(model, MetalConfig(group_size=32))
    assert not linear_names(model, MetalLinear)


def test_quantize_keeps_shared_layers_shared():
    model = make_model()
    model.layers[1].up_proj = model.layers[0].up_proj
    quantize_(model, MetalConfig(group_size=32))
    assert isinstance(model.layers[0].up_proj, MetalLinear)
    assert model.layers[1].up_proj is model.layers[0].up_proj


def test_quantize_rejects_a_bare_linear_and_dequantize_configs():
    with pytest.raises(ValueError, match="convert it directly"):
        quantize_(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="loading option"):
        quantize_(make_model(), MetalConfig(dequantize=True))


def test_quantize_shows_progress_for_large_models(monkeypatch, capsys):
    monkeypatch.setattr(metalq.quantize, "_PROGRESS_MIN_WEIGHTS", 0)
    quantize_(make_model(), MetalConfig(group_size=32))
    assert "quantize_" in capsys.readouterr().err


# ---- dequantize_ -------------------------------------------------------------------------------------

def test_dequantize_round_trip():
    model = make_model(dtype=torch.bfloat16)
    original = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_(model, MetalConfig(bits=4, group_size=32))
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    quantized_output = model(x)
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, MetalLinear)}

    dequantize_(model)
    assert not linear_names(model, MetalLinear)
    for name, layer in quantized.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        # within one quantization step of the original weights
        step = layer.scales.float().abs().repeat_interleave(32, dim=1)
        assert ((weight.float() - original[name].float()).abs() <= step * 1.01 + 1e-2).all(), name
    torch.testing.assert_close(model(x), quantized_output, rtol=0.05, atol=0.05)


# ---- replace_with_metal_linear -----------------------------------------------------------------------

def test_replace_pre_quantized_on_meta_then_load_checkpoint():
    config = MetalConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head"])
    source = make_model(dtype=torch.float16)
    replace_with_metal_linear(source, quantization_config=config)
    checkpoint = source.state_dict()
    assert checkpoint["layers.0.up_proj.weight"].dtype == torch.uint32
    assert checkpoint["lm_head.weight"].dtype == torch.float16

    with torch.device("meta"):
        model = TinyModel(dtype=torch.float16)
    replace_with_metal_linear(model, quantization_config=config.to_dict(), pre_quantized=True)
    assert linear_names(model, MetalLinear) == linear_names(source, MetalLinear)
    assert all(t.is_meta for t in model.state_dict().values())
    model.load_state_dict(checkpoint, assign=True)
    x = torch.randn(2, 128, dtype=torch.float16)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_replace_pre_quantized_shells_load_without_assign():
    source = make_model()
    replace_with_metal_linear(source, modules_to_not_convert=["odd_out"])
    model = replace_with_metal_linear(TinyModel(), modules_to_not_convert=["odd_out"], pre_quantized=True)
    assert linear_names(model) == ["odd_out"]
    model.load_state_dict(source.state_dict())
    x = torch.randn(2, 128)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_replace_on_the_fly_equals_quantize_():
    config = MetalConfig(bits=6, group_size=32)
    by_replace, by_quantize = make_model(), make_model()
    replace_with_metal_linear(by_replace, quantization_config=config)
    quantize_(by_quantize, config)
    replaced, quantized = by_replace.state_dict(), by_quantize.state_dict()
    assert replaced.keys() == quantized.keys()
    assert all(torch.equal(replaced[key], quantized[key]) for key in replaced)


def test_replace_with_dequantize_config_changes_nothing():
    model = make_model()
    replace_with_metal_linear(model, quantization_config=MetalConfig(dequantize=True), pre_quantized=True)
    assert not linear_names(model, MetalLinear)
