#include "kernels.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace metalq::cpu {

namespace {

#if defined(__x86_64__) || defined(_M_X64)
// The AVX2 table plus the AVX512-BF16 dot-product x @ W.T and affine dequantization.
const KernelTable& avx512_bf16_table() {
  static const KernelTable t = [] {
    KernelTable k = avx2::table();
    k.isa = "avx512bf16";
    k.dot_qmm_t = [](const PackedMatrix& W, int64_t) {
      return W.code == ValueCode::uint ? avx512_bf16::kernels(W.bits, W.kind) : nullptr;
    };
    k.dequantize_f32 = [](const PackedMatrix& W, int64_t r0, int64_t r1, float* out) {
      W.code == ValueCode::uint ? avx512_bf16::dequantize_f32(W, r0, r1, out) : avx2::table().dequantize_f32(W, r0, r1, out);
    };
    k.dequantize_bf16 = [](const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out) {
      W.code == ValueCode::uint ? avx512_bf16::dequantize_bf16(W, r0, r1, out)
                                : avx2::table().dequantize_bf16(W, r0, r1, out);
    };
    return k;
  }();
  return t;
}

// The AVX512-BF16 table with AMX tile products for more than one row of x: a decoded block of W serves 16
// rows of x (and, for more rows, every chunk of x in turn), where the dot products cost one instruction per
// row. For one row the tiles win too where the dot products' x has two or three parts: float32 x (against
// the AVX2 float kernels) and float16 x at 6 and 8 bits (bench_qmm.py-sized products, timed in turns).
const KernelTable& amx_table() {
  static const KernelTable t = [] {
    KernelTable k = avx512_bf16_table();
    k.isa = "amx";
    k.dot_qmm_t = [](const PackedMatrix& W, int64_t rows) {
      if (W.code != ValueCode::uint) return static_cast<const DotQmmT*>(nullptr);
      const bool tiles = rows > 1 || W.kind == ScalarKind::f32 || (W.kind == ScalarKind::f16 && W.bits >= 6);
      return tiles && W.group_size >= 32 ? avx512_bf16::amx_kernels(W.bits, W.kind, rows)
                                         : avx512_bf16::kernels(W.bits, W.kind);
    };
    return k;
  }();
  return t;
}
#endif

const KernelTable& best_table() {
  // Elsewhere (arm64: NEON is part of the baseline) the generic table is the only variant.
  [[maybe_unused]] bool has_avx2 = false, has_avx512_bf16 = false, has_amx = false;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
             __builtin_cpu_supports("bmi2");
  // VBMI's byte permute decodes 3, 5 and 6 bits (every AVX512-BF16 CPU but Cooper Lake has it).
  has_avx512_bf16 = has_avx2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  has_amx = has_avx512_bf16 && avx512_bf16::amx_available();
#endif
  if (const char* forced = std::getenv("METALQ_CPU_ISA")) {
    std::string isa(forced);
    if (isa == "generic") return generic::table();
#if defined(__x86_64__) || defined(_M_X64)
    if (isa == "avx2" && has_avx2) return avx2::table();
    if (isa == "avx512bf16" && has_avx512_bf16) return avx512_bf16_table();
    if (isa == "amx" && has_amx) return amx_table();
#endif
    throw std::runtime_error("METALQ_CPU_ISA=" + isa +
                             " is not one of generic, avx2, avx512bf16, amx supported by this CPU");
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (has_amx) return amx_table();
  if (has_avx512_bf16) return avx512_bf16_table();
  if (has_avx2) return avx2::table();
#endif
  return generic::table();
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& t = best_table();
  return t;
}

}  // namespace metalq::cpu
