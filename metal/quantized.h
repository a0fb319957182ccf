// Affine quantization kernels in MLX's format: helpers -> *_impl templates -> thin [[kernel]]
// entries. quantized.metal instantiates them; metalq's DispatchPlan (csrc/plan.cpp) picks one and
// its geometry. The packed format is an LSB-first bitstream of `bits`-bit values, 32/bits per word.
#pragma once

#include <metal_stdlib>

#include "fp_format.h"
#include "params.h"

using namespace metal;

#define METAL_FUNC inline __attribute__((always_inline))

namespace metalq {

// ---- helpers ------------------------------------------------------------------------------------

// Threads pack and unpack whole units (params.h): a word for 1/2/4/8 bits, else bytes one by one,
// because 3/5/6-bit units are not word-aligned.
template <int bits>
constexpr int unit_bytes() {
  static_assert(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
                "unsupported bit width");
  return pack_unit_bytes(bits);
}

template <int bits>
constexpr int unit_values() { return unit_bytes<bits>() * 8 / bits; }

template <int bits>
METAL_FUNC ulong load_unit(const device uint8_t* packed) {
  if (unit_bytes<bits>() == 4) {
    return *reinterpret_cast<const device uint32_t*>(packed);
  }
  ulong unit = 0;
  for (int i = 0; i < unit_bytes<bits>(); ++i) {
    unit |= ulong(packed[i]) << (8 * i);
  }
  return unit;
}

// The low `bytes` bytes of `unit` (a whole unit, or the 2 bytes of a 1-bit group of 16).
template <int bytes>
METAL_FUNC void store_bytes(device uint8_t* packed, ulong unit) {
  if (bytes == 4) {
    *reinterpret_cast<device uint32_t*>(packed) = uint32_t(unit);
    return;
  }
  for (int i = 0; i < bytes; ++i) {
    packed[i] = uint8_t(unit >> (8 * i));
  }
}

// Values of one group that one packing step holds: a whole unit, or the group itself where it is
// less than a unit (1 bit, group size 16: half a word).
template <int group_size, int bits>
constexpr int group_step_values() { return group_size < unit_values<bits>() ? group_size : unit_values<bits>(); }

// Code i of a unit, and a unit with `code` (< 2^bits) put at position i, whose bits there are zero:
// the LSB-first bitstream of every kernel that packs (affine_quantize, pack) or unpacks
// (affine_dequantize, unpack) whole units.
template <int bits>
METAL_FUNC uint unit_code(ulong unit, int i) {
  return uint(unit >> (bits * i)) & ((1u << bits) - 1);
}

template <int bits>
METAL_FUNC ulong put_code(ulong unit, int i, uint code) {
  return unit | (ulong(code) << (bits * i));
}

struct GroupParams {
  float scale;
  float bias;
};

// MLX's CPU quantization rule, so results are bit-identical to mx.quantize: from the group's true
// min and max, the extreme of larger magnitude becomes the bias (q = 0 exactly) and the scale is
// nudged so that 0.0 falls on an integer level; 1-bit groups span [min, max] directly.
template <int bits>
METAL_FUNC GroupParams affine_group_params(float w_min, float w_max) {
  const float eps = kQuantizeEps;
  if (bits == 1) {
    return {max(w_max - w_min, eps), w_min};
  }
  const float n_bins = float((1 << bits) - 1);
  float scale = max(precise::divide(w_max - w_min, n_bins), eps);
  const bool min_is_edge = abs(w_min) > abs(w_max);
  scale = min_is_edge ? scale : -scale;
  const float edge = min_is_edge ? w_min : w_max;
  const float q0 = rint(precise::divide(edge, scale));
  if (q0 == 0.0f) {
    return {scale, 0.0f};
  }
  return {precise::divide(edge, q0), edge};
}

// w = scale * q + bias with MLX's roundings: the product, then the sum, each rounded to T once.
// (q < 256 and T has at most 24 mantissa bits, so the float product is exact before rounding.)
template <typename T>
METAL_FUNC T dequantize_value(uint q, T scale, T bias) {
  const T product = T(float(q) * float(scale));
  return T(float(product) + float(bias));
}

// ---- implementations ----------------------------------------------------------------------------

// One group: reads its group_size values once, writes its packed bytes, its scale and its bias.
template <typename T, int group_size, int bits>
METAL_FUNC void affine_quantize_impl(const device T* w, device uint8_t* packed, device T* scale, device T* bias) {
  constexpr int per_step = group_step_values<group_size, bits>(), step_bytes = per_step * bits / 8;
  static_assert(group_size % per_step == 0 && per_step * bits % 8 == 0, "a group fills whole steps of whole bytes");
  float values[group_size];
  values[0] = float(w[0]);
  float w_min = values[0], w_max = values[0];
  for (int i = 1; i < group_size; ++i) {
    values[i] = float(w[i]);
    // The same selects as std::min / std::max, so a signed zero extreme matches the CPU op.
    w_min = values[i] < w_min ? values[i] : w_min;
    w_max = w_max < values[i] ? values[i] : w_max;
  }
  const GroupParams p = affine_group_params<bits>(w_min, w_max);
  const float n_bins = float((1 << bits) - 1);
  for (int u = 0; u < group_size / per_step; ++u) {
    ulong unit = 0;
    for (int i = 0; i < per_step; ++i) {
      const float q = clamp(rint(precise::divide(values[u * per_step + i] - p.bias, p.scale)), 0.0f, n_bins);
      unit = put_code<bits>(unit, i, uint(q));
    }
    store_bytes<step_bytes>(packed + u * step_bytes, unit);
  }
  *scale = T(p.scale);
  *bias = T(p.bias);
}

// One unit: unpacks its values and writes them dequantized, with the scale and bias of each group it
// holds (from scales[0], biases[0]: one group, or two 1-bit groups of 16).
template <typename T, int group_size, int bits>
METAL_FUNC void affine_dequantize_impl(const device uint8_t* packed, const device T* scales, const device T* biases,
                                       device T* out) {
  constexpr int per_step = group_step_values<group_size, bits>();
  const ulong unit = load_unit<bits>(packed);
  for (int s = 0; s < unit_values<bits>() / per_step; ++s) {
    const T scale = scales[s], bias = biases[s];
    for (int i = s * per_step; i < (s + 1) * per_step; ++i) {
      out[i] = dequantize_value(unit_code<bits>(unit, i), scale, bias);
    }
  }
}

// One unit of codes (uint8 values < 2^bits, as the op checked) into its packed bytes.
template <int bits>
METAL_FUNC void pack_impl(const device uint8_t* q, device uint8_t* packed) {
  ulong unit = 0;
  for (int i = 0; i < unit_values<bits>(); ++i) {
    unit = put_code<bits>(unit, i, q[i]);
  }
  store_bytes<unit_bytes<bits>()>(packed, unit);
}

// One unit of packed bytes into its uint8 codes.
template <int bits>
METAL_FUNC void unpack_impl(const device uint8_t* packed, device uint8_t* q) {
  const ulong unit = load_unit<bits>(packed);
  for (int i = 0; i < unit_values<bits>(); ++i) {
    q[i] = uint8_t(unit_code<bits>(unit, i));
  }
}

// The flat index of this thread in a grid that may wrap into y (see ElementwiseParams).
METAL_FUNC ulong work_item(uint2 position, uint2 grid) { return ulong(position.y) * grid.x + position.x; }

// ---- weight formats of the matmul kernels (qmv.h, qmm.h) ---------------------------------------

// A format says how a packed value decodes, how its group's scale and bias apply and how a dot ends.
// The kernels bind scales at buffer 1 (Scale) and at buffer 2 a Bias buffer, and bind() the format
// to both once select_matrices has pointed them at the batch item's matrix. The GEMV kernels compute
//   sum_i x_i * (s * value(q_i) + b) = s * sum_i x_i value(q_i) + b * sum_i x_i
// per group, then finish() the float total; the GEMM stages weight() in its tiles.

// MLX's affine format: value = the unsigned code, T scales and biases (one each per group).
// (Static data members are program-scope variables: Metal wants them in `constant`, as MLX's
// `static constant constexpr const`.)
template <typename T_, int group_size_, int bits_>
struct Affine {
  using T = T_;
  using Scale = T;
  using Bias = T;
  static constant constexpr const int group_size = group_size_, bits = bits_;
  static constant constexpr const bool biases_per_matrix = true;
  const device T* scales;
  const device T* biases;

