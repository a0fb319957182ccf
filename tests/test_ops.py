"""The ops: qmm_t / qmm_n against float64 torch and MLX, torch.library integration, autograd, bad inputs.

The float64 oracle dequantizes with ``affine_dequantize`` (bit-exact with MLX, see test_format.py) and
multiplies in float64, so every fast CPU path (fused kernels for few rows, dequantize + GEMM for many,
each instruction-set variant) is measured against plain arithmetic.
"""
import os
import platform
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import metalq
from conftest import require_mlx
from metalq.config import axis_multiple

ops = torch.ops.metalq

BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 128)
MLX_GROUP_SIZES = (32, 64, 128)  # MLX's affine group sizes; 16 is metalq's own
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# |y - y_ref| <= TOL * (|x| @ |W|): the output's own rounding in T dominates for half types.
TOL = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Rows of x on both sides of every internal switch: 1-4 rows share a weight decode, 16+ take the GEMM.
ROWS = (0, 1, 2, 3, 4, 5, 8, 15, 16, 33, 128)
TRANSPOSE = {"qmm_t": True, "qmm_n": False}


# ---- helpers ------------------------------------------------------------------------------------

def quantized_weight(rows, cols, group_size, bits, dtype, seed=0):
    """(w_q, scales, biases) of a random (rows, cols) weight quantized along cols."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) / cols**0.5
    return metalq.affine_quantize(w.to(dtype), group_size, bits)


def random_x(shape, dtype, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def dense_weight(wq, scales, biases, group_size, bits, transpose):
    """The float64 matrix B with y = x @ B: dequantize(w).T for qmm_t, dequantize(w) for qmm_n."""
    w = ops.affine_dequantize(wq, scales, biases, group_size, bits).double()
    return w.t() if transpose else w


def qmm(transpose):
    return metalq.affine_qmm_t if transpose else metalq.affine_qmm_n


def assert_matches_float64(y, x, b64, dtype, what=""):
    x64 = x.double()
    ref = x64 @ b64
    bound = TOL[dtype] * (x64.abs() @ b64.abs()) + 1e-30
    assert y.dtype == dtype and y.shape == ref.shape, f"{what} {y.dtype}{tuple(y.shape)}"
    err = (y.double() - ref).abs()
    ratio = (err / bound).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"{what} error is {ratio:.2f}x the {dtype} tolerance; max abs error {err.max().item():.3g}"


def run_qmm_case(transpose, bits, group_size, dtype, m_rows, other, packed, seed=0):
    """x (m_rows, K) against a weight with `other` unpacked rows and `packed` values along the packed axis."""
    wq, s, b = quantized_weight(other, packed, group_size, bits, dtype, seed)
    K = packed if transpose else other
    x = random_x((m_rows, K), dtype, seed + 1)
    y = qmm(transpose)(x, wq, s, b, group_size, bits)
    assert_matches_float64(y, x, dense_weight(wq, s, b, group_size, bits, transpose), dtype,
                           f"{'qmm_t' if transpose else 'qmm_n'} M={m_rows} bits={bits} gs={group_size}")


def shapes_for(transpose, group_size, bits):
    """(unpacked rows, packed length) pairs: odd row counts; packed lengths with tails after every block size,
    in units of whole groups of whole words (the group size but for 16 at 1, 3 or 5 bits: 32)."""
    unit = axis_multiple(bits, group_size)
    if transpose:  # w is (N, K): N odd, K = unit * odd
        return [(67, 3 * unit), (33, 5 * unit)]
    return [(67, 3 * unit), (33, 17 * unit)]  # w is (K, N): K odd, N past 512 with a tail


# ---- numerics against float64 -------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """The big grids run single-threaded: thread start-up dominates such small products, and a loaded
    2-core machine makes it far worse. Splitting work over threads is tested separately below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", (2, 3), ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("m_rows", (1, 5, 16), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("bits", (1, 3, 4), ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_qmm_split_over_threads(op, bits, m_rows, threads):
    # Row blocks (qmm_t), 512-column units (qmm_n) and GEMM tiles are cut at uneven places.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_qmm_case(TRANSPOSE[op], bits, 32, torch.float32, m_rows, 517, 33 * 32 + 512 * 2)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m_rows", ROWS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_qmm_matches_float64(op, bits, group_size, dtype, m_rows, one_thread):
    for other, packed in shapes_for(TRANSPOSE[op], group_size, bits):
        run_qmm_case(TRANSPOSE[op], bits, group_size, DTYPES[dtype], m_rows, other, packed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (3, 4), ids=lambda b: f"b{b}")
def test_qmm_t_gemm_in_chunks_of_a_large_matrix(bits, dtype):
    # Past every dtype's GEMM threshold of rows, W is dequantized in chunks of 16 MiB, each a GEMM into its
    # columns of y: 14000 x 640 is 3 chunks in float32 (float16 x too), 2 in bfloat16, the last partial.
    # With AMX, float32 and float16 x run tile products instead, over many panels of W per thread.
    run_qmm_case(True, bits, 64, DTYPES[dtype], 260, 14000, 640)


