// CPU building blocks shared by the affine ops (quantized.cpp) and the fp-mode ops (fp_quantized.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>

#include "../checks.h"
#include "kernels.h"

namespace metalq::cpu {

// One matrix of w [rows, words] with its scales and biases (undefined for an fp mode) as the kernels
// read it; the views stay alive for the whole product.
using MatrixOf = std::function<PackedMatrix(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& biases)>;

// x @ W.T (transpose: each matrix of w is [N, K]) or x @ W (W is [K, N]) with x, w, scales, biases as
// validated into `shape` by the op's check (a batch of weights broadcasts like torch.matmul), in x's
// dtype, accumulated in float32: fused kernels for few rows of x, dequantized tiles and a GEMM for many.
at::Tensor batched_qmm(const QmmShape& shape, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const at::Tensor& biases, const MatrixOf& matrix, bool transpose);

// ---- the LSB-first bitstream of MLX's format ----------------------------------------------------

// Packs `count` values of `bits` bits (count * bits is a multiple of 32) into words.
template <class Q>
void pack_row(const Q* q, int64_t count, int bits, uint32_t* words) {
  uint64_t acc = 0;
  int filled = 0;
  for (int64_t i = 0; i < count; ++i) {
    acc |= uint64_t(q[i]) << filled;
    filled += bits;
    if (filled >= 32) {
      *words++ = uint32_t(acc);
      acc >>= 32;
      filled -= 32;
    }
  }
}

inline void unpack_row(const uint32_t* words, int64_t count, int bits, uint8_t* q) {
  const uint64_t mask = (uint64_t(1) << bits) - 1;
  uint64_t acc = 0;
  int avail = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (avail < bits) {
      acc |= uint64_t(*words++) << avail;
      avail += 32;
    }
    q[i] = uint8_t(acc & mask);
    acc >>= bits;
    avail -= bits;
  }
}

}  // namespace metalq::cpu
