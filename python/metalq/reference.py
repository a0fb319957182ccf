"""The reference path: every metalq op written with PyTorch tensor operations alone.

Each function here has the signature and the result of the op of the same name in :mod:`metalq.ops`, and
runs on any torch device (cpu, mps, cuda, meta) with ordinary tensor operations: unpacking with shifts
and masks, dequantizing with the CPU op's roundings, a float32 matmul of the dequantized weight, and
quantizing with MLX's rule written out step by step (edge trick, eps = 1e-7, ties to even; the E2M1 / E4M3
/ E8M0 encodings of ``metal/fp_format.h``). Quantize, dequantize, pack and unpack are bit-identical to the
CPU ops where the device's float32 arithmetic is IEEE (CPU, CUDA); the matmuls equal
``x @ dequantize(w).T`` accumulated in float32, so they agree with the CPU op to float32 summation order.

It is the safety net and the second opinion, not the product: it materialises the float weight of each
layer on every call. The metalq wrappers (``metalq.affine_qmm_t`` etc., hence ``MetalLinear`` and the
other modules) run it instead of the kernels, on every device, while the switch is on:

* ``METALQ_REFERENCE=1`` in the environment when metalq is imported (``0`` or unset: off), or
* ``with metalq.reference_ops(): ...`` (``reference_ops(False)`` turns it off inside; contexts nest and
  restore the previous state on exit). The switch is process-wide, not per thread.

It is never chosen silently: nothing else turns it on. Calling ``torch.ops.metalq.*`` directly always runs
the kernels; the functions of this module always run the reference.

Validation is the ops' own: every function first runs the op's Meta kernel (the C++ checks, so a bad
argument raises the op's exception and message), and for the checks on values (non-finite weights,
``pack`` values >= 2**bits, gather indices out of range) or tensors on several devices it calls the C++
check with the offending arguments so that the op itself raises.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Iterator, Optional

import torch
from torch._subclasses.fake_tensor import is_fake

from . import _C
from . import ops as _wrappers
from .config import DEFAULT_BITS, DEFAULT_GROUP_SIZE

_ops = torch.ops.metalq

ENV_VAR = "METALQ_REFERENCE"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _from_environment() -> bool:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not understood: use {ENV_VAR}=1 to run metalq's PyTorch reference "
        f"path instead of its kernels, or {ENV_VAR}=0 (or unset it) for the kernels."
    )


_enabled: bool = _from_environment()
if _enabled:
    warnings.warn(
        f"{ENV_VAR}=1: metalq runs its PyTorch reference path instead of its kernels on every device "
        "(dequantize-then-matmul, much slower).",
        UserWarning,
        stacklevel=2,
    )


def reference_enabled() -> bool:
    """Whether the metalq wrappers currently run the reference path instead of the kernels."""
    return _enabled


@contextlib.contextmanager
def reference_ops(enabled: bool = True) -> Iterator[None]:
    """Run the metalq wrappers (and so ``MetalLinear`` & co.) on the reference path inside the block.

    ``reference_ops(False)`` runs the kernels inside the block even under ``METALQ_REFERENCE=1``. Blocks
    nest; leaving one restores the state it found. The switch is process-wide (not per thread).

    Example:
        >>> with metalq.reference_ops():
        ...     y = model(x)  # every metalq op in plain PyTorch, on the model's device
    """
    global _enabled
    previous = _enabled
    _enabled = bool(enabled)
    try:
        yield
    finally:
        _enabled = previous


# ---- validation: the ops' own checks -------------------------------------------------------------

def _is_symbolic(t: torch.Tensor) -> bool:
    return is_fake(t) or t.device.type == "meta"


def _has_values(*tensors: Optional[torch.Tensor]) -> bool:
    """True when the tensors hold data that may be inspected (not meta, fake, or under torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    return not any(t is not None and _is_symbolic(t) for t in tensors)


def _meta(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.device.type == "meta" else t.to("meta")


def _check(meta_op, args: tuple, plan=None):
    """Runs the op's Meta kernel on meta copies of args (the C++ shape, dtype and format checks) and returns
    its output. With tensors on several devices, first runs the C++ check on the real tensors (``plan``, a
    ``metalq._C.plan_*`` call, which validates exactly like the op before planning) so that the op's own
    device error is raised."""
    devices = {a.device for a in args if isinstance(a, torch.Tensor)}
    if len(devices) > 1 and plan is not None:
        plan()
        raise RuntimeError(f"metalq reference: tensors on several devices {sorted(map(str, devices))}")
    return meta_op(*(_meta(a) if isinstance(a, torch.Tensor) else a for a in args))


def _renamed(op: str, call):
    """``call()``, with the C++ check's op name ``[affine_qmm]`` (plan_affine_qmm) replaced by ``[op]``."""
    def run():
        try:
            call()
        except (ValueError, TypeError, IndexError, RuntimeError) as e:
            raise type(e)(str(e).replace("[affine_qmm]", f"[{op}]", 1)) from None
    return run


def _cpu_zeros_like(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A CPU tensor of t's shape and dtype backed by one element (cheap), for re-running a check on CPU."""
    return None if t is None else torch.zeros((), dtype=t.dtype).expand(t.shape)


def _raise_nonfinite(op: str, w: torch.Tensor, call) -> None:
    """If w holds NaN or infinity, let the CPU op raise its error (``call`` with a non-finite CPU row)."""
    if _has_values(w) and w.numel() and not bool(torch.isfinite(w).all()):
        call(torch.full((1, w.shape[-1]), float("nan"), dtype=w.dtype))
        raise ValueError(f"[{op}] w contains NaN or infinite values, which cannot be quantized.")


# ---- pack / unpack: the LSB-first bitstream, with shifts and masks --------------------------------

_MASK32 = 0xFFFFFFFF


def _period(bits: int):
    """The bitstream repeats every n values = `words` uint32 words. For value i of a period: its word j,
    its bit offset o in that word, and whether it straddles into word j + 1."""
    g = math.gcd(bits, 32)
    n, words = 32 // g, bits // g
    layout = [(i * bits // 32, i * bits % 32) for i in range(n)]
    return n, words, [(j, o, o + bits > 32) for j, o in layout]


def _words_to_int64(w: torch.Tensor) -> torch.Tensor:
    """uint32 words as their values in int64 (0 .. 2**32 - 1)."""
    return w.view(torch.int32).to(torch.int64) & _MASK32


def _int64_to_words(v: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as uint32 words (bit-exact)."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32).view(torch.uint32)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference :func:`metalq.pack`: uint8 values to LSB-first uint32 words."""
    out = _check(_ops.pack, (q, bits))
    if _has_values(q) and bits < 8 and q.numel() and int(q.max()) >= (1 << bits):
        _ops.pack(torch.full((1, 32), 1 << bits, dtype=torch.uint8), bits)
        raise ValueError(f"[pack] q has values >= 2**bits = {1 << bits}.")
    n, words, layout = _period(bits)
    count = q.shape[-1]
    blocks = q.to(torch.int64).reshape(*q.shape[:-1], count // n, n)
    acc = [torch.zeros(blocks.shape[:-1], dtype=torch.int64, device=q.device) for _ in range(words)]
    for i, (j, o, straddles) in enumerate(layout):
        v = blocks[..., i]
        acc[j] = acc[j] | ((v << o) & _MASK32)
        if straddles:
            acc[j + 1] = acc[j + 1] | (v >> (32 - o))
    packed = torch.stack(acc, dim=-1).reshape(out.shape)
    return _int64_to_words(packed)


def unpack(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference :func:`metalq.unpack`: uint32 words to uint8 values."""
    out = _check(_ops.unpack, (w, bits))
    n, words, layout = _period(bits)
    blocks = _words_to_int64(w).reshape(*w.shape[:-1], w.shape[-1] // words, words)
    mask = (1 << bits) - 1
    values = []
    for j, o, straddles in layout:
        v = blocks[..., j] >> o
        if straddles:
            v = v | (blocks[..., j + 1] << (32 - o))
        values.append(v & mask)
    return torch.stack(values, dim=-1).reshape(out.shape).to(torch.uint8)


# ---- affine quantize / dequantize ----------------------------------------------------------------

_QUANTIZE_EPS = 1e-7  # float(1e-7), as kQuantizeEps


def _div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b by true float division on every device (a Python scalar divisor may become a reciprocal
    multiply on some backends)."""
    return a / torch.full_like(a, b)


def _groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // group_size, group_size)


def affine_group_params(w_min: torch.Tensor, w_max: torch.Tensor, bits: int):
    """``(scale, bias)`` in float32 of groups spanning ``[w_min, w_max]``: MLX's rule, step by step."""
    if bits == 1:
        return (w_max - w_min).clamp_min(_QUANTIZE_EPS), w_min
    # The extreme of larger magnitude becomes the bias (q = 0 exactly) and the scale is nudged so
    # that 0.0 falls on an integer level; the scale is negative when that extreme is the max.
    n_bins = float((1 << bits) - 1)
    scale = _div(w_max - w_min, n_bins).clamp_min(_QUANTIZE_EPS)
    min_is_edge = w_min.abs() > w_max.abs()
    scale = torch.where(min_is_edge, scale, -scale)
    edge = torch.where(min_is_edge, w_min, w_max)
    q0 = torch.round(edge / scale)  # torch.round: ties to even, as rint
    zero = q0 == 0
    scale = torch.where(zero, scale, edge / torch.where(zero, torch.ones_like(q0), q0))
    bias = torch.where(zero, torch.zeros_like(edge), edge)
    return scale, bias


def affine_quantize(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS):
    """Reference :func:`metalq.affine_quantize`: MLX's CPU rule, step by step, in float32."""
    wq_meta, s_meta, _ = _check(_ops.affine_quantize, (w, group_size, bits))
    _raise_nonfinite("affine_quantize", w, lambda bad: _ops.affine_quantize(bad, group_size, bits))
    wf = _groups(w.float(), group_size)
    scale, bias = affine_group_params(wf.amin(-1), wf.amax(-1), bits)
    n_bins = float((1 << bits) - 1)
    # q = clamp(rint((w - bias) / scale), 0, n_bins), with IEEE division (never a reciprocal)
    q = ((wf - bias.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(-1.0, n_bins + 1.0)
    q = torch.round(q).clamp(0.0, n_bins).to(torch.uint8).reshape(w.shape)
    return pack(q, bits), scale.to(w.dtype).reshape(s_meta.shape), bias.to(w.dtype).reshape(s_meta.shape)


def affine_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
) -> torch.Tensor:
    """Reference :func:`metalq.affine_dequantize`: ``scales * q + biases`` rounded as the CPU op and MLX
    (float32: the product rounded once, then the sum; half types: product and sum each rounded to the
    dtype from float32)."""
    out = _check(_ops.affine_dequantize, (wq, scales, biases, group_size, bits),
                 plan=lambda: _C.plan_affine_dequantize(wq, scales, biases, scales, group_size, bits))
    q = _groups(unpack(wq, bits), group_size).float()
    s, b = scales.unsqueeze(-1), biases.unsqueeze(-1)
    if scales.dtype == torch.float32:
        w = q * s + b  # two roundings, never fused (eager)
    else:
        product = (q * s.float()).to(scales.dtype)  # exact in float32 for q < 256, rounded once to T
        w = (product.float() + b.float()).to(scales.dtype)
    return w.reshape(out.shape)


# ---- floating-point modes: E2M1 / E4M3 / E8M0 (metal/fp_format.h) --------------------------------

_MODES = {"mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}  # bits, group size
_E2M1_DOUBLED = 0xC8643210  # E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} doubled, a nibble per code
_E4M3_MAX, _E2M1_MAX, _NVFP4_GLOBAL_RANGE = 448.0, 6.0, 2688.0
_FLT_MIN = 1.17549435e-38


def _bits_to_float(u: torch.Tensor) -> torch.Tensor:
    return u.to(torch.int32).view(torch.float32)


def _float_bits(f: torch.Tensor) -> torch.Tensor:
    return f.contiguous().view(torch.int32)


def _e2m1_value(code: torch.Tensor) -> torch.Tensor:
    code = code.to(torch.int64)
    v = ((_E2M1_DOUBLED >> ((code & 7) * 4)) & 15).float() * 0.5
    return torch.where((code & 8) != 0, -v, v)


def _e4m3_value(code: torch.Tensor) -> torch.Tensor:
    code = code.to(torch.int64)
    e, m = (code >> 3) & 15, code & 7
    units = torch.where(e == 0, m, (8 | m) << (e - 1).clamp_min(0))  # |value| * 2^9
    v = units.float() * (1.0 / 512.0)
    v = torch.where((code & 0x80) != 0, -v, v)
    return torch.where((code & 0x7F) == 0x7F, torch.full_like(v, float("nan")), v)


def _e8m0_value(code: torch.Tensor) -> torch.Tensor:
    code = code.to(torch.int64)
    return _bits_to_float(torch.where(code == 0, torch.full_like(code, 0x00400000), code << 23))


def _e4m3_encode(f: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 code, ties to even, saturating at +-448 (non-finite values saturate too)."""
    u = _float_bits(f).to(torch.int64) & _MASK32
    sign = (u >> 24) & 0x80
    u = u & 0x7FFFFFFF
    subnormal = torch.round(_bits_to_float(u.clamp_max(0x3C800000)) * 512.0).to(torch.int64)  # below 2^-6
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) - (120 << 3)
    code = torch.where(u >= 0x43E80000, torch.full_like(u, 0x7E), torch.where(u < 0x3C800000, subnormal, normal))
    return sign | code


# The value of each E2M1 code 0..15 (code 8 is -0.0).
_E2M1_VALUES = [(-1.0 if c & 8 else 1.0) * ((_E2M1_DOUBLED >> ((c & 7) * 4)) & 15) * 0.5 for c in range(16)]


def _e2m1_encode(y: torch.Tensor) -> torch.Tensor:
    """E2M1 code of y as MLX 0.32 picks it: the first code (in code order 0..15) at the least float distance,
    so ties go toward zero, -0 encodes as +0, and NaN or huge y give code 0."""
    best = torch.zeros(y.shape, dtype=torch.int64, device=y.device)
    best_distance = y.abs()
    for code in range(1, 16):
        d = (y - _E2M1_VALUES[code]).abs()
        better = d < best_distance
        best = torch.where(better, torch.full_like(best, code), best)
        best_distance = torch.where(better, d, best_distance)
    return best


def _ceil_log2(s: torch.Tensor) -> torch.Tensor:
    """Smallest e with 2^e >= s for finite s >= 0 (exact, subnormals included); 0 for s == 0."""
    sub = s < _FLT_MIN
    scaled = torch.where(sub, s * 4294967296.0, s)
    u = _float_bits(scaled).to(torch.int64) & _MASK32
    e = ((u >> 23) & 0xFF) - 127 + ((u & 0x7FFFFF) != 0).to(torch.int64) - torch.where(sub, 32, 0)
    return torch.where(s == 0, torch.zeros_like(e), e)


def _exp2_int(e: torch.Tensor) -> torch.Tensor:
    """2^e as a float32, for e in [-149, 127]."""
    normal = (e + 127).clamp_min(1) << 23
    subnormal = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return _bits_to_float(torch.where(e >= -126, normal, subnormal))


def _global(global_scale: torch.Tensor) -> torch.Tensor:
    return global_scale.to(torch.float32).reshape(())


def fp_quantize(w: torch.Tensor, mode: str, global_scale: Optional[torch.Tensor] = None):
    """Reference :func:`metalq.fp_quantize`: ``mx.quantize``'s fp rule (mlx 0.32), step by step."""
    plan = lambda: _C.plan_fp_quantize(w, w, w, mode, global_scale)  # noqa: E731
    _, s_meta = _check(_ops.fp_quantize, (w, mode, global_scale), plan=plan)
    _raise_nonfinite("fp_quantize", w, lambda bad: _ops.fp_quantize(
        bad, mode, None if global_scale is None else global_scale.cpu()))
    bits, group_size = _MODES[mode]
    dtype = w.dtype
    wf = _groups(w.float(), group_size)
    amax = wf.abs().amax(-1)
    s = _div(amax, _E4M3_MAX if mode == "mxfp8" else _E2M1_MAX).to(dtype).float()
    enc = None
    if global_scale is not None:
        g = _global(global_scale)
        enc = torch.full_like(g, _NVFP4_GLOBAL_RANGE) / g  # 448 * 6 / global_scale, true division
    if mode == "nvfp4":
        code = _e4m3_encode(s if enc is None else s * enc)
        divisor = _e4m3_value(code).to(dtype).float()
    else:
        e = _ceil_log2(s)
        code = (e + 127) & 0xFF
        divisor = _exp2_int(e).to(dtype).float()
    y = (wf / divisor.unsqueeze(-1)).to(dtype).float()
    if enc is not None:
        y = y * enc
    q = (_e4m3_encode(y) if mode == "mxfp8" else _e2m1_encode(y)).to(torch.uint8).reshape(w.shape)
    return pack(q, bits), code.to(torch.uint8).reshape(s_meta.shape)


def fp_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    global_scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Reference :func:`metalq.fp_dequantize`, rounded as ``mx.dequantize``: without a global scale the
    scale is first rounded to the output dtype; with one everything stays float32 until the end."""
    plan = lambda: _C.plan_fp_dequantize(wq, scales, wq, mode, global_scale)  # noqa: E731
    out = _check(_ops.fp_dequantize, (wq, scales, mode, global_scale, dtype), plan=plan)
    bits, group_size = _MODES[mode]
    codes = _groups(unpack(wq, bits), group_size)
    v = _e4m3_value(codes) if mode == "mxfp8" else _e2m1_value(codes)
    s = (_e4m3_value(scales) if mode == "nvfp4" else _e8m0_value(scales)).unsqueeze(-1)
    if global_scale is not None:
        inv = _global(global_scale) / torch.full_like(_global(global_scale), _NVFP4_GLOBAL_RANGE)
        w = (s * inv) * v
    else:
        w = s.to(out.dtype).float() * v
    return w.to(out.dtype).reshape(out.shape)


# ---- matmuls: dequantize, then a float32 matmul ---------------------------------------------------

def _affine_qmm(op: str, x, w, scales, biases, group_size, bits, transpose):
    meta_op = _ops.affine_qmm_t if transpose else _ops.affine_qmm_n
    plan = _renamed(op, lambda: _C.plan_affine_qmm(x, w, scales, biases, x, group_size, bits, transpose))
    out = _check(meta_op, (x, w, scales, biases, group_size, bits), plan=plan)
    wd = affine_dequantize(w, scales, biases, group_size, bits).float()
    y = torch.matmul(x.float(), wd.mT if transpose else wd)
    return y.to(x.dtype).reshape(out.shape)


def _fp_qmm(op: str, x, w, scales, mode, global_scale, transpose):
    meta_op = _ops.fp_qmm_t if transpose else _ops.fp_qmm_n
    plan = lambda: _C.plan_fp_qmm(x, w, scales, global_scale, x, mode, transpose)  # noqa: E731
    out = _check(meta_op, (x, w, scales, mode, global_scale), plan=plan)
    wd = fp_dequantize(w, scales, mode, global_scale, torch.float32)
    y = torch.matmul(x.float(), wd.mT if transpose else wd)
    return y.to(x.dtype).reshape(out.shape)


def _gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, sorted_indices):
    args = (x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, sorted_indices)
    plan = lambda: _C.plan_affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, x,  # noqa: E731
                                             transpose, group_size, bits, sorted_indices)
    out = _check(_ops.affine_gather_qmm, args, plan=plan)
    x_batch, w_batch = x.shape[:-2], w.shape[:-2]
    x_count, w_count = math.prod(x_batch), math.prod(w_batch)
    lhs = lhs_indices if lhs_indices is not None else torch.arange(x_count, device=x.device).view(x_batch)
    rhs = rhs_indices if rhs_indices is not None else torch.arange(w_count, device=x.device).view(w_batch)
    lhs, rhs = (t.to(torch.int64).reshape(-1) for t in torch.broadcast_tensors(lhs.long(), rhs.long()))
    if _has_values(lhs, rhs):
        bad = any(bool(((i < 0) | (i >= n)).any()) for i, n in ((lhs, x_count), (rhs, w_count)))
        if bad:  # the CPU op names the first bad index; its checks run before any arithmetic
            _ops.affine_gather_qmm(*(_cpu_zeros_like(t) for t in (x, w, scales, biases)),
                                   None if lhs_indices is None else lhs_indices.cpu(),
                                   None if rhs_indices is None else rhs_indices.cpu(),
                                   transpose, group_size, bits, sorted_indices)
            raise IndexError("[affine_gather_qmm] an index is out of range.")
    elif not torch.compiler.is_compiling():  # meta or fake tensors: the shape is the result
        return x.new_empty(out.shape)
    M, N = out.shape[-2], out.shape[-1]
    x3 = x.reshape(x_count, *x.shape[-2:])
    w3, s3, b3 = (t.reshape(w_count, *t.shape[-2:]) for t in (w, scales, biases))
    y = torch.zeros((lhs.numel(), M, N), dtype=torch.float32, device=x.device)
    # One dequantized expert at a time: the experts in use, each multiplied with all of its rows.
    for e in torch.unique(rhs).tolist():
        rows = (rhs == e).nonzero().squeeze(-1)
        wd = affine_dequantize(w3[e], s3[e], b3[e], group_size, bits).float()
        y[rows] = torch.matmul(x3[lhs[rows]].float(), wd.mT if transpose else wd)
    return y.to(x.dtype).reshape(out.shape)


# Autograd as the ops define it (ops.py): gradients for x (the transposed reference product) and the affine
# scales and biases; the packed codes are frozen (a gradient for them raises the ops' error).

class _AffineQmmT(torch.autograd.Function):
    @staticmethod
    def forward(x, w, scales, biases, group_size, bits):
        return _affine_qmm("affine_qmm_t", x, w, scales, biases, group_size, bits, True)

    setup_context = staticmethod(_wrappers._setup_qmm_context)
    backward = staticmethod(_wrappers._affine_qmm_backward(lambda *a: affine_qmm_n(*a), transposed=True))


class _AffineQmmN(torch.autograd.Function):
    @staticmethod
    def forward(x, w, scales, biases, group_size, bits):
        return _affine_qmm("affine_qmm_n", x, w, scales, biases, group_size, bits, False)

    setup_context = staticmethod(_wrappers._setup_qmm_context)
    backward = staticmethod(_wrappers._affine_qmm_backward(lambda *a: affine_qmm_t(*a), transposed=False))


class _FpQmmT(torch.autograd.Function):
    @staticmethod
    def forward(x, w, scales, mode, global_scale):
        return _fp_qmm("fp_qmm_t", x, w, scales, mode, global_scale, True)

    setup_context = staticmethod(_wrappers._setup_fp_qmm_context)
    backward = staticmethod(_wrappers._fp_qmm_backward(lambda *a: fp_qmm_n(*a)))


class _FpQmmN(torch.autograd.Function):
    @staticmethod
    def forward(x, w, scales, mode, global_scale):
        return _fp_qmm("fp_qmm_n", x, w, scales, mode, global_scale, False)

    setup_context = staticmethod(_wrappers._setup_fp_qmm_context)
    backward = staticmethod(_wrappers._fp_qmm_backward(lambda *a: fp_qmm_t(*a)))


class _AffineGatherQmm(torch.autograd.Function):
    @staticmethod
    def forward(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, sorted_indices):
        return _gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits,
                           sorted_indices)

    setup_context = staticmethod(_wrappers._setup_gather_qmm_context)
    backward = staticmethod(_wrappers._gather_qmm_backward_using(lambda *a: _AffineGatherQmm.apply(*a)))


def affine_qmm_t(x, w, scales, biases, group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS):
    """Reference :func:`metalq.affine_qmm_t`: ``x @ affine_dequantize(w).mT`` in float32, in ``x.dtype``."""
    return _AffineQmmT.apply(x, w, scales, biases, group_size, bits)


def affine_qmm_n(x, w, scales, biases, group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS):
    """Reference :func:`metalq.affine_qmm_n`: ``x @ affine_dequantize(w)`` in float32, in ``x.dtype``."""
    return _AffineQmmN.apply(x, w, scales, biases, group_size, bits)


def affine_gather_qmm(x, w, scales, biases, lhs_indices=None, rhs_indices=None, *, transpose: bool = True,
                      group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS, sorted_indices: bool = False):
    """Reference :func:`metalq.affine_gather_qmm`: a loop over the experts in use, one dequantized at a time
    (data-dependent: eager mode only, a graph break under ``torch.compile``)."""
    return _AffineGatherQmm.apply(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits,
                                  sorted_indices)


def fp_qmm_t(x, w, scales, mode: str, global_scale: Optional[torch.Tensor] = None):
    """Reference :func:`metalq.fp_qmm_t`: ``x @ fp_dequantize(w, dtype=float32).mT`` in float32."""
    return _FpQmmT.apply(x, w, scales, mode, global_scale)


def fp_qmm_n(x, w, scales, mode: str, global_scale: Optional[torch.Tensor] = None):
    """Reference :func:`metalq.fp_qmm_n`: ``x @ fp_dequantize(w, dtype=float32)`` in float32."""
    return _FpQmmN.apply(x, w, scales, mode, global_scale)


__all__ = [
    "ENV_VAR",
    "reference_enabled",
    "reference_ops",
    "affine_quantize",
    "affine_dequantize",
    "affine_qmm_t",
    "affine_qmm_n",
    "affine_gather_qmm",
    "fp_quantize",
    "fp_dequantize",
    "fp_qmm_t",
    "fp_qmm_n",
    "pack",
    "unpack",
]
