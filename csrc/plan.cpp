// Kernel choice and geometry for every Metal dispatch (see plan.h).
#include "plan.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>

#include "fp_format.h"
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

// One thread per work item in threadgroups of `threads`, wrapping into y past the x limit.
std::pair<uint32_t, uint32_t> wrapped_grid(uint64_t work_items, uint64_t threads = kElementwiseThreads) {
  const uint64_t groups = (work_items + threads - 1) / threads;
  const uint64_t x = std::max<uint64_t>(1, std::min<uint64_t>(groups, kMaxThreadgroupsX));
  const uint64_t y = std::max<uint64_t>(1, (groups + x - 1) / x);
  TORCH_INTERNAL_ASSERT(y <= UINT32_MAX, "grid too large: ", work_items, " work items");
  return {uint32_t(x), uint32_t(y)};
}

// The ElementwiseParams go after the buffers, or at params_index when a buffer slot may stay unbound.
DispatchPlan elementwise(std::string kernel, uint64_t work_items, std::vector<BufferBinding> buffers,
                         int params_index = -1) {
  const auto [x, y] = wrapped_grid(work_items);
  if (params_index < 0) params_index = int(buffers.size());
  return DispatchPlan{std::move(kernel),
                      {x, y, 1},
                      {uint32_t(kElementwiseThreads), 1, 1},
                      std::move(buffers),
                      {bytes_binding(params_index, ElementwiseParams{work_items})},
                      {},
                      work_items};
}

// Threadgroups along one grid axis.
uint32_t grid_axis(int64_t n) {
  TORCH_INTERNAL_ASSERT(n >= 0 && n <= UINT32_MAX, "grid too large: ", n, " threadgroups on one axis");
  return uint32_t(n);
}

uint32_t ceil_div(int64_t a, int64_t b) { return grid_axis((a + b - 1) / b); }

// Every matmul kernel binds w 0, scales 1, biases 2 (an fp mode's global scale, if any), x 3, y 4,
// its shape parameters 5, and at 6 BatchParams or, for a gather, the buffer of (x, w) matrix pairs.
template <class Params>
DispatchPlan matmul(std::string kernel, std::array<uint32_t, 3> grid, std::array<uint32_t, 3> threads,
                    const QmmOperands& ops, const at::Tensor& y, const Params& p) {
  DispatchPlan plan{std::move(kernel), grid, threads, {{0, ops.w}, {1, ops.scales}}, {bytes_binding(5, p)}, {}};
  if (ops.biases.defined()) {
    plan.buffers.push_back({2, ops.biases});
  }
  plan.buffers.push_back({3, ops.x});
  plan.buffers.push_back({4, y});
  if (ops.gather_pairs.defined()) {
    plan.buffers.push_back({6, ops.gather_pairs});
  } else {
    plan.bytes.push_back(bytes_binding(6, ops.batch));
  }
  return plan;
}

// The host name of a matmul kernel: its gather variant for a gather.
std::string matmul_kernel(const QmmOperands& ops, const std::string& kernel, const WeightFormat& format) {
  return format.kernel(ops.gather_pairs.defined() ? "gather_" + kernel : kernel, ops.x.scalar_type());
}

// Every small-M kernel (metal/qmv.h): 64 threads, grid z = the batch (times split-K partitions).
DispatchPlan small_m(std::string kernel, std::array<uint32_t, 3> grid, const QmmOperands& ops, const at::Tensor& y,
                     const QmvParams& p) {
  return matmul(std::move(kernel), grid, {32, uint32_t(kQmvSimdgroups), 1}, ops, y, p);
}

