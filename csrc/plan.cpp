// Kernel choice and geometry for every Metal dispatch (see plan.h).
#include "plan.h"

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
DispatchPlan elementwise(std::string kernel, uint64_t work_items, std::vector<BufferBinding> buffers) {
  const uint64_t groups = (work_items + kElementwiseThreads - 1) / kElementwiseThreads;
  const uint64_t x = std::max<uint64_t>(1, std::min<uint64_t>(groups, kMaxThreadgroupsX));
  const uint64_t y = std::max<uint64_t>(1, (groups + x - 1) / x);
  TORCH_INTERNAL_ASSERT(y <= UINT32_MAX, "grid too large: ", work_items, " work items");
  const int params_index = int(buffers.size());
  return DispatchPlan{std::move(kernel),
                      {uint32_t(x), uint32_t(y), 1},
                      {uint32_t(kElementwiseThreads), 1, 1},
                      std::move(buffers),
                      {bytes_binding(params_index, ElementwiseParams{work_items})},
                      {}};
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

}  // namespace metalq
