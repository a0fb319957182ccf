// MLX's floating-point quantization modes (mxfp4, nvfp4, mxfp8): the element and scale encodings
// and the per-group rounding rules of mx.quantize / mx.dequantize (mlx 0.32). Shared by the host
// (csrc/) and the Metal kernels, so that every device produces the same bits.
//
// A mode packs E2M1 (4-bit) or E4M3 (8-bit) codes LSB-first into uint32 words and stores one uint8
// scale per group: E8M0 (a power of two) for the mx modes, E4M3 for nvfp4. There are no biases.
// Values are `element(code) * scale`, times `global_scale / (448 * 6)` for nvfp4 with a global scale.
#pragma once

#include "params.h"

#ifdef __METAL__
#include <metal_stdlib>
#define METALQ_FP_FN inline
#define METALQ_AS_UINT(x) metal::as_type<uint32_t>(x)
#define METALQ_AS_FLOAT(x) metal::as_type<float>(x)
#define METALQ_RINT(x) metal::rint(x)
#define METALQ_FABS(x) metal::fabs(x)
#define METALQ_DIV(a, b) metal::precise::divide(a, b)  // IEEE division, as on the host
#else
#include <cmath>
#include <cstdint>
#define METALQ_FP_FN inline
#define METALQ_AS_UINT(x) __builtin_bit_cast(uint32_t, x)
#define METALQ_AS_FLOAT(x) __builtin_bit_cast(float, x)
#define METALQ_RINT(x) std::rint(x)
#define METALQ_FABS(x) std::fabs(x)
#define METALQ_DIV(a, b) ((a) / (b))
#endif

