"""The prefill GEMMs (metal/qmm.h, instantiated in metal/quantized.metal) through the emulator, planned by
metalq._C.plan_affine_qmm exactly as the Mac would dispatch them (M >= kQmmMinRows: the GEMM branch).
Oracles: float64 torch on the dequantized weights, and the CPU op. The byte counters hold the tiled
GEMM to its tile arithmetic: each weight byte read once per 32-row tile of x, x once per 32-column
tile of y. `python tests/test_metal_qmm.py` prints that table."""
import itertools
import math
import struct
from pathlib import Path

import pytest
import torch

import emulator
import metalq
from conftest import metal_library
from metalq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

METAL = Path(__file__).resolve().parents[1] / "metal"
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
FORMATS = list(itertools.product(DTYPES, SUPPORTED_GROUP_SIZES, SUPPORTED_BITS))
FORMAT_IDS = [f"{DTYPES[d]}-gs{gs}-b{bits}" for d, gs, bits in FORMATS]
# |y - y64| <= TOL * (|x| @ |W|): rounding y once to the dtype (half an ulp) with room for float
# accumulation.
TOL = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
TILE, THREADS = 32, 128  # kQmmBM = kQmmBN = kQmmBK, kQmmThreads (metal/params.h)


def _problem(M, N, K, dtype, group_size, bits, transpose, seed=0):
    """x [M, K], a quantized W ([N, K] packed along K, or [K, N] packed along N), and in float64, laid
    out [K, N] as the matmul uses them: the dequantized weights (the values the GEMM stages, rounded
    to the dtype as affine_dequantize does) and the magnitudes |s|*q + |b| of their terms."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn((N, K) if transpose else (K, N), generator=g) / 4).to(dtype)
    wq, scales, biases = torch.ops.metalq.affine_quantize(w, group_size, bits)
    dense = torch.ops.metalq.affine_dequantize(wq, scales, biases, group_size, bits).double()
    q = torch.ops.metalq.unpack(wq, bits).double()
    terms = (scales.double().abs().repeat_interleave(group_size, -1) * q
             + biases.double().abs().repeat_interleave(group_size, -1))
    return x, (wq, scales, biases), (dense.T, terms.T) if transpose else (dense, terms)


def emulate(lib, x, packed, group_size, bits, transpose, order="forward"):
    """Runs every dispatch of the plan on an output filled with 0xFF bytes (NaN), so unwritten
    elements show; returns the output, the plans and each dispatch's traffic."""
    out = torch.empty(x.shape[0], packed[1].shape[0] if transpose else packed[0].shape[1] * 32 // bits,
                      dtype=x.dtype)
    out.view(torch.uint8).fill_(0xFF)
    plans = metalq._C.plan_affine_qmm(x, *packed, out, group_size, bits, transpose)
    traffic = [lib.run(plan, order) for plan in plans]
    return out, plans, traffic


def check_against_oracles(out, x, packed, weights, group_size, bits, transpose):
    """float64 on the staged weights within TOL; the CPU op within twice that, measured against the
    terms s*q and b, because it may form s*q + b unrounded (a difference of up to an ulp of |b|)."""
    dense, terms = weights
    y64 = x.double() @ dense
    bound = TOL[x.dtype] * (x.double().abs() @ dense.abs()) + 1e-30
    assert torch.isfinite(out).all(), "unwritten outputs"
    assert ((out.double() - y64).abs() <= bound).all(), float(((out.double() - y64).abs() / bound).max())
    op = torch.ops.metalq.affine_qmm_t if transpose else torch.ops.metalq.affine_qmm_n
    cpu = op(x, *packed, group_size, bits).double()
    bound_cpu = 2 * TOL[x.dtype] * (x.double().abs() @ terms) + 1e-30
    assert ((out.double() - cpu).abs() <= bound_cpu).all(), float(((out.double() - cpu).abs() / bound_cpu).max())


def _params(plan):
    return struct.unpack("<4I", plan["bytes"][0][1])  # QmmParams: M, N, K, k_per_split


# ---- the library and the plan ------------------------------------------------------------------

def test_library_holds_exactly_the_plannable_kernels(lib):
    kernels = ("qmm_t", "qmm_n", "qmm_t_splitk", "qmm_n_splitk")
    names = {metalq._C.kernel_name(k, d, gs, b) for k in kernels for d, gs, b in FORMATS}
    assert names == {name for name in lib.kernels if name.startswith("affine_qmm_")}


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
@pytest.mark.parametrize("M, N, K", [(9, 4096, 4096), (64, 256, 4096), (33, 64, 1024), (33, 64, 256),
                                     (512, 4096, 4096), (4096, 128, 8192), (100, 11008, 1088)])
