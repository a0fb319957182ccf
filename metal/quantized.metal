// Instantiations of the kernels in quantized.h, qmv.h, qmm.h and fp_quantized.h: the support table.
// Affine host names follow metalq::kernel_name() in csrc/plan.cpp,
// affine_<kernel>_<type>_gs_<group size>_b_<bits>; the fp modes' fp_kernel_name() (at the end).
#include "quantized.h"
#include "fp_quantized.h"
#include "qmv.h"
#include "qmm.h"

#define instantiate_kernel(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;

#define instantiate_affine(kernel, type, group_size, bits) \
  instantiate_kernel("affine_" #kernel "_" #type "_gs_" #group_size "_b_" #bits, \
                     affine_##kernel, type, group_size, bits)

#define AFFINE(type, group_size, bits) metalq::Affine<type, group_size, bits>

// A matmul kernel (generic over its weight format) twice: over a batch (BatchParams) and its gather
// twin gather_<kernel> as affine_gather_<kernel> (the (x, w) matrix pair of every item, see
// select_matrices).
#define instantiate_matmul(kernel, type, group_size, bits) \
  instantiate_kernel("affine_" #kernel "_" #type "_gs_" #group_size "_b_" #bits, \
                     kernel, AFFINE(type, group_size, bits)) \
  instantiate_kernel("affine_gather_" #kernel "_" #type "_gs_" #group_size "_b_" #bits, \
                     gather_##kernel, AFFINE(type, group_size, bits))

// A split-K matmul kernel: batches only (BatchParams).
#define instantiate_split_k(kernel, type, group_size, bits) \
  instantiate_kernel("affine_" #kernel "_" #type "_gs_" #group_size "_b_" #bits, kernel, AFFINE(type, group_size, bits))

#define instantiate_bits(leaf, kernel, type, group_size) \
  leaf(kernel, type, group_size, 1) \
  leaf(kernel, type, group_size, 2) \
  leaf(kernel, type, group_size, 3) \
  leaf(kernel, type, group_size, 4) \
  leaf(kernel, type, group_size, 5) \
  leaf(kernel, type, group_size, 6) \
  leaf(kernel, type, group_size, 8)

#define instantiate_group_sizes(leaf, kernel, type) \
  instantiate_bits(leaf, kernel, type, 16) \
  instantiate_bits(leaf, kernel, type, 32) \
  instantiate_bits(leaf, kernel, type, 64) \
  instantiate_bits(leaf, kernel, type, 128)

#define instantiate_types(leaf, kernel) \
  instantiate_group_sizes(leaf, kernel, float) \
  instantiate_group_sizes(leaf, kernel, half) \
  instantiate_group_sizes(leaf, kernel, bfloat)

instantiate_types(instantiate_affine, quantize)
instantiate_types(instantiate_affine, dequantize)
instantiate_types(instantiate_matmul, qmv_fast)
instantiate_types(instantiate_matmul, qmv)
instantiate_types(instantiate_matmul, qmv_wide)
instantiate_types(instantiate_matmul, qvm)
instantiate_types(instantiate_split_k, qvm_split_k)

// qmv_quad (qmv.h) for its K (the fourth template argument) and the power-of-two bits, with every
// group size that divides K: affine_[gather_]qmv_quad_k<K>_<type>_gs_<gs>_b_<bits>.
#define instantiate_qmv_quad(type, K, group_size, bits) \
  instantiate_kernel("affine_qmv_quad_k" #K "_" #type "_gs_" #group_size "_b_" #bits, qmv_quad, \
                     AFFINE(type, group_size, bits), K) \
  instantiate_kernel("affine_gather_qmv_quad_k" #K "_" #type "_gs_" #group_size "_b_" #bits, gather_qmv_quad, \
                     AFFINE(type, group_size, bits), K)

#define instantiate_qmv_quad_bits(type, K, group_size) \
  instantiate_qmv_quad(type, K, group_size, 1) \
  instantiate_qmv_quad(type, K, group_size, 2) \
  instantiate_qmv_quad(type, K, group_size, 4) \
  instantiate_qmv_quad(type, K, group_size, 8)

#define instantiate_qmv_quad_types(type) \
  instantiate_qmv_quad_bits(type, 64, 16) \
  instantiate_qmv_quad_bits(type, 64, 32) \
  instantiate_qmv_quad_bits(type, 64, 64) \
  instantiate_qmv_quad_bits(type, 128, 16) \
  instantiate_qmv_quad_bits(type, 128, 32) \
  instantiate_qmv_quad_bits(type, 128, 64) \
  instantiate_qmv_quad_bits(type, 128, 128)

instantiate_qmv_quad_types(float)
instantiate_qmv_quad_types(half)
instantiate_qmv_quad_types(bfloat)

// Type-only kernels: "<kernel>_<type>".
instantiate_kernel("split_k_reduce_float", split_k_reduce, float)
instantiate_kernel("split_k_reduce_half", split_k_reduce, half)
instantiate_kernel("split_k_reduce_bfloat", split_k_reduce, bfloat)

// Bits-only kernels (quantized.h pack / unpack): "<kernel>_b_<bits>" (plan.cpp's bits_kernel_name).
#define instantiate_bits_only(kernel, bits) instantiate_kernel(#kernel "_b_" #bits, kernel, bits)
#define instantiate_bits_only_all(kernel) \
  instantiate_bits_only(kernel, 1) \
  instantiate_bits_only(kernel, 2) \
  instantiate_bits_only(kernel, 3) \
  instantiate_bits_only(kernel, 4) \
  instantiate_bits_only(kernel, 5) \
  instantiate_bits_only(kernel, 6) \
  instantiate_bits_only(kernel, 8)

instantiate_bits_only_all(pack)
instantiate_bits_only_all(unpack)

// Prefill GEMMs (qmm.h): the orientation is the fourth template argument, so they have their own
// nest: affine_[gather_]qmm_{t,n}_<type>_gs_<gs>_b_<bits>, affine_qmm_{t,n}_splitk_... (split_k_reduce
// sums the partials) and the sorted-expert affine_gather_qmm_rhs_{t,n}_....
#define instantiate_qmm(type, group_size, bits) \
  instantiate_kernel("affine_qmm_t_" #type "_gs_" #group_size "_b_" #bits, qmm, AFFINE(type, group_size, bits), true) \
  instantiate_kernel("affine_qmm_n_" #type "_gs_" #group_size "_b_" #bits, qmm, AFFINE(type, group_size, bits), \
                     false) \
  instantiate_kernel("affine_gather_qmm_t_" #type "_gs_" #group_size "_b_" #bits, gather_qmm, \
                     AFFINE(type, group_size, bits), true) \
  instantiate_kernel("affine_gather_qmm_n_" #type "_gs_" #group_size "_b_" #bits, gather_qmm, \
                     AFFINE(type, group_size, bits), false) \
  instantiate_kernel("affine_qmm_t_splitk_" #type "_gs_" #group_size "_b_" #bits, qmm_splitk, \
                     AFFINE(type, group_size, bits), true) \
  instantiate_kernel("affine_qmm_n_splitk_" #type "_gs_" #group_size "_b_" #bits, qmm_splitk, \
                     AFFINE(type, group_size, bits), false) \
  instantiate_kernel("affine_gather_qmm_rhs_t_" #type "_gs_" #group_size "_b_" #bits, gather_qmm_rhs, \
                     AFFINE(type, group_size, bits), true) \
  instantiate_kernel("affine_gather_qmm_rhs_n_" #type "_gs_" #group_size "_b_" #bits, gather_qmm_rhs, \
                     AFFINE(type, group_size, bits), false)

#define instantiate_qmm_bits(type, group_size) \
  instantiate_qmm(type, group_size, 1) \
  instantiate_qmm(type, group_size, 2) \
  instantiate_qmm(type, group_size, 3) \
  instantiate_qmm(type, group_size, 4) \
  instantiate_qmm(type, group_size, 5) \
  instantiate_qmm(type, group_size, 6) \
  instantiate_qmm(type, group_size, 8)

#define instantiate_qmm_types(type) \
  instantiate_qmm_bits(type, 16) \
  instantiate_qmm_bits(type, 32) \
  instantiate_qmm_bits(type, 64) \
  instantiate_qmm_bits(type, 128)

instantiate_qmm_types(float)
instantiate_qmm_types(half)
instantiate_qmm_types(bfloat)

// Floating-point modes: fp_<kernel>_<mode>_<type>[_global] (plan.cpp's fp_kernel_name), the mode as
// metal/fp_format.h numbers it; only nvfp4 takes a global scale. Besides fp_quantized.h's kernels,
// every matmul kernel with the format metalq::Fp, over batches only (fp weights are 2-D, no gather):
// qmv_fast, qmv, qmv_wide, qmv_quad_k64 / _k128, qvm, qvm_split_k, qmm_{t,n}[_splitk].
#define instantiate_fp_matmul(kernel, mode_name, mode, type, has_global, suffix) \
  instantiate_kernel("fp_" #kernel "_" #mode_name "_" #type suffix, kernel, metalq::Fp<type, mode, has_global>)

#define instantiate_fp(mode_name, mode, type, has_global, suffix) \
  instantiate_kernel("fp_quantize_" #mode_name "_" #type suffix, fp_quantize, type, mode, has_global) \
  instantiate_kernel("fp_dequantize_" #mode_name "_" #type suffix, fp_dequantize, type, mode, has_global) \
  instantiate_fp_matmul(qmv_fast, mode_name, mode, type, has_global, suffix) \
  instantiate_fp_matmul(qmv, mode_name, mode, type, has_global, suffix) \
  instantiate_fp_matmul(qmv_wide, mode_name, mode, type, has_global, suffix) \
  instantiate_fp_matmul(qvm, mode_name, mode, type, has_global, suffix) \
  instantiate_kernel("fp_qmv_quad_k64_" #mode_name "_" #type suffix, qmv_quad, metalq::Fp<type, mode, has_global>, \
                     64) \
  instantiate_kernel("fp_qmv_quad_k128_" #mode_name "_" #type suffix, qmv_quad, metalq::Fp<type, mode, has_global>, \
                     128) \
  instantiate_kernel("fp_qvm_split_k_" #mode_name "_" #type suffix, qvm_split_k, metalq::Fp<type, mode, has_global>) \
  instantiate_kernel("fp_qmm_t_" #mode_name "_" #type suffix, qmm, metalq::Fp<type, mode, has_global>, true) \
  instantiate_kernel("fp_qmm_n_" #mode_name "_" #type suffix, qmm, metalq::Fp<type, mode, has_global>, false) \
  instantiate_kernel("fp_qmm_t_splitk_" #mode_name "_" #type suffix, qmm_splitk, metalq::Fp<type, mode, has_global>, \
                     true) \
  instantiate_kernel("fp_qmm_n_splitk_" #mode_name "_" #type suffix, qmm_splitk, metalq::Fp<type, mode, has_global>, \
                     false)

#define instantiate_fp_types(leaf, mode_name, mode, has_global, suffix) \
  leaf(mode_name, mode, float, has_global, suffix) \
  leaf(mode_name, mode, half, has_global, suffix) \
  leaf(mode_name, mode, bfloat, has_global, suffix)

instantiate_fp_types(instantiate_fp, mxfp4, 0, false, "")
instantiate_fp_types(instantiate_fp, nvfp4, 1, false, "")
instantiate_fp_types(instantiate_fp, nvfp4, 1, true, "_global")
instantiate_fp_types(instantiate_fp, mxfp8, 2, false, "")
