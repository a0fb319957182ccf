// DispatchPlan: the one place that chooses a Metal kernel and its geometry for an op call. The Mac
// encoder (csrc/mps) and the test emulator both turn a plan into a dispatch; neither chooses itself.
// Platform-neutral C++: compiled on every platform so the choice is tested where no GPU exists.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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
};

// "affine_<kernel>_<type>_gs_<group_size>_b_<bits>" with the Metal type name of `type`
// (float, half, bfloat); metal/quantized.metal instantiates exactly these names.
std::string kernel_name(const std::string& kernel, at::ScalarType type, int64_t group_size, int64_t bits);

// The caller has validated the arguments (checks.h) and allocated contiguous outputs.
DispatchPlan plan_affine_quantize(const at::Tensor& w, const at::Tensor& wq, const at::Tensor& scales,
                                  const at::Tensor& biases, int64_t group_size, int64_t bits);
DispatchPlan plan_affine_dequantize(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                    const at::Tensor& out, int64_t group_size, int64_t bits);

// y = x @ dequant(w).T (transpose) or x @ dequant(w), for a 2-D contiguous x [M, K] and out [M, N]:
// the dispatches in order (split-K adds a reduce). Temporaries are created here and held by the
// plans' bindings. An empty output needs no dispatch.
std::vector<DispatchPlan> plan_affine_qmm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                          const at::Tensor& biases, const at::Tensor& out, int64_t group_size,
                                          int64_t bits, bool transpose);

}  // namespace metalq
