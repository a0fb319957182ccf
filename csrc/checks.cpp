#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <sstream>

#include "fp_format.h"
#include "params.h"

namespace metalq {
namespace {

template <size_t N>
std::string join_supported(const int (&values)[N]) {
  std::ostringstream out;
  for (size_t i = 0; i < N; ++i) {
    if (i > 0) out << (i + 1 == N ? " and " : ", ");
    out << values[i];
  }
  return out.str();
}

template <size_t N>
bool is_supported(const int (&values)[N], int64_t v) {
  return std::find(std::begin(values), std::end(values), v) != std::end(values);
}

bool is_float(const at::Tensor& t) {
  auto d = t.scalar_type();
  return d == at::kFloat || d == at::kHalf || d == at::kBFloat16;
}

std::string sizes_str(c10::SymIntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << ")";
  return out.str();
}

std::string shape_str(const at::Tensor& t) { return sizes_str(t.sym_sizes()); }

void check_same_device(const char* op, const std::vector<std::pair<const char*, const at::Tensor*>>& ts) {
  auto first = ts.begin();
  for (auto it = ts.begin() + 1; it != ts.end(); ++it) {
    TORCH_CHECK_VALUE(it->second->device() == first->second->device(), "[", op, "] all tensors must be on one device, but ",
                      first->first, " is on ", first->second->device(), " and ", it->first, " is on ",
                      it->second->device(), ".");
  }
}

void check_scales_biases(const char* op, const at::Tensor& scales, const at::Tensor& biases) {
  TORCH_CHECK_TYPE(is_float(scales), "[", op, "] scales must be float32, float16 or bfloat16, got ",
                   scales.scalar_type(), ".");
  TORCH_CHECK_TYPE(biases.scalar_type() == scales.scalar_type(), "[", op,
                   "] scales and biases must have the same dtype, got scales ", scales.scalar_type(),
                   " and biases ", biases.scalar_type(), ".");
  TORCH_CHECK_VALUE(scales.sym_sizes() == biases.sym_sizes(), "[", op,
                    "] scales and biases must have the same shape, got scales ", shape_str(scales),
                    " and biases ", shape_str(biases), ".");
}

void check_packed(const char* op, const at::Tensor& w) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kUInt32, "[", op, "] the packed weight w must be uint32, got ",
                   w.scalar_type(), ".");
}

// Shape rule shared by the dequantize ops: scales (..., rows, K / group_size) for wq (..., rows, K*bits/32).
// `params` names the per-group tensors in messages ("scales and biases", or "scales").
c10::SymInt dequantize_shape(const char* op, const char* params, const at::Tensor& wq, const at::Tensor& scales,
                             int64_t group_size, int64_t bits) {
  TORCH_CHECK_VALUE(wq.dim() >= 2, "[", op, "] w must have at least 2 dimensions (..., rows, K*bits/32), but it has ",
                    wq.dim(), ".");
  c10::SymInt K = wq.sym_size(-1) * 32 / bits;
  TORCH_CHECK_VALUE(K * bits == wq.sym_size(-1) * 32 && K % group_size == 0, "[", op, "] w of shape ", shape_str(wq), " holds ", wq.sym_size(-1), " uint32 words per row, which is not a whole number of groups of ", group_size, " ", bits, "-bit values.");
  auto expected = wq.sym_sizes().vec();
  expected.back() = K / group_size;
  TORCH_CHECK_VALUE(scales.sym_sizes() == c10::SymIntArrayRef(expected), "[", op, "] w of shape ", shape_str(wq),
                    " packs K=", K, " values per row at bits=", bits, ", so ", params, " must have shape ",
                    c10::SymIntArrayRef(expected), " for group_size=", group_size, ", but scales has shape ",
                    shape_str(scales), ".");
  return K;
}

// The dtype rules of every quantized matmul operand.
void check_qmm_dtypes(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                      const at::Tensor& biases) {
  TORCH_CHECK_TYPE(is_float(x), "[", op, "] x must be float32, float16 or bfloat16, got ", x.scalar_type(), ".");
  check_packed(op, w);
  check_scales_biases(op, scales, biases);
  TORCH_CHECK_TYPE(scales.scalar_type() == x.scalar_type(), "[", op,
                   "] scales and biases must have the dtype of x (", x.scalar_type(), "), got ", scales.scalar_type(),
                   "; cast them with .to(x.dtype).");
}

