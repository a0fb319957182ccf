// The Metal Shading Language as the emulator compiles it: MSL scalar and vector types, address
// spaces as clang address spaces (so misusing a device/threadgroup/constant pointer is a compile
// error), the subset of the Metal standard library the project uses, and kernel invocation.
// rewrite.py puts `#include "msl_emu.h"` in front of every preprocessed .metal file.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "msl_emu_abi.h"

// ---- types --------------------------------------------------------------------------------------

using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;
using half = _Float16;  // rounded after every operation: -ffloat16-excess-precision=none
using bfloat = __bf16;  // likewise: -fbfloat16-excess-precision=none

namespace metal {
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));
}  // namespace metal

#define MSL_EMU_VECTORS(T) \
  using T##2 = metal::vec<T, 2>; \
  using T##3 = metal::vec<T, 3>; \
  using T##4 = metal::vec<T, 4>;
MSL_EMU_VECTORS(float)
MSL_EMU_VECTORS(half)
MSL_EMU_VECTORS(bfloat)
MSL_EMU_VECTORS(int)
MSL_EMU_VECTORS(uint)
MSL_EMU_VECTORS(short)
MSL_EMU_VECTORS(ushort)
MSL_EMU_VECTORS(char)
MSL_EMU_VECTORS(uchar)
MSL_EMU_VECTORS(ulong)
#undef MSL_EMU_VECTORS

// Metal address spaces, numbered as Apple's compiler does. `constant` memory is read-only.
#define MSL_EMU_DEVICE __attribute__((address_space(1)))
#define MSL_EMU_CONSTANT __attribute__((address_space(2)))
#define MSL_EMU_THREADGROUP __attribute__((address_space(3)))

namespace metal {

template <class T>
inline constexpr bool is_floating_v =
    std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;

// ---- math: computed in float and rounded to T, exact for min/max/rint/abs/divide --------------

template <class T>
inline T max(T a, T b) {
  if constexpr (is_floating_v<T>) return T(__builtin_fmaxf(float(a), float(b)));
  else return a > b ? a : b;
}
template <class T>
inline T min(T a, T b) {
  if constexpr (is_floating_v<T>) return T(__builtin_fminf(float(a), float(b)));
  else return a < b ? a : b;
}
template <class T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
inline T abs(T x) {
  if constexpr (is_floating_v<T>) return T(__builtin_fabsf(float(x)));
  else return x < 0 ? T(-x) : x;
}
#define MSL_EMU_UNARY(name, builtin) \
  template <class T>                 \
  inline T name(T x) { static_assert(is_floating_v<T>); return T(builtin(float(x))); }
MSL_EMU_UNARY(fabs, __builtin_fabsf)
MSL_EMU_UNARY(rint, __builtin_rintf)  // ties to even, as Metal's rint
MSL_EMU_UNARY(round, __builtin_roundf)
MSL_EMU_UNARY(floor, __builtin_floorf)
MSL_EMU_UNARY(ceil, __builtin_ceilf)
MSL_EMU_UNARY(sqrt, __builtin_sqrtf)
MSL_EMU_UNARY(exp, __builtin_expf)
MSL_EMU_UNARY(log, __builtin_logf)
#undef MSL_EMU_UNARY
template <class T>
inline T fma(T a, T b, T c) { return T(__builtin_fmaf(float(a), float(b), float(c))); }

// Metal's math is fast-math unless a function is taken from metal::precise; the emulator is IEEE.
namespace precise {
template <class T>
inline T divide(T a, T b) { return a / b; }
}  // namespace precise
namespace fast {
using precise::divide;
}  // namespace fast

// ---- vector construction: rewrite.py turns `float4(...)` into vector_of<float4>(...) --------------

namespace detail {

template <class T>
constexpr bool is_scalar_v = std::is_integral_v<T> || is_floating_v<T>;

template <class T>
constexpr int element_count() {
  if constexpr (is_scalar_v<T>) return 1;
  else return int(__builtin_vectorelements(T));
}

// MSL's constructors: a splat from one scalar, otherwise scalars and vectors concatenated, each
// element converted (clang's own functional cast `float4(int4)` would reinterpret the bits).
template <class V, class... Parts>
V vector_of(Parts... parts) {
  using E = std::remove_reference_t<decltype(std::declval<V&>()[0])>;
  constexpr int n = element_count<V>();
  constexpr int given = (0 + ... + element_count<Parts>());
  static_assert(given == n || (sizeof...(Parts) == 1 && given == 1), "vector constructor needs all elements");
  V v{};
  int i = 0;
  auto put = [&](auto part) {
    if constexpr (is_scalar_v<decltype(part)>) {
      v[i++] = E(part);
    } else {
      for (int j = 0; j < element_count<decltype(part)>(); ++j) v[i++] = E(part[j]);
    }
  };
  (put(parts), ...);
  if constexpr (given == 1 && n > 1) {
    for (int j = 1; j < n; ++j) v[j] = v[0];
  }
  return v;
}

}  // namespace detail

template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of equal size");
  To out;
  __builtin_memcpy(&out, &x, sizeof(To));
  return out;
}

