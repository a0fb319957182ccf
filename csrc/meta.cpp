// Meta implementations: shapes and dtypes only, after the same checks as the real kernels. They serve
// meta-device model construction, FakeTensor and torch.compile (sizes may be symbolic).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "fp_format.h"

namespace metalq {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_meta(const at::Tensor& w, int64_t group_size,
                                                                    int64_t bits) {
  check_affine_quantize(w, group_size, bits);
  auto gsizes = group_sizes(w, group_size);
  return {at::empty_symint(packed_sizes(w, bits), w.options().dtype(at::kUInt32)),
          at::empty_symint(gsizes, w.options()), at::empty_symint(gsizes, w.options())};
}

at::Tensor affine_dequantize_meta(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                  int64_t group_size, int64_t bits) {
  auto sizes = wq.sym_sizes().vec();
  sizes.back() = check_affine_dequantize(wq, scales, biases, group_size, bits);
  return at::empty_symint(sizes, scales.options());
}

at::Tensor qmm_meta(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                    const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
  return at::empty_symint(check_affine_qmm(op, x, w, scales, biases, group_size, bits, transpose).out_sizes,
                          x.options());
}

at::Tensor affine_qmm_t_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                             const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return qmm_meta("affine_qmm_t", x, w, scales, biases, group_size, bits, true);
}

at::Tensor affine_qmm_n_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                             const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return qmm_meta("affine_qmm_n", x, w, scales, biases, group_size, bits, false);
}

at::Tensor affine_gather_qmm_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                  const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
                                  const std::optional<at::Tensor>& rhs_indices, bool transpose, int64_t group_size,
                                  int64_t bits, bool /*sorted_indices*/) {
  const GatherQmmShape shape =
      check_affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose);
  return at::empty_symint(shape.out_sizes(), x.options());
}

at::Tensor pack_meta(const at::Tensor& q, int64_t bits) {
  return at::empty_symint(check_pack(q, bits), q.options().dtype(at::kUInt32));
}

at::Tensor unpack_meta(const at::Tensor& w, int64_t bits) {
  return at::empty_symint(check_unpack(w, bits), w.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor> fp_quantize_meta(const at::Tensor& w, c10::string_view mode_name,
                                                    const std::optional<at::Tensor>& global_scale) {
  const int mode = check_fp_mode("fp_quantize", mode_name);
  check_fp_quantize(w, mode, global_scale);
  return {at::empty_symint(packed_sizes(w, fp_bits(mode)), w.options().dtype(at::kUInt32)),
          at::empty_symint(group_sizes(w, fp_group_size(mode)), w.options().dtype(at::kByte))};
}

at::Tensor fp_dequantize_meta(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode_name,
                              const std::optional<at::Tensor>& global_scale, std::optional<at::ScalarType> dtype) {
  const int mode = check_fp_mode("fp_dequantize", mode_name);
  auto sizes = wq.sym_sizes().vec();
  sizes.back() = check_fp_dequantize(wq, scales, mode, global_scale);
  return at::empty_symint(sizes, wq.options().dtype(fp_dequantize_dtype(dtype, global_scale)));
}

at::Tensor fp_qmm_meta(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       c10::string_view mode_name, const std::optional<at::Tensor>& global_scale, bool transpose) {
  return at::empty_symint(check_fp_qmm(op, x, w, scales, check_fp_mode(op, mode_name), global_scale, transpose).out_sizes,
                          x.options());
}

at::Tensor fp_qmm_t_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, c10::string_view mode,
                         const std::optional<at::Tensor>& global_scale) {
  return fp_qmm_meta("fp_qmm_t", x, w, scales, mode, global_scale, true);
}

at::Tensor fp_qmm_n_meta(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, c10::string_view mode,
                         const std::optional<at::Tensor>& global_scale) {
  return fp_qmm_meta("fp_qmm_n", x, w, scales, mode, global_scale, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalq, Meta, m) {
  m.impl("affine_quantize", &affine_quantize_meta);
  m.impl("affine_dequantize", &affine_dequantize_meta);
  m.impl("affine_qmm_t", &affine_qmm_t_meta);
  m.impl("affine_qmm_n", &affine_qmm_n_meta);
  m.impl("affine_gather_qmm", &affine_gather_qmm_meta);
  m.impl("pack", &pack_meta);
  m.impl("unpack", &unpack_meta);
  m.impl("fp_quantize", &fp_quantize_meta);
  m.impl("fp_dequantize", &fp_dequantize_meta);
  m.impl("fp_qmm_t", &fp_qmm_t_meta);
  m.impl("fp_qmm_n", &fp_qmm_n_meta);
}

}  // namespace metalq
