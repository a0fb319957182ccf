"""The fp-mode Metal kernels (metal/fp_quantized.h) on the emulator, dispatched by metalq's DispatchPlan
exactly as the Mac would: bit-identical to the CPU ops (themselves bit-exact with MLX, see
test_fp_formats.py), in every mode, dtype and global-scale variant, with both thread orders."""
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


def test_library_holds_exactly_the_plannable_fp_kernels(lib):
    names = {metalq._C.fp_kernel_name(kernel, FP_MODES[mode], dtype, g is not None)
             for kernel in ("quantize", "dequantize") for mode, g in MODE_CASES for dtype in DTYPES.values()}
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
