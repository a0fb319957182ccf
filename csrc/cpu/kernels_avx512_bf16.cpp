// x @ W.T on AVX512-BF16 dot products, for every bit width and bfloat16 or float16 x (the scales and
// biases have x's dtype), and on AMX-BF16 tile products for every float x (the AMX section below).
//
// x is split exactly into bfloat16 parts: bfloat16 is one part, float16 (11 significant bits) two, the
// value truncated to bfloat16 and the remainder, float32 three. bfloat16 holds every q < 256, so each
// product q * part is exact and vdpbf16ps sums them in float32, at one dot product per 32 weights and
// part. (Three parts of float32 x measured slower than the AVX2 float kernels at M = 8; AMX takes them.)
//
// A decoder turns a block of a packed row into sub-vectors of 32 uint16 lanes whose low bits index a
// table of bfloat16 integers (vpermw, which reads 5 index bits; vpermi2w, 6 bits, for 6-bit values):
//  - bits 1, 2, 4, 8 (WordDecoder): each uint16 lane (a byte for 1 bit) holds 16 / bits consecutive
//    values and sub-vector t takes every lane's t-th field by a shift; the table ignores the bits above
//    (8 bits: a lookup of each nibble, the high one weighted by 16, and two dot products);
//  - bits 3, 5, 6 (ByteDecoder): 32 consecutive values from 4 * bits bytes, in order (InOrder).
// x is laid out once per call in lane order, zero-padded to whole blocks: the last, partial block of a
// row is read with a masked load, so no byte past the row is touched. vdpbf16ps sums lane pairs, which
// hold values of one group.
//
// The same in-order decode, for every bit width, dequantizes affine tiles for the GEMM of many rows.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized flags in
// every caller.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define METALQ_ISA_FEATURES "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi,avx2,fma,f16c,bmi2"
#define METALQ_FN __attribute__((target(METALQ_ISA_FEATURES)))
#define METALQ_AMX_FN __attribute__((target(METALQ_ISA_FEATURES ",amx-tile,amx-bf16")))

namespace metalq::cpu::avx512_bf16 {
namespace {

inline uint16_t bf16_bits_of_integer(int v) {  // exact: |v| < 256 fits bfloat16's 8 significant bits
  const float f = float(v);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

// 32 bfloat16 entries: entry i is scale * ((i & mask) + offset).
METALQ_FN inline __m512i integer_table(int mask, int scale, int offset) {
  alignas(64) uint16_t v[32];
  for (int i = 0; i < 32; ++i) v[i] = bf16_bits_of_integer(scale * ((i & mask) + offset));
  return _mm512_load_si512(v);
}

template <int BITS>
struct WordDecoder {
  static constexpr int kLaneBits = BITS == 1 ? 8 : 16;  // bytes for 1 bit: a lane pair stays in one group
  static constexpr int kPerLane = kLaneBits / BITS;
  static constexpr int kValues = 32 * kPerLane;  // per block
  static constexpr int kBytes = 32 * kLaneBits / 8;
  static constexpr int kSub = kPerLane;
  static constexpr int kFields = BITS == 8 ? 2 : 1;  // lookups (and dot products) per sub-vector
  static constexpr int kPairValues = 2 * kPerLane;  // values summed into one float lane
  static constexpr int value(int t, int j) { return j * kPerLane + t; }  // value of lane j in sub-vector t
  __m512i low, high;
  METALQ_FN WordDecoder()
      : low(integer_table(BITS == 8 ? 15 : (1 << BITS) - 1, 1, 0)), high(integer_table(15, 16, 0)) {}
  METALQ_FN __m512i load(const uint8_t* p) const {
    if constexpr (kLaneBits == 8) return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_loadu_si512(p);
  }
  METALQ_FN __m512i load_partial(const uint8_t* p, int64_t bytes) const {  // zeros past `bytes`
    if constexpr (kLaneBits == 8) return _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(_bzhi_u32(~0u, bytes), p));
    return _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, bytes), p);
  }
  METALQ_FN __m512bh field(__m512i w, int t, int f) const {
    return (__m512bh)_mm512_permutexvar_epi16(_mm512_srl_epi16(w, _mm_cvtsi32_si128(t * BITS + 4 * f)), f ? high : low);
  }
};

// 32 consecutive values of a row from 4 * BITS bytes, in order, one per uint16 lane with other bits above
// it: vpermb gives lane j the two bytes value j starts in and vpsrlvw aligns it.
template <int BITS>
struct InOrder {
  __m512i bytes_of_lane, shifts;
  METALQ_FN InOrder() {
    alignas(64) uint8_t idx[64];
    alignas(64) uint16_t sh[32];
    for (int j = 0; j < 32; ++j) {
      idx[2 * j] = uint8_t(j * BITS / 8);
      idx[2 * j + 1] = uint8_t(j * BITS / 8 + 1);
      sh[j] = uint16_t(j * BITS % 8);
    }
    bytes_of_lane = _mm512_load_si512(idx);
    shifts = _mm512_load_si512(sh);
  }
  // A masked 32-byte load: zeros past `bytes`, and no byte read past them.
  METALQ_FN __m512i load(const uint8_t* p, int64_t bytes) const {
    const __m512i src = _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8(_bzhi_u32(~0u, unsigned(bytes)), p));
    return _mm512_srlv_epi16(_mm512_permutexvar_epi8(bytes_of_lane, src), shifts);
  }
};