// ---- synchronisation ----------------------------------------------------------------------------

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

// Every barrier is an execution barrier; the emulator has no caches, so all memory is coherent.
inline void threadgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  msl_emu_threadgroup_barrier(file, line);
}

namespace detail {

constexpr uint32_t kKeepOwn = 0xFFFFFFFFu;  // shuffle source for lanes that keep their own value

inline uint32_t lane_id() {
  uint32_t v[3];
  msl_emu_builtin(int(msl_emu::Builtin::thread_index_in_simdgroup), v);
  return v[0];
}

inline const char* no_data(const msl_emu::Lane*, uint32_t) { return nullptr; }

struct Sum { template <class T> T operator()(T a, T b) const { return a + b; } };
struct Product { template <class T> T operator()(T a, T b) const { return a * b; } };
struct Max { template <class T> T operator()(T a, T b) const { return metal::max(a, b); } };
struct Min { template <class T> T operator()(T a, T b) const { return metal::min(a, b); } };

// Pairwise tree over the active lanes (inactive lanes contribute nothing); every active lane gets it.
template <class T, class Op>
const char* reduce(const msl_emu::Lane* lanes, uint32_t mask) {
  T value[msl_emu::kSimdWidth];
  uint32_t has = mask;
  for (int i = 0; i < msl_emu::kSimdWidth; ++i)
    if (mask >> i & 1) value[i] = *static_cast<const T*>(lanes[i].in);
  for (int stride = 1; stride < msl_emu::kSimdWidth; stride *= 2) {
    for (int i = 0; i + stride < msl_emu::kSimdWidth; i += 2 * stride) {
      if (!(has >> (i + stride) & 1)) continue;
      value[i] = (has >> i & 1) ? Op()(value[i], value[i + stride]) : value[i + stride];
      has |= 1u << i;
    }
  }
  for (int i = 0; i < msl_emu::kSimdWidth; ++i)
    if (mask >> i & 1) *static_cast<T*>(lanes[i].out) = value[0];
  return nullptr;
}

// Each lane reads the value of lane `arg` (or keeps its own); reading an inactive lane is an error.
template <class T>
const char* shuffle(const msl_emu::Lane* lanes, uint32_t mask) {
  for (int i = 0; i < msl_emu::kSimdWidth; ++i) {
    if (!(mask >> i & 1)) continue;
    const uint32_t src = lanes[i].arg == kKeepOwn ? uint32_t(i) : lanes[i].arg;
    if (src >= uint32_t(msl_emu::kSimdWidth) || !(mask >> src & 1))
      return "SIMD-group shuffle reads an inactive lane";
    *static_cast<T*>(lanes[i].out) = *static_cast<const T*>(lanes[src].in);
  }
  return nullptr;
}

template <class T>
T exchange(T x, uint32_t source, const char* file, int line) {
  T out;
  msl_emu_simd_collective(file, line, &x, &out, source, &shuffle<T>);
  return out;
}

template <class Op, class T>
T reduction(T x, const char* file, int line) {
  T out;
  msl_emu_simd_collective(file, line, &x, &out, 0, &reduce<T, Op>);
  return out;
}

}  // namespace detail

