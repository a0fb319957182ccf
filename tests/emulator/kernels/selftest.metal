// Small kernels that exercise the emulator itself (tests/test_emulator.py), checked against numpy.
#include <metal_stdlib>
using namespace metal;

// out[i] = in[neighbour of i] through threadgroup memory; `synchronized` selects the correct version.
[[kernel]] void neighbour(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant int2& shift_synchronized [[buffer(2)]],
    uint i [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  threadgroup float staged[256];
  staged[i] = in[i];
  if (shift_synchronized.y) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[i] = staged[(i + n + shift_synchronized.x) % n];
}

// Same through a [[threadgroup(0)]] buffer sized by the dispatch.
[[kernel]] void neighbour_dynamic(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* staged [[threadgroup(0)]],
    uint i [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  staged[i] = in[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = staged[(i + 1) % n];
}

// One row of 8 results per thread: every SIMD-group function on x. Lanes >= `active` skip the
// partial-sum collective, so it must sum exactly the active lanes.
[[kernel]] void simd_functions(
    const device float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& active [[buffer(2)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const float v = x[gid];
  device float* row = out + gid * 8;
  row[0] = simd_sum(v);
  row[1] = simd_max(v);
  row[2] = simd_shuffle(v, ushort((lane * 7) % 32));
  row[3] = simd_shuffle_down(v, ushort(3));
  row[4] = simd_shuffle_up(v, ushort(5));
  row[5] = simd_shuffle_xor(v, ushort(6));
  row[6] = simd_broadcast(v, ushort(9));
  if (lane < active) {
    row[7] = simd_sum(v);
  }
}

// C[M, N] = A[M, K] @ B[K, N] with one 8x8 output tile per SIMD-group (grid: N/8 x M/8 SIMD-groups).
template <typename T>
[[kernel]] void matmul_8x8(
    const device T* a [[buffer(0)]],
    const device T* b [[buffer(1)]],
    device T* c [[buffer(2)]],
    constant uint3& mkn [[buffer(3)]],
    uint3 group [[threadgroup_position_in_grid]]) {
  const uint K = mkn.y, N = mkn.z;
  simdgroup_matrix<T, 8, 8> acc = make_filled_simdgroup_matrix<T, 8, 8>(T(0));
  simdgroup_matrix<T, 8, 8> ta, tb;
  for (uint k = 0; k < K; k += 8) {
    simdgroup_load(ta, a, K, ulong2{k, group.y * 8});
    simdgroup_load(tb, b, N, ulong2{group.x * 8, k});
    simdgroup_multiply_accumulate(acc, ta, tb, acc);
  }
  simdgroup_store(acc, c, N, ulong2{group.x * 8, group.y * 8});
}

// out[2 * lane + e] = element e of this lane's share of the 8x8 matrix in (row-major values 0..63).
[[kernel]] void simdgroup_layout(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_matrix<float, 8, 8> m;
  simdgroup_load(m, in);
  out[2 * lane] = m.thread_elements()[0];
  out[2 * lane + 1] = m.thread_elements()[1];
}

#define instantiate_kernel(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
instantiate_kernel("matmul_8x8_float", matmul_8x8, float)
instantiate_kernel("matmul_8x8_half", matmul_8x8, half)

// x + 1 + 1 in T: per-operation rounding keeps 2048 (half) and 256 (bfloat) where float gives +2.
[[kernel]] void add_one_twice(
    device float* x [[buffer(0)]],
    uint i [[thread_position_in_grid]]) {
  if (i == 0) {
    half h = half(x[0]);
    h = h + half(1) + half(1);
    x[0] = float(h);
  } else {
    bfloat b = bfloat(x[1]);
    b = b + bfloat(1) + bfloat(1);
    x[1] = float(b);
  }
}

// MSL vector constructors and half literals: out = {splat, concatenation, converted int4, literals}.
[[kernel]] void vectors(device float4* out [[buffer(0)]]) {
  const float2 lo = float2(1.0f, 2.0f);
  out[0] = float4(0.5f);
  out[1] = float4(lo, float2(3.0f, 4.0f));
  out[2] = float4(int4(-1, 2, -3, 4));
  out[3] = float4(half4(1.5h, 2h, 0.1h, half(1) / 3h));
}

// ---- rule violations the emulator must report --------------------------------------------------

[[kernel]] void divergent_barrier(device float* out [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) {
  if (i < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[i] = 1.0f;
}

[[kernel]] void return_before_barrier(device float* out [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) {
  if (i == 3) {
    return;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = 1.0f;
}

[[kernel]] void inactive_lane_read(device float* out [[buffer(0)]], uint lane [[thread_index_in_simdgroup]]) {
  if (lane < 16) {
    out[lane] = simd_shuffle(float(lane), ushort(lane + 16));
  }
}

[[kernel]] void threadgroup_memory_over_limit(device float* out [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) {
  threadgroup float big[8 * 1024 + 1];  // 32 KiB + 4 bytes
  big[i] = 0.0f;
  out[i] = big[i];
}

[[kernel]] void out_of_bounds(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {
  out[i] = 1.0f;  // dispatched with more threads than out has elements
}

// ---- Metal's limits (test_emulator.py) ---------------------------------------------------------

// out[i] = p[i] for a setBytes payload p of n floats.
[[kernel]] void copy_bytes(
    constant float* p [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  if (i < n) {
    out[i] = p[i];
  }
}

// A vector V loaded from device memory `offset` bytes into `in`, and stored through threadgroup
// memory at the same offset: naturally aligned only when offset is a multiple of sizeof(V).
template <typename V>
[[kernel]] void vector_at_offset(
    const device uchar* in [[buffer(0)]],
    device V* out [[buffer(1)]],
    constant uint2& offsets [[buffer(2)]]) {  // x: device load offset, y: threadgroup store offset
  threadgroup uchar raw[64];
  const V v = *(const device V*)(in + offsets.x);
  *(threadgroup V*)(raw + offsets.y) = v;
  out[0] = *(threadgroup V*)(raw + offsets.y);
}
instantiate_kernel("vector_at_offset_float4", vector_at_offset, float4)
instantiate_kernel("vector_at_offset_half4", vector_at_offset, half4)
instantiate_kernel("vector_at_offset_uint2", vector_at_offset, uint2)
instantiate_kernel("vector_at_offset_float", vector_at_offset, float)

// 16 KiB of static threadgroup memory next to a [[threadgroup(0)]] buffer of the dispatch's length.
[[kernel]] void static_and_dynamic_threadgroup_memory(
    device float* out [[buffer(0)]],
    threadgroup float* dynamic_part [[threadgroup(0)]],
    uint i [[thread_index_in_threadgroup]]) {
  threadgroup float static_part[4 * 1024];
  static_part[i] = float(i);
  dynamic_part[i] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = static_part[i] + dynamic_part[i];
}

// ---- scheduling of SIMD-groups (test_emulator.py) ----------------------------------------------

// Each thread reads the value staged by the thread 32 places on (the other SIMD-group of two),
// exchanges it inside its SIMD-group, then overwrites its own slot. Without the barrier between the
// read and the overwrite, a SIMD-group that runs ahead clobbers what the other has not read yet (a
// write-after-read race that only independent SIMD-groups expose: the shuffle in between keeps
// lock-stepped threads apart).
[[kernel]] void overwrite_after_read(
    const device float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant int& synchronized [[buffer(2)]],
    uint i [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  threadgroup float staged[256];
  staged[i] = in[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float v = staged[(i + 32) % n];
  v = simd_shuffle_xor(v, ushort(1));
  if (synchronized) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  staged[i] = -1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[i] = v;
}

// out[group * n + i] = staged[i], written by threadgroup 0 only: every other threadgroup starts
// with fresh (poisoned) threadgroup memory, never the previous threadgroup's.
[[kernel]] void threadgroup_memory_is_fresh(
    device float* out [[buffer(0)]],
    uint i [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]],
    uint group [[threadgroup_position_in_grid]]) {
  threadgroup float staged[64];
  if (group == 0) {
    staged[i] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[group * n + i] = staged[i];
}
