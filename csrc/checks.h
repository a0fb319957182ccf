// Argument validation for every metalq op. Each backend (CPU, Meta, MPS) calls these first, so the
// rules and their messages exist once. Sizes are read as SymInts so the Meta kernels also serve
// torch.compile with dynamic shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <utility>
#include <vector>

namespace metalq {

// Logical shape of a quantized matmul: y[..., M, N] = x[..., M, K] @ W where W is [..., N, K]
// (transposed) or [..., K, N].
struct QmmShape {
  c10::SymInt K;  // contraction length
  c10::SymInt N;  // output features
  std::vector<c10::SymInt> out_sizes;  // the output's shape
};

void check_bits(const char* op, int64_t bits);
void check_format(const char* op, int64_t group_size, int64_t bits);

// w: float (..., R, K) with K % group_size == 0.
void check_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits);

// Data-dependent part of the quantize rules (real tensors only, not Meta): every value finite.
void check_finite_weights(const at::Tensor& w, const char* op = "affine_quantize");

// Returns the unpacked last dimension K = wq.size(-1) * 32 / bits.
c10::SymInt check_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                    const at::Tensor& biases, int64_t group_size, int64_t bits);

// w, scales, biases may carry batch dimensions (the same for all three); see the broadcast rule in
// checks.cpp. The output's shape is in the result.
QmmShape check_affine_qmm(const char* op, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& scales, const at::Tensor& biases, int64_t group_size,
                          int64_t bits, bool transpose);

// Logical shape of affine_gather_qmm: out[i] = x[lhs[i]] @ W[rhs[i]] for every i of the broadcast
// index shape `batch`, so the output is batch + [M, N]. x is (..., M, K) and holds x_count matrices;
// w is (..., rows, cols) and holds w_count. A missing index defaults to arange(count) in the batch
// shape of its operand (MLX's gather_qmm rule).
struct GatherQmmShape {
  std::vector<c10::SymInt> batch;
  c10::SymInt M, K, N;
  c10::SymInt x_count, w_count;
  std::vector<c10::SymInt> out_sizes() const;
};

GatherQmmShape check_affine_gather_qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                       const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
                                       const std::optional<at::Tensor>& rhs_indices, int64_t group_size,
                                       int64_t bits, bool transpose);

// The (lhs, rhs) pair of every output matrix of affine_gather_qmm, flattened over shape.batch, as
// int64 on the indices' device. Checks the index values (real tensors only, not Meta): each must
// address a matrix of its operand.
std::pair<at::Tensor, at::Tensor> gather_index_pairs(const GatherQmmShape& shape,
                                                     const std::optional<at::Tensor>& lhs_indices,
                                                     const std::optional<at::Tensor>& rhs_indices,
                                                     const at::Tensor& x, const at::Tensor& w);

// ---- MLX's floating-point modes (metal/fp_format.h): mxfp4, nvfp4, mxfp8 -------------------------

// The FpMode of a mode name; anything else (including "affine") is an error naming the op.
int check_fp_mode(const char* op, c10::string_view mode);

// w: float (..., R, K) with K a multiple of the mode's group size; global_scale: nvfp4 only, a float32
// scalar on w's device.
void check_fp_quantize(const at::Tensor& w, int mode, const std::optional<at::Tensor>& global_scale);

// Returns the unpacked last dimension K = wq.size(-1) * 32 / bits.
c10::SymInt check_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, int mode,
                                const std::optional<at::Tensor>& global_scale);

// fp_dequantize's output dtype: `dtype`, else MLX's default: bfloat16, or float32 with a global scale.
at::ScalarType fp_dequantize_dtype(std::optional<at::ScalarType> dtype, const std::optional<at::Tensor>& global_scale);

// w and scales may carry batch dimensions (the same for both), broadcast against x as for check_affine_qmm.
QmmShape check_fp_qmm(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int mode,
                      const std::optional<at::Tensor>& global_scale, bool transpose);

// q: uint8 (..., count) with count * bits % 32 == 0. Returns the packed sizes (..., count*bits/32).
std::vector<c10::SymInt> check_pack(const at::Tensor& q, int64_t bits);
// Data-dependent part of the pack rules (real tensors only, not Meta): every value < 2**bits. One
// reduction over q, shared by the CPU and MPS ops.
void check_pack_values(const at::Tensor& q, int64_t bits);
// w: uint32 (..., words). Returns the unpacked sizes (..., words*32/bits).
std::vector<c10::SymInt> check_unpack(const at::Tensor& w, int64_t bits);

// Output sizes of quantize: packed (..., R, K*bits/32) and groups (..., R, K/group_size).
std::vector<c10::SymInt> packed_sizes(const at::Tensor& w, int64_t bits);
std::vector<c10::SymInt> group_sizes(const at::Tensor& w, int64_t group_size);

} // namespace metalq