// The rules on the matrix dimensions: w (..., rows, words) with scales of shape (..., rows, groups)
// (the same batch dimensions) and x (..., K). Returns K and N. `params` names the per-group tensors in
// messages ("scales and biases", or "scales").
QmmShape check_qmm_matrix(const char* op, const char* params, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& scales, int64_t group_size, int64_t bits, bool transpose) {
  TORCH_CHECK_VALUE(w.sym_size(-1) * 32 % bits == 0, "[", op, "] w has ", w.sym_size(-1),
                    " uint32 words per row, which is not a whole number of ", bits, "-bit values.");
  c10::SymInt rows = w.sym_size(-2);
  c10::SymInt packed_len = w.sym_size(-1) * 32 / bits;  // values per row along the quantized axis
  auto expected = w.sym_sizes().vec();
  expected.back() = packed_len / group_size;
  TORCH_CHECK_VALUE(packed_len % group_size == 0 && scales.sym_sizes() == c10::SymIntArrayRef(expected),
                    "[", op, "] w of shape ", shape_str(w), " packs ", packed_len, " values per row at bits=", bits,
                    ", so ", params, " must have shape ", sizes_str(expected), " for group_size=", group_size,
                    ", but scales has shape ", shape_str(scales), ".");
  QmmShape shape = transpose ? QmmShape{packed_len, rows} : QmmShape{rows, packed_len};
  TORCH_CHECK_VALUE(x.sym_size(-1) == shape.K, "[", op, "] the last dimension of x (", x.sym_size(-1),
                    ") must equal K=", shape.K, " of the weight: w of shape ", shape_str(w), " with bits=", bits,
                    (transpose ? " holds [N, K]" : " holds [K, N]"), ".");
  return shape;
}

c10::SymInt product(c10::SymIntArrayRef sizes) {
  c10::SymInt n = 1;
  for (const auto& s : sizes) n = n * s;
  return n;
}

// x (..., K) and a weight w (..., rows, words) whose per-group scales share its batch dimensions.
void check_qmm_ranks(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "[", op, "] x must have at least 1 dimension (..., K).");
  TORCH_CHECK_VALUE(w.dim() >= 2, "[", op, "] w must have at least 2 dimensions (..., rows, words), got shape ",
                    shape_str(w), ".");
  TORCH_CHECK_VALUE(scales.dim() == w.dim() && scales.sym_sizes().slice(0, w.dim() - 2) ==
                                                   w.sym_sizes().slice(0, w.dim() - 2),
                    "[", op, "] Weight and scales should have the same batch shape. Received weight with shape ",
                    shape_str(w), ", scales with ", shape_str(scales), ".");
}

// Broadcasts two index shapes as NumPy does; `lhs` and `rhs` name them in the error.
std::vector<c10::SymInt> broadcast_index_shapes(const char* op, c10::SymIntArrayRef a, const std::string& lhs,
                                                c10::SymIntArrayRef b, const std::string& rhs) {
  const size_t ndim = std::max(a.size(), b.size());
  std::vector<c10::SymInt> out(ndim);
  for (size_t i = 0; i < ndim; ++i) {
    const c10::SymInt da = i < a.size() ? a[a.size() - 1 - i] : c10::SymInt(1);
    const c10::SymInt db = i < b.size() ? b[b.size() - 1 - i] : c10::SymInt(1);
    TORCH_CHECK_VALUE(da == db || da == 1 || db == 1, "[", op, "] ", lhs, " with shape ", sizes_str(a), " and ", rhs,
                      " with shape ", sizes_str(b), " cannot be broadcast together.");
    out[ndim - 1 - i] = da == 1 ? db : da;
  }
  return out;
}

// A 2-D w serves every leading dimension of x. A batch of weights broadcasts its batch dimensions
// against those of x [..., M, K], right-aligned (a 1-D x is one row, dropped from the output).
std::vector<c10::SymInt> qmm_out_sizes(const char* op, const at::Tensor& x, const at::Tensor& w,
                                       const c10::SymInt& N) {
  if (w.dim() == 2) {
    auto sizes = x.sym_sizes().vec();
    sizes.back() = N;
    return sizes;
  }
  const auto w_batch = w.sym_sizes().slice(0, w.dim() - 2);
  const auto x_batch = x.dim() > 2 ? x.sym_sizes().slice(0, x.dim() - 2) : c10::SymIntArrayRef();
  const size_t rank = std::max(x_batch.size(), w_batch.size());
  TORCH_CHECK_VALUE(rank <= size_t(kMaxBatchDims), "[", op, "] at most ", kMaxBatchDims,
                    " batch dimensions are supported, but x of shape ", shape_str(x), " and w of shape ",
                    shape_str(w), " have ", rank, ".");
  auto sizes = broadcast_index_shapes(op, x_batch, "the batch shape of x", w_batch, "the batch shape of w");
  TORCH_CHECK_VALUE(product(sizes) <= UINT32_MAX, "[", op, "] the broadcast batch of x of shape ", shape_str(x),
                    " and w of shape ", shape_str(w), " holds ", product(sizes),
                    " matrices; at most 2**32 - 1 are supported.");
  if (x.dim() >= 2) sizes.push_back(x.sym_size(-2));
  sizes.push_back(N);
  return sizes;
}