template <int BITS>
struct ByteDecoder {
  static constexpr int kValues = 32;
  static constexpr int kBytes = 4 * BITS;
  static constexpr int kSub = 1;
  static constexpr int kFields = 1;
  static constexpr int kPairValues = 2;
  static constexpr int value(int, int j) { return j; }
  __m512i low, high;
  InOrder<BITS> in_order;
  METALQ_FN ByteDecoder() : low(integer_table(BITS == 6 ? 31 : (1 << BITS) - 1, 1, 0)), high(integer_table(31, 1, 32)) {}
  METALQ_FN __m512i load(const uint8_t* p) const { return in_order.load(p, kBytes); }
  METALQ_FN __m512i load_partial(const uint8_t* p, int64_t bytes) const { return in_order.load(p, bytes); }
  METALQ_FN __m512bh field(__m512i w, int, int) const {
    if constexpr (BITS == 6) return (__m512bh)_mm512_permutex2var_epi16(low, w, high);
    return (__m512bh)_mm512_permutexvar_epi16(w, low);
  }
};

template <int BITS>
using Decoder = std::conditional_t<32 % BITS == 0, WordDecoder<BITS>, ByteDecoder<BITS>>;

// ---- x and the scales in their float kind ----------------------------------------------------------

template <ScalarKind XK>
constexpr int kParts = XK == ScalarKind::bf16 ? 1 : (XK == ScalarKind::f16 ? 2 : 3);

// v as the sum of P bfloat16 values parts[p * stride], each the rest so far truncated: exact for one part
// of a bfloat16 value, two of a float16 one and three of a float32 one.
template <int P>
inline void bf16_parts(float v, uint16_t* parts, int64_t stride) {
  for (int p = 0; p < P; ++p) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t part = u & 0xFFFF0000u;
    parts[p * stride] = uint16_t(part >> 16);
    float h;
    std::memcpy(&h, &part, 4);
    v -= h;  // exact: h is v truncated
  }
}

// sums[g * stride] = the sum of xf over group g, in order.
inline void group_sums(const PackedMatrix& W, const float* xf, float* sums, int64_t stride) {
  for (int64_t g = 0; g < W.groups_per_row(); ++g) {
    float s = 0.f;
    for (int64_t k = g * W.group_size; k < (g + 1) * W.group_size; ++k) s += xf[k];
    sums[g * stride] = s;
  }
}

template <ScalarKind XK>
METALQ_FN inline float load_float(const void* p, int64_t i) {
  if constexpr (XK == ScalarKind::f32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (XK == ScalarKind::f16) {
    return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  } else {
    const uint32_t u = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
}

// 16 bfloat16 values as floats (exact: a bfloat16 is a float's high half).
METALQ_FN inline __m512 bf16_floats(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Values i .. i + min(count, 16) of p as floats, zero beyond.
template <ScalarKind XK>
METALQ_FN inline __m512 load_floats(const void* p, int64_t i, int64_t count) {
  const __mmask16 mask = _bzhi_u32(0xFFFFu, count >= 16 ? 16 : unsigned(count));
  if constexpr (XK == ScalarKind::f32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i);
  if constexpr (XK == ScalarKind::f16) return _mm512_cvtph_ps(h);
  return bf16_floats(h);
}

// Scratch per row of x: the parts of x in lane order, block after block (within a block: sub-vector, then
// part, then 32 lanes of bfloat16), then the per-group sums of x as floats, padded to 16 groups.
template <class D>
int64_t blocks_per_row(const PackedMatrix& W) { return (W.cols + D::kValues - 1) / D::kValues; }
int64_t padded_groups(const PackedMatrix& W) { return (W.groups_per_row() + 15) / 16 * 16; }
template <class D, ScalarKind XK>
int64_t parts_bytes(const PackedMatrix& W) { return blocks_per_row<D>(W) * D::kValues * kParts<XK> * 2; }
template <class D, ScalarKind XK>
int64_t row_stride_bytes(const PackedMatrix& W) { return parts_bytes<D, XK>(W) + padded_groups(W) * 4; }

template <class D, ScalarKind XK>
METALQ_FN void prepare_x(const PackedMatrix& W, const void* x, int64_t M, uint8_t* scratch) {
  constexpr int P = kParts<XK>;
  const int64_t K = W.cols, blocks = blocks_per_row<D>(W);
  std::vector<float> xf(blocks * D::kValues);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < int64_t(xf.size()); ++k) xf[k] = k < K ? load_float<XK>(x, m * K + k) : 0.f;
    uint8_t* row = scratch + m * row_stride_bytes<D, XK>(W);
    uint16_t* parts = reinterpret_cast<uint16_t*>(row);
    for (int64_t b = 0; b < blocks; ++b)
      for (int t = 0; t < D::kSub; ++t)
        for (int j = 0; j < 32; ++j)
          bf16_parts<P>(xf[b * D::kValues + D::value(t, j)], parts + (b * D::kSub + t) * P * 32 + j, 32);
    std::vector<float> sums(padded_groups(W), 0.f);
    group_sums(W, xf.data(), sums.data(), 1);
    std::memcpy(row + parts_bytes<D, XK>(W), sums.data(), sums.size() * 4);
  }
}

// One row of W against MR rows of x (scratch, row stride `stride`), walked in segments that share one
// scale: a group when a block fits in a group, else a block (lane_group then maps each float lane to its
// group). Each segment sums into fresh accumulators, so only its scaled add chains to the next segment.
template <class D, ScalarKind XK, int MR>
struct RowDot {
  static constexpr int64_t kXBlock = int64_t(D::kSub) * kParts<XK> * 64;  // bytes of x per block
  const D& dec;
  const uint8_t* wrow;
  int64_t row_bytes;
  const void* scales;
  int64_t groups;
  int group_shift;
  const uint8_t* x;
  int64_t stride;
  __m512i lane_group;
  bool per_group;
  int64_t seg_blocks;

  // Block b against the rows of x, added to d; kPartial: the row's last block, shorter than kBytes.
  template <bool kPartial>
  METALQ_FN __attribute__((always_inline)) void block(int64_t b, __m512 (&d)[MR]) const {
    const uint8_t* wb = wrow + b * D::kBytes;
    const __m512i w = kPartial ? dec.load_partial(wb, row_bytes - b * D::kBytes) : dec.load(wb);
    for (int t = 0; t < D::kSub; ++t) {
      __m512bh q[D::kFields];
      for (int f = 0; f < D::kFields; ++f) q[f] = dec.field(w, t, f);
      for (int p = 0; p < kParts<XK>; ++p)
        for (int m = 0; m < MR; ++m) {
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * stride + b * kXBlock + (t * kParts<XK> + p) * 64);
          for (int f = 0; f < D::kFields; ++f) d[m] = _mm512_dpbf16_ps(d[m], q[f], xv);
        }
    }
  }

  template <bool kPartial>
  METALQ_FN __attribute__((always_inline)) void segment(int64_t seg, __m512 (&acc)[MR]) const {
    __m512 d[MR];
    for (int m = 0; m < MR; ++m) d[m] = _mm512_setzero_ps();
    if (kPartial) {
      block<true>(seg, d);  // only a block-long segment can be partial
    } else {
      for (int64_t b = seg * seg_blocks; b < (seg + 1) * seg_blocks; ++b) block<false>(b, d);
    }
    __m512 s;
    if (per_group) {
      s = _mm512_set1_ps(load_float<XK>(scales, seg));
    } else {
      const int64_t first = (seg * D::kValues) >> group_shift;
      s = _mm512_permutexvar_ps(lane_group, load_floats<XK>(scales, first, groups - first));
    }
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(s, d[m], acc[m]);
  }
};

