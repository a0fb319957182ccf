// Tiled quantized GEMMs for prefill (large M): y = x·Wᵀ (qmm_t, W [N, K] quantized along K) and
// y = x·W (qmm_n, W [K, N] quantized along N), with a split-K variant writing float partials that
// split_k_reduce (qmv.h) sums. Helpers -> qmm_impl -> thin [[kernel]] entries, generic over the weight
// format (quantized.h); quantized.metal instantiates them and csrc/plan.cpp (plan_qmm) picks one.
#pragma once

#include "quantized.h"

namespace metalq {

// ---- helpers ------------------------------------------------------------------------------------

// Padded row length of a threadgroup tile: 16 extra bytes per row spread rows across memory banks.
template <typename T>
constexpr int qmm_tile_ld() { return kQmmBK + 16 / int(sizeof(T)); }

// Eight consecutive values starting at a multiple of 8 fill exactly `bits` whole bytes. 1/2/4/8 bits
// load as one aligned word (rows are whole words and the offset is a multiple of the load size);
// 3/5/6 bits load byte by byte, since their 8-value runs are not word-aligned.
template <int bits>
METAL_FUNC ulong load_eight_values(const device uint8_t* packed) {
  static_assert(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
                "unsupported bit width");
  if (bits == 1) {
    return *packed;
  }
  if (bits == 2) {
    return *reinterpret_cast<const device ushort*>(packed);
  }
  if (bits == 4) {
    return *reinterpret_cast<const device uint*>(packed);
  }
  if (bits == 8) {
    const uint2 words = *reinterpret_cast<const device uint2*>(packed);
    return ulong(words.x) | (ulong(words.y) << 32);
  }
  ulong run = 0;
  for (int i = 0; i < bits; ++i) {
    run |= ulong(packed[i]) << (8 * i);
  }
  return run;
}

// Writes the 8 weights of `run` (all in group g) dequantized to threadgroup memory.
template <typename F>
METAL_FUNC void dequantize_eight(F format, ulong run, ulong g, threadgroup typename F::T* out) {
  constexpr uint mask = (1u << F::bits) - 1;
  const typename F::TileGroup group = format.tile_group(g);
  for (int i = 0; i < 8; ++i) {
    out[i] = format.weight(uint(run >> (F::bits * i)) & mask, group);
  }
}

// Row and first of two columns that lane `lane` holds in an 8x8 simdgroup_matrix (Apple's layout:
// lanes 0-15 cover rows 0-3, lanes 16-31 rows 4-7; bit 3 of the lane picks the column half).
METAL_FUNC uint fragment_row(uint lane) { return ((lane >> 4) & 1) * 4 + ((lane >> 1) & 3); }
METAL_FUNC uint fragment_col(uint lane) { return ((lane >> 3) & 1) * 4 + (lane & 1) * 2; }

// ---- implementation -----------------------------------------------------------------------------

// One threadgroup computes the BM x BN tile (tile.y, tile.x) of y over k in [k_begin, k_end).
// Per BK step every thread stages 8 x values (row t/4, columns 8*(t%4)..+8) and dequantizes 8 weights
// of one W row (qmm_t: N row t/4, 8 K values; qmm_n: K row t/4, 8 N values, one group either way),
// then each of the 2x2 simdgroups multiplies its 16x16 quarter as 2x2 float 8x8 fragments.
// Rows of x past M, W rows past N and k past k_end are staged as 0; stores skip m >= M, n >= N.
// Ends with a barrier, so a caller may run it again on the same threadgroup memory.
template <typename F, bool transpose, typename Out, typename T = typename F::T>
METAL_FUNC void qmm_impl(
    const device uint8_t* w,
    F format,
    const device T* x,
    device Out* y,
    uint M,
    uint N,
    uint K,
    uint k_begin,
    uint k_end,
    threadgroup T* xs,
    threadgroup T* ws,
    uint2 tile,
    uint index,
    uint simdgroup,
    uint lane) {
  constexpr int group_size = F::group_size, bits = F::bits;
  static_assert(group_size % 8 == 0, "a loader's 8 values must share one group");
  static_assert(kQmmThreads * 8 == kQmmBM * kQmmBK && kQmmThreads * 8 == kQmmBN * kQmmBK, "8 values per thread");
  constexpr int ld = qmm_tile_ld<T>();
  const uint m0 = tile.y * kQmmBM, n0 = tile.x * kQmmBN;

  // Loader coordinates: tile row and first of 8 columns.
  const uint lr = index / 4, lc = (index % 4) * 8;
  const uint xm = m0 + lr;
  // W row of this thread's loads: an N row (qmm_t) or the n offset of its 8 columns (qmm_n).
  const uint wn = transpose ? n0 + lr : n0 + lc;
  const ulong w_row_bytes = ulong(transpose ? K : N) * bits / 8;
  const uint groups_per_row = (transpose ? K : N) / group_size;

  // Fragment coordinates of this simdgroup's 16x16 quarter.
  const uint sm = (simdgroup / 2) * 16, sn = (simdgroup % 2) * 16;
  const uint fr = fragment_row(lane), fc = fragment_col(lane);

  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    }
  }

  for (uint k0 = k_begin; k0 < k_end; k0 += kQmmBK) {
    // x tile [BM][BK]
    threadgroup T* xd = xs + lr * ld + lc;
    for (uint i = 0; i < 8; ++i) {
      const uint k = k0 + lc + i;
      xd[i] = (xm < M && k < k_end) ? x[ulong(xm) * K + k] : T(0);
    }
    // W tile: qmm_t [BN][BK] (row n, 8 k values); qmm_n [BK][BN] (row k, 8 n values)
    threadgroup T* wd = ws + lr * ld + lc;
    const uint wk = transpose ? k0 + lc : k0 + lr;
    if (wk < k_end && wn < N) {
      const uint row = transpose ? wn : wk, col = transpose ? wk : wn;
      const ulong run = load_eight_values<bits>(w + ulong(row) * w_row_bytes + col * bits / 8);
      const ulong g = ulong(row) * groups_per_row + col / group_size;
      dequantize_eight(format, run, g, wd);
    } else {
      for (int i = 0; i < 8; ++i) {
        wd[i] = T(0);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (uint kk = 0; kk < uint(kQmmBK); kk += 8) {
      simdgroup_matrix<float, 8, 8> a[2], b[2];
      for (uint i = 0; i < 2; ++i) {
        for (uint e = 0; e < 2; ++e) {
          a[i].thread_elements()[e] = float(xs[(sm + 8 * i + fr) * ld + kk + fc + e]);
          // B[k][n]: qmm_t reads Ws[n][k], qmm_n reads Ws[k][n]
          const uint n = sn + 8 * i + fc + e, k = kk + fr;
          b[i].thread_elements()[e] = float(transpose ? ws[n * ld + k] : ws[k * ld + n]);
        }
      }
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      for (uint e = 0; e < 2; ++e) {
        const uint m = m0 + sm + 8 * i + fr, n = n0 + sn + 8 * j + fc + e;
        if (m < M && n < N) {
          y[ulong(m) * N + n] = Out(acc[i][j].thread_elements()[e]);
        }
      }
    }
  }
}

}  // namespace metalq