constexpr const char* kGatherOp = "affine_gather_qmm";

// One operand's index for every output matrix, flattened: the given indices (each checked to address
// one of the operand's `count` matrices) or arange(count) in the operand's batch shape, broadcast to
// shape.batch.
at::Tensor flat_gather_indices(const GatherQmmShape& shape, const std::optional<at::Tensor>& indices,
                               const char* name, const at::Tensor& operand, const char* operand_name) {
  const auto operand_batch = operand.sizes().slice(0, operand.dim() - 2);
  const int64_t count = c10::multiply_integers(operand_batch);
  at::Tensor idx;
  if (indices) {
    idx = indices->to(at::kLong);
    const auto bad = idx.lt(0).logical_or_(idx.ge(count));
    if (bad.any().item<bool>()) {
      const auto where = bad.nonzero()[0].cpu();
      std::ostringstream pos;
      for (int64_t d = 0; d < where.numel(); ++d) pos << (d ? ", " : "[") << where[d].item<int64_t>();
      if (where.numel() > 0) pos << "]";
      TORCH_CHECK_INDEX(false, "[", kGatherOp, "] ", name, pos.str(), " = ", idx.masked_select(bad)[0].item<int64_t>(),
                        " is out of range: ", operand_name, " of shape ", shape_str(operand), " holds ", count,
                        " matrices, so ", name, " must lie in [0, ", count, ").");
    }
  } else {
    idx = at::arange(count, operand.options().dtype(at::kLong)).view(operand_batch);
  }
  return idx.expand(C10_AS_INTARRAYREF_SLOW(shape.batch)).reshape({-1}).contiguous();
}

}  // namespace

void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(is_supported(kSupportedBits, bits), "[", op, "] bits=", bits,
                    " is not supported. The supported bits are ", join_supported(kSupportedBits), ".");
}

void check_format(const char* op, int64_t group_size, int64_t bits) {
  check_bits(op, bits);
  TORCH_CHECK_VALUE(is_supported(kSupportedGroupSizes, group_size), "[", op, "] group_size=", group_size,
                    " is not supported. The supported group sizes are ", join_supported(kSupportedGroupSizes), ".");
}

void check_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits) {
  const char* op = "affine_quantize";
  check_format(op, group_size, bits);
  TORCH_CHECK_TYPE(is_float(w), "[", op, "] only float32, float16 and bfloat16 weights can be quantized, but w has dtype ",
                   w.scalar_type(), ".");
  TORCH_CHECK_VALUE(w.dim() >= 2, "[", op, "] w must have at least 2 dimensions (..., rows, K), but it has ", w.dim(), ".");
  TORCH_CHECK_VALUE(w.sym_size(-1) % group_size == 0, "[", op, "] the last dimension of w (K=", w.sym_size(-1),
                    ") must be divisible by group_size=", group_size, "; w has shape ", shape_str(w), ".");
  // Implied by the rule above for group sizes of 32 and more; group_size=16 needs it for 1, 3 and 5 bits.
  TORCH_CHECK_VALUE(w.sym_size(-1) * bits % 32 == 0, "[", op, "] the last dimension of w (K=", w.sym_size(-1),
                    ") times bits=", bits, " must be a multiple of 32, since each row packs into whole uint32 words",
                    "; w has shape ", shape_str(w), ".");
}

void check_finite_weights(const at::Tensor& w, const char* op) {
  TORCH_CHECK_VALUE(w.numel() == 0 || at::isfinite(w).all().item<bool>(),
                    "[", op, "] w contains NaN or infinite values, which cannot be quantized.");
}

c10::SymInt check_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                    int64_t group_size, int64_t bits) {
  const char* op = "affine_dequantize";
  check_format(op, group_size, bits);
  check_packed(op, wq);
  check_scales_biases(op, scales, biases);
  check_same_device(op, {{"w", &wq}, {"scales", &scales}, {"biases", &biases}});
  return dequantize_shape(op, "scales and biases", wq, scales, group_size, bits);
}