template <class D, ScalarKind XK, int MR>
METALQ_FN void row_dot(const D& dec, const PackedMatrix& W, int64_t n, const uint8_t* scratch, __m512i lane_group,
                       float* out) {
  const int64_t G = W.groups_per_row(), row_bytes = W.row_bytes();
  const int64_t scalar_size = scalar_bytes(W.kind);  // bfloat16 or float16
  const bool per_group = D::kValues <= W.group_size;
  const RowDot<D, XK, MR> rd{dec, W.w + n * row_bytes, row_bytes, static_cast<const uint8_t*>(W.scales) + n * G * scalar_size,
                             G, W.group_shift(), scratch, row_stride_bytes<D, XK>(W), lane_group, per_group,
                             per_group ? W.group_size / D::kValues : 1};
  const int64_t segments = per_group ? G : blocks_per_row<D>(W);
  const int64_t whole = per_group ? G : row_bytes / D::kBytes;  // segments without a partial block
  __m512 acc[MR], acc2[MR];  // acc2: a second chain of segments for one row of x
  for (int m = 0; m < MR; ++m) acc[m] = acc2[m] = _mm512_setzero_ps();
  int64_t seg = 0;
  if constexpr (MR == 1) {
    for (; seg + 2 <= whole; seg += 2) {
      rd.template segment<false>(seg, acc);
      rd.template segment<false>(seg + 1, acc2);
    }
  }
  for (; seg < whole; ++seg) rd.template segment<false>(seg, acc);
  if (seg < segments) rd.template segment<true>(seg, acc);
  // Bias term: sum_g biases[g] * (sum of x over group g), 16 groups at a time.
  const void* biases = static_cast<const uint8_t*>(W.biases) + n * G * scalar_size;
  for (int64_t g = 0; g < G; g += 16) {
    const __m512 bias = load_floats<XK>(biases, g, G - g);
    for (int m = 0; m < MR; ++m) {
      const float* sums = reinterpret_cast<const float*>(scratch + m * rd.stride + parts_bytes<D, XK>(W));
      acc[m] = _mm512_fmadd_ps(bias, _mm512_loadu_ps(sums + g), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(MR == 1 ? _mm512_add_ps(acc[m], acc2[m]) : acc[m]);
}

template <class D, ScalarKind XK, int MR>
METALQ_FN inline void row_dot_upto(const D& dec, const PackedMatrix& W, int64_t n, const uint8_t* scratch,
                                   int64_t rows, __m512i lane_group, float* out) {
  if constexpr (MR > 1) {
    if (rows < MR) return row_dot_upto<D, XK, MR - 1>(dec, W, n, scratch, rows, lane_group, out);
  }
  row_dot<D, XK, MR>(dec, W, n, scratch, lane_group, out);
}

template <class D, ScalarKind XK>
METALQ_FN void qmm_t(const PackedMatrix& W, const uint8_t* scratch, int64_t M, float* y, int64_t ldy, int64_t n0,
                     int64_t n1) {
  constexpr int kRows = 8;  // rows of x per pass: 8 accumulators + 8 partial sums fit the 32 registers
  const D dec;
  alignas(64) int32_t groups[16];
  for (int i = 0; i < 16; ++i) groups[i] = (i * D::kPairValues) >> W.group_shift();
  const __m512i lane_group = _mm512_load_si512(groups);
  float r[kRows];
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_ahead(W, n);
    for (int64_t m = 0; m < M; m += kRows) {
      const int64_t rows = M - m < kRows ? M - m : kRows;
      row_dot_upto<D, XK, kRows>(dec, W, n, scratch + m * row_stride_bytes<D, XK>(W), rows, lane_group, r);
      for (int64_t i = 0; i < rows; ++i) y[(m + i) * ldy + n] = r[i];
    }
  }
}

// ---- dequantized tiles for the GEMM of many rows of x --------------------------------------------

METALQ_FN inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
METALQ_FN inline void store16(uint16_t* out, __m512 v) {  // round to nearest even, as torch
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
}
METALQ_FN inline void store32(float* out, __m512 lo, __m512 hi) {
  _mm512_storeu_ps(out, lo);
  _mm512_storeu_ps(out + 16, hi);
}
METALQ_FN inline void store32(uint16_t* out, __m512 lo, __m512 hi) {  // one conversion and store
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// Rows [r0, r1) of W as bfloat16, for bits <= 6 and groups of 32 values or more: each group's 2^bits values
// scale * q + bias (one rounding to float, then to bfloat16, as dequantize_rows below) are a table, looked
// up by each value's bits: one lookup per 32 values instead of widening, converting and an FMA per 16.
template <int BITS, ScalarKind XK>
METALQ_FN void dequantize_rows_by_table(const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out) {
  static_assert(BITS <= 6, "a table of 64 entries at most");
  const InOrder<BITS> in_order;
  const int64_t K = W.cols, G = W.groups_per_row(), row_bytes = W.row_bytes();
  const int gs = W.group_size;
  // Table entry i stands for the value i & mask (the lookup reads 5 or 6 index bits), as floats.
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  __m512 q[4];
  for (int t = 0; t < 4; ++t)
    q[t] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * t)), mask));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = W.w + r * row_bytes;
    uint16_t* orow = out + (r - r0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 scale = _mm512_set1_ps(load_float<XK>(W.scales, r * G + g));
      const __m512 bias = _mm512_set1_ps(load_float<XK>(W.biases, r * G + g));
      const __m512i low = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(q[1], scale, bias), _mm512_fmadd_ps(q[0], scale, bias));
      __m512i high = low;
      if constexpr (BITS == 6)
        high = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(q[3], scale, bias), _mm512_fmadd_ps(q[2], scale, bias));
      for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += 32) {
        const __m512i v = in_order.load(wrow + k0 * BITS / 8, 4 * BITS);
        _mm512_storeu_si512(orow + k0, BITS == 6 ? _mm512_permutex2var_epi16(low, v, high) : _mm512_permutexvar_epi16(v, low));
      }
    }
  }
}

