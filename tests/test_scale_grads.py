"""Gradients with respect to the affine scales and biases (codes fixed), against float64 autograd.

The oracle rebuilds ``W = scales * q + biases`` in float64 from the unpacked codes and lets torch's own
autograd differentiate ``x @ W.T`` (or ``x @ W``): nothing of metalq's backward is reused.
"""
import pytest
import torch
from torch import nn

import metalq
import metalq.ops

# |g - g_ref| <= TOL * (the same sum over absolute values): the cast of the result dominates for half types.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def quantized(shape, group_size, bits, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen) / shape[-1] ** 0.5
    return metalq.affine_quantize(w.to(dtype), group_size, bits)


def float64_grads(x, wq, scales, biases, upstream, group_size, bits, transpose):
    """d(sum(upstream * y))/d(scales, biases) by float64 autograd."""
    codes = metalq.unpack(wq, bits).double()
    s64 = scales.detach().double().requires_grad_()
    b64 = biases.detach().double().requires_grad_()
    weight = s64.repeat_interleave(group_size, -1) * codes + b64.repeat_interleave(group_size, -1)
    x64 = x.detach().double()
    if weight.dim() == 2:
        x64 = x64.reshape(-1, x64.shape[-1])
    elif x64.dim() == 1:
        x64 = x64.unsqueeze(0)
    y = x64 @ (weight.mT if transpose else weight)
    up64 = upstream.double().reshape(y.shape)
    (y * up64).sum().backward()
    # the same sums over absolute values bound the rounding of each entry
    abs_weight_grad = up64.abs().mT @ x64.abs() if transpose else x64.abs().mT @ up64.abs()
    return s64.grad, b64.grad, codes, abs_weight_grad


def assert_grads_match(x, wq, s, b, group_size, bits, transpose, dtype, seed=3):
    s, b = s.clone().requires_grad_(), b.clone().requires_grad_()
    product = metalq.affine_qmm_t if transpose else metalq.affine_qmm_n
    y = product(x, wq, s, b, group_size, bits)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    (y.float() * upstream.float()).sum().backward()
    ds64, db64, codes, abs_dw = float64_grads(x, wq, s, b, upstream, group_size, bits, transpose)
    abs_dw = abs_dw.sum_to_size(codes.shape)
    grouped = (*codes.shape[:-1], codes.shape[-1] // group_size, group_size)
    scale_bound = TOL[dtype] * (abs_dw * codes).view(grouped).sum(-1) + 1e-30
    bias_bound = TOL[dtype] * abs_dw.view(grouped).sum(-1) + 1e-30
    assert s.grad.dtype == dtype and s.grad.shape == s.shape
    assert ((s.grad.double() - ds64).abs() <= scale_bound).all(), (s.grad.double() - ds64).abs().max()
    assert ((b.grad.double() - db64).abs() <= bias_bound).all(), (b.grad.double() - db64).abs().max()


@pytest.mark.parametrize("transpose", (True, False), ids=("qmm_t", "qmm_n"))
@pytest.mark.parametrize("bits", (2, 3, 4, 5, 6, 8))
@pytest.mark.parametrize("group_size", (16, 32, 64, 128))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=("f32", "bf16", "f16"))
def test_scale_and_bias_grads_match_float64(transpose, bits, group_size, dtype):
    rows, cols = 48, 256
    wq, s, b = quantized((rows, cols), group_size, bits, dtype)
    x = torch.randn(5, cols if transpose else rows, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert_grads_match(x, wq, s, b, group_size, bits, transpose, dtype)


@pytest.mark.parametrize("x_shape", ((128,), (3, 128), (2, 3, 128)))
def test_grads_sum_over_leading_dims_of_x(x_shape):
    wq, s, b = quantized((40, 128), 32, 4, torch.float32)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    assert_grads_match(x, wq, s, b, 32, 4, True, torch.float32)


@pytest.mark.parametrize("transpose", (True, False), ids=("qmm_t", "qmm_n"))
@pytest.mark.parametrize("w_batch, x_shape", (((3,), (3, 4, 64)), ((2, 1), (2, 3, 5, 64)), ((1,), (4, 2, 64)),
                                               ((3,), (64,))))
def test_grads_for_batched_weights_sum_over_broadcast(transpose, w_batch, x_shape):
    wq, s, b = quantized((*w_batch, 64, 64), 32, 3, torch.float32)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(1))
    assert_grads_match(x, wq, s, b, 32, 3, transpose, torch.float32)


def test_grads_on_the_reference_path():
    wq, s, b = quantized((32, 128), 64, 4, torch.float32)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))
    with metalq.reference_ops():
        assert_grads_match(x, wq, s, b, 64, 4, True, torch.float32)
        assert_grads_match(torch.randn(6, 32), wq, s, b, 64, 4, False, torch.float32)


def test_chunked_weight_gradient_matches_one_block(monkeypatch):
    wq, s, b = quantized((50, 128), 32, 5, torch.float32)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(metalq.ops, "GRAD_WEIGHT_CHUNK_ELEMENTS", 3 * 128)  # blocks of 3 rows, a ragged last one
    assert_grads_match(x, wq, s, b, 32, 5, True, torch.float32)


def test_only_the_requested_gradient_is_computed():
    wq, s, b = quantized((16, 64), 32, 4, torch.float32)
    s = s.clone().requires_grad_()
    metalq.affine_qmm_t(torch.randn(2, 64), wq, s, b, 32, 4).sum().backward()
    assert s.grad is not None and b.grad is None


def test_grads_reach_float32_masters_through_autocast():
    # a bfloat16 forward under autocast casts the float32 scales; the gradient arrives in float32
    wq, s, b = quantized((32, 64), 32, 4, torch.float32)
    s, b = s.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = metalq.affine_qmm_t(torch.randn(3, 64), wq, s, b, 32, 4)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert s.grad.dtype == b.grad.dtype == torch.float32 and s.grad.abs().sum() > 0


def least_squares_loss(x, codes, target, group_size):
    """The lowest mean squared error any scales and biases reach with these codes: per output row, a
    float64 linear least-squares problem in (scale, bias) of each group."""
    x64, codes = x.double(), codes.double()
    groups = codes.shape[-1] // group_size
    x_groups = x64.view(len(x64), groups, group_size)
    residual = 0.0
    for row, row_codes in enumerate(codes):
        scale_features = (x_groups * row_codes.view(groups, group_size)).sum(-1)
        features = torch.cat([scale_features, x_groups.sum(-1)], dim=1)
        solution = torch.linalg.lstsq(features, target[:, row].double().unsqueeze(1)).solution
        residual += (features @ solution - target[:, row].double().unsqueeze(1)).pow(2).sum().item()
    return residual / target.numel()


def test_training_scales_and_biases_keeps_the_codes_and_reaches_least_squares():
    torch.manual_seed(0)
    dense = nn.Linear(128, 64, bias=False)
    layer = metalq.MetalLinear.from_linear(dense, bits=3, group_size=64)
    codes = layer.weight.clone()
    layer.scales.requires_grad_()
    layer.qbiases.requires_grad_()
    optimizer = torch.optim.Adam([layer.scales, layer.qbiases], lr=1e-3)
    x = torch.randn(256, 128)
    target = dense(x).detach()

    def loss():
        return (layer(x) - target).pow(2).mean()

    before = loss().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    best = least_squares_loss(x, metalq.unpack(codes, 3), target, 64)
    assert best < 0.95 * before  # there is something to learn
    assert loss().item() <= 1.01 * best
    assert torch.equal(layer.weight, codes)
