// Templates behind KernelTable, compiled once per instruction set. The including file defines
//   METALQ_ISA     namespace of this variant (generic, avx2)
//   METALQ_VW      float lanes per vector (8 or 16)
//   METALQ_TARGET  compiler target string, or leaves it undefined for the baseline.
// Only standard headers are included, and before the target region: inline code of a third-party
// header compiled here for AVX2 could otherwise be picked by the linker for every caller.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "fp_format.h"
#include "kernels.h"
#include "params.h"

// Every function below carries the variant's target attribute (a `#pragma GCC target` region does
// not reliably reach template instantiations).
#ifdef METALQ_TARGET
#define METALQ_FN __attribute__((target(METALQ_TARGET)))
#else
#define METALQ_FN
#endif

namespace metalq::cpu::METALQ_ISA {
namespace {

constexpr int VW = METALQ_VW;
typedef float fvec __attribute__((vector_size(VW * 4)));
typedef int32_t ivec __attribute__((vector_size(VW * 4)));
typedef uint32_t uvec __attribute__((vector_size(VW * 4)));
typedef uint8_t bytes_in __attribute__((vector_size(16)));
typedef uint8_t bytes_lane __attribute__((vector_size(VW * 4)));
typedef uint16_t halves __attribute__((vector_size(VW * 2)));

METALQ_FN inline fvec splat(float v) { return fvec{} + v; }

METALQ_FN inline float hsum(fvec v) {
  float s = 0.f;
  for (int j = 0; j < VW; ++j) s += v[j];
  return s;
}

template <ScalarKind K>
METALQ_FN inline float to_float(const void* p, int64_t i) {
  if constexpr (K == ScalarKind::f32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (K == ScalarKind::bf16) {
    uint32_t bits = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  } else if constexpr (K == ScalarKind::f16) {
    return static_cast<float>(static_cast<const float16_storage*>(p)[i]);
  } else if constexpr (K == ScalarKind::e8m0) {
    return e8m0_value(static_cast<const uint8_t*>(p)[i]);
  } else {
    return e4m3_value(static_cast<const uint8_t*>(p)[i]);
  }
}

// Values i .. i + VW of a table of affine biases.
template <ScalarKind K>
METALQ_FN inline fvec to_floats(const void* p, int64_t i) {
  fvec v;
  if constexpr (K == ScalarKind::f32) {
    std::memcpy(&v, static_cast<const float*>(p) + i, sizeof v);
  } else if constexpr (K == ScalarKind::bf16) {
    halves h;
    std::memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
    const uvec bits = __builtin_convertvector(h, uvec) << 16;
    std::memcpy(&v, &bits, sizeof v);
  } else {
    static_assert(K == ScalarKind::f16, "affine biases are float types");
    for (int j = 0; j < VW; ++j) v[j] = to_float<K>(p, i + j);
  }
  return v;
}

// Packed codes to the numbers the kernels multiply: the integer itself (affine), the E2M1 value
// doubled, or the E4M3 value in units of 2^-9; PackedMatrix::value_scale undoes the last two.
template <ValueCode C>
METALQ_FN inline float decode_code(uint32_t q) {
  if constexpr (C == ValueCode::uint) {
    return float(q);
  } else if constexpr (C == ValueCode::e2m1) {
    return 2.0f * e2m1_value(q);
  } else {
    const float v = float(e4m3_magnitude_units(q));
    return (q & 0x80u) ? -v : v;
  }
}

template <ValueCode C>
METALQ_FN inline fvec decode_codes(uvec q) {
  if constexpr (C == ValueCode::uint) {
    return __builtin_convertvector((ivec)q, fvec);
  } else {
    uvec magnitude, sign;
    if constexpr (C == ValueCode::e2m1) {
      magnitude = ((uvec{} + kE2M1Doubled) >> ((q & 7u) * 4u)) & 15u;
      sign = (q & 8u) << 28;
    } else {
      const uvec e = (q >> 3) & 15u, m = q & 7u;
      const uvec shift = (e > 0u ? e : uvec{} + 1u) - 1u;
      magnitude = (uvec)(e == 0u ? m : (m | 8u) << shift);
      sign = (q & 0x80u) << 24;
    }
    fvec v = __builtin_convertvector((ivec)magnitude, fvec);
    uvec bits;
    std::memcpy(&bits, &v, sizeof bits);
    bits |= sign;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
}

// Value k of a packed row, read bytewise so that no byte past the row is touched.
METALQ_FN inline uint32_t extract(const uint8_t* row, int64_t k, int bits) {
  int64_t bit = k * bits;
  uint32_t v = row[bit >> 3];
  if ((bit & 7) + bits > 8) v |= uint32_t(row[(bit >> 3) + 1]) << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1);
}

// Decoders turn one block of packed bytes into kSub float vectors. Lane j of sub-vector t holds
// value lane_value(t, j) of the block; callers permute x once instead of shuffling every weight.

// Powers of two: one packed word per 32-bit lane, sub-vector t takes each word's t-th field. The words
// are 32 bits, or 16 for 1 bit, so that a lane's values never span two groups (group sizes are >= 16).
template <int BITS, ValueCode C>
struct WordDecoder {
  static constexpr ValueCode kCode = C;
  static constexpr int kWordBits = BITS == 1 ? 16 : 32;
  static constexpr int kPerWord = kWordBits / BITS;
  static constexpr int kValues = VW * kPerWord;
  static constexpr int kBytes = VW * kWordBits / 8;
  static constexpr int kSub = kPerWord;
  static constexpr int kLaneStride = kPerWord;
  static constexpr int lane_value(int t, int j) { return j * kPerWord + t; }
  using Raw = uvec;
  METALQ_FN static Raw load(const uint8_t* p, const uint8_t*) {
    Raw w;
    if constexpr (kWordBits == 16) {
      halves h;
      std::memcpy(&h, p, sizeof h);
      w = __builtin_convertvector(h, uvec);
    } else {
      std::memcpy(&w, p, sizeof w);
    }
    return w;
  }
  METALQ_FN static fvec sub(const Raw& w, int t) {
    return decode_codes<C>((w >> (uint32_t)(t * BITS)) & ((1u << BITS) - 1));
  }
};

// Any width: VW consecutive values from VW*BITS/8 bytes. One byte shuffle gives each 32-bit lane the
// two bytes its value starts in (the upper two are don't-care: the shift is < 8 and the mask drops them).
template <int BITS, ValueCode C>
struct ByteDecoder {
  static constexpr ValueCode kCode = C;
  static constexpr int kValues = VW;
  static constexpr int kBytes = VW * BITS / 8;
  static constexpr int kSub = 1;
  static constexpr int kLaneStride = 1;
  static constexpr int lane_value(int, int j) { return j; }
  using Raw = fvec;
  static constexpr int source_byte(int i) { return ((i / 4) * BITS) / 8 + (i % 4 < 2 ? i % 4 : 0); }
  template <size_t... I>
  METALQ_FN static bytes_lane spread(bytes_in src, std::index_sequence<I...>) {
    return __builtin_shufflevector(src, src, source_byte(I)...);
  }
  // Reads 16 bytes when the buffer has them (one load), else exactly the block's bytes.
  METALQ_FN static Raw load(const uint8_t* p, const uint8_t* end) {
    static_assert(kBytes <= 16, "a block must fit one 16-byte load");
    bytes_in src;
    if (end - p >= 16) {
      std::memcpy(&src, p, 16);
    } else {
      src = bytes_in{};
      std::memcpy(&src, p, kBytes);
    }
    bytes_lane lanes = spread(src, std::make_index_sequence<VW * 4>());
    uvec words;
    std::memcpy(&words, &lanes, sizeof words);
    uvec shifts;
    for (int j = 0; j < VW; ++j) shifts[j] = (j * BITS) % 8;
    return decode_codes<C>((words >> shifts) & ((1u << BITS) - 1));
  }
  METALQ_FN static fvec sub(const Raw& q, int) { return q; }
};

template <int BITS, ValueCode C>
using FastDecoder = std::conditional_t<(32 % BITS == 0), WordDecoder<BITS, C>, ByteDecoder<BITS, C>>;

// Per-lane scales of block b of row `row` when a block spans several groups: lane j starts at value
// j*kLaneStride, so each group covers a run of group_size/kLaneStride lanes (at least one: a lane's
// values never span two groups).
template <int kRun, ScalarKind SK>
METALQ_FN inline fvec lane_scales_run(const void* table, int64_t first) {
  fvec s;
  for (int j = 0; j < VW; j += kRun) {
    const float v = to_float<SK>(table, first + j / kRun);
    for (int i = 0; i < kRun; ++i) s[j + i] = v;
  }
  return s;
}

template <class D, ScalarKind SK>
METALQ_FN inline fvec lane_scales(const PackedMatrix& W, const void* table, int64_t row, int64_t b) {
  const int64_t first = row * W.groups_per_row() + ((b * D::kValues) >> W.group_shift());
  // A compile-time run length lets the compiler build the vector from broadcasts and blends.
  switch (W.group_size / D::kLaneStride) {
    case 1: return lane_scales_run<1, SK>(table, first);
    case 2: return lane_scales_run<2, SK>(table, first);
    case 4: return lane_scales_run<4, SK>(table, first);
    case 8: return lane_scales_run<8, SK>(table, first);
    default: return lane_scales_run<VW, SK>(table, first);
  }
}

// ---- x @ W.T -------------------------------------------------------------------------------------
// Scratch per row of x: K floats of x in decoder lane order (full blocks, then the tail as is),
// then one sum of x per group for the bias term: sum_k x_k (s q_k + b) = s sum_k x_k q_k + b sum_k x_k.

template <class D>
METALQ_FN void prepare_x(const PackedMatrix& W, const float* x, int64_t M, float* scratch) {
  const int64_t K = W.cols, G = W.groups_per_row(), blocks = K / D::kValues;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float* xp = scratch + m * (K + G);
    for (int64_t b = 0; b < blocks; ++b)
      for (int t = 0; t < D::kSub; ++t)
        for (int j = 0; j < VW; ++j) xp[b * D::kValues + t * VW + j] = xm[b * D::kValues + D::lane_value(t, j)];
    for (int64_t k = blocks * D::kValues; k < K; ++k) xp[k] = xm[k];
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * W.group_size; k < (g + 1) * W.group_size; ++k) s += xm[k];
      xp[K + g] = s;
    }
  }
}

