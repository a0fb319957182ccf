"""The Metal kernels (metal/*.metal) run through the emulator exactly as the Mac would dispatch them:
the DispatchPlan from metalq._C picks kernel, geometry and bindings. Outputs must be bit-identical to
the CPU ops (themselves bit-exact with MLX, see test_format.py), and each kernel's device traffic
is held to its floor. `python tests/test_metal_kernels.py` prints the traffic table."""
import itertools
import struct
from pathlib import Path

import pytest
import torch

import emulator
import metalq
from conftest import metal_library
from metalq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, axis_multiple

METAL = Path(__file__).resolve().parents[1] / "metal"
DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
FORMATS = list(itertools.product(DTYPES, SUPPORTED_GROUP_SIZES, SUPPORTED_BITS))
FORMAT_IDS = [f"{DTYPES[d]}-gs{gs}-b{bits}" for d, gs, bits in FORMATS]
KERNELS = ("quantize", "dequantize")


def _poisoned_like_meta(meta):
    """CPU tensors shaped by the Meta kernel, filled with 0xFF bytes so unwritten elements show."""
    out = torch.empty(meta.shape, dtype=meta.dtype)
    out.view(torch.uint8).fill_(0xFF)
    return out


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def emulate_quantize(lib, w, group_size, bits, order="forward"):
    outs = [_poisoned_like_meta(t) for t in torch.ops.metalq.affine_quantize(w.to("meta"), group_size, bits)]
    traffic = lib.run(metalq._C.plan_affine_quantize(w, *outs, group_size, bits), order)
    return outs, traffic


def emulate_dequantize(lib, wq, scales, biases, group_size, bits, order="forward"):
    meta = torch.ops.metalq.affine_dequantize(wq.to("meta"), scales.to("meta"), biases.to("meta"), group_size, bits)
    out = _poisoned_like_meta(meta)
    traffic = lib.run(metalq._C.plan_affine_dequantize(wq, scales, biases, out, group_size, bits), order)
    return out, traffic


