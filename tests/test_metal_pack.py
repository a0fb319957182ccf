"""pack / unpack on Metal (metal/quantized.h pack, unpack as pack_b_<bits>, unpack_b_<bits>) through the
emulator, dispatched from the DispatchPlan exactly as the Mac encoder does: bit-exact with the CPU ops for
every bits, over batched and odd-row shapes and any thread order, into poisoned outputs, with device traffic
at its floor (every byte read once, every byte written once)."""
import math
import struct

import pytest
import torch

import emulator
import metalq
from metalq.config import SUPPORTED_BITS
from test_metal_kernels import _poisoned_like_meta, _same_bits

ORDERS = ["forward", "reverse", "random"]


def _min_count(bits):
    """Fewest values per row the op accepts: a whole number of uint32 words."""
    return 32 // math.gcd(bits, 32)


def _min_words(bits):
    """Fewest words per row unpack accepts: a whole number of values."""
    return bits // math.gcd(bits, 32)


def _shapes(bits):
    """(batch..., values per row): one row, odd row counts, batch dims, 1-D, and several threadgroups."""
    k = _min_count(bits)
    return [(k,), (1, k), (3, 5 * k), (2, 3, 4 * k), (2, 1, 3, k), (7, 32 * k), (301, 96)]


def _codes(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    flat = q.view(-1)
    flat[: min(flat.numel(), 5)] = 2**bits - 1  # all-ones codes at the start of the stream
    return q


def _words(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**32, shape, generator=g, dtype=torch.int64).to(torch.uint32)


def emulate_pack(lib, q, bits, order="forward"):
    out = _poisoned_like_meta(torch.ops.metalq.pack(q.to("meta"), bits))
    traffic = lib.run(metalq._C.plan_pack(q, out, bits), order, seed=q.numel())
    return out, traffic


def emulate_unpack(lib, w, bits, order="forward"):
    out = _poisoned_like_meta(torch.ops.metalq.unpack(w.to("meta"), bits))
    traffic = lib.run(metalq._C.plan_unpack(w, out, bits), order, seed=w.numel())
    return out, traffic


# ---- the library and the plan ----------------------------------------------------------------------

def test_library_holds_exactly_the_plannable_pack_kernels(lib):
    names = {metalq._C.bits_kernel_name(kernel, bits) for kernel in ("pack", "unpack") for bits in SUPPORTED_BITS}
    assert names == {f"{kernel}_b_{bits}" for kernel in ("pack", "unpack") for bits in SUPPORTED_BITS}
    assert names == {name for name in lib.kernels if name.startswith(("pack_", "unpack_"))}


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_plan_is_one_thread_per_unit(bits):
    q = torch.zeros(3, 4 * _min_count(bits), dtype=torch.uint8)
    w = torch.ops.metalq.pack(q, bits)
    units = w.numel() * 4 // {3: 3, 5: 5, 6: 3}.get(bits, 4)  # params.h pack_unit_bytes
    for plan, src, dst in ((metalq._C.plan_pack(q, w, bits), q, w), (metalq._C.plan_unpack(w, q, bits), w, q)):
        assert plan["elementwise_work_items"] == units
        assert plan["bytes"] == [(2, struct.pack("<Q", units))]
        assert [i for i, _ in plan["buffers"]] == [0, 1]
        assert plan["buffers"][0][1] is src and plan["buffers"][1][1] is dst


def test_plan_covers_large_grids():
    work = 2 * 65535 * 256 + 5
    q = torch.empty((work, 8), dtype=torch.uint8, device="meta")  # 4 bits: 8 values per unit
    plan = metalq._C.plan_pack(q, torch.ops.metalq.pack(q, 4), 4)
    (x, y, z), (tx, ty, tz) = plan["threadgroups"], plan["threads_per_threadgroup"]
    assert x <= 65535 and z == 1 and ty == tz == 1 and tx % 32 == 0
    assert x * (y - 1) * tx < work <= x * y * tx


def test_plans_validate_like_the_ops():
    with pytest.raises(ValueError, match="times bits=4 is a multiple of 32"):
        metalq._C.plan_pack(torch.zeros(2, 30, dtype=torch.uint8), torch.empty(2, 4, dtype=torch.uint32), 4)
    with pytest.raises(TypeError, match="q must be uint8"):
        metalq._C.plan_pack(torch.zeros(2, 32, dtype=torch.int32), torch.empty(2, 4, dtype=torch.uint32), 4)
    with pytest.raises(ValueError, match="not a whole number of 3-bit values"):
        metalq._C.plan_unpack(torch.zeros(2, 4, dtype=torch.uint32), torch.empty(2, 42, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bits=7 is not supported"):
        metalq._C.plan_unpack(torch.zeros(2, 7, dtype=torch.uint32), torch.empty(2, 32, dtype=torch.uint8), 7)


# ---- bit-exact against the CPU ops -----------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_matches_cpu(lib, bits, order):
    for i, shape in enumerate(_shapes(bits)):
        q = _codes(shape, bits, seed=bits * 100 + i)
        got, _ = emulate_pack(lib, q, bits, order)
        assert _same_bits(got, torch.ops.metalq.pack(q, bits)), shape


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_unpack_matches_cpu(lib, bits, order):
    k = _min_words(bits)
    for i, shape in enumerate([(k,), (1, k), (3, 5 * k), (2, 3, 4 * k), (2, 1, 3, k), (7, 32 * k), (301, 3 * k)]):
        w = _words(shape, seed=bits * 100 + i)  # every bit pattern
        got, _ = emulate_unpack(lib, w, bits, order)
        assert _same_bits(got, torch.ops.metalq.unpack(w, bits)), shape


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip_on_the_emulator(lib, bits):
    q = _codes((5, 3, 8 * _min_count(bits)), bits, seed=bits)
    w, _ = emulate_pack(lib, q, bits, "random")
    back, _ = emulate_unpack(lib, w, bits, "random")
    assert _same_bits(back, q)


# ---- device traffic at the floor -------------------------------------------------------------------

@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_traffic_meets_floor(lib, bits):
    q = _codes((64, 1024), bits, seed=0)
    w, packed = emulate_pack(lib, q, bits)
    _, unpacked = emulate_unpack(lib, w, bits)
    nq, nw = q.numel(), w.numel() * 4
    read, written = (lambda n: emulator.Traffic(n, 0, n, 0)), (lambda n: emulator.Traffic(0, n, 0, n))
    assert packed[0] == read(nq) and packed[1] == written(nw)
    assert unpacked[0] == read(nw) and unpacked[1] == written(nq)


# ---- a pipeline that allows fewer threads per threadgroup ------------------------------------------

@pytest.mark.parametrize("limit, threads", [(1024, 256), (200, 192), (40, 32), (16, 16)])
def test_pack_plans_fit_a_pipeline_thread_limit(lib, limit, threads):
    q = _codes((3, 1024 + 32), 3, seed=limit)
    w = _poisoned_like_meta(torch.ops.metalq.pack(q.to("meta"), 3))
    plan = metalq._C.fit_thread_limit(metalq._C.plan_pack(q, w, 3), limit)
    assert plan["threads_per_threadgroup"] == (threads, 1, 1)
    lib.run(plan)
    assert _same_bits(w, metalq.pack(q, 3))
    back = _poisoned_like_meta(q.to("meta"))
    lib.run(metalq._C.fit_thread_limit(metalq._C.plan_unpack(w, back, 3), limit))
    assert _same_bits(back, q)
