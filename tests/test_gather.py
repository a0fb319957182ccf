"""affine_gather_qmm (MLX's gather_qmm) on CPU: against mx.gather_qmm and a float64 loop of dense products,
index rules and errors, sorted vs unsorted, torch.library integration and autograd."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import metalq
from conftest import require_mlx

ops = torch.ops.metalq

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# |y - y_ref| <= TOL * (|x| @ |W|): the output's own rounding in T dominates for half types.
TOL = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def experts(count, rows, cols, group_size, bits, dtype, seed=0):
    """(w_q, scales, biases) of `count` random (rows, cols) matrices quantized along cols."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(count, rows, cols, generator=gen) / cols**0.5
    return metalq.affine_quantize(w.to(dtype), group_size, bits)


def randn(shape, dtype=torch.float32, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randint(high, shape, seed=2):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def float64_gather(x, wq, s, b, lhs, rhs, transpose, group_size, bits):
    """out[i] = x[lhs[i]] @ B[rhs[i]] in float64, one dense product per output matrix, plus the bound
    TOL-scale |x| @ |B| per element. Missing indices follow MLX's rule (arange over the batch dims)."""
    B = ops.affine_dequantize(wq, s, b, group_size, bits).double()
    B = B.transpose(-1, -2) if transpose else B
    xb, wb = x.shape[:-2], wq.shape[:-2]
    lhs = torch.arange(xb.numel()).view(xb) if lhs is None else lhs
    rhs = torch.arange(wb.numel()).view(wb) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs.long(), rhs.long())
    x3, B3 = x.double().reshape(-1, *x.shape[-2:]), B.reshape(-1, *B.shape[-2:])
    ref = torch.stack([x3[i] @ B3[j] for i, j in zip(lhs.flatten().tolist(), rhs.flatten().tolist())])
    mag = torch.stack([x3[i].abs() @ B3[j].abs() for i, j in zip(lhs.flatten().tolist(), rhs.flatten().tolist())])
    out_shape = lhs.shape + (x.shape[-2], B.shape[-1])
    return ref.view(out_shape), mag.view(out_shape)


def assert_close_to(y, ref, mag, dtype, what=""):
    assert y.dtype == dtype and y.shape == ref.shape, f"{what}: {y.dtype}{tuple(y.shape)} vs {tuple(ref.shape)}"
    ratio = ((y.double() - ref).abs() / (TOL[dtype] * mag + 1e-30)).max().item() if y.numel() else 0.0
    assert ratio <= 1.0, f"{what}: error is {ratio:.2f}x the {dtype} tolerance"


def mlx_gather(mx, x, wq, s, b, lhs, rhs, transpose, group_size, bits, sorted_indices=False):
    arr = lambda t: None if t is None else mx.array(t.float().numpy() if t.is_floating_point() else t.numpy())
    y = mx.gather_qmm(arr(x), mx.array(wq.numpy()), arr(s), arr(b), arr(lhs), arr(rhs), transpose, group_size, bits,
                      sorted_indices=sorted_indices)
    return torch.from_numpy(np.array(y.astype(mx.float32)))


# Index layouts: (x batch, w experts, lhs or None, rhs or None). Output batch = broadcast(lhs, rhs).
LAYOUTS = {
    # top-k routing as mlx-lm's SwitchGLU calls it: x (T, 1, 1, K), rhs (T, k); lhs defaults to arange(T).
    "rhs_topk": ((6, 1), 8, None, randint(8, (6, 3))),
    "rhs_only": ((5,), 8, None, randint(8, (5,), seed=3)),
    "lhs_only": ((7,), 1, randint(7, (4,)), None),
    "both": ((3,), 8, torch.tensor([0, 2, 2, 1, 0]), torch.tensor([7, 1, 1, 0, 7])),
    "both_broadcast": ((4,), 8, randint(4, (1, 3)), randint(8, (2, 1), seed=4)),
    "neither": ((2, 3), 6, None, None),  # x and w batch dims pair up one to one
    "scalar_rhs": ((3,), 8, None, torch.tensor(5)),
}


