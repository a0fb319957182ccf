// Small-M quantized matmuls: y = x @ W.T with W [N, K] packed along K (qmv_fast, qmv, qmv_wide) and
// y = x @ W with W [K, N] packed along N (qvm, qvm_split_k + split_k_reduce). Helpers -> *_impl ->
// thin [[kernel]] entries, generic over the weight format F (affine or fp, quantized.h); plan_qmm
// (csrc/plan.cpp) picks the kernel and its grid. Every kernel accumulates in float, uses the group
// identity of quantized.h (s * sum_i x_i value(q_i) + b * sum_i x_i) and F::finish on each total.
#pragma once

#include "quantized.h"

namespace metalq {

// ---- helpers ------------------------------------------------------------------------------------

// Bytes of one decoding step of n values: a uint32 word for 1/2/4/8 bits when n values fill whole
// words, else single bytes; 3/5-bit packs of 8 values in 3/5 bytes and 6-bit packs of 4 values in 3
// bytes are always read byte by byte (they are not word-aligned).
template <int bits, int n>
constexpr int decode_step_bytes() {
  static_assert(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
                "unsupported bit width");
  return (bits & (bits - 1)) == 0 ? ((n * bits) % 32 == 0 ? 4 : 1) : (bits == 6 ? 3 : bits);
}

// q[0..n) = the n consecutive values of F starting at byte p (p is word-aligned when words are read).
template <typename F, int n>
METAL_FUNC void decode_values(const device uint8_t* p, thread float* q) {
  constexpr int bits = F::bits;
  constexpr int step_bytes = decode_step_bytes<bits, n>();
  constexpr int step_values = step_bytes * 8 / bits;
  static_assert(n % step_values == 0, "n values must fill whole decoding steps");
  constexpr uint mask = (1u << bits) - 1;
  for (int u = 0; u < n / step_values; ++u) {
    ulong unit = 0;
    if (step_bytes == 4) {
      unit = reinterpret_cast<const device uint32_t*>(p)[u];
    } else {
      for (int i = 0; i < step_bytes; ++i) {
        unit |= ulong(p[u * step_bytes + i]) << (8 * i);
      }
    }
    for (int i = 0; i < step_values; ++i) {
      q[u * step_values + i] = F::value(uint(unit >> (bits * i)) & mask);
    }
  }
}

// How a lane's `values` consecutive values of a row (qmv, qmv_fast, qmv_quad) meet the groups: they lie
// in one group, which lane_group_lanes lanes share, or they span lane_groups whole groups of their own
// (values > group_size: 1 bit at group size 16 in qmv / qmv_fast, group size 16 at K = 128 in qmv_quad).
constexpr int lane_groups(int group_size, int values) { return values > group_size ? values / group_size : 1; }
constexpr int lane_group_lanes(int group_size, int values) {
  return group_size / (values / lane_groups(group_size, values));
}

// sum over the lane's groups j of s[j] * (x . q over group j) + b[j] * x_sum[j]: the lane's share of a
// row's dot product, with q its `values` weights decoded from p and xv its x values.
template <typename F, int values>
METAL_FUNC float lane_dot(const device uint8_t* p, const thread float* xv, const thread float* x_sum,
                          const thread float* s, const thread float* b) {
  constexpr int count = lane_groups(F::group_size, values), run = values / count;
  float q[values];
  decode_values<F, values>(p, q);
  float total = 0;
  for (int j = 0; j < count; ++j) {
    float dot = 0;
    for (int i = j * run; i < (j + 1) * run; ++i) {
      dot += xv[i] * q[i];
    }
    total += s[j] * dot + b[j] * x_sum[j];
  }
  return total;
}

// ---- implementations ----------------------------------------------------------------------------

// y[m, first_row .. first_row + kQmvRows). The simdgroups split K: simdgroup s takes the K steps
// s, s + kQmvSimdgroups, ..., so each x value is read by one lane of the threadgroup. A lane holds
// `values` consecutive x values of its step in registers (and their sum per group) and dots them with
// the same span of every row. Lanes of one group share its scale and bias: one lane per group loads
// them, simd_shuffle hands them out, so every scale is read once (a lane spanning whole groups loads
// its own). The simdgroups' partial sums meet in threadgroup memory: the others leave theirs in
// `partials`, simdgroup 0 adds them and its lane r writes row r. `guarded` skips rows >= N and lanes
// past K (qmv); qmv_fast needs N % kQmvRows == 0 and K % (32 * values) == 0.
template <typename F, int values, bool guarded, typename T = typename F::T>
METAL_FUNC void qmv_impl(const device uint8_t* w, F format, const device T* x, device T* y, uint N, uint K, uint m,
                         uint first_row, uint simd_gid, uint simd_lid, threadgroup float* partials) {
  constexpr int group_size = F::group_size, bits = F::bits;
  constexpr int rows = kQmvRows;
  constexpr int block = 32 * values;
  constexpr int count = lane_groups(group_size, values), run = values / count;
  constexpr int lanes_per_group = lane_group_lanes(group_size, values);
  static_assert(group_size % run == 0 && block % group_size == 0, "a lane's values lie in whole groups");
  static_assert(rows <= 32, "a lane of simdgroup 0 writes each row");
  const uint groups = K / group_size;
  const ulong row_bytes = ulong(K) * bits / 8;
  x += ulong(m) * K;
  y += ulong(m) * N;

  float acc[rows] = {0};
  for (uint k0 = simd_gid * block; k0 < K; k0 += kQmvSimdgroups * block) {
    const uint k = k0 + simd_lid * values;
    const bool lane_active = !guarded || k < K;
    float xv[values];
    float x_sum[count] = {0};
    for (int i = 0; i < values; ++i) {
      xv[i] = lane_active ? float(x[k + i]) : 0.0f;
      x_sum[i / run] += xv[i];
    }
    const uint g = k0 / group_size + simd_lid * count;  // the first group this lane loads parameters for
    for (int r = 0; r < rows; ++r) {
      const uint row = first_row + r;
      const bool row_active = !guarded || row < N;  // the same for the whole simdgroup
      float s[count] = {0}, b[count] = {0};
      for (int j = 0; j < count; ++j) {
        if (row_active && simd_lid < uint(32 / lanes_per_group) && g + j < groups) {
          const GroupParams p = format.group(ulong(row) * groups + g + j);
          s[j] = p.scale;
          b[j] = p.bias;
        }
        if (lanes_per_group > 1) {
          s[j] = simd_shuffle(s[j], ushort(simd_lid / lanes_per_group));
          b[j] = simd_shuffle(b[j], ushort(simd_lid / lanes_per_group));
        }
      }
      if (row_active && lane_active) {
        acc[r] += lane_dot<F, values>(w + row * row_bytes + ulong(k) * bits / 8, xv, x_sum, s, b);
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    acc[r] = simd_sum(acc[r]);
    if (simd_gid > 0 && simd_lid == uint(r)) {
      partials[(simd_gid - 1) * rows + r] = acc[r];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int r = 0; r < rows; ++r) {
    if (simd_gid == 0 && simd_lid == uint(r) && (!guarded || first_row + r < N)) {
      float total = acc[r];
      for (int p = 0; p < kQmvSimdgroups - 1; ++p) {
        total += partials[p * rows + r];
      }
      y[first_row + r] = T(format.finish(total));
    }
  }
}

// y[m, row] for K in {64, 128} (qmv_quad): a simdgroup is 8 quads of 4 lanes. Lane l of quad q holds
// x values [l*K/4, (l+1)*K/4) in registers and dots them with the same span of rows
// first_row + 8r + q, r < kQmvQuadRowsPerQuad: at each r the 8 quads read 8 consecutive rows, one
// contiguous run of bytes. The first lane of each group loads its scale and bias and simd_shuffle
// hands them to the group's other lanes (a lane spanning whole groups loads its own); two xor
// shuffles sum the quad (a quad_sum).
template <typename F, int K, typename T = typename F::T>
METAL_FUNC void qmv_quad_impl(const device uint8_t* w, F format, const device T* x, device T* y, uint N, uint m,
                              uint first_row, uint simd_lid) {
  constexpr int group_size = F::group_size, bits = F::bits;
  constexpr int values = K / 4;
  constexpr int groups = K / group_size;
  constexpr int count = lane_groups(group_size, values), run = values / count;
  constexpr int lanes_per_group = lane_group_lanes(group_size, values);
  static_assert(K % group_size == 0 && group_size % run == 0, "a lane's values lie in whole groups");
  const uint quad = simd_lid / 4, k = (simd_lid % 4) * values, g = k / group_size;
  const ushort group_lane = ushort(quad * 4 + g * group_size / values);
  x += ulong(m) * K;
  y += ulong(m) * N;
  float xv[values];
  float x_sum[count] = {0};
  for (int i = 0; i < values; ++i) {
    xv[i] = float(x[k + i]);
    x_sum[i / run] += xv[i];
  }
  for (int r = 0; r < kQmvQuadRowsPerQuad; ++r) {
    const uint row = first_row + r * 8 + quad;
    const bool active = row < N;  // the same for the whole quad
    float s[count] = {0}, b[count] = {0};
    for (int j = 0; j < count; ++j) {
      if (active && k % group_size == 0) {
        const GroupParams p = format.group(ulong(row) * groups + g + j);
        s[j] = p.scale;
        b[j] = p.bias;
      }
      if (lanes_per_group > 1) {
        s[j] = simd_shuffle(s[j], group_lane);
        b[j] = simd_shuffle(b[j], group_lane);
      }
    }
    float acc = 0;
    if (active) {
      acc = lane_dot<F, values>(w + ulong(row) * (K * bits / 8) + k * bits / 8, xv, x_sum, s, b);
    }
    acc += simd_shuffle_xor(acc, ushort(1));
    acc += simd_shuffle_xor(acc, ushort(2));
    if (active && k == 0) {
      y[row] = T(format.finish(acc));
    }
  }
}

// y[m0 + v, row] for v < count <= kQmvWideVectors and one row per kQmvWideLanesPerRow lanes. Each
// lane walks the row's groups g = lane, lane + 8, ...: it reads the group's scale and bias once,
// decodes it 8 values (= `bits` bytes) at a time and dots every chunk with all `count` x rows. A
// shuffle-down ladder then sums the 8 lanes of each row (simd_sum would mix rows).
template <typename F, typename T = typename F::T>
METAL_FUNC void qmv_wide_impl(const device uint8_t* w, F format, const device T* x, device T* y, uint N, uint K,
                              uint m0, uint count, uint row, uint k_lane) {
  constexpr int group_size = F::group_size, bits = F::bits;
  constexpr int vectors = kQmvWideVectors;
  constexpr int lanes = kQmvWideLanesPerRow;
  static_assert(32 % lanes == 0 && group_size % 8 == 0, "rows own whole lane clusters");
  static_assert(kQmvSimdgroups * 32 / lanes == kQmvRows, "a threadgroup covers kQmvRows rows");
  const uint groups = K / group_size;
  const device uint8_t* w_row = w + ulong(row) * K * bits / 8;
  float acc[vectors] = {0};
  if (row < N) {
    for (uint g = k_lane; g < groups; g += lanes) {
      const GroupParams p = format.group(ulong(row) * groups + g);
      float dot[vectors] = {0}, x_sum[vectors] = {0};
      for (int c = 0; c < group_size / 8; ++c) {
        float q[8];
        decode_values<F, 8>(w_row + (ulong(g) * group_size + c * 8) * bits / 8, q);
        for (int v = 0; v < vectors; ++v) {
          if (uint(v) < count) {
            const device T* xs = x + ulong(m0 + v) * K + g * group_size + c * 8;
            for (int i = 0; i < 8; ++i) {
              const float xi = float(xs[i]);
              dot[v] += xi * q[i];
              x_sum[v] += xi;
            }
          }
        }
      }
      for (int v = 0; v < vectors; ++v) {
        acc[v] += p.scale * dot[v] + p.bias * x_sum[v];
      }
    }
  }
  for (int v = 0; v < vectors; ++v) {
    for (ushort delta = lanes / 2; delta > 0; delta /= 2) {
      acc[v] += simd_shuffle_down(acc[v], delta);
    }
  }
  if (k_lane == 0 && row < N) {
    for (int v = 0; v < vectors; ++v) {
      if (uint(v) < count) {
        y[ulong(m0 + v) * N + row] = T(format.finish(acc[v]));
      }
    }
  }
}

// y[m, col0 + j] for the kQvmColumnsPerSimdgroup columns j of one simdgroup, over K rows
// [k_begin, k_end). Lane l takes K rows k_begin + l, + 32, ...: one x value, and per run of columns
// sharing a group (all 32 when group_size >= 32, else 16) the row's scale and bias and the run's
// decoded weights. N is a multiple of group_size, so a run lies wholly inside or past N. The 32
// column sums are reduced with simd_sum; lane j keeps and writes column j.
template <typename F, typename OutT, typename T = typename F::T>
METAL_FUNC void qvm_impl(const device uint8_t* w, F format, const device T* x, device OutT* y, uint N, uint K,
                         uint m, uint col0, uint k_begin, uint k_end, uint simd_lid) {
  constexpr int group_size = F::group_size, bits = F::bits;
  constexpr int cols = kQvmColumnsPerSimdgroup;
  constexpr int run = group_size < cols ? group_size : cols;
  static_assert(group_size % run == 0 && cols % run == 0, "a run of columns lies in one group");
  const uint groups = N / group_size;
  const ulong row_bytes = ulong(N) * bits / 8;
  float acc[cols] = {0};
  for (uint k = k_begin + simd_lid; k < k_end; k += 32) {
    const float xk = float(x[ulong(m) * K + k]);
    for (int c = 0; c < cols / run; ++c) {
      const uint col = col0 + c * run;
      if (col < N) {
        const GroupParams p = format.group(ulong(k) * groups + col / group_size);
        const float xs = xk * p.scale, xb = xk * p.bias;
        float q[run];
        decode_values<F, run>(w + k * row_bytes + col * bits / 8, q);
        for (int j = 0; j < run; ++j) {
          acc[c * run + j] += xs * q[j] + xb;
        }
      }
    }
  }
  float mine = 0;
  for (int j = 0; j < cols; ++j) {
    const float total = simd_sum(acc[j]);
    mine = simd_lid == uint(j) ? total : mine;
  }
  if (col0 + simd_lid < N) {
    y[ulong(m) * N + col0 + simd_lid] = OutT(format.finish(mine));
  }
}

}  // namespace metalq

// ---- kernels ------------------------------------------------------------------------------------
// Bindings of every small-M kernel: w 0, scales 1 (F::Scale), biases or nvfp4's global scale 2
// (F::Bias), x 3, y 4, QmvParams 5, and 6 the batch: `constant BatchParams&`, or for each kernel's
// gather_ twin `const device uint2*`, the (x, w) matrix pair of every item. The twins differ only in
// that parameter (Metal wants a buffer's address space spelled in the signature, not in a template
// argument). Threadgroups of kQmvSimdgroups x 32 threads; grid z walks the batch (select_matrices).

// Decode GEMV for aligned shapes (N % 8 == 0, K % (32 * qmv_fast_values(bits)) == 0). Grid
// (M, N / 8, batch): threadgroup (m, t) computes y[m, 8t .. 8t+8), simdgroup s over the K steps
// s, s + 2, ... E.g. 4-bit: a lane reads 16 x values and 8 bytes of each of the 8 rows per step of
// 512 K values.
template <typename F, typename T = typename F::T>
[[kernel]] void qmv_fast(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(batch, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  constexpr int values = metalq::qmv_fast_values(F::bits);
  threadgroup float partials[(metalq::kQmvSimdgroups - 1) * metalq::kQmvRows];
  metalq::qmv_impl<F, values, false>(w, F::bind(scales, biases), x, y, params.N, params.K, tid.x,
                                     tid.y * metalq::kQmvRows, simd_gid, simd_lid, partials);
}

// qmv_fast over the (x, w) matrix pairs of a gather (select_matrices).
template <typename F, typename T = typename F::T>
[[kernel]] void gather_qmv_fast(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(pairs, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  constexpr int values = metalq::qmv_fast_values(F::bits);
  threadgroup float partials[(metalq::kQmvSimdgroups - 1) * metalq::kQmvRows];
  metalq::qmv_impl<F, values, false>(w, F::bind(scales, biases), x, y, params.N, params.K, tid.x,
                                     tid.y * metalq::kQmvRows, simd_gid, simd_lid, partials);
}

// x @ W.T for K = 64 or 128 and 1/2/4/8 bits: one simdgroup per threadgroup, grid
// (M, ceil(N / 64), batch); threadgroup (m, t) computes y[m, 64t .. 64t+64). With so short a K a
// whole simdgroup per row would leave each lane 2-4 values; a quad per row gives it 16-32.
template <typename F, int K, typename T = typename F::T>
[[kernel]] void qmv_quad(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(batch, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  metalq::qmv_quad_impl<F, K>(w, F::bind(scales, biases), x, y, params.N, tid.x, tid.y * metalq::kQmvQuadRows,
                              simd_lid);
}

// qmv_quad over the (x, w) matrix pairs of a gather (select_matrices).
template <typename F, int K, typename T = typename F::T>
[[kernel]] void gather_qmv_quad(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(pairs, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  metalq::qmv_quad_impl<F, K>(w, F::bind(scales, biases), x, y, params.N, tid.x, tid.y * metalq::kQmvQuadRows,
                              simd_lid);
}

// General GEMV: any N (rows >= N skipped) and any K; one pack per lane per step (4-bit: 8 values,
// 256 K per step). Grid (M, ceil(N / 8), batch) as qmv_fast.
template <typename F, typename T = typename F::T>
[[kernel]] void qmv(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(batch, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  constexpr int values = metalq::qmv_values(F::bits);
  threadgroup float partials[(metalq::kQmvSimdgroups - 1) * metalq::kQmvRows];
  metalq::qmv_impl<F, values, true>(w, F::bind(scales, biases), x, y, params.N, params.K, tid.x,
                                     tid.y * metalq::kQmvRows, simd_gid, simd_lid, partials);
}

// qmv over the (x, w) matrix pairs of a gather (select_matrices).
template <typename F, typename T = typename F::T>
[[kernel]] void gather_qmv(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(pairs, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  constexpr int values = metalq::qmv_values(F::bits);
  threadgroup float partials[(metalq::kQmvSimdgroups - 1) * metalq::kQmvRows];
  metalq::qmv_impl<F, values, true>(w, F::bind(scales, biases), x, y, params.N, params.K, tid.x,
                                     tid.y * metalq::kQmvRows, simd_gid, simd_lid, partials);
}

// Small batches: grid (ceil(M / rows_per_tg), ceil(N / 8)); threadgroup (t, r) computes rows
// 8r .. 8r+8 of y for x rows t * rows_per_tg .. +rows_per_tg, decoding each weight once for all of them.
template <typename F, typename T = typename F::T>
[[kernel]] void qmv_wide(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(batch, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  constexpr int lanes = metalq::kQmvWideLanesPerRow;
  const uint m0 = tid.x * params.rows_per_tg;
  const uint count = min(params.rows_per_tg, params.M - m0);
  const uint row = (tid.y * metalq::kQmvSimdgroups + simd_gid) * (32 / lanes) + simd_lid / lanes;
  metalq::qmv_wide_impl<F>(w, F::bind(scales, biases), x, y, params.N, params.K, m0, count, row, simd_lid % lanes);
}

// qmv_wide over the (x, w) matrix pairs of a gather (select_matrices).
template <typename F, typename T = typename F::T>
[[kernel]] void gather_qmv_wide(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  metalq::select_matrices<F>(pairs, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  constexpr int lanes = metalq::kQmvWideLanesPerRow;
  const uint m0 = tid.x * params.rows_per_tg;
  const uint count = min(params.rows_per_tg, params.M - m0);
  const uint row = (tid.y * metalq::kQmvSimdgroups + simd_gid) * (32 / lanes) + simd_lid / lanes;
  metalq::qmv_wide_impl<F>(w, F::bind(scales, biases), x, y, params.N, params.K, m0, count, row, simd_lid % lanes);
}

// x @ W for small M: grid (M, ceil(N / 64)); threadgroup (m, t) computes y[m, 64t .. 64t+64), 32
// columns per simdgroup (a simdgroup past N returns; one straddling N, only with groups of 16,
// skips the runs past it).
template <typename F, typename T = typename F::T>
[[kernel]] void qvm(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  const uint col0 = (tid.y * metalq::kQmvSimdgroups + simd_gid) * metalq::kQvmColumnsPerSimdgroup;
  if (col0 >= params.N) {
    return;
  }
  metalq::select_matrices<F>(batch, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  metalq::qvm_impl<F, T>(w, F::bind(scales, biases), x, y, params.N, params.K, tid.x, col0, 0, params.K, simd_lid);
}

// qvm over the (x, w) matrix pairs of a gather (select_matrices).
template <typename F, typename T = typename F::T>
[[kernel]] void gather_qvm(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device T* y [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    const device uint2* pairs [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  const uint col0 = (tid.y * metalq::kQmvSimdgroups + simd_gid) * metalq::kQvmColumnsPerSimdgroup;
  if (col0 >= params.N) {
    return;
  }
  metalq::select_matrices<F>(pairs, tid.z, params.M, params.N, params.K, w, scales, biases, x, y);
  metalq::qvm_impl<F, T>(w, F::bind(scales, biases), x, y, params.N, params.K, tid.x, col0, 0, params.K, simd_lid);
}

// qvm over K partition p = tid.z / batch.count (rows [p * k_chunk, min(K, (p+1) * k_chunk))) of batch
// item tid.z % batch.count, writing float partials [partitions, count, M, N]; split_k_reduce sums them.
template <typename F, typename T = typename F::T>
[[kernel]] void qvm_split_k(
    const device uint8_t* w [[buffer(0)]],
    const device typename F::Scale* scales [[buffer(1)]],
    const device typename F::Bias* biases [[buffer(2)]],
    const device T* x [[buffer(3)]],
    device float* partials [[buffer(4)]],
    constant metalq::QmvParams& params [[buffer(5)]],
    constant metalq::BatchParams& batch [[buffer(6)]],
    uint3 tid [[threadgroup_position_in_grid]],
    uint simd_gid [[simdgroup_index_in_threadgroup]],
    uint simd_lid [[thread_index_in_simdgroup]]) {
  const uint col0 = (tid.y * metalq::kQmvSimdgroups + simd_gid) * metalq::kQvmColumnsPerSimdgroup;
  if (col0 >= params.N) {
    return;
  }
  metalq::select_matrices<F>(batch, tid.z, params.M, params.N, params.K, w, scales, biases, x, partials);
  const uint k_begin = (tid.z / batch.count) * params.k_chunk;
  const uint k_end = min(params.K, k_begin + params.k_chunk);
  metalq::qvm_impl<F, float>(w, F::bind(scales, biases), x, partials, params.N, params.K, tid.x, col0, k_begin, k_end,
                             simd_lid);
}

// One thread per output element (grid as the element-wise kernels): sums its float partials in
// partition order and rounds once to T.
template <typename T>
[[kernel]] void split_k_reduce(
    const device float* partials [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant metalq::SplitKReduceParams& params [[buffer(2)]],
    uint2 position [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  const ulong i = metalq::work_item(position, grid);
  if (i >= params.work_items) {
    return;
  }
  float total = 0;
  for (uint p = 0; p < params.partitions; ++p) {
    total += partials[p * params.work_items + i];
  }
  y[i] = T(total);
}
