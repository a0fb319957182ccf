// The emulator runtime: runs one dispatch with a fiber per Metal thread, schedules threadgroup
// barriers and SIMD-group collectives, enforces Metal's limits and counts device-memory traffic
// per buffer binding. Compiled once, without instrumentation, and linked into every kernel library.
#include <sys/mman.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "msl_emu_abi.h"

#if !defined(__x86_64__)
#error "the emulator's fiber switch is written for x86-64"
#endif

namespace {

using msl_emu::kSimdWidth;

constexpr uint32_t kMaxThreadsPerThreadgroup = 1024;
constexpr size_t kThreadgroupMemoryBytes = 32 * 1024;  // Apple-silicon limit per threadgroup
constexpr int kBufferSlots = 31;                       // Metal's buffer argument table
constexpr size_t kStackBytes = 128 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr size_t kOutOfBoundsWindow = 1024;  // bytes on either side of a buffer

// ---- fibers: a stack per Metal thread and a 20-instruction context switch ----------------------

extern "C" void msl_emu_switch(void** save_sp, void* load_sp);
extern "C" void msl_emu_fiber_start();
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores the
// stack pointer, then restores the same from the other stack. A new fiber "returns" into
// msl_emu_fiber_start, which calls r13(r12).
asm(R"(
  .text
  .p2align 4
  .globl msl_emu_switch
  .hidden msl_emu_switch
  .type msl_emu_switch,@function
msl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size msl_emu_switch, .-msl_emu_switch
  .globl msl_emu_fiber_start
  .hidden msl_emu_fiber_start
  .type msl_emu_fiber_start,@function
msl_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size msl_emu_fiber_start, .-msl_emu_fiber_start
)");

enum class State { runnable, barrier, collective, done };

struct Fiber {
  void* sp = nullptr;
  State state = State::done;
  uint32_t linear = 0;  // thread_index_in_threadgroup
  uint32_t pos[3] = {};
  const char* file = nullptr;  // call site of the barrier or collective the fiber waits at
  int line = 0;
  msl_emu::Lane lane{};
  msl_emu::Resolver resolve = nullptr;
};

struct Kernel {
  std::string name;
  void (*entry)();
};

std::vector<Kernel>& registry() {
  static std::vector<Kernel> kernels;
  return kernels;
}

// Device-memory traffic of one buffer binding.
struct Buffer {
  int index = 0;  // [[buffer(index)]]
  uint8_t* base = nullptr;
  uint64_t size = 0;
  uint64_t read = 0, written = 0;
  std::vector<uint8_t> read_seen, write_seen;  // per byte: touched at least once
};

struct Dispatch {
  void (*entry)() = nullptr;
  uint32_t threadgroups[3] = {}, threads[3] = {}, thread_count = 0;
  std::vector<Buffer> buffers;
  void* slots[kBufferSlots] = {};
  size_t dynamic_offset[kBufferSlots] = {};  // [[threadgroup(n)]] parameters inside the arena
  size_t dynamic_bytes = 0;
  uint32_t group[3] = {};  // threadgroup_position_in_grid of the running threadgroup
  alignas(16) uint8_t arena[kThreadgroupMemoryBytes];
  std::map<int, size_t> static_sites;  // `threadgroup T x[N];` declaration -> arena offset
  size_t arena_used = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::string error;
};

Dispatch* g_dispatch = nullptr;  // the dispatch in progress (one at a time)

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

// Suspends the running fiber and returns to the scheduler.
void suspend(State state) {
  Fiber* f = g_dispatch->current;
  f->state = state;
  msl_emu_switch(&f->sp, g_dispatch->scheduler_sp);
}

// Records an error and abandons the running fiber: the dispatch stops at the next scheduling step.
void fail(std::string message) {
  if (g_dispatch->error.empty()) g_dispatch->error = std::move(message);
  suspend(State::done);
}

void fiber_main(Fiber* f) {
  g_dispatch->entry();
  f->state = State::done;
  suspend(State::done);
}

std::vector<char*>& stacks() {
  static std::vector<char*> pool;
  return pool;
}

void* fresh_stack(size_t i) {
  auto& pool = stacks();
  while (pool.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, kGuardBytes, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    pool.push_back(static_cast<char*>(p));
  }
  // Initial frame popped by msl_emu_switch: control words, r15..r12, rbx, rbp, return address.
  auto* top = reinterpret_cast<uint64_t*>(pool[i] + kGuardBytes + kStackBytes);
  uint64_t* sp = top - 10;
  sp[0] = 0x1F80 | (uint64_t(0x037F) << 32);  // default MXCSR and x87 control word
  sp[1] = sp[2] = 0;                          // r15, r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[4] = 0;  // r12: the Fiber*, set by the caller
  sp[5] = sp[6] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&msl_emu_fiber_start);
  return sp;
}

