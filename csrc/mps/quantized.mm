// MPS implementations of the metalq ops: check (csrc/checks.h), make inputs contiguous, allocate,
// return early when empty, plan (csrc/plan.h), encode (library.h). No kernel choice happens here.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "../plan.h"
#include "fp_format.h"
#include "library.h"

namespace metalq {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_mps(const at::Tensor& w, int64_t group_size,
                                                                   int64_t bits) {
  check_affine_quantize(w, group_size, bits);
  check_finite_weights(w);
  auto wc = w.contiguous();
  const auto gsizes = group_sizes(w, group_size);
  auto wq = at::empty_symint(packed_sizes(w, bits), w.options().dtype(at::kUInt32));
  auto scales = at::empty_symint(gsizes, w.options());
  auto biases = at::empty_symint(gsizes, w.options());
  if (w.numel() == 0) return {wq, scales, biases};
  mps::encode(plan_affine_quantize(wc, wq, scales, biases, group_size, bits));
  return {wq, scales, biases};
}

at::Tensor affine_dequantize_mps(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                 int64_t group_size, int64_t bits) {
  auto sizes = wq.sym_sizes().vec();
  sizes.back() = check_affine_dequantize(wq, scales, biases, group_size, bits);
  auto wc = wq.contiguous(), sc = scales.contiguous(), bc = biases.contiguous();
  auto out = at::empty_symint(sizes, scales.options());
  if (out.numel() == 0) return out;
  mps::encode(plan_affine_dequantize(wc, sc, bc, out, group_size, bits));
  return out;
}

void encode_all(const std::vector<DispatchPlan>& plans) {
  for (const DispatchPlan& plan : plans) {
    mps::encode(plan);
  }
}

at::Tensor affine_qmm_mps(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                          const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
  const QmmShape shape = check_affine_qmm(op, x, w, scales, biases, group_size, bits, transpose);
  auto out = at::empty_symint(shape.out_sizes, x.options());
  if (out.numel() == 0 || shape.K == 0) return out.zero_();
  encode_all(plan_qmm(qmm_operands(x, w, scales, biases), out, WeightFormat::affine(group_size, bits), transpose));
  return out;
}

at::Tensor affine_qmm_t_mps(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return affine_qmm_mps("affine_qmm_t", x, w, scales, biases, group_size, bits, true);
}

at::Tensor affine_qmm_n_mps(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return affine_qmm_mps("affine_qmm_n", x, w, scales, biases, group_size, bits, false);
}

at::Tensor affine_gather_qmm_mps(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                 const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
                                 const std::optional<at::Tensor>& rhs_indices, bool transpose, int64_t group_size,
                                 int64_t bits, bool sorted_indices) {
  const GatherQmmShape shape =
      check_affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose);
  const QmmOperands operands =
      gather_qmm_operands(shape, x, w, scales, biases, lhs_indices, rhs_indices, sorted_indices);
  auto out = at::empty_symint(shape.out_sizes(), x.options());
  if (out.numel() == 0 || shape.K == 0) return out.zero_();
  encode_all(plan_affine_gather_qmm(operands, out, group_size, bits, transpose));
  return out;
}

std::tuple<at::Tensor, at::Tensor> fp_quantize_mps(const at::Tensor& w, c10::string_view mode_name,
                                                   const std::optional<at::Tensor>& global_scale) {
  const int mode = check_fp_mode("fp_quantize", mode_name);
  check_fp_quantize(w, mode, global_scale);
  check_finite_weights(w, "fp_quantize");
  auto wc = w.contiguous();
  auto wq = at::empty_symint(packed_sizes(w, fp_bits(mode)), w.options().dtype(at::kUInt32));
  auto scales = at::empty_symint(group_sizes(w, fp_group_size(mode)), w.options().dtype(at::kByte));
  if (w.numel() == 0) return {wq, scales};
  std::optional<at::Tensor> global;
  if (global_scale) global = global_scale->contiguous();
  mps::encode(plan_fp_quantize(wc, wq, scales, mode, global));
  return {wq, scales};
}

at::Tensor fp_dequantize_mps(const at::Tensor& wq, const at::Tensor& scales, c10::string_view mode_name,
                             const std::optional<at::Tensor>& global_scale, std::optional<at::ScalarType> dtype) {
  const int mode = check_fp_mode("fp_dequantize", mode_name);
  auto sizes = wq.sym_sizes().vec();
  sizes.back() = check_fp_dequantize(wq, scales, mode, global_scale);
  auto wc = wq.contiguous(), sc = scales.contiguous();
  auto out = at::empty_symint(sizes, wq.options().dtype(fp_dequantize_dtype(dtype, global_scale)));
  if (out.numel() == 0) return out;
  std::optional<at::Tensor> global;
  if (global_scale) global = global_scale->contiguous();
  mps::encode(plan_fp_dequantize(wc, sc, out, mode, global));
  return out;
}

at::Tensor fp_qmm_mps(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      c10::string_view mode_name, const std::optional<at::Tensor>& global_scale, bool transpose) {
  const int mode = check_fp_mode(op, mode_name);
  const QmmShape shape = check_fp_qmm(op, x, w, scales, mode, global_scale, transpose);
  auto out = at::empty_symint(shape.out_sizes, x.options());
  if (out.numel() == 0 || shape.K == 0) return out.zero_();
  const QmmOperands operands = fp_qmm_operands(x, w, scales, global_scale);
  encode_all(plan_qmm(operands, out, WeightFormat::fp(mode, global_scale.has_value()), transpose));
  return out;
}

at::Tensor fp_qmm_t_mps(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, c10::string_view mode,
                        const std::optional<at::Tensor>& global_scale) {
  return fp_qmm_mps("fp_qmm_t", x, w, scales, mode, global_scale, true);
}

at::Tensor fp_qmm_n_mps(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, c10::string_view mode,
                        const std::optional<at::Tensor>& global_scale) {
  return fp_qmm_mps("fp_qmm_n", x, w, scales, mode, global_scale, false);
}

// pack / unpack: the CPU op's checks (values too: one reduction over q, so an out-of-range code is the
// same ValueError on both devices), then one thread per packing unit.
at::Tensor pack_mps(const at::Tensor& q, int64_t bits) {
  const auto sizes = check_pack(q, bits);
  check_pack_values(q, bits);
  auto qc = q.contiguous();
  auto out = at::empty_symint(sizes, q.options().dtype(at::kUInt32));
  if (out.numel() == 0) return out;
  mps::encode(plan_pack(qc, out, bits));
  return out;
}

at::Tensor unpack_mps(const at::Tensor& w, int64_t bits) {
  const auto sizes = check_unpack(w, bits);
  auto wc = w.contiguous();
  auto out = at::empty_symint(sizes, w.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  mps::encode(plan_unpack(wc, out, bits));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(metalq, MPS, m) {
  m.impl("affine_quantize", &affine_quantize_mps);
  m.impl("affine_dequantize", &affine_dequantize_mps);
  m.impl("affine_qmm_t", &affine_qmm_t_mps);
  m.impl("affine_qmm_n", &affine_qmm_n_mps);
  m.impl("affine_gather_qmm", &affine_gather_qmm_mps);
  m.impl("fp_quantize", &fp_quantize_mps);
  m.impl("fp_dequantize", &fp_dequantize_mps);
  m.impl("fp_qmm_t", &fp_qmm_t_mps);
  m.impl("fp_qmm_n", &fp_qmm_n_mps);
  m.impl("pack", &pack_mps);
  m.impl("unpack", &unpack_mps);
}

}  // namespace metalq