// Rows [r0, r1) of W as scale * q + bias (one rounding to float, then to Out), a group at a time with its
// scale and bias in registers, 32 values (16 for groups of 16) per step.
template <int BITS, ScalarKind XK, class Out>
METALQ_FN void dequantize_rows(const PackedMatrix& W, int64_t r0, int64_t r1, Out* out) {
  if constexpr (std::is_same_v<Out, uint16_t> && BITS <= 6) {
    if (W.group_size >= 32) return dequantize_rows_by_table<BITS, XK>(W, r0, r1, out);
  }
  const InOrder<BITS> in_order;
  const __m512i mask = _mm512_set1_epi16(int16_t((1 << BITS) - 1));
  const int64_t K = W.cols, G = W.groups_per_row(), row_bytes = W.row_bytes();
  const int gs = W.group_size, step = gs < 32 ? gs : 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = W.w + r * row_bytes;
    Out* orow = out + (r - r0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 scale = _mm512_set1_ps(load_float<XK>(W.scales, r * G + g));
      const __m512 bias = _mm512_set1_ps(load_float<XK>(W.biases, r * G + g));
      for (int64_t k0 = g * gs; k0 < (g + 1) * gs; k0 += step) {
        const uint8_t* p = wrow + k0 * BITS / 8;
        __m512i q_lo, q_hi;  // values k0 .. k0 + 15 and (steps of 32) the next 16, one per int32 lane
        if constexpr (BITS == 8) {  // bytes widened straight from memory
          q_lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
          q_hi = step < 32 ? q_lo : _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
        } else {
          const __m512i q = _mm512_and_si512(in_order.load(p, step * BITS / 8), mask);
          q_lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(q));
          q_hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(q, 1));
        }
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q_lo), scale, bias);
        if (step < 32) {
          store16(orow + k0, lo);
        } else {
          store32(orow + k0, lo, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q_hi), scale, bias));
        }
      }
    }
  }
}