// ---- scheduling ---------------------------------------------------------------------------------

// Resolves the collective of the SIMD-group starting at thread `first` once none of its lanes can
// run and its waiting lanes all reached the same collective. Lanes that returned or wait at a
// threadgroup barrier are inactive, exactly as on the GPU.
bool resolve_collective(Dispatch& d, uint32_t first) {
  const uint32_t n = d.thread_count;
  msl_emu::Lane lanes[kSimdWidth] = {};
  uint32_t mask = 0;
  Fiber* leader = nullptr;
  for (uint32_t l = 0; l < kSimdWidth && first + l < n; ++l) {
    Fiber& f = d.fibers[first + l];
    if (f.state == State::runnable) return false;
    if (f.state != State::collective) continue;
    if (!leader) {
      leader = &f;
    } else if (f.line != leader->line || f.file != leader->file || f.resolve != leader->resolve) {
      d.error = "divergent SIMD-group functions: thread " + std::to_string(leader->linear) + " at " +
                site(leader->file, leader->line) + ", thread " + std::to_string(f.linear) + " at " +
                site(f.file, f.line);
      return false;
    }
    lanes[l] = f.lane;
    mask |= 1u << l;
  }
  if (!leader) return false;
  if (const char* err = leader->resolve(lanes, mask)) {
    d.error = std::string(err) + " at " + site(leader->file, leader->line);
    return false;
  }
  for (uint32_t l = 0; l < kSimdWidth && first + l < n; ++l)
    if (mask >> l & 1) d.fibers[first + l].state = State::runnable;
  return true;
}

// Releases a threadgroup barrier once every thread waits at the same one; false when all returned.
bool release_barrier(Dispatch& d) {
  const Fiber* waiting = nullptr;
  const Fiber* returned = nullptr;
  for (const Fiber& f : d.fibers) {
    if (f.state == State::done) {
      returned = returned ? returned : &f;
    } else if (!waiting) {
      waiting = &f;
    } else if (f.line != waiting->line || f.file != waiting->file) {
      d.error = "divergent threadgroup_barrier: thread " + std::to_string(waiting->linear) + " at " +
                site(waiting->file, waiting->line) + ", thread " + std::to_string(f.linear) + " at " +
                site(f.file, f.line);
      return false;
    }
  }
  if (!waiting) return false;
  if (returned) {
    d.error = "threadgroup_barrier at " + site(waiting->file, waiting->line) + " is not reached by thread " +
              std::to_string(returned->linear) + ", which returned (divergent barrier)";
    return false;
  }
  for (Fiber& f : d.fibers) f.state = State::runnable;
  return true;
}

// Runs the lanes of SIMD-group `sg` that can run, each until it blocks, in `lanes` order (lane
// indices inside the group), then resolves the group's collective if all its lanes reached it.
// Returns whether anything ran.
bool step_simdgroup(Dispatch& d, uint32_t sg, const std::vector<uint32_t>& lanes) {
  const uint32_t first = sg * kSimdWidth;
  bool ran = false;
  for (uint32_t l : lanes) {
    if (first + l >= d.thread_count) continue;
    Fiber& f = d.fibers[first + l];
    if (f.state != State::runnable) continue;
    d.current = &f;
    msl_emu_switch(&d.scheduler_sp, f.sp);
    ran = true;
    if (!d.error.empty()) return ran;
  }
  return resolve_collective(d, first) || ran;
}

