"""Typed wrappers around ``torch.ops.metalq``, plus their autograd formulas.

The format is MLX's "affine" mode: a float matrix ``W`` of shape ``(..., rows, K)`` is cut into groups of
``group_size`` consecutive values along its last axis; each group stores ``scale`` and ``bias`` and each
value an unsigned ``bits``-bit integer ``q`` so that ``W ≈ scale * q + bias``. The integers are packed
LSB-first into ``uint32`` words, ``K * bits / 32`` words per row.

The floating-point modes ``"mxfp4"``, ``"nvfp4"`` and ``"mxfp8"`` (the ``fp_*`` ops) store E2M1 (4-bit)
or E4M3 (8-bit) floats instead, packed the same way, and one ``uint8`` scale per group and no biases:
E8M0 (a power of two) per 32 values for the mx modes, E4M3 per 16 values for nvfp4, which may also
take a float32 ``global_scale`` (values are multiplied by ``global_scale / (448 * 6)``).

Inside ``torch.autocast`` the products (``*_qmm_*``, ``affine_gather_qmm``) run in autocast's dtype, like
``F.linear``: ``x`` and the affine scales and biases are cast to it first.

While the reference switch is on (``METALQ_REFERENCE=1``, or ``with metalq.reference_ops():``), every
wrapper here runs :mod:`metalq.reference` (the same op in plain PyTorch, on any device) instead of
``torch.ops.metalq``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import DEFAULT_BITS, DEFAULT_GROUP_SIZE

_ops = torch.ops.metalq


# Devices on which torch.autocast exists (is_autocast_enabled raises for others, such as "meta").
_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _autocast(x: torch.Tensor, *floats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inside ``torch.autocast`` a quantized product runs in autocast's dtype, as ``F.linear`` does: ``x``
    (and the affine scales and biases, which are in ``x.dtype``) are cast to it. Outside, unchanged."""
    device = x.device.type
    if device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device):
        return (x, *floats)
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in (x, *floats))


def affine_quantize(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE, bits: int = DEFAULT_BITS):
    """Quantize ``w`` group-wise along its last axis, bit-identically to ``mlx.core.quantize``.

    Args:
        w: ``(..., rows, K)`` float32, float16 or bfloat16, finite, ``K % group_size == 0`` and
            ``K * bits % 32 == 0`` (whole uint32 words: a further rule only at group size 16).
        group_size: values per (scale, bias) pair: 16, 32, 64 or 128 (16 is metalq's, MLX has no such group
            size: each group of 16 gets MLX's rule).
        bits: bits per value: 1, 2, 3, 4, 5, 6 or 8.

    Returns:
        ``(wq, scales, biases)``: ``wq`` uint32 ``(..., rows, K*bits/32)``; ``scales`` and ``biases``
        ``(..., rows, K/group_size)`` in ``w.dtype``.

    Example:
        >>> wq, s, b = metalq.affine_quantize(torch.randn(256, 512), group_size=64, bits=4)
    """
    if _reference._enabled:
        return _reference.affine_quantize(w, group_size, bits)
    return _ops.affine_quantize(w, group_size, bits)


def affine_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
) -> torch.Tensor:
    """Unpack ``wq`` and return ``scales * q + biases`` in ``scales.dtype``, bit-identical to ``mx.dequantize``.

    Args:
        wq: uint32 ``(..., rows, K*bits/32)``.
        scales, biases: ``(..., rows, K/group_size)``, one float dtype.

    Returns:
        ``(..., rows, K)`` in ``scales.dtype``.
    """
    if _reference._enabled:
        return _reference.affine_dequantize(wq, scales, biases, group_size, bits)
    return _ops.affine_dequantize(wq, scales, biases, group_size, bits)