  static METAL_FUNC Affine bind(const device T* scales, const device T* biases) { return {scales, biases}; }
  static METAL_FUNC float value(uint code) { return float(code); }
  METAL_FUNC GroupParams group(ulong g) const { return {float(scales[g]), float(biases[g])}; }
  // The GEMM's tiles: group g read once, then each weight as mx.dequantize rounds it.
  struct TileGroup {
    T scale, bias;
  };
  METAL_FUNC TileGroup tile_group(ulong g) const { return {scales[g], biases[g]}; }
  METAL_FUNC T weight(uint code, TileGroup p) const { return dequantize_value(code, p.scale, p.bias); }
  METAL_FUNC float finish(float total) const { return total; }
};

// MLX's floating-point modes (fp_format.h): value = the E2M1 / E4M3 element, one uint8 scale per
// group, no biases. Buffer 2 holds nvfp4's float32 global scale (has_global, else unbound), applied as
// the CPU op does: to the float total of a GEMV, to each GEMM tile weight (as mx.dequantize).
template <typename T_, int mode, bool has_global>
struct Fp {
  using T = T_;
  using Scale = uint8_t;
  using Bias = float;
  static constant constexpr const int group_size = fp_group_size(mode), bits = fp_bits(mode);
  static constant constexpr const bool biases_per_matrix = false;
  const device uint8_t* scales;
  float inv;  // global_scale / (448 * 6), or 1

