// Kernel choice and geometry for every Metal dispatch (see plan.h).
#include "plan.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "params.h"

namespace metalq {
namespace {

const char* metal_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "float";
    case at::kHalf: return "half";
    case at::kBFloat16: return "bfloat";
    default: TORCH_INTERNAL_ASSERT(false, "no Metal kernels for ", type);
  }
}

template <class Params>
BytesBinding bytes_binding(int index, const Params& params) {
  BytesBinding binding{index, std::vector<uint8_t>(sizeof(Params))};
  std::memcpy(binding.bytes.data(), &params, sizeof(Params));
  return binding;
}

// One thread per work item in threadgroups of kElementwiseThreads, wrapping into y past the x limit.
std::pair<uint32_t, uint32_t> wrapped_grid(uint64_t work_items) {
  const uint64_t groups = (work_items + kElementwiseThreads - 1) / kElementwiseThreads;
  const uint64_t x = std::max<uint64_t>(1, std::min<uint64_t>(groups, kMaxThreadgroupsX));
  const uint64_t y = std::max<uint64_t>(1, (groups + x - 1) / x);
  TORCH_INTERNAL_ASSERT(y <= UINT32_MAX, "grid too large: ", work_items, " work items");
  return {uint32_t(x), uint32_t(y)};
}

DispatchPlan elementwise(std::string kernel, uint64_t work_items, std::vector<BufferBinding> buffers) {
  const auto [x, y] = wrapped_grid(work_items);
  const int params_index = int(buffers.size());
  return DispatchPlan{std::move(kernel),
                      {x, y, 1},
                      {uint32_t(kElementwiseThreads), 1, 1},
                      std::move(buffers),
                      {bytes_binding(params_index, ElementwiseParams{work_items})},
                      {}};
}

uint32_t ceil_div(int64_t a, int64_t b) {
  const int64_t q = (a + b - 1) / b;
  TORCH_INTERNAL_ASSERT(q >= 0 && q <= UINT32_MAX, "grid too large: ", q, " threadgroups on one axis");
  return uint32_t(q);
}

// Every small-M kernel (metal/qmv.h): w 0, scales 1, biases 2, x 3, y 4, QmvParams 5; 64 threads.
DispatchPlan small_m(std::string kernel, std::array<uint32_t, 3> grid, const at::Tensor& x, const at::Tensor& w,
                     const at::Tensor& scales, const at::Tensor& biases, const at::Tensor& y, const QmvParams& p) {
  return DispatchPlan{std::move(kernel),
                      grid,
                      {32, uint32_t(kQmvSimdgroups), 1},
                      {{0, w}, {1, scales}, {2, biases}, {3, x}, {4, y}},
                      {bytes_binding(5, p)},
                      {}};
}

// x @ W.T for M <= kQmvWideMaxRows (and, until the GEMM branch takes them, every larger M).
DispatchPlan plan_qmv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& biases,
                      const at::Tensor& out, int64_t group_size, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const at::ScalarType type = x.scalar_type();
  const uint32_t row_tiles = ceil_div(N, kQmvSimdgroups * kQmvRowsPerSimdgroup);
  QmvParams p{uint32_t(M), uint32_t(N), uint32_t(K), uint32_t(K), 1, 0};
  // Several rows of x: decode each weight once for up to kQmvWideVectors of them.
  if (M >= 2 && M <= kQmvWideMaxRows) {
    const uint32_t tiles = ceil_div(M, kQmvWideVectors);
    p.rows_per_tg = ceil_div(M, tiles);
    return small_m(kernel_name("qmv_wide", type, group_size, bits), {ceil_div(M, p.rows_per_tg), row_tiles, 1}, x,
                   w, scales, biases, out, p);
  }
  // One row of x: the unguarded kernel when whole threadgroups and whole K steps fit.
  const bool aligned = N % (kQmvSimdgroups * kQmvRowsPerSimdgroup) == 0 && K % (32 * qmv_fast_values(int(bits))) == 0;
  return small_m(kernel_name(aligned ? "qmv_fast" : "qmv", type, group_size, bits), {uint32_t(M), row_tiles, 1}, x,
                 w, scales, biases, out, p);
}

// out = the sum of the float partials [parts, M, N] over parts, rounded once to out's dtype.
DispatchPlan split_k_reduce(const at::Tensor& partials, const at::Tensor& out) {
  const uint64_t work = uint64_t(out.numel());
  const auto [x, y] = wrapped_grid(work);
  return DispatchPlan{std::string("split_k_reduce_") + metal_type(out.scalar_type()),
                      {x, y, 1},
                      {uint32_t(kElementwiseThreads), 1, 1},
                      {{0, partials}, {1, out}},
                      {bytes_binding(2, SplitKReduceParams{work, uint32_t(partials.size(0)), 0})},
                      {}};
}