// f(std::integral_constant<int, bits>{}) for a supported bit width.
template <class F>
decltype(auto) with_bits(int bits, F&& f) {
  switch (bits) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

template <class Out>
void dequantize(const PackedMatrix& W, int64_t r0, int64_t r1, Out* out) {
  with_bits(W.bits, [&](auto bits_tag) {
    constexpr int B = decltype(bits_tag)::value;
    switch (W.kind) {
      case ScalarKind::f32: return dequantize_rows<B, ScalarKind::f32>(W, r0, r1, out);
      case ScalarKind::f16: return dequantize_rows<B, ScalarKind::f16>(W, r0, r1, out);
      default: return dequantize_rows<B, ScalarKind::bf16>(W, r0, r1, out);
    }
  });
}

// ---- AMX: x @ W.T for several rows of x on bfloat16 tile products ----------------------------------
//
// A pass takes 4 blocks of 16 rows of W (3 for float32 x) against a chunk of up to 16 rows of x, one step
// of 32 values of the rows at a time (a group holds whole steps): an A tile (4 and kSecondA, in turns,
// so a block's decode does not wait for the previous block's products) holds a block's 16 rows of the
// step as bfloat16 integers q in order; tiles 5..7 (B) the step of every row of x, one tile per part of
// x, as lane pairs (B row i: values 2i and 2i + 1 of x's row 0, then of row 1, ...). Tiles 0..3 (C, one
// per block, [rows of W, rows of x]) collect one group's exact products, as RowDot's segments do; each
// row of C is then scaled by its row's scale into float accumulators in memory, with the bias term.

constexpr int kAmxTileRows = 16;  // rows of W per block, and most rows of x per chunk
constexpr int kAmxStep = 32;      // values per step: 16 lane pairs of bfloat16
// Bytes of decoded A tiles per panel of W: half a 2 MiB L2, beside a chunk of x's B tiles.
constexpr int64_t kAmxPanelBytes = 1 << 20;
// bfloat16 x of this many rows on multiplies W dequantized to bfloat16 (DEQUANTIZED below), as the dense
// bfloat16 GEMM of the dequantized weight would; fewer rows get exact integer products.
constexpr int64_t kAmxDequantizedMinRows = 32;
// ... and from this many on, oneDNN's bfloat16 GEMM of the dequantized weight, better blocked, is faster.
constexpr int64_t kAmxGemmMinRows = 128;
template <int P>
constexpr int kAmxBlocks = P == 3 ? 3 : 4;  // C tiles: blocks per pass
template <int P>
constexpr int kSecondA = P == 3 ? 3 : 7;  // the tile neither C nor B uses

// One step of a row as bfloat16 integers from 4 * BITS bytes, lane l holding value value(l) of the step
// (any order does: a step's lanes sum into one output and x is laid out to match).
// 3, 5 and 6 bits: in order, as ByteDecoder.
template <int BITS>
struct StepDecoder {
  static constexpr int value(int l) { return l; }
  ByteDecoder<BITS> bytes;
  METALQ_FN __m512i decode(const uint8_t* p) const { return (__m512i)bytes.field(bytes.load(p), 0, 0); }
};
// 1, 2 and 4 bits: the step's bytes broadcast to 16 / BITS copies, copy c shifted by c * BITS, so each
// uint16 lane's low bits are one value, which the table looks up: no byte permute.
template <int BITS>
struct WordStepDecoder {
  static constexpr int kWords = 2 * BITS;  // uint16 words per step
  static constexpr int value(int l) { return l % kWords * (16 / BITS) + l / kWords; }
  __m512i shifts, table;
  METALQ_FN WordStepDecoder() : table(integer_table((1 << BITS) - 1, 1, 0)) {
    alignas(64) uint16_t sh[32];
    for (int l = 0; l < 32; ++l) sh[l] = uint16_t(l / kWords * BITS);
    shifts = _mm512_load_si512(sh);
  }
  METALQ_FN __m512i decode(const uint8_t* p) const {
    __m512i w;
    if constexpr (BITS == 4) {
      w = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else if constexpr (BITS == 2) {
      int64_t v;
      std::memcpy(&v, p, 8);
      w = _mm512_set1_epi64(v);
    } else {
      int32_t v;
      std::memcpy(&v, p, 4);
      w = _mm512_set1_epi32(v);
    }
    return _mm512_permutexvar_epi16(_mm512_srlv_epi16(w, shifts), table);
  }
};
template <>
struct StepDecoder<1> : WordStepDecoder<1> {};
template <>
struct StepDecoder<2> : WordStepDecoder<2> {};
template <>
struct StepDecoder<4> : WordStepDecoder<4> {};
template <>
struct StepDecoder<8> {  // 8-bit values leave no index bits to spare for a table: convert through float
  static constexpr int value(int l) { return l; }
  METALQ_FN __m512i decode(const uint8_t* p) const {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
};

// Scratch per chunk of x's rows (all chunks but the last have kAmxTileRows): the B tiles, step after
// step (within a step: part, then 16 lane pairs of `rows` rows), then 16 floats per group, the
// per-group sums of x for each row of the chunk (zero past `rows`).
template <ScalarKind XK>
int64_t amx_tiles_bytes(const PackedMatrix& W, int64_t rows) { return W.cols / kAmxStep * kParts<XK> * 64 * rows; }
template <ScalarKind XK>
int64_t amx_chunk_bytes(const PackedMatrix& W, int64_t rows) {
  return amx_tiles_bytes<XK>(W, rows) + W.groups_per_row() * 64;
}
template <ScalarKind XK>
int64_t amx_scratch_bytes(const PackedMatrix& W, int64_t M) {
  const int64_t full = M / kAmxTileRows, rest = M % kAmxTileRows;
  return full * amx_chunk_bytes<XK>(W, kAmxTileRows) + (rest ? amx_chunk_bytes<XK>(W, rest) : 0);
}

// r[j] = column j of the 16 x 16 matrix of 32-bit values whose row i is r[i].
METALQ_FN inline void transpose_16x16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int k = 0; k < 8; ++k) {  // pairs of rows interleaved within each 128-bit lane
    a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // b[4k + c], lane L: column 4L + c of rows 4k .. 4k + 3
    b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
    b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
    b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i even = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x88), odd = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xDD);
    const __m512i even2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x88);
    const __m512i odd2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(even, even2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(odd, odd2, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(even, even2, 0xDD);
    r[12 + c] = _mm512_shuffle_i32x4(odd, odd2, 0xDD);
  }
}

template <int BITS, ScalarKind XK>
METALQ_FN void amx_prepare_x(const PackedMatrix& W, const void* x, int64_t M, uint8_t* scratch) {
  constexpr int P = kParts<XK>;
  const int64_t K = W.cols, G = W.groups_per_row();
  // Lane l of a step's lane pairs is the high half (the bfloat16 part) of float value(l) of the step.
  alignas(64) uint16_t high_halves[kAmxStep];
  for (int l = 0; l < kAmxStep; ++l) high_halves[l] = uint16_t(2 * StepDecoder<BITS>::value(l) + 1);
  const __m512i pick = _mm512_load_si512(high_halves);
  const __m512i truncate = _mm512_set1_epi32(int(0xFFFF0000u));
  alignas(64) float rest[kAmxTileRows][kAmxStep];  // what the parts so far leave of each row's step
  for (int64_t m0 = 0; m0 < M; m0 += kAmxTileRows) {
    const int64_t rows = M - m0 < kAmxTileRows ? M - m0 : kAmxTileRows;
    const __mmask16 row_mask = _bzhi_u32(0xFFFFu, unsigned(rows));
    uint8_t* chunk = scratch + m0 / kAmxTileRows * amx_chunk_bytes<XK>(W, kAmxTileRows);
    uint16_t* tiles = reinterpret_cast<uint16_t*>(chunk);
    float* sums = reinterpret_cast<float*>(chunk + amx_tiles_bytes<XK>(W, rows));
    const int64_t part_stride = 16 * 2 * rows;  // uint16 per B tile
    for (int64_t s = 0; s < K / kAmxStep; ++s) {
      for (int64_t i = 0; i < kAmxTileRows; ++i) {
        const int64_t count = i < rows ? 16 : 0;  // rows past the chunk's: zero
        _mm512_store_ps(rest[i], load_floats<XK>(x, (m0 + i) * K + s * kAmxStep, count));
        _mm512_store_ps(rest[i] + 16, load_floats<XK>(x, (m0 + i) * K + s * kAmxStep + 16, count));
      }
      for (int p = 0; p < P; ++p) {  // each part the rest so far truncated to bfloat16, as bf16_parts
        __m512i pairs[kAmxTileRows];  // row i: lane pairs 0..15 of x's row i, then B row j: pair j of every row
        for (int64_t i = 0; i < kAmxTileRows; ++i) {
          const __m512 lo = _mm512_load_ps(rest[i]), hi = _mm512_load_ps(rest[i] + 16);
          const __m512 lo_part = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(lo), truncate));
          const __m512 hi_part = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(hi), truncate));
          pairs[i] = _mm512_permutex2var_epi16(_mm512_castps_si512(lo_part), pick, _mm512_castps_si512(hi_part));
          _mm512_store_ps(rest[i], _mm512_sub_ps(lo, lo_part));  // exact: the part is the value truncated
          _mm512_store_ps(rest[i] + 16, _mm512_sub_ps(hi, hi_part));
        }
        transpose_16x16(pairs);
        uint16_t* tile = tiles + (s * P + p) * part_stride;
        for (int j = 0; j < 16; ++j) _mm512_mask_storeu_epi32(tile + j * 2 * rows, row_mask, pairs[j]);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      __m512 sums_g = _mm512_setzero_ps();  // lane i: row i's sum
      for (int64_t i = 0; i < rows; ++i) {
        __m512 sum = _mm512_setzero_ps();
        for (int64_t k = g * W.group_size; k < (g + 1) * W.group_size; k += 16)
          sum = _mm512_add_ps(sum, load_floats<XK>(x, (m0 + i) * K + k, 16));
        sums_g = _mm512_mask_mov_ps(sums_g, __mmask16(1u << i), _mm512_set1_ps(_mm512_reduce_add_ps(sum)));
      }
      _mm512_storeu_ps(sums + g * 16, sums_g);
    }
  }
}

