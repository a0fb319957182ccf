"""MetalEmbedding and MetalTiedHead: lookups and tied heads against float64 oracles and MLX's QuantizedEmbedding."""
import numpy as np
import pytest
import torch
from torch import nn

import metalq
from metalq import MetalConfig, MetalEmbedding, MetalTiedHead

from conftest import require_mlx

FORMATS = [(bits, gs) for bits in (1, 2, 3, 4, 5, 6, 8) for gs in (16, 32, 64, 128)]


def table_oracle(layer: MetalEmbedding) -> torch.Tensor:
    """The dequantized table in float64, decoded bit by bit from the uint32 words (no metalq op involved)."""
    words = layer.weight.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bits = torch.stack([(words >> i) & 1 for i in range(32)], dim=-1).reshape(layer.num_embeddings, -1)
    bits = bits[:, : layer.embedding_dim * layer.bits].reshape(layer.num_embeddings, layer.embedding_dim, layer.bits)
    q = (bits * (1 << torch.arange(layer.bits))).sum(-1).double()
    scales = layer.scales.double().repeat_interleave(layer.group_size, dim=1)
    return scales * q + layer.qbiases.double().repeat_interleave(layer.group_size, dim=1)


@pytest.mark.parametrize("bits,group_size", FORMATS, ids=[f"b{b}-gs{g}" for b, g in FORMATS])
def test_lookup_is_the_dequantized_row(bits, group_size):
    torch.manual_seed(bits * 1000 + group_size)
    dense = nn.Embedding(37, 256)
    layer = MetalEmbedding.from_embedding(dense, bits=bits, group_size=group_size)
    assert layer.weight.dtype == torch.uint32 and layer.weight.shape == (37, 256 * bits // 32)
    assert layer.scales.shape == layer.qbiases.shape == (37, 256 // group_size)
    table = table_oracle(layer)
    ids = torch.tensor([[0, 36, 5, 5], [17, 2, 0, 36]])
    out = layer(ids)
    assert out.shape == (2, 4, 256) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), table[ids], rtol=0, atol=1e-6)
    # the quantization error is at most one step (MLX shifts the grid so that zero is exact)
    step = layer.scales.double().abs().repeat_interleave(group_size, dim=1)
    assert ((table - dense.weight.double()).abs() <= step + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_as_linear_and_dtypes(dtype):
    torch.manual_seed(0)
    layer = MetalEmbedding.from_embedding(nn.Embedding(50, 128, dtype=dtype), bits=4, group_size=64)
    assert layer.scales.dtype == dtype
    assert layer(torch.tensor(3)).shape == (128,) and layer(torch.tensor(3)).dtype == dtype
    x = torch.randn(2, 3, 128, dtype=dtype)
    y = layer.as_linear(x)
    assert y.shape == (2, 3, 50) and y.dtype == dtype
    expected = x.double() @ table_oracle(layer).T
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


def test_dequantize_meta_and_state_dict():
    torch.manual_seed(1)
    dense = nn.Embedding(40, 64, padding_idx=3)
    layer = MetalEmbedding.from_embedding(dense, bits=6, group_size=32)
    assert list(layer.state_dict()) == ["weight", "scales", "qbiases"]
    back = layer.dequantize()
    assert isinstance(back, nn.Embedding) and back.padding_idx == 3
    torch.testing.assert_close(back.weight.double(), table_oracle(layer), rtol=0, atol=1e-6)
    with torch.device("meta"):
        shell = MetalEmbedding(40, 64, padding_idx=3, bits=6, group_size=32)
    assert shell.weight.is_meta
    shell.load_state_dict(layer.state_dict(), assign=True)
    ids = torch.arange(40)
    assert torch.equal(shell(ids), layer(ids))
    assert "bits=6" in repr(layer) and "padding_idx=3" in repr(layer)


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        MetalEmbedding(10, 96, group_size=64)
    with pytest.raises(ValueError, match="bits"):
        MetalEmbedding(10, 64, bits=7)
    with pytest.raises(ValueError, match="max_norm"):
        MetalEmbedding.from_embedding(nn.Embedding(10, 64, max_norm=1.0), group_size=32)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(60, 64)
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 60, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


def test_quantize_embeddings_keeps_ties():
    torch.manual_seed(2)
    model = TiedLM()
    ids = torch.tensor([[1, 2, 59], [0, 7, 7]])
    metalq.quantize_(model, MetalConfig(bits=4, group_size=32))  # the default leaves embeddings alone
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.head, metalq.MetalLinear)

    model = TiedLM()
    metalq.quantize_(model, MetalConfig(bits=4, group_size=32), embeddings=True)
    assert isinstance(model.embed, MetalEmbedding) and isinstance(model.proj, metalq.MetalLinear)
    assert isinstance(model.head, MetalTiedHead) and model.head.embedding is model.embed
    assert not any(key.startswith("head.") for key in model.state_dict())  # the table is stored once
    table = table_oracle(model.embed)
    proj = model.proj.dequantize().double()
    expected = torch.tanh(proj(table[ids])) @ table.T
    logits = model(ids)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)

    metalq.dequantize_(model)
    assert isinstance(model.embed, nn.Embedding) and isinstance(model.head, nn.Linear)
    assert model.head.weight is model.embed.weight
    torch.testing.assert_close(model(ids), logits, rtol=1e-5, atol=1e-5)


def test_embedding_group_size_misfit_stays_float():
    model = nn.Sequential(nn.Embedding(10, 48), nn.Linear(48, 64))
    with pytest.warns(UserWarning, match="0 \\(in_features=48"):
        metalq.quantize_(model, MetalConfig(group_size=32), embeddings=True)
    assert isinstance(model[0], nn.Embedding)


@pytest.mark.parametrize("bits,group_size", [(4, 64), (3, 32), (8, 128)])
def test_matches_mlx_quantized_embedding(bits, group_size):
    mx = require_mlx()
    import mlx.nn as mnn

    torch.manual_seed(3)
    weight = torch.randn(33, 256)
    reference = mnn.Embedding(33, 256)
    reference.weight = mx.array(weight.numpy())
    reference = mnn.QuantizedEmbedding.from_embedding(reference, group_size=group_size, bits=bits)
    params = {name: torch.from_numpy(np.array(value)) for name, value in reference.parameters().items()}
    # the layout is MLX's after the biases -> qbiases rename; the packed table is bit-identical
    layer = MetalEmbedding.from_embedding(nn.Embedding.from_pretrained(weight), bits=bits, group_size=group_size)
    assert params["weight"].dtype == torch.uint32 and torch.equal(layer.weight, params["weight"])
    assert torch.equal(layer.scales, params["scales"]) and torch.equal(layer.qbiases, params["biases"])
    with torch.device("meta"):
        shell = MetalEmbedding(33, 256, bits=bits, group_size=group_size)
    shell.load_state_dict({"weight": layer.weight, "scales": params["scales"], "qbiases": params["biases"]}, assign=True)
    ids = np.array([[0, 32, 4], [9, 9, 1]], dtype=np.int32)
    assert torch.equal(shell(torch.from_numpy(ids).long()), torch.from_numpy(np.array(reference(mx.array(ids)))))
    x = np.random.default_rng(0).standard_normal((5, 256)).astype(np.float32)
    torch.testing.assert_close(
        shell.as_linear(torch.from_numpy(x)), torch.from_numpy(np.array(reference.as_linear(mx.array(x)))),
        rtol=1e-4, atol=1e-4,
    )
