"""The fp-mode Metal kernels on the emulator, dispatched by metalq's DispatchPlan exactly as the Mac
would. fp_quantize / fp_dequantize (metal/fp_quantized.h): bit-identical to the CPU ops (themselves
bit-exact with MLX, see test_fp_formats.py). fp_qmm_t / fp_qmm_n (the matmul kernels of qmv.h and
qmm.h with the Fp weight format): every plan branch against the CPU op and a float64 oracle. Every
mode, dtype and global-scale variant, with both thread orders."""
import pytest
import torch

import metalq
from test_fp_formats import edge_rows
from test_metal_kernels import _poisoned_like_meta as poisoned, _same_bits as same_bits

ops = torch.ops.metalq

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
GROUP = {"mxfp4": 32, "nvfp4": 16, "mxfp8": 32}
BITS = {"mxfp4": 4, "nvfp4": 4, "mxfp8": 8}
MODE_CASES = [("mxfp4", None), ("mxfp8", None), ("nvfp4", None), ("nvfp4", 0.37)]
MODE_IDS = [m if g is None else f"{m}-global" for m, g in MODE_CASES]
FP_MODES = {"mxfp4": 0, "nvfp4": 1, "mxfp8": 2}  # metal/fp_format.h FpMode


def global_tensor(g):
    return None if g is None else torch.tensor(g, dtype=torch.float32)


# The kernels plan_fp_qmm may pick, beside qmv_quad_k128 (only where K / 4 = 32 values fit a group).
MATMUL_KERNELS = ("qmv_fast", "qmv", "qmv_wide", "qmv_quad_k64", "qmv_quad_k128", "qvm", "qvm_split_k", "qmm_t",
                  "qmm_n", "qmm_t_splitk", "qmm_n_splitk")