// Tile instructions take their tiles' numbers as literals (the intrinsics paste them into the assembly).
// C tile `block` of the pass += the A tile (4, or the second) times the B tiles.
#define METALQ_TILE_PRODUCTS(T, A)              \
  _tile_dpbf16ps(T, A, 5);                      \
  if constexpr (P > 1) _tile_dpbf16ps(T, A, 6); \
  if constexpr (P > 2) _tile_dpbf16ps(T, A, 7);
template <int P>
METALQ_AMX_FN inline void tile_products(int block, bool second) {
  if (!second) {
    switch (block) {
      case 0: METALQ_TILE_PRODUCTS(0, 4) break;
      case 1: METALQ_TILE_PRODUCTS(1, 4) break;
      case 2: METALQ_TILE_PRODUCTS(2, 4) break;
      default: METALQ_TILE_PRODUCTS(3, 4) break;
    }
  } else if constexpr (kSecondA<P> == 3) {
    switch (block) {
      case 0: METALQ_TILE_PRODUCTS(0, 3) break;
      case 1: METALQ_TILE_PRODUCTS(1, 3) break;
      default: METALQ_TILE_PRODUCTS(2, 3) break;
    }
  } else {
    switch (block) {
      case 0: METALQ_TILE_PRODUCTS(0, 7) break;
      case 1: METALQ_TILE_PRODUCTS(1, 7) break;
      case 2: METALQ_TILE_PRODUCTS(2, 7) break;
      default: METALQ_TILE_PRODUCTS(3, 7) break;
    }
  }
}
#undef METALQ_TILE_PRODUCTS
template <int P>
METALQ_AMX_FN inline void load_a(bool second, const uint16_t* a) {  // 16 rows, 64 bytes apart
  if (!second)
    _tile_loadd(4, a, 64);
  else if constexpr (kSecondA<P> == 3)
    _tile_loadd(3, a, 64);
  else
    _tile_loadd(7, a, 64);
}
METALQ_AMX_FN inline void zero_tile(int block) {
  switch (block) {
    case 0: _tile_zero(0); break;
    case 1: _tile_zero(1); break;
    case 2: _tile_zero(2); break;
    default: _tile_zero(3); break;
  }
}
METALQ_AMX_FN inline void store_tile(int block, float* out) {  // 16 rows, 64 bytes apart
  switch (block) {
    case 0: _tile_stored(0, out, 64); break;
    case 1: _tile_stored(1, out, 64); break;
    case 2: _tile_stored(2, out, 64); break;
    default: _tile_stored(3, out, 64); break;
  }
}

