// Quantize and dequantize kernels of MLX's floating-point modes (mxfp4, nvfp4, mxfp8), built on the
// encodings of fp_format.h so that they give the CPU op's (and mx.quantize's) bits. Same threading as
// the affine element-wise kernels in quantized.h: one thread per group, or per packed uint32 word.
// Instantiated in quantized.metal as fp_{quantize,dequantize}_<mode>_<type>[_global].
#pragma once

#include <metal_stdlib>

#include "fp_format.h"
#include "params.h"
#include "quantized.h"

using namespace metal;

// Thread g quantizes group g: reads its group_size values (16 or 32), writes its packed bytes
// (group_size * bits / 8) and its scale byte. With has_global (nvfp4), buffer 3 holds the float32
// global scale. E.g. bfloat 4096x4096 mxfp4: 524288 threads, each reading 64 B and writing 16 + 1 B.
template <typename T, int mode, bool has_global>
[[kernel]] void fp_quantize(
    const device T* w [[buffer(0)]],
    device uint8_t* wq [[buffer(1)]],
    device uint8_t* scales [[buffer(2)]],
    const device float* global_scale [[buffer(3)]],
    constant metalq::ElementwiseParams& params [[buffer(4)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong g = metalq::work_item(position, grid);
  if (g >= params.work_items) {
    return;
  }
  constexpr int group_size = metalq::fp_group_size(mode), bits = metalq::fp_bits(mode);
  const device T* group = w + g * group_size;
  float values[group_size];  // read once
  float amax = 0.0f;
  for (int i = 0; i < group_size; ++i) {
    values[i] = float(group[i]);
    amax = max(amax, abs(values[i]));
  }
  const float enc = has_global ? precise::divide(metalq::kNvfp4GlobalRange, global_scale[0]) : 1.0f;
  const metalq::FpGroupScale scale = metalq::fp_group_scale<T>(mode, amax, enc);
  scales[g] = uint8_t(scale.code);
  device uint8_t* out = wq + g * (group_size * bits / 8);
  for (int i = 0; i < group_size; i += 8 / bits) {
    uint byte = metalq::fp_encode_value<T>(mode, values[i], scale, enc);
    if (bits == 4) {
      byte |= metalq::fp_encode_value<T>(mode, values[i + 1], scale, enc) << 4;
    }
    out[i * bits / 8] = uint8_t(byte);
  }
}

// Thread u dequantizes word u of wq: its 32 / bits values (one group holds whole words), with its
// group's scale byte, into out[u * 32 / bits, ...) in T.
template <typename T, int mode, bool has_global>
[[kernel]] void fp_dequantize(
    const device uint32_t* wq [[buffer(0)]],
    const device uint8_t* scales [[buffer(1)]],
    const device float* global_scale [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant metalq::ElementwiseParams& params [[buffer(4)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong u = metalq::work_item(position, grid);
  if (u >= params.work_items) {
    return;
  }
  constexpr int bits = metalq::fp_bits(mode), per_word = 32 / bits;
  const uint word = wq[u];
  const ulong first = u * per_word;
  const uint scale_code = scales[first / metalq::fp_group_size(mode)];
  const float inv = has_global ? precise::divide(global_scale[0], metalq::kNvfp4GlobalRange) : 1.0f;
  for (int i = 0; i < per_word; ++i) {
    const uint code = (word >> (bits * i)) & ((1u << bits) - 1);
    out[first + i] = metalq::fp_dequantize_value<T>(mode, code, scale_code, has_global, inv);
  }
}
