"""The small-M quantized matmul kernels (metal/qmv.h) run through the emulator as the Mac would run
them: metalq._C.plan_affine_qmm picks kernel(s), grid and bindings. Each branch of the decision tree
is checked for every bits x group size x dtype against the CPU op and a float64 oracle, in two thread
orders; the decode GEMV's device traffic is held to one read of W, its scales and biases.
`python tests/test_metal_qmv.py` prints the per-buffer traffic table."""
import itertools
from pathlib import Path

import pytest
import torch

import metalq
from conftest import metal_library
from metalq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, axis_multiple

METAL = Path(__file__).resolve().parents[1] / "metal"
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
FORMATS = list(itertools.product(DTYPES, SUPPORTED_GROUP_SIZES, SUPPORTED_BITS))
FORMAT_IDS = [f"{DTYPES[d]}-gs{gs}-b{bits}" for d, gs, bits in FORMATS]
KERNELS = ("qmv_fast", "qmv", "qmv_wide", "qvm", "qvm_split_k")
# Error allowed against float64, relative to sum_k |x_k * w_k| of each output: float accumulation
# plus the final rounding to the output dtype (2^-24, 2^-11, 2^-8 relative).
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Thread orders: the emulator runs each threadgroup's threads (fibers) in this order.
ORDERS = ("forward", "reverse")


def _fast_block(bits):
    """K values one qmv_fast simdgroup step covers (params.h qmv_fast_values * 32)."""
    return 32 * (32 if bits == 1 else 8 if bits in (6, 8) else 16)


def cases(group_size, bits):
    """(name, expected kernels, M, K, N, transpose): one per branch of plan_affine_qmm. Packed lengths are
    counted in gs: whole groups of whole words (the group size, or 32 for group size 16 at 1, 3, 5 bits)."""
    gs, big_k = axis_multiple(bits, group_size), max(_fast_block(bits), 1024)
    quad, small_k = bits in (1, 2, 4, 8), 128 if gs == 128 else 64  # qmv_quad: K in (64, 128)
    quad_cases = [(f"qmv_quad-K{K}-M{M}-N{N}", [f"qmv_quad_k{K}"], M, K, N, True)
                  for K, M, N in ((64, 1, 128), (64, 3, 70), (128, 1, 64), (128, 2, 200)) if K % gs == 0]
    return quad_cases * quad + [
        ("qmv_fast", ["qmv_fast"], 1, _fast_block(bits), 16, True),
        ("qmv_fast-2steps", ["qmv_fast"], 1, 2 * _fast_block(bits), 8, True),
        ("qmv-unaligned-N", ["qmv"], 1, 3 * gs, 13, True),
        ("qmv-small-K", [f"qmv_quad_k{small_k}" if quad else "qmv"], 1, small_k, 8, True),
        ("qmv-N<8", ["qmv"], 1, 3 * gs, 3, True),
        ("qmv_wide-M2", ["qmv_wide"], 2, 5 * gs, 12, True),
        ("qmv_wide-M5", ["qmv_wide"], 5, 3 * gs, 8, True),
        ("qmv_wide-M8", ["qmv_wide"], 8, 9 * gs, 4, True),
        ("M>8", None, 10, gs, 5, True),  # GEMM territory: the kernel is not pinned
        ("qvm-M1", ["qvm"], 1, 67, 3 * gs, False),
        ("qvm-M3", ["qvm"], 3, 100, gs, False),
        ("qvm_split_k", ["qvm_split_k", "split_k_reduce"], 2, big_k + 44, gs, False),
    ]