// scale * q + bias of 16 bfloat16 integers q (one float rounding, as dequantize_rows).
METALQ_FN inline __m512 dequantized_floats(__m256i q, __m512 scale, __m512 bias) {
  return _mm512_fmadd_ps(bf16_floats(q), scale, bias);
}
// The 32 bfloat16 integers q dequantized and rounded to bfloat16.
METALQ_FN inline __m512i dequantized(__m512i q, float scale, float bias) {
  const __m512 s = _mm512_set1_ps(scale), b = _mm512_set1_ps(bias);
  return (__m512i)_mm512_cvtne2ps_pbh(dequantized_floats(_mm512_extracti64x4_epi64(q, 1), s, b),
                                      dequantized_floats(_mm512_castsi512_si256(q), s, b));
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// DEQUANTIZED: the A tiles hold W dequantized and rounded to bfloat16 (the weight a dense bfloat16 linear
// of the dequantized matrix multiplies, for bfloat16 x only), so a C tile sums a whole row with no scaling
// per group: the exact-integer tiles' per-group epilogue dominates their time at many rows of x.
template <int BITS, ScalarKind XK, bool DEQUANTIZED = false>
METALQ_AMX_FN void amx_qmm_t(const PackedMatrix& W, const uint8_t* scratch, int64_t M, float* y, int64_t ldy,
                             int64_t n0, int64_t n1) {
  static_assert(!DEQUANTIZED || XK == ScalarKind::bf16, "dequantized A tiles multiply one bfloat16 part of x");
  constexpr int P = kParts<XK>;
  constexpr int64_t kPassRows = kAmxTileRows * kAmxBlocks<P>;
  constexpr int64_t kTileValues = kAmxTileRows * kAmxStep;  // one A tile
  const StepDecoder<BITS> dec;
  const int64_t G = W.groups_per_row(), K = W.cols, row_bytes = W.row_bytes(), steps = K / kAmxStep;
  const int64_t steps_per_group = W.group_size / kAmxStep;
  // W is taken a panel of passes at a time: the panel's rows are decoded into A tiles while the first
  // chunk of x multiplies them, and every further chunk reuses them, so the decode is paid once per panel
  // and x is read once per panel. A panel's tiles take about kAmxPanelBytes (at least one pass).
  const int64_t pass_bytes = steps * kAmxBlocks<P> * kTileValues * 2;
  const int64_t panel_rows = std::max<int64_t>(kAmxPanelBytes / pass_bytes, 1) * kPassRows;
  // Kept per thread between calls (a fresh buffer would fault its pages in every time). One chunk of x
  // reuses nothing: its A tiles alternate between two in L1 (written out to L2, they cost more than the
  // decode at 1-4 bits).
  const bool reuse = M > kAmxTileRows;
  const int64_t largest_panel = std::min(panel_rows, (n1 - n0 + kPassRows - 1) / kPassRows * kPassRows);
  thread_local std::vector<uint16_t> a;
  alignas(64) uint16_t a_alternate[2][kTileValues];
  if (reuse) a.resize(largest_panel / kPassRows * pass_bytes / 2);
  std::vector<float> scales(largest_panel * G), biases(largest_panel * G);  // the panel's, as floats
  alignas(64) float c[kAmxTileRows * 16] = {}, acc[kPassRows * 16];
  int64_t configured_rows = 0;
  for (int64_t panel0 = n0; panel0 < n1; panel0 += panel_rows) {
    const int64_t panel1 = std::min(n1, panel0 + panel_rows);
    for (int64_t r = 0; r < panel1 - panel0; ++r)
      for (int64_t g = 0; g < G; g += 16) {
        const __mmask16 mask = _bzhi_u32(0xFFFFu, G - g >= 16 ? 16 : unsigned(G - g));
        _mm512_mask_storeu_ps(&scales[r * G + g], mask, load_floats<XK>(W.scales, (panel0 + r) * G + g, G - g));
        _mm512_mask_storeu_ps(&biases[r * G + g], mask, load_floats<XK>(W.biases, (panel0 + r) * G + g, G - g));
      }
    // Rows decoded in order, so while a pass decodes, the next one's is prefetched (up to the panel's end
    // where further chunks of x come before the next panel).
    const int64_t prefetch_end = reuse ? panel1 : W.rows;
    for (int64_t m0 = 0; m0 < M; m0 += kAmxTileRows) {
      const bool decode = m0 == 0;
      const int64_t rows = M - m0 < kAmxTileRows ? M - m0 : kAmxTileRows;
      if (rows != configured_rows) {
        TileConfig config;
        for (int t = 0; t < 8; ++t) {
          config.rows[t] = kAmxTileRows;
          config.colsb[t] = uint16_t(t == 4 || t == kSecondA<P> ? 64 : 4 * rows);
        }
        _tile_loadconfig(&config);
        configured_rows = rows;
      }
      const uint8_t* chunk = scratch + m0 / kAmxTileRows * amx_chunk_bytes<XK>(W, kAmxTileRows);
      const float* sums = reinterpret_cast<const float*>(chunk + amx_tiles_bytes<XK>(W, rows));
      const int64_t b_bytes = 64 * rows;  // one B tile
      for (int64_t p0 = panel0; p0 < panel1; p0 += kPassRows) {
        const int64_t pass_rows = panel1 - p0 < kPassRows ? panel1 - p0 : kPassRows;
        const int blocks = int((pass_rows + kAmxTileRows - 1) / kAmxTileRows);
        uint16_t* pass_tiles = reuse ? a.data() + (p0 - panel0) / kPassRows * (pass_bytes / 2) : nullptr;
        const float* pass_scales = scales.data() + (p0 - panel0) * G;
        const float* pass_biases = biases.data() + (p0 - panel0) * G;
        // The next pass's rows (64 streams side by side, more than the hardware prefetcher follows), one
        // contiguous run of W, prefetched a part per group.
        const int64_t next_rows = std::min<int64_t>(kPassRows, prefetch_end - (p0 + kPassRows));
        const uint8_t* next = W.w + (p0 + kPassRows) * row_bytes;
        const int64_t next_bytes = decode && next_rows > 0 ? next_rows * row_bytes : 0;
        const int64_t part_bytes = (next_bytes / G + 63) / 64 * 64;
        for (int64_t i = 0; i < pass_rows * 16; i += 16) _mm512_store_ps(acc + i, _mm512_setzero_ps());
        if constexpr (DEQUANTIZED)
          for (int b = 0; b < blocks; ++b) zero_tile(b);
        for (int64_t g = 0; g < G; ++g) {
          if (g * part_bytes < next_bytes)
            prefetch_bytes(next + g * part_bytes, std::min(part_bytes, next_bytes - g * part_bytes));
          if constexpr (!DEQUANTIZED)
            for (int b = 0; b < blocks; ++b) zero_tile(b);
          for (int64_t s = g * steps_per_group; s < (g + 1) * steps_per_group; ++s) {
            const uint8_t* xs = chunk + s * P * b_bytes;
            _tile_loadd(5, xs, 4 * rows);
            if constexpr (P > 1) _tile_loadd(6, xs + b_bytes, 4 * rows);
            if constexpr (P > 2) _tile_loadd(7, xs + 2 * b_bytes, 4 * rows);
            for (int b = 0; b < blocks; ++b) {
              const bool second = (s * blocks + b) & 1;
              uint16_t* ab = reuse ? pass_tiles + (s * kAmxBlocks<P> + b) * kTileValues : a_alternate[second];
              if (decode) {
                const int64_t r0 = b * kAmxTileRows, r1 = std::min<int64_t>(pass_rows, r0 + kAmxTileRows);
                const uint8_t* wp = W.w + (p0 + r0) * row_bytes + s * 4 * BITS;
                for (int64_t r = r0; r < r1; ++r, wp += row_bytes) {
                  __m512i v = dec.decode(wp);
                  if constexpr (DEQUANTIZED)
                    v = dequantized(v, pass_scales[r * G + g], pass_biases[r * G + g]);
                  _mm512_storeu_si512(ab + (r - r0) * kAmxStep, v);
                }
                for (int64_t r = r1; r < r0 + kAmxTileRows; ++r)  // rows past W's last: zero
                  _mm512_storeu_si512(ab + (r - r0) * kAmxStep, _mm512_setzero_si512());
              }
              load_a<P>(second, ab);
              tile_products<P>(b, second);
            }
          }
          if constexpr (DEQUANTIZED) continue;
          const __m512 xsum = _mm512_loadu_ps(sums + g * 16);
          for (int b = 0; b < blocks; ++b) {
            store_tile(b, c);
            const int64_t r0 = b * kAmxTileRows, r1 = std::min<int64_t>(pass_rows, r0 + kAmxTileRows);
            for (int64_t r = r0; r < r1; ++r) {
              __m512 v = _mm512_load_ps(acc + r * 16);
              v = _mm512_fmadd_ps(_mm512_set1_ps(pass_scales[r * G + g]), _mm512_load_ps(c + (r - r0) * 16), v);
              _mm512_store_ps(acc + r * 16, _mm512_fmadd_ps(_mm512_set1_ps(pass_biases[r * G + g]), xsum, v));
            }
          }
        }
        if constexpr (DEQUANTIZED)
          for (int b = 0; b < blocks; ++b) store_tile(b, acc + b * kAmxTileRows * 16);
        for (int64_t r = 0; r < pass_rows; ++r)
          for (int64_t i = 0; i < rows; ++i) y[(m0 + i) * ldy + p0 + r] = acc[r * 16 + i];
      }
    }
  }
  _tile_release();
}

// Asks Linux for the AMX tile state (off by default for each process); true once granted.
bool request_amx() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

// ---- the kernel tables -------------------------------------------------------------------------

template <int BITS, ScalarKind XK>
struct Dot {
  using D = Decoder<BITS>;
  static const DotQmmT* get() {
    static const DotQmmT k{
        [](const PackedMatrix& W, int64_t M) { return M * row_stride_bytes<D, XK>(W); },
        [](const PackedMatrix& W, const void* x, int64_t M, void* s) {
          prepare_x<D, XK>(W, x, M, static_cast<uint8_t*>(s));
        },
        [](const PackedMatrix& W, const void* s, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
          qmm_t<D, XK>(W, static_cast<const uint8_t*>(s), M, y, ldy, n0, n1);
        },
        kGemmMinRows,
    };
    return &k;
  }
};

template <int BITS, ScalarKind XK, bool DEQUANTIZED>
struct Amx {
  static const DotQmmT* get() {
    static const DotQmmT k{
        amx_scratch_bytes<XK>,
        [](const PackedMatrix& W, const void* x, int64_t M, void* s) {
          amx_prepare_x<BITS, XK>(W, x, M, static_cast<uint8_t*>(s));
        },
        [](const PackedMatrix& W, const void* s, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
          amx_qmm_t<BITS, XK, DEQUANTIZED>(W, static_cast<const uint8_t*>(s), M, y, ldy, n0, n1);
        },
        DEQUANTIZED ? kAmxGemmMinRows : std::numeric_limits<int64_t>::max(),
    };
    return &k;
  }
};
template <int BITS, ScalarKind XK>
using ExactAmx = Amx<BITS, XK, false>;
template <int BITS, ScalarKind XK>
using DequantizedAmx = Amx<BITS, XK, true>;

template <template <int, ScalarKind> class Kernels, ScalarKind XK>
const DotQmmT* for_bits(int bits) {
  return with_bits(bits, [](auto bits_tag) { return Kernels<decltype(bits_tag)::value, XK>::get(); });
}

}  // namespace

