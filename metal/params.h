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

} // namespace metalq
