// Baseline variant: plain vector code the compiler lowers to whatever the target guarantees
// (SSE2 on x86-64, NEON on arm64).
#define METALQ_ISA generic
#define METALQ_ISA_NAME "generic"
#define METALQ_VW 8
#include "kernels_impl.h"