// Block b of a row against MR rows of x (scratch, row stride `stride`): the products of sub-vector t go
// to chain (u * kSub + t) % kChains of d (always inlined, so that d stays in registers).
template <class D, int MR, int kChains>
METALQ_FN __attribute__((always_inline)) inline void block_dot(const uint8_t* wrow, const uint8_t* end,
                                                               const float* scratch, int64_t stride, int64_t b, int u,
                                                               fvec (&d)[MR][kChains]) {
  auto raw = D::load(wrow + b * D::kBytes, end);
  for (int t = 0; t < D::kSub; ++t) {
    const fvec q = D::sub(raw, t);
    const int c = (u * D::kSub + t) % kChains;
    for (int m = 0; m < MR; ++m) {
      fvec xv;
      std::memcpy(&xv, scratch + m * stride + b * D::kValues + t * VW, sizeof xv);
      d[m][c] += xv * q;
    }
  }
}

// One row n of W against MR rows of x. The row is walked in segments that share one scale: a group
// when a block fits in a group (the scale multiplies once per group), else a single block (with
// per-lane scales). Within a segment the products go to kChains independent accumulators per row of
// x, so consecutive FMAs do not wait on each other's latency.
template <class D, ScalarKind SK, int MR>
METALQ_FN inline void row_dot(const PackedMatrix& W, int64_t n, const float* scratch, float* out) {
  constexpr int kChains = MR == 1 ? 4 : (MR == 2 ? 2 : 1);
  constexpr int kUnroll = D::kSub >= kChains ? 1 : kChains / D::kSub;  // blocks per step
  const int64_t K = W.cols, G = W.groups_per_row(), blocks = K / D::kValues, stride = K + G;
  const bool per_group = D::kValues <= W.group_size;
  const int64_t seg_blocks = per_group ? W.group_size / D::kValues : 1;
  const int64_t segments = blocks / seg_blocks;  // blocks is a multiple of seg_blocks: K % group_size == 0
  const uint8_t* wrow = W.w + n * W.row_bytes();
  fvec acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = fvec{};
  for (int64_t seg = 0; seg < segments; ++seg) {
    fvec d[MR][kChains];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < kChains; ++c) d[m][c] = fvec{};
    const int64_t b0 = seg * seg_blocks;
    if (seg_blocks >= kUnroll) {  // then a multiple of kUnroll: both are powers of two
      for (int64_t bi = 0; bi < seg_blocks; bi += kUnroll)
        for (int u = 0; u < kUnroll; ++u) block_dot<D, MR, kChains>(wrow, W.end(), scratch, stride, b0 + bi + u, u, d);
    } else {  // only a group of 16 of byte-decoded blocks (kUnroll = 4 for one row of x): its 2 blocks
      block_dot<D, MR, kChains>(wrow, W.end(), scratch, stride, b0, 0, d);
      block_dot<D, MR, kChains>(wrow, W.end(), scratch, stride, b0 + 1, 1, d);
    }
    const fvec s = per_group ? splat(to_float<SK>(W.scales, n * G + seg))
                             : lane_scales<D, SK>(W, W.scales, n, seg);
    for (int m = 0; m < MR; ++m) {
      fvec dm = d[m][0];
      for (int c = 1; c < kChains; ++c) dm += d[m][c];
      acc[m] += s * dm;
    }
  }
  // The bias term, VW groups at a time (the last G % VW below).
  int64_t g = 0;
  if constexpr (D::kCode == ValueCode::uint) {
    for (; g + VW <= G; g += VW) {
      const fvec bias = to_floats<SK>(W.biases, n * G + g);
      for (int m = 0; m < MR; ++m) {
        fvec sums;
        std::memcpy(&sums, scratch + m * stride + K + g, sizeof sums);
        acc[m] += bias * sums;
      }
    }
  }
  float r[MR];
  for (int m = 0; m < MR; ++m) r[m] = hsum(acc[m]);
  for (int64_t k = blocks * D::kValues; k < K; ++k) {
    float sq = to_float<SK>(W.scales, n * G + k / W.group_size) * decode_code<D::kCode>(extract(wrow, k, W.bits));
    for (int m = 0; m < MR; ++m) r[m] += scratch[m * stride + k] * sq;
  }
  if constexpr (D::kCode == ValueCode::uint) {
    for (; g < G; ++g) {
      const float bias = to_float<SK>(W.biases, n * G + g);
      for (int m = 0; m < MR; ++m) r[m] += bias * scratch[m * stride + K + g];
    }
  } else {
    for (int m = 0; m < MR; ++m) r[m] *= W.value_scale;
  }
  for (int m = 0; m < MR; ++m) out[m] = r[m];
}