def affine_qmm_t(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
) -> torch.Tensor:
    """``x @ dequantize(w).T``: the quantized ``nn.Linear`` product, without materialising the weight.

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16.
        w: uint32 ``(N, K*bits/32)``, packed along K (the layout of ``nn.Linear.weight``), or a batch of
            such matrices ``(..., N, K*bits/32)``.
        scales, biases: ``(..., N, K/group_size)`` in ``x.dtype``, with the batch shape of ``w``.

    Returns:
        ``(..., N)`` in ``x.dtype`` for a 2-D ``w``. For a batch of weights, ``x`` is ``(..., M, K)`` and
        the batch dimensions of ``x`` and ``w`` broadcast against each other like ``torch.matmul``'s:
        ``(*broadcast(x_batch, w_batch), M, N)``; a 1-D ``x`` is one row, dropped from the output.
        Equivalent to ``x @ affine_dequantize(w, scales, biases, group_size, bits).mT``, accumulated in
        float32. (MLX multiplies a 2-D ``x`` by the first matrix of a batch only; metalq broadcasts.)
    """
    x, scales, biases = _autocast(x, scales, biases)
    if _reference._enabled:
        return _reference.affine_qmm_t(x, w, scales, biases, group_size, bits)
    return _ops.affine_qmm_t(x, w, scales, biases, group_size, bits)


def affine_qmm_n(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
) -> torch.Tensor:
    """``x @ dequantize(w)``: the non-transposed product (the gradient of ``affine_qmm_t`` with respect to x).

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16.
        w: uint32 ``(K, N*bits/32)``, packed along N, or a batch ``(..., K, N*bits/32)``.
        scales, biases: ``(..., K, N/group_size)`` in ``x.dtype``, with the batch shape of ``w``.

    Returns:
        ``(..., N)`` in ``x.dtype``, accumulated in float32; batches of weights broadcast as in
        :func:`affine_qmm_t`.
    """
    x, scales, biases = _autocast(x, scales, biases)
    if _reference._enabled:
        return _reference.affine_qmm_n(x, w, scales, biases, group_size, bits)
    return _ops.affine_qmm_n(x, w, scales, biases, group_size, bits)


def affine_gather_qmm(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    lhs_indices: torch.Tensor | None = None,
    rhs_indices: torch.Tensor | None = None,
    *,
    transpose: bool = True,
    group_size: int = DEFAULT_GROUP_SIZE,
    bits: int = DEFAULT_BITS,
    sorted_indices: bool = False,
) -> torch.Tensor:
    """Quantized matmul of gathered matrices, as ``mlx.core.gather_qmm``: the mixture-of-experts product.

    For every position ``i`` of the broadcast index shape,
    ``out[i] = x[lhs_indices[i]] @ dequantize(w[rhs_indices[i]]).T`` (``.T`` only with ``transpose``),
    where ``x`` and ``w`` are indexed by their batch dimensions flattened.

    Args:
        x: ``(..., M, K)`` float32, float16 or bfloat16.
        w: uint32 ``(..., N, K*bits/32)`` with ``transpose`` (experts stacked in the batch dimensions),
            ``(..., K, N*bits/32)`` without.
        scales, biases: ``w``'s batch dimensions, then ``(N, K/group_size)`` (``(K, N/group_size)``
            without ``transpose``), in ``x.dtype``.
        lhs_indices, rhs_indices: integer tensors broadcastable against each other. A missing one is
            ``arange`` over its operand's batch dimensions, in their shape. Values must address a matrix
            of their operand.
        sorted_indices: a hint that ``rhs_indices`` is sorted (as a mixture-of-experts layer arranges
            its tokens); the result does not depend on it.

    Returns:
        ``broadcast(lhs_indices, rhs_indices).shape + (M, N)`` in ``x.dtype``, accumulated in float32.

    Example (top-k routing: ``x`` ``(tokens, 1, 1, K)``, ``experts`` ``(tokens, k)``):
        >>> y = metalq.affine_gather_qmm(x, w, s, b, rhs_indices=experts)  # (tokens, k, 1, N)
    """
    x, scales, biases = _autocast(x, scales, biases)
    if _reference._enabled:
        return _reference.affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, transpose=transpose,
                                            group_size=group_size, bits=bits, sorted_indices=sorted_indices)
    return _ops.affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits,
                                  sorted_indices)