// Between two threadgroup barriers every SIMD-group advances on its own, as on the GPU, where
// nothing orders SIMD-groups except barriers. forward / reverse: each SIMD-group in turn (first to
// last, last to first) runs all the way to the next barrier (or its end) before the next one
// starts, so a SIMD-group that reads threadgroup memory another one writes (or overwrites what
// another still has to read) without a barrier in between sees the poison or the overwritten
// value in one of the two orders. random (seeded): a random SIMD-group advances one step (to its
// next collective or barrier) at a time. Lanes of one SIMD-group run forward, reverse or shuffled
// between its collectives.
void run_threadgroup(Dispatch& d, int order, std::mt19937_64& rng) {
  std::memset(d.arena, 0xFF, sizeof(d.arena));  // NaN in every float type: uninitialised reads show
  d.static_sites.clear();
  d.arena_used = d.dynamic_bytes;
  const uint32_t n = d.thread_count;
  for (uint32_t i = 0; i < n; ++i) {
    Fiber& f = d.fibers[i];
    f = Fiber{};
    f.sp = fresh_stack(i);
    static_cast<uint64_t*>(f.sp)[4] = reinterpret_cast<uint64_t>(&f);
    f.state = State::runnable;
    f.linear = i;
    f.pos[0] = i % d.threads[0];
    f.pos[1] = i / d.threads[0] % d.threads[1];
    f.pos[2] = i / (d.threads[0] * d.threads[1]);
  }
  const uint32_t groups = (n + kSimdWidth - 1) / kSimdWidth;
  std::vector<uint32_t> lanes(kSimdWidth), simdgroups(groups);
  std::iota(lanes.begin(), lanes.end(), 0u);
  std::iota(simdgroups.begin(), simdgroups.end(), 0u);
  if (order == 1) {
    std::reverse(lanes.begin(), lanes.end());
    std::reverse(simdgroups.begin(), simdgroups.end());
  }
  while (true) {  // one pass per barrier interval
    if (order == 2) {
      std::vector<uint32_t> live = simdgroups;
      while (!live.empty()) {
        const size_t pick = std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng);
        std::shuffle(lanes.begin(), lanes.end(), rng);
        if (!step_simdgroup(d, live[pick], lanes)) {
          live[pick] = live.back();
          live.pop_back();
        }
        if (!d.error.empty()) return;
      }
    } else {
      for (uint32_t sg : simdgroups) {
        while (step_simdgroup(d, sg, lanes)) {
          if (!d.error.empty()) return;
        }
        if (!d.error.empty()) return;
      }
    }
    if (!d.error.empty() || !release_barrier(d)) return;
  }
}

void out_of_bounds(size_t bytes, int64_t offset, const Buffer& b) {
  char msg[160];
  std::snprintf(msg, sizeof msg, "out-of-bounds access: %zu bytes at offset %lld of a %llu-byte buffer", bytes,
                static_cast<long long>(offset), static_cast<unsigned long long>(b.size));
  fail(msg);
}

// Metal requires every access to be naturally aligned: a scalar or vector type of 2, 4, 8 or 16
// bytes (half, float, uint2, half4, float4, ...; float3 and half3 occupy 16 and 8) on a multiple
// of its size. Traced accesses have the size of the accessed type (kernel code is built without
// auto-vectorisation, which could merge narrower accesses), so the size is the alignment to check.
void misaligned(size_t bytes, uintptr_t offset, bool write, const std::string& where) {
  char msg[200];
  std::snprintf(msg, sizeof msg, "misaligned %zu-byte %s at offset %llu of %s (a %zu-byte scalar or vector type "
                "must be %zu-byte aligned)", bytes, write ? "store" : "load", static_cast<unsigned long long>(offset),
                where.c_str(), bytes, bytes);
  fail(msg);
}

void record(const void* address, size_t bytes, bool write) {
  Dispatch* d = g_dispatch;
  if (!d) return;
  const auto a = reinterpret_cast<uintptr_t>(address);
  const uintptr_t arena_offset = a - reinterpret_cast<uintptr_t>(d->arena);
  if (arena_offset < kThreadgroupMemoryBytes) {
    if (a % bytes) misaligned(bytes, arena_offset, write, "threadgroup memory");
    return;
  }
  for (Buffer& b : d->buffers) {
    const uintptr_t offset = a - reinterpret_cast<uintptr_t>(b.base);
    if (offset >= b.size) continue;
    if (offset + bytes > b.size) out_of_bounds(bytes, int64_t(offset), b);
    if (a % bytes) misaligned(bytes, offset, write, "buffer(" + std::to_string(b.index) + ")");
    (write ? b.written : b.read) += bytes;
    std::memset((write ? b.write_seen : b.read_seen).data() + offset, 1, bytes);
    return;
  }
  // Not inside any binding: an access just past either end of one is an indexing error. (Fiber
  // stacks start with a guard page, so no legitimate access lies this close to a buffer.)
  for (const Buffer& b : d->buffers) {
    const int64_t offset = int64_t(a - reinterpret_cast<uintptr_t>(b.base));
    if (offset >= -int64_t(kOutOfBoundsWindow) && offset < int64_t(b.size + kOutOfBoundsWindow))
      out_of_bounds(bytes, offset, b);
  }
}

}  // namespace