void dequantize_f32(const PackedMatrix& W, int64_t r0, int64_t r1, float* out) { dequantize(W, r0, r1, out); }
void dequantize_bf16(const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out) { dequantize(W, r0, r1, out); }

const DotQmmT* kernels(int bits, ScalarKind x_kind) {
  switch (x_kind) {
    case ScalarKind::bf16: return for_bits<Dot, ScalarKind::bf16>(bits);
    case ScalarKind::f16: return for_bits<Dot, ScalarKind::f16>(bits);
    default: return nullptr;
  }
}

bool amx_available() {
  // CPUID leaf 7 EDX: bit 22 AMX-BF16, bit 24 AMX-TILE (GCC 12's __builtin_cpu_supports knows neither).
  static const bool ok = [] {
    unsigned eax, ebx, ecx, edx;
    constexpr unsigned kAmx = (1u << 22) | (1u << 24);
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx & kAmx) == kAmx && request_amx();
  }();
  return ok;
}

const DotQmmT* amx_kernels(int bits, ScalarKind x_kind, int64_t rows) {
  switch (x_kind) {
    case ScalarKind::bf16:
      return rows >= kAmxDequantizedMinRows ? for_bits<DequantizedAmx, ScalarKind::bf16>(bits)
                                            : for_bits<ExactAmx, ScalarKind::bf16>(bits);
    case ScalarKind::f16: return for_bits<ExactAmx, ScalarKind::f16>(bits);
    case ScalarKind::f32: return for_bits<ExactAmx, ScalarKind::f32>(bits);
    default: return nullptr;
  }
}

}  // namespace metalq::cpu::avx512_bf16

#endif
