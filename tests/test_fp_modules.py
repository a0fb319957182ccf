"""The floating-point modes through the Python layer: MetalConfig(mode=...), MetalLinear / MetalEmbedding,
quantize_ / replace_with_metal_linear, and checkpoints (metalq's own round trip; mlx-lm's mxfp4 directories,
read with mlx_lm.load as the oracle)."""
import importlib.util
import json

import pytest
import torch
from torch import nn

import metalq
from conftest import require
from metalq import MetalConfig, MetalEmbedding, MetalLinear, load_quantized, save_quantized
from test_checkpoint import (
    float_llama,
    make_tiny_llama,
    meta_llama,
    mlx_lm_convert,
    mlx_weights,
    require_mlx_lm,
    torch_of,
)

FP_MODES = ("mxfp4", "nvfp4", "mxfp8")


# ---- MetalConfig ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,bits,group_size", [("affine", 4, 64), ("mxfp4", 4, 32), ("nvfp4", 4, 16),
                                                  ("mxfp8", 8, 32)])
def test_config_defaults_follow_the_mode(mode, bits, group_size):
    config = MetalConfig(mode=mode)
    assert (config.bits, config.group_size, config.mode) == (bits, group_size, mode)
    assert MetalConfig.from_dict(config.to_dict()) == config
    assert ("mode" in config.to_dict()) == (mode != "affine")  # affine stays transformers' exact dict


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "mxfp4", "group_size": 64}, "mxfp4 quantization requires group size 32 but got 64"),
    ({"mode": "nvfp4", "bits": 8}, "nvfp4 quantization requires bits to be 4 but got 8"),
    ({"mode": "mxfp8", "bits": 4}, "mxfp8 quantization requires bits to be 8 but got 4"),
    ({"mode": "int4"}, "Invalid quantization mode 'int4'"),
    ({"mode": "affine", "group_size": 8}, "group_size must be one of"),
])
def test_config_rejects_bad_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetalConfig(**kwargs)


def test_transformers_metal_config_accepts_the_dict():
    """transformers' MetalConfig (affine only) takes metalq's affine dict unchanged; an fp mode's extra key is
    tolerated there as an unknown keyword, so only metalq gives it meaning."""
    require(importlib.util.find_spec("transformers") is not None, "transformers")
    from transformers.utils.quantization_config import MetalConfig as HFMetalConfig

    assert HFMetalConfig(**{k: v for k, v in MetalConfig().to_dict().items() if k != "quant_method"}).to_dict() == \
        MetalConfig().to_dict()
    assert "mode" not in HFMetalConfig(bits=4, group_size=32, mode="mxfp4").to_dict()


# ---- modules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", FP_MODES)
def test_linear_in_fp_mode(mode):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, dtype=torch.float32)
    layer = MetalLinear.from_linear(linear, mode=mode)
    assert set(layer.state_dict()) == {"weight", "scales", "bias"}
    assert layer.scales.dtype == torch.uint8 and layer.mode == mode
    wq, scales = metalq.fp_quantize(linear.weight.detach(), mode)
    assert torch.equal(layer.weight, wq) and torch.equal(layer.scales, scales)
    x = torch.randn(3, 96)
    w = metalq.fp_dequantize(wq, scales, mode, dtype=torch.float32)
    torch.testing.assert_close(layer(x), x @ w.t() + linear.bias, rtol=1e-5, atol=1e-5)
    dense = layer.dequantize()
    assert dense.weight.dtype == torch.float32 and torch.equal(dense.weight, w)
    assert f"mode={mode}" in repr(layer)


def test_quantize_and_replace_honour_the_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(2, 64)
    metalq.quantize_(model, {"0": MetalConfig(mode="nvfp4"), "_default": MetalConfig(mode="mxfp8")})
    assert (model[0].mode, model[2].mode) == ("nvfp4", "mxfp8")
    assert model(x).shape == (2, 16)
    with torch.device("meta"):
        shell = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    metalq.replace_with_metal_linear(shell, quantization_config=MetalConfig(mode="mxfp4").to_dict(),
                                     pre_quantized=True)
    assert shell[0].scales.dtype == torch.uint8 and shell[0].scales.shape == (32, 2)
    assert "qbiases" not in shell[0].state_dict() and shell[0].weight.is_meta


def test_embedding_in_fp_mode():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 64)
    table = MetalEmbedding.from_embedding(emb, mode="mxfp4")
    ids = torch.tensor([[3, 1, 49]])
    w = metalq.fp_dequantize(table.weight, table.scales, "mxfp4", dtype=torch.float32)
    assert torch.equal(table(ids), w[ids])
    h = torch.randn(2, 64)
    torch.testing.assert_close(table.as_linear(h), h @ w.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(table.dequantize().weight, w)


# ---- checkpoints -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["metal", "mlx"])
@pytest.mark.parametrize("mode", FP_MODES)
def test_checkpoint_round_trip(tmp_path, fmt, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    metalq.quantize_(model, MetalConfig(mode=mode))
    save_quantized(model, tmp_path / "out", format=fmt)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    entry = config["quantization_config"] if fmt == "metal" else config["quantization"]
    assert entry["mode"] == mode
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    load_quantized(fresh, tmp_path / "out")
    assert fresh[0].mode == mode
    for key, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


@pytest.fixture(scope="module")
def mxfp4_llama(tmp_path_factory):
    require_mlx_lm()
    root = tmp_path_factory.mktemp("llama-fp")
    hf = make_tiny_llama(root / "hf")
    return hf, mlx_lm_convert(hf, root / "mlx-mxfp4", q_mode="mxfp4")


def test_mlx_lm_mxfp4_directory_loads_bit_exact(mxfp4_llama):
    import mlx.core as mx
    import numpy as np

    hf, directory = mxfp4_llama
    quantization = json.loads((directory / "config.json").read_text())["quantization"]
    assert (quantization["mode"], quantization["bits"], quantization["group_size"]) == ("mxfp4", 4, 32)
    model = load_quantized(meta_llama(directory), directory)
    state = model.state_dict()
    for key, array in mlx_weights(directory).items():
        assert torch.equal(torch_of(array), state[key]), key
    linears = [m for m in model.modules() if isinstance(m, MetalLinear)]
    assert linears and all(m.mode == "mxfp4" for m in linears)
    assert model.model.embed_tokens.mode == "mxfp4"
    mlx_model, _ = require_mlx_lm().load(str(directory))
    tokens = [[1, 5, 7, 9, 11, 13]]
    expected = np.array(mlx_model(mx.array(tokens)).astype(mx.float32))
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits
    torch.testing.assert_close(logits, torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
    # metalq's own quantization of the float model gives the same tensors
    reference = float_llama(hf)
    metalq.quantize_(reference, MetalConfig(mode="mxfp4"), embeddings=True)
    for key, tensor in reference.state_dict().items():
        assert torch.equal(tensor, state[key]), key


def test_convert_float_directory_to_mlx_mxfp8_loads_in_mlx_lm(mxfp4_llama, tmp_path):
    import mlx.core as mx
    import numpy as np

    hf, _ = mxfp4_llama
    out = metalq.convert_checkpoint(hf, tmp_path / "mxfp8", to="mlx", mode="mxfp8")
    mlx_model, _ = require_mlx_lm().load(str(out))
    model = load_quantized(meta_llama(out), out)
    tokens = [[1, 2, 3, 4]]
    expected = np.array(mlx_model(mx.array(tokens)).astype(mx.float32))
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits
    torch.testing.assert_close(logits, torch.from_numpy(expected), rtol=1e-4, atol=1e-4)