// row_dot for `rows` <= MR rows of x, with a compile-time row count.
template <class D, ScalarKind SK, int MR>
METALQ_FN inline void row_dot_upto(const PackedMatrix& W, int64_t n, const float* scratch, int64_t rows, float* out) {
  if constexpr (MR > 1) {
    if (rows < MR) return row_dot_upto<D, SK, MR - 1>(W, n, scratch, rows, out);
  }
  row_dot<D, SK, MR>(W, n, scratch, out);
}

template <class D, ScalarKind SK>
METALQ_FN void qmm_t_rows(const PackedMatrix& W, const float* scratch, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  // Rows of x sharing one decode of W: 4 rows of accumulators (x 1 chain) fill the 16 vector registers.
  constexpr int kRows = 4;
  const int64_t stride = W.cols + W.groups_per_row();
  float r[kRows];
  for (int64_t n = n0; n < n1; ++n) {
    prefetch_ahead(W, n);
    for (int64_t m = 0; m < M; m += kRows) {
      const float* s = scratch + m * stride;
      const int64_t rows = M - m < kRows ? M - m : kRows;
      row_dot_upto<D, SK, kRows>(W, n, s, rows, r);
      for (int64_t i = 0; i < rows; ++i) y[(m + i) * ldy + n] = r[i];
    }
  }
}

