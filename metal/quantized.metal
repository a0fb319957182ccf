// Instantiations of the kernels in quantized.h: the support table. Host names follow
// metalq::kernel_name() in csrc/plan.cpp: affine_<kernel>_<type>_gs_<group size>_b_<bits>.
#include "quantized.h"
#include "qmv.h"

#define instantiate_kernel(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

#define instantiate_affine(kernel, type, group_size, bits) \
  instantiate_kernel("affine_" #kernel "_" #type "_gs_" #group_size "_b_" #bits, \
                     affine_##kernel, type, group_size, bits)

#define instantiate_bits(kernel, type, group_size) \
  instantiate_affine(kernel, type, group_size, 1) \
  instantiate_affine(kernel, type, group_size, 2) \
  instantiate_affine(kernel, type, group_size, 3) \
  instantiate_affine(kernel, type, group_size, 4) \
  instantiate_affine(kernel, type, group_size, 5) \
  instantiate_affine(kernel, type, group_size, 6) \
  instantiate_affine(kernel, type, group_size, 8)

#define instantiate_group_sizes(kernel, type) \
  instantiate_bits(kernel, type, 32) \
  instantiate_bits(kernel, type, 64) \
  instantiate_bits(kernel, type, 128)

#define instantiate_types(kernel) \
  instantiate_group_sizes(kernel, float) \
  instantiate_group_sizes(kernel, half) \
  instantiate_group_sizes(kernel, bfloat)

instantiate_types(quantize)
instantiate_types(dequantize)
instantiate_types(qmv_fast)
instantiate_types(qmv)
instantiate_types(qmv_wide)
instantiate_types(qvm)
instantiate_types(qvm_split_k)

// Type-only kernels: "<kernel>_<type>".
instantiate_kernel("split_k_reduce_float", split_k_reduce, float)
instantiate_kernel("split_k_reduce_half", split_k_reduce, half)
instantiate_kernel("split_k_reduce_bfloat", split_k_reduce, bfloat)
