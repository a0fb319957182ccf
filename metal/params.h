// Format constants shared by the host code (csrc/) and the Metal kernels (metal/).
// One home for the supported sets: error messages and the Python mirror are generated from them.
#pragma once

#ifdef __METAL__
#define METALQ_CONST constant constexpr
#else
#include <cstdint>
#define METALQ_CONST inline constexpr
#endif

namespace metalq {

METALQ_CONST int kSupportedBits[] = {1, 2, 3, 4, 5, 6, 8};
METALQ_CONST int kSupportedGroupSizes[] = {32, 64, 128};
METALQ_CONST int kDefaultBits = 4;
METALQ_CONST int kDefaultGroupSize = 64;

// Smallest scale magnitude the quantizer emits (MLX's eps): keeps constant groups representable.
METALQ_CONST float kQuantizeEps = 1e-7f;

// ---- element-wise kernels (affine_quantize, affine_dequantize) --------------------------------

// Threads per threadgroup: 8 full SIMD-groups; each thread works alone, so any multiple of 32 works.
METALQ_CONST int kElementwiseThreads = 256;
// Threadgroups along the grid's x axis before the grid grows along y: a conservative per-axis bound
// (the smallest limit among GPU APIs), far inside Metal's.
METALQ_CONST int kMaxThreadgroupsX = 65535;

// Bytes of one packing unit, the smallest whole-byte run of whole values, which a dequantize thread
// handles: a uint32 word for 1/2/4/8 bits; for 3/5/6 bits (values straddle words) 3 bytes (8 values),
// 5 bytes (8 values) and 3 bytes (4 values).
constexpr int pack_unit_bytes(int bits) { return bits == 3 || bits == 5 ? bits : (bits == 6 ? 3 : 4); }

// setBytes argument of the element-wise kernels. The grid is rounded up to whole threadgroups and
// may be 2-D, so each thread computes its flat index and returns when it is >= work_items.
struct ElementwiseParams {
  uint64_t work_items;
};
static_assert(sizeof(ElementwiseParams) == 8, "host and shader layouts must match");

} // namespace metalq