// ---- x @ W (W is [K, N], quantized along N) -----------------------------------------------------

template <class D, ScalarKind SK>
METALQ_FN void qmm_n_cols(const PackedMatrix& W, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  const int64_t K = W.rows, N = W.cols, G = W.groups_per_row(), rb = W.row_bytes();
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    int64_t n = n0;
    while (n < n1) {
      if (n % D::kValues == 0 && n + D::kValues <= n1) {
        const int64_t b = n / D::kValues;
        fvec acc[D::kSub];
        for (int t = 0; t < D::kSub; ++t) acc[t] = fvec{};
        for (int64_t k = 0; k < K; ++k) {
          auto raw = D::load(W.w + k * rb + b * D::kBytes, W.end());
          fvec xs = D::kValues <= W.group_size
                        ? splat(xm[k] * to_float<SK>(W.scales, k * G + n / W.group_size))
                        : splat(xm[k]) * lane_scales<D, SK>(W, W.scales, k, b);
          for (int t = 0; t < D::kSub; ++t) acc[t] += xs * D::sub(raw, t);
        }
        for (int t = 0; t < D::kSub; ++t)
          for (int j = 0; j < VW; ++j) ym[n + D::lane_value(t, j)] = acc[t][j];
        n += D::kValues;
      } else {
        float acc = 0.f;
        const int64_t g = n / W.group_size;
        for (int64_t k = 0; k < K; ++k)
          acc += xm[k] * (to_float<SK>(W.scales, k * G + g) * decode_code<D::kCode>(extract(W.w + k * rb, n, W.bits)));
        ym[n] = acc;
        ++n;
      }
    }
    if constexpr (D::kCode == ValueCode::uint) {
      // The bias term sum_k x_k b[k, g], once per group that [n0, n1) touches, VW groups at a time.
      const int64_t gs = W.group_size, g1 = (n1 + gs - 1) / gs;
      for (int64_t g = n0 / gs; g < g1; g += VW) {
        const int64_t count = g1 - g < VW ? g1 - g : VW;
        float bsum[VW];
        if (count == VW) {
          fvec v = fvec{};
          for (int64_t k = 0; k < K; ++k) v += splat(xm[k]) * to_floats<SK>(W.biases, k * G + g);
          std::memcpy(bsum, &v, sizeof v);
        } else {
          for (int64_t j = 0; j < count; ++j) {
            float v = 0.f;
            for (int64_t k = 0; k < K; ++k) v += xm[k] * to_float<SK>(W.biases, k * G + g + j);
            bsum[j] = v;
          }
        }
        for (int64_t j = 0; j < count; ++j) {
          const int64_t lo = (g + j) * gs > n0 ? (g + j) * gs : n0, hi = (g + j + 1) * gs < n1 ? (g + j + 1) * gs : n1;
          for (int64_t c = lo; c < hi; ++c) ym[c] += bsum[j];
        }
      }
    } else {
      for (int64_t c = n0; c < n1; ++c) ym[c] *= W.value_scale;
    }
  }
}