def layout_args(layout, M, K, N, group_size, bits, dtype, transpose):
    x_batch, count, lhs, rhs = LAYOUTS[layout]
    w_batch = x_batch if layout == "neither" else (count,)
    wq, s, b = experts(int(np.prod(w_batch)), N if transpose else K, K if transpose else N, group_size, bits, dtype)
    wq, s, b = (t.reshape(*w_batch, *t.shape[1:]) for t in (wq, s, b))
    return randn((*x_batch, M, K), dtype), wq, s, b, lhs, rhs


@pytest.mark.parametrize("transpose", (True, False), ids=("t", "n"))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_mlx_gather_qmm(layout, transpose):
    mx = require_mlx()
    for bits, gs, M in ((4, 64, 1), (3, 32, 2), (8, 128, 5), (2, 64, 17)):
        x, wq, s, b, lhs, rhs = layout_args(layout, M, 256, 96 if transpose else 128, gs, bits, torch.float32, transpose)
        y = metalq.affine_gather_qmm(x, wq, s, b, lhs, rhs, transpose=transpose, group_size=gs, bits=bits)
        ref = mlx_gather(mx, x, wq, s, b, lhs, rhs, transpose, gs, bits)
        _, mag = float64_gather(x, wq, s, b, lhs, rhs, transpose, gs, bits)
        assert_close_to(y, ref.double(), mag, torch.float32, f"{layout} bits={bits} gs={gs} M={M}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (2, 3, 4, 8), ids=lambda b: f"b{b}")
@pytest.mark.parametrize("group_size", (32, 64, 128), ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("transpose", (True, False), ids=("t", "n"))
def test_matches_float64_loop(transpose, group_size, bits, dtype):
    # 40 tokens routed to 3 of 8 experts: experts get from 0 to ~20 rows, on both sides of the
    # fused-kernel / GEMM switch; the unquantized matrix axis is odd.
    dt = DTYPES[dtype]
    K, N = (3 * group_size, 67) if transpose else (67, 3 * group_size)  # the quantized axis: whole groups
    wq, s, b = experts(8, N if transpose else K, K if transpose else N, group_size, bits, dt)
    x = randn((40, 1, 1, K), dt)
    rhs = randint(8, (40, 3))
    y = metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=rhs, transpose=transpose, group_size=group_size, bits=bits)
    assert_close_to(y, *float64_gather(x, wq, s, b, None, rhs, transpose, group_size, bits), dt)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_expert", (1, 3, 40), ids=lambda r: f"rows{r}")
def test_sorted_indices_give_the_same_result(rows_per_expert, dtype):
    dt = DTYPES[dtype]
    wq, s, b = experts(8, 96, 128, 64, 4, dt)
    rhs = randint(8, (10 * rows_per_expert,)).sort().values
    x = randn((rhs.numel(), 1, 128), dt)
    hinted = metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=rhs, sorted_indices=True)
    plain = metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=rhs)
    shuffled = torch.randperm(rhs.numel(), generator=torch.Generator().manual_seed(0))
    unsorted = metalq.affine_gather_qmm(x[shuffled], wq, s, b, rhs_indices=rhs[shuffled])
    assert torch.equal(hinted, plain)
    ref, mag = float64_gather(x, wq, s, b, None, rhs, True, 64, 4)
    assert_close_to(plain, ref, mag, dt)
    assert_close_to(unsorted, ref[shuffled], mag[shuffled], dt)


def test_hint_on_unsorted_indices_is_still_correct():
    wq, s, b = experts(4, 64, 128, 64, 4, torch.float32)
    rhs = torch.tensor([3, 0, 3, 1, 0, 0])
    x = randn((6, 2, 128))
    y = metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=rhs, sorted_indices=True)
    assert_close_to(y, *float64_gather(x, wq, s, b, None, rhs, True, 64, 4), torch.float32)