def test_plan_geometry(M, N, K, transpose):
    """One 128-thread threadgroup per 32x32 tile of y; split-K only while tiles x partitions stays
    within kQmmSplitKTargetThreadgroups (512) and partitions reduce >= 256 of K, in whole 32-steps."""
    x = torch.empty(M, K, dtype=torch.float16, device="meta")
    wq = torch.empty((N, K // 8) if transpose else (K, N // 8), dtype=torch.uint32, device="meta")
    groups = torch.empty((N, K // 64) if transpose else (K, N // 64), dtype=torch.float16, device="meta")
    out = torch.empty(M, N, dtype=torch.float16, device="meta")
    plans = metalq._C.plan_affine_qmm(x, wq, groups, groups, out, 64, 4, transpose)
    gemm = plans[0]
    tiles = math.ceil(N / TILE) * math.ceil(M / TILE)
    params = _params(gemm)
    parts, k_per_split = gemm["threadgroups"][2], params[3]
    assert params[:3] == (M, N, K)
    assert gemm["threadgroups"] == (math.ceil(N / TILE), math.ceil(M / TILE), parts)
    assert gemm["threads_per_threadgroup"] == (THREADS, 1, 1)
    kind = "qmm_t" if transpose else "qmm_n"
    if parts == 1:
        assert len(plans) == 1 and k_per_split == K
        assert gemm["kernel"] == metalq._C.kernel_name(kind, torch.float16, 64, 4)
        assert 512 // tiles < 2 or K // 256 < 2
    else:
        assert len(plans) == 2 and gemm["kernel"] == metalq._C.kernel_name(kind + "_splitk", torch.float16, 64, 4)
        assert tiles * parts <= 512 and k_per_split % 32 == 0 and k_per_split >= 256
        assert k_per_split * (parts - 1) < K <= k_per_split * parts
        partials = gemm["buffers"][4][1]
        assert partials.dtype == torch.float32 and partials.shape == (parts, 1, M, N)
        reduce = plans[1]
        assert reduce["kernel"] == "split_k_reduce_half"
        assert [b[1] is t for b, t in zip(reduce["buffers"], (partials, out))] == [True, True]
        x_groups, y_groups, _ = reduce["threadgroups"]
        assert (x_groups * y_groups - 1) * reduce["threads_per_threadgroup"][0] < M * N
        assert x_groups * y_groups * reduce["threads_per_threadgroup"][0] >= M * N


# ---- every format against the oracles --------------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype, group_size, bits", FORMATS, ids=FORMAT_IDS)
def test_qmm_t_every_format(lib, dtype, group_size, bits, order):
    # M = 33: a second tile row with one valid row; N = 72: a last tile of 8 columns.
    x, packed, weights = _problem(33, 72, 2 * group_size, dtype, group_size, bits, True, seed=bits)
    out, plans, _ = emulate(lib, x, packed, group_size, bits, True, order)
    assert [p["kernel"] for p in plans] == [metalq._C.kernel_name("qmm_t", dtype, group_size, bits)]
    check_against_oracles(out, x, packed, weights, group_size, bits, True)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype, group_size, bits", FORMATS, ids=FORMAT_IDS)
def test_qmm_n_every_format(lib, dtype, group_size, bits, order):
    # M = 33 and K = 100: a partial last K step (qmm_n's K is not quantized, so it can be anything).
    x, packed, weights = _problem(33, max(64, group_size), 100, dtype, group_size, bits, False, seed=bits)
    out, plans, _ = emulate(lib, x, packed, group_size, bits, False, order)
    assert [p["kernel"] for p in plans] == [metalq._C.kernel_name("qmm_n", dtype, group_size, bits)]
    check_against_oracles(out, x, packed, weights, group_size, bits, False)


# ---- shapes: aligned, ragged, small N, split-K ---------------------------------------------------------

SHAPES = [  # M, N, K, transpose, dtype, group_size, bits, partitions
    (64, 64, 128, True, torch.float16, 64, 4, 1),     # whole tiles
    (64, 128, 64, False, torch.float32, 64, 4, 1),
    (33, 40, 256, True, torch.bfloat16, 32, 3, 1),    # ragged M and N
    (100, 128, 96, True, torch.float16, 32, 5, 1),    # 128-ish N, 4 tile rows
    (45, 128, 160, False, torch.bfloat16, 128, 6, 1),
    (9, 64, 33, False, torch.float32, 32, 2, 1),      # kQmmMinRows, K one past a step
    (40, 32, 1, False, torch.float16, 32, 8, 1),      # K = 1
    (33, 64, 1024, True, torch.float16, 64, 4, 4),    # split-K
    (33, 64, 1024, False, torch.bfloat16, 32, 3, 4),
    (40, 72, 640, True, torch.float32, 128, 5, 2),    # split-K with ragged N
    (33, 64, 1000, False, torch.float16, 64, 6, 3),   # split-K, last partition shorter and ragged
    (33, 48, 96, True, torch.float16, 16, 3, 1),      # group size 16: ragged N, K of 6 groups
    (45, 64, 160, False, torch.bfloat16, 16, 1, 1),
    (33, 64, 1000, False, torch.float32, 16, 5, 3),
]


@pytest.mark.parametrize("order", ["random", "forward", "reverse"])
@pytest.mark.parametrize("M, N, K, transpose, dtype, group_size, bits, partitions", SHAPES)
def test_shapes(lib, M, N, K, transpose, dtype, group_size, bits, partitions, order):
    x, packed, weights = _problem(M, N, K, dtype, group_size, bits, transpose, seed=M + N + K)
    out, plans, _ = emulate(lib, x, packed, group_size, bits, transpose, order=order)
    assert plans[0]["threadgroups"][2] == partitions and len(plans) == (1 if partitions == 1 else 2)
    check_against_oracles(out, x, packed, weights, group_size, bits, transpose)


@pytest.mark.parametrize("transpose", [True, False], ids=["t", "n"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS, ids=lambda b: f"b{b}")
def test_split_k_group_size_16_every_bits(lib, bits, transpose):
    # qmm_{t,n}_splitk and split_k_reduce (test_qmm_*_every_format covers the unsplit GEMMs at group size 16).
    x, packed, weights = _problem(33, 64, 1024, torch.bfloat16, 16, bits, transpose, seed=bits)
    out, plans, _ = emulate(lib, x, packed, 16, bits, transpose, order="random")
    kind = "qmm_t_splitk" if transpose else "qmm_n_splitk"
    assert [p["kernel"] for p in plans] == [metalq._C.kernel_name(kind, torch.bfloat16, 16, bits), "split_k_reduce_bfloat"]
    check_against_oracles(out, x, packed, weights, 16, bits, transpose)


# ---- device traffic against the tile arithmetic -------------------------------------------------------

def traffic_table(lib, M, N, K, transpose, dtype=torch.float16, group_size=64, bits=4):
    """{binding: (measured Traffic, expected)} for one qmm_t / qmm_n (plus the reduce when split).

    Every threadgroup (tile row ty, column tx, partition z) reads its 32 rows of x and its 32
    columns of W over its K range once: W is read once per tile row of y, x once per tile column.
    Each thread reads one scale and one bias per K step (the 4 threads of a W row share one; the
    GPU's cache absorbs it), so those are held to distinct bytes at the floor. K % 32 == 0 here.
    """
    x, packed, _ = _problem(M, N, K, dtype, group_size, bits, transpose)
    out, plans, traffic = emulate(lib, x, packed, group_size, bits, transpose)
    wq, scales, biases = packed
    tiles_n, tiles_m = math.ceil(N / TILE), math.ceil(M / TILE)
    steps = tiles_n * tiles_m * K // TILE  # threadgroup K steps over all partitions
    nbytes = lambda t: t.numel() * t.element_size()
    read = lambda total, distinct: emulator.Traffic(total, 0, distinct, 0)
    table = {
        "w": (traffic[0][0], read(tiles_m * nbytes(wq), nbytes(wq))),
        "scales": (traffic[0][1], read(steps * THREADS * scales.element_size(), nbytes(scales))),
        "biases": (traffic[0][2], read(steps * THREADS * biases.element_size(), nbytes(biases))),
        "x": (traffic[0][3], read(tiles_n * nbytes(x), nbytes(x))),
    }
    if len(plans) == 1:
        table["y"] = (traffic[0][4], emulator.Traffic(0, nbytes(out), 0, nbytes(out)))
    else:
        partials = plans[0]["buffers"][4][1]
        table["partials"] = (traffic[0][4], emulator.Traffic(0, nbytes(partials), 0, nbytes(partials)))
        table["reduce partials"] = (traffic[1][0], read(nbytes(partials), nbytes(partials)))
        table["reduce y"] = (traffic[1][1], emulator.Traffic(0, nbytes(out), 0, nbytes(out)))
    return table


TRAFFIC_CASES = [(65, 96, 256, True), (65, 128, 256, False), (33, 64, 1024, True), (33, 64, 1024, False)]


@pytest.mark.parametrize("M, N, K, transpose", TRAFFIC_CASES)
def test_traffic_matches_tile_arithmetic(lib, M, N, K, transpose):
    for binding, (measured, expected) in traffic_table(lib, M, N, K, transpose).items():
        assert measured == expected, binding


if __name__ == "__main__":
    library = metal_library()
    print("device bytes per dispatch, float16, 4-bit, group size 64: measured read+written / distinct "
          "| expected from the tiles")
    for M, N, K, transpose in TRAFFIC_CASES:
        print(f"qmm_{'t' if transpose else 'n'} M={M} N={N} K={K}")
        for binding, (m, e) in traffic_table(library, M, N, K, transpose).items():
            print(f"  {binding:<16} {m.read + m.written:>9} / {m.distinct_read + m.distinct_written:>8} | "
                  f"{e.read + e.written:>9} / {e.distinct_read + e.distinct_written:>8}")
