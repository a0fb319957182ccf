"""The storage format: bit packing, and quantize/dequantize bit-exact against MLX.

Oracles: an LSB-first bitstream written here in plain numpy, and ``mlx.core`` (CPU) for the quantization
math. Nothing here compares metalq with itself.
"""
import numpy as np
import pytest
import torch

import metalq
from conftest import require_mlx

BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)  # MLX's; metalq's own 16 is checked against MLX's 32 at the end
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


# ---- independent references -------------------------------------------------------------------

def bitstream_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Value k of a row starts at bit k*bits of the row's little-endian byte string (numpy, bit by bit)."""
    count = q.shape[-1]
    flat = q.reshape(-1, count).astype(np.uint64)
    stream = np.zeros((flat.shape[0], count * bits), dtype=np.uint8)
    for b in range(bits):
        stream[:, b::bits] = (flat >> np.uint64(b)) & np.uint64(1)
    packed = np.packbits(stream, axis=-1, bitorder="little")  # LSB-first bytes
    words = packed.view("<u4")
    return words.reshape(q.shape[:-1] + (count * bits // 32,))


def bitstream_unpack(words: np.ndarray, bits: int) -> np.ndarray:
    row_words = words.shape[-1]
    flat = np.ascontiguousarray(words.reshape(-1, row_words).astype("<u4"))
    stream = np.unpackbits(flat.view(np.uint8), axis=-1, bitorder="little")
    count = row_words * 32 // bits
    q = np.zeros((flat.shape[0], count), dtype=np.uint32)
    for b in range(bits):
        q |= stream[:, b : count * bits : bits].astype(np.uint32) << np.uint32(b)
    return q.astype(np.uint8).reshape(words.shape[:-1] + (count,))


def to_mlx(t: torch.Tensor):
    mx = require_mlx()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bfloat16 exactly
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def from_mlx(a, dtype: torch.dtype) -> torch.Tensor:
    mx = require_mlx()
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that equality is bit-exact (signed zeros and NaNs included)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor, what: str):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype}{tuple(actual.shape)} vs {expected.dtype}{tuple(expected.shape)}"
    )
    a, e = bits_of(actual.contiguous()), bits_of(expected.contiguous())
    differ = a != e
    if actual.is_floating_point():  # NaN payloads and signs are not part of the format
        differ &= ~(actual.isnan() & expected.isnan())
    diff = differ.nonzero()
    assert diff.numel() == 0, (
        f"{what}: {diff.shape[0]} of {a.numel()} differ; first at {diff[0].tolist()}: "
        f"{actual[tuple(diff[0])].item()!r} vs MLX {expected[tuple(diff[0])].item()!r}"
    )


def mlx_quantize(w: torch.Tensor, group_size: int, bits: int):
    mx = require_mlx()
    wq, s, b = mx.quantize(to_mlx(w), group_size=group_size, bits=bits)
    return from_mlx(wq, torch.uint32), from_mlx(s, w.dtype), from_mlx(b, w.dtype)


def check_against_mlx(w: torch.Tensor, group_size: int, bits: int):
    """Quantize and dequantize with both libraries; every output must match bit for bit."""
    mx = require_mlx()
    wq, scales, biases = metalq.affine_quantize(w, group_size, bits)
    ref_wq, ref_s, ref_b = mlx_quantize(w, group_size, bits)
    assert_bit_equal(wq, ref_wq, "w_q")
    assert_bit_equal(scales, ref_s, "scales")
    assert_bit_equal(biases, ref_b, "biases")
    deq = metalq.affine_dequantize(ref_wq, ref_s, ref_b, group_size, bits)
    ref_deq = mx.dequantize(to_mlx(ref_wq), to_mlx(ref_s), to_mlx(ref_b), group_size=group_size, bits=bits)
    assert_bit_equal(deq, from_mlx(ref_deq, w.dtype), "dequantized")
    return wq, scales, biases, deq


def assert_error_within_scale(w, scales, biases, deq, group_size: int, bits: int):
    """|w - dequantize(quantize(w))| <= |scale| per group: MLX's bound, exact for the float32 scale and bias.

    Storing scale and bias in T moves every level by up to n_bins * (rounding of the scale) plus the
    rounding of the bias; the final product and sum round once more. Those terms are the slack.
    """
    fi = torch.finfo(w.dtype)
    groups = lambda t: t.double().unflatten(-1, (-1, group_size))  # noqa: E731
    s, b = scales.double().abs().unsqueeze(-1), biases.double().abs().unsqueeze(-1)
    n_bins = 2**bits - 1
    slack = n_bins * (s * fi.eps + fi.smallest_normal * fi.eps) + b * fi.eps + groups(deq).abs() * fi.eps + 1e-6
    err = (groups(w) - groups(deq)).abs()
    bad = err > s + slack
    assert not bad.any(), f"{int(bad.sum())} values are further than |scale| from the input"