@pytest.mark.parametrize("index_dtype", (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint32))
def test_every_integral_index_dtype(index_dtype):
    wq, s, b = experts(4, 64, 128, 64, 4, torch.float32)
    x = randn((3, 1, 128))
    lhs, rhs = torch.tensor([2, 0, 1, 2]), torch.tensor([3, 3, 0, 1])
    want = metalq.affine_gather_qmm(x, wq, s, b, lhs, rhs)
    assert torch.equal(metalq.affine_gather_qmm(x, wq, s, b, lhs.to(index_dtype), rhs.to(index_dtype)), want)


def test_batched_x_and_non_contiguous_inputs():
    # x batch dims flatten for lhs; every input strided.
    wq, s, b = experts(6, 64, 128, 32, 4, torch.float32)
    x = randn((2, 3, 128, 4)).transpose(-1, -2)  # (2, 3, 4, 128), not contiguous
    lhs = torch.tensor([[5, 0, 3, 3]])[:, ::2]
    rhs = torch.tensor([1, 5, 4, 2])[::2].view(2, 1)
    wq_t, s_t, b_t = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (wq, s, b))
    y = metalq.affine_gather_qmm(x, wq_t, s_t, b_t, lhs, rhs, group_size=32)
    assert_close_to(y, *float64_gather(x, wq, s, b, lhs, rhs, True, 32, 4), torch.float32)


def test_threads_split_every_path():
    before = torch.get_num_threads()
    wq, s, b = experts(5, 517, 256, 64, 3, torch.float32)
    x = randn((30, 1, 256))
    rhs = torch.tensor([0] * 20 + [1, 1, 2] + [4] * 7)  # a GEMM block, fused blocks, an unused expert
    want = float64_gather(x, wq, s, b, None, rhs, True, 64, 3)
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert_close_to(metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=rhs, bits=3), *want, torch.float32)
    finally:
        torch.set_num_threads(before)


def test_empty_shapes():
    wq, s, b = experts(4, 64, 128, 64, 4, torch.float32)
    assert metalq.affine_gather_qmm(randn((3, 1, 128)), wq, s, b, rhs_indices=torch.zeros(0, dtype=torch.long),
                                    lhs_indices=torch.zeros(0, dtype=torch.long)).shape == (0, 1, 64)
    y = metalq.affine_gather_qmm(torch.zeros(4, 0, 128), wq, s, b)
    assert y.shape == (4, 0, 64)


# ---- indices that address nothing, and other bad input -----------------------------------------

def gather_args(dev="cpu", x_shape=(3, 1, 64), w_shape=(4, 24, 8), s_shape=(4, 24, 1), lhs=None, rhs=None,
                transpose=True, x_dtype=torch.float32):
    """Valid arguments (K=64, N=24, 4 experts, gs=64, bits=4) with one thing changed."""
    t = lambda v: None if v is None else torch.as_tensor(v, device=dev)
    return (torch.zeros(x_shape, dtype=x_dtype, device=dev), torch.zeros(w_shape, dtype=torch.uint32, device=dev),
            torch.ones(s_shape, device=dev), torch.zeros(s_shape, device=dev), t(lhs), t(rhs), transpose, 64, 4, False)