// x @ W.T for M < kQmmMinRows.
DispatchPlan plan_qmv(const QmmOperands& ops, const at::Tensor& out, int64_t N, const WeightFormat& format) {
  const int64_t M = ops.M, K = ops.x.size(-1);
  const uint32_t row_tiles = ceil_div(N, kQmvRows);
  QmvParams p{uint32_t(M), uint32_t(N), uint32_t(K), uint32_t(K), 1, 0};
  // A short K: a quad of lanes per row of W, for every M (as MLX; each row of x rereads W, which the
  // GPU's cache serves at these sizes).
  const bool quad_k = std::find(std::begin(kQmvQuadK), std::end(kQmvQuadK), K) != std::end(kQmvQuadK);
  if (quad_k && (format.bits & (format.bits - 1)) == 0) {
    return matmul(matmul_kernel(ops, "qmv_quad_k" + std::to_string(K), format),
                  {uint32_t(M), ceil_div(N, kQmvQuadRows), ops.batch.count}, {32, 1, 1}, ops, out, p);
  }
  // Several rows of x: decode each weight once for up to kQmvWideVectors of them.
  if (M >= 2) {
    const uint32_t tiles = ceil_div(M, kQmvWideVectors);
    p.rows_per_tg = ceil_div(M, tiles);
    return small_m(matmul_kernel(ops, "qmv_wide", format),
                   {ceil_div(M, p.rows_per_tg), row_tiles, ops.batch.count}, ops, out, p);
  }
  // One row of x: the unguarded kernel when whole threadgroups and whole K steps fit.
  const bool aligned = N % kQmvRows == 0 && K % (32 * qmv_fast_values(int(format.bits))) == 0;
  return small_m(matmul_kernel(ops, aligned ? "qmv_fast" : "qmv", format), {1, row_tiles, ops.batch.count}, ops, out,
                 p);
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
                      {},
                      work};
}

// x @ W for small M: qvm, or for long K qvm_split_k into float partials plus split_k_reduce.
std::vector<DispatchPlan> plan_qvm(const QmmOperands& ops, const at::Tensor& out, int64_t N,
                                   const WeightFormat& format) {
  const int64_t M = ops.M, K = ops.x.size(-1), count = ops.batch.count;
  const at::ScalarType type = ops.x.scalar_type();
  const uint32_t col_tiles = ceil_div(N, kQmvSimdgroups * kQvmColumnsPerSimdgroup);
  QmvParams p{uint32_t(M), uint32_t(N), uint32_t(K), uint32_t(K), 1, 0};
  // A gather already spreads its items over grid z; it does not split K.
  if (K < kQvmSplitKMinK || M > kQvmSplitKMaxRows || ops.gather_pairs.defined()) {
    return {small_m(matmul_kernel(ops, "qvm", format), {uint32_t(M), col_tiles, grid_axis(count)}, ops, out, p)};
  }
  const int64_t parts = K > kQvmSplitKLongK ? kQvmSplitKPartsLongK : kQvmSplitKParts;
  p.k_chunk = ceil_div(ceil_div(K, parts), 32) * 32;  // whole lane strides per partition
  const uint32_t used = ceil_div(K, p.k_chunk);
  at::Tensor partials = at::empty({int64_t(used), count, M, N}, out.options().dtype(at::kFloat));
  std::vector<DispatchPlan> plans;
  plans.push_back(small_m(format.kernel("qvm_split_k", type),
                          {uint32_t(M), col_tiles, grid_axis(used * count)}, ops, partials, p));
  plans.push_back(split_k_reduce(partials, out));
  return plans;
}

