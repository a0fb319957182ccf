// x86-64 variant with AVX2 + FMA, chosen at run time by kernels.cpp from the CPU's feature flags.
// (A 16-lane AVX-512 build measured slower: its byte shuffles cross 128-bit lanes, and the M = 1
// product is bound by memory bandwidth, not by vector width.)
#if defined(__x86_64__) || defined(_M_X64)
#define METALQ_ISA avx2
#define METALQ_ISA_NAME "avx2"
#define METALQ_VW 8
#define METALQ_TARGET "avx2,fma,f16c,bmi2"
#include "kernels_impl.h"
#endif