BAD_INPUTS = {
    "float_indices": (lambda d: gather_args(d, rhs=[0.0, 1.0, 2.0]), TypeError,
                      "Got indices with invalid dtype. Indices must be integral, but rhs_indices has dtype Float"),
    "bool_indices": (lambda d: gather_args(d, lhs=[True]), TypeError,
                     "Indices must be integral, but lhs_indices has dtype Bool"),
    "indices_not_broadcastable": (lambda d: gather_args(d, lhs=[0, 1], rhs=[0, 1, 2]), ValueError,
                                  r"lhs_indices with shape \(2\) and rhs_indices with shape \(3\) cannot be broadcast"),
    "default_indices_not_broadcastable": (lambda d: gather_args(d), ValueError,
                                          r"the batch shape of x with shape \(3\) and the batch shape of w with shape "
                                          r"\(4\) cannot be broadcast"),
    "x_1d": (lambda d: gather_args(d, x_shape=(64,), rhs=[0]), ValueError,
             r"x must have at least 2 dimensions \(..., M, K\), but got x with shape \(64\)"),
    "w_1d": (lambda d: gather_args(d, w_shape=(8,), s_shape=(1,), rhs=[0]), ValueError,
             "w must have at least 2 dimensions"),
    "scales_batch_differs": (lambda d: gather_args(d, s_shape=(2, 24, 1), rhs=[0, 1, 2]), ValueError,
                             r"scales and biases must have shape \(4, 24, 1\)"),
    "x_wrong_K": (lambda d: gather_args(d, x_shape=(3, 1, 128), rhs=[0, 1, 2]), ValueError,
                  r"last dimension of x \(128\) must equal K=64"),
    "x_not_float": (lambda d: gather_args(d, rhs=[0, 1, 2], x_dtype=torch.int32), TypeError,
                    "x must be float32, float16 or bfloat16"),
}


@pytest.mark.parametrize("device", ("cpu", "meta"))
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises(case, device):
    make, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        ops.affine_gather_qmm(*make(device))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_under_fake_tensor_mode(case):
    make, exc, match = BAD_INPUTS[case]
    with FakeTensorMode(), pytest.raises(exc, match=match):
        ops.affine_gather_qmm(*make("cpu"))


@pytest.mark.parametrize("lhs, rhs, match", [
    (None, [[0, 1, 2], [3, 4, 0]], r"rhs_indices\[1, 1\] = 4 is out of range: w of shape \(4, 24, 8\) holds 4 "
                                   r"matrices, so rhs_indices must lie in \[0, 4\)"),
    (None, [0, -1, 2], r"rhs_indices\[1\] = -1 is out of range"),
    ([0, 3], [1], r"lhs_indices\[1\] = 3 is out of range: x of shape \(3, 1, 64\) holds 3 matrices"),
    (None, 2**40, r"rhs_indices = 1099511627776 is out of range"),
], ids=("rhs_too_large", "rhs_negative", "lhs_too_large", "scalar"))
def test_out_of_range_index_names_it(lhs, rhs, match):
    with pytest.raises(IndexError, match=match):
        ops.affine_gather_qmm(*gather_args(lhs=lhs, rhs=rhs))


def test_mixed_devices_raise():
    args = list(gather_args(rhs=[0, 1, 2]))
    args[5] = args[5].to("meta")
    with pytest.raises(ValueError, match="all tensors must be on one device, but x is on cpu and rhs_indices is on meta"):
        ops.affine_gather_qmm(*args)


# ---- torch.library integration ------------------------------------------------------------------

def opcheck_cases():
    wq, s, b = experts(4, 24, 64, 32, 3, torch.float32)
    wq_n, s_n, b_n = experts(3, 64, 96, 32, 3, torch.float32)
    x = randn((5, 1, 64)).requires_grad_()
    return {
        "rhs": (x, wq, s, b, None, torch.tensor([3, 0, 3, 1, 2]), True, 32, 3, False),
        "lhs_rhs_broadcast": (x, wq, s, b, torch.tensor([[4, 0, 1]]), torch.tensor([[2], [1]]), True, 32, 3, False),
        "sorted": (x, wq, s, b, None, torch.tensor([0, 0, 1, 3, 3]), True, 32, 3, True),
        "neither": (randn((4, 2, 64)).requires_grad_(), wq, s, b, None, None, True, 32, 3, False),
        "n_f16": (randn((2, 3, 64), torch.float16).requires_grad_(), wq_n, s_n.half(), b_n.half(), torch.tensor([1, 0, 1]),
                  torch.tensor([2, 0, 2]), False, 32, 3, False),
    }


@pytest.mark.parametrize("case", opcheck_cases().keys())
def test_opcheck(case):
    torch.library.opcheck(ops.affine_gather_qmm.default, opcheck_cases()[case])