# ---- pack / unpack ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(96,), (5, 192), (2, 3, 7, 96)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_pack_matches_bitstream(bits, shape):
    gen = torch.Generator().manual_seed(bits * 1000 + len(shape))
    q = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=gen)
    packed = metalq.pack(q, bits)
    assert packed.dtype == torch.uint32 and packed.shape == shape[:-1] + (shape[-1] * bits // 32,)
    np.testing.assert_array_equal(packed.numpy(), bitstream_pack(q.numpy(), bits))
    np.testing.assert_array_equal(bitstream_unpack(packed.numpy(), bits), q.numpy())
    assert torch.equal(metalq.unpack(packed, bits), q)


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_unpack_matches_bitstream_on_random_words(bits):
    # Every word pattern is a valid packing, so unpack(pack) and pack(unpack) must both be identities.
    rows, words = 9, 15  # 15 words hold a whole number of values for every bits (3 and 5 divide 15)
    raw = np.random.default_rng(bits).integers(0, 2**32, size=(rows, words), dtype=np.uint64).astype(np.uint32)
    w = torch.from_numpy(raw)
    q = metalq.unpack(w, bits)
    assert q.dtype == torch.uint8 and q.shape == (rows, words * 32 // bits)
    np.testing.assert_array_equal(q.numpy(), bitstream_unpack(raw, bits))
    np.testing.assert_array_equal(metalq.pack(q, bits).numpy(), raw)


def test_pack_layout_examples():
    # Worked examples of the layout: nibble 0 is least significant; a 3-bit value straddles words.
    q4 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert metalq.pack(q4, 4).tolist() == [[0x87654321]]
    q3 = torch.zeros(1, 32, dtype=torch.uint8)
    q3[0, 10] = 0b111  # bits 30..32 of the stream: two in word 0, one in word 1
    assert metalq.pack(q3, 3).tolist() == [[0xC0000000, 0x1, 0x0]]


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_pack_unpack_non_contiguous(bits):
    q = torch.randint(0, 2**bits, (96, 10), dtype=torch.uint8).t()  # rows of 96 values, strided
    assert not q.is_contiguous()
    assert torch.equal(metalq.unpack(metalq.pack(q, bits), bits), q)
    w = metalq.pack(q.contiguous(), bits)
    wide = torch.cat([w, w], dim=-1)[:, : w.shape[-1]]
    assert not wide.is_contiguous()
    assert torch.equal(metalq.unpack(wide, bits), q)


# ---- quantize / dequantize against MLX ---------------------------------------------------------

SHAPES = {"2d": lambda gs: (7, 3 * gs), "batched": lambda gs: (2, 3, 5, 2 * gs)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_quantize_dequantize_bit_exact_vs_mlx(bits, group_size, dtype, shape):
    gen = torch.Generator().manual_seed(bits * 7919 + group_size * 31 + len(shape))
    w = (torch.randn(SHAPES[shape](group_size), generator=gen) * 0.7 + 0.05).to(DTYPES[dtype])
    wq, scales, biases, deq = check_against_mlx(w, group_size, bits)
    assert wq.shape == w.shape[:-1] + (w.shape[-1] * bits // 32,)
    assert scales.shape == biases.shape == w.shape[:-1] + (w.shape[-1] // group_size,)
    assert scales.dtype == biases.dtype == deq.dtype == w.dtype
    # Our own dequantize of our own quantize is the round trip a user sees.
    deq = metalq.affine_dequantize(wq, scales, biases, group_size, bits)
    assert_error_within_scale(w, scales, biases, deq, group_size, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_dequantize_arbitrary_parameters_bit_exact_vs_mlx(bits, dtype):
    # Any words, scales and biases (not only what a quantizer emits), over a wide range of magnitudes.
    mx = require_mlx()
    gen = torch.Generator().manual_seed(bits)
    words = torch.randint(0, 2**32, (3, 2, 8 * bits), dtype=torch.int64, generator=gen).to(torch.uint32)
    magnitude = 10.0 ** torch.randint(-6, 4, (3, 2, 4), generator=gen)
    scales = (torch.randn(3, 2, 4, generator=gen) * magnitude).to(DTYPES[dtype])
    biases = (torch.randn(3, 2, 4, generator=gen) * magnitude * 30).to(DTYPES[dtype])
    deq = metalq.affine_dequantize(words, scales, biases, 64, bits)
    ref = mx.dequantize(to_mlx(words), to_mlx(scales), to_mlx(biases), group_size=64, bits=bits)
    assert_bit_equal(deq, from_mlx(ref, DTYPES[dtype]), "dequantized")


def _group_filled(make, group_size):
    """A (4, 4 * group_size) weight whose groups all come from make(generator, group_size)."""
    gen = torch.Generator().manual_seed(group_size)
    return torch.stack([make(gen, group_size) for _ in range(16)]).reshape(4, 4 * group_size)


EDGE_CASES = {
    "constant": lambda g, n: torch.full((n,), float(torch.randn(1, generator=g))),
    "zeros": lambda g, n: torch.zeros(n),
    "negative_zero": lambda g, n: torch.full((n,), -0.0),
    "all_negative": lambda g, n: -torch.rand(n, generator=g) - 0.5,
    "all_positive": lambda g, n: torch.rand(n, generator=g) + 0.5,
    "tiny": lambda g, n: torch.randn(n, generator=g) * 1e-7,
    "subnormal_f16": lambda g, n: torch.randn(n, generator=g) * 1e-6,
    # Magnitudes near the float16 maximum whose range (max - min) still fits float16.
    "huge_near_f16_max": lambda g, n: torch.cat([torch.tensor([65000.0, 33000.0]), torch.rand(n - 2, generator=g) * 32000 + 33000]),
    "huge_mixed_sign": lambda g, n: (torch.rand(n, generator=g) * 2 - 1) * 30000,
    "ramp": lambda g, n: torch.linspace(-1, 3, n),
    "one_outlier": lambda g, n: torch.cat([torch.randn(n - 1, generator=g) * 0.01, torch.tensor([8.0])]),
    # Integer-valued groups put (w - bias) / scale on exact .5 ties: rint must round them to even.
    "integer_ties": lambda g, n: torch.cat([torch.tensor([0.0, 30.0]), torch.randint(0, 31, (n - 2,), generator=g).float()]),
    "integer_small": lambda g, n: torch.randint(-8, 8, (n,), generator=g).float(),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_quantize_edge_cases_bit_exact_vs_mlx(bits, group_size, dtype, case):
    w = _group_filled(EDGE_CASES[case], group_size).to(DTYPES[dtype])
    _, scales, biases, deq = check_against_mlx(w, group_size, bits)
    assert_error_within_scale(w, scales, biases, deq, group_size, bits)
    if case in ("constant", "zeros", "negative_zero"):
        assert torch.equal(deq, w), "a constant group must come back exactly"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_quantize_range_overflow_matches_mlx(bits, dtype):
    # max - min overflows the dtype (float16 at 1 bit, float32/bfloat16 always): the scale becomes inf
    # and dequantize yields NaN/inf. Not useful, but it must be MLX's answer and must not crash.
    big = 60000.0 if dtype == "f16" else 3e38
    w = torch.tensor([big, -big] * 32).reshape(1, 64).to(DTYPES[dtype])
    check_against_mlx(w, 64, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS[1:], ids=lambda b: f"b{b}")  # 1 bit has no interior level to tie at
def test_quantize_rounds_ties_to_even(bits, dtype):
    # Values 0..2*n_bins with scale -2: every odd value is a tie, and MLX's CPU rule is rint (2.5 -> 2).
    top = 2 * (2**bits - 1)
    row = torch.arange(128, dtype=torch.float32) % (top + 1)
    row[0], row[1] = 0.0, float(top)
    w = row.reshape(1, 128).to(DTYPES[dtype])
    if not torch.equal(w.float(), row.reshape(1, 128)):
        pytest.skip(f"{dtype} cannot hold the integers up to {top}")
    wq, scales, biases, _ = check_against_mlx(w, 128, bits)
    q = metalq.unpack(wq, bits).float()
    expected = torch.round((row - biases.float()) / scales.float())  # torch.round is half-to-even
    assert torch.equal(q[0], expected[0])


@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_quantize_non_contiguous_matches_contiguous(bits):
    w = torch.randn(128, 6)
    strided = w.t()
    assert not strided.is_contiguous()
    got = metalq.affine_quantize(strided, 32, bits)
    want = metalq.affine_quantize(strided.contiguous(), 32, bits)
    for a, b, what in zip(got, want, ("w_q", "scales", "biases")):
        assert_bit_equal(a, b, what)
    scales = got[1].t().contiguous().t()
    deq = metalq.affine_dequantize(got[0], scales, got[2], 32, bits)
    assert torch.equal(deq, metalq.affine_dequantize(*got, 32, bits))


def test_quantize_empty_and_zero_size():
    for shape in [(0, 64), (3, 0), (2, 0, 64)]:
        wq, s, b = metalq.affine_quantize(torch.empty(shape), 64, 4)
        assert wq.shape == shape[:-1] + (shape[-1] // 8,) and s.shape == b.shape == shape[:-1] + (shape[-1] // 64,)
        assert metalq.affine_dequantize(wq, s, b, 64, 4).shape == shape


# ---- group size 16 (metalq's extension) against MLX's group size 32 ------------------------------
# MLX has no affine group size 16, but its rule treats every group on its own (the group's min and max,
# then each value), so a group of 16 values quantizes exactly as the group of 32 that repeats it: the
# same scale and bias, its codes twice. MLX's gs-32 quantize and dequantize of a matrix whose rows are
# w's gs-16 groups, each repeated, is the oracle, compared through the numpy bitstream.

def repeated_groups(t: torch.Tensor) -> torch.Tensor:
    """(groups of 16 of t, 32): each row a group of t twice."""
    groups = t.reshape(-1, 16)
    return torch.cat([groups, groups], dim=-1)


GS16_WEIGHTS = {"random": lambda gen: torch.randn(7, 96, generator=gen) * 0.7 + 0.05,
                **{name: lambda gen, make=make: _group_filled(make, 16) for name, make in EDGE_CASES.items()}}


@pytest.mark.parametrize("case", GS16_WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_group_size_16_bit_exact_vs_mlx_repeated_groups(bits, dtype, case):
    mx = require_mlx()
    w = GS16_WEIGHTS[case](torch.Generator().manual_seed(bits)).to(DTYPES[dtype])
    wq, scales, biases = metalq.affine_quantize(w, 16, bits)
    ref_wq, ref_s, ref_b = mlx_quantize(repeated_groups(w), 32, bits)
    ref_q = bitstream_unpack(ref_wq.numpy(), bits)
    np.testing.assert_array_equal(bitstream_unpack(wq.numpy(), bits).reshape(-1, 16), ref_q[:, :16])
    assert_bit_equal(scales.reshape(-1, 1), ref_s, "scales")
    assert_bit_equal(biases.reshape(-1, 1), ref_b, "biases")
    deq = metalq.affine_dequantize(wq, scales, biases, 16, bits)
    ref_deq = mx.dequantize(to_mlx(ref_wq), to_mlx(ref_s), to_mlx(ref_b), group_size=32, bits=bits)
    assert_bit_equal(deq, from_mlx(ref_deq, w.dtype)[:, :16].reshape(w.shape), "dequantized")
    assert_error_within_scale(w, scales, biases, deq, 16, bits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"b{b}")
def test_group_size_16_dequantize_arbitrary_parameters_vs_mlx(bits, dtype):
    # Any words, scales and biases: MLX dequantizes each group's codes, repeated, with its scale and bias.
    mx = require_mlx()
    gen = torch.Generator().manual_seed(bits)
    words = torch.randint(0, 2**32, (3, 2, 4 * bits), dtype=torch.int64, generator=gen).to(torch.uint32)
    magnitude = 10.0 ** torch.randint(-6, 4, (3, 2, 8), generator=gen)
    scales = (torch.randn(3, 2, 8, generator=gen) * magnitude).to(DTYPES[dtype])
    biases = (torch.randn(3, 2, 8, generator=gen) * magnitude * 30).to(DTYPES[dtype])
    codes = torch.from_numpy(bitstream_unpack(words.numpy(), bits))
    ref_words = torch.from_numpy(bitstream_pack(repeated_groups(codes).numpy(), bits).astype(np.uint32))
    ref = mx.dequantize(to_mlx(ref_words), to_mlx(scales.reshape(-1, 1)), to_mlx(biases.reshape(-1, 1)), group_size=32,
                        bits=bits)
    deq = metalq.affine_dequantize(words, scales, biases, 16, bits)
    assert_bit_equal(deq, from_mlx(ref, DTYPES[dtype])[:, :16].reshape(deq.shape), "dequantized")