def _operands(M, K, N, dtype, group_size, bits, transpose, seed):
    """x, random packed words (every bit pattern), scales of both signs, biases."""
    g = torch.Generator().manual_seed(seed)
    rows, packed = (N, K) if transpose else (K, N)
    wq = torch.randint(0, 2**32, (rows, packed * bits // 32), generator=g, dtype=torch.int64).to(torch.uint32)
    scales = torch.randn(rows, packed // group_size, generator=g).div(8).to(dtype)
    biases = torch.randn(rows, packed // group_size, generator=g).div(4).to(dtype)
    x = torch.randn(M, K, generator=g).to(dtype)
    return x, wq, scales, biases


def emulate_qmm(lib, x, wq, scales, biases, group_size, bits, transpose, order="forward"):
    """(out, plans, per-plan traffic) of plan_affine_qmm run on the emulator; out starts as NaN."""
    N = wq.shape[0] if transpose else wq.shape[1] * 32 // bits
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    plans = metalq._C.plan_affine_qmm(x, wq, scales, biases, out, group_size, bits, transpose)
    return out, plans, [lib.run(plan, order) for plan in plans]


def reference(x, wq, scales, biases, group_size, bits, transpose):
    """float64 x @ W(.T) and sum |x| @ |W|(.T) from the exact dequantized weights."""
    q = torch.ops.metalq.unpack(wq, bits).double()
    w = q * scales.double().repeat_interleave(group_size, -1) + biases.double().repeat_interleave(group_size, -1)
    w = w.T if transpose else w
    return x.double() @ w, x.double().abs() @ w.abs()


def _base(name):
    return name.split("_float")[0].split("_half")[0].split("_bfloat")[0].removeprefix("affine_")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype, group_size, bits", FORMATS, ids=FORMAT_IDS)
def test_every_branch_matches_oracles(lib, dtype, group_size, bits, order):
    cpu_op = {True: torch.ops.metalq.affine_qmm_t, False: torch.ops.metalq.affine_qmm_n}
    for i, (name, kernels, M, K, N, transpose) in enumerate(cases(group_size, bits)):
        x, wq, scales, biases = _operands(M, K, N, dtype, group_size, bits, transpose, seed=i + 10 * bits)
        got, plans, _ = emulate_qmm(lib, x, wq, scales, biases, group_size, bits, transpose, order)
        assert kernels is None or [_base(p["kernel"]) for p in plans] == kernels, name
        exact, magnitude = reference(x, wq, scales, biases, group_size, bits, transpose)
        bound = TOLERANCE[dtype] * magnitude + 1e-30
        err = (got.double() - exact).abs()
        assert torch.all(err <= bound), f"{name}: worst {(err / bound).max():.2f} of the bound"
        cpu = cpu_op[transpose](x, wq, scales, biases, group_size, bits).double()
        assert torch.all((got.double() - cpu).abs() <= 2 * bound), f"{name}: differs from the CPU op"


def test_random_thread_order_and_larger_shapes(lib):
    # Several threadgroups along both grid axes, a ragged qmv_wide tile (7 = 4 + 3) and long split-K.
    for (M, K, N, transpose, dtype, gs, bits) in [(1, 4096, 40, True, torch.float16, 64, 4),
                                                  (7, 640, 24, True, torch.bfloat16, 128, 3),
                                                  (3, 9000, 64, False, torch.float16, 32, 5),
                                                  (1, 512, 256, False, torch.float32, 64, 6)]:
        x, wq, scales, biases = _operands(M, K, N, dtype, gs, bits, transpose, seed=K)
        got, _, _ = emulate_qmm(lib, x, wq, scales, biases, gs, bits, transpose, order="random")
        exact, magnitude = reference(x, wq, scales, biases, gs, bits, transpose)
        assert torch.all((got.double() - exact).abs() <= TOLERANCE[dtype] * magnitude)


def test_empty_output_needs_no_dispatch():
    x = torch.zeros(0, 64, dtype=torch.float16)
    wq, scales, biases = torch.zeros(8, 8, dtype=torch.uint32), torch.ones(8, 1, dtype=torch.float16), \
        torch.zeros(8, 1, dtype=torch.float16)
    assert metalq._C.plan_affine_qmm(x, wq, scales, biases, torch.empty(0, 8, dtype=torch.float16), 64, 4, True) == []


def test_plan_rejects_bad_arguments():
    x = torch.zeros(1, 64, dtype=torch.float16)
    scales = torch.ones(8, 1, dtype=torch.float32)
    with pytest.raises(TypeError, match="dtype of x"):
        metalq._C.plan_affine_qmm(x, torch.zeros(8, 8, dtype=torch.uint32), scales, scales, torch.empty(1, 8), 64, 4,
                                  True)


def test_split_k_partitions_cover_k():
    x, wq, scales, biases = _operands(2, 9000, 64, torch.float16, 64, 4, False, seed=0)
    out = torch.empty(2, 64, dtype=torch.float16)
    split, reduce = metalq._C.plan_affine_qmm(x, wq, scales, biases, out, 64, 4, False)
    params = dict(split["bytes"])[5]
    M, N, K, k_chunk = (int.from_bytes(params[i:i + 4], "little") for i in range(0, 16, 4))
    parts = split["threadgroups"][2]
    assert (M, N, K) == (2, 64, 9000) and k_chunk % 32 == 0 and (parts - 1) * k_chunk < K <= parts * k_chunk
    partials = dict(split["buffers"])[4]
    assert partials.dtype == torch.float32 and partials.shape == (parts, 1, 2, 64)
    assert dict(reduce["buffers"])[0] is not None and reduce["kernel"] == "split_k_reduce_half"


# ---- the library ---------------------------------------------------------------------------------

# M >= kQmmMinRows plans the tiled GEMMs (metal/qmm.h, tested in test_metal_qmm.py).
GEMM_KERNELS = ("qmm_t", "qmm_n", "qmm_t_splitk", "qmm_n_splitk")


def plannable_names():
    names = {metalq._C.kernel_name(k, dtype, gs, bits) for k in KERNELS for dtype, gs, bits in FORMATS}
    gemm = {metalq._C.kernel_name(k, dtype, gs, bits) for k in GEMM_KERNELS for dtype, gs, bits in FORMATS}
    quad = {metalq._C.kernel_name(f"qmv_quad_k{K}", dtype, gs, bits) for K in (64, 128)
            for dtype, gs, bits in FORMATS if K % gs == 0 and bits in (1, 2, 4, 8)}
    return names | gemm | quad | {f"split_k_reduce_{t}" for t in ("float", "half", "bfloat")}


def test_every_plannable_name_is_in_the_library(lib):
    assert plannable_names() <= lib.kernels
    # and the names the tree actually emits come from that set
    for dtype, gs, bits in FORMATS[::5]:
        for _, _, M, K, N, transpose in cases(gs, bits):
            x, wq, scales, biases = _operands(M, K, N, dtype, gs, bits, transpose, seed=0)
            out = torch.empty(M, N, dtype=dtype)
            for plan in metalq._C.plan_affine_qmm(x, wq, scales, biases, out, gs, bits, transpose):
                assert plan["kernel"] in plannable_names()


# ---- device traffic of the decode GEMV ----------------------------------------------------------

def gemv_traffic(lib, kernel, bits, M=1, K=2048, N=64, group_size=64, dtype=torch.float16):
    """{binding: (measured Traffic, bytes of the tensor)} of one dispatch of `kernel`, and its grid."""
    x, wq, scales, biases = _operands(M, K, N, dtype, group_size, bits, True, seed=1)
    out, plans, (traffic,) = emulate_qmm(lib, x, wq, scales, biases, group_size, bits, True)
    assert _base(plans[0]["kernel"]) == kernel
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    tensors = {"w": wq, "scales": scales, "biases": biases, "x": x, "y": out}
    return {name: (traffic[i], size(t)) for i, (name, t) in enumerate(tensors.items())}, plans[0]["threadgroups"]


def print_traffic(title, table, grid):
    print(f"\n{title}: device bytes per binding, {grid[0] * grid[1] * grid[2]} threadgroups")
    print(f"  {'binding':<7} {'read':>9} {'distinct':>9} {'written':>8} {'tensor':>9} {'reads':>6}")
    for binding, (m, nbytes) in table.items():
        print(f"  {binding:<7} {m.read:>9} {m.distinct_read:>9} {m.written:>8} {nbytes:>9} {m.read / nbytes:>6.2f}")


def assert_weights_read_once(table):
    """W, scales and biases read once (every byte, at most 2% more in total); y written once."""
    for name in ("w", "scales", "biases"):
        measured, size = table[name]
        assert measured.distinct_read == size and size <= measured.read <= 1.02 * size, name
        assert measured.written == 0, name
    measured, size = table["y"]
    assert measured.read == 0 and measured.written == measured.distinct_written == size


# (kernel, bits, K, N): qmv_fast over several K steps per simdgroup, qmv with a ragged K step and N.
DECODE_GEMVS = [("qmv_fast", 3, 2048, 64), ("qmv_fast", 4, 2048, 64), ("qmv_fast", 6, 2048, 64),
                ("qmv_fast", 4, 4096, 32), ("qmv", 4, 1984, 60), ("qmv", 5, 1344, 16)]


@pytest.mark.parametrize("kernel, bits, K, N", DECODE_GEMVS)
def test_decode_gemv_reads_each_byte_once(lib, kernel, bits, K, N):
    table, grid = gemv_traffic(lib, kernel, bits, K=K, N=N)
    print_traffic(f"{kernel} x[1, {K}] @ W[{N}, {K}].T {bits}-bit", table, grid)
    assert_weights_read_once(table)
    # x: the simdgroups of a threadgroup split K, so each x value is read by one lane per threadgroup.
    measured, size = table["x"]
    assert measured.distinct_read == size and measured.read <= grid[0] * grid[1] * grid[2] * size


@pytest.mark.parametrize("K", [64, 128])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_small_k_gemv_reads_weights_once(lib, bits, K):
    table, grid = gemv_traffic(lib, "qmv_quad_k%d" % K, bits, K=K, N=200, group_size=32)
    print_traffic(f"qmv_quad K={K} {bits}-bit", table, grid)
    assert_weights_read_once(table)
    # x: each of the 8 quads of a threadgroup holds a copy in registers.
    measured, size = table["x"]
    assert measured.distinct_read == size and measured.read == 8 * grid[0] * grid[1] * grid[2] * size


if __name__ == "__main__":
    # The decode shape of a 4096-wide layer: float16, 4-bit, group size 64.
    library = metal_library()
    print_traffic("qmv_fast x[1, 4096] @ W[4096, 4096].T", *gemv_traffic(library, "qmv_fast", 4, K=4096, N=4096))
    print_traffic("qmv x[1, 4032] @ W[4092, 4032].T", *gemv_traffic(library, "qmv", 4, K=4032, N=4092))
    print_traffic("qmv_quad x[1, 128] @ W[4096, 128].T", *gemv_traffic(library, "qmv_quad_k128", 4, K=128, N=4096))
    print_traffic("qmv_wide x[4, 4096] @ W[4096, 4096].T",
                  *gemv_traffic(library, "qmv_wide", 4, M=4, K=4096, N=4096))