def quantized_matmul(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    biases: Optional[torch.Tensor] = None,
    transpose: bool = True,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
) -> torch.Tensor:
    """``mlx.core.quantized_matmul``'s signature: ``x @ dequantize(w).T`` (``transpose``) or ``x @ dequantize(w)``.

    The affine mode runs :func:`affine_qmm_t` / :func:`affine_qmm_n` (``biases`` required), the floating-point
    modes :func:`fp_qmm_t` / :func:`fp_qmm_n` (no ``biases``). ``group_size`` and ``bits`` default to the mode's
    (64 and 4 in affine mode). Newer transformers' ``MetalLinear`` makes this call on its kernel.
    """
    from .config import resolve_format

    bits, group_size = resolve_format("quantized_matmul", bits, group_size, mode)
    if mode != "affine":
        if biases is not None:
            raise ValueError(f"quantized_matmul: mode {mode!r} has no biases; pass biases=None")
        return fp_qmm_t(x, w, scales, mode) if transpose else fp_qmm_n(x, w, scales, mode)
    if biases is None:
        raise ValueError("quantized_matmul: the affine mode needs biases")
    product = affine_qmm_t if transpose else affine_qmm_n
    return product(x, w, scales, biases, group_size, bits)


def fp_quantize(w: torch.Tensor, mode: str, global_scale: Optional[torch.Tensor] = None):
    """Quantize ``w`` in a floating-point mode, bit-identically to ``mx.quantize(w, mode=mode)`` (mlx 0.32).

    Args:
        w: ``(..., rows, K)`` float32, float16 or bfloat16, finite; ``K`` a multiple of the group size
            (32 for ``"mxfp4"`` and ``"mxfp8"``, 16 for ``"nvfp4"``).
        mode: ``"mxfp4"``, ``"nvfp4"`` or ``"mxfp8"``.
        global_scale: ``"nvfp4"`` only: a float32 scalar tensor; group scales are then stored relative to
            ``global_scale / (448 * 6)``.

    Returns:
        ``(wq, scales)``: ``wq`` uint32 ``(..., rows, K*bits/32)`` (bits 4, or 8 for mxfp8); ``scales``
        uint8 ``(..., rows, K/group_size)``.

    Example:
        >>> wq, scales = metalq.fp_quantize(torch.randn(256, 512), "mxfp4")
    """
    if _reference._enabled:
        return _reference.fp_quantize(w, mode, global_scale)
    return _ops.fp_quantize(w, mode, global_scale)