namespace metalq {

// The modes, as the host and the kernels number them.
enum FpMode : int { kMxfp4 = 0, kNvfp4 = 1, kMxfp8 = 2 };

METALQ_FP_FN constexpr int fp_bits(int mode) { return mode == kMxfp8 ? 8 : 4; }
METALQ_FP_FN constexpr int fp_group_size(int mode) { return mode == kNvfp4 ? 16 : 32; }

METALQ_CONST float kE2M1Max = 6.0f;
METALQ_CONST float kE4M3Max = 448.0f;
// nvfp4's global scale maps the largest group scale to 448 * 6 (E4M3 max times E2M1 max).
METALQ_CONST float kNvfp4GlobalRange = 2688.0f;

// ---- decoding -----------------------------------------------------------------------------------

// E2M1 magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} doubled, one nibble per 3-bit code: integers, so the
// vectorised CPU decoder reads them with a shift (and folds the 1/2 into the scale).
METALQ_CONST uint32_t kE2M1Doubled = 0xC8643210u;

METALQ_FP_FN float e2m1_value(uint32_t code) {
  const float v = float((kE2M1Doubled >> ((code & 7u) * 4u)) & 15u) * 0.5f;
  return (code & 8u) ? -v : v;
}

// E4M3 (bias 7, no infinities, 0x7F / 0xFF are NaN): a multiple of 2^-9 with an integer magnitude.
METALQ_FP_FN uint32_t e4m3_magnitude_units(uint32_t code) {  // |value| * 2^9
  const uint32_t e = (code >> 3) & 15u, m = code & 7u;
  return e == 0 ? m : (8u | m) << (e - 1);
}

METALQ_FP_FN float e4m3_value(uint32_t code) {
  if ((code & 0x7Fu) == 0x7Fu) return METALQ_AS_FLOAT(0x7FC00000u);
  const float v = float(e4m3_magnitude_units(code)) * (1.0f / 512.0f);
  return (code & 0x80u) ? -v : v;
}

// E8M0: 2^(code - 127), with code 0 meaning 2^-127 (a float subnormal) and 0xFF infinity.
METALQ_FP_FN float e8m0_value(uint32_t code) {
  return METALQ_AS_FLOAT(code == 0 ? 0x00400000u : code << 23);
}

METALQ_FP_FN float fp_element_value(int mode, uint32_t code) {
  return mode == kMxfp8 ? e4m3_value(code) : e2m1_value(code);
}

METALQ_FP_FN float fp_scale_value(int mode, uint32_t code) {
  return mode == kNvfp4 ? e4m3_value(code) : e8m0_value(code);
}

// ---- encoding -----------------------------------------------------------------------------------

// Round to nearest E4M3, ties to even, saturating at +-448 (non-finite values saturate too).
METALQ_FP_FN uint32_t e4m3_encode(float f) {
  uint32_t u = METALQ_AS_UINT(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  u &= 0x7FFFFFFFu;
  if (u >= 0x43E80000u) return sign | 0x7Eu;  // >= 464, halfway from 448 to the NaN code
  if (u < 0x3C800000u) {                     // below 2^-6: subnormal, a multiple of 2^-9
    return sign | uint32_t(METALQ_RINT(METALQ_AS_FLOAT(u) * 512.0f));
  }
  // Keep 3 mantissa bits, rounding to nearest even, then rebias the exponent from 127 to 7.
  u += 0x7FFFFu + ((u >> 20) & 1u);
  return sign | ((u >> 20) - (120u << 3));
}

// E2M1 code of y as MLX 0.32 picks it: the first code (in code order 0..15) whose value is nearest,
// distances in float. So ties go toward zero, -0 encodes as +0, and NaN or huge y give code 0.
METALQ_FP_FN uint32_t e2m1_encode(float y) {
  uint32_t best = 0;
  float best_distance = METALQ_FABS(y);
  for (uint32_t code = 1; code < 16; ++code) {
    const float d = METALQ_FABS(y - e2m1_value(code));
    if (d < best_distance) {
      best = code;
      best_distance = d;
    }
  }
  return best;
}

// Smallest e with 2^e >= s for finite s > 0 (exact, subnormals included); 0 for s == 0.
METALQ_FP_FN int ceil_log2(float s) {
  if (s == 0.0f) return 0;
  int offset = 0;
  if (s < 1.17549435e-38f) {  // subnormal: scale into the normal range (exact)
    s *= 4294967296.0f;
    offset = 32;
  }
  const uint32_t u = METALQ_AS_UINT(s);
  return int((u >> 23) & 0xFFu) - 127 + ((u & 0x7FFFFFu) != 0u ? 1 : 0) - offset;
}

// 2^e as a float, for e in [-149, 127].
METALQ_FP_FN float exp2_int(int e) {
  return e >= -126 ? METALQ_AS_FLOAT(uint32_t(e + 127) << 23) : METALQ_AS_FLOAT(1u << uint32_t(e + 149));
}

// One group's scale as mx.quantize computes it in the weight dtype T: `code` is stored, and each value
// w of the group encodes as fp_encode_value(w / divisor) (times `enc` for nvfp4 with a global scale).
struct FpGroupScale {
  uint32_t code;
  float divisor;
};

// amax: max |w| of the group (a value of T); enc: 448 * 6 / global_scale, or 1 without one.
template <typename T>
METALQ_FP_FN FpGroupScale fp_group_scale(int mode, float amax, float enc) {
  const float s = float(T(METALQ_DIV(amax, mode == kMxfp8 ? kE4M3Max : kE2M1Max)));
  if (mode == kNvfp4) {
    const uint32_t code = e4m3_encode(s * enc);
    return FpGroupScale{code, float(T(e4m3_value(code)))};
  }
  const int e = ceil_log2(s);
  return FpGroupScale{uint32_t(e + 127) & 0xFFu, float(T(exp2_int(e)))};
}

template <typename T>
METALQ_FP_FN uint32_t fp_encode_value(int mode, float w, FpGroupScale scale, float enc) {
  const float y = float(T(METALQ_DIV(w, scale.divisor))) * enc;
  return mode == kMxfp8 ? e4m3_encode(y) : e2m1_encode(y);
}

// Dequantized value in the output dtype O, rounded as mx.dequantize does: without a global scale the
// scale is first converted to O; with one (inv = global_scale / (448 * 6)) everything stays float.
template <typename O>
METALQ_FP_FN O fp_dequantize_value(int mode, uint32_t code, uint32_t scale_code, bool has_global, float inv) {
  const float v = fp_element_value(mode, code), s = fp_scale_value(mode, scale_code);
  return has_global ? O((s * inv) * v) : O(float(O(s)) * v);
}

}  // namespace metalq