// ---- dequantize into a float or bfloat16 tile (the large-M path feeds these to a BLAS GEMM) -------

METALQ_FN inline void store(float* out, fvec v) { std::memcpy(out, &v, sizeof v); }

METALQ_FN inline void store(uint16_t* out, fvec v) {  // round to nearest even, as torch's float -> bfloat16
  uvec u;
  std::memcpy(&u, &v, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  for (int j = 0; j < VW; ++j) out[j] = uint16_t(u[j]);
}

template <int BITS, ValueCode C, ScalarKind SK, class Out>
METALQ_FN void dequantize_rows(const PackedMatrix& W, int64_t r0, int64_t r1, Out* out) {
  using D = ByteDecoder<BITS, C>;
  const int64_t G = W.groups_per_row(), per_group = W.group_size / D::kValues;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = W.w + r * W.row_bytes();
    Out* orow = out + (r - r0) * W.cols;
    for (int64_t g = 0; g < G; ++g) {
      fvec s, bias;
      if constexpr (C == ValueCode::uint) {
        s = splat(to_float<SK>(W.scales, r * G + g));
        bias = splat(to_float<SK>(W.biases, r * G + g));
      } else {
        s = splat(to_float<SK>(W.scales, r * G + g) * W.value_scale);
        bias = fvec{};
      }
      for (int64_t i = 0; i < per_group; ++i) {
        const int64_t blk = g * per_group + i;
        store(orow + blk * D::kValues, s * D::load(wrow + blk * D::kBytes, W.end()) + bias);
      }
    }
  }
}