// x @ W.T or x @ W for M >= kQmmMinRows: the tiled GEMM (metal/qmm.h), one 32x32 tile of y per
// threadgroup. When y has too few tiles to fill the GPU and K is long, grid z splits K into
// partitions writing float partials [partitions, count, M, N], which split_k_reduce sums into out.
std::vector<DispatchPlan> plan_gemm(const QmmOperands& ops, const at::Tensor& out, int64_t N,
                                    const WeightFormat& format, bool transpose) {
  const int64_t M = ops.M, K = ops.x.size(-1), count = ops.batch.count;
  const int64_t tiles = int64_t(ceil_div(N, kQmmBN)) * ceil_div(M, kQmmBM) * count;
  int64_t parts = std::min<int64_t>(kQmmSplitKTargetThreadgroups / tiles, K / kQmmSplitKMinPartitionK);
  int64_t k_per_split = K;
  if (parts >= 2 && !ops.gather_pairs.defined()) {
    k_per_split = int64_t(ceil_div(ceil_div(K, parts), kQmmBK)) * kQmmBK;
    parts = ceil_div(K, k_per_split);
  } else {
    parts = 1;
  }
  const QmmParams p{uint32_t(M), uint32_t(N), uint32_t(K), uint32_t(k_per_split)};
  const std::string kernel = std::string(transpose ? "qmm_t" : "qmm_n") + (parts > 1 ? "_splitk" : "");
  const at::Tensor y = parts > 1 ? at::empty({parts, count, M, N}, out.options().dtype(at::kFloat)) : out;
  std::vector<DispatchPlan> plans{matmul(matmul_kernel(ops, kernel, format),
                                         {ceil_div(N, kQmmBN), ceil_div(M, kQmmBM), grid_axis(parts * count)},
                                         {uint32_t(kQmmThreads), 1, 1}, ops, y, p)};
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

std::string bits_kernel_name(const std::string& kernel, int64_t bits) {
  return kernel + "_b_" + std::to_string(bits);
}

WeightFormat WeightFormat::affine(int64_t group_size, int64_t bits) { return {group_size, bits, std::nullopt, false}; }

WeightFormat WeightFormat::fp(int mode, bool has_global) {
  return {fp_group_size(mode), fp_bits(mode), mode, has_global};
}

DispatchPlan fit_thread_limit(DispatchPlan plan, uint64_t max_threads) {
  const auto& t = plan.threads_per_threadgroup;
  const uint64_t threads = uint64_t(t[0]) * t[1] * t[2];
  if (threads <= max_threads) return plan;
  TORCH_CHECK(plan.elementwise_work_items > 0 && max_threads > 0, "metalq: kernel ", plan.kernel, " needs ", threads,
              " threads per threadgroup but its Metal pipeline allows ", max_threads,
              " on this GPU; please report it to metalq with the output of `python -m metalq doctor`");
  const uint64_t fitted = max_threads >= 32 ? max_threads / 32 * 32 : max_threads;
  const auto [x, y] = wrapped_grid(plan.elementwise_work_items, fitted);
  plan.threadgroups = {x, y, 1};
  plan.threads_per_threadgroup = {uint32_t(fitted), 1, 1};
  return plan;
}

std::string WeightFormat::kernel(const std::string& name, at::ScalarType type) const {
  return fp_mode ? fp_kernel_name(name, *fp_mode, type, has_global) : kernel_name(name, type, group_size, bits);
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

// Buffers: the input 0, the output 1, the params 2; work items: packing units (pack_unit_bytes).
DispatchPlan plan_pack(const at::Tensor& q, const at::Tensor& w, int64_t bits) {
  return elementwise(bits_kernel_name("pack", bits), uint64_t(w.numel() * 4 / pack_unit_bytes(int(bits))),
                     {{0, q}, {1, w}});
}

DispatchPlan plan_unpack(const at::Tensor& w, const at::Tensor& q, int64_t bits) {
  return elementwise(bits_kernel_name("unpack", bits), uint64_t(w.numel() * 4 / pack_unit_bytes(int(bits))),
                     {{0, w}, {1, q}});
}

namespace {

// t with every dimension in `dims` that it broadcasts by stride 0 cut to size 1, so that contiguous()
// keeps a single copy of a broadcast operand.
at::Tensor unbroadcast(const at::Tensor& t, const std::vector<bool>& dims) {
  at::Tensor out = t;
  for (size_t d = 0; d < dims.size(); ++d) {
    if (dims[d]) out = out.narrow(int64_t(d), 0, 1);
  }
  return out.contiguous();
}

std::vector<bool> broadcast_dims(const at::Tensor& t, int64_t batch_dims) {
  std::vector<bool> dims(batch_dims);
  for (int64_t d = 0; d < batch_dims; ++d) dims[d] = t.stride(d) == 0 && t.size(d) > 1;
  return dims;
}

// One batch dimension of y: its size and the strides, in matrices, of x and of w along it.
struct BatchDim {
  int64_t size, x_stride, w_stride;
};

// Strides in matrices of a contiguous operand with batch sizes `sizes`, right-aligned to `rank`
// dimensions; 0 where it has size 1 (broadcast) or lacks the dimension.
std::vector<int64_t> matrix_strides(at::IntArrayRef sizes, size_t rank) {
  std::vector<int64_t> strides(rank, 0);
  int64_t stride = 1;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const int64_t size = sizes[sizes.size() - 1 - i];
    strides[rank - 1 - i] = size == 1 ? 0 : stride;
    stride *= size;
  }
  return strides;
}

}  // namespace

QmmOperands qmm_operands(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const at::Tensor& biases) {
  QmmOperands ops{};
  ops.batch.count = 1;
  const int64_t K = x.size(-1);
  if (w.dim() == 2) {
    ops.x = x.reshape({-1, K}).contiguous();
    ops.M = ops.x.size(0);
    ops.w = w.contiguous(), ops.scales = scales.contiguous();
    if (biases.defined()) ops.biases = biases.contiguous();
    return ops;
  }
  const at::Tensor xm = x.dim() == 1 ? x.unsqueeze(0) : x;
  ops.x = unbroadcast(xm, broadcast_dims(xm, xm.dim() - 2));
  ops.M = ops.x.size(-2);
  // w, scales and biases share one batch shape; one copy where all three broadcast.
  auto w_dims = broadcast_dims(w, w.dim() - 2);
  const auto s_dims = broadcast_dims(scales, w.dim() - 2);
  const auto b_dims = biases.defined() ? broadcast_dims(biases, w.dim() - 2) : s_dims;
  for (size_t d = 0; d < w_dims.size(); ++d) w_dims[d] = w_dims[d] && s_dims[d] && b_dims[d];
  ops.w = unbroadcast(w, w_dims), ops.scales = unbroadcast(scales, w_dims);
  if (biases.defined()) ops.biases = unbroadcast(biases, w_dims);

  // Sizes from the operands as given, strides from the single copies bound.
  const auto x_batch = xm.sizes().slice(0, xm.dim() - 2), w_batch = w.sizes().slice(0, w.dim() - 2);
  const size_t rank = std::max(x_batch.size(), w_batch.size());
  const auto x_strides = matrix_strides(ops.x.sizes().slice(0, x_batch.size()), rank);
  const auto w_strides = matrix_strides(ops.w.sizes().slice(0, w_batch.size()), rank);
  // y's batch dimensions outer to inner, without size-1 ones, merged where neither operand jumps.
  std::vector<BatchDim> dims;
  for (size_t d = 0; d < rank; ++d) {
    const int64_t xs = d + x_batch.size() >= rank ? x_batch[d + x_batch.size() - rank] : 1;
    const int64_t ws = d + w_batch.size() >= rank ? w_batch[d + w_batch.size() - rank] : 1;
    const BatchDim dim{std::max(xs, ws) * (xs != 0 && ws != 0), x_strides[d], w_strides[d]};
    if (dim.size == 1) continue;
    if (!dims.empty() && dims.back().x_stride == dim.x_stride * dim.size &&
        dims.back().w_stride == dim.w_stride * dim.size) {
      dims.back() = BatchDim{dims.back().size * dim.size, dim.x_stride, dim.w_stride};
    } else {
      dims.push_back(dim);
    }
  }
  // Innermost items sharing one w whose x matrices follow each other are rows of one taller x.
  if (!dims.empty() && dims.back().w_stride == 0 && dims.back().x_stride == 1) {
    const int64_t rows = dims.back().size;
    ops.M *= rows;
    dims.pop_back();
    for (BatchDim& dim : dims) dim.x_stride /= rows;
  }
  TORCH_INTERNAL_ASSERT(dims.size() <= size_t(kMaxBatchDims), "checks bound the batch rank");
  int64_t count = 1;
  ops.batch.ndim = uint32_t(dims.size());
  for (size_t d = 0; d < dims.size(); ++d) {
    ops.batch.shape[d] = uint32_t(dims[d].size);
    ops.batch.x_stride[d] = uint32_t(dims[d].x_stride);
    ops.batch.w_stride[d] = uint32_t(dims[d].w_stride);
    count *= dims[d].size;
  }
  TORCH_INTERNAL_ASSERT(count <= UINT32_MAX, "checks bound the batch count");
  ops.batch.count = uint32_t(count);
  return ops;
}

QmmOperands fp_qmm_operands(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const std::optional<at::Tensor>& global_scale) {
  QmmOperands ops = qmm_operands(x, w, scales, at::Tensor());
  if (global_scale) ops.biases = global_scale->contiguous();
  return ops;
}

std::string fp_kernel_name(const std::string& kernel, int mode, at::ScalarType type, bool has_global) {
  static const char* const names[] = {"mxfp4", "nvfp4", "mxfp8"};  // indexed by FpMode
  return "fp_" + kernel + "_" + names[mode] + "_" + metal_type(type) + (has_global ? "_global" : "");
}

// Buffers 0-2 as below, the global scale at 3 (quantize) or 2 (dequantize) when given, params at 4.
DispatchPlan plan_fp_quantize(const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales, int mode,
                              const std::optional<at::Tensor>& global_scale) {
  std::vector<BufferBinding> buffers{{0, w}, {1, wq}, {2, scales}};
  if (global_scale) buffers.push_back({3, *global_scale});
  return elementwise(fp_kernel_name("quantize", mode, w.scalar_type(), global_scale.has_value()),
                     uint64_t(w.numel() / fp_group_size(mode)), std::move(buffers), 4);
}

DispatchPlan plan_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& out, int mode,
                                const std::optional<at::Tensor>& global_scale) {
  std::vector<BufferBinding> buffers{{0, wq}, {1, scales}, {3, out}};
  if (global_scale) buffers.push_back({2, *global_scale});
  return elementwise(fp_kernel_name("dequantize", mode, out.scalar_type(), global_scale.has_value()),
                     uint64_t(wq.numel()), std::move(buffers), 4);
}