// ---- kernels ------------------------------------------------------------------------------------
// Bindings: w 0, scales 1, biases or nvfp4's global scale 2 (F::Bias), x 3, y 4, QmmParams 5, and 6
// the batch (`constant BatchParams&`; qmm, qmm_splitk) or the gather's (x, w) matrix pairs
// (`const device uint2*`; gather_qmm, gather_qmm_rhs). The weight format F is affine or fp.

// Grid (ceil(N/32), ceil(M/32), batch count) of 128-thread threadgroups; threadgroup (tx, ty, z) writes
// y[z][32*ty .. +32, 32*tx .. +32] over the whole K. E.g. M=33, N=64: 2x2 threadgroups, the second
// row of tiles holding one valid row of y. Weights (buffer 0) are the bytes of MLX's uint32 words.
template <typename F, bool transpose, typename T = typename F::T>
[[kernel]] void qmm(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmmParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tile [[threadgroup_position_in_grid]],
    uint index [[thread_index_in_threadgroup]],
    uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T xs[metalq::kQmmBM * metalq::qmm_tile_ld<T>()];
  threadgroup T ws[metalq::kQmmBN * metalq::qmm_tile_ld<T>()];
  metalq::select_matrices<F>(batch, tile.z, params.M, params.N, params.K, w, scales, biases, x, y);
  metalq::qmm_impl<F, transpose, T>(w, F::bind(scales, biases), x, y, params.M, params.N, params.K, 0, params.K, xs,
                                    ws, tile.xy, index, simdgroup, lane);
}