QmmShape check_affine_qmm(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                          const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
  check_format(op, group_size, bits);
  check_qmm_dtypes(op, x, w, scales, biases);
  check_same_device(op, {{"x", &x}, {"w", &w}, {"scales", &scales}, {"biases", &biases}});
  check_qmm_ranks(op, x, w, scales);
  QmmShape shape = check_qmm_matrix(op, "scales and biases", x, w, scales, group_size, bits, transpose);
  shape.out_sizes = qmm_out_sizes(op, x, w, shape.N);
  return shape;
}

std::vector<c10::SymInt> GatherQmmShape::out_sizes() const {
  auto sizes = batch;
  sizes.push_back(M);
  sizes.push_back(N);
  return sizes;
}

GatherQmmShape check_affine_gather_qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                       const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
                                       const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                       int64_t bits, bool transpose) {
  const char* op = kGatherOp;
  check_format(op, group_size, bits);
  check_qmm_dtypes(op, x, w, scales, biases);
  std::vector<std::pair<const char*, const at::Tensor*>> tensors{
      {"x", &x}, {"w", &w}, {"scales", &scales}, {"biases", &biases}};
  for (const auto& [name, idx] : {std::pair{"lhs_indices", &lhs_indices}, std::pair{"rhs_indices", &rhs_indices}}) {
    if (!idx->has_value()) continue;
    TORCH_CHECK_TYPE(c10::isIntegralType((*idx)->scalar_type(), /*includeBool=*/false), "[", op,
                     "] Got indices with invalid dtype. Indices must be integral, but ", name, " has dtype ",
                     (*idx)->scalar_type(), ".");
    tensors.emplace_back(name, &**idx);
  }
  check_same_device(op, tensors);
  TORCH_CHECK_VALUE(x.dim() >= 2, "[", op, "] x must have at least 2 dimensions (..., M, K), but got x with shape ",
                    shape_str(x), ".");
  TORCH_CHECK_VALUE(w.dim() >= 2, "[", op, "] w must have at least 2 dimensions (..., rows, words), but got w with shape ",
                    shape_str(w), ".");
  const QmmShape qmm = check_qmm_matrix(op, "scales and biases", x, w, scales, group_size, bits, transpose);
  const auto x_batch = x.sym_sizes().slice(0, x.dim() - 2), w_batch = w.sym_sizes().slice(0, w.dim() - 2);
  GatherQmmShape shape;
  shape.batch = broadcast_index_shapes(
      op, lhs_indices ? lhs_indices->sym_sizes() : x_batch, lhs_indices ? "lhs_indices" : "the batch shape of x",
      rhs_indices ? rhs_indices->sym_sizes() : w_batch, rhs_indices ? "rhs_indices" : "the batch shape of w");
  shape.M = x.sym_size(-2);
  shape.K = qmm.K;
  shape.N = qmm.N;
  shape.x_count = product(x_batch);
  shape.w_count = product(w_batch);
  return shape;
}

std::pair<at::Tensor, at::Tensor> gather_index_pairs(const GatherQmmShape& shape,
                                                     const std::optional<at::Tensor>& lhs_indices,
                                                     const std::optional<at::Tensor>& rhs_indices,
                                                     const at::Tensor& x, const at::Tensor& w) {
  return {flat_gather_indices(shape, lhs_indices, "lhs_indices", x, "x"),
          flat_gather_indices(shape, rhs_indices, "rhs_indices", w, "w")};
}

// ---- floating-point modes --------------------------------------------------------------------

namespace {

void check_fp_scales(const char* op, const at::Tensor& scales) {
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kByte, "[", op, "] Scale type must be uint8 but received type ",
                   scales.scalar_type(), ".");
}

void check_global_scale(const char* op, int mode, const std::optional<at::Tensor>& global_scale, const at::Tensor& w) {
  if (!global_scale) return;
  TORCH_CHECK_VALUE(mode == kNvfp4, "[", op, "] Global scale is only supported for 'nvfp4' quantization mode.");
  TORCH_CHECK_VALUE(global_scale->sym_numel() == 1, "[", op, "] Global scale must be a scalar but got shape ",
                    shape_str(*global_scale), ".");
  TORCH_CHECK_TYPE(global_scale->scalar_type() == at::kFloat, "[", op,
                   "] Global scale must have dtype float32 but got ", global_scale->scalar_type(), ".");
  check_same_device(op, {{"w", &w}, {"global_scale", &*global_scale}});
}

}  // namespace

int check_fp_mode(const char* op, c10::string_view mode) {
  if (mode == "mxfp4") return kMxfp4;
  if (mode == "nvfp4") return kNvfp4;
  if (mode == "mxfp8") return kMxfp8;
  TORCH_CHECK_VALUE(false, "[", op, "] Invalid quantization mode '", std::string(mode),
                    "'. The floating-point modes are 'mxfp4', 'nvfp4' and 'mxfp8' (affine uses the affine_* ops).");
}

