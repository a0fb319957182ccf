"""The checks of ``python -m metalq doctor``: the grids, formats and cases, the float64 references and
operands in plain torch, one check function per op family, and run_case, which makes one table row."""
from __future__ import annotations

import dataclasses
import itertools
import time
import zlib
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch

from .. import reference
from ..config import MODE_DEFAULTS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

if TYPE_CHECKING:
    from .backends import TorchBackend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.uint8: "uint8",
               torch.uint32: "uint32"}
FP_MODES = ("mxfp4", "nvfp4", "mxfp8")
NVFP4_GLOBAL_RANGE = 448.0 * 6.0  # a global scale g multiplies nvfp4 values by g / (448 * 6)

# Matmul error allowed against float64, relative to (|x| @ |W|) of each output: the output rounded to
# the dtype, the weight staged in the dtype on the GPU, float32 accumulation; with room to spare.
MATMUL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EXPERTS, TOP_K = 4, 2  # affine_gather_qmm: x per token against TOP_K of EXPERTS weight matrices


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    bits: Sequence[int]
    group_sizes: Sequence[int]
    dtypes: Sequence[torch.dtype]
    rows: Sequence[int]  # M of the matmuls (tokens for affine_gather_qmm)
    K: int
    N: int

    def describe(self) -> str:
        return (f"{self.name}: bits {','.join(map(str, self.bits))}; group sizes "
                f"{','.join(map(str, self.group_sizes))}; {','.join(DTYPE_NAMES[d] for d in self.dtypes)}; "
                f"M {','.join(map(str, self.rows))}; K={self.K} N={self.N}")


GRIDS = {
    "quick": Grid("quick", (3, 4), (64,), DTYPES, (1, 128), 256, 128),
    "default": Grid("default", (2, 3, 4, 8), (32, 64, 128), DTYPES, (1, 8, 128), 256, 128),
    "full": Grid("full", SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, DTYPES, (1, 8, 33, 128), 1024, 128),
}


@dataclasses.dataclass(frozen=True)
class Format:
    """An affine (bits, group size) or a floating-point mode, nvfp4 with or without a global scale."""

    mode: str
    bits: int
    group_size: int
    global_scale: bool = False

    @property
    def label(self) -> str:
        if self.mode == "affine":
            return f"{self.bits}b/g{self.group_size}"
        if self.mode == "bits":
            return f"{self.bits}b"
        return self.mode + ("+global" if self.global_scale else "")


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    fmt: Format
    dtype: torch.dtype
    M: Optional[int]  # None: not a matmul
    K: int
    N: int

    @property
    def seed(self) -> int:
        return zlib.crc32(f"{self.op}/{self.fmt.label}/{self.dtype}/{self.M}".encode())


@dataclasses.dataclass
class Row:
    op: str
    device: str
    dtype: str
    format: str
    M: Optional[int]
    status: str  # ok, MISMATCH or ERROR
    err: Optional[float]  # the largest error, in the units of tol
    tol: Optional[float]
    ms: float
    message: str = ""


def cases(grid: Grid) -> list[Case]:
    """The checks of a grid: pack / unpack per bits; per format and dtype, quantize, dequantize and the
    matmuls at each M."""
    affine = [Format("affine", b, gs) for gs, b in itertools.product(grid.group_sizes, grid.bits)]
    fp = [Format(m, MODE_DEFAULTS[m][1], MODE_DEFAULTS[m][0]) for m in FP_MODES]
    fp.insert(2, Format("nvfp4", 4, 16, global_scale=True))
    out = []
    for bits in grid.bits:
        out += [Case("pack", Format("bits", bits, 0), torch.uint8, None, grid.K, grid.N),
                Case("unpack", Format("bits", bits, 0), torch.uint32, None, grid.K, grid.N)]
    for dtype in grid.dtypes:
        for fmt in affine:
            out += [Case(op, fmt, dtype, None, grid.K, grid.N) for op in ("affine_quantize", "affine_dequantize")]
            out += [Case(op, fmt, dtype, m, grid.K, grid.N)
                    for op in ("affine_qmm_t", "affine_qmm_n", "affine_gather_qmm") for m in grid.rows]
        for fmt in fp:
            out += [Case(op, fmt, dtype, None, grid.K, grid.N) for op in ("fp_quantize", "fp_dequantize")]
            out += [Case(op, fmt, dtype, m, grid.K, grid.N) for op in ("fp_qmm_t", "fp_qmm_n") for m in grid.rows]
    return out


