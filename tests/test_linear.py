"""MetalLinear: forward and gradients against float64, the transformers state_dict layout, meta init, compile."""
import pytest
import torch
from torch import nn

from metalq import MetalLinear

# max |y - reference| / max |reference| per activation dtype (float32 accumulation inside the kernel)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def dequantize_f64(layer: MetalLinear) -> torch.Tensor:
    """Independent float64 reading of the packed weight: element k starts at bit k*bits of each row's
    LSB-first bitstream; w = scale * q + bias per group."""
    words = layer.weight.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    bitstream = (words[..., None] >> torch.arange(32)) & 1  # (N, words, 32), LSB first
    bitstream = bitstream.reshape(layer.out_features, layer.in_features, layer.bits)
    q = (bitstream * (1 << torch.arange(layer.bits))).sum(-1).double()
    expand = lambda t: t.double().repeat_interleave(layer.group_size, dim=1)  # noqa: E731
    return expand(layer.scales) * q + expand(layer.qbiases)


def reference_f64(layer: MetalLinear, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ dequantize_f64(layer).T
    return y if layer.bias is None else y + layer.bias.double()


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("x_shape", [(1, 256), (5, 256), (2, 3, 256)], ids=["M1", "M5", "batched"])
@pytest.mark.parametrize("group_size", [64, 16], ids=lambda g: f"gs{g}")
def test_forward_matches_float64(dtype, bits, bias, x_shape, group_size):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=bias, dtype=dtype)
    layer = MetalLinear.from_linear(linear, bits=bits, group_size=group_size)
    x = torch.randn(x_shape, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], 96)
    assert relative_error(y, reference_f64(layer, x)) < TOLERANCE[dtype]


def test_forward_casts_scales_to_the_input_dtype():
    torch.manual_seed(0)
    layer = MetalLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=32)  # float32 scales
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative_error(y, reference_f64(layer, x)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_is_transformers_metal_layout(bits, dtype):
    # transformers' MetalLinear: weight uint32 [N, K*bits/32], scales/qbiases [N, K/group_size], float bias
    n, k, group_size = 48, 384, 128
    layer = MetalLinear(k, n, bias=True, bits=bits, group_size=group_size, dtype=dtype)
    layout = {name: (t.dtype, tuple(t.shape)) for name, t in layer.state_dict().items()}
    assert layout == {
        "weight": (torch.uint32, (n, k * bits // 32)),
        "scales": (dtype, (n, k // group_size)),
        "qbiases": (dtype, (n, k // group_size)),
        "bias": (dtype, (n,)),
    }
    assert "bias" not in MetalLinear(k, n, bias=False, bits=bits, group_size=group_size).state_dict()


def test_quantized_tensors_are_frozen_and_follow_to():
    layer = MetalLinear.from_linear(nn.Linear(64, 32), bits=4, group_size=32)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    layer = layer.to(torch.float16)
    assert layer.weight.dtype == torch.uint32
    assert layer.scales.dtype == layer.qbiases.dtype == layer.bias.dtype == torch.float16


def test_meta_construction_then_load_state_dict_assign():
    torch.manual_seed(0)
    source = MetalLinear.from_linear(nn.Linear(256, 80, dtype=torch.bfloat16), bits=3, group_size=64)
    with torch.device("meta"):
        shell = MetalLinear(256, 80, bits=3, group_size=64)  # float32 placeholders, like transformers
    assert all(t.is_meta for t in shell.state_dict().values())
    shell.load_state_dict(source.state_dict(), assign=True)
    assert shell.scales.dtype == torch.bfloat16 and not shell.weight.is_meta
    assert shell.bias.requires_grad
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(shell(x), source(x), rtol=0, atol=0)


def test_from_linear_and_dequantize_round_trip():
    torch.manual_seed(0)
    linear = nn.Linear(128, 40, dtype=torch.float16)
    layer = MetalLinear.from_linear(linear, bits=5, group_size=32)
    back = layer.dequantize()
    assert type(back) is nn.Linear and back.weight.dtype == torch.float16
    # float16 arithmetic (scale * q + bias rounds twice) against exact: within an ulp of the offset's size
    torch.testing.assert_close(back.weight.double(), dequantize_f64(layer), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(back.bias, linear.bias, rtol=0, atol=0)
    x = torch.randn(2, 128, dtype=torch.float16)
    torch.testing.assert_close(back(x), layer(x), rtol=2e-3, atol=2e-3)


def test_extra_repr_names_the_format():
    text = repr(MetalLinear(128, 64, bias=False, bits=3, group_size=32))
    for part in ["in_features=128", "out_features=64", "bias=False", "bits=3", "group_size=32"]:
        assert part in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bits=7), "bits must be one of"),
        (dict(group_size=48), "group_size must be one of"),
        (dict(in_features=96, group_size=64), "in_features=96 must be divisible by group_size=64"),
        (dict(in_features=48, group_size=16, bits=5),
         r"in_features=48 must be divisible by group_size=16 and in_features \* bits=5 by 32 \(whole uint32 words\)"),
    ],
    ids=["bits", "group_size", "in_features", "in_features-words"],
)
def test_constructor_rejects_bad_format(kwargs, message):
    args = {"in_features": 128, "out_features": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        MetalLinear(**args)


def test_gradients_of_input_and_bias_match_float64():
    torch.manual_seed(0)
    layer = MetalLinear.from_linear(nn.Linear(192, 72), bits=4, group_size=64)
    x = torch.randn(2, 3, 192, requires_grad=True)
    grad_out = torch.randn(2, 3, 72)
    layer(x).backward(grad_out)

    x64 = x.detach().double().requires_grad_()
    bias64 = layer.bias.detach().double().requires_grad_()
    (x64 @ dequantize_f64(layer).T + bias64).backward(grad_out.double())
    assert relative_error(x.grad, x64.grad) < 1e-5
    assert relative_error(layer.bias.grad, bias64.grad) < 1e-5


def test_lora_step_trains_only_the_adapter():
    torch.manual_seed(0)

    class LoRA(nn.Module):
        def __init__(self, base: MetalLinear, rank: int = 4):
            super().__init__()
            self.base = base
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
            nn.init.normal_(self.up.weight, std=0.1)

        def forward(self, x):
            return self.base(x) + self.up(self.down(x))

    model = LoRA(MetalLinear.from_linear(nn.Linear(128, 32), bits=4, group_size=64))
    model.base.bias.requires_grad_(False)
    frozen = {name: t.clone() for name, t in model.base.state_dict().items()}
    adapter = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert sorted(adapter) == ["down.weight", "up.weight"]

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(8, 128), torch.randn(8, 32)
    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    optimizer.step()

    for name, before in frozen.items():
        assert torch.equal(model.base.state_dict()[name], before), name
    for name, before in adapter.items():
        assert not torch.equal(model.get_parameter(name), before), name
    assert nn.functional.mse_loss(model(x), target) < loss


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(
        MetalLinear.from_linear(nn.Linear(128, 256), bits=4, group_size=64),
        nn.GELU(),
        MetalLinear.from_linear(nn.Linear(256, 64), bits=3, group_size=32),
    )
    x = torch.randn(5, 128)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
