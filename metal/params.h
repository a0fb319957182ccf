// Format constants shared by the host code (csrc/) and the Metal kernels (metal/).
// One home for the supported sets: error messages and the Python mirror are generated from them.
#pragma once

#ifdef __METAL__
#define METALQ_CONST constant constexpr
#define METALQ_CONSTANT_REF constant
#else
#include <cstdint>
#define METALQ_CONST inline constexpr
#define METALQ_CONSTANT_REF const
#endif

namespace metalq {

METALQ_CONST int kSupportedBits[] = {1, 2, 3, 4, 5, 6, 8};
// 16 is a metalq extension beyond MLX's affine group sizes (32, 64, 128): llama.cpp's k-quants keep a scale
// per 16 weights. A group of 16 can be less than a packing unit (1 bit) or leave a row short of a whole
// word (1, 3, 5 bits): the quantizer then needs K * bits % 32 == 0 as well (csrc/checks.cpp).
METALQ_CONST int kSupportedGroupSizes[] = {16, 32, 64, 128};
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

// ---- small-M matmul kernels (metal/qmv.h): x @ W.T (qmv*) and x @ W (qvm*) --------------------

// Values of one row that a qmv_fast lane decodes per step: two whole packs (one for 1/2 bits), so
// each lane issues a few wide loads. A simdgroup's step covers 32x this many values of K.
constexpr int qmv_fast_values(int bits) { return bits == 1 ? 32 : (bits == 6 || bits == 8 ? 8 : 16); }
// qmv (general): one pack per lane per step, so any K (a multiple of 32) splits into whole lane chunks.
constexpr int qmv_values(int bits) { return pack_unit_bytes(bits) * 8 / bits; }
// Simdgroups per threadgroup of every small-M kernel (64 threads): small groups spread over all cores.
METALQ_CONST int kQmvSimdgroups = 2;
// Rows of W per threadgroup of qmv_fast, qmv and qmv_wide. In qmv/qmv_fast every simdgroup covers all
// of them over its share of K, so one x chunk in registers serves 8 rows and x is read once per
// threadgroup.
METALQ_CONST int kQmvRows = 8;
// qmv_wide: lanes that split one row's groups; 32 / 8 = 4 rows per simdgroup, kQmvRows per threadgroup.
METALQ_CONST int kQmvWideLanesPerRow = 8;
// qmv_wide: x rows one threadgroup dots with each decoded group; more would spill registers. It serves
// M from 2 (decoding a group once for several rows beats per-row qmv) up to the GEMM's kQmmMinRows.
METALQ_CONST int kQmvWideVectors = 4;
// qmv_quad: x @ W.T for K in {64, 128} (kQmvQuadK) and 1/2/4/8 bits, a quad of 4 lanes per row of W
// with K/4 values each; 8 quads x kQmvQuadRowsPerQuad rows = kQmvQuadRows rows per 32-thread group.
METALQ_CONST int kQmvQuadK[] = {64, 128};
METALQ_CONST int kQmvQuadRowsPerQuad = 8;
METALQ_CONST int kQmvQuadRows = 8 * kQmvQuadRowsPerQuad;
// qvm: output columns per simdgroup, one decoded 32-value run of a K row per lane and step.
METALQ_CONST int kQvmColumnsPerSimdgroup = 32;
// qvm split-K from this K on: below it the M x N/64 grid already has enough work per threadgroup.
METALQ_CONST int kQvmSplitKMinK = 1024;
// Partitions of K for split-K, more for very long K so each partition stays around 256-1024 rows.
METALQ_CONST int kQvmSplitKParts = 8;
METALQ_CONST int kQvmSplitKPartsLongK = 32;
METALQ_CONST int kQvmSplitKLongK = 8192;
// Split-K only while M is this small: a few rows of x leave the GPU idle without it.
METALQ_CONST int kQvmSplitKMaxRows = 4;

// setBytes argument of the small-M kernels: y[M, N] = x[M, K] @ W (or W.T).
struct QmvParams {
  uint32_t M;
  uint32_t N;
  uint32_t K;
  uint32_t k_chunk;      // qvm_split_k: K rows per partition (the last may be shorter); else K
  uint32_t rows_per_tg;  // qmv_wide: x rows per threadgroup (<= kQmvWideVectors); else 1
  uint32_t pad;
};
static_assert(sizeof(QmvParams) == 24, "host and shader layouts must match");

// setBytes argument of split_k_reduce: out[i] = sum over p < partitions of partials[p * work_items + i].
struct SplitKReduceParams {
  uint64_t work_items;
  uint32_t partitions;
  uint32_t pad;
};
static_assert(sizeof(SplitKReduceParams) == 16, "host and shader layouts must match");

// ---- batches of matrices (every matmul kernel) ----------------------------------------------------

// Batch dimensions a matmul addresses after the host merged every pair it could (csrc/plan.cpp).
METALQ_CONST int kMaxBatchDims = 8;

// setBytes argument (buffer 6) of every matmul kernel: y holds `count` matrices [M, N] in row-major
// order over `shape`; batch item b reads x matrix and w matrix (with its scales and biases) at the
// strides below, in whole matrices, 0 along a dimension that operand is broadcast over. An unbatched
// call has count 1 and ndim 0.
struct BatchParams {
  uint32_t count;
  uint32_t ndim;
  uint32_t shape[kMaxBatchDims];
  uint32_t x_stride[kMaxBatchDims];
  uint32_t w_stride[kMaxBatchDims];
};
static_assert(sizeof(BatchParams) == 8 + 12 * kMaxBatchDims, "host and shader layouts must match");

// The x and w matrices batch item b multiplies.
struct BatchMatrices {
  uint32_t x;
  uint32_t w;
};

// One home for the batch walk, shared by the Metal kernels and the CPU op. A gather variant maps b
// through its index buffers (x = lhs_indices[...], w = rhs_indices[...]) instead of these strides.
inline BatchMatrices batch_matrices(METALQ_CONSTANT_REF BatchParams& batch, uint32_t b) {
  BatchMatrices m{0, 0};
  for (int d = int(batch.ndim) - 1; d >= 0; --d) {
    const uint32_t i = b % batch.shape[d];
    b /= batch.shape[d];
    m.x += i * batch.x_stride[d];
    m.w += i * batch.w_stride[d];
  }
  return m;
}

// ---- prefill GEMMs (metal/qmm.h): x @ W.T (qmm_t) and x @ W (qmm_n) ---------------------------

// Output tile BM x BN and K step BK of one threadgroup: 2x2 simdgroups of 16x16 (2x2 8x8 fragments
// each), with each of the 128 threads staging 8 x values and decoding 8 weights per K step.
METALQ_CONST int kQmmBM = 32;
METALQ_CONST int kQmmBN = 32;
METALQ_CONST int kQmmBK = 32;
METALQ_CONST int kQmmThreads = 128;
// The GEMM serves M from here on: a 32-row tile decodes each weight once for up to 32 rows of x,
// which beats decoding per few rows past the small-batch GEMV range (MLX switches at 6-18 by GPU).
METALQ_CONST int kQmmMinRows = 9;
// Split-K aims for this many threadgroups: about 8 per core on the largest (64-80 core) Apple GPUs.
METALQ_CONST int kQmmSplitKTargetThreadgroups = 512;
// Shortest K a split-K partition reduces (8 K steps): its float partial tile then costs well under
// the x and weight bytes it reads.
METALQ_CONST int kQmmSplitKMinPartitionK = 256;

// affine_gather_qmm_rhs (expert-sorted decode rows) serves a gather of one-row items from this many
// items, when there are at least this many items per expert on average (MLX's rule): then most
// 32-item tiles hold a few long runs and each expert's weights are read about once per tile.
METALQ_CONST int kGatherRhsMinItems = 16;
METALQ_CONST int kGatherRhsMinItemsPerExpert = 4;

// setBytes argument of affine_qmm and affine_qmm_splitk: y[M, N] = x[M, K] @ W.T (or W), with
// grid z = partitions of K, each k_per_split long.
struct QmmParams {
  uint32_t M;
  uint32_t N;
  uint32_t K;
  uint32_t k_per_split;  // a multiple of kQmmBK; K when not split (the last partition may be shorter)
};
static_assert(sizeof(QmmParams) == 16, "host and shader layouts must match");

} // namespace metalq