def test_meta_device_shapes():
    m = torch.device("meta")
    w = torch.empty(2, 8, 40, 24, dtype=torch.uint32, device=m)
    sb = torch.empty(2, 8, 40, 3, dtype=torch.bfloat16, device=m)
    x = torch.empty(6, 1, 1, 192, dtype=torch.bfloat16, device=m)
    y = metalq.affine_gather_qmm(x, w, sb, sb, rhs_indices=torch.empty(6, 4, dtype=torch.int32, device=m),
                                 group_size=64, bits=4)
    assert (y.shape, y.dtype, y.device) == ((6, 4, 1, 40), torch.bfloat16, m)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    wq, s, b = experts(4, 48, 64, 32, 4, torch.float32)

    def moe(x, rhs):
        return metalq.affine_gather_qmm(x, wq, s, b, rhs_indices=rhs, group_size=32, bits=4)

    compiled = torch.compile(moe, fullgraph=True, backend="inductor")
    for seed in (1, 2):
        args = (randn((5, 1, 1, 64), seed=seed), randint(4, (5, 2), seed=seed))
        torch.testing.assert_close(compiled(*args), moe(*args))


# ---- autograd -----------------------------------------------------------------------------------

@pytest.mark.parametrize("transpose", (True, False), ids=("t", "n"))
@pytest.mark.parametrize("layout", ("rhs_topk", "both", "both_broadcast", "neither"))
def test_grad_x_matches_mlx(layout, transpose):
    mx = require_mlx()
    x, wq, s, b, lhs, rhs = layout_args(layout, 3, 128, 64, 64, 4, torch.float32, transpose)
    x.requires_grad_()
    y = metalq.affine_gather_qmm(x, wq, s, b, lhs, rhs, transpose=transpose)
    cot = randn(y.shape, seed=7)
    y.backward(cot)
    arr = lambda t: None if t is None else mx.array(t.numpy())
    loss = lambda xm: (mx.gather_qmm(xm, arr(wq), arr(s), arr(b), arr(lhs), arr(rhs), transpose, 64, 4) * arr(cot)).sum()
    want = torch.from_numpy(np.array(mx.grad(loss)(arr(x.detach())))).double()
    # Bound: |cot| @ |B|^T, scatter-added over lhs like the gradient itself.
    B = ops.affine_dequantize(wq, s, b, 64, 4).double()
    bound = x.detach().double().abs() * 0
    xb = x.shape[:-2]
    l = torch.arange(xb.numel()).view(xb) if lhs is None else lhs
    r = torch.arange(wq.shape[:-2].numel()).view(wq.shape[:-2]) if rhs is None else rhs
    l, r = torch.broadcast_tensors(l, r)
    B3 = B.reshape(-1, *B.shape[-2:])
    flat_bound = bound.view(-1, *x.shape[-2:])
    for i, (li, ri) in enumerate(zip(l.flatten().tolist(), r.flatten().tolist())):
        Bi = B3[ri] if transpose else B3[ri].t()
        flat_bound[li] += cot.double().reshape(-1, *cot.shape[-2:])[i].abs() @ Bi.abs()
    assert x.grad.shape == x.shape
    assert ((x.grad.double() - want).abs() <= 2 * TOL[torch.float32] * bound + 1e-7).all()


@pytest.mark.parametrize("frozen", ("scales", "biases"))
def test_grad_for_weight_side_is_refused(frozen):
    wq, s, b = experts(4, 32, 64, 32, 4, torch.float32)
    s, b = s.clone().requires_grad_(frozen == "scales"), b.clone().requires_grad_(frozen == "biases")
    y = metalq.affine_gather_qmm(randn((2, 1, 64)), wq, s, b, rhs_indices=torch.tensor([1, 3]), group_size=32)
    with pytest.raises(RuntimeError, match="no gradient with respect to the quantized weight, scales or biases"):
        y.sum().backward()