  static METAL_FUNC Fp bind(const device uint8_t* scales, const device float* global_scale) {
    return {scales, has_global ? precise::divide(global_scale[0], kNvfp4GlobalRange) : 1.0f};
  }
  static METAL_FUNC float value(uint code) { return fp_element_value(mode, code); }
  METAL_FUNC GroupParams group(ulong g) const { return {fp_scale_value(mode, scales[g]), 0.0f}; }
  struct TileGroup {
    uint scale_code;
  };
  METAL_FUNC TileGroup tile_group(ulong g) const { return {scales[g]}; }
  METAL_FUNC T weight(uint code, TileGroup p) const {
    return fp_dequantize_value<T>(mode, code, p.scale_code, has_global, inv);
  }
  METAL_FUNC float finish(float total) const { return has_global ? total * inv : total; }
};

// Points x, w, scales and biases at x matrix m.x and w matrix m.w, and y at matrix z of y, for
// y = x[M, K] @ W.T with W [N, K] or x @ W with W [K, N] (either way a matrix of W holds N * K values
// in N * K / group_size groups).
template <typename F, typename Out>
METAL_FUNC void offset_matrices(BatchMatrices m, uint z, uint M, uint N, uint K, const device uint8_t* thread& w,
                                const device typename F::Scale* thread& scales,
                                const device typename F::Bias* thread& biases, const device typename F::T* thread& x,
                                device Out* thread& y) {
  const ulong values = ulong(N) * K;
  w += m.w * (values * F::bits / 8);
  scales += m.w * (values / F::group_size);
  if (F::biases_per_matrix) {
    biases += m.w * (values / F::group_size);
  }
  x += m.x * (ulong(M) * K);
  y += z * (ulong(M) * N);
}

// Every matmul kernel (qmv.h, qmm.h) starts here: offset_matrices for batch item z % batch.count, with
// y at matrix z. Split-K kernels number their grid slices z = partition * batch.count + item, so
// their float partials are [partitions, count, M, N].
template <typename F, typename Out>
METAL_FUNC void select_matrices(constant BatchParams& batch, uint z, uint M, uint N, uint K,
                                const device uint8_t* thread& w, const device typename F::Scale* thread& scales,
                                const device typename F::Bias* thread& biases, const device typename F::T* thread& x,
                                device Out* thread& y) {
  offset_matrices<F>(batch_matrices(batch, z % batch.count), z, M, N, K, w, scales, biases, x, y);
}

// The gather kernels (affine_gather_*, MLX's gather_qmm): item z multiplies x matrix pairs[z].x by w
// matrix pairs[z].y, the lhs and rhs indices broadcast and flattened by the host.
template <typename F, typename Out>
METAL_FUNC void select_matrices(const device uint2* pairs, uint z, uint M, uint N, uint K,
                                const device uint8_t* thread& w, const device typename F::Scale* thread& scales,
                                const device typename F::Bias* thread& biases, const device typename F::T* thread& x,
                                device Out* thread& y) {
  const uint2 pair = pairs[z];
  offset_matrices<F>(BatchMatrices{pair.x, pair.y}, z, M, N, K, w, scales, biases, x, y);
}

}  // namespace metalq