// ---- quantize: MLX's CPU rule, so checkpoints are bit-identical to mx.quantize -------------------

struct GroupParams {
  float scale;
  float bias;
};

METALQ_FN inline GroupParams affine_group_params(float w_min, float w_max, int bits) {
  if (bits == 1) return {std::max(w_max - w_min, kQuantizeEps), w_min};
  // The extreme of larger magnitude becomes the bias (exactly representable, q = 0) and the scale is
  // nudged so that 0.0 falls on an integer level; scales are negative when that extreme is the max.
  const float n_bins = float((1 << bits) - 1);
  float scale = std::max((w_max - w_min) / n_bins, kQuantizeEps);
  const bool min_is_edge = std::fabs(w_min) > std::fabs(w_max);
  scale = min_is_edge ? scale : -scale;
  const float edge = min_is_edge ? w_min : w_max;
  const float q0 = std::rint(edge / scale);
  if (q0 == 0.f) return {scale, 0.f};
  return {edge / q0, edge};
}

// One row of K finite values: q = clamp(rint((w - bias) / scale), 0, n_bins) per group, with IEEE
// division (never a reciprocal) so every value rounds exactly as MLX's scalar loop does.
METALQ_FN void quantize_row(const float* w, int64_t K, int group_size, int bits, uint8_t* q, float* scales,
                            float* biases) {
  const float n_bins = float((1 << bits) - 1);
  // Adding and subtracting 1.5 * 2^23 rounds to nearest even for |v| < 2^22; v is clamped first.
  const fvec magic = splat(12582912.f), lo = splat(-1.f), hi = splat(n_bins + 1.f), top = splat(n_bins);
  for (int64_t g = 0; g < K / group_size; ++g) {
    const float* wg = w + g * group_size;
    fvec vmin, vmax;
    std::memcpy(&vmin, wg, sizeof vmin);
    vmax = vmin;
    for (int i = VW; i < group_size; i += VW) {
      fvec v;
      std::memcpy(&v, wg + i, sizeof v);
      vmin = v < vmin ? v : vmin;
      vmax = v > vmax ? v : vmax;
    }
    float w_min = vmin[0], w_max = vmax[0];
    for (int j = 1; j < VW; ++j) w_min = std::min(w_min, vmin[j]), w_max = std::max(w_max, vmax[j]);
    const GroupParams p = affine_group_params(w_min, w_max, bits);
    scales[g] = p.scale;
    biases[g] = p.bias;
    const fvec scale = splat(p.scale), bias = splat(p.bias);
    for (int i = 0; i < group_size; i += VW) {
      fvec v;
      std::memcpy(&v, wg + i, sizeof v);
      v = (v - bias) / scale;
      v = v < lo ? lo : (v > hi ? hi : v);
      v = (v + magic) - magic;
      v = v < 0.f ? fvec{} : (v > top ? top : v);
      const ivec qi = __builtin_convertvector(v, ivec);
      for (int j = 0; j < VW; ++j) q[g * group_size + i + j] = uint8_t(qi[j]);
    }
  }
}

// ---- the table: bits and scale kind become template arguments here ------------------------------