// x @ W for small M: qvm, or for long K qvm_split_k into float partials plus split_k_reduce.
std::vector<DispatchPlan> plan_qvm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                   const at::Tensor& biases, const at::Tensor& out, int64_t group_size, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const at::ScalarType type = x.scalar_type();
  const uint32_t col_tiles = ceil_div(N, kQmvSimdgroups * kQvmColumnsPerSimdgroup);
  QmvParams p{uint32_t(M), uint32_t(N), uint32_t(K), uint32_t(K), 1, 0};
  if (K < kQvmSplitKMinK || M > kQvmSplitKMaxRows) {
    return {small_m(kernel_name("qvm", type, group_size, bits), {uint32_t(M), col_tiles, 1}, x, w, scales, biases,
                    out, p)};
  }
  const int64_t parts = K > kQvmSplitKLongK ? kQvmSplitKPartsLongK : kQvmSplitKParts;
  p.k_chunk = ceil_div(ceil_div(K, parts), 32) * 32;  // whole lane strides per partition
  const uint32_t used = ceil_div(K, p.k_chunk);
  at::Tensor partials = at::empty({int64_t(used), M, N}, out.options().dtype(at::kFloat));
  std::vector<DispatchPlan> plans;
  plans.push_back(small_m(kernel_name("qvm_split_k", type, group_size, bits), {uint32_t(M), col_tiles, used}, x, w,
                          scales, biases, partials, p));
  plans.push_back(split_k_reduce(partials, out));
  return plans;
}

// x @ W.T or x @ W for M >= kQmmMinRows: the tiled GEMM (metal/qmm.h), one 32x32 tile of y per
// threadgroup. When y has too few tiles to fill the GPU and K is long, grid z splits K into
// partitions writing float partials [partitions, M, N], which split_k_reduce sums into out.
std::vector<DispatchPlan> plan_qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                   const at::Tensor& biases, const at::Tensor& out, int64_t group_size, int64_t bits,
                                   bool transpose) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const int64_t tiles = int64_t(ceil_div(N, kQmmBN)) * ceil_div(M, kQmmBM);
  int64_t parts = std::min<int64_t>(kQmmSplitKTargetThreadgroups / tiles, K / kQmmSplitKMinPartitionK);
  int64_t k_per_split = K;
  if (parts >= 2) {
    k_per_split = int64_t(ceil_div(ceil_div(K, parts), kQmmBK)) * kQmmBK;
    parts = ceil_div(K, k_per_split);
  } else {
    parts = 1;
  }
  const QmmParams p{uint32_t(M), uint32_t(N), uint32_t(K), uint32_t(k_per_split)};
  const std::string kernel = std::string(transpose ? "qmm_t" : "qmm_n") + (parts > 1 ? "_splitk" : "");
  const at::Tensor y = parts > 1 ? at::empty({parts, M, N}, out.options().dtype(at::kFloat)) : out;
  std::vector<DispatchPlan> plans{DispatchPlan{kernel_name(kernel, x.scalar_type(), group_size, bits),
                                               {ceil_div(N, kQmmBN), ceil_div(M, kQmmBM), uint32_t(parts)},
                                               {uint32_t(kQmmThreads), 1, 1},
                                               {{0, w}, {1, scales}, {2, biases}, {3, x}, {4, y}},
                                               {bytes_binding(5, p)},
                                               {}}};
  if (parts > 1) {
    plans.push_back(split_k_reduce(y, out));
  }
  return plans;
}

}  // namespace

std::string kernel_name(const std::string& kernel, at::ScalarType type, int64_t group_size, int64_t bits) {
  return "affine_" + kernel + "_" + metal_type(type) + "_gs_" + std::to_string(group_size) + "_b_" +
         std::to_string(bits);
}

DispatchPlan plan_affine_quantize(const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales,
                                  const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return elementwise(kernel_name("quantize", w.scalar_type(), group_size, bits), uint64_t(w.numel() / group_size),
                     {{0, w}, {1, wq}, {2, scales}, {3, biases}});
}

DispatchPlan plan_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                    const at::Tensor& out, int64_t group_size, int64_t bits) {
  return elementwise(kernel_name("dequantize", scales.scalar_type(), group_size, bits),
                     uint64_t(wq.numel() * 4 / pack_unit_bytes(int(bits))), {{0, wq}, {1, scales}, {2, biases}, {3, out}});
}

// The decision tree for every quantized matmul, on the shape alone:
//   x @ W.T: M in [2, kQmvWideMaxRows] -> qmv_wide; else qmv_fast when N % 8 == 0 and K fills whole
//            qmv_fast steps, else qmv (any N, any K);
//   x @ W:   K >= kQvmSplitKMinK and M <= kQvmSplitKMaxRows -> qvm_split_k + split_k_reduce; else qvm.
// Either orientation, M >= kQmmMinRows: the tiled GEMM qmm_t / qmm_n, or when y has few 32x32
// tiles and K is long, qmm_{t,n}_splitk + split_k_reduce.
std::vector<DispatchPlan> plan_affine_qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                          const at::Tensor& biases, const at::Tensor& out, int64_t group_size,
                                          int64_t bits, bool transpose) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && out.dim() == 2 && x.is_contiguous() && out.is_contiguous());
  if (out.numel() == 0) {
    return {};
  }
  if (x.size(0) >= kQmmMinRows) {
    return plan_qmm(x, w, scales, biases, out, group_size, bits, transpose);
  }
  if (transpose) {
    return {plan_qmv(x, w, scales, biases, out, group_size, bits)};
  }
  return plan_qvm(x, w, scales, biases, out, group_size, bits);
}

}  // namespace metalq
