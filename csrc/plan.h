// DispatchPlan: the one place that chooses a Metal kernel and its geometry for an op call. The Mac
// encoder (csrc/mps) and the test emulator both turn a plan into a dispatch; neither chooses itself.
// Platform-neutral C++: compiled on every platform so the choice is tested where no GPU exists.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "params.h"

namespace metalq {

// setBuffer(tensor's storage, its byte offset, index). Tensors are contiguous.
struct BufferBinding {
  int index;
  at::Tensor tensor;
};

// setBytes(bytes, index): a parameter struct from params.h, in the shader's layout.
struct BytesBinding {
  int index;
  std::vector<uint8_t> bytes;
};

// One dispatchThreadgroups call.
struct DispatchPlan {
  std::string kernel;  // host name in the metallib, from kernel_name()
  std::array<uint32_t, 3> threadgroups;
  std::array<uint32_t, 3> threads_per_threadgroup;
  std::vector<BufferBinding> buffers;
  std::vector<BytesBinding> bytes;
  std::vector<std::pair<int, uint32_t>> threadgroup_memory;  // setThreadgroupMemoryLength(length, index)
  // An elementwise kernel (one thread per work item, flat index over the grid) works with any
  // threadgroup size: its work items, else 0 for a kernel whose geometry is fixed.
  uint64_t elementwise_work_items = 0;
};

// The plan for a pipeline that allows at most max_threads threads per threadgroup (Metal's
// maxTotalThreadsPerThreadgroup, which register pressure can bring below the device's limit): an
// elementwise plan gets smaller threadgroups (a multiple of the 32-wide SIMD group where possible) and
// more of them; any other plan over the limit is a c10::Error naming the kernel and both numbers.
DispatchPlan fit_thread_limit(DispatchPlan plan, uint64_t max_threads);

// "affine_<kernel>_<type>_gs_<group_size>_b_<bits>" with the Metal type name of `type`
// (float, half, bfloat); metal/quantized.metal instantiates exactly these names.
std::string kernel_name(const std::string& kernel, at::ScalarType type, int64_t group_size, int64_t bits);

// "<kernel>_b_<bits>" for the type-independent pack / unpack kernels.
std::string bits_kernel_name(const std::string& kernel, int64_t bits);

// MLX's floating-point modes (metal/fp_format.h FpMode): "fp_<kernel>_<mode>_<type>", plus "_global"
// for nvfp4 with a global scale; metal/quantized.metal instantiates exactly these names.
std::string fp_kernel_name(const std::string& kernel, int mode, at::ScalarType type, bool has_global);

// The weight format of a quantized matmul (metal/quantized.h Affine / Fp): what the planner needs of
// it, and the host names of its kernels.
struct WeightFormat {
  int64_t group_size;
  int64_t bits;
  std::optional<int> fp_mode;  // an FpMode; none for affine
  bool has_global;             // nvfp4 with a global scale
  static WeightFormat affine(int64_t group_size, int64_t bits);
  static WeightFormat fp(int mode, bool has_global);
  // kernel_name or fp_kernel_name of kernel `name` in dtype `type`.
  std::string kernel(const std::string& name, at::ScalarType type) const;
};

// The caller has validated the arguments (checks.h) and allocated contiguous outputs.
DispatchPlan plan_affine_quantize(const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales,
                                  const at::Tensor& biases, int64_t group_size, int64_t bits);
DispatchPlan plan_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                    const at::Tensor& out, int64_t group_size, int64_t bits);
// q uint8 (..., K) into w uint32 (..., K*bits/32) and back, after check_pack / check_unpack (and for
// pack check_pack_values), with contiguous inputs and outputs: one thread per packing unit.
DispatchPlan plan_pack(const at::Tensor& q, const at::Tensor& w, int64_t bits);
DispatchPlan plan_unpack(const at::Tensor& w, const at::Tensor& q, int64_t bits);

// The operands of a quantized matmul as every backend addresses them: x [..., M, K] and w, scales,
// biases [..., rows, cols] contiguous, each with its own batch shape (an input broadcast by stride 0
// keeps one copy), and the walk from y's batch items to their matrices. A 2-D w folds every leading
// dimension of x into M; so does a batch dimension w is broadcast over and x is not, when innermost.
struct QmmOperands {
  at::Tensor x, w, scales;
  at::Tensor biases;  // for an fp mode its global scale, or undefined without one
  int64_t M;
  BatchParams batch;
  // A gather (affine_gather_qmm): int32 [batch.count, 2], the x and w matrix of every item, bound
  // instead of `batch`; x is [x_count, M, K] and w, scales, biases [w_count, rows, cols].
  at::Tensor gather_pairs;
  // A gather whose items are single rows, item i reading x matrix i, with non-decreasing experts
  // (sorted_indices and no lhs_indices: MLX's right_sorted).
  bool sorted_rows = false;
};

// x, w, scales, biases validated by check_affine_qmm (any strides; a 1-D x is one row).
QmmOperands qmm_operands(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                         const at::Tensor& biases);
// The same for an fp mode, validated by check_fp_qmm: biases holds the global scale, if any.
QmmOperands fp_qmm_operands(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const std::optional<at::Tensor>& global_scale);

// y = x @ dequant(w).T (transpose) or x @ dequant(w), w in `format`, into a contiguous out of the op's
// output shape (batch.count matrices [M, N]): the dispatches in order (split-K adds a reduce).
// Temporaries are created here and held by the plans' bindings. An empty output needs no dispatch.
std::vector<DispatchPlan> plan_qmm(const QmmOperands& operands, const at::Tensor& out, const WeightFormat& format,
                                   bool transpose);

DispatchPlan plan_fp_quantize(const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales, int mode,
                              const std::optional<at::Tensor>& global_scale);
DispatchPlan plan_fp_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& out, int mode,
                                const std::optional<at::Tensor>& global_scale);

// The operands of affine_gather_qmm, after check_affine_gather_qmm (checks the index values).
QmmOperands gather_qmm_operands(const GatherQmmShape& shape, const at::Tensor& x, const at::Tensor& w,
                                const at::Tensor& scales, const at::Tensor& biases,
                                const std::optional<at::Tensor>& lhs_indices,
                                const std::optional<at::Tensor>& rhs_indices, bool sorted_indices);

// out[i] = x[lhs[i]] @ dequant(w[rhs[i]]).T (transpose) or x[lhs[i]] @ dequant(w[rhs[i]]) into a
// contiguous out [items, M, N]: the small-M and GEMM kernels' gather variants (no split-K), or for
// many sorted decode rows affine_gather_qmm_rhs. An empty output needs no dispatch.
std::vector<DispatchPlan> plan_affine_gather_qmm(const QmmOperands& operands, const at::Tensor& out,
                                                 int64_t group_size, int64_t bits, bool transpose);

}  // namespace metalq