inline void simdgroup_barrier(mem_flags, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  msl_emu_simd_collective(file, line, nullptr, nullptr, 0, &detail::no_data);
}

#define MSL_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()
template <class T> T simd_sum(T x, MSL_EMU_SITE) { return detail::reduction<detail::Sum>(x, file, line); }
template <class T> T simd_product(T x, MSL_EMU_SITE) { return detail::reduction<detail::Product>(x, file, line); }
template <class T> T simd_max(T x, MSL_EMU_SITE) { return detail::reduction<detail::Max>(x, file, line); }
template <class T> T simd_min(T x, MSL_EMU_SITE) { return detail::reduction<detail::Min>(x, file, line); }
template <class T> T simd_shuffle(T x, ushort lane, MSL_EMU_SITE) { return detail::exchange(x, lane, file, line); }
template <class T> T simd_broadcast(T x, ushort lane, MSL_EMU_SITE) { return detail::exchange(x, lane, file, line); }
template <class T>
T simd_shuffle_down(T x, ushort delta, MSL_EMU_SITE) {
  const uint32_t src = detail::lane_id() + delta;  // the top `delta` lanes keep their value
  return detail::exchange(x, src < uint32_t(msl_emu::kSimdWidth) ? src : detail::kKeepOwn, file, line);
}
template <class T>
T simd_shuffle_up(T x, ushort delta, MSL_EMU_SITE) {
  const uint32_t lane = detail::lane_id();  // the bottom `delta` lanes keep their value
  return detail::exchange(x, lane >= delta ? lane - delta : detail::kKeepOwn, file, line);
}
template <class T>
T simd_shuffle_xor(T x, ushort mask, MSL_EMU_SITE) { return detail::exchange(x, detail::lane_id() ^ mask, file, line); }

// ---- simdgroup_matrix: 8x8, two elements per lane in the layout MLX's steel MMA code assumes ------

template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "the emulator models 8x8 simdgroup matrices");
  static_assert(is_floating_v<T>, "simdgroup_matrix holds float, half or bfloat");
  vec<T, 2> elements;
  vec<T, 2>& thread_elements() { return elements; }
  const vec<T, 2>& thread_elements() const { return elements; }
};

using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

namespace detail {

// Lane `lane` holds elements (row, col) and (row, col + 1) (MLX BaseMMAFrag::get_coord).
inline void lane_coord(uint32_t lane, uint32_t& row, uint32_t& col) {
  const uint32_t quad = lane / 4;
  row = (quad & 4) + (lane / 2) % 4;
  col = (quad & 2) * 2 + (lane % 2) * 2;
}

template <class T>
struct MmaOperands {
  vec<T, 2> a, b, c;
};

// D = A @ B + C over the whole SIMD-group, accumulating in float in k order.
template <class T>
const char* multiply_accumulate(const msl_emu::Lane* lanes, uint32_t mask) {
  if (mask != 0xFFFFFFFFu) return "simdgroup_matrix multiply needs all 32 lanes of the SIMD-group";
  float a[8][8], b[8][8], c[8][8];
  for (uint32_t lane = 0; lane < 32; ++lane) {
    uint32_t r, col;
    lane_coord(lane, r, col);
    const auto& in = *static_cast<const MmaOperands<T>*>(lanes[lane].in);
    for (int e = 0; e < 2; ++e) {
      a[r][col + e] = float(in.a[e]);
      b[r][col + e] = float(in.b[e]);
      c[r][col + e] = float(in.c[e]);
    }
  }
  for (uint32_t lane = 0; lane < 32; ++lane) {
    uint32_t r, col;
    lane_coord(lane, r, col);
    auto& out = *static_cast<vec<T, 2>*>(lanes[lane].out);
    for (int e = 0; e < 2; ++e) {
      float acc = c[r][col + e];
      for (int k = 0; k < 8; ++k) acc += a[r][k] * b[k][col + e];
      out[e] = T(acc);
    }
  }
  return nullptr;
}

}  // namespace detail