// ---- kernels ------------------------------------------------------------------------------------

// One thread per group. Rows are contiguous and K % group_size == 0, so the groups of all rows form
// one flat sequence: thread g reads w[g*gs, (g+1)*gs) and writes bytes [g*gs*bits/8, (g+1)*gs*bits/8)
// of wq plus scales[g], biases[g]. E.g. half 4096x4096 at gs 64, 4 bits: 262144 threads in 1024
// threadgroups of 256, each reading 128 B and writing 32 + 2 + 2 B.
template <typename T, int group_size, int bits>
[[kernel]] void affine_quantize(
    const device T* w [[buffer(0)]],
    device uint8_t* wq [[buffer(1)]],
    device T* scales [[buffer(2)]],
    device T* biases [[buffer(3)]],
    constant metalq::ElementwiseParams& params [[buffer(4)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong g = metalq::work_item(position, grid);
  if (g >= params.work_items) {
    return;
  }
  metalq::affine_quantize_impl<T, group_size, bits>(
      w + g * group_size, wq + g * (group_size * bits / 8), scales + g, biases + g);
}

// One thread per unit (see pack_unit_bytes): thread u reads bytes [u*B, (u+1)*B) of wq and its group's
// scale and bias, and writes out[u*V, (u+1)*V), with B bytes and V values per unit (4-bit: B=4, V=8;
// 3-bit: B=3, V=8). Groups are whole units, but for 1-bit groups of 16: a unit then holds two groups.
template <typename T, int group_size, int bits>
[[kernel]] void affine_dequantize(
    const device uint8_t* wq [[buffer(0)]],
    const device T* scales [[buffer(1)]],
    const device T* biases [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant metalq::ElementwiseParams& params [[buffer(4)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong u = metalq::work_item(position, grid);
  if (u >= params.work_items) {
    return;
  }
  constexpr int per_unit = metalq::unit_values<bits>();
  const ulong g = u * per_unit / group_size;
  metalq::affine_dequantize_impl<T, group_size, bits>(
      wq + u * metalq::unit_bytes<bits>(), scales + g, biases + g, out + u * per_unit);
}

// pack / unpack (type-independent: pack_b_<bits>, unpack_b_<bits>): one thread per unit, as
// affine_dequantize. Rows are contiguous and whole words (the op's checks), so the units of all rows
// form one flat sequence: thread u reads q[u*V, (u+1)*V) and writes bytes [u*B, (u+1)*B) of w, or the
// reverse, with B bytes and V values per unit (pack_unit_bytes).
template <int bits>
[[kernel]] void pack(
    const device uint8_t* q [[buffer(0)]],
    device uint8_t* w [[buffer(1)]],
    constant metalq::ElementwiseParams& params [[buffer(2)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong u = metalq::work_item(position, grid);
  if (u >= params.work_items) {
    return;
  }
  metalq::pack_impl<bits>(q + u * metalq::unit_values<bits>(), w + u * metalq::unit_bytes<bits>());
}

template <int bits>
[[kernel]] void unpack(
    const device uint8_t* w [[buffer(0)]],
    device uint8_t* q [[buffer(1)]],
    constant metalq::ElementwiseParams& params [[buffer(2)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong u = metalq::work_item(position, grid);
  if (u >= params.work_items) {
    return;
  }
  metalq::unpack_impl<bits>(w + u * metalq::unit_bytes<bits>(), q + u * metalq::unit_values<bits>());
}
