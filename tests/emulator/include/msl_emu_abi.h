// The interface between emulated kernels (msl_emu.h, compiled per .metal file) and the emulator
// runtime (runtime.cpp, compiled once). Plain C++ so both sides can include it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace msl_emu {

constexpr int kSimdWidth = 32;

// Kernel-parameter attributes that Metal resolves at dispatch time.
enum class Builtin : int {
  thread_position_in_grid,
  thread_position_in_threadgroup,
  threadgroup_position_in_grid,
  threads_per_threadgroup,
  threadgroups_per_grid,
  threads_per_grid,
  thread_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroup_index_in_threadgroup,
  threads_per_simdgroup,
  simdgroups_per_threadgroup,
};

enum class ParamKind : int { buffer, threadgroup_memory, builtin };

// One kernel parameter: [[buffer(index)]], [[threadgroup(index)]] (threadgroup_memory) or a builtin
// (index = Builtin).
struct Param {
  ParamKind kind;
  int index;
};

// One lane's part in a SIMD-group collective; `arg` is a per-lane operand such as a source lane.
struct Lane {
  const void* in;
  void* out;
  uint32_t arg;
};

// Computes a collective for the lanes in active_mask (bit i = lane i); returns an error or nullptr.
using Resolver = const char* (*)(const Lane* lanes, uint32_t active_mask);

}  // namespace msl_emu

extern "C" {
// Called from kernel code while a dispatch runs.
void* msl_emu_buffer(int index);
void* msl_emu_threadgroup_param(int index);
void msl_emu_builtin(int builtin, uint32_t out[3]);
void* msl_emu_threadgroup_alloc(int site, size_t size, size_t align);
void msl_emu_threadgroup_barrier(const char* file, int line);
void msl_emu_simd_collective(const char* file, int line, const void* in, void* out, uint32_t arg,
                             msl_emu::Resolver resolve);
// Called by static registrars when the kernel library loads.
void msl_emu_register(const char* name, void (*entry)());
}