template <class T, int Rows, int Cols>
simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Rows, Cols> m;
  m.elements = vec<T, 2>{value, value};
  return m;
}

// src is a pointer into any address space; origin is (column, row) of the tile's first element.
template <class T, class Pointer>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, Pointer src, ulong elements_per_row = 8,
                    ulong2 origin = ulong2{0, 0}, bool transpose = false) {
  uint32_t r, c;
  detail::lane_coord(detail::lane_id(), r, c);
  for (uint32_t e = 0; e < 2; ++e) {
    const ulong row = transpose ? c + e : r, col = transpose ? r : c + e;
    m.elements[e] = T(src[(origin.y + row) * elements_per_row + origin.x + col]);
  }
}

template <class T, class Pointer>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, Pointer dst, ulong elements_per_row = 8,
                     ulong2 origin = ulong2{0, 0}, bool transpose = false) {
  uint32_t r, c;
  detail::lane_coord(detail::lane_id(), r, c);
  for (uint32_t e = 0; e < 2; ++e) {
    const ulong row = transpose ? c + e : r, col = transpose ? r : c + e;
    dst[(origin.y + row) * elements_per_row + origin.x + col] = m.elements[e];
  }
}

template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                   const simdgroup_matrix<T, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c,
                                   MSL_EMU_SITE) {
  const detail::MmaOperands<T> in{a.elements, b.elements, c.elements};
  msl_emu_simd_collective(file, line, &in, &d.elements, 0, &detail::multiply_accumulate<T>);
}

template <class T>
void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                        const simdgroup_matrix<T, 8, 8>& b, MSL_EMU_SITE) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0)), file, line);
}
#undef MSL_EMU_SITE

}  // namespace metal

// ---- kernel invocation: builds each argument from the kernel's [[...]] parameter table -----------

namespace msl_emu {

template <class T>
T builtin_value(int builtin) {
  uint32_t v[3];
  msl_emu_builtin(builtin, v);
  if constexpr (std::is_arithmetic_v<T>) {
    return T(v[0]);
  } else {
    T out{};
    for (int i = 0; i < int(__builtin_vectorelements(T)); ++i) out[i] = v[i];
    return out;
  }
}

template <class T>
decltype(auto) argument(Param p) {
  if constexpr (std::is_pointer_v<T>) {
    return (T)(p.kind == ParamKind::threadgroup_memory ? msl_emu_threadgroup_param(p.index) : msl_emu_buffer(p.index));
  } else if constexpr (std::is_reference_v<T>) {
    return *(std::remove_reference_t<T>*)msl_emu_buffer(p.index);  // `constant Params& p [[buffer(n)]]`
  } else {
    return builtin_value<T>(p.index);
  }
}

template <class... A>
constexpr size_t arity(void (*)(A...)) { return sizeof...(A); }

template <const Param* P, class... A, size_t... I>
void call(void (*kernel)(A...), std::index_sequence<I...>) { kernel(argument<A>(P[I])...); }

template <auto Kernel, const Param* P>
void invoke() { call<P>(Kernel, std::make_index_sequence<arity(Kernel)>()); }

struct Registrar {
  Registrar(const char* name, void (*entry)()) { msl_emu_register(name, entry); }
};

}  // namespace msl_emu

#define device MSL_EMU_DEVICE
#define constant const MSL_EMU_CONSTANT
#define threadgroup MSL_EMU_THREADGROUP
#define thread
