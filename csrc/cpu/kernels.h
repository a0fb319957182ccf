// CPU kernels for the affine format, behind a table picked once by the CPU's instruction set.
// Torch-free on purpose: each instruction-set variant compiles the same templates (kernels_impl.h)
// in its own translation unit and namespace, so no inline code built for AVX2 can leak into a
// path that runs on an older CPU.
#pragma once

#include <cstdint>

namespace metalq::cpu {

// IEEE binary16 as stored in memory (ScalarKind::f16); converting it to float is exact. GCC has
// _Float16 in C++ on x86-64 but not on aarch64 (before GCC 13), where __fp16 is the storage type;
// Apple's clang has both on arm64.
#if defined(__aarch64__) || defined(__ARM_FP16_FORMAT_IEEE)
using float16_storage = __fp16;
#else
using float16_storage = _Float16;
#endif
static_assert(sizeof(float16_storage) == 2, "binary16 is two bytes");

// Storage of scales and biases: a float type (affine), or one byte per scale (the fp modes, which
// have no biases): E8M0 = 2^(b - 127), E4M3 = an 8-bit float (metal/fp_format.h).
enum class ScalarKind { f32, f16, bf16, e8m0, e4m3 };

// What a packed value stands for: an unsigned integer (affine), or an E2M1 / E4M3 float code.
enum class ValueCode { uint, e2m1, e4m3 };

// A packed matrix [rows, cols] quantized along cols: row r holds cols values of `bits` bits,
// LSB-first, and one scale (and for affine one bias) per `group_size` values, stored as `kind`.
// The fp codes decode to integers (E2M1 doubled, E4M3 in units of 2^-9): `value_scale` turns them
// back into values and carries nvfp4's global scale, so the kernels multiply it once per output.
struct PackedMatrix {
  const uint8_t* w;
  const void* scales;
  const void* biases;  // null for the fp codes
  ScalarKind kind;
  int64_t rows;
  int64_t cols;
  int bits;
  int group_size;
  ValueCode code = ValueCode::uint;
  float value_scale = 1.0f;
  int64_t row_bytes() const { return cols * bits / 8; }
  const uint8_t* end() const { return w + rows * row_bytes(); }
  int64_t groups_per_row() const { return cols / group_size; }
  int group_shift() const { return __builtin_ctz(unsigned(group_size)); }  // group sizes are powers of two
};

// Bytes [p, p + bytes) asked for ahead of their use (a hint: never faults).
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);
}

inline int64_t scalar_bytes(ScalarKind kind) {
  return kind == ScalarKind::f32 ? 4 : (kind == ScalarKind::e8m0 || kind == ScalarKind::e4m3 ? 1 : 2);
}

// The fused kernels decode a row of W at a few bytes per cycle, too slowly for the hardware prefetcher
// to keep enough of a matrix that does not fit the cache in flight: while row n is decoded, the row
// some 8 KiB ahead (and its scales and biases) is asked for. At one thread this took 3/5/6-bit rows of a
// 4096 x 14336 matrix from 12 to 5 ms.
inline void prefetch_ahead(const PackedMatrix& W, int64_t n) {
  constexpr int64_t kAheadBytes = 8192;
  const int64_t row_bytes = W.row_bytes(), ahead = n + (kAheadBytes + row_bytes - 1) / row_bytes;
  if (ahead >= W.rows) return;
  prefetch_bytes(W.w + ahead * row_bytes, row_bytes);
  const int64_t scalars = W.groups_per_row() * scalar_bytes(W.kind);
  prefetch_bytes(static_cast<const uint8_t*>(W.scales) + ahead * scalars, scalars);
  if (W.biases) prefetch_bytes(static_cast<const uint8_t*>(W.biases) + ahead * scalars, scalars);
}

// From this many rows of x on, dequantizing tiles of W into a GEMM beats the fused kernels of x @ W.T that
// cost as much again for every row of x (the float ones and the dot products).
constexpr int64_t kGemmMinRows = 16;

// x @ W.T of the affine format on bfloat16 dot products, for x [M, W.cols] stored as W.kind (the dtype of
// the scales), with float32 accumulation of exact products: as prepare_x / qmm_t below, with scratch_bytes(W, M) bytes of scratch.
struct DotQmmT {
  int64_t (*scratch_bytes)(const PackedMatrix& W, int64_t M);
  void (*prepare_x)(const PackedMatrix& W, const void* x, int64_t M, void* scratch);
  void (*qmm_t)(const PackedMatrix& W, const void* scratch, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
  int64_t gemm_min_rows;  // from this many rows of x on, a GEMM on dequantized tiles is faster
};

struct KernelTable {
  const char* isa;
  // x @ W.T runs in two steps: prepare_x lays x [M, W.cols] out for this variant's decoder in
  // scratch (qmm_t_scratch_floats(W, M) floats), then qmm_t writes y[m, n] = sum_k x[m, k] * W[n, k]
  // for n in [n0, n1) into y (row stride ldy). Threads share one prepared scratch.
  void (*prepare_x)(const PackedMatrix& W, const float* x, int64_t M, float* scratch);
  void (*qmm_t)(const PackedMatrix& W, const float* scratch, int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);
  // y[m, n] = sum_k x[m, k] * W[k, n] for n in [n0, n1); x is [M, W.rows], y is [M, W.cols].
  void (*qmm_n)(const PackedMatrix& W, const float* x, int64_t M, float* y, int64_t n0, int64_t n1);
  // Rows [r0, r1) of W dequantized as scale * q + bias (one float rounding; times value_scale for the
  // fp codes) into out[(r - r0) * cols].
  void (*dequantize_f32)(const PackedMatrix& W, int64_t r0, int64_t r1, float* out);
  void (*dequantize_bf16)(const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out);
  // One row of K finite floats quantized as mx.quantize does: q[K] values (not yet packed) and
  // K / group_size float scales and biases.
  void (*quantize_row)(const float* w, int64_t K, int group_size, int bits, uint8_t* q, float* scales, float* biases);
  // The dot-product x @ W.T of `rows` rows of x stored as W.kind, or null where this variant has none for
  // W's format (then x runs through prepare_x / qmm_t in float).
  const DotQmmT* (*dot_qmm_t)(const PackedMatrix& W, int64_t rows);
};

inline int64_t qmm_t_scratch_floats(const PackedMatrix& W, int64_t M) {
  return M * (W.cols + W.groups_per_row());
}

// Each variant, for the selection below and for tests that compare variants.
namespace generic { const KernelTable& table(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { const KernelTable& table(); }
namespace avx512_bf16 {
const DotQmmT* kernels(int bits, ScalarKind kind);  // kind f16 or bf16; null otherwise
// On AMX-BF16 tiles, for any float kind and group sizes from 32 on; only where amx_available(), which
// also asks the OS for the tile state.
bool amx_available();
const DotQmmT* amx_kernels(int bits, ScalarKind kind, int64_t rows);  // for `rows` rows of x
// KernelTable::dequantize_* for the affine format (ValueCode::uint) only.
void dequantize_f32(const PackedMatrix& W, int64_t r0, int64_t r1, float* out);
void dequantize_bf16(const PackedMatrix& W, int64_t r0, int64_t r1, uint16_t* out);
}  // namespace avx512_bf16
#endif

// The fastest table this CPU supports; METALQ_CPU_ISA=generic|avx2|avx512bf16|amx forces a variant.
const KernelTable& kernels();

}  // namespace metalq::cpu