// ---- the kernel-facing ABI (msl_emu_abi.h) ------------------------------------------------------

extern "C" {

void msl_emu_register(const char* name, void (*entry)()) { registry().push_back({name, entry}); }

void* msl_emu_buffer(int index) { return g_dispatch->slots[index]; }

void* msl_emu_threadgroup_param(int index) { return g_dispatch->arena + g_dispatch->dynamic_offset[index]; }

void msl_emu_builtin(int builtin, uint32_t out[3]) {
  const Dispatch& d = *g_dispatch;
  const Fiber& f = *d.current;
  using B = msl_emu::Builtin;
  for (int i = 0; i < 3; ++i) {
    switch (static_cast<B>(builtin)) {
      case B::thread_position_in_grid: out[i] = d.group[i] * d.threads[i] + f.pos[i]; break;
      case B::thread_position_in_threadgroup: out[i] = f.pos[i]; break;
      case B::threadgroup_position_in_grid: out[i] = d.group[i]; break;
      case B::threads_per_threadgroup: out[i] = d.threads[i]; break;
      case B::threadgroups_per_grid: out[i] = d.threadgroups[i]; break;
      case B::threads_per_grid: out[i] = d.threadgroups[i] * d.threads[i]; break;
      case B::thread_index_in_threadgroup: out[i] = f.linear; break;
      case B::thread_index_in_simdgroup: out[i] = f.linear % kSimdWidth; break;
      case B::simdgroup_index_in_threadgroup: out[i] = f.linear / kSimdWidth; break;
      case B::threads_per_simdgroup: out[i] = kSimdWidth; break;
      case B::simdgroups_per_threadgroup: out[i] = (d.thread_count + kSimdWidth - 1) / kSimdWidth; break;
    }
  }
}

void* msl_emu_threadgroup_alloc(int site_id, size_t size, size_t align) {
  Dispatch& d = *g_dispatch;
  auto it = d.static_sites.find(site_id);
  if (it != d.static_sites.end()) return d.arena + it->second;
  const size_t offset = (d.arena_used + align - 1) / align * align;
  if (offset + size > kThreadgroupMemoryBytes)
    fail("threadgroup memory exceeds " + std::to_string(kThreadgroupMemoryBytes) + " bytes (needs " +
         std::to_string(offset + size) + ")");
  d.arena_used = offset + size;
  d.static_sites[site_id] = offset;
  return d.arena + offset;
}

void msl_emu_threadgroup_barrier(const char* file, int line) {
  Fiber* f = g_dispatch->current;
  f->file = file;
  f->line = line;
  suspend(State::barrier);
}

void msl_emu_simd_collective(const char* file, int line, const void* in, void* out, uint32_t arg,
                             msl_emu::Resolver resolve) {
  Fiber* f = g_dispatch->current;
  f->file = file;
  f->line = line;
  f->lane = {in, out, arg};
  f->resolve = resolve;
  suspend(State::collective);
}

// Traced device-memory accesses (clang -fsanitize-coverage=trace-loads,trace-stores).
#define MSL_EMU_TRACE(bytes)                                                          \
  void __sanitizer_cov_load##bytes(void* p) { record(p, bytes, false); }              \
  void __sanitizer_cov_store##bytes(void* p) { record(p, bytes, true); }
MSL_EMU_TRACE(1)
MSL_EMU_TRACE(2)
MSL_EMU_TRACE(4)
MSL_EMU_TRACE(8)
MSL_EMU_TRACE(16)
#undef MSL_EMU_TRACE

// float -> bfloat with round-to-nearest-even; gcc's libgcc lacks it and clang calls it for __bf16.
__attribute__((weak)) __bf16 __truncsfbf2(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  uint16_t out;
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u)
    out = uint16_t((bits >> 16) | 0x40u);  // quiet NaN
  else
    out = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  __bf16 r;
  std::memcpy(&r, &out, 2);
  return r;
}

int msl_emu_kernel_count() { return int(registry().size()); }

const char* msl_emu_kernel_name(int i) { return registry()[i].name.c_str(); }

