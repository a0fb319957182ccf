// Torch-free check of every CPU kernel variant against a float64 reference written here, on buffers
// sized exactly so that AddressSanitizer catches any read past a packed matrix (the decoders load
// 16 bytes at a time where the buffer allows it).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

using metalq::cpu::Bf16QmmT;
using metalq::cpu::KernelTable;
using metalq::cpu::PackedMatrix;
using metalq::cpu::ScalarKind;

namespace {

int failures = 0;

void expect_close(double got, double want, double tol, const std::string& what) {
  if (std::fabs(got - want) <= tol * (1.0 + std::fabs(want))) return;
  if (++failures <= 20) std::printf("FAIL %s: got %.8g want %.8g\n", what.c_str(), got, want);
}

uint16_t to_bf16_bits(float f) {  // truncation is fine: the reference reads the stored value back
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

// A random quantized matrix whose scales and biases are stored as `kind`; the reference keeps the
// stored (rounded) values as doubles.
struct Case {
  std::vector<uint8_t> packed;
  std::vector<float> scales_f32, biases_f32;
  std::vector<uint16_t> scales_16, biases_16;
  std::vector<double> dense;  // rows x cols, scale * q + bias
  PackedMatrix W;
};

Case make_case(int64_t rows, int64_t cols, int bits, int group_size, ScalarKind kind, std::mt19937& rng) {
  Case c;
  const int64_t groups = rows * (cols / group_size);
  std::uniform_int_distribution<int> q_dist(0, (1 << bits) - 1);
  std::normal_distribution<float> f_dist(0.f, 1.f);
  std::vector<int> q(rows * cols);
  for (auto& v : q) v = q_dist(rng);
  c.packed.assign(rows * cols * bits / 8, 0);
  for (int64_t i = 0; i < rows * cols; ++i)  // LSB-first bitstream
    for (int b = 0; b < bits; ++b)
      if ((q[i] >> b) & 1) c.packed[(i * bits + b) / 8] |= uint8_t(1u << ((i * bits + b) % 8));
  std::vector<double> s(groups), z(groups);
  for (int64_t g = 0; g < groups; ++g) {
    float sf = 0.1f * f_dist(rng), zf = f_dist(rng);
    if (kind == ScalarKind::f32) {
      c.scales_f32.push_back(sf);
      c.biases_f32.push_back(zf);
      s[g] = sf, z[g] = zf;
    } else if (kind == ScalarKind::bf16) {
      c.scales_16.push_back(to_bf16_bits(sf));
      c.biases_16.push_back(to_bf16_bits(zf));
      uint32_t su = uint32_t(c.scales_16.back()) << 16, zu = uint32_t(c.biases_16.back()) << 16;
      float sr, zr;
      std::memcpy(&sr, &su, 4);
      std::memcpy(&zr, &zu, 4);
      s[g] = sr, z[g] = zr;
    } else {
      _Float16 sh = _Float16(sf), zh = _Float16(zf);
      uint16_t sb, zb;
      std::memcpy(&sb, &sh, 2);
      std::memcpy(&zb, &zh, 2);
      c.scales_16.push_back(sb);
      c.biases_16.push_back(zb);
      s[g] = double(sh), z[g] = double(zh);
    }
  }
  c.dense.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t g = r * (cols / group_size) + k / group_size;
      c.dense[r * cols + k] = s[g] * q[r * cols + k] + z[g];
    }
  const bool f32 = kind == ScalarKind::f32;
  c.W = PackedMatrix{c.packed.data(),
                     f32 ? static_cast<const void*>(c.scales_f32.data()) : c.scales_16.data(),
                     f32 ? static_cast<const void*>(c.biases_f32.data()) : c.biases_16.data(),
                     kind, rows, cols, bits, group_size};
  return c;
}

void check_table(const KernelTable& t, int64_t rows, int64_t cols, int bits, int gs, ScalarKind kind, int64_t M,
                 std::mt19937& rng) {
  const std::string tag = std::string(t.isa) + " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                          " bits=" + std::to_string(bits) + " gs=" + std::to_string(gs) +
                          " kind=" + std::to_string(int(kind)) + " M=" + std::to_string(M);
  Case c = make_case(rows, cols, bits, gs, kind, rng);
  std::normal_distribution<float> f_dist(0.f, 1.f);

  // x @ W.T, with the rows split into two ranges as two threads would.
  std::vector<float> x(M * cols);
  for (auto& v : x) v = f_dist(rng);
  std::vector<float> scratch(metalq::cpu::qmm_t_scratch_floats(c.W, M));
  t.prepare_x(c.W, x.data(), M, scratch.data());
  std::vector<float> y(M * rows);
  const int64_t split = rows / 2;
  t.qmm_t(c.W, scratch.data(), M, y.data(), rows, 0, split);
  t.qmm_t(c.W, scratch.data(), M, y.data(), rows, split, rows);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < rows; ++n) {
      double want = 0;
      for (int64_t k = 0; k < cols; ++k) want += double(x[m * cols + k]) * c.dense[n * cols + k];
      expect_close(y[m * rows + n], want, 1e-4, "qmm_t " + tag);
    }