def _weights(shape, dtype, group_size, seed):
    """Normal values at varied row scales, with awkward groups: constant, zero, symmetric extremes,
    and a minimum of both +0.0 and -0.0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g).mul(10).exp2().div(32)
    rows = w.view(-1, shape[-1])
    specials = [torch.full((group_size,), 0.75), torch.zeros(group_size),
                torch.linspace(-1.5, 1.5, group_size), torch.linspace(0.0, 3.0, group_size)]
    specials[3][1] = -0.0
    for r, values in enumerate(specials[: rows.shape[0]]):
        rows[r, :group_size] = values
    return w.to(dtype)


def _packed(shape, dtype, group_size, bits, seed):
    """Random packed words (every bit pattern) with scales and biases of both signs."""
    g = torch.Generator().manual_seed(seed)
    rows, K = shape[:-1], shape[-1]
    wq = torch.randint(0, 2**32, rows + (K * bits // 32,), generator=g, dtype=torch.int64).to(torch.uint32)
    scales = torch.randn(rows + (K // group_size,), generator=g).div(16).to(dtype)
    biases = torch.randn(rows + (K // group_size,), generator=g).to(dtype)
    return wq, scales, biases


# ---- the library ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(METAL.glob("*.metal")), ids=lambda p: p.name)
def test_every_metal_file_compiles(path):
    # Building type-checks every instantiated kernel with Metal's address-space rules.
    assert metal_library(path).kernels


def test_library_holds_exactly_the_plannable_kernels(lib):
    names = {metalq._C.kernel_name(kernel, dtype, gs, bits) for kernel in KERNELS for dtype, gs, bits in FORMATS}
    # the matmul kernels in the same library are checked by their own test files (test_metal_qmv.py)
    assert names == {name for name in lib.kernels if name.startswith("affine_") and name.split("_")[1] in KERNELS}


def test_plan_covers_large_grids():
    # More threadgroups than one grid axis holds: the plan wraps into y and still covers every group.
    work = 2 * 65535 * 256 + 5
    w = torch.empty((work, 64), dtype=torch.float16, device="meta")
    plan = metalq._C.plan_affine_quantize(w, *torch.ops.metalq.affine_quantize(w, 64, 4), 64, 4)
    (x, y, z), (tx, ty, tz) = plan["threadgroups"], plan["threads_per_threadgroup"]
    assert x <= 65535 and z == 1 and ty == tz == 1 and tx % 32 == 0
    assert x * (y - 1) * tx < work <= x * y * tx
    assert plan["bytes"] == [(4, struct.pack("<Q", work))]


# ---- bit-exact against the CPU ops ---------------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype, group_size, bits", FORMATS, ids=FORMAT_IDS)
def test_quantize_matches_cpu(lib, dtype, group_size, bits, order):
    w = _weights((5, 3 * axis_multiple(bits, group_size)), dtype, group_size, seed=bits)
    got, _ = emulate_quantize(lib, w, group_size, bits, order)
    for g, e in zip(got, torch.ops.metalq.affine_quantize(w, group_size, bits)):
        assert _same_bits(g, e)


@pytest.mark.parametrize("order", ["forward", "reverse"])
@pytest.mark.parametrize("dtype, group_size, bits", FORMATS, ids=FORMAT_IDS)
def test_dequantize_matches_cpu(lib, dtype, group_size, bits, order):
    wq, scales, biases = _packed((3, 2 * group_size), dtype, group_size, bits, seed=bits)
    got, _ = emulate_dequantize(lib, wq, scales, biases, group_size, bits, order)
    assert _same_bits(got, torch.ops.metalq.affine_dequantize(wq, scales, biases, group_size, bits))


# Several threadgroups (over 256 groups or units), batched 3-D inputs, and a random thread order.
@pytest.mark.parametrize(
    "shape, dtype, group_size, bits",
    [((300, 64), torch.float16, 64, 4), ((2, 7, 384), torch.bfloat16, 128, 3), ((3, 96), torch.float32, 32, 5),
     ((33, 640), torch.float16, 32, 6), ((1, 4096), torch.float32, 128, 8), ((7, 5, 96), torch.bfloat16, 16, 1),
     ((300, 48), torch.float16, 16, 6), ((9, 160), torch.float32, 16, 5)],
)
def test_random_shapes_match_cpu(lib, shape, dtype, group_size, bits):
    w = _weights(shape, dtype, group_size, seed=sum(shape))
    got, _ = emulate_quantize(lib, w, group_size, bits, order="random")
    expected = torch.ops.metalq.affine_quantize(w, group_size, bits)
    assert all(_same_bits(g, e) for g, e in zip(got, expected))
    out, _ = emulate_dequantize(lib, *expected, group_size, bits, order="random")
    assert _same_bits(out, torch.ops.metalq.affine_dequantize(*expected, group_size, bits))


# ---- device traffic against the floor ----------------------------------------------------------

def _values_per_unit(bits):
    """Values one dequantize thread unpacks: a uint32 word, 8 values in 3 or 5 bytes, four 6-bit values in 3."""
    return {3: 8, 5: 8, 6: 4}.get(bits, 32 // bits)


def traffic_table(lib, bits, rows=512, K=1024, dtype=torch.float16, group_size=64):
    """{(kernel, binding): (measured Traffic, Traffic at the floor)} for one quantize and one dequantize.

    The floor touches every byte once. Dequantize threads each re-read their group's scale and bias
    (group_size / values-per-unit threads share one; on the GPU the cache absorbs it), so those two
    bindings are held to distinct bytes at the floor and total bytes at that re-read factor (1 where a
    unit holds two groups: 1 bit at group size 16).
    """
    w = _weights((rows, K), dtype, group_size, seed=0)
    (wq, scales, biases), q = emulate_quantize(lib, w, group_size, bits)
    out, d = emulate_dequantize(lib, wq, scales, biases, group_size, bits)
    nw, nq, ns = (t.numel() * t.element_size() for t in (w, wq, scales))
    reread = max(1, group_size // _values_per_unit(bits))
    read, written = (lambda n, times=1: emulator.Traffic(n * times, 0, n, 0)), (lambda n: emulator.Traffic(0, n, 0, n))
    return {("quantize", "w"): (q[0], read(nw)), ("quantize", "wq"): (q[1], written(nq)),
            ("quantize", "scales"): (q[2], written(ns)), ("quantize", "biases"): (q[3], written(ns)),
            ("dequantize", "wq"): (d[0], read(nq)), ("dequantize", "scales"): (d[1], read(ns, reread)),
            ("dequantize", "biases"): (d[2], read(ns, reread)), ("dequantize", "out"): (d[3], written(nw))}


@pytest.mark.parametrize("bits, group_size", [(3, 64), (4, 64), (1, 16), (3, 16)])
def test_traffic_meets_floor(lib, bits, group_size):
    for binding, (measured, floor) in traffic_table(lib, bits, group_size=group_size).items():
        assert measured == floor, binding


if __name__ == "__main__":
    library = metal_library()
    print("device bytes per dispatch, float16 512x1024, group size 64 (read+written / distinct / floor)")
    for bits in (3, 4):
        for (kernel, binding), (m, f) in traffic_table(library, bits).items():
            print(f"{bits}-bit {kernel:<10} {binding:<7} {m.read + m.written:>8} / "
                  f"{m.distinct_read + m.distinct_written:>8} / {f.distinct_read + f.distinct_written:>8}")


# ---- a pipeline that allows fewer threads per threadgroup (the Mac encoder's fit_thread_limit) ----

@pytest.mark.parametrize("limit, threads", [(1024, 256), (200, 192), (64, 64), (40, 32), (16, 16)])
def test_elementwise_plans_fit_a_pipeline_thread_limit(lib, limit, threads):
    g = torch.Generator().manual_seed(limit)
    w = torch.randn(3, 1024 + 64, generator=g).to(torch.bfloat16)
    wq, scales, biases = metalq.affine_quantize(w, 64, 3)
    out = _poisoned_like_meta(torch.empty(w.shape, dtype=w.dtype))
    plan = metalq._C.fit_thread_limit(metalq._C.plan_affine_dequantize(wq, scales, biases, out, 64, 3), limit)
    assert plan["threads_per_threadgroup"] == (threads, 1, 1)
    groups_x, groups_y, _ = plan["threadgroups"]
    assert groups_x * groups_y * threads >= plan["elementwise_work_items"] > 0
    lib.run(plan)
    assert _same_bits(out, metalq.affine_dequantize(wq, scales, biases, 64, 3))


def test_a_fixed_geometry_plan_over_the_limit_is_a_clear_error():
    q = metalq.affine_quantize(torch.randn(64, 256), 64, 4)
    (plan,) = metalq._C.plan_affine_qmm(torch.randn(32, 256), *q, torch.empty(32, 64), 64, 4, True)
    threads = plan["threads_per_threadgroup"][0] * plan["threads_per_threadgroup"][1]
    assert metalq._C.fit_thread_limit(plan, threads) == plan
    with pytest.raises(RuntimeError, match=rf"kernel {plan['kernel']} needs {threads} threads per threadgroup "
                                           rf"but its Metal pipeline allows {threads - 32}"):
        metalq._C.fit_thread_limit(plan, threads - 32)