// qmm over the (x, w) matrix pairs of a gather (select_matrices).
template <typename F, bool transpose, typename T = typename F::T>
[[kernel]] void gather_qmm(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmmParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tile [[threadgroup_position_in_grid]],
    uint index [[thread_index_in_threadgroup]],
    uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T xs[metalq::kQmmBM * metalq::qmm_tile_ld<T>()];
  threadgroup T ws[metalq::kQmmBN * metalq::qmm_tile_ld<T>()];
  metalq::select_matrices<F>(pairs, tile.z, params.M, params.N, params.K, w, scales, biases, x, y);
  metalq::qmm_impl<F, transpose, T>(w, F::bind(scales, biases), x, y, params.M, params.N, params.K, 0, params.K, xs,
                                    ws, tile.xy, index, simdgroup, lane);
}

// Split-K: grid z = partitions x batch count; slice z reduces partition p = z / count, k in
// [p*k_per_split, (p+1)*k_per_split), of batch item z % count and writes its float partial tile to
// partials[p][item][M][N] (split_k_reduce in qmv.h sums them).
// E.g. M=33, N=64, K=1024 in 4 partitions: 2x2x4 threadgroups of 8 K steps each.
template <typename F, bool transpose, typename T = typename F::T>
[[kernel]] void qmm_splitk(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device float* partials [[buffer(4)]],
    constant metalq::QmmParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tile [[threadgroup_position_in_grid]],
    uint index [[thread_index_in_threadgroup]],
    uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T xs[metalq::kQmmBM * metalq::qmm_tile_ld<T>()];
  threadgroup T ws[metalq::kQmmBN * metalq::qmm_tile_ld<T>()];
  metalq::select_matrices<F>(batch, tile.z, params.M, params.N, params.K, w, scales, biases, x, partials);
  const uint k_begin = (tile.z / batch.count) * params.k_per_split;
  metalq::qmm_impl<F, transpose, float>(w, F::bind(scales, biases), x, partials, params.M, params.N, params.K, k_begin,
                                        min(params.K, k_begin + params.k_per_split), xs, ws, tile.xy, index, simdgroup,
                                        lane);
}

// Mixture-of-experts decode over expert-sorted items (MLX's gather_qmm_rhs): every item is one row
// (M = 1), item i reads row i of x, params.M counts the items and pairs[i].y is item i's expert,
// non-decreasing in i. Grid (ceil(N/32), ceil(items/32), 1); threadgroup (tx, ty) covers items
// [32 ty, 32 ty + 32) and runs one GEMM pass over the whole K per run of items sharing an expert,
// so an expert's weights are read once per tile holding its items instead of once per item.
template <typename F, bool transpose, typename T = typename F::T>
[[kernel]] void gather_qmm_rhs(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmmParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tile [[threadgroup_position_in_grid]],
    uint index [[thread_index_in_threadgroup]],
    uint simdgroup [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup T xs[metalq::kQmmBM * metalq::qmm_tile_ld<T>()];
  threadgroup T ws[metalq::kQmmBN * metalq::qmm_tile_ld<T>()];
  const uint end = min(params.M, (tile.y + 1) * metalq::kQmmBM);
  for (uint first = tile.y * metalq::kQmmBM; first < end;) {
    const uint expert = pairs[first].y;
    uint last = first + 1;
    while (last < end && pairs[last].y == expert) {
      ++last;
    }
    const device uint8_t* we = w;
    const device typename F::Scale* se = scales;
    const device typename F::Bias* be = biases;
    const device T* xr = x;
    device T* yr = y;
    metalq::offset_matrices<F>(metalq::BatchMatrices{first, expert}, first, 1, params.N, params.K, we, se, be, xr, yr);
    metalq::qmm_impl<F, transpose, T>(we, F::bind(se, be), xr, yr, last - first, params.N, params.K, 0, params.K, xs,
                                      ws, uint2(tile.x, 0), index, simdgroup, lane);
    first = last;
  }
}