// The decision tree for every quantized matmul, on the shape alone, the same for every weight format
// (bits below are the format's: 4 for mxfp4 / nvfp4, 8 for mxfp8). M is the rows of x per matrix
// after qmm_operands folded what it could; every kernel walks y's batch on grid z, so the batch never
// changes the branch (a gather never splits K). Thresholds live in metal/params.h.
//
//   M >= kQmmMinRows (9), either orientation: the tiled GEMM, each weight decoded once per 32 rows of
//   x instead of once per 1-4 rows. MLX switches at 6-18 rows depending on the GPU; qmv_wide covers
//   2-8 at one decode per 4 rows, so 9 is where a 32-row tile starts to pay.
//     tiles x batch <= kQmmSplitKTargetThreadgroups / 2 and K >= 2 * kQmmSplitKMinPartitionK
//                                     -> qmm_t_splitk / qmm_n_splitk + split_k_reduce: K partitions of
//                                        >= 256 (their float partials cost less than the x and W bytes
//                                        they read) until ~512 threadgroups, 8 per core of the largest GPUs.
//     otherwise                       -> qmm_t / qmm_n (grid ceil(N/32) x ceil(M/32) x batch).
//   x @ W.T, M < 9:
//     K in {64, 128}, bits 1/2/4/8     -> qmv_quad_k<K>: a quad of lanes per row; a simdgroup per row
//                                        would give each lane 2-4 values (MLX's rule, for every M).
//     M in [2, 9)                     -> qmv_wide: each weight decoded once for up to kQmvWideVectors (4)
//                                        rows of x; from M = 2 this beats decoding per row.
//     N % 8 == 0 and K % (32 * qmv_fast_values(bits)) == 0
//                                     -> qmv_fast: no guards, two packs per lane per step.
//     otherwise                       -> qmv: rows >= N and lanes past K guarded, one pack per lane.
//   x @ W, M < 9:
//     K >= kQvmSplitKMinK (1024) and M <= kQvmSplitKMaxRows (4)
//                                     -> qvm_split_k + split_k_reduce: 8 partitions of K (32 past
//                                        K = 8192), as MLX: M x N/64 threadgroups are too few alone.
//     otherwise                       -> qvm.
std::vector<DispatchPlan> plan_qmm(const QmmOperands& ops, const at::Tensor& out, const WeightFormat& format,
                                   bool transpose) {
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && out.numel() == int64_t(ops.batch.count) * ops.M * out.size(-1));
  if (out.numel() == 0) {
    return {};
  }
  const int64_t N = out.size(-1);
  if (ops.M >= kQmmMinRows) {
    return plan_gemm(ops, out, N, format, transpose);
  }
  if (transpose) {
    return {plan_qmv(ops, out, N, format)};
  }
  return plan_qvm(ops, out, N, format);
}

