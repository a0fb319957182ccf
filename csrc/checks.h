// Argument validation for every metalq op. Each backend (CPU, Meta, MPS) calls these first, so the
// rules and their messages exist once. Sizes are read as SymInts so the Meta kernels also serve
// torch.compile with dynamic shapes.
#pragma once

#include <ATen/core/Tensor.h>

namespace metalq {

// Logical shape of a quantized matmul: y[M, N] = x[M, K] @ W where W is [N, K] (transposed) or [K, N].
struct QmmShape {
  c10::SymInt K;  // contraction length
  c10::SymInt N;  // output features
};

void check_bits(const char* op, int64_t bits);
void check_format(const char* op, int64_t group_size, int64_t bits);

// w: float (..., R, K) with K % group_size == 0.
void check_affine_quantize(const at::Tensor& w, int64_t group_size, int64_t bits);

// Data-dependent part of the quantize rules (real tensors only, not Meta): every value finite.
void check_finite_weights(const at::Tensor& w);

// Returns the unpacked last dimension K = wq.size(-1) * 32 / bits.
c10::SymInt check_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales,
                                    const at::Tensor& biases, int64_t group_size, int64_t bits);

QmmShape check_affine_qmm(const char* op, const at::Tensor& x, const at::Tensor& w,
                          const at::Tensor& scales, const at::Tensor& biases, int64_t group_size,
                          int64_t bits, bool transpose);

// q: uint8 (..., count) with count * bits % 32 == 0. Returns the packed sizes (..., count*bits/32).
std::vector<c10::SymInt> check_pack(const at::Tensor& q, int64_t bits);
// w: uint32 (..., words). Returns the unpacked sizes (..., words*32/bits).
std::vector<c10::SymInt> check_unpack(const at::Tensor& w, int64_t bits);

// Output sizes of quantize: packed (..., R, K*bits/32) and groups (..., R, K/group_size).
std::vector<c10::SymInt> packed_sizes(const at::Tensor& w, int64_t bits);
std::vector<c10::SymInt> group_sizes(const at::Tensor& w, int64_t group_size);

} // namespace metalq