template <template <int, ValueCode, ScalarKind> class F, class... Args>
METALQ_FN void dispatch(const PackedMatrix& W, Args... args) {
  // The fp modes: mxfp4 (E2M1, E8M0 scales), nvfp4 (E2M1, E4M3 scales), mxfp8 (E4M3, E8M0 scales).
  if (W.code == ValueCode::e4m3) return F<8, ValueCode::e4m3, ScalarKind::e8m0>::run(W, args...);
  if (W.code == ValueCode::e2m1) {
    if (W.kind == ScalarKind::e4m3) return F<4, ValueCode::e2m1, ScalarKind::e4m3>::run(W, args...);
    return F<4, ValueCode::e2m1, ScalarKind::e8m0>::run(W, args...);
  }
  auto by_kind = [&](auto bits_tag) {
    constexpr int B = decltype(bits_tag)::value;
    constexpr ValueCode U = ValueCode::uint;
    switch (W.kind) {
      case ScalarKind::f32: return F<B, U, ScalarKind::f32>::run(W, args...);
      case ScalarKind::f16: return F<B, U, ScalarKind::f16>::run(W, args...);
      default: return F<B, U, ScalarKind::bf16>::run(W, args...);
    }
  };
  switch (W.bits) {
    case 1: return by_kind(std::integral_constant<int, 1>{});
    case 2: return by_kind(std::integral_constant<int, 2>{});
    case 3: return by_kind(std::integral_constant<int, 3>{});
    case 4: return by_kind(std::integral_constant<int, 4>{});
    case 5: return by_kind(std::integral_constant<int, 5>{});
    case 6: return by_kind(std::integral_constant<int, 6>{});
    default: return by_kind(std::integral_constant<int, 8>{});  // bits were validated by the op
  }
}

template <int B, ValueCode C, ScalarKind SK>
struct QmmT {
  METALQ_FN static void run(const PackedMatrix& W, const float* x, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
    qmm_t_rows<FastDecoder<B, C>, SK>(W, x, M, y, ldy, n0, n1);
  }
};
template <int B, ValueCode C, ScalarKind SK>
struct PrepareX {
  METALQ_FN static void run(const PackedMatrix& W, const float* x, int64_t M, float* scratch) {
    prepare_x<FastDecoder<B, C>>(W, x, M, scratch);
  }
};
template <int B, ValueCode C, ScalarKind SK>
struct QmmN {
  METALQ_FN static void run(const PackedMatrix& W, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
    qmm_n_cols<FastDecoder<B, C>, SK>(W, x, M, y, n0, n1);
  }
};
template <int B, ValueCode C, ScalarKind SK>
struct DequantizeF32 {
  METALQ_FN static void run(const PackedMatrix& W, int64_t r0, int64_t r1, float* out) { dequantize_rows<B, C, SK>(W, r0, r1, out); }
};
template <int B, ValueCode C, ScalarKind SK>
struct DequantizeBF16 {
  METALQ_FN static void run(const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out) { dequantize_rows<B, C, SK>(W, r0, r1, out); }
};

}  // namespace

const KernelTable& table() {
  static const KernelTable t{
      METALQ_ISA_NAME,
      [](const PackedMatrix& W, const float* x, int64_t M, float* scratch) { dispatch<PrepareX>(W, x, M, scratch); },
      [](const PackedMatrix& W, const float* s, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
        dispatch<QmmT>(W, s, M, y, ldy, n0, n1);
      },
      [](const PackedMatrix& W, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
        dispatch<QmmN>(W, x, M, y, n0, n1);
      },
      [](const PackedMatrix& W, int64_t r0, int64_t r1, float* out) { dispatch<DequantizeF32>(W, r0, r1, out); },
      [](const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out) { dispatch<DequantizeBF16>(W, r0, r1, out); },
      quantize_row,
      [](const PackedMatrix&, int64_t) -> const DotQmmT* { return nullptr; },
  };
  return t;
}

}  // namespace metalq::cpu::METALQ_ISA

#undef METALQ_FN