// Runs one dispatchThreadgroups call on a pipeline whose maxTotalThreadsPerThreadgroup is
// max_threads (at most 1024). order: 0 forward, 1 reverse, 2 random (seeded) for both the
// threadgroups and the threads inside each. traffic receives 4 counters per buffer: bytes read,
// bytes written, distinct bytes read, distinct bytes written. Returns 0, or 1 with `error` set.
int msl_emu_dispatch(const char* kernel, const uint32_t threadgroups[3], const uint32_t threads[3], int buffer_count,
                     const int* buffer_index, void* const* buffer_data, const uint64_t* buffer_size,
                     int threadgroup_param_count, const int* threadgroup_index, const uint32_t* threadgroup_length,
                     uint32_t max_threads, int order, uint64_t seed, uint64_t* traffic, char* error,
                     size_t error_size) {
  auto report = [&](const std::string& message) {
    std::snprintf(error, error_size, "%s: %s", kernel, message.c_str());
    return 1;
  };
  auto it = std::find_if(registry().begin(), registry().end(), [&](const Kernel& k) { return k.name == kernel; });
  if (it == registry().end()) return report("no such kernel in the library");
  static Dispatch d;  // large (its arena); one dispatch at a time
  d.entry = it->entry;
  d.error.clear();
  std::memcpy(d.threadgroups, threadgroups, sizeof d.threadgroups);
  std::memcpy(d.threads, threads, sizeof d.threads);
  const uint64_t count = uint64_t(threads[0]) * threads[1] * threads[2];
  if (count == 0 || count > kMaxThreadsPerThreadgroup)
    return report("threads per threadgroup must be 1.." + std::to_string(kMaxThreadsPerThreadgroup) + ", got " +
                  std::to_string(count));
  if (count > max_threads)
    return report("threadgroup of " + std::to_string(count) + " threads (" + std::to_string(threads[0]) + "x" +
                  std::to_string(threads[1]) + "x" + std::to_string(threads[2]) +
                  ") exceeds the pipeline's maxTotalThreadsPerThreadgroup " + std::to_string(max_threads));
  d.thread_count = uint32_t(count);
  d.fibers.assign(count, Fiber{});
  d.buffers.assign(buffer_count, Buffer{});
  std::fill(std::begin(d.slots), std::end(d.slots), nullptr);
  for (int i = 0; i < buffer_count; ++i) {
    if (buffer_index[i] < 0 || buffer_index[i] >= kBufferSlots) return report("buffer index out of range");
    Buffer& b = d.buffers[i];
    b.index = buffer_index[i];
    b.base = static_cast<uint8_t*>(buffer_data[i]);
    b.size = buffer_size[i];
    b.read_seen.assign(b.size, 0);
    b.write_seen.assign(b.size, 0);
    d.slots[buffer_index[i]] = b.base;
  }
  d.dynamic_bytes = 0;
  for (int i = 0; i < threadgroup_param_count; ++i) {
    if (threadgroup_length[i] % 16) return report("threadgroup memory lengths must be multiples of 16");
    d.dynamic_offset[threadgroup_index[i]] = d.dynamic_bytes;
    d.dynamic_bytes += threadgroup_length[i];
  }
  if (d.dynamic_bytes > kThreadgroupMemoryBytes)
    return report("threadgroup memory exceeds " + std::to_string(kThreadgroupMemoryBytes) + " bytes (" +
                  std::to_string(d.dynamic_bytes) + " set with setThreadgroupMemoryLength)");

  std::vector<std::array<uint32_t, 3>> groups;
  for (uint32_t z = 0; z < threadgroups[2]; ++z)
    for (uint32_t y = 0; y < threadgroups[1]; ++y)
      for (uint32_t x = 0; x < threadgroups[0]; ++x) groups.push_back({x, y, z});
  std::mt19937_64 rng(seed);
  if (order == 1) std::reverse(groups.begin(), groups.end());
  if (order == 2) std::shuffle(groups.begin(), groups.end(), rng);
  g_dispatch = &d;
  for (const auto& group : groups) {
    std::memcpy(d.group, group.data(), sizeof d.group);
    run_threadgroup(d, order, rng);
    if (!d.error.empty()) break;
  }
  g_dispatch = nullptr;
  if (!d.error.empty()) return report(d.error);
  for (int i = 0; i < buffer_count; ++i) {
    const Buffer& b = d.buffers[i];
    traffic[4 * i + 0] = b.read;
    traffic[4 * i + 1] = b.written;
    traffic[4 * i + 2] = uint64_t(std::count(b.read_seen.begin(), b.read_seen.end(), 1));
    traffic[4 * i + 3] = uint64_t(std::count(b.write_seen.begin(), b.write_seen.end(), 1));
  }
  return 0;
}

}  // extern "C"