void check_fp_quantize(const at::Tensor& w, int mode, const std::optional<at::Tensor>& global_scale) {
  const char* op = "fp_quantize";
  TORCH_CHECK_TYPE(is_float(w), "[", op, "] only float32, float16 and bfloat16 weights can be quantized, but w has dtype ",
                   w.scalar_type(), ".");
  TORCH_CHECK_VALUE(w.dim() >= 2, "[", op, "] w must have at least 2 dimensions (..., rows, K), but it has ", w.dim(), ".");
  const int group_size = fp_group_size(mode);
  TORCH_CHECK_VALUE(w.sym_size(-1) % group_size == 0, "[", op,
                    "] The last dimension of the matrix needs to be divisible by the quantization group size ",
                    group_size, ". However the provided matrix has shape ", shape_str(w), ".");
  check_global_scale(op, mode, global_scale, w);
}

c10::SymInt check_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, int mode,
                                const std::optional<at::Tensor>& global_scale) {
  const char* op = "fp_dequantize";
  check_packed(op, wq);
  check_fp_scales(op, scales);
  check_same_device(op, {{"w", &wq}, {"scales", &scales}});
  check_global_scale(op, mode, global_scale, wq);
  return dequantize_shape(op, "scales", wq, scales, fp_group_size(mode), fp_bits(mode));
}

at::ScalarType fp_dequantize_dtype(std::optional<at::ScalarType> dtype, const std::optional<at::Tensor>& global_scale) {
  const auto out = dtype.value_or(global_scale ? at::kFloat : at::kBFloat16);
  TORCH_CHECK_TYPE(out == at::kFloat || out == at::kHalf || out == at::kBFloat16,
                   "[fp_dequantize] Only real floating types are supported but output dtype == ", out, ".");
  return out;
}

QmmShape check_fp_qmm(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int mode,
                      const std::optional<at::Tensor>& global_scale, bool transpose) {
  TORCH_CHECK_TYPE(is_float(x), "[", op, "] x must be float32, float16 or bfloat16, got ", x.scalar_type(), ".");
  check_packed(op, w);
  check_fp_scales(op, scales);
  check_same_device(op, {{"x", &x}, {"w", &w}, {"scales", &scales}});
  check_global_scale(op, mode, global_scale, w);
  check_qmm_ranks(op, x, w, scales);
  QmmShape shape = check_qmm_matrix(op, "scales", x, w, scales, fp_group_size(mode), fp_bits(mode), transpose);
  shape.out_sizes = qmm_out_sizes(op, x, w, shape.N);
  return shape;
}

std::vector<c10::SymInt> check_pack(const at::Tensor& q, int64_t bits) {
  check_bits("pack", bits);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kByte, "[pack] q must be uint8, got ", q.scalar_type(), ".");
  TORCH_CHECK_VALUE(q.dim() >= 1 && q.sym_size(-1) * bits % 32 == 0, "[pack] q must have a last dimension whose size",
                    " times bits=", bits, " is a multiple of 32, got shape ", shape_str(q), ".");
  return packed_sizes(q, bits);
}

void check_pack_values(const at::Tensor& q, int64_t bits) {
  TORCH_CHECK_VALUE(q.numel() == 0 || q.max().item<uint8_t>() < (1 << bits), "[pack] q has values >= 2**bits = ",
                    1 << bits, ".");
}

std::vector<c10::SymInt> check_unpack(const at::Tensor& w, int64_t bits) {
  check_bits("unpack", bits);
  check_packed("unpack", w);
  TORCH_CHECK_VALUE(w.dim() >= 1, "[unpack] w must have at least 1 dimension.");
  auto sizes = w.sym_sizes().vec();
  sizes.back() = sizes.back() * 32 / bits;
  TORCH_CHECK_VALUE(sizes.back() * bits == w.sym_size(-1) * 32, "[unpack] w has ", w.sym_size(-1),
                    " words per row, which is not a whole number of ", bits, "-bit values.");
  return sizes;
}

std::vector<c10::SymInt> packed_sizes(const at::Tensor& w, int64_t bits) {
  auto sizes = w.sym_sizes().vec();
  sizes.back() = sizes.back() * bits / 32;
  return sizes;
}

std::vector<c10::SymInt> group_sizes(const at::Tensor& w, int64_t group_size) {
  auto sizes = w.sym_sizes().vec();
  sizes.back() = sizes.back() / group_size;
  return sizes;
}

}  // namespace metalq
