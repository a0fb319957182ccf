// CPU implementations of the floating-point-mode ops (mxfp4, nvfp4, mxfp8). The encodings and
// rounding rules live in metal/fp_format.h; the matmuls run the shared packed-matrix kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../checks.h"
#include "fp_format.h"
#include "kernels.h"
#include "quantized.h"

namespace metalq {
namespace {

// enc (quantize) and inv (dequantize) of nvfp4's global scale: 448 * 6 / g and g / (448 * 6) in float.
float global_value(const std::optional<at::Tensor>& global_scale) {
  return global_scale->to(at::kFloat).item<float>();
}

template <class T>
void fp_quantize_rows(const T* w, int64_t rows, int64_t K, int mode, float enc, uint32_t* wq, uint8_t* scales) {
  const int group_size = fp_group_size(mode), bits = fp_bits(mode);
  const int64_t G = K / group_size, words = K * bits / 32;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> q(K);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = w + r * K;
      for (int64_t g = 0; g < G; ++g) {
        const T* grp = row + g * group_size;
        float amax = 0.f;
        for (int i = 0; i < group_size; ++i) amax = std::max(amax, std::fabs(float(grp[i])));
        const FpGroupScale scale = fp_group_scale<T>(mode, amax, enc);
        scales[r * G + g] = uint8_t(scale.code);
        for (int i = 0; i < group_size; ++i) q[g * group_size + i] = uint8_t(fp_encode_value<T>(mode, float(grp[i]), scale, enc));
      }
      cpu::pack_row(q.data(), K, bits, wq + r * words);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fp_quantize_cpu(const at::Tensor& w, c10::string_view mode_name,
                                                   const std::optional<at::Tensor>& global_scale) {
  const int mode = check_fp_mode("fp_quantize", mode_name);
  check_fp_quantize(w, mode, global_scale);
  check_finite_weights(w, "fp_quantize");
  const float enc = global_scale ? kNvfp4GlobalRange / global_value(global_scale) : 1.0f;
  auto wc = w.contiguous();
  auto wq = at::empty(C10_AS_INTARRAYREF_SLOW(packed_sizes(w, fp_bits(mode))), w.options().dtype(at::kUInt32));
  auto scales = at::empty(C10_AS_INTARRAYREF_SLOW(group_sizes(w, fp_group_size(mode))), w.options().dtype(at::kByte));
  const int64_t K = w.size(-1), rows = K ? w.numel() / K : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fp_quantize", [&] {
    fp_quantize_rows(wc.data_ptr<scalar_t>(), rows, K, mode, enc, static_cast<uint32_t*>(wq.data_ptr()),
                     scales.data_ptr<uint8_t>());
  });
  return {wq, scales};
}

at::Tensor fp_dequantize_cpu(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode_name,
                             const std::optional<at::Tensor>& global_scale, std::optional<at::ScalarType> dtype) {
  const int mode = check_fp_mode("fp_dequantize", mode_name);
  const int64_t K = check_fp_dequantize(wq, scales, mode, global_scale).expect_int();
  const auto out_dtype = fp_dequantize_dtype(dtype, global_scale);
  auto sizes = wq.sizes().vec();
  sizes.back() = K;
  auto out = at::empty(sizes, wq.options().dtype(out_dtype));
  const bool has_global = global_scale.has_value();
  const float inv = has_global ? global_value(global_scale) / kNvfp4GlobalRange : 1.0f;
  auto wc = wq.contiguous(), sc = scales.contiguous();
  const int bits = fp_bits(mode), group_size = fp_group_size(mode);
  const int64_t words = wq.size(-1), rows = words ? wq.numel() / words : 0, G = K / group_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "fp_dequantize", [&] {
    auto* w = static_cast<const uint32_t*>(wc.data_ptr());
    auto* s = sc.data_ptr<uint8_t>();
    auto* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> q(K);
      for (int64_t r = r0; r < r1; ++r) {
        cpu::unpack_row(w + r * words, K, bits, q.data());
        for (int64_t k = 0; k < K; ++k)
          o[r * K + k] = fp_dequantize_value<scalar_t>(mode, q[k], s[r * G + k / group_size], has_global, inv);
      }
    });
  });
  return out;
}

at::Tensor fp_qmm_cpu(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      c10::string_view mode_name, const std::optional<at::Tensor>& global_scale, bool transpose) {
  const int mode = check_fp_mode(op, mode_name);
  const QmmShape shape = check_fp_qmm(op, x, w, scales, mode, global_scale, transpose);
  // The kernels see E2M1 doubled and E4M3 in units of 2^-9 (kernels.h); value_scale undoes that.
  const float code_unit = mode == kMxfp8 ? 1.0f / 512.0f : 0.5f;
  const float global = global_scale ? global_value(global_scale) / kNvfp4GlobalRange : 1.0f;
  return cpu::batched_qmm(shape, x, w, scales, at::Tensor(),
                          [&](const at::Tensor& wm, const at::Tensor& sm, const at::Tensor&) {
                            return cpu::PackedMatrix{static_cast<const uint8_t*>(wm.data_ptr()),
                                                     sm.data_ptr(),
                                                     nullptr,
                                                     mode == kNvfp4 ? cpu::ScalarKind::e4m3 : cpu::ScalarKind::e8m0,
                                                     wm.size(0),
                                                     wm.size(1) * 32 / fp_bits(mode),
                                                     fp_bits(mode),
                                                     fp_group_size(mode),
                                                     mode == kMxfp8 ? cpu::ValueCode::e4m3 : cpu::ValueCode::e2m1,
                                                     code_unit * global};
                          },
                          transpose);
}

at::Tensor fp_qmm_t_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, c10::string_view mode,
                        const std::optional<at::Tensor>& global_scale) {
  return fp_qmm_cpu("fp_qmm_t", x, w, scales, mode, global_scale, true);
}

at::Tensor fp_qmm_n_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, c10::string_view mode,
                        const std::optional<at::Tensor>& global_scale) {
  return fp_qmm_cpu("fp_qmm_n", x, w, scales, mode, global_scale, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalq, CPU, m) {
  m.impl("fp_quantize", &fp_quantize_cpu);
  m.impl("fp_dequantize", &fp_dequantize_cpu);
  m.impl("fp_qmm_t", &fp_qmm_t_cpu);
  m.impl("fp_qmm_n", &fp_qmm_n_cpu);
}

}  // namespace metalq
