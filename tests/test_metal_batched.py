"""Batches of weights on the Metal kernels (emulator): every branch of plan_affine_qmm with batch
dimensions on x, on w, or broadcast between them (size-1 dimensions and stride-0 expands), against
float64 and the CPU op. The kernels find their matrices through grid z (metal/quantized.h
select_matrices); the plan merges and folds batch dimensions (csrc/plan.cpp qmm_operands)."""
import struct

import pytest
import torch

import metalq

# |y - y64| <= TOL * (|x| @ |W|), as in test_metal_qmv.py.
TOL = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _base(name):
    return name.split("_float")[0].split("_half")[0].split("_bfloat")[0].removeprefix("affine_")


def _weights(batch, rows, packed, dtype, group_size, bits, g):
    """Random packed words (every bit pattern), scales of both signs, biases: W [*batch, rows, packed]."""
    wq = torch.randint(0, 2**32, (*batch, rows, packed * bits // 32), generator=g, dtype=torch.int64)
    scales = torch.randn(*batch, rows, packed // group_size, generator=g).div(8).to(dtype)
    biases = torch.randn(*batch, rows, packed // group_size, generator=g).div(4).to(dtype)
    return wq.to(torch.uint32), scales, biases


def _dense(wq, scales, biases, group_size, bits, transpose):
    """float64 W laid out [..., K, N] as the product uses it."""
    q = torch.ops.metalq.unpack(wq, bits).double()
    w = q * scales.double().repeat_interleave(group_size, -1) + biases.double().repeat_interleave(group_size, -1)
    return w.mT if transpose else w


def emulate(lib, x, wq, scales, biases, group_size, bits, transpose, order="random"):
    out_shape = torch.ops.metalq.affine_qmm_t(x.to("meta"), wq.to("meta"), scales.to("meta"), biases.to("meta"),
                                              group_size, bits).shape if transpose else \
        torch.ops.metalq.affine_qmm_n(x.to("meta"), wq.to("meta"), scales.to("meta"), biases.to("meta"),
                                      group_size, bits).shape
    out = torch.empty(out_shape, dtype=x.dtype)
    out.view(torch.uint8).fill_(0xFF)  # NaN: unwritten outputs show
    plans = metalq._C.plan_affine_qmm(x, wq, scales, biases, out, group_size, bits, transpose)
    for plan in plans:
        lib.run(plan, order)
    return out, plans


def _batch_params(plan):
    """BatchParams (metal/params.h) of a matmul plan: count, ndim, shape, x_stride, w_stride."""
    raw = dict(plan["bytes"])[6]
    count, ndim, *rest = struct.unpack("<2I24I", raw)
    return count, rest[:ndim], rest[8:8 + ndim], rest[16:16 + ndim]


def _check(out, x, wq, scales, biases, group_size, bits, transpose):
    dense = _dense(wq, scales, biases, group_size, bits, transpose)
    x64 = x.double().unsqueeze(-2) if x.dim() == 1 else x.double()
    exact, magnitude = x64 @ dense, x64.abs() @ dense.abs()
    if x.dim() == 1:
        exact, magnitude = exact.squeeze(-2), magnitude.squeeze(-2)
    assert out.shape == exact.shape
    bound = TOL[x.dtype] * magnitude + 1e-30
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all() and (err <= bound).all(), float((err / bound).max())
    op = torch.ops.metalq.affine_qmm_t if transpose else torch.ops.metalq.affine_qmm_n
    cpu = op(x, wq, scales, biases, group_size, bits).double()
    assert ((out.double() - cpu).abs() <= 2 * bound).all(), "differs from the CPU op"


# name, kernels, x shape, w batch, M-independent (K, N), transpose, dtype, gs, bits
CASES = [
    ("qmv_fast", ["qmv_fast"], (3, 1, 512), (3,), (512, 16), True, torch.float16, 64, 4),
    ("qmv-unaligned", ["qmv"], (1, 96), (2, 2), (96, 13), True, torch.bfloat16, 32, 3),
    ("qmv-x-1d", ["qmv"], (256,), (2,), (256, 12), True, torch.float32, 128, 5),
    ("qmv_quad", ["qmv_quad_k128"], (2, 3, 128), (2,), (128, 70), True, torch.float16, 64, 4),
    ("qmv_wide", ["qmv_wide"], (2, 1, 3, 128), (1, 3), (128, 8), True, torch.float16, 64, 6),
    ("qvm", ["qvm"], (4, 2, 100), (4,), (100, 64), False, torch.float16, 64, 2),
    ("qvm_split_k", ["qvm_split_k", "split_k_reduce"], (2, 1, 1, 1100), (1, 3), (1100, 32), False, torch.bfloat16,
     32, 4),
    ("qmm_t", ["qmm_t"], (2, 33, 64), (2,), (64, 40), True, torch.float32, 32, 8),
    ("qmm_n", ["qmm_n"], (1, 2, 10, 70), (3, 1), (70, 64), False, torch.float16, 64, 3),
    ("qmm_t_splitk", ["qmm_t_splitk", "split_k_reduce"], (2, 9, 512), (2,), (512, 32), True, torch.float16, 128, 4),
    ("qmm_n_splitk", ["qmm_n_splitk", "split_k_reduce"], (1, 12, 600), (2,), (600, 32), False, torch.bfloat16,
     32, 1),
    # group size 16: lanes spanning two groups (1 bit, K = 128 quads), runs of 16 columns, split GEMMs
    ("qmv_fast-gs16", ["qmv_fast"], (2, 1, 1024), (2,), (1024, 8), True, torch.float16, 16, 1),
    ("qmv_quad-gs16", ["qmv_quad_k128"], (2, 3, 128), (2,), (128, 70), True, torch.bfloat16, 16, 2),
    ("qvm-gs16", ["qvm"], (3, 2, 100), (3,), (100, 48), False, torch.float32, 16, 6),
    ("qmm_t_splitk-gs16", ["qmm_t_splitk", "split_k_reduce"], (2, 9, 512), (2,), (512, 32), True, torch.float16, 16,
     5),
]


@pytest.mark.parametrize("name, kernels, x_shape, w_batch, kn, transpose, dtype, group_size, bits", CASES,
                         ids=[c[0] for c in CASES])
@pytest.mark.parametrize("order", ["random", "forward", "reverse"])
def test_every_branch_batched(lib, name, kernels, x_shape, w_batch, kn, transpose, dtype, group_size, bits, order):
    K, N = kn
    g = torch.Generator().manual_seed(len(name) + K)
    rows, packed = (N, K) if transpose else (K, N)
    wq, scales, biases = _weights(w_batch, rows, packed, dtype, group_size, bits, g)
    x = torch.randn(x_shape, generator=g).to(dtype)
    out, plans = emulate(lib, x, wq, scales, biases, group_size, bits, transpose, order)
    assert [_base(p["kernel"]) for p in plans] == kernels
    count, M = _batch_params(plans[0])[0], struct.unpack("<I", dict(plans[0]["bytes"])[5][:4])[0]
    assert plans[0]["threadgroups"][2] % count == 0 and count * M * N == out.numel()
    _check(out, x, wq, scales, biases, group_size, bits, transpose)


def test_stride_zero_operands_bind_one_copy(lib):
    """An expanded w (stride 0) and an expanded x are bound once and walked with stride 0."""
    g = torch.Generator().manual_seed(3)
    wq, scales, biases = _weights((1,), 24, 256, torch.float16, 64, 4, g)
    w3 = [t.expand(4, *t.shape[1:]) for t in (wq, scales, biases)]
    x = torch.randn(1, 2, 256, generator=g).half().expand(4, 2, 256)
    out, plans = emulate(lib, x, *w3, 64, 4, True)
    bound = dict(plans[0]["buffers"])
    assert bound[0].shape == wq.shape and bound[3].shape == (1, 2, 256)
    assert _batch_params(plans[0]) == (4, [4], [0], [0])
    _check(out, x, *w3, 64, 4, True)


def test_plan_merges_and_folds_batch_dims():
    """Contiguous batch dimensions merge into one; an innermost dimension that shares w folds into M."""
    meta = dict(device="meta", dtype=torch.float16)
    w = (torch.empty(2, 3, 16, 8, device="meta", dtype=torch.uint32),) + (torch.empty(2, 3, 16, 1, **meta),) * 2
    out = torch.empty(2, 3, 5, 16, dtype=torch.float16)
    plans = metalq._C.plan_affine_qmm(torch.empty(2, 3, 5, 64, **meta), *w, out, 64, 4, True)
    assert _batch_params(plans[0]) == (6, [6], [1], [1])
    # x [2, 4, 5, K] with w [2, 1, N, K]: items along the 4 share w and are contiguous in x -> M = 20.
    w1 = (torch.empty(2, 1, 16, 8, device="meta", dtype=torch.uint32),) + (torch.empty(2, 1, 16, 1, **meta),) * 2
    plans = metalq._C.plan_affine_qmm(torch.empty(2, 4, 5, 64, **meta), *w1, torch.empty(2, 4, 5, 16, **meta),
                                      64, 4, True)
    assert _batch_params(plans[0]) == (2, [2], [1], [1])
    assert struct.unpack("<3I", dict(plans[0]["bytes"])[5][:12])[0] == 20 and plans[0]["threadgroups"][2] == 2
    # w broadcast over the outer dimension, x over the inner one: two dimensions stay.
    w2 = (torch.empty(1, 3, 16, 8, device="meta", dtype=torch.uint32),) + (torch.empty(1, 3, 16, 1, **meta),) * 2
    plans = metalq._C.plan_affine_qmm(torch.empty(4, 1, 5, 64, **meta), *w2, torch.empty(4, 3, 5, 16, **meta),
                                      64, 4, True)
    assert _batch_params(plans[0]) == (12, [4, 3], [1, 0], [0, 1])