QmmOperands gather_qmm_operands(const GatherQmmShape& shape, const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& scales, const at::Tensor& biases,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, bool sorted_indices) {
  const auto [lhs, rhs] = gather_index_pairs(shape, lhs_indices, rhs_indices, x, w);
  const int64_t x_count = shape.x_count.expect_int(), w_count = shape.w_count.expect_int(), items = lhs.numel();
  TORCH_INTERNAL_ASSERT(items <= UINT32_MAX && x_count <= UINT32_MAX && w_count <= UINT32_MAX);
  const auto matrices = [](const at::Tensor& t, int64_t count) {
    return t.reshape({count, t.size(-2), t.size(-1)}).contiguous();
  };
  QmmOperands ops{};
  ops.x = matrices(x, x_count);
  ops.w = matrices(w, w_count), ops.scales = matrices(scales, w_count), ops.biases = matrices(biases, w_count);
  ops.M = x.size(-2);
  ops.batch.count = uint32_t(items);
  ops.gather_pairs = at::stack({lhs, rhs}, 1).to(at::kInt);
  ops.sorted_rows = sorted_indices && !lhs_indices && ops.M == 1 && x_count == items;
  return ops;
}

// A gather takes the decision tree of plan_qmm over its items (without split-K), except that
// many expert-sorted decode rows go to affine_gather_qmm_rhs: grid (ceil(N/32), ceil(items/32), 1).
std::vector<DispatchPlan> plan_affine_gather_qmm(const QmmOperands& ops, const at::Tensor& out, int64_t group_size,
                                                 int64_t bits, bool transpose) {
  TORCH_INTERNAL_ASSERT(ops.gather_pairs.defined());
  const int64_t items = ops.batch.count, N = out.size(-1), K = ops.x.size(-1);
  if (out.numel() != 0 && ops.sorted_rows && items >= kGatherRhsMinItems &&
      items >= kGatherRhsMinItemsPerExpert * ops.w.size(0)) {
    const QmmParams p{uint32_t(items), uint32_t(N), uint32_t(K), uint32_t(K)};
    return {matmul(kernel_name(transpose ? "gather_qmm_rhs_t" : "gather_qmm_rhs_n", ops.x.scalar_type(), group_size,
                               bits),
                   {ceil_div(N, kQmmBN), ceil_div(items, kQmmBM), 1}, {uint32_t(kQmmThreads), 1, 1}, ops, out, p)};
  }
  return plan_qmm(ops, out, WeightFormat::affine(group_size, bits), transpose);
}

}  // namespace metalq
