// The Metal standard library as declarations only, for the conformance pass (tests/emulator/
// __init__.py, check()): the rewritten .metal file is parsed once more in clang's C++ for OpenCL mode
// (-fsyntax-only), whose rules match Metal's where plain C++ is laxer: program-scope variables, static
// data members and static locals only in `constant`, no double / long double, no virtual functions,
// exceptions, new/delete, thread_local or typeid. Declares what msl_emu.h defines; keep the two in step.
#pragma once
#pragma OPENCL EXTENSION cl_khr_fp16 : enable

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef __bf16 bfloat;  // `half` is OpenCL's own 16-bit float type, as in Metal
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef unsigned long size_t;
typedef long ptrdiff_t;

namespace metal {
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));
}  // namespace metal

#define MSL_CONFORMANCE_VECTORS(T) \
  typedef metal::vec<T, 2> T##2;   \
  typedef metal::vec<T, 3> T##3;   \
  typedef metal::vec<T, 4> T##4;
MSL_CONFORMANCE_VECTORS(float)
MSL_CONFORMANCE_VECTORS(half)
MSL_CONFORMANCE_VECTORS(bfloat)
MSL_CONFORMANCE_VECTORS(int)
MSL_CONFORMANCE_VECTORS(uint)
MSL_CONFORMANCE_VECTORS(short)
MSL_CONFORMANCE_VECTORS(ushort)
MSL_CONFORMANCE_VECTORS(char)
MSL_CONFORMANCE_VECTORS(uchar)
MSL_CONFORMANCE_VECTORS(ulong)
#undef MSL_CONFORMANCE_VECTORS

extern "C" void* msl_emu_threadgroup_alloc(int site, ulong size, ulong align);

namespace metal {

template <class T> T max(T a, T b);
template <class T> T min(T a, T b);
template <class T> T clamp(T x, T lo, T hi);
template <class T> T abs(T x);
template <class T> T fabs(T x);
template <class T> T rint(T x);
template <class T> T round(T x);
template <class T> T floor(T x);
template <class T> T ceil(T x);
template <class T> T sqrt(T x);
template <class T> T exp(T x);
template <class T> T log(T x);
template <class T> T fma(T a, T b, T c);
namespace precise {
template <class T> T divide(T a, T b);
}  // namespace precise
namespace fast {
using precise::divide;
}  // namespace fast

namespace detail {
template <class V, class... Parts> V vector_of(Parts... parts);
}  // namespace detail

template <class To, class From> To as_type(From x);

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
mem_flags operator|(mem_flags a, mem_flags b);
void threadgroup_barrier(mem_flags flags);
void simdgroup_barrier(mem_flags flags);

template <class T> T simd_sum(T x);
template <class T> T simd_product(T x);
template <class T> T simd_max(T x);
template <class T> T simd_min(T x);
template <class T> T simd_shuffle(T x, ushort lane);
template <class T> T simd_broadcast(T x, ushort lane);
template <class T> T simd_shuffle_down(T x, ushort delta);
template <class T> T simd_shuffle_up(T x, ushort delta);
template <class T> T simd_shuffle_xor(T x, ushort mask);

template <class T, int Rows, int Cols>
struct simdgroup_matrix {
  vec<T, 2> elements;
  vec<T, 2>& thread_elements();
  const vec<T, 2>& thread_elements() const;
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Rows, int Cols> simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T value);
template <class T, class Pointer>
void simdgroup_load(simdgroup_matrix<T, 8, 8>& m, Pointer src, ulong elements_per_row = 8,
                    ulong2 origin = ulong2{0, 0}, bool transpose = false);
template <class T, class Pointer>
void simdgroup_store(const simdgroup_matrix<T, 8, 8>& m, Pointer dst, ulong elements_per_row = 8,
                     ulong2 origin = ulong2{0, 0}, bool transpose = false);
template <class T>
void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                                   const simdgroup_matrix<T, 8, 8>& b, const simdgroup_matrix<T, 8, 8>& c);
template <class T>
void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<T, 8, 8>& a,
                        const simdgroup_matrix<T, 8, 8>& b);

}  // namespace metal

// Metal's address spaces are OpenCL's: device = global, constant, threadgroup = local, thread = private.
#define device __global
#define constant __constant
#define threadgroup __local
#define thread __private
