"""MetalLinear, MetalEmbedding and MetalExperts run "as the Mac would": their ops go through the DispatchPlan and
the Metal kernels on the emulator, and must give what the CPU kernels give."""
import types

import pytest
import torch

import metalq
import metalq.moe
import metalq.ops
from test_metal_gather import emulate as emulate_gather
from test_metal_kernels import emulate_dequantize
from test_metal_qmv import emulate_qmm


def route_ops_to_emulator(lib, monkeypatch):
    """Routes metalq's matmul and dequantize wrappers to the Metal kernels on the emulator."""

    def qmm(x, w, scales, biases, group_size, bits, transpose):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out, _, _ = emulate_qmm(lib, x2, w, scales, biases, group_size, bits, transpose)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    emulated = types.SimpleNamespace(
        affine_qmm_t=lambda *a: qmm(*a, True),
        affine_qmm_n=lambda *a: qmm(*a, False),
        affine_dequantize=lambda *a: emulate_dequantize(lib, *a)[0],
        affine_gather_qmm=lambda *a: emulate_gather(lib, *a)[0],
    )
    monkeypatch.setattr(metalq.ops, "_ops", emulated)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("bits, group_size", ((4, 64), (3, 32), (8, 128)))
@pytest.mark.parametrize("rows", (1, 5, 33))
def test_metal_linear_forward_matches_cpu(lib, monkeypatch, dtype, bits, group_size, rows):
    torch.manual_seed(rows + bits)
    layer = metalq.MetalLinear.from_linear(torch.nn.Linear(256, 72).to(dtype), bits=bits, group_size=group_size)
    x = torch.randn(rows, 256, dtype=dtype)
    route_ops_to_emulator(lib, monkeypatch)
    emulated = layer(x)
    monkeypatch.undo()
    expected = layer(x)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(emulated, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("bits, group_size", ((4, 64), (6, 32)))
def test_metal_embedding_lookup_matches_cpu(lib, monkeypatch, bits, group_size):
    torch.manual_seed(bits)
    table = metalq.MetalEmbedding.from_embedding(torch.nn.Embedding(50, 128), bits=bits, group_size=group_size)
    ids = torch.tensor([[0, 7, 49], [7, 3, 3]])
    route_ops_to_emulator(lib, monkeypatch)
    emulated = table(ids)
    monkeypatch.undo()
    assert torch.equal(emulated, table(ids))  # dequantize is exact on both


@pytest.mark.parametrize("tokens", (5, 40), ids=("ungrouped", "grouped"))  # 10 and 80 token-expert pairs
def test_metal_experts_forward_matches_cpu(lib, monkeypatch, tokens):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(hidden_size=64, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2)
    torch.manual_seed(tokens)
    float_experts = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts(config)
    for param in float_experts.parameters():
        torch.nn.init.normal_(param, std=0.2)
    experts = metalq.MetalExperts.from_experts(float_experts, bits=4, group_size=32)
    hidden = torch.randn(tokens, 64)
    routing = torch.randn(tokens, 8).softmax(-1).topk(2)
    grouped = 2 * tokens >= metalq.moe.SORT_MIN_PAIRS
    route_ops_to_emulator(lib, monkeypatch)
    emulated = experts(hidden, routing.indices, routing.values)
    monkeypatch.undo()
    expected = experts(hidden, routing.indices, routing.values)
    assert grouped == (tokens == 40)
    torch.testing.assert_close(emulated, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