  // x @ W with W as [rows=K, cols=N], columns split at an unaligned point.
  std::vector<float> xn(M * rows);
  for (auto& v : xn) v = f_dist(rng);
  std::vector<float> yn(M * cols);
  const int64_t cut = cols / 3;
  t.qmm_n(c.W, xn.data(), M, yn.data(), 0, cut);
  t.qmm_n(c.W, xn.data(), M, yn.data(), cut, cols);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < cols; ++n) {
      double want = 0;
      for (int64_t k = 0; k < rows; ++k) want += double(xn[m * rows + k]) * c.dense[k * cols + n];
      expect_close(yn[m * cols + n], want, 1e-4, "qmm_n " + tag);
    }

  // Dequantized tiles.
  std::vector<float> tile(rows * cols);
  std::vector<uint16_t> tile16(rows * cols);
  t.dequantize_f32(c.W, 0, rows, tile.data());
  t.dequantize_bf16(c.W, 0, rows, tile16.data());
  for (int64_t i = 0; i < rows * cols; ++i) {
    expect_close(tile[i], c.dense[i], 1e-6, "dequantize_f32 " + tag);
    uint32_t u = uint32_t(tile16[i]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    expect_close(f, c.dense[i], 1.0 / 128, "dequantize_bf16 " + tag);
  }
}

// The bfloat16-activation product: x is rounded to bfloat16 first, so the reference uses those values.
void check_bf16(const Bf16QmmT& k, int64_t rows, int64_t cols, int bits, int gs, int64_t M, std::mt19937& rng) {
  const std::string tag = "bf16 rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                          " bits=" + std::to_string(bits) + " gs=" + std::to_string(gs) + " M=" + std::to_string(M);
  Case c = make_case(rows, cols, bits, gs, ScalarKind::bf16, rng);
  std::normal_distribution<float> f_dist(0.f, 1.f);
  std::vector<uint16_t> x(M * cols);
  for (auto& v : x) v = to_bf16_bits(f_dist(rng));
  std::vector<uint8_t> scratch(k.scratch_bytes(c.W, M));
  k.prepare_x(c.W, x.data(), M, scratch.data());
  std::vector<float> y(M * rows);
  k.qmm_t(c.W, scratch.data(), M, y.data(), rows, 0, rows / 2);
  k.qmm_t(c.W, scratch.data(), M, y.data(), rows, rows / 2, rows);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < rows; ++n) {
      double want = 0;
      for (int64_t k2 = 0; k2 < cols; ++k2) {
        uint32_t u = uint32_t(x[m * cols + k2]) << 16;
        float xf;
        std::memcpy(&xf, &u, 4);
        want += double(xf) * c.dense[n * cols + k2];
      }
      expect_close(y[m * rows + n], want, 1e-4, "qmm_t " + tag);
    }
}

}  // namespace

int main() {
  std::vector<const KernelTable*> tables = {&metalq::cpu::generic::table()};
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    tables.push_back(&metalq::cpu::avx2::table());
#endif
  std::mt19937 rng(1234);
  int cases = 0;
  for (const KernelTable* t : tables)
    for (int bits : {1, 2, 3, 4, 5, 6, 8})
      for (int gs : {32, 64, 128})
        for (ScalarKind kind : {ScalarKind::f32, ScalarKind::f16, ScalarKind::bf16})
          for (int64_t cols : {int64_t(gs), int64_t(3 * gs), int64_t(512 + gs)})
            for (int64_t M : {1, 5}) {
              check_table(*t, /*rows=*/(M == 1 ? 3 : 7), cols, bits, gs, kind, M, rng);
              ++cases;
            }
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx512bf16"))
    for (int bits : {1, 2, 4, 8})
      for (int gs : {32, 64, 128})
        for (int64_t cols : {int64_t(gs), int64_t(3 * gs), int64_t(512 + gs), int64_t(1024)})
          for (int64_t M : {1, 3, 9}) {
            check_bf16(*metalq::cpu::avx512_bf16::kernels(bits), 5, cols, bits, gs, M, rng);
            ++cases;
          }
#endif
  std::printf("%d passed, %d failed\n", cases - (failures ? 1 : 0), failures ? 1 : 0);
  return failures ? 1 : 0;
}