@pytest.mark.parametrize("m_rows", (1, 5, 16), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_qmm_large_packed_axis(op, bits, dtype, m_rows):
    run_qmm_case(TRANSPOSE[op], bits, 64, DTYPES[dtype], m_rows, 33, 4096 + 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", TRANSPOSE)
@pytest.mark.parametrize("x_shape", [(2, 3), (2, 0), (7, 1, 3), ()], ids=["2x3", "2x0", "7x1x3", "1d"])
def test_qmm_leading_batch_dims(x_shape, op, dtype):
    transpose, dt = TRANSPOSE[op], DTYPES[dtype]
    wq, s, b = quantized_weight(67, 128, 64, 4, dt)
    K = 128 if transpose else 67
    x = random_x(x_shape + (K,), dt)
    y = qmm(transpose)(x, wq, s, b, 64, 4)
    n = 67 if transpose else 128
    assert y.shape == x_shape + (n,)
    b64 = dense_weight(wq, s, b, 64, 4, transpose)
    assert_matches_float64(y.reshape(-1, n), x.reshape(-1, K), b64, dt)


@pytest.mark.parametrize("m_rows", (3, 20), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("bits", (3, 4), ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_qmm_non_contiguous_inputs(op, bits, m_rows):
    transpose = TRANSPOSE[op]
    wq, s, b = quantized_weight(67, 192, 32, bits, torch.float32)
    K = 192 if transpose else 67
    x = random_x((K, m_rows), torch.float32).t()  # transposed view
    w_view = torch.cat([wq, wq], dim=1)[:, : wq.shape[1]]  # row stride twice the row length
    s_view = s.t().contiguous().t()  # column-major
    b_view = torch.stack([b, b], dim=-1)[..., 0]  # last-dim stride 2
    for t in (x, w_view, s_view, b_view):
        assert not t.is_contiguous()
    y = qmm(transpose)(x, w_view, s_view, b_view, 32, bits)
    assert_matches_float64(y, x, dense_weight(wq, s, b, 32, bits, transpose), torch.float32)
    assert torch.equal(y, qmm(transpose)(x.contiguous(), wq, s, b, 32, bits))


def test_qmm_empty_weight_dims():
    # N = 0 or K = 0: no values to multiply, so the output is empty or all zeros.
    x = random_x((20, 64), torch.float32)
    empty_w = (torch.empty(0, 8, dtype=torch.uint32), torch.empty(0, 1), torch.empty(0, 1))
    assert metalq.affine_qmm_t(x, *empty_w).shape == (20, 0)
    y = metalq.affine_qmm_n(torch.randn(3, 0), *empty_w)
    assert y.shape == (3, 64) and not y.any()
    zero_k = (torch.empty(5, 0, dtype=torch.uint32), torch.empty(5, 0), torch.empty(5, 0))
    y = metalq.affine_qmm_t(torch.randn(3, 0), *zero_k)
    assert y.shape == (3, 5) and not y.any()


# ---- every instruction-set variant (METALQ_CPU_ISA is read once per process) ---------------------

def check_every_path():
    """Runs one case per (op, bits, dtype, path); called in a subprocess with METALQ_CPU_ISA set."""
    for transpose in (True, False):  # with the default threads: work split at uneven places
        run_qmm_case(transpose, 3, 32, torch.float16, 5, 517, 33 * 32 + 512 * 2)
        run_qmm_case(transpose, 4, 64, torch.bfloat16, 16, 517, 33 * 64)
        # Past one chunk of 16 rows (AMX: bfloat16 on dequantized tiles, float32 on panels of W; others: a GEMM).
        for dtype in (torch.bfloat16, torch.float32):
            run_qmm_case(transpose, 4, 64, dtype, 40, 517, 33 * 64)
    torch.set_num_threads(1)  # the grid below is too small to gain from threads
    for transpose in (True, False):
        for bits in BITS:
            for dtype in DTYPES.values():
                for m_rows in (1, 3, 5, 16):
                    run_qmm_case(transpose, bits, 16, dtype, m_rows, 67, 17 * axis_multiple(bits, 16))
                    run_qmm_case(transpose, bits, 32, dtype, m_rows, 67, 5 * 32)
                    run_qmm_case(transpose, bits, 128, dtype, m_rows, 33, 17 * 128)


def run_with_isa(isa, code):
    env = dict(os.environ, METALQ_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=300)


ISA_FLAGS = {"generic": set(), "avx2": {"avx2", "fma", "f16c", "bmi2"}}
ISA_FLAGS["avx512bf16"] = ISA_FLAGS["avx2"] | {"avx512bw", "avx512vl", "avx512_bf16", "avx512vbmi"}
ISA_FLAGS["amx"] = ISA_FLAGS["avx512bf16"] | {"amx_tile", "amx_bf16"}


def cpu_flags():
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    with open("/proc/cpuinfo") as f:
        return set(f.read().split())


# The baseline variant always exists; an x86-64 CPU with the flags of a variant must also get (and pass) it.
@pytest.mark.parametrize("isa", tuple(ISA_FLAGS))
def test_every_isa_variant_matches_float64(isa):
    if not ISA_FLAGS[isa] <= cpu_flags():
        pytest.skip(f"this CPU lacks {isa}")
    proc = run_with_isa(isa, "import test_ops; test_ops.check_every_path()")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unknown_isa_is_a_clear_error():
    code = ("import torch, metalq\n"
            "try:\n    metalq.affine_qmm_t(torch.randn(1, 64), *metalq.affine_quantize(torch.randn(3, 64)))\n"
            "except RuntimeError as e:\n    print(e)\n")
    proc = run_with_isa("sse9", code)
    assert proc.returncode == 0 and "METALQ_CPU_ISA=sse9" in proc.stdout, proc.stdout + proc.stderr


# ---- MLX's quantized_matmul ---------------------------------------------------------------------

@pytest.mark.parametrize("m_rows", (1, 5, 33), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("group_size", MLX_GROUP_SIZES, ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_qmm_matches_mlx_quantized_matmul(op, bits, group_size, m_rows, one_thread):
    # float32 only: MLX's CPU kernel accumulates in T, so its float16/bfloat16 results are the less
    # accurate side (about 10-15 ulps at K = 4096) and make a poor oracle.
    mx = require_mlx()
    import numpy as np

    transpose = TRANSPOSE[op]
    gen = torch.Generator().manual_seed(bits + group_size)
    rows, packed = (67, 3 * group_size) if transpose else (67, 5 * group_size)
    w = (torch.randn(rows, packed, generator=gen) / packed**0.5).numpy()
    x = random_x((m_rows, packed if transpose else rows), torch.float32)
    mwq, ms, mb = mx.quantize(mx.array(w), group_size=group_size, bits=bits)
    ref = mx.quantized_matmul(mx.array(x.numpy()), mwq, ms, mb, transpose=transpose, group_size=group_size, bits=bits)
    wq, s, b = (torch.from_numpy(np.array(a)) for a in (mwq, ms, mb))
    y = qmm(transpose)(x, wq, s, b, group_size, bits)
    b64 = dense_weight(wq, s, b, group_size, bits, transpose)
    bound = TOL[torch.float32] * (x.double().abs() @ b64.abs())
    err = (y.double() - torch.from_numpy(np.array(ref)).double()).abs()
    assert (err <= bound).all(), f"max abs difference from MLX {err.max().item():.3g}"


@pytest.mark.parametrize("m_rows", (1, 5, 16, 33), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_group_size_16_matches_mlx_group_size_32(op, bits, m_rows, one_thread):
    """MLX has no affine group size 16, but a gs-32 matrix is also a gs-16 one: the same codes with each
    group's scale and bias repeated for its two halves. metalq's gs-16 product of that layout must equal
    mx.quantized_matmul of the gs-32 original (float32, as above), and metalq's gs-32 product in every dtype."""
    mx = require_mlx()
    import numpy as np

    transpose = TRANSPOSE[op]
    gen = torch.Generator().manual_seed(bits)
    rows, packed = (67, 5 * 32) if transpose else (67, 17 * 32)
    w = (torch.randn(rows, packed, generator=gen) / packed**0.5).numpy()
    mwq, ms, mb = mx.quantize(mx.array(w), group_size=32, bits=bits)
    wq, s32, b32 = (torch.from_numpy(np.array(a)) for a in (mwq, ms, mb))
    s16, b16 = s32.repeat_interleave(2, -1), b32.repeat_interleave(2, -1)
    assert torch.equal(ops.affine_dequantize(wq, s16, b16, 16, bits), ops.affine_dequantize(wq, s32, b32, 32, bits))
    x = random_x((m_rows, packed if transpose else rows), torch.float32)
    ref = mx.quantized_matmul(mx.array(x.numpy()), mwq, ms, mb, transpose=transpose, group_size=32, bits=bits)
    y = qmm(transpose)(x, wq, s16, b16, 16, bits)
    b64 = dense_weight(wq, s32, b32, 32, bits, transpose)
    bound = TOL[torch.float32] * (x.double().abs() @ b64.abs())
    err = (y.double() - torch.from_numpy(np.array(ref)).double()).abs()
    assert (err <= bound).all(), f"max abs difference from MLX {err.max().item():.3g}"
    for dtype in (torch.float16, torch.bfloat16):
        xd, sd, bd = x.to(dtype), s32.to(dtype), b32.to(dtype)
        y16 = qmm(transpose)(xd, wq, sd.repeat_interleave(2, -1), bd.repeat_interleave(2, -1), 16, bits)
        y32 = qmm(transpose)(xd, wq, sd, bd, 32, bits)
        bd64 = dense_weight(wq, sd, bd, 32, bits, transpose)
        assert ((y16.double() - y32.double()).abs() <= 2 * TOL[dtype] * (xd.double().abs() @ bd64.abs())).all()


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
@pytest.mark.parametrize("transpose", [True, False])
def test_quantized_matmul_takes_mlx_signature(mode, transpose):
    mx = require_mlx()
    import numpy as np

    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(48, 128, generator=gen) / 8).numpy()
    x = random_x((3, 128 if transpose else 48), torch.float32)
    packed = mx.quantize(mx.array(w), mode=mode)  # (w, scales, biases) in affine mode, (w, scales) otherwise
    ref = np.array(mx.quantized_matmul(mx.array(x.numpy()), *packed, transpose=transpose, mode=mode))
    ours = metalq.quantized_matmul(x, *(torch.from_numpy(np.array(a)) for a in packed), transpose=transpose,
                                   mode=mode)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-5)
    if mode == "affine":
        with pytest.raises(ValueError, match="affine mode needs biases"):
            metalq.quantized_matmul(x, *(torch.from_numpy(np.array(a)) for a in packed[:2]), transpose=transpose)


# ---- batches of weights: broadcasting against x ----------------------------------------------------

# (x shape, w batch): batch dimensions on both sides, size-1 dimensions on either, x without batch.
BATCH_PATTERNS = [((3, 5, 64), (3,)), ((2, 1, 4, 64), (3,)), ((1, 4, 64), (2, 3)), ((2, 1, 1, 64), (1, 3)),
                  ((4, 64), (2,)), ((64,), (2, 1)), ((2, 3, 17, 64), (1, 1)), ((2, 0, 3, 64), (2, 1))]


def batched_weight(batch, rows, cols, group_size, bits, dtype, seed=0):
    wq, s, b = quantized_weight(int(torch.tensor(batch).prod()) * rows, cols, group_size, bits, dtype, seed)
    return tuple(t.reshape(*batch, rows, -1) for t in (wq, s, b))


def batched_reference(x, wq, s, b, group_size, bits, transpose):
    """float64 y and |x| @ |W| with torch.matmul's broadcasting (a 1-D x as one row, dropped)."""
    w64 = dense_weight(wq, s, b, group_size, bits, False)
    w64 = w64.mT if transpose else w64
    x64 = x.double().unsqueeze(-2) if x.dim() == 1 else x.double()
    y, mag = x64 @ w64, x64.abs() @ w64.abs()
    return (y.squeeze(-2), mag.squeeze(-2)) if x.dim() == 1 else (y, mag)


@pytest.mark.parametrize("threads", (1, 2), ids=lambda t: f"threads{t}")
@pytest.mark.parametrize("pattern", BATCH_PATTERNS, ids=lambda p: f"x{p[0]}-w{p[1]}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_batched_weights_match_float64(op, pattern, threads):
    transpose = TRANSPOSE[op]
    x_shape, w_batch = pattern
    dtype = torch.bfloat16 if transpose else torch.float16
    wq, s, b = batched_weight(w_batch, 24 if transpose else 64, 64 if transpose else 96, 32, 3, dtype)
    x = random_x(x_shape, dtype)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = qmm(transpose)(x, wq, s, b, 32, 3)
    finally:
        torch.set_num_threads(prev)
    ref, mag = batched_reference(x, wq, s, b, 32, 3, transpose)
    assert y.shape == ref.shape and y.dtype == dtype
    assert ((y.double() - ref).abs() <= TOL[dtype] * mag + 1e-30).all()


def test_batched_weights_with_stride_zero_and_strided_views():
    wq, s, b = batched_weight((1,), 40, 128, 64, 4, torch.float32)
    expanded = [t.expand(3, *t.shape[1:]) for t in (wq, s, b)]
    x = random_x((3, 1, 7, 256), torch.float32)[..., ::2].expand(3, 3, 7, 128)[:, :, ::2]
    y = metalq.affine_qmm_t(x, *expanded, 64, 4)
    ref, mag = batched_reference(x, *expanded, 64, 4, True)
    assert y.shape == (3, 3, 4, 40) and ((y.double() - ref).abs() <= TOL[torch.float32] * mag).all()


@pytest.mark.parametrize("pattern", [((3, 5, 128), (3,)), ((2, 1, 4, 128), (3,)), ((1, 2, 128), (2, 2)),
                                     ((2, 1, 1, 128), (1, 3))], ids=lambda p: f"x{p[0]}-w{p[1]}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_batched_weights_match_mlx(op, pattern):
    """MLX broadcasts batches when x has more than 2 dimensions (a 2-D x, MLX multiplies by the first
    matrix only: metalq broadcasts it like a size-1 batch instead, covered by the float64 test)."""
    mx = require_mlx()
    import numpy as np

    transpose = TRANSPOSE[op]
    x_shape, w_batch = pattern
    rows, cols = (48, 128) if transpose else (128, 64)
    w = (torch.randn(*w_batch, rows, cols, generator=torch.Generator().manual_seed(5)) / cols**0.5).numpy()
    mwq, ms, mb = mx.quantize(mx.array(w), group_size=64, bits=4)
    x = random_x(x_shape, torch.float32)
    ref = np.array(mx.quantized_matmul(mx.array(x.numpy()), mwq, ms, mb, transpose=transpose, group_size=64, bits=4))
    wq, s, b = (torch.from_numpy(np.array(a)) for a in (mwq, ms, mb))
    y = qmm(transpose)(x, wq, s, b, 64, 4)
    _, mag = batched_reference(x, wq, s, b, 64, 4, transpose)
    assert y.shape == ref.shape
    assert ((y.double() - torch.from_numpy(ref).double()).abs() <= TOL[torch.float32] * mag).all()


@pytest.mark.parametrize("pattern", [((3, 5, 64), (3,)), ((2, 1, 4, 64), (3,)), ((4, 64), (2,)), ((64,), (2, 1))],
                         ids=lambda p: f"x{p[0]}-w{p[1]}")
@pytest.mark.parametrize("op", TRANSPOSE)
def test_batched_grad_x_sums_over_broadcast(op, pattern):
    transpose = TRANSPOSE[op]
    x_shape, w_batch = pattern
    wq, s, b = batched_weight(w_batch, 24 if transpose else 64, 64 if transpose else 96, 32, 4, torch.float32)
    x = random_x(x_shape, torch.float32).requires_grad_()
    y = qmm(transpose)(x, wq, s, b, 32, 4)
    grad_out = random_x(y.shape, torch.float32, seed=7)
    y.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    w64 = dense_weight(wq, s, b, 32, 4, False)
    ref = (x64 @ (w64.mT if transpose else w64)) if x.dim() > 1 else \
        (x64.unsqueeze(-2) @ (w64.mT if transpose else w64)).squeeze(-2)
    ref.backward(grad_out.double())
    assert x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


# ---- torch.library integration ------------------------------------------------------------------

def opcheck_cases():
    wq, s, b = quantized_weight(24, 64, 32, 3, torch.float32)
    wq_n, s_n, b_n = quantized_weight(64, 96, 32, 3, torch.float32)
    x = random_x((5, 64), torch.float32)
    return {
        "affine_quantize": (ops.affine_quantize.default, (torch.randn(2, 3, 64), 32, 3)),
        "affine_dequantize": (ops.affine_dequantize.default, (wq, s, b, 32, 3)),
        "affine_qmm_t": (ops.affine_qmm_t.default, (x.clone().requires_grad_(), wq, s, b, 32, 3)),
        "affine_qmm_t_batched": (ops.affine_qmm_t.default, (random_x((2, 3, 64), torch.float32).requires_grad_(), wq, s, b, 32, 3)),
        "affine_qmm_t_f16": (ops.affine_qmm_t.default, (x.half().requires_grad_(), wq, s.half(), b.half(), 32, 3)),
        "affine_qmm_n": (ops.affine_qmm_n.default, (x.clone().requires_grad_(), wq_n, s_n, b_n, 32, 3)),
        "affine_qmm_t_batched_w": (ops.affine_qmm_t.default,
                                   (random_x((2, 1, 5, 64), torch.float32).requires_grad_(),
                                    *(t.reshape(3, 8, -1) for t in (wq, s, b)), 32, 3)),
        "affine_qmm_n_batched_w_1d_x": (ops.affine_qmm_n.default,
                                        (random_x((32,), torch.float32).requires_grad_(),
                                         *(t.reshape(2, 32, -1) for t in (wq_n, s_n, b_n)), 32, 3)),
        "pack": (ops.pack.default, (torch.randint(0, 32, (3, 64), dtype=torch.uint8), 5)),
        "unpack": (ops.unpack.default, (wq, 3)),
    }


@pytest.mark.parametrize("case", opcheck_cases().keys())
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)  # schema, autograd registration, fake tensor, AOT dispatch (dynamic)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def layer(x, w, bias):
        wq, s, b = metalq.affine_quantize(w, 32, 4)
        y = metalq.affine_qmm_t(x, wq, s, b, 32, 4) + bias
        back = metalq.affine_qmm_n(y, wq, s, b, 32, 4)
        return y, back, metalq.affine_dequantize(wq, s, b, 32, 4), metalq.unpack(metalq.pack(metalq.unpack(wq, 4), 4), 4)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in (1, 2):  # new values, same shapes: no recompilation
            args = (random_x((5, 64), torch.float32, seed), random_x((48, 64), torch.float32, seed + 10), torch.randn(48))
            for got, want in zip(compiled(*args), layer(*args)):
                torch.testing.assert_close(got, want)


def test_meta_device_shapes():
    m = torch.device("meta")
    wq, s, b = ops.affine_quantize(torch.empty(2, 3, 10, 256, device=m), 64, 3)
    assert (wq.shape, wq.dtype, s.shape, s.dtype, b.shape) == ((2, 3, 10, 24), torch.uint32, (2, 3, 10, 4), torch.float32, (2, 3, 10, 4))
    assert wq.device == s.device == b.device == m
    deq = ops.affine_dequantize(wq, s.half(), b.half(), 64, 3)
    assert (deq.shape, deq.dtype, deq.device) == ((2, 3, 10, 256), torch.float16, m)
    w2 = torch.empty(40, 24, dtype=torch.uint32, device=m)
    sb = torch.empty(40, 4, dtype=torch.bfloat16, device=m)
    y = ops.affine_qmm_t(torch.empty(2, 7, 256, dtype=torch.bfloat16, device=m), w2, sb, sb, 64, 3)
    assert (y.shape, y.dtype, y.device) == ((2, 7, 40), torch.bfloat16, m)
    y = ops.affine_qmm_n(torch.empty(5, 40, dtype=torch.bfloat16, device=m), w2, sb, sb, 64, 3)
    assert (y.shape, y.dtype, y.device) == ((5, 256), torch.bfloat16, m)
    p = ops.pack(torch.empty(4, 64, dtype=torch.uint8, device=m), 6)
    assert (p.shape, p.dtype, p.device) == ((4, 12), torch.uint32, m)
    u = ops.unpack(p, 6)
    assert (u.shape, u.dtype, u.device) == ((4, 64), torch.uint8, m)


# ---- autograd -----------------------------------------------------------------------------------

@pytest.mark.parametrize("m_rows", (3, 20), ids=lambda m: f"M{m}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", TRANSPOSE)
def test_grad_x_matches_float64(op, dtype, m_rows):
    transpose, dt = TRANSPOSE[op], DTYPES[dtype]
    wq, s, b = quantized_weight(67, 192, 64, 5, dt)
    b64 = dense_weight(wq, s, b, 64, 5, transpose)
    x = random_x((2, m_rows, b64.shape[0]), dt).requires_grad_()
    grad_out = random_x((2, m_rows, b64.shape[1]), dt, seed=9)
    qmm(transpose)(x, wq, s, b, 64, 5).backward(grad_out)
    assert x.grad.dtype == dt and x.grad.shape == x.shape
    assert_matches_float64(x.grad.reshape(-1, b64.shape[0]), grad_out.reshape(-1, b64.shape[1]), b64.t(), dt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_through_linear_with_bias(dtype):
    # loss = sum((x @ W.T + bias)^2)  =>  dx = 2 (x @ W.T + bias) @ W, dbias = 2 sum_rows(x @ W.T + bias)
    dt = DTYPES[dtype]
    wq, s, b = quantized_weight(48, 128, 32, 4, dt)
    w64 = ops.affine_dequantize(wq, s, b, 32, 4).double()
    x = random_x((6, 128), dt).requires_grad_()
    bias = random_x((48,), dt, seed=5).requires_grad_()
    ((metalq.affine_qmm_t(x, wq, s, b, 32, 4) + bias).float() ** 2).sum().backward()
    y64 = x.detach().double() @ w64.t() + bias.detach().double()
    mag = x.detach().double().abs() @ w64.abs().t() + bias.detach().double().abs()
    dx_ref, dx_mag = 2 * y64 @ w64, 2 * mag @ w64.abs()
    assert ((x.grad.double() - dx_ref).abs() <= 3 * TOL[dt] * dx_mag).all()
    assert ((bias.grad.double() - 2 * y64.sum(0)).abs() <= 3 * TOL[dt] * 2 * mag.sum(0)).all()


def test_packed_weight_cannot_require_grad():
    with pytest.raises(RuntimeError, match="floating point"):
        torch.zeros(4, 8, dtype=torch.uint32).requires_grad_()


# ---- bad inputs: a clear exception naming the argument and the rule -----------------------------

def qmm_args(dev, transpose=True, x_dtype=torch.float32, s_dtype=None, b_dtype=None, w_dtype=torch.uint32,
             x_k=64, w_shape=(24, 8), s_shape=(24, 1), b_shape=None):
    """Valid qmm arguments (K=64, N=24, gs=64, bits=4) with one thing changed."""
    s_dtype = s_dtype or x_dtype
    return (torch.zeros(3, x_k if transpose else w_shape[0], dtype=x_dtype, device=dev),
            torch.zeros(w_shape, dtype=w_dtype, device=dev),
            torch.ones(s_shape, dtype=s_dtype, device=dev),
            torch.zeros(b_shape or s_shape, dtype=b_dtype or s_dtype, device=dev), 64, 4)


def deq_args(dev, w_shape=(4, 8), s_shape=(4, 1), w_dtype=torch.uint32, s_dtype=torch.float32, b_dtype=None,
             group_size=64, bits=4):
    return (torch.zeros(w_shape, dtype=w_dtype, device=dev), torch.ones(s_shape, dtype=s_dtype, device=dev),
            torch.zeros(s_shape, dtype=b_dtype or s_dtype, device=dev), group_size, bits)


QMM_OPS = {"qmm_t": ops.affine_qmm_t, "qmm_n": ops.affine_qmm_n}

# id -> (op, builder(device) -> args, exception, message fragment). Every row is shape/dtype-only, so it
# must also raise on the meta device and under FakeTensorMode.
BAD_INPUTS = {
    **{f"{name}_x_not_float": (op, lambda d, t=t: qmm_args(d, t, x_dtype=torch.int32, s_dtype=torch.float32),
                               TypeError, "x must be float32, float16 or bfloat16, got Int")
       for name, op, t in [("qmm_t", ops.affine_qmm_t, True), ("qmm_n", ops.affine_qmm_n, False)]},
    **{f"{name}_w_not_uint32": (op, lambda d, t=t: qmm_args(d, t, w_dtype=torch.int32),
                                TypeError, "packed weight w must be uint32, got Int")
       for name, op, t in [("qmm_t", ops.affine_qmm_t, True), ("qmm_n", ops.affine_qmm_n, False)]},
    **{f"{name}_scales_biases_dtypes_differ": (op, lambda d, t=t: qmm_args(d, t, b_dtype=torch.float16),
                                               TypeError, "scales and biases must have the same dtype")
       for name, op, t in [("qmm_t", ops.affine_qmm_t, True), ("qmm_n", ops.affine_qmm_n, False)]},
    **{f"{name}_scales_not_x_dtype": (op, lambda d, t=t: qmm_args(d, t, s_dtype=torch.bfloat16),
                                      TypeError, r"must have the dtype of x \(Float\), got BFloat16")
       for name, op, t in [("qmm_t", ops.affine_qmm_t, True), ("qmm_n", ops.affine_qmm_n, False)]},
    **{f"{name}_scales_not_float": (op, lambda d, t=t: qmm_args(d, t, s_dtype=torch.int32),
                                    TypeError, "scales must be float32, float16 or bfloat16")
       for name, op, t in [("qmm_t", ops.affine_qmm_t, True), ("qmm_n", ops.affine_qmm_n, False)]},
    "qmm_t_x_wrong_K": (ops.affine_qmm_t, lambda d: qmm_args(d, x_k=128), ValueError,
                        r"last dimension of x \(128\) must equal K=64"),
    "qmm_n_x_wrong_K": (ops.affine_qmm_n, lambda d: (torch.zeros(3, 25, device=d),) + qmm_args(d, False)[1:],
                        ValueError, r"last dimension of x \(25\) must equal K=24"),
    "qmm_t_scales_wrong_groups": (ops.affine_qmm_t, lambda d: qmm_args(d, s_shape=(24, 2)), ValueError,
                                  r"scales and biases must have shape \(24, 1\)"),
    "qmm_t_scales_wrong_rows": (ops.affine_qmm_t, lambda d: qmm_args(d, s_shape=(23, 1)), ValueError,
                                r"scales and biases must have shape \(24, 1\)"),
    "qmm_t_biases_shape_differs": (ops.affine_qmm_t, lambda d: qmm_args(d, b_shape=(24, 2)), ValueError,
                                   "scales and biases must have the same shape"),
    "qmm_t_scales_without_w_batch": (ops.affine_qmm_t, lambda d: qmm_args(d, w_shape=(2, 24, 8)), ValueError,
                                     r"Weight and scales should have the same batch shape. Received weight with "
                                     r"shape \(2, 24, 8\), scales with \(24, 1\)"),
    "qmm_n_w_1d": (ops.affine_qmm_n, lambda d: qmm_args(d, False, w_shape=(24,)), ValueError,
                   "w must have at least 2 dimensions"),
    "qmm_t_scales_extra_batch": (ops.affine_qmm_t, lambda d: qmm_args(d, s_shape=(1, 24, 1)), ValueError,
                                 "Weight and scales should have the same batch shape"),
    "qmm_t_scales_other_batch": (ops.affine_qmm_t, lambda d: qmm_args(d, w_shape=(2, 24, 8), s_shape=(3, 24, 1)),
                                 ValueError, "Weight and scales should have the same batch shape"),
    "qmm_t_batches_do_not_broadcast": (ops.affine_qmm_t,
                                       lambda d: (torch.zeros(4, 3, 5, 64, device=d),) + qmm_args(
                                           d, w_shape=(2, 1, 24, 8), s_shape=(2, 1, 24, 1))[1:],
                                       ValueError, r"the batch shape of x with shape \(4, 3\) and the batch shape of w with shape "
                                       r"\(2, 1\) cannot be broadcast together"),
    "qmm_t_too_many_batch_dims": (ops.affine_qmm_t,
                                  lambda d: (torch.zeros((1,) * 10 + (64,), device=d),) + qmm_args(
                                      d, w_shape=(1, 24, 8), s_shape=(1, 24, 1))[1:],
                                  ValueError, "at most 8 batch dimensions are supported"),
    "qmm_t_x_0d": (ops.affine_qmm_t, lambda d: (torch.zeros((), device=d),) + qmm_args(d)[1:], ValueError,
                   "x must have at least 1 dimension"),
    "qmm_t_words_not_whole_values": (ops.affine_qmm_t, lambda d: qmm_args(d, w_shape=(24, 4))[:4] + (64, 3),
                                     ValueError, "not a whole number of 3-bit values"),
    "qmm_t_K_not_whole_groups": (ops.affine_qmm_t, lambda d: qmm_args(d, x_k=40, w_shape=(24, 5)), ValueError,
                                 "packs 40 values per row at bits=4"),
    "dequantize_w_not_uint32": (ops.affine_dequantize, lambda d: deq_args(d, w_dtype=torch.int32), TypeError,
                                "packed weight w must be uint32"),
    "dequantize_scales_not_float": (ops.affine_dequantize, lambda d: deq_args(d, s_dtype=torch.int64), TypeError,
                                    "scales must be float32, float16 or bfloat16"),
    "dequantize_scales_biases_dtypes_differ": (ops.affine_dequantize, lambda d: deq_args(d, b_dtype=torch.float16),
                                               TypeError, "scales and biases must have the same dtype"),
    "dequantize_scales_wrong_groups": (ops.affine_dequantize, lambda d: deq_args(d, s_shape=(4, 2)), ValueError,
                                       r"scales and biases must have shape \[4, 1\]"),
    "dequantize_scales_wrong_batch": (ops.affine_dequantize, lambda d: deq_args(d, w_shape=(2, 4, 8), s_shape=(3, 4, 1)),
                                      ValueError, r"scales and biases must have shape \[2, 4, 1\]"),
    "dequantize_w_1d": (ops.affine_dequantize, lambda d: deq_args(d, w_shape=(8,), s_shape=(1,)), ValueError,
                        "w must have at least 2 dimensions"),
    # K = 5 words * 32 / 4 bits = 40 values: not a whole number of 64-value groups (MLX rejects this).
    "dequantize_K_not_whole_groups": (ops.affine_dequantize, lambda d: deq_args(d, w_shape=(4, 5), s_shape=(4, 0)),
                                      ValueError, "not a whole number of groups of 64 4-bit values"),
    "dequantize_K_not_whole_groups_rounded_up": (ops.affine_dequantize,
                                                 lambda d: deq_args(d, w_shape=(4, 10), s_shape=(4, 1)),
                                                 ValueError, "not a whole number of groups of 64 4-bit values"),
    # 4 words hold 128 / 3 = 42.67 values at 3 bits.
    "dequantize_words_not_whole_values": (ops.affine_dequantize,
                                          lambda d: deq_args(d, w_shape=(4, 4), s_shape=(4, 1), group_size=32, bits=3),
                                          ValueError, "not a whole number of groups of 32 3-bit values"),
    "quantize_not_float": (ops.affine_quantize, lambda d: (torch.zeros(4, 64, dtype=torch.int32, device=d), 64, 4),
                           TypeError, "only float32, float16 and bfloat16 weights can be quantized, but w has dtype Int"),
    "quantize_float64": (ops.affine_quantize, lambda d: (torch.zeros(4, 64, dtype=torch.float64, device=d), 64, 4),
                         TypeError, "w has dtype Double"),
    "quantize_K_not_divisible": (ops.affine_quantize, lambda d: (torch.zeros(4, 100, device=d), 64, 4), ValueError,
                                 r"last dimension of w \(K=100\) must be divisible by group_size=64"),
    # 3 groups of 16 are 144 bits: rows would end inside a uint32 word.
    "quantize_K_not_whole_words": (ops.affine_quantize, lambda d: (torch.zeros(4, 48, device=d), 16, 3), ValueError,
                                   r"last dimension of w \(K=48\) times bits=3 must be a multiple of 32"),
    "quantize_w_1d": (ops.affine_quantize, lambda d: (torch.zeros(64, device=d), 64, 4), ValueError,
                      "w must have at least 2 dimensions"),
    "pack_not_uint8": (ops.pack, lambda d: (torch.zeros(2, 32, dtype=torch.int32, device=d), 4), TypeError,
                       "q must be uint8, got Int"),
    "pack_count_not_whole_words": (ops.pack, lambda d: (torch.zeros(2, 30, dtype=torch.uint8, device=d), 4),
                                   ValueError, "times bits=4 is a multiple of 32"),
    "pack_0d": (ops.pack, lambda d: (torch.zeros((), dtype=torch.uint8, device=d), 4), ValueError,
                "times bits=4 is a multiple of 32"),
    "unpack_not_uint32": (ops.unpack, lambda d: (torch.zeros(2, 3, dtype=torch.int32, device=d), 4), TypeError,
                          "w must be uint32, got Int"),
    "unpack_words_not_whole_values": (ops.unpack, lambda d: (torch.zeros(2, 4, dtype=torch.uint32, device=d), 3),
                                      ValueError, "not a whole number of 3-bit values"),
    "unpack_0d": (ops.unpack, lambda d: (torch.zeros((), dtype=torch.uint32, device=d), 4), ValueError,
                  "w must have at least 1 dimension"),
}


def _with_format(args, op, group_size, bits):
    """The valid arguments of op with group_size and bits replaced."""
    if op in (ops.pack, ops.unpack):
        return args[:1] + (bits,)
    if op is ops.affine_quantize:
        return args[:1] + (group_size, bits)
    return args[:-2] + (group_size, bits)


VALID = {
    "affine_quantize": (ops.affine_quantize, lambda d: (torch.zeros(4, 256, device=d), 64, 4)),
    "affine_dequantize": (ops.affine_dequantize, lambda d: deq_args(d)),
    "affine_qmm_t": (ops.affine_qmm_t, lambda d: qmm_args(d)),
    "affine_qmm_n": (ops.affine_qmm_n, lambda d: qmm_args(d, False)),
    "pack": (ops.pack, lambda d: (torch.zeros(2, 96, dtype=torch.uint8, device=d), 4)),
    "unpack": (ops.unpack, lambda d: (torch.zeros(2, 24, dtype=torch.uint32, device=d), 4)),
}
for _name, (_op, _make) in VALID.items():
    for _bits in (0, 7, 9, 16, -1):
        BAD_INPUTS[f"{_name}_bits{_bits}"] = (
            _op, lambda d, op=_op, make=_make, b=_bits: _with_format(make(d), op, 64, b), ValueError,
            rf"bits={_bits} is not supported. The supported bits are 1, 2, 3, 4, 5, 6 and 8")
    if _op not in (ops.pack, ops.unpack):
        for _gs in (8, 48, 256, 0):
            BAD_INPUTS[f"{_name}_group_size{_gs}"] = (
                _op, lambda d, op=_op, make=_make, g=_gs: _with_format(make(d), op, g, 4), ValueError,
                rf"group_size={_gs} is not supported. The supported group sizes are 16, 32, 64 and 128")

# Rules that depend on values, so only a real (CPU) tensor can break them.
VALUE_RULES = {
    "quantize_nan": (ops.affine_quantize, lambda d: (torch.full((2, 64), float("nan"), device=d), 64, 4),
                     ValueError, "w contains NaN or infinite values"),
    "quantize_inf": (ops.affine_quantize, lambda d: (torch.zeros(2, 64, device=d).index_fill(1, torch.tensor([5]), float("inf")), 64, 4),
                     ValueError, "w contains NaN or infinite values"),
    "quantize_neg_inf_f16": (ops.affine_quantize, lambda d: (torch.full((1, 2, 128), -float("inf"), dtype=torch.float16, device=d), 128, 2),
                             ValueError, "w contains NaN or infinite values"),
    **{f"pack_value_too_large_b{bits}": (ops.pack, lambda d, b=bits: (torch.full((1, 32), 2**b, dtype=torch.uint8, device=d), b),
                                         ValueError, rf"\[pack\] q has values >= 2\*\*bits = {2**bits}")
       for bits in (1, 2, 3, 4, 5, 6)},
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("device", ("cpu", "meta"))
def test_bad_input_raises(case, device):
    op, make, exc, match = BAD_INPUTS[case]
    with pytest.raises(exc, match=match):
        op(*make(device))


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_under_fake_tensor_mode(case):
    op, make, exc, match = BAD_INPUTS[case]
    with FakeTensorMode(), pytest.raises(exc, match=match):
        op(*make("cpu"))


@pytest.mark.parametrize("case", VALUE_RULES)
def test_bad_values_raise(case):
    op, make, exc, match = VALUE_RULES[case]
    with pytest.raises(exc, match=match):
        op(*make("cpu"))


@pytest.mark.parametrize("device", ("cpu", "meta"))
@pytest.mark.parametrize("name", VALID)
def test_valid_baseline_passes(name, device):
    # The arguments every bad-input row departs from (supported bits and group sizes are swept above).
    op, make = VALID[name]
    op(*make(device))


MIXED_DEVICES = [(name, i) for name, count in (("affine_dequantize", 3), ("affine_qmm_t", 4), ("affine_qmm_n", 4))
                 for i in range(count)]


@pytest.mark.parametrize("name, on_meta", MIXED_DEVICES, ids=[f"{n}-arg{i}" for n, i in MIXED_DEVICES])
def test_mixed_devices_raise(name, on_meta):
    op, make = VALID[name]
    args = list(make("cpu"))
    args[on_meta] = args[on_meta].to("meta")
    with pytest.raises(ValueError, match=r"all tensors must be on one device, but \w+ is on (cpu|meta) and \w+ is on (cpu|meta)"):
        op(*args)


def test_adversarial_inputs_do_not_crash():
    # Each either works or raises a Python exception; reaching the end means the process survived.
    big_groups = torch.randn(1, 128 * 2**12)
    wq, s, b = metalq.affine_quantize(big_groups, 32, 4)
    assert s.shape == (1, 2**14)
    y = metalq.affine_qmm_t(torch.randn(2, big_groups.shape[1]), wq, s, b, 32, 4)
    assert y.shape == (2, 1) and torch.isfinite(y).all()
    attempts = [
        lambda: metalq.affine_quantize(torch.empty(0, 0), 32, 4),
        lambda: metalq.affine_dequantize(torch.empty(0, 4, dtype=torch.uint32), torch.empty(0, 1), torch.empty(0, 1), 32, 4),
        lambda: metalq.affine_qmm_t(torch.empty(0, 64), *metalq.affine_quantize(torch.randn(3, 64), 64, 4)),
        lambda: metalq.affine_qmm_n(torch.empty(4, 0, 3), *metalq.affine_quantize(torch.randn(3, 64), 64, 4)),
        lambda: metalq.pack(torch.empty(5, 0, dtype=torch.uint8), 3),
        lambda: metalq.unpack(torch.empty(0, dtype=torch.uint32), 3),
        lambda: ops.affine_qmm_t(torch.randn(2, 64), torch.zeros(3, 8, dtype=torch.uint32), torch.ones(3, 1), torch.ones(3, 1), 64, 2**40),
        lambda: ops.affine_quantize(torch.randn(2, 64), -64, 4),
        lambda: ops.affine_quantize(torch.empty(2, 2**62, device="meta"), 64, 4),
        lambda: ops.unpack(torch.empty(2, 2**60, dtype=torch.uint32, device="meta"), 4),
    ]
    for attempt in attempts:
        try:
            attempt()
        except (ValueError, TypeError, RuntimeError):
            pass


# ---- threads inherit the caller's state -------------------------------------------------------------

@pytest.mark.parametrize("op", ("t", "n"))
@pytest.mark.parametrize("m_rows", (1, 33), ids=lambda m: f"M{m}")
def test_inference_mode_on_every_path(op, m_rows):
    # The GEMM path runs tensor ops on worker threads, which must see the caller's inference mode.
    w = torch.randn(96, 128)
    packed = metalq.affine_quantize(w, 64, 4)
    x = torch.randn(m_rows, 128 if op == "t" else 96)
    fn = metalq.affine_qmm_t if op == "t" else metalq.affine_qmm_n
    expected = fn(x, *packed)
    with torch.inference_mode():
        got = fn(x, *packed)
    torch.testing.assert_close(got, expected)
