// x86-64 variants, chosen at run time by kernels.cpp from the CPU's feature flags.
#if defined(__x86_64__) || defined(_M_X64)

#define METALQ_ISA avx2
#define METALQ_ISA_NAME "avx2"
#define METALQ_VW 8
#define METALQ_TARGET "avx2,fma,f16c,bmi2"
#include "kernels_impl.h"
#undef METALQ_ISA
#undef METALQ_ISA_NAME
#undef METALQ_VW
#undef METALQ_TARGET

#define METALQ_ISA avx512
#define METALQ_ISA_NAME "avx512"
#define METALQ_VW 16
#define METALQ_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"
#include "kernels_impl.h"

#endif
