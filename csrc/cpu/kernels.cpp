#include "kernels.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace metalq::cpu {

namespace generic { const KernelTable& table(); }
#if defined(__x86_64__) || defined(_M_X64)
namespace avx2 { const KernelTable& table(); }
#endif

namespace {

const KernelTable& best_table() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  if (const char* forced = std::getenv("METALQ_CPU_ISA")) {
    std::string isa(forced);
    if (isa == "generic") return generic::table();
    if (isa == "avx2" && has_avx2) return avx2::table();
    throw std::runtime_error("METALQ_CPU_ISA=" + isa + " is not one of generic, avx2 supported by this CPU");
  }
  if (has_avx2) return avx2::table();
#endif
  return generic::table();
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& t = best_table();
  return t;
}

}  // namespace metalq::cpu
