// Instantiations of the kernels in quantized.h: the support table. Host names follow
// metalq::kernel_name() in csrc/plan.cpp: affine_<kernel>_<type>_gs_<group size>_b_<bits>.
#include "quantized.h"
#include "qmv.h"
#include "qmm.h"

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

// Prefill GEMMs (qmm.h): the orientation is the fourth template argument, so they have their own
// nest: affine_qmm_{t,n}[_splitk]_<type>_gs_<gs>_b_<bits>; split_k_reduce sums the split-K partials.
#define instantiate_qmm(type, group_size, bits) \
  instantiate_kernel("affine_qmm_t_" #type "_gs_" #group_size "_b_" #bits, affine_qmm, type, group_size, bits, true) \
  instantiate_kernel("affine_qmm_n_" #type "_gs_" #group_size "_b_" #bits, affine_qmm, type, group_size, bits, false) \
  instantiate_kernel("affine_qmm_t_splitk_" #type "_gs_" #group_size "_b_" #bits, affine_qmm_splitk, type, \
                     group_size, bits, true) \
  instantiate_kernel("affine_qmm_n_splitk_" #type "_gs_" #group_size "_b_" #bits, affine_qmm_splitk, type, \
                     group_size, bits, false)

#define instantiate_qmm_bits(type, group_size) \
  instantiate_qmm(type, group_size, 1) \
  instantiate_qmm(type, group_size, 2) \
  instantiate_qmm(type, group_size, 3) \
  instantiate_qmm(type, group_size, 4) \
  instantiate_qmm(type, group_size, 5) \
  instantiate_qmm(type, group_size, 6) \
  instantiate_qmm(type, group_size, 8)

#define instantiate_qmm_types(type) \
  instantiate_qmm_bits(type, 32) \
  instantiate_qmm_bits(type, 64) \
  instantiate_qmm_bits(type, 128)

instantiate_qmm_types(float)
instantiate_qmm_types(half)
instantiate_qmm_types(bfloat)