def test_library_holds_exactly_the_plannable_fp_kernels(lib):
    kernels = ("quantize", "dequantize") + MATMUL_KERNELS
    names = {metalq._C.fp_kernel_name(kernel, FP_MODES[mode], dtype, g is not None)
             for kernel in kernels for mode, g in MODE_CASES for dtype in DTYPES.values()}
    assert names == {name for name in lib.kernels if name.startswith("fp_")}


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_quantize_matches_cpu(lib, mode, g, dtype, order):
    dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1)
    edges = edge_rows(GROUP[mode])
    if dtype == torch.float16:
        edges = edges.clamp(-6e4, 6e4)
    # random rows (over 256 groups: several threadgroups) and the rounding edge cases
    for w in (torch.randn(2, 70, 4 * GROUP[mode], generator=gen).to(dtype), edges.to(dtype)):
        outs = [poisoned(t) for t in ops.fp_quantize(w.to("meta"), mode, None if g is None else torch.empty((), device="meta"))]
        plan = metalq._C.plan_fp_quantize(w, *outs, mode, global_tensor(g))
        lib.run(plan, order)
        for got, want in zip(outs, ops.fp_quantize(w, mode, global_tensor(g))):
            assert same_bits(got, want)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_dequantize_matches_cpu(lib, mode, g, dtype, order):
    dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(2)
    rows, K = 40, 8 * GROUP[mode]
    wq = torch.randint(0, 2**32, (rows, K * BITS[mode] // 32), generator=gen, dtype=torch.int64).to(torch.uint32)
    scales = torch.randint(0, 256, (rows, K // GROUP[mode]), generator=gen, dtype=torch.int64).to(torch.uint8)
    want = ops.fp_dequantize(wq, scales, mode, global_tensor(g), dtype)
    out = poisoned(want)
    lib.run(metalq._C.plan_fp_dequantize(wq, scales, out, mode, global_tensor(g)), order)
    nan = torch.isnan(want)  # scale byte 0xFF (E8M0) times a zero code, or E4M3's NaN codes
    assert torch.equal(torch.isnan(out), nan)
    assert same_bits(out.masked_fill(nan, 0), want.masked_fill(nan, 0))


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_traffic_is_one_pass(lib, mode):
    # Each kernel reads every input byte once and writes every output byte once.
    w = torch.randn(64, 8 * GROUP[mode]).to(torch.bfloat16)
    wq, scales = (poisoned(t) for t in ops.fp_quantize(w.to("meta"), mode))
    traffic = lib.run(metalq._C.plan_fp_quantize(w, wq, scales, mode, None))
    for index, tensor, key in ((0, w, "read"), (1, wq, "written"), (2, scales, "written")):
        t = traffic[index]
        assert getattr(t, key) == getattr(t, "distinct_" + key) == tensor.numel() * tensor.element_size(), index
    out = poisoned(w)
    traffic = lib.run(metalq._C.plan_fp_dequantize(wq, scales, out, mode, None))
    assert traffic[0].read == traffic[0].distinct_read == wq.numel() * 4
    assert traffic[1].distinct_read == scales.numel()
    assert traffic[3].written == traffic[3].distinct_written == out.numel() * 2


# ---- fp_qmm_t / fp_qmm_n ---------------------------------------------------------------------------

# Error allowed against float64, relative to sum_k |x_k * w_k| of each output: float accumulation, the
# GEMM's weight tiles in the input dtype and the final rounding (2^-24, 2^-11, 2^-8 relative).
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def matmul_cases(mode):
    """(name, expected kernels, M, K, N, transpose): each plan branch, N and K multiples of the group."""
    gs = GROUP[mode]
    fast_k = 32 * (8 if BITS[mode] == 8 else 16)  # one qmv_fast step (params.h qmv_fast_values)
    return [
        ("qmv_fast", ["qmv_fast"], 1, 2 * fast_k, 16, True),
        ("qmv-unaligned-N", ["qmv"], 1, 3 * gs, 13, True),
        ("qmv_quad", ["qmv_quad_k64"], 1, 64, 24, True),
        # K = 128 gives a quad lane 32 values: two whole nvfp4 groups
        ("qmv_quad-K128", ["qmv_quad_k128"], 1, 128, 8, True),
        ("qmv_wide", ["qmv_wide"], 5, 5 * gs, 12, True),
        ("qmm_t", ["qmm_t"], 33, 4 * gs, 40, True),
        ("qmm_t_splitk", ["qmm_t_splitk", "split_k_reduce"], 40, 1024, 24, True),
        ("qvm", ["qvm"], 3, 70, 3 * gs, False),  # nvfp4: a simdgroup straddles N = 48
        ("qvm_split_k", ["qvm_split_k", "split_k_reduce"], 2, 1024 + 96, 2 * gs, False),
        ("qmm_n", ["qmm_n"], 34, 96, 5 * gs, False),
        ("qmm_n_splitk", ["qmm_n_splitk", "split_k_reduce"], 33, 1024, 32, False),
    ]


def fp_operands(M, K, N, mode, g, dtype, transpose, seed):
    """x and weights quantized by the CPU op from normal values (transpose: W [N, K], else [K, N])."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((N, K) if transpose else (K, N), generator=gen).to(dtype)
    wq, scales = ops.fp_quantize(w, mode, global_tensor(g))
    return torch.randn(M, K, generator=gen).to(dtype), wq, scales


def emulate_fp_qmm(lib, x, wq, scales, mode, g, transpose, order="forward"):
    """(out, plans, per-plan traffic) of plan_fp_qmm run on the emulator; out starts as NaN."""
    N = wq.shape[0] if transpose else wq.shape[1] * 32 // BITS[mode]
    out = torch.full((x.shape[0], N), float("nan"), dtype=x.dtype)
    plans = metalq._C.plan_fp_qmm(x, wq, scales, global_tensor(g), out, mode, transpose)
    return out, plans, [lib.run(plan, order) for plan in plans]


def kernel_base(name, mode):
    return name.removeprefix("fp_").split("_" + mode)[0].split("_float")[0].split("_half")[0].split("_bfloat")[0]


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_qmm_every_branch_matches_oracles(lib, mode, g, dtype, order):
    dtype = DTYPES[dtype]
    cpu_op = {True: ops.fp_qmm_t, False: ops.fp_qmm_n}
    for i, (name, kernels, M, K, N, transpose) in enumerate(matmul_cases(mode)):
        x, wq, scales = fp_operands(M, K, N, mode, g, dtype, transpose, seed=i)
        got, plans, _ = emulate_fp_qmm(lib, x, wq, scales, mode, g, transpose, order)
        assert [kernel_base(p["kernel"], mode) for p in plans] == kernels, name
        w = ops.fp_dequantize(wq, scales, mode, global_tensor(g), torch.float32).double()
        w = w.T if transpose else w
        exact, magnitude = x.double() @ w, x.double().abs() @ w.abs()
        bound = TOLERANCE[dtype] * magnitude + 1e-30
        err = (got.double() - exact).abs()
        assert torch.all(err <= bound), f"{name}: worst {(err / bound).max():.2f} of the bound"
        cpu = cpu_op[transpose](x, wq, scales, mode, global_tensor(g)).double()
        assert torch.all((got.double() - cpu).abs() <= 2 * bound), f"{name}: differs from the CPU op"


def batched_cases(mode):
    """(expected kernels, x shape, w batch, K, N, transpose, dtype): batches on both sides and broadcast."""
    gs = GROUP[mode]
    return [
        (["qmv"], (2, 1, 1, 3 * gs), (1, 3), 3 * gs, 13, True, torch.float16),
        (["qmm_t"], (2, 9, 4 * gs), (2,), 4 * gs, 40, True, torch.bfloat16),
        (["qmm_n"], (1, 2, 10, 96), (3, 1), 96, 2 * gs, False, torch.float32),
    ]


@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_batched_weights_match_cpu(lib, mode, g):
    """Batches of fp weights walk grid z like affine ones (test_metal_batched.py): same plan, same result."""
    for i, (kernels, x_shape, w_batch, K, N, transpose, dtype) in enumerate(batched_cases(mode)):
        gen = torch.Generator().manual_seed(i)
        w = torch.randn(*w_batch, *((N, K) if transpose else (K, N)), generator=gen).to(dtype)
        wq, scales = ops.fp_quantize(w, mode, global_tensor(g))
        x = torch.randn(x_shape, generator=gen).to(dtype)
        cpu_op = ops.fp_qmm_t if transpose else ops.fp_qmm_n
        cpu = cpu_op(x, wq, scales, mode, global_tensor(g))
        out = torch.full_like(cpu, float("nan"))
        plans = metalq._C.plan_fp_qmm(x, wq, scales, global_tensor(g), out, mode, transpose)
        assert [kernel_base(p["kernel"], mode) for p in plans] == kernels, x_shape
        for plan in plans:
            lib.run(plan, "reverse")
        dense = ops.fp_dequantize(wq, scales, mode, global_tensor(g), torch.float32).double()
        magnitude = x.double().abs() @ (dense.mT if transpose else dense).abs()
        err = (out.double() - cpu.double()).abs()
        assert torch.all(err <= 2 * TOLERANCE[dtype] * magnitude + 1e-30), f"{x_shape}: differs from the CPU op"


@pytest.mark.parametrize("mode,g", MODE_CASES, ids=MODE_IDS)
def test_decode_gemv_reads_weights_once(lib, mode, g):
    # qmv_fast over several K steps: every byte of W and of its scales read once, y written once.
    x, wq, scales = fp_operands(1, 2048, 32, mode, g, torch.float16, True, seed=3)
    out, plans, (traffic,) = emulate_fp_qmm(lib, x, wq, scales, mode, g, True)
    assert kernel_base(plans[0]["kernel"], mode) == "qmv_fast"
    for index, tensor in ((0, wq), (1, scales)):
        size = tensor.numel() * tensor.element_size()
        assert traffic[index].distinct_read == size and size <= traffic[index].read <= 1.02 * size, index
    assert traffic[4].written == traffic[4].distinct_written == out.numel() * out.element_size()


def test_qmm_plan_rejects_bad_arguments():
    x = torch.zeros(1, 64, dtype=torch.float16)
    wq, scales = ops.fp_quantize(torch.zeros(8, 64), "mxfp4")
    with pytest.raises(ValueError, match="Global scale is only supported"):
        metalq._C.plan_fp_qmm(x, wq, scales, torch.tensor(1.0), torch.empty(1, 8), "mxfp4", True)
