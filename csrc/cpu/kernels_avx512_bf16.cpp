// x @ W.T for bfloat16 activations on CPUs with AVX512-BF16 (bits 1, 2, 4, 8).
//
// A block of W is read as 32 uint16 lanes (64 bytes; 32 bytes for 1 bit, a byte per lane); each lane
// holds 16/bits (1 bit: 8) consecutive values, and sub-vector t takes every lane's t-th field. One
// vpermw maps the fields straight to bfloat16 (the table only looks at the low 5 bits, so no mask is
// needed) and one vdpbf16ps multiplies 32 of them with x and adds pairs into 16 float accumulators:
// 3 instructions per 32 weights, against 4 per 8 for the float path. bfloat16 holds the integers
// q < 32 and the bfloat16 activations exactly, so the products are exact and accumulate in float32. An
// 8-bit value q = lo + 16 hi takes two lookups (lo and 16 hi are exact too) and two dot products. x is
// laid out once per call in the lane order.
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>
#include <vector>

#define METALQ_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,bmi2")))

namespace metalq::cpu::avx512_bf16 {
namespace {

constexpr int kLanes16 = 32;  // uint16 lanes per block

inline float bf16_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Rounds to nearest even, as torch does.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

template <int BITS>
struct Layout {
  // A float lane sums the values of two uint16 lanes: a byte each for 1 bit keeps them (16 values) in
  // one group for every group size.
  static constexpr int kLaneBits = BITS == 1 ? 8 : 16;
  static constexpr int kPerLane = kLaneBits / BITS;        // values per uint16 lane
  static constexpr int kValues = kLanes16 * kPerLane;      // values per block
  static constexpr int kBytes = kLanes16 * kLaneBits / 8;  // bytes per block
  static constexpr int kSub = kPerLane;
  static constexpr int value(int t, int j) { return j * kPerLane + t; }  // value of lane j in sub-vector t
  METALQ_FN static __m512i load(const uint8_t* p) {
    if constexpr (kLaneBits == 8) return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_loadu_si512(p);
  }
};

// Scratch per row of x: K bfloat16 values in lane order (full blocks, then the tail as is), then the
// per-group sums of x as floats, padded with zeros to a multiple of 16 groups.
int64_t padded_groups(const PackedMatrix& W) { return (W.groups_per_row() + 15) / 16 * 16; }
int64_t row_stride_bytes(const PackedMatrix& W) { return W.cols * 2 + padded_groups(W) * 4; }

template <int BITS>
void prepare_x(const PackedMatrix& W, const uint16_t* x, int64_t M, uint8_t* scratch) {
  using L = Layout<BITS>;
  const int64_t K = W.cols, blocks = K / L::kValues;
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xm = x + m * K;
    uint16_t* xs = reinterpret_cast<uint16_t*>(scratch + m * row_stride_bytes(W));
    for (int64_t b = 0; b < blocks; ++b)
      for (int t = 0; t < L::kSub; ++t)
        for (int j = 0; j < kLanes16; ++j) xs[b * L::kValues + t * kLanes16 + j] = xm[b * L::kValues + L::value(t, j)];
    for (int64_t k = blocks * L::kValues; k < K; ++k) xs[k] = xm[k];
    std::vector<float> sums(padded_groups(W), 0.f);
    for (int64_t g = 0; g < W.groups_per_row(); ++g)
      for (int64_t k = g * W.group_size; k < (g + 1) * W.group_size; ++k) sums[g] += bf16_to_float(xm[k]);
    std::memcpy(scratch + m * row_stride_bytes(W) + K * 2, sums.data(), sums.size() * 4);
  }
}

// Up to 16 bfloat16 values from p (count of them) as floats.
METALQ_FN inline __m512 load_bf16(const uint16_t* p, int64_t count) {
  const __mmask16 mask = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// The t-th field of every uint16 lane of w as bfloat16: a lookup of its low 5 bits in `lut`.
METALQ_FN inline __m512bh field(__m512i w, int shift, __m512i lut) {
  return (__m512bh)_mm512_permutexvar_epi16(_mm512_srl_epi16(w, _mm_cvtsi32_si128(shift)), lut);
}

template <int BITS, int MR>
METALQ_FN void row_dot(const PackedMatrix& W, int64_t n, const uint8_t* scratch, const __m512i lut,
                       const __m512i lut_high, const __m512i lane_group, float* out) {
  using L = Layout<BITS>;
  const int64_t K = W.cols, G = W.groups_per_row(), blocks = K / L::kValues, stride = row_stride_bytes(W);
  const uint8_t* wrow = W.w + n * W.row_bytes();
  const uint16_t* scales = static_cast<const uint16_t*>(W.scales) + n * G;
  const uint16_t* biases = static_cast<const uint16_t*>(W.biases) + n * G;
  const int shift = W.group_shift();
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i w = L::load(wrow + b * L::kBytes);
    __m512 d[MR];
    for (int m = 0; m < MR; ++m) d[m] = _mm512_setzero_ps();
    for (int t = 0; t < L::kSub; ++t) {
      const __m512bh q = field(w, t * BITS, lut);
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_loadu_si512(scratch + m * stride + (b * L::kValues + t * kLanes16) * 2);
        d[m] = _mm512_dpbf16_ps(d[m], q, (__m512bh)xv);
        if constexpr (BITS == 8) d[m] = _mm512_dpbf16_ps(d[m], field(w, t * BITS + 4, lut_high), (__m512bh)xv);
      }
    }
    // Float lane i sums the values of uint16 lanes 2i and 2i+1; lane_group maps it to its group.
    const int64_t first = (b * L::kValues) >> shift;
    const __m512 s = _mm512_permutexvar_ps(lane_group, load_bf16(scales + first, G - first));
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(s, d[m], acc[m]);
  }
  // Bias term: sum_g biases[g] * (sum of x over group g), 16 groups at a time.
  for (int64_t g = 0; g < G; g += 16) {
    const __m512 bias = load_bf16(biases + g, G - g);
    for (int m = 0; m < MR; ++m) {
      const __m512 xsum = _mm512_loadu_ps(reinterpret_cast<const float*>(scratch + m * stride + K * 2) + g);
      acc[m] = _mm512_fmadd_ps(bias, xsum, acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(acc[m]);
  for (int64_t k = blocks * L::kValues; k < K; ++k) {  // tail shorter than a block
    const int64_t bit = k * BITS;
    const float sq = bf16_to_float(scales[k >> shift]) * float((wrow[bit >> 3] >> (bit & 7)) & ((1 << BITS) - 1));
    for (int m = 0; m < MR; ++m)
      out[m] += sq * bf16_to_float(reinterpret_cast<const uint16_t*>(scratch + m * stride)[k]);
  }
}

template <int BITS, int MR>
METALQ_FN inline void row_dot_upto(const PackedMatrix& W, int64_t n, const uint8_t* scratch, int64_t rows,
                                   const __m512i lut, const __m512i lut_high, const __m512i lane_group, float* out) {
  if constexpr (MR > 1) {
    if (rows < MR) return row_dot_upto<BITS, MR - 1>(W, n, scratch, rows, lut, lut_high, lane_group, out);
  }
  row_dot<BITS, MR>(W, n, scratch, lut, lut_high, lane_group, out);
}

template <int BITS>
METALQ_FN void qmm_t(const PackedMatrix& W, const uint8_t* scratch, int64_t M, float* y, int64_t ldy, int64_t n0,
                     int64_t n1) {
  using L = Layout<BITS>;
  constexpr int kRows = 8;  // rows of x per pass: 8 accumulators + 8 partial sums fit the 32 registers
  // Field values as bfloat16; 8-bit values are split into nibbles, the high one weighted by 16.
  constexpr int kFieldMask = BITS == 8 ? 15 : (1 << BITS) - 1;
  alignas(64) uint16_t low[32], high[32];
  for (int i = 0; i < 32; ++i) {
    low[i] = float_to_bf16(float(i & kFieldMask));
    high[i] = float_to_bf16(16.f * float(i & kFieldMask));
  }
  alignas(64) int32_t groups[16];
  for (int i = 0; i < 16; ++i) groups[i] = (2 * i * L::kPerLane) >> W.group_shift();
  const __m512i lut = _mm512_load_si512(low), lut_high = _mm512_load_si512(high);
  const __m512i lane_group = _mm512_load_si512(groups);
  float r[kRows];
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; m += kRows) {
      const int64_t rows = M - m < kRows ? M - m : kRows;
      row_dot_upto<BITS, kRows>(W, n, scratch + m * row_stride_bytes(W), rows, lut, lut_high, lane_group, r);
      for (int64_t i = 0; i < rows; ++i) y[(m + i) * ldy + n] = r[i];
    }
}

template <int BITS>
const Bf16QmmT& kernels_for() {
  static const Bf16QmmT k{
      [](const PackedMatrix& W, int64_t M) { return M * row_stride_bytes(W); },
      [](const PackedMatrix& W, const uint16_t* x, int64_t M, void* s) {
        prepare_x<BITS>(W, x, M, static_cast<uint8_t*>(s));
      },
      [](const PackedMatrix& W, const void* s, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1) {
        qmm_t<BITS>(W, static_cast<const uint8_t*>(s), M, y, ldy, n0, n1);
      },
  };
  return k;
}

}  // namespace

const Bf16QmmT* kernels(int bits) {
  switch (bits) {
    case 1: return &kernels_for<1>();
    case 2: return &kernels_for<2>();
    case 4: return &kernels_for<4>();
    case 8: return &kernels_for<8>();
    default: return nullptr;
  }
}

}  // namespace metalq::cpu::avx512_bf16

#endif
