"""affine_gather_qmm on the Metal kernels (emulator), as the Mac runs it: metalq._C.plan_affine_gather_qmm
picks the gather variant of each small-M / GEMM kernel (grid z maps items through the (lhs, rhs) pair
buffer, metal/quantized.h select_matrices) or, for many expert-sorted decode rows, affine_gather_qmm_rhs.
Every branch against the CPU op and a float64 loop of dense products; the device traffic of a decode
step is held to the active experts' weights. `python tests/test_metal_gather.py` prints the byte table."""
import pytest
import torch

import metalq
from conftest import metal_library

# |y - y64| <= TOL * (|x| @ |W|), as in test_metal_qmv.py.
TOL = {torch.float32: 4e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _base(name):
    return name.split("_float")[0].split("_half")[0].split("_bfloat")[0].removeprefix("affine_")


def experts(count, rows, packed, dtype, group_size, bits, seed=0):
    """Random packed words (every bit pattern), scales of both signs, biases: W [count, rows, packed]."""
    g = torch.Generator().manual_seed(seed)
    wq = torch.randint(0, 2**32, (count, rows, packed * bits // 32), generator=g, dtype=torch.int64)
    scales = torch.randn(count, rows, packed // group_size, generator=g).div(8).to(dtype)
    biases = torch.randn(count, rows, packed // group_size, generator=g).div(4).to(dtype)
    return wq.to(torch.uint32), scales, biases


def emulate(lib, x, wq, scales, biases, lhs, rhs, transpose, group_size, bits, sorted_indices=False, order="random"):
    """(out, plans, traffic per plan) of plan_affine_gather_qmm on the emulator; out starts as NaN."""
    meta = lambda t: None if t is None else t.to("meta")  # noqa: E731
    shape = torch.ops.metalq.affine_gather_qmm(meta(x), meta(wq), meta(scales), meta(biases), meta(lhs), meta(rhs),
                                               transpose, group_size, bits, sorted_indices).shape
    out = torch.empty(shape, dtype=x.dtype)
    out.view(torch.uint8).fill_(0xFF)
    plans = metalq._C.plan_affine_gather_qmm(x, wq, scales, biases, lhs, rhs, out, transpose, group_size, bits,
                                             sorted_indices)
    return out, plans, [lib.run(plan, order) for plan in plans]


def float64_gather(x, wq, scales, biases, lhs, rhs, transpose, group_size, bits):
    """One dense float64 product per item, and the bound magnitude |x| @ |W|."""
    q = torch.ops.metalq.unpack(wq, bits).double()
    w = q * scales.double().repeat_interleave(group_size, -1) + biases.double().repeat_interleave(group_size, -1)
    w = w.mT if transpose else w
    xb, wb = x.shape[:-2], wq.shape[:-2]
    lhs = torch.arange(xb.numel()).view(xb) if lhs is None else lhs
    rhs = torch.arange(wb.numel()).view(wb) if rhs is None else rhs
    lhs, rhs = torch.broadcast_tensors(lhs, rhs)
    x3, w3 = x.double().reshape(-1, *x.shape[-2:]), w.reshape(-1, *w.shape[-2:])
    pairs = list(zip(lhs.flatten().tolist(), rhs.flatten().tolist()))
    exact = torch.stack([x3[i] @ w3[j] for i, j in pairs]).view(*lhs.shape, x.shape[-2], -1)
    magnitude = torch.stack([x3[i].abs() @ w3[j].abs() for i, j in pairs]).view(exact.shape)
    return exact, magnitude


def check(out, x, wq, scales, biases, lhs, rhs, transpose, group_size, bits, sorted_indices=False):
    exact, magnitude = float64_gather(x, wq, scales, biases, lhs, rhs, transpose, group_size, bits)
    assert out.shape == exact.shape
    bound = TOL[x.dtype] * magnitude + 1e-30
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all() and (err <= bound).all(), float((err / bound).max())
    cpu = metalq.affine_gather_qmm(x, wq, scales, biases, lhs, rhs, transpose=transpose, group_size=group_size,
                                   bits=bits, sorted_indices=sorted_indices).double()
    assert ((out.double() - cpu).abs() <= 2 * bound).all(), "differs from the CPU op"


def sorted_routing(tokens, top_k, count, seed=0):
    """Expert-sorted top-k routing as mlx-lm prepares it: one row per (token, slot), sorted by expert."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tokens, count, generator=g).argsort(dim=1)[:, :top_k].flatten().sort().values


# name, kernels, x shape, experts, lhs, rhs, (K, N), transpose, sorted, dtype, gs, bits
CASES = [
    ("qmv_fast-topk", ["gather_qmv_fast"], (3, 1, 1, 512), 6, None, torch.tensor([[5, 0], [2, 2], [1, 4]]),
     (512, 16), True, False, torch.float16, 64, 4),
    ("qmv-lhs-rhs", ["gather_qmv"], (4, 1, 96), 3, torch.tensor([3, 0, 3]), torch.tensor([[2], [0]]), (96, 13), True,
     False, torch.bfloat16, 32, 3),
    ("qmv_wide", ["gather_qmv_wide"], (2, 3, 128), 4, torch.tensor([1, 0, 1]), torch.tensor([3, 3, 0]), (128, 8),
     True, False, torch.float32, 128, 5),
    ("qmv_quad", ["gather_qmv_quad_k64"], (4, 2, 64), 3, torch.tensor([3, 1]), torch.tensor([[2], [0]]), (64, 70),
     True, False, torch.float16, 32, 2),
    ("qvm", ["gather_qvm"], (5, 2, 100), 3, None, torch.tensor([2, 0, 1, 2, 2]), (100, 64), False, False,
     torch.float16, 64, 2),
    ("qvm-long-K-no-split", ["gather_qvm"], (2, 1, 1100), 2, None, torch.tensor([1, 0]), (1100, 32), False, False,
     torch.bfloat16, 32, 4),
    ("qmm_t", ["gather_qmm_t"], (2, 33, 64), 3, torch.tensor([1, 1, 0]), torch.tensor([0, 2, 2]), (64, 40), True,
     False, torch.float32, 32, 8),
    ("qmm_n", ["gather_qmm_n"], (3, 10, 70), 3, None, None, (70, 64), False, False, torch.float16, 64, 6),
    ("rhs_t", ["gather_qmm_rhs_t"], (40, 1, 256), 4, None, sorted_routing(20, 2, 4), (256, 40), True, True,
     torch.float16, 64, 4),
    ("rhs_n", ["gather_qmm_rhs_n"], (36, 1, 70), 3, None, sorted_routing(12, 3, 3, seed=1), (70, 64), False, True,
     torch.bfloat16, 32, 3),
    ("sorted-few-items", ["gather_qmv_fast"], (8, 1, 512), 2, None, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
     (512, 8), True, True, torch.float32, 64, 4),
]


def group_size_16_cases(bits):
    """Every branch of CASES at group size 16 and `bits` (packed lengths in whole words for 1, 3, 5 bits)."""
    rhs = torch.tensor([[2], [0]])
    quad = [(f"qmv_quad_k{K}", [f"gather_qmv_quad_k{K}"], (4, 2, K), 3, torch.tensor([3, 1]), rhs, (K, 70), True,
             False, torch.float16) for K in (64, 128)] if bits in (1, 2, 4, 8) else []
    return [(*case, 16, bits) for case in quad + [
        ("qmv_fast", ["gather_qmv_fast"], (3, 1, 1, 1024), 4, None, torch.tensor([[3, 0], [2, 2], [1, 3]]), (1024, 16),
         True, False, torch.bfloat16),
        ("qmv", ["gather_qmv"], (4, 1, 96), 3, torch.tensor([3, 0, 3]), rhs, (96, 13), True, False, torch.float32),
        ("qmv_wide", ["gather_qmv_wide"], (2, 3, 96), 4, torch.tensor([1, 0, 1]), torch.tensor([3, 3, 0]), (96, 8),
         True, False, torch.float16),
        ("qvm", ["gather_qvm"], (5, 2, 100), 3, None, torch.tensor([2, 0, 1, 2, 2]), (100, 64), False, False,
         torch.bfloat16),
        ("qmm_t", ["gather_qmm_t"], (2, 33, 64), 3, torch.tensor([1, 1, 0]), torch.tensor([0, 2, 2]), (64, 40), True,
         False, torch.float32),
        ("qmm_n", ["gather_qmm_n"], (3, 10, 70), 3, None, None, (70, 64), False, False, torch.float16),
        ("rhs_t", ["gather_qmm_rhs_t"], (40, 1, 256), 4, None, sorted_routing(20, 2, 4), (256, 40), True, True,
         torch.bfloat16),
        ("rhs_n", ["gather_qmm_rhs_n"], (36, 1, 70), 3, None, sorted_routing(12, 3, 3, seed=1), (70, 64), False, True,
         torch.float32),
    ]]


GROUP_SIZE_16 = [case for bits in (1, 2, 3, 4, 5, 6, 8) for case in group_size_16_cases(bits)]


@pytest.mark.parametrize("order", ["random", "forward", "reverse"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_branch_matches_oracles(lib, case, order):
    run_case(lib, case, order)


@pytest.mark.parametrize("case", GROUP_SIZE_16, ids=[f"{c[0]}-gs16-b{c[-1]}" for c in GROUP_SIZE_16])
def test_every_branch_at_group_size_16(lib, case):
    run_case(lib, case, "random")


def run_case(lib, case, order):
    name, kernels, x_shape, count, lhs, rhs, (K, N), transpose, sorted_indices, dtype, gs, bits = case
    wq, scales, biases = experts(count, N if transpose else K, K if transpose else N, dtype, gs, bits)
    x = torch.randn(x_shape, generator=torch.Generator().manual_seed(len(name))).to(dtype)
    out, plans, _ = emulate(lib, x, wq, scales, biases, lhs, rhs, transpose, gs, bits, sorted_indices, order)
    assert [_base(p["kernel"]) for p in plans] == kernels
    check(out, x, wq, scales, biases, lhs, rhs, transpose, gs, bits, sorted_indices)


def test_rhs_kernel_runs_span_tiles(lib):
    # 70 sorted rows over 3 experts: runs cross the 32-row tile borders, a tile holds up to 3 runs.
    rhs = torch.tensor([0] * 30 + [1] * 5 + [2] * 35)
    wq, scales, biases = experts(3, 24, 128, torch.float32, 32, 4)
    x = torch.randn(70, 1, 128, generator=torch.Generator().manual_seed(3))
    out, plans, _ = emulate(lib, x, wq, scales, biases, None, rhs, True, 32, 4, sorted_indices=True)
    assert _base(plans[0]["kernel"]) == "gather_qmm_rhs_t" and plans[0]["threadgroups"] == (1, 3, 1)
    check(out, x, wq, scales, biases, None, rhs, True, 32, 4, True)


def test_plan_checks_index_values():
    wq, scales, biases = experts(2, 8, 64, torch.float32, 64, 4)
    x = torch.zeros(2, 1, 64)
    with pytest.raises(IndexError, match=r"rhs_indices\[1\] = 2 is out of range"):
        metalq._C.plan_affine_gather_qmm(x, wq, scales, biases, None, torch.tensor([0, 2]), torch.empty(2, 1, 8), True,
                                         64, 4, False)


def test_every_gather_kernel_is_in_the_library(lib):
    from metalq.config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

    kernels = ("gather_qmv_fast", "gather_qmv", "gather_qmv_wide", "gather_qvm", "gather_qmm_t", "gather_qmm_n",
               "gather_qmm_rhs_t", "gather_qmm_rhs_n")
    names = {metalq._C.kernel_name(k, dtype, gs, bits) for k in kernels for dtype in TOL
             for gs in SUPPORTED_GROUP_SIZES for bits in SUPPORTED_BITS}
    assert names <= lib.kernels


# ---- device traffic of a decode step: the active experts' weights, once ------------------------

def decode_traffic(lib, tokens, top_k, count=64, active=8, K=512, N=64, bits=4, group_size=64, sort=True):
    """{binding: (Traffic, bytes of the active experts or of the tensor)} and the kernel of one MoE decode
    step: `tokens` rows routed to top_k of `active` experts (out of `count`), float16."""
    dtype = torch.float16
    wq, scales, biases = experts(count, N, K, dtype, group_size, bits)
    g = torch.Generator().manual_seed(5)
    chosen = torch.randperm(count, generator=g)[:active]
    routes = chosen[torch.rand(tokens, active, generator=g).argsort(dim=1)[:, :top_k]]
    if sort:  # one row per (token, slot), expert-sorted, as mlx-lm feeds gather_qmm
        rhs = routes.flatten().sort().values
        x = torch.randn(rhs.numel(), 1, K, generator=g).to(dtype)
    else:  # x (tokens, 1, 1, K) against experts (tokens, top_k)
        rhs = routes
        x = torch.randn(tokens, 1, 1, K, generator=g).to(dtype)
    out, plans, traffic = emulate(lib, x, wq, scales, biases, None, rhs, True, group_size, bits, sorted_indices=sort)
    check(out, x, wq, scales, biases, None, rhs, True, group_size, bits, sort)
    (plan,), (t,) = plans, traffic
    used = rhs.unique().numel()
    per_expert = lambda tensor: tensor[0].numel() * tensor.element_size()  # noqa: E731
    table = {"w": (t[0], used * per_expert(wq)), "scales": (t[1], used * per_expert(scales)),
             "biases": (t[2], used * per_expert(biases)), "x": (t[3], x.numel() * 2), "y": (t[4], out.numel() * 2)}
    return table, _base(plan["kernel"]), used


@pytest.mark.parametrize("tokens, top_k, sort, kernel", [(1, 8, False, "gather_qmv_fast"),
                                                          (32, 8, True, "gather_qmm_rhs_t")])
def test_decode_reads_only_the_active_experts(lib, tokens, top_k, sort, kernel):
    table, planned, used = decode_traffic(lib, tokens, top_k, sort=sort)
    assert planned == kernel and used == 8
    for name in ("w", "scales", "biases"):
        measured, active_bytes = table[name]
        assert measured.distinct_read == active_bytes, f"{name}: bytes of inactive experts were read"
        assert measured.written == 0
    # Each packed weight byte is read once: per token and slot by the GEMV (one item per active
    # expert here), per 32-row tile by the sorted kernel (each expert's 32 rows fill one tile).
    measured, active_bytes = table["w"]
    assert active_bytes <= measured.read <= 1.02 * active_bytes
    if kernel == "gather_qmv_fast":  # one lane loads each scale and bias
        for name in ("scales", "biases"):
            measured, active_bytes = table[name]
            assert measured.read <= 1.02 * active_bytes, name


if __name__ == "__main__":
    library = metal_library()
    print("MoE decode step on the emulator: 64 experts of W[64, 512] (4-bit, gs 64, float16), 8 of them used")
    print("(active: the bytes of the 8 used experts' w, scales, biases; of the whole x and y)")
    print(f"{'tokens':>6} {'top_k':>5} {'kernel':<18} {'binding':<7} {'read':>8} {'distinct':>8} {'written':>8} "
          f"{'active':>8} {'reads':>6}")
    for tokens, top_k, sort in ((1, 8, False), (32, 8, False), (32, 8, True)):
        tbl, kern, _ = decode_traffic(library, tokens, top_k, sort=sort)
        for binding, (m, nbytes) in tbl.items():
            print(f"{tokens:>6} {top_k:>5} {kern:<18} {binding:<7} {m.read:>8} {m.distinct_read:>8} {m.written:>8} "
                  f"{nbytes:>8} {m.read / nbytes:>6.2f}")