# ---- float64 references in plain torch ---------------------------------------------------------------

def repeat_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.double().repeat_interleave(group_size, -1)


def affine_reference(wq, scales, biases, group_size, bits):
    """(W, |scale| * q + |bias|) in float64: the exact weight, and the magnitude of its terms."""
    q = reference.unpack(wq, bits).double()
    s, b = repeat_groups(scales, group_size), repeat_groups(biases, group_size)
    return s * q + b, s.abs() * q + b.abs()


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def decode_value(codes: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "mxfp8":  # E4M3
        return codes.to(torch.uint8).view(torch.float8_e4m3fn).double()
    magnitude = _E2M1[codes & 7]
    return torch.where(codes & 8 != 0, -magnitude, magnitude)


def decode_scale(scales: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "nvfp4":  # E4M3
        return scales.view(torch.float8_e4m3fn).double()
    e = scales.double()  # E8M0: 2^(e - 127), 0xFF is NaN
    return torch.where(e == 255, float("nan"), torch.exp2(e - 127))


def fp_reference(wq, scales, fmt: Format, global_scale):
    """W in float64 and the decoded group scale per value (times the nvfp4 global factor)."""
    scale = repeat_groups(decode_scale(scales, fmt.mode), fmt.group_size)
    if global_scale is not None:
        scale = scale * (global_scale.double() / NVFP4_GLOBAL_RANGE)
    return decode_value(reference.unpack(wq, fmt.bits).to(torch.int64), fmt.mode) * scale, scale


# ---- operands --------------------------------------------------------------------------------------

def float_weights(shape, dtype, group_size, g):
    """Normal values at row scales over 10 octaves, with a zero group and a constant group."""
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g).mul(10).exp2().div(32)
    w[0, :group_size] = 0.0
    w[1, :group_size] = 0.75
    return w.to(dtype)


def affine_packed(shape, dtype, group_size, bits, g):
    """Random words (every bit pattern) with scales and biases of both signs, for (rows, K) values."""
    rows, K = shape
    wq = torch.randint(0, 2**32, (rows, K * bits // 32), generator=g, dtype=torch.int64).to(torch.uint32)
    scales = torch.randn(rows, K // group_size, generator=g).div(8).to(dtype)
    biases = torch.randn(rows, K // group_size, generator=g).div(4).to(dtype)
    return wq, scales, biases


def fp_packed(shape, fmt: Format, g):
    """Random value codes (E4M3 without its NaN codes) and finite, positive-or-zero group scales."""
    rows, K = shape
    codes = torch.randint(0, 2**fmt.bits, (rows, K), generator=g)
    if fmt.mode == "mxfp8":
        codes = torch.where(codes & 0x7F == 0x7F, 0, codes)
    groups = (rows, K // fmt.group_size)
    if fmt.mode == "nvfp4":
        scales = torch.empty(groups).uniform_(0.02, 4.0, generator=g).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        scales = torch.randint(120, 131, groups, generator=g, dtype=torch.uint8)
    wq = reference.pack(codes.to(torch.uint8), fmt.bits)
    global_scale = torch.tensor(0.37) if fmt.global_scale else None
    return wq, scales, global_scale



# ---- checks: one function per op family --------------------------------------------------------------

class Result:
    """A row's comparisons: the primary error and its tolerance (against float64), and what failed."""

    def __init__(self):
        self.err: Optional[float] = None
        self.tol: Optional[float] = None
        self.failures: list[str] = []

    def like(self, what, got, shape, dtype) -> bool:
        if tuple(got.shape) != tuple(shape) or got.dtype != dtype:
            self.failures.append(f"{what}: {got.dtype} {tuple(got.shape)}, expected {dtype} {tuple(shape)}")
            return False
        return True

    def close(self, what, got, want, scale, tol, primary=True) -> None:
        """max |got - want| / scale (elementwise; a zero scale demands equality) within tol."""
        diff = (got.double() - want.double()).abs()
        ratio = torch.where(diff == 0, 0.0, diff / scale.double())
        err = float(ratio.max()) if ratio.numel() else 0.0
        if ratio.isnan().any():
            err = float("nan")
        if primary:
            self.err, self.tol = err, tol
        if not err <= tol:
            self.failures.append(f"{what}: err {err:.3g} > tol {tol:.3g}")

    def exact(self, what, got, want, reference="the CPU op") -> None:
        """Bit-identical to `want`."""
        if not self.like(what, got, want.shape, want.dtype):
            return
        size = got.element_size()
        a, b = (t.contiguous().view(torch.uint8).view(-1, size) for t in (got, want))
        differ = int((a != b).any(-1).sum()) if a.numel() else 0
        if differ:
            self.failures.append(f"{what}: {differ} of {got.numel()} values differ from {reference}")


def check_pack(case: Case, backend, cpu: TorchBackend) -> Result:
    g, check = torch.Generator().manual_seed(case.seed), Result()
    codes = torch.randint(0, 2**case.fmt.bits, (case.N, case.K), generator=g, dtype=torch.uint8)
    got = backend.pack(codes, case.fmt.bits)
    check.exact("words vs plain torch", got, reference.pack(codes, case.fmt.bits), "plain torch")
    if backend is not cpu:
        check.exact("words", got, cpu.pack(codes, case.fmt.bits))
    return check


def check_unpack(case: Case, backend, cpu: TorchBackend) -> Result:
    g, check = torch.Generator().manual_seed(case.seed), Result()
    words = torch.randint(0, 2**32, (case.N, case.K * case.fmt.bits // 32), generator=g, dtype=torch.int64)
    wq = words.to(torch.uint32)
    got = backend.unpack(wq, case.fmt.bits)
    check.exact("codes vs plain torch", got, reference.unpack(wq, case.fmt.bits), "plain torch")
    if backend is not cpu:
        check.exact("codes", got, cpu.unpack(wq, case.fmt.bits))
    return check


def check_affine_quantize(case: Case, backend, cpu: TorchBackend) -> Result:
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    w = float_weights((case.N, case.K), case.dtype, fmt.group_size, g)
    wq, scales, biases = backend.affine_quantize(w, fmt.group_size, fmt.bits)
    groups = (case.N, case.K // fmt.group_size)
    if (check.like("wq", wq, (case.N, case.K * fmt.bits // 32), torch.uint32)
            & check.like("scales", scales, groups, case.dtype) & check.like("biases", biases, groups, case.dtype)):
        # Within one scale step (rounding to the nearest level, the levels shifted so that the larger
        # of |min|, |max| is exact), and the roundings of the stored scale and bias to the dtype.
        back, _ = affine_reference(wq, scales, biases, fmt.group_size, fmt.bits)
        eps = torch.finfo(case.dtype).eps
        step = repeat_groups(scales, fmt.group_size).abs()
        bound = step * (1 + eps * 2**fmt.bits) + eps * (repeat_groups(biases, fmt.group_size).abs() + w.double().abs())
        check.close("round trip dequantize(quantize(w)) vs w, in scale steps", back, w, bound, 1.0)
    if backend is not cpu:
        for name, got, want in zip(("wq", "scales", "biases"), (wq, scales, biases),
                                   cpu.affine_quantize(w, fmt.group_size, fmt.bits)):
            check.exact(name, got, want)
    return check


def check_affine_dequantize(case: Case, backend, cpu: TorchBackend) -> Result:
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    packed = affine_packed((case.N, case.K), case.dtype, fmt.group_size, fmt.bits, g)
    out = backend.affine_dequantize(*packed, fmt.group_size, fmt.bits)
    if check.like("output", out, (case.N, case.K), case.dtype):
        want, terms = affine_reference(*packed, fmt.group_size, fmt.bits)
        # scale * q + bias rounded to the dtype: at most two roundings of |scale * q| + |bias|
        check.close("vs float64", out, want, terms, torch.finfo(case.dtype).eps)
    if backend is not cpu:
        check.exact("output", out, cpu.affine_dequantize(*packed, fmt.group_size, fmt.bits))
    return check


def _check_matmul(check: Result, case: Case, y, x, w64, magnitude_w, cpu_y=None):
    """y against x @ w64 (w64 (..., K, N)) relative to |x| @ magnitude_w, and against the CPU op's y."""
    scale = x.double().abs() @ magnitude_w
    tol = MATMUL_TOL[case.dtype]
    check.close("vs float64", y, x.double() @ w64, scale, tol)
    if cpu_y is not None:
        check.close("vs the CPU op", y, cpu_y, scale, 2 * tol, primary=False)


def check_affine_qmm(case: Case, backend, cpu: TorchBackend) -> Result:
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    transpose = case.op == "affine_qmm_t"
    packed = affine_packed((case.N, case.K) if transpose else (case.K, case.N), case.dtype, fmt.group_size,
                           fmt.bits, g)
    x = torch.randn(case.M, case.K, generator=g).to(case.dtype)
    y = backend.affine_qmm(x, *packed, fmt.group_size, fmt.bits, transpose)
    if not check.like("output", y, (case.M, case.N), case.dtype):
        return check
    w64, terms = affine_reference(*packed, fmt.group_size, fmt.bits)
    if transpose:
        w64, terms = w64.T, terms.T
    cpu_y = None if backend is cpu else cpu.affine_qmm(x, *packed, fmt.group_size, fmt.bits, transpose)
    _check_matmul(check, case, y, x, w64, terms, cpu_y)
    return check


def check_affine_gather_qmm(case: Case, backend, cpu: TorchBackend) -> Result:
    """M tokens, each x (1, K) against TOP_K of EXPERTS matrices (N, K): out (M, TOP_K, 1, N)."""
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    experts = [affine_packed((case.N, case.K), case.dtype, fmt.group_size, fmt.bits, g) for _ in range(EXPERTS)]
    packed = [torch.stack(parts) for parts in zip(*experts)]
    x = torch.randn(case.M, 1, 1, case.K, generator=g).to(case.dtype)
    rhs = torch.randint(0, EXPERTS, (case.M, TOP_K), generator=g, dtype=torch.int32)
    y = backend.affine_gather_qmm(x, *packed, rhs, fmt.group_size, fmt.bits)
    if check.like("output", y, (case.M, TOP_K, 1, case.N), case.dtype):
        w64, terms = affine_reference(*packed, fmt.group_size, fmt.bits)  # (EXPERTS, N, K)
        x64 = x.double().reshape(case.M, case.K)
        every = torch.einsum("mk,enk->emn", x64, w64)  # each token against every expert
        scale = torch.einsum("mk,enk->emn", x64.abs(), terms)
        tokens = torch.arange(case.M)[:, None]
        pick = lambda t: t[rhs.long(), tokens].unsqueeze(-2)  # noqa: E731  (M, TOP_K, 1, N)
        tol = MATMUL_TOL[case.dtype]
        check.close("vs float64", y, pick(every), pick(scale), tol)
        if backend is not cpu:
            check.close("vs the CPU op", y, cpu.affine_gather_qmm(x, *packed, rhs, fmt.group_size, fmt.bits),
                        pick(scale), 2 * tol, primary=False)
    return check


# The fp round trip bound, in units of the group scale: half the largest gap between neighbouring
# values (E2M1: 4 -> 6; E4M3: 256 -> 288 ... 416 -> 448), as rounding to the nearest value gives.
FP_ROUND_TRIP_STEPS = {"mxfp4": 1.0, "nvfp4": 1.0, "mxfp8": 16.0}


def check_fp_quantize(case: Case, backend, cpu: TorchBackend) -> Result:
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    w = float_weights((case.N, case.K), case.dtype, fmt.group_size, g)
    global_scale = w.abs().max().float() if fmt.global_scale else None
    wq, scales = backend.fp_quantize(w, fmt.mode, global_scale)
    if (check.like("wq", wq, (case.N, case.K * fmt.bits // 32), torch.uint32)
            & check.like("scales", scales, (case.N, case.K // fmt.group_size), torch.uint8)):
        back, scale = fp_reference(wq, scales, fmt, global_scale)
        eps = torch.finfo(case.dtype).eps
        bound = FP_ROUND_TRIP_STEPS[fmt.mode] * scale + eps * w.double().abs()
        check.close("round trip dequantize(quantize(w)) vs w, in scale steps", back, w, bound, 1.0)
    if backend is not cpu:
        for name, got, want in zip(("wq", "scales"), (wq, scales), cpu.fp_quantize(w, fmt.mode, global_scale)):
            check.exact(name, got, want)
    return check


def check_fp_dequantize(case: Case, backend, cpu: TorchBackend) -> Result:
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    wq, scales, global_scale = fp_packed((case.N, case.K), fmt, g)
    out = backend.fp_dequantize(wq, scales, fmt.mode, global_scale, case.dtype)
    if check.like("output", out, (case.N, case.K), case.dtype):
        want, _ = fp_reference(wq, scales, fmt, global_scale)
        # exact in float32, then rounded once to the dtype (three roundings with the global factor); the
        # smallest normal of the dtype bounds the rounding of subnormal results
        finfo = torch.finfo(case.dtype)
        tol = finfo.eps * (2 if fmt.global_scale else 1)
        check.close("vs float64", out, want, want.abs() + finfo.tiny, tol)
    if backend is not cpu:
        check.exact("output", out, cpu.fp_dequantize(wq, scales, fmt.mode, global_scale, case.dtype))
    return check


def check_fp_qmm(case: Case, backend, cpu: TorchBackend) -> Result:
    fmt, g, check = case.fmt, torch.Generator().manual_seed(case.seed), Result()
    transpose = case.op == "fp_qmm_t"
    wq, scales, global_scale = fp_packed((case.N, case.K) if transpose else (case.K, case.N), fmt, g)
    x = torch.randn(case.M, case.K, generator=g).to(case.dtype)
    y = backend.fp_qmm(x, wq, scales, fmt.mode, global_scale, transpose)
    if not check.like("output", y, (case.M, case.N), case.dtype):
        return check
    w64, _ = fp_reference(wq, scales, fmt, global_scale)
    if transpose:
        w64 = w64.T
    cpu_y = None if backend is cpu else cpu.fp_qmm(x, wq, scales, fmt.mode, global_scale, transpose)
    _check_matmul(check, case, y, x, w64, w64.abs(), cpu_y)
    return check


CHECKS: dict[str, Callable[[Case, object, TorchBackend], Result]] = {
    "pack": check_pack,
    "unpack": check_unpack,
    "affine_quantize": check_affine_quantize,
    "affine_dequantize": check_affine_dequantize,
    "affine_qmm_t": check_affine_qmm,
    "affine_qmm_n": check_affine_qmm,
    "affine_gather_qmm": check_affine_gather_qmm,
    "fp_quantize": check_fp_quantize,
    "fp_dequantize": check_fp_dequantize,
    "fp_qmm_t": check_fp_qmm,
    "fp_qmm_n": check_fp_qmm,
}


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return message if len(message) <= 200 else message[:197] + "..."


def run_case(case: Case, backend, cpu: TorchBackend) -> Row:
    """One row: the check timed, an exception caught into an ERROR row."""
    start = time.perf_counter()
    err = tol = None
    try:
        check = CHECKS[case.op](case, backend, cpu)
        status = "MISMATCH" if check.failures else "ok"
        err, tol, message = check.err, check.tol, "; ".join(check.failures)
    except Exception as error:  # noqa: BLE001  (the row reports it)
        status, message = "ERROR", first_line(error)
    ms = (time.perf_counter() - start) * 1e3
    return Row(case.op, backend.name, DTYPE_NAMES[case.dtype], case.fmt.label, case.M, status, err, tol, ms, message)