def fp_dequantize(
    wq: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    global_scale: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """The float weight of a floating-point-mode matrix, bit-identical to ``mx.dequantize(..., mode=mode)``.

    Args:
        wq: uint32 ``(..., rows, K*bits/32)``; scales: uint8 ``(..., rows, K/group_size)``.
        mode, global_scale: as given to :func:`fp_quantize`.
        dtype: output dtype; by default bfloat16 as in MLX, or float32 with a ``global_scale`` (MLX
            promotes to the global scale's dtype). An explicit dtype rounds the float32 value once.

    Returns:
        ``(..., rows, K)``.
    """
    if _reference._enabled:
        return _reference.fp_dequantize(wq, scales, mode, global_scale, dtype)
    return _ops.fp_dequantize(wq, scales, mode, global_scale, dtype)


def fp_qmm_t(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    global_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ dequantize(w).T`` for a floating-point-mode weight (``mx.quantized_matmul(..., transpose=True)``).

    Args:
        x: ``(..., K)`` float32, float16 or bfloat16.
        w: uint32 ``(..., N, K*bits/32)``, packed along K; scales: uint8 ``(..., N, K/group_size)`` with
            the same batch dimensions.
        mode, global_scale: as given to :func:`fp_quantize`.

    Returns:
        ``(..., N)`` in ``x.dtype``, accumulated in float32. A 2-D ``w`` serves every leading dimension of
        ``x``; a batch of weights broadcasts as in :func:`affine_qmm_t`.
    """
    (x,) = _autocast(x)
    if _reference._enabled:
        return _reference.fp_qmm_t(x, w, scales, mode, global_scale)
    return _ops.fp_qmm_t(x, w, scales, mode, global_scale)


def fp_qmm_n(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor,
    mode: str,
    global_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``x @ dequantize(w)`` for a floating-point-mode weight ``(K, N)`` packed along N (the gradient of
    :func:`fp_qmm_t` with respect to x).

    Returns:
        ``(..., N)`` in ``x.dtype``, accumulated in float32; batches of weights broadcast as in
        :func:`affine_qmm_t`.
    """
    (x,) = _autocast(x)
    if _reference._enabled:
        return _reference.fp_qmm_n(x, w, scales, mode, global_scale)
    return _ops.fp_qmm_n(x, w, scales, mode, global_scale)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 values ``q`` (``(..., count)``, each ``< 2**bits``) into uint32 ``(..., count*bits/32)``, LSB-first."""
    if _reference._enabled:
        return _reference.pack(q, bits)
    return _ops.pack(q, bits)


def unpack(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint32 ``(..., words)`` to uint8 ``(..., words*32/bits)``."""
    if _reference._enabled:
        return _reference.unpack(w, bits)
    return _ops.unpack(w, bits)


# ---- autograd -----------------------------------------------------------------------------------
# Gradients reach x and, on request, the affine scales and biases (learning them with the codes fixed, as
# DWQ does); the packed codes (uint32, which autograd never differentiates) and every fp-mode tensor are frozen.

# dW, the gradient of the dequantized weight, is formed this many elements at a time (a block of rows) on
# its way to the per-group reductions: bounded memory for any layer size.
GRAD_WEIGHT_CHUNK_ELEMENTS = 1 << 24


def _setup_qmm_context(ctx, inputs, output):
    x, w, scales, biases, group_size, bits = inputs
    learns_groups = scales.requires_grad or biases.requires_grad
    ctx.save_for_backward(w, scales, biases, x if learns_groups else None)
    ctx.group_size, ctx.bits, ctx.x_shape = group_size, bits, x.shape


def _reject_frozen_grads(ctx, positions: slice, what: str) -> None:
    """A gradient asked for an input at ``positions`` (the frozen ones, named ``what``) is an error."""
    if any(ctx.needs_input_grad[positions]):
        raise RuntimeError(
            f"metalq: no gradient with respect to the quantized {what}; they are frozen (train an adapter such "
            "as LoRA on top, learn the affine scales and biases with the codes fixed, or dequantize the layer first)."
        )


def _grad_x(ctx, grad, w, times_weight):
    """d/dx of a qmm: ``times_weight(grad)``, grad times the weight in the other orientation, summed
    over the batch dimensions that broadcast x (a 1-D x with a batch of weights was one row)."""
    if not ctx.needs_input_grad[0]:
        return None
    if w.dim() > 2 and len(ctx.x_shape) == 1:
        grad = grad.unsqueeze(-2)
    return times_weight(grad).sum_to_size(ctx.x_shape)


def _grad_scales_biases(ctx, grad, x, w, scales, transposed):
    """d/dscales and d/dbiases of an affine product whose weight is ``W = scales * q + biases`` per group.

    With dW the gradient of W in its stored orientation (``grad^T x`` for the transposed product,
    ``x^T grad`` otherwise), ``dscales = sum over a group of dW * q`` and ``dbiases = sum over a group of
    dW``. dW is built in float32 a block of rows at a time and summed over the batch dimensions that
    broadcast the weight."""
    need_scales, need_biases = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    if not (need_scales or need_biases):
        return None, None
    x, grad = x.float(), grad.float()
    if w.dim() == 2:  # one matrix serves every leading dimension of x
        x, grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
    elif x.dim() == 1:
        x, grad = x.unsqueeze(0), grad.unsqueeze(-2)
    left, right = (grad, x) if transposed else (x, grad)  # dW = left^T @ right: (rows, columns)
    rows, groups = scales.shape[-2:]
    group_size = ctx.group_size
    step = max(1, GRAD_WEIGHT_CHUNK_ELEMENTS // (groups * group_size))
    grad_scales = torch.empty(scales.shape, dtype=torch.float32, device=scales.device) if need_scales else None
    grad_biases = torch.empty(scales.shape, dtype=torch.float32, device=scales.device) if need_biases else None
    for start in range(0, rows, step):
        block = slice(start, min(start + step, rows))
        d_weight = (left[..., block].mT @ right).sum_to_size(*scales.shape[:-2], block.stop - start, groups * group_size)
        d_weight = d_weight.unflatten(-1, (groups, group_size))
        if need_biases:
            grad_biases[..., block, :] = d_weight.sum(-1)
        if need_scales:
            codes = unpack(w[..., block, :], ctx.bits).unflatten(-1, (groups, group_size))
            grad_scales[..., block, :] = (d_weight * codes).sum(-1)
    return tuple(None if g is None else g.to(scales.dtype) for g in (grad_scales, grad_biases))


def _affine_qmm_backward(transposed_op, transposed):
    def backward(ctx, grad):
        w, scales, biases, x = ctx.saved_tensors
        grad_x = _grad_x(ctx, grad, w, lambda g: transposed_op(g, w, scales, biases, ctx.group_size, ctx.bits))
        grad_scales, grad_biases = _grad_scales_biases(ctx, grad, x, w, scales, transposed)
        return grad_x, None, grad_scales, grad_biases, None, None

    return backward


def _setup_gather_qmm_context(ctx, inputs, output):
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits, sorted_indices = inputs
    ctx.save_for_backward(w, scales, biases, lhs_indices, rhs_indices)
    ctx.x_shape = x.shape
    ctx.transpose, ctx.group_size, ctx.bits, ctx.sorted_indices = transpose, group_size, bits, sorted_indices


def _gather_qmm_backward_using(gather_qmm):
    """The backward of a gather product whose transposed product is ``gather_qmm`` (the op's positional
    signature): the op's own, or the reference path's (metalq.reference)."""
    def backward(ctx, grad):
        return _gather_qmm_backward(ctx, grad, gather_qmm)

    return backward


def _gather_qmm_backward(ctx, grad, gather_qmm=None):
    # out[i] = x[lhs[i]] @ B[rhs[i]], so dx[j] = sum over i with lhs[i] == j of grad[i] @ B[rhs[i]].T: the
    # gather product of grad against the same experts (transpose flipped), scatter-added back over lhs.
    _reject_frozen_grads(ctx, slice(1, 4), "weight, scales or biases of a gather product")
    if not ctx.needs_input_grad[0]:
        return (None,) * 10
    w, scales, biases, lhs_indices, rhs_indices = ctx.saved_tensors
    x_batch, (m_rows, k_dim) = ctx.x_shape[:-2], ctx.x_shape[-2:]
    w_batch = w.shape[:-2]
    batch = grad.shape[:-2]
    if rhs_indices is None:
        rhs_indices = torch.arange(w_batch.numel(), device=grad.device).view(w_batch)
    gather_qmm = gather_qmm or _ops.affine_gather_qmm
    per_item = gather_qmm(grad, w, scales, biases, None, rhs_indices.expand(batch), not ctx.transpose,
                          ctx.group_size, ctx.bits, ctx.sorted_indices)
    if lhs_indices is None:
        lhs_indices = torch.arange(x_batch.numel(), device=grad.device).view(x_batch)
    grad_x = torch.zeros((x_batch.numel(), m_rows, k_dim), dtype=grad.dtype, device=grad.device)
    grad_x.index_add_(0, lhs_indices.expand(batch).reshape(-1).long(), per_item.reshape(-1, m_rows, k_dim))
    return (grad_x.view(ctx.x_shape),) + (None,) * 9


torch.library.register_autograd("metalq::affine_qmm_t", _affine_qmm_backward(_ops.affine_qmm_n, transposed=True),
                                setup_context=_setup_qmm_context)
torch.library.register_autograd("metalq::affine_qmm_n", _affine_qmm_backward(_ops.affine_qmm_t, transposed=False),
                                setup_context=_setup_qmm_context)
torch.library.register_autograd("metalq::affine_gather_qmm", _gather_qmm_backward,
                                setup_context=_setup_gather_qmm_context)


def _setup_fp_qmm_context(ctx, inputs, output):
    x, w, scales, mode, global_scale = inputs
    ctx.save_for_backward(w, scales, global_scale)
    ctx.mode, ctx.x_shape = mode, x.shape


def _fp_qmm_backward(transposed_op):
    def backward(ctx, grad):
        _reject_frozen_grads(ctx, slice(1, None), "weight, scales or global scale of an fp mode")
        w, scales, global_scale = ctx.saved_tensors
        grad_x = _grad_x(ctx, grad, w, lambda g: transposed_op(g, w, scales, ctx.mode, global_scale))
        return grad_x, None, None, None, None

    return backward


torch.library.register_autograd(
    "metalq::fp_qmm_t", _fp_qmm_backward(_ops.fp_qmm_n), setup_context=_setup_fp_qmm_context
)
torch.library.register_autograd(
    "metalq::fp_qmm_n", _fp_qmm_backward(_ops.fp_qmm_t), setup_context=_setup_fp_qmm_context
)


# The reference path (metalq.reference): while its switch is on (METALQ_REFERENCE=1 or
# metalq.reference_ops()), every wrapper above runs it instead of torch.ops.metalq. Imported last: it
# builds its autograd from the helpers above.
from . import reference as _reference  # noqa: E402
