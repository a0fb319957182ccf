"""MLX's floating-point modes (mxfp4, nvfp4, mxfp8) on CPU: quantize / dequantize bit-exact against
mx.quantize / mx.dequantize, the matmuls against float64 and mx.quantized_matmul, validation, and the
torch.library integration of the fp_* ops."""
import numpy as np
import pytest
import torch

import metalq
from conftest import require_mlx
from test_format import bits_of, from_mlx, to_mlx

ops = torch.ops.metalq

MODES = ("mxfp4", "nvfp4", "mxfp8")
GROUP = {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# (mode, global scale): nvfp4 with and without one; a large, a small and a tiny global scale.
MODE_CASES = [("mxfp4", None), ("mxfp8", None), ("nvfp4", None), ("nvfp4", 0.37), ("nvfp4", 1000.0), ("nvfp4", 3.3e-5)]
MODE_IDS = [m if g is None else f"{m}-g{g}" for m, g in MODE_CASES]


def global_tensor(g):
    return None if g is None else torch.tensor(g, dtype=torch.float32)


def mlx_kwargs(mx, g):
    return {} if g is None else {"global_scale": mx.array(g, dtype=mx.float32)}


def edge_rows(group_size):
    """Rows that probe the rounding rules: zeros, negative zeros, saturation (amax 9 with an E8M0 scale),
    ties between codes, float subnormals, and groups whose scale is far from 1."""
    rows = []
    row = torch.zeros(2 * group_size)
    rows.append(row.clone())
    rows.append(-row)
    row = torch.zeros(2 * group_size)
    row[0], row[1], row[2] = 9.0, -4.5, 1e-3
    rows.append(row)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.75, -5.0, 1e-9, -1e-9, 0.0, -0.0])
    rows.append(torch.cat([ties.repeat(group_size // 16), ties.flip(0).repeat(group_size // 16)]))
    gen = torch.Generator().manual_seed(7)
    for scale in (3e-39, 1e-41, 1e-30, 1e-6, 3e4, 1e30):
        rows.append(torch.randn(2 * group_size, generator=gen) * scale)
    big_small = torch.randn(2 * group_size, generator=gen)
    big_small[:group_size] *= 1e20
    big_small[group_size:] *= 1e-20
    rows.append(big_small)
    return torch.stack(rows)


def weights(mode, dtype):
    """Random weights (with leading batch dims) and the edge rows, representable in dtype."""
    gen = torch.Generator().manual_seed(0)
    batched = torch.randn(2, 3, 5, 4 * GROUP[mode], generator=gen)
    edges = edge_rows(GROUP[mode])
    if dtype == torch.float16:
        edges = edges.clamp(-6e4, 6e4)
    return [batched.to(dtype), edges.to(dtype)]


# ---- quantize / dequantize: bit-exact against MLX ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_quantize_matches_mlx(mode, g, dtype):
    mx = require_mlx()
    for w in weights(mode, DTYPES[dtype]):
        wq, scales = metalq.fp_quantize(w, mode, global_tensor(g))
        ref_wq, ref_scales = mx.quantize(to_mlx(w), mode=mode, **mlx_kwargs(mx, g))
        assert wq.dtype == torch.uint32 and scales.dtype == torch.uint8
        assert wq.shape == w.shape[:-1] + (w.shape[-1] * BITS[mode] // 32,)
        assert torch.equal(scales, torch.from_numpy(np.array(ref_scales))), "scales differ from mx.quantize"
        assert torch.equal(wq.view(torch.int32), torch.from_numpy(np.array(ref_wq).view(np.int32))), \
            "packed codes differ from mx.quantize"


@pytest.mark.parametrize("out", (None, "f32", "f16", "bf16"))
@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_dequantize_matches_mlx(mode, g, out):
    mx = require_mlx()
    gen = torch.Generator().manual_seed(3)
    rows, K = 64, 4 * GROUP[mode]
    # Every code and every scale byte (nvfp4's NaN scale bytes 0x7F / 0xFF excluded: NaN payloads differ).
    wq = torch.randint(0, 2**32, (rows, K * BITS[mode] // 32), generator=gen, dtype=torch.int64).to(torch.uint32)
    scales = torch.arange(rows * K // GROUP[mode], dtype=torch.int64).remainder(256).reshape(rows, -1).to(torch.uint8)
    if mode == "nvfp4":
        scales = scales.remainder(127)
    dtype = None if out is None else DTYPES[out]
    got = metalq.fp_dequantize(wq, scales, mode, global_tensor(g), dtype)
    kwargs = mlx_kwargs(mx, g)
    if dtype is not None:
        kwargs["dtype"] = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}[dtype]
    ref = mx.dequantize(mx.array(wq.view(torch.int32).numpy()).view(mx.uint32), mx.array(scales.numpy()), mode=mode,
                        **kwargs)
    if g is not None and dtype not in (None, torch.float32):
        # MLX returns float32 whenever the float32 global scale takes part; metalq honours dtype, rounding once.
        want = from_mlx(ref, torch.float32).to(dtype)
    else:
        want = from_mlx(ref, {mx.float32: torch.float32, mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}[ref.dtype])
    assert got.dtype == want.dtype, f"{got.dtype} vs MLX {want.dtype}"
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(bits_of(got)[~nan], bits_of(want)[~nan])


def test_documented_facts():
    """Facts from MLX's format, read from MLX itself: mxfp4 saturates amax 9 to 8 (E8M0 rounds the scale
    up to 2), code 0..7 pack as 0x76543210, and mxfp8 stores 448 as E4M3 0x7E with a unit scale."""
    mx = require_mlx()
    w = torch.zeros(1, 32)
    w[0, 0] = 9.0
    wq, s = metalq.fp_quantize(w, "mxfp4")
    assert metalq.fp_dequantize(wq, s, "mxfp4", dtype=torch.float32)[0, 0].item() == 8.0
    assert np.array(mx.dequantize(*mx.quantize(to_mlx(w), mode="mxfp4"), mode="mxfp4").astype(mx.float32))[0, 0] == 8.0
    codes = torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4])
    wq, s = metalq.fp_quantize(codes, "mxfp4")
    assert wq[0, 0].item() == 0x76543210 and s[0, 0].item() == 127
    w = torch.zeros(1, 32)
    w[0, 0] = 448.0
    wq, s = metalq.fp_quantize(w, "mxfp8")
    assert wq[0, 0].item() & 0xFF == 0x7E and s[0, 0].item() == 127


def test_round_trip_error_is_bounded():
    # Every mode reconstructs weights within half a step of its elements relative to the group maximum
    # (E8M0 rounds scales up, so the maximum may land as low as half the element range).
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    for mode, bound in (("mxfp4", 0.35), ("nvfp4", 0.2), ("mxfp8", 0.08)):
        wq, s = metalq.fp_quantize(w, mode)
        err = (metalq.fp_dequantize(wq, s, mode, dtype=torch.float32) - w).abs() / w.abs().amax(-1, keepdim=True)
        assert err.max().item() < bound, mode


# ---- matmuls -----------------------------------------------------------------------------------

# |y - y_ref| <= TOL * (|x| @ |W|): the output's own rounding in T dominates for half types.
TOL = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ROWS = (1, 5, 33, 128)


def quantized(mode, g, rows, cols, seed=0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) / cols**0.5
    wq, s = metalq.fp_quantize(w, mode, global_tensor(g))
    return wq, s


def dense(wq, s, mode, g):
    return metalq.fp_dequantize(wq, s, mode, global_tensor(g), torch.float32).double()


def check_close(y, x, b64, dtype):
    ref = x.double() @ b64
    bound = TOL[dtype] * (x.double().abs() @ b64.abs()) + 1e-30
    assert y.dtype == dtype and y.shape == ref.shape
    ratio = ((y.double() - ref).abs() / bound).max().item()
    assert ratio <= 1.0, f"error is {ratio:.2f}x the {dtype} tolerance"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_rows", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("mode,g", [("mxfp4", None), ("nvfp4", None), ("nvfp4", 0.37), ("mxfp8", None)],
                         ids=["mxfp4", "nvfp4", "nvfp4-g", "mxfp8"])
def test_qmm_matches_float64(mode, g, m_rows, dtype):
    dtype = DTYPES[dtype]
    # qmm_t: W (N, K), N odd, K with a tail after the kernels' 64-value blocks; qmm_n: W (K, N).
    N, K = 67, 5 * GROUP[mode] + (16 if mode == "nvfp4" else 0)
    wq, s = quantized(mode, g, N, K)
    x = torch.randn(m_rows, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    check_close(metalq.fp_qmm_t(x, wq, s, mode, global_tensor(g)), x, dense(wq, s, mode, g).t(), dtype)
    wq, s = quantized(mode, g, 67, 17 * GROUP[mode])
    x = torch.randn(m_rows, 67, generator=torch.Generator().manual_seed(2)).to(dtype)
    check_close(metalq.fp_qmm_n(x, wq, s, mode, global_tensor(g)), x, dense(wq, s, mode, g), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_rows", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("mode", MODES)
def test_qmm_matches_mlx(mode, m_rows, dtype):
    mx = require_mlx()
    dtype = DTYPES[dtype]
    wq, s = quantized(mode, None, 96, 4 * GROUP[mode])
    gen = torch.Generator().manual_seed(4)
    x_t = torch.randn(2, m_rows, 4 * GROUP[mode], generator=gen).to(dtype)
    x_n = torch.randn(2, m_rows, 96, generator=gen).to(dtype)
    w_mx, s_mx = mx.array(wq.view(torch.int32).numpy()).view(mx.uint32), mx.array(s.numpy())
    for transpose, op, xx in ((True, metalq.fp_qmm_t, x_t), (False, metalq.fp_qmm_n, x_n)):
        ref = mx.quantized_matmul(to_mlx(xx.float()), w_mx, s_mx, transpose=transpose, mode=mode)
        y = op(xx, wq, s, mode)
        b64 = dense(wq, s, mode, None)
        b64 = b64.t() if transpose else b64
        bound = TOL[dtype] * (xx.double().abs() @ b64.abs()) + 1e-30
        err = (y.double() - torch.from_numpy(np.array(ref)).double()).abs()
        assert (err <= bound).all(), f"max difference from MLX {err.max().item():.3g}"


def test_qmm_batched_x_and_threads():
    wq, s = quantized("nvfp4", 0.5, 517, 33 * 16)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        x = torch.randn(2, 3, 33 * 16, generator=torch.Generator().manual_seed(9))
        y = metalq.fp_qmm_t(x, wq, s, "nvfp4", torch.tensor(0.5))
        check_close(y.reshape(6, -1), x.reshape(6, -1), dense(wq, s, "nvfp4", 0.5).t(), torch.float32)
    finally:
        torch.set_num_threads(before)


# ---- batches of weights: broadcast against x like torch.matmul -----------------------------------

# (x shape, w batch): batch dimensions on both sides, size-1 dimensions on either, x without batch.
BATCH_PATTERNS = [((3, 5), (3,)), ((2, 1, 4), (3,)), ((1, 9), (2, 3)), ((4,), (2,)), ((), (2, 1))]
FP_CASES = [("mxfp4", None), ("nvfp4", 0.37), ("mxfp8", None)]


def batched_quantized(mode, g, batch, rows, cols, seed=0):
    w = torch.randn(*batch, rows, cols, generator=torch.Generator().manual_seed(seed)) / cols**0.5
    return metalq.fp_quantize(w, mode, global_tensor(g))


def batched_reference(x, b64):
    """float64 x @ b64 and |x| @ |b64| with torch.matmul's broadcasting (a 1-D x as one row, dropped)."""
    x64 = x.double().unsqueeze(-2) if x.dim() == 1 else x.double()
    y, mag = x64 @ b64, x64.abs() @ b64.abs()
    return (y.squeeze(-2), mag.squeeze(-2)) if x.dim() == 1 else (y, mag)


@pytest.mark.parametrize("pattern", BATCH_PATTERNS, ids=lambda p: f"x{p[0]}-w{p[1]}")
@pytest.mark.parametrize("transpose", (True, False), ids=("qmm_t", "qmm_n"))
@pytest.mark.parametrize("mode,g", FP_CASES, ids=lambda v: str(v))
def test_batched_qmm_matches_float64(mode, g, transpose, pattern):
    x_batch, w_batch = pattern
    K = 3 * GROUP[mode]
    rows, cols = (40, K) if transpose else (K, 2 * GROUP[mode])
    wq, s = batched_quantized(mode, g, w_batch, rows, cols)
    b64 = dense(wq, s, mode, g)
    b64 = b64.mT if transpose else b64
    dtype = torch.bfloat16 if transpose else torch.float16
    x = torch.randn(*x_batch, K, generator=torch.Generator().manual_seed(3)).to(dtype)
    y = (metalq.fp_qmm_t if transpose else metalq.fp_qmm_n)(x, wq, s, mode, global_tensor(g))
    ref, mag = batched_reference(x, b64)
    assert y.shape == ref.shape and y.dtype == dtype
    assert ((y.double() - ref).abs() <= TOL[dtype] * mag + 1e-30).all()


@pytest.mark.parametrize("mode", MODES)
def test_batched_qmm_matches_mlx(mode):
    """MLX broadcasts a batch of weights against an x of more than 2 dimensions."""
    mx = require_mlx()
    K = 2 * GROUP[mode]
    x = torch.randn(2, 1, 3, K, generator=torch.Generator().manual_seed(6))
    for transpose, op, (rows, cols) in ((True, metalq.fp_qmm_t, (24, K)), (False, metalq.fp_qmm_n, (K, 64))):
        w = torch.randn(3, rows, cols, generator=torch.Generator().manual_seed(5)) / cols**0.5
        mwq, ms = mx.quantize(to_mlx(w), mode=mode)[:2]
        ref = torch.from_numpy(np.array(mx.quantized_matmul(to_mlx(x), mwq, ms, transpose=transpose, mode=mode)))
        wq = torch.from_numpy(np.array(mwq).view(np.int32)).view(torch.uint32)
        s = torch.from_numpy(np.array(ms))
        y = op(x, wq, s, mode)
        b64 = dense(wq, s, mode, None)
        _, mag = batched_reference(x, b64.mT if transpose else b64)
        assert y.shape == ref.shape == (2, 3, 3, rows if transpose else cols)
        assert ((y.double() - ref.double()).abs() <= TOL[torch.float32] * mag + 1e-30).all()


@pytest.mark.parametrize("pattern", [((2, 1, 4), (3,)), ((), (2, 1))], ids=lambda p: f"x{p[0]}-w{p[1]}")
@pytest.mark.parametrize("transpose", (True, False), ids=("qmm_t", "qmm_n"))
def test_batched_grad_x_sums_over_broadcast(transpose, pattern):
    x_batch, w_batch = pattern
    rows, cols = (24, 64) if transpose else (64, 96)
    wq, s = batched_quantized("mxfp4", None, w_batch, rows, cols)
    x = torch.randn(*x_batch, 64, generator=torch.Generator().manual_seed(8)).requires_grad_()
    y = (metalq.fp_qmm_t if transpose else metalq.fp_qmm_n)(x, wq, s, "mxfp4")
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    y.backward(grad_out)
    b64 = dense(wq, s, "mxfp4", None)
    x64 = x.detach().double().requires_grad_()
    ref = batched_reference(x64, b64.mT if transpose else b64)[0]
    ref.backward(grad_out.double())
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


# ---- autograd and torch.library ------------------------------------------------------------------

def test_autograd_x():
    wq, s = quantized("mxfp4", None, 48, 64)
    x = torch.randn(5, 64, dtype=torch.float64).float().requires_grad_()
    y = metalq.fp_qmm_t(x, wq, s, "mxfp4")
    g = torch.randn_like(y)
    y.backward(g)
    w = dense(wq, s, "mxfp4", None).float()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    wq, s = quantized("nvfp4", 0.5, 48, 64)
    with pytest.raises(RuntimeError, match="frozen"):
        metalq.fp_qmm_t(x, wq, s, "nvfp4", torch.tensor(0.5, requires_grad=True)).sum().backward()


def opcheck_cases():
    wq, s = quantized("nvfp4", 0.5, 24, 64)
    wq_n, s_n = quantized("mxfp8", None, 64, 96)
    x = torch.randn(5, 64)
    g = torch.tensor(0.5)
    return {
        "fp_quantize": (ops.fp_quantize.default, (torch.randn(2, 3, 64), "mxfp4")),
        "fp_quantize_global": (ops.fp_quantize.default, (torch.randn(3, 64), "nvfp4", g)),
        "fp_dequantize": (ops.fp_dequantize.default, (wq, s, "nvfp4", g)),
        "fp_dequantize_f16": (ops.fp_dequantize.default, (wq, s, "nvfp4", None, torch.float16)),
        "fp_qmm_t": (ops.fp_qmm_t.default, (x.clone().requires_grad_(), wq, s, "nvfp4", g)),
        "fp_qmm_t_bf16": (ops.fp_qmm_t.default, (x.bfloat16().requires_grad_(), wq, s, "nvfp4")),
        "fp_qmm_n": (ops.fp_qmm_n.default, (x.clone().requires_grad_(), wq_n, s_n, "mxfp8")),
        "fp_qmm_t_batched": (ops.fp_qmm_t.default, (torch.randn(2, 1, 3, 64, requires_grad=True),
                                                    *batched_quantized("mxfp4", None, (3,), 8, 64), "mxfp4")),
    }


@pytest.mark.parametrize("case", opcheck_cases().keys())
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_meta_shapes():
    m = torch.device("meta")
    wq, s = ops.fp_quantize(torch.empty(2, 10, 256, device=m), "mxfp8")
    assert (wq.shape, wq.dtype, s.shape, s.dtype) == ((2, 10, 64), torch.uint32, (2, 10, 8), torch.uint8)
    assert ops.fp_dequantize(wq, s, "mxfp8").dtype == torch.bfloat16
    g = torch.empty((), device=m)
    wq, s = ops.fp_quantize(torch.empty(40, 256, device=m), "nvfp4", g)
    assert ops.fp_dequantize(wq, s, "nvfp4", g).dtype == torch.float32
    y = ops.fp_qmm_t(torch.empty(3, 256, dtype=torch.float16, device=m), wq, s, "nvfp4", g)
    assert (y.shape, y.dtype) == ((3, 40), torch.float16)
    wq, s = ops.fp_quantize(torch.empty(4, 1, 24, 64, device=m), "mxfp4")
    assert ops.fp_qmm_t(torch.empty(3, 5, 64, device=m), wq, s, "mxfp4").shape == (4, 3, 5, 24)


# ---- validation: MLX's wording where MLX has a rule ---------------------------------------------

def test_bad_arguments():
    w = torch.randn(4, 32)
    wq, s = metalq.fp_quantize(w, "nvfp4")
    cases = [
        (lambda: metalq.fp_quantize(w, "xyz"), ValueError, r"\[fp_quantize\] Invalid quantization mode 'xyz'"),
        (lambda: metalq.fp_quantize(w, "affine"), ValueError, r"Invalid quantization mode 'affine'"),
        (lambda: metalq.fp_quantize(w, "mxfp4", torch.tensor(1.0)), ValueError,
         r"Global scale is only supported for 'nvfp4' quantization mode"),
        (lambda: metalq.fp_quantize(w, "nvfp4", torch.ones(2)), ValueError, r"Global scale must be a scalar"),
        (lambda: metalq.fp_quantize(w, "nvfp4", torch.tensor(1.0, dtype=torch.float16)), TypeError,
         r"Global scale must have dtype float32"),
        (lambda: metalq.fp_quantize(torch.randn(4, 48), "mxfp8"), ValueError,
         r"needs to be divisible by the quantization group size 32"),
        (lambda: metalq.fp_quantize(torch.randn(32), "mxfp8"), ValueError, r"at least 2 dimensions"),
        (lambda: metalq.fp_quantize(torch.full((2, 32), float("nan")), "mxfp8"), ValueError, r"NaN or infinite"),
        (lambda: metalq.fp_dequantize(wq, s.half(), "nvfp4"), TypeError,
         r"\[fp_dequantize\] Scale type must be uint8 but received type"),
        (lambda: metalq.fp_dequantize(wq.view(torch.int32), s, "nvfp4"), TypeError, r"must be uint32"),
        (lambda: metalq.fp_dequantize(wq, s[:, :1], "nvfp4"), ValueError, r"scales must have shape"),
        (lambda: metalq.fp_dequantize(wq, s, "mxfp4"), ValueError, r"scales must have shape"),
        (lambda: metalq.fp_dequantize(wq, s, "nvfp4", dtype=torch.int32), TypeError, r"Only real floating types"),
        (lambda: metalq.fp_qmm_t(torch.randn(2, 32), wq, s.float(), "nvfp4"), TypeError, r"Scale type must be uint8"),
        (lambda: metalq.fp_qmm_t(torch.randn(2, 64), wq, s, "nvfp4"), ValueError, r"must equal K=32"),
        (lambda: metalq.fp_qmm_t(torch.randn(2, 32).int(), wq, s, "nvfp4"), TypeError, r"x must be float32"),
        (lambda: metalq.fp_qmm_t(torch.randn(2, 32), wq.expand(2, 4, 4), s, "nvfp4"), ValueError,
         r"Weight and scales should have the same batch shape"),
        (lambda: metalq.fp_qmm_t(torch.randn(3, 2, 32), wq.expand(2, 4, 4), s.expand(2, 4, 2), "nvfp4"), ValueError,
         r"the batch shape of x with shape \(3\) and the batch shape of w with shape \(2\) cannot be broadcast"),
    ]
    for call, exc, pattern in cases:
        with pytest.raises(exc, match=pattern):
            call()


def test_mlx_rejects_what_metalq_rejects():
    """The mode rules checked above are MLX's own (its messages carry the same words)."""
    mx = require_mlx()
    w = mx.zeros((4, 32))
    for call, words in (
        (lambda: mx.quantize(w, mode="xyz"), "Invalid quantization mode 'xyz'"),
        (lambda: mx.quantize(w, mode="mxfp4", global_scale=mx.array(1.0)), "Global scale is only supported"),
        (lambda: mx.quantize(w, mode="nvfp4", global_scale=mx.array(1.0, dtype=mx.float16)),
         "Global scale must have dtype float32"),
        (lambda: mx.dequantize(*mx.quantize(w, mode="nvfp4")[:1], mx.zeros((4, 2), dtype=mx.float16), mode="nvfp4"),
         "Scale type must be uint8 but received type"),
    ):
        with pytest.raises(ValueError, match=words):
            call()
