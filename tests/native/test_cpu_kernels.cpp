// Torch-free check of every CPU kernel variant against a float64 reference written here, on buffers
// sized exactly so that AddressSanitizer catches any read past a packed matrix (the decoders load
// 16 bytes at a time where the buffer allows it).
//
// `test_cpu_kernels --digest` also prints, for each case of the generic variant, one line with an
// FNV-1a hash of the inputs and of every kernel's output bytes. The inputs come from integer
// arithmetic only (no libm, whose last bits may differ between targets), so an x86-64 build and an
// aarch64 build must print identical lines: the generic kernels are bit-exact across targets
// (tests/test_native.py runs the aarch64 build under qemu and compares).
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fp_format.h"
#include "kernels.h"
#include "params.h"

using metalq::cpu::DotQmmT;
using metalq::cpu::KernelTable;
using metalq::cpu::PackedMatrix;
using metalq::cpu::ScalarKind;
using metalq::cpu::ValueCode;

namespace {

int failures = 0;
bool print_digests = false;

// |got - want| <= tol * (1 + max(|want|, magnitude)): `magnitude` is |x| @ |W| for the products of the
// fp modes, whose elements span 2^-9 .. 448 so that float sums cancel far more than affine ones.
void expect_close(double got, double want, double tol, const std::string& what, double magnitude = 0) {
  if (std::fabs(got - want) <= tol * (1.0 + std::max(std::fabs(want), magnitude))) return;
  if (++failures <= 20) std::printf("FAIL %s: got %.8g want %.8g\n", what.c_str(), got, want);
}

void expect_equal(double got, double want, const std::string& what) {
  if (got == want) return;
  if (++failures <= 20) std::printf("FAIL %s: got %.9g want %.9g\n", what.c_str(), got, want);
}

// FNV-1a (64-bit) over raw bytes.
struct Digest {
  uint64_t h = 0xcbf29ce484222325ull;
  Digest& add(const void* p, size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
    return *this;
  }
  template <class T>
  Digest& add(const std::vector<T>& v) {
    return add(v.data(), v.size() * sizeof(T));
  }
};

// Deterministic inputs from integer arithmetic only: the same values on every target.
struct Rng {
  std::mt19937 gen;
  explicit Rng(uint32_t seed) : gen(seed) {}
  uint32_t below(uint32_t n) { return gen() % n; }
  // Uniform in [-1, 1) on a grid of 2^-23 (exact in float).
  float uniform() { return float(int32_t(gen() >> 8) - (1 << 23)) * (1.0f / (1 << 23)); }
  // Triangular in [-2, 2), centred on 0 (the sum is exact in float).
  float symmetric() { return uniform() + uniform(); }
};

const char* kind_name(ScalarKind k) {
  switch (k) {
    case ScalarKind::f32: return "f32";
    case ScalarKind::f16: return "f16";
    case ScalarKind::bf16: return "bf16";
    case ScalarKind::e8m0: return "e8m0";
    default: return "e4m3";
  }
}

const char* code_name(ValueCode c) { return c == ValueCode::uint ? "uint" : (c == ValueCode::e2m1 ? "e2m1" : "e4m3"); }

uint16_t to_bf16_bits(float f) {  // truncation is fine: the reference reads the stored value back
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t(u >> 16);
}

float bf16_value(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float rounded_to_bf16(float f) {  // round to nearest even, as the kernels' conversions (finite f)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return bf16_value(uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16));
}

// How a matrix is quantized: the affine format (ValueCode::uint with f32 / f16 / bf16 scales and
// biases), or an fp mode (mxfp4: e2m1 + e8m0, nvfp4: e2m1 + e4m3 with a global factor, mxfp8:
// e4m3 + e8m0; no biases).
struct Format {
  int bits;
  int group_size;
  ScalarKind kind;
  ValueCode code = ValueCode::uint;
  float global = 1.0f;  // nvfp4's global scale / (448 * 6)
};

double element_value(ValueCode c, uint32_t q) {
  if (c == ValueCode::uint) return double(q);
  return c == ValueCode::e2m1 ? double(metalq::e2m1_value(q)) : double(metalq::e4m3_value(q));
}

// A random quantized matrix whose scales (and biases) are stored as `kind`; the reference keeps the
// stored (rounded) values as doubles.
struct Case {
  std::vector<uint8_t> packed;
  std::vector<float> scales_f32, biases_f32;
  std::vector<uint16_t> scales_16, biases_16;
  std::vector<uint8_t> scales_8;
  std::vector<double> dense;  // rows x cols: scale * q + bias, or scale * element * global
  PackedMatrix W;
};

Case make_case(int64_t rows, int64_t cols, const Format& f, Rng& rng) {
  Case c;
  const int bits = f.bits;
  const int64_t groups = rows * (cols / f.group_size);
  std::vector<uint32_t> q(rows * cols);
  for (auto& v : q) {
    if (f.code == ValueCode::uint) {
      v = rng.below(1u << bits);
    } else if (f.code == ValueCode::e2m1) {
      v = rng.below(16);
    } else {  // every E4M3 code but the NaNs 0x7F and 0xFF
      v = rng.below(254);
      if (v >= 0x7F) ++v;
    }
  }
  c.packed.assign(rows * cols * bits / 8, 0);
  for (int64_t i = 0; i < rows * cols; ++i)  // LSB-first bitstream
    for (int b = 0; b < bits; ++b)
      if ((q[i] >> b) & 1) c.packed[(i * bits + b) / 8] |= uint8_t(1u << ((i * bits + b) % 8));
  std::vector<double> s(groups), z(groups, 0.0);
  for (int64_t g = 0; g < groups; ++g) {
    const float sf = 0.1f * rng.symmetric(), zf = rng.symmetric();
    if (f.kind == ScalarKind::f32) {
      c.scales_f32.push_back(sf);
      c.biases_f32.push_back(zf);
      s[g] = sf, z[g] = zf;
    } else if (f.kind == ScalarKind::bf16) {
      c.scales_16.push_back(to_bf16_bits(sf));
      c.biases_16.push_back(to_bf16_bits(zf));
      s[g] = bf16_value(c.scales_16.back()), z[g] = bf16_value(c.biases_16.back());
    } else if (f.kind == ScalarKind::f16) {
      const metalq::cpu::float16_storage sh = sf, zh = zf;
      uint16_t sb, zb;
      std::memcpy(&sb, &sh, 2);
      std::memcpy(&zb, &zh, 2);
      c.scales_16.push_back(sb);
      c.biases_16.push_back(zb);
      s[g] = double(float(sh)), z[g] = double(float(zh));
    } else if (f.kind == ScalarKind::e8m0) {  // 2^-7 .. 2^7
      c.scales_8.push_back(uint8_t(120 + rng.below(15)));
      s[g] = double(metalq::e8m0_value(c.scales_8.back()));
    } else {  // positive normal E4M3 scales, 2^-6 .. 224
      c.scales_8.push_back(uint8_t(0x08 + rng.below(0x77 - 0x08)));
      s[g] = double(metalq::e4m3_value(c.scales_8.back()));
    }
  }
  const bool affine = f.code == ValueCode::uint;
  c.dense.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < cols; ++k) {
      const int64_t g = r * (cols / f.group_size) + k / f.group_size;
      const double e = element_value(f.code, q[r * cols + k]);
      c.dense[r * cols + k] = affine ? s[g] * e + z[g] : s[g] * e * double(f.global);
    }
  const void* scales = f.kind == ScalarKind::f32 ? static_cast<const void*>(c.scales_f32.data())
                       : c.scales_8.empty()      ? static_cast<const void*>(c.scales_16.data())
                                                 : static_cast<const void*>(c.scales_8.data());
  const void* biases = !affine ? nullptr
                       : f.kind == ScalarKind::f32 ? static_cast<const void*>(c.biases_f32.data())
                                                   : static_cast<const void*>(c.biases_16.data());
  // The kernels see E2M1 doubled and E4M3 in units of 2^-9; value_scale undoes that (kernels.h).
  const float code_unit = f.code == ValueCode::e2m1 ? 0.5f : (f.code == ValueCode::e4m3 ? 1.0f / 512.0f : 1.0f);
  c.W = PackedMatrix{c.packed.data(), scales, biases, f.kind, rows, cols, bits, f.group_size, f.code, code_unit * f.global};
  return c;
}

// mx.quantize's rule in scalar float (kernels_impl.h vectorises it): the exact expected output.
void reference_quantize(const float* w, int64_t K, int gs, int bits, uint8_t* q, float* scales, float* biases) {
  const float n_bins = float((1 << bits) - 1);
  for (int64_t g = 0; g < K / gs; ++g) {
    const float* wg = w + g * gs;
    float w_min = wg[0], w_max = wg[0];
    for (int i = 1; i < gs; ++i) w_min = std::min(w_min, wg[i]), w_max = std::max(w_max, wg[i]);
    float scale, bias;
    if (bits == 1) {
      scale = std::max(w_max - w_min, metalq::kQuantizeEps);
      bias = w_min;
    } else {
      scale = std::max((w_max - w_min) / n_bins, metalq::kQuantizeEps);
      const bool min_is_edge = std::fabs(w_min) > std::fabs(w_max);
      scale = min_is_edge ? scale : -scale;
      const float edge = min_is_edge ? w_min : w_max;
      const float q0 = std::rint(edge / scale);
      bias = 0.f;
      if (q0 != 0.f) scale = edge / q0, bias = edge;
    }
    scales[g] = scale;
    biases[g] = bias;
    for (int i = 0; i < gs; ++i)
      q[g * gs + i] = uint8_t(std::min(std::max(std::rint((wg[i] - bias) / scale), 0.f), n_bins));
  }
}

void check_table(const KernelTable& t, int64_t rows, int64_t cols, const Format& f, int64_t M, Rng& rng) {
  const bool affine = f.code == ValueCode::uint;
  const std::string tag = std::string(t.isa) + " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                          " bits=" + std::to_string(f.bits) + " gs=" + std::to_string(f.group_size) +
                          " kind=" + kind_name(f.kind) + " code=" + code_name(f.code) +
                          (f.global != 1.0f ? " global" : "") + " M=" + std::to_string(M);
  Case c = make_case(rows, cols, f, rng);
  Digest in;
  in.add(c.packed).add(c.scales_f32).add(c.biases_f32).add(c.scales_16).add(c.biases_16).add(c.scales_8);

  // x @ W.T, with the rows split into two ranges as two threads would.
  std::vector<float> x(M * cols);
  for (auto& v : x) v = rng.symmetric();
  std::vector<float> scratch(metalq::cpu::qmm_t_scratch_floats(c.W, M));
  t.prepare_x(c.W, x.data(), M, scratch.data());
  std::vector<float> y(M * rows);
  const int64_t split = rows / 2;
  t.qmm_t(c.W, scratch.data(), M, y.data(), rows, 0, split);
  t.qmm_t(c.W, scratch.data(), M, y.data(), rows, split, rows);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < rows; ++n) {
      double want = 0, magnitude = 0;
      for (int64_t k = 0; k < cols; ++k) {
        want += double(x[m * cols + k]) * c.dense[n * cols + k];
        magnitude += std::fabs(double(x[m * cols + k]) * c.dense[n * cols + k]);
      }
      expect_close(y[m * rows + n], want, 1e-4, "qmm_t " + tag, affine ? 0.0 : magnitude);
    }

  // x @ W with W as [rows=K, cols=N], columns split at an unaligned point.
  std::vector<float> xn(M * rows);
  for (auto& v : xn) v = rng.symmetric();
  std::vector<float> yn(M * cols);
  const int64_t cut = cols / 3;
  t.qmm_n(c.W, xn.data(), M, yn.data(), 0, cut);
  t.qmm_n(c.W, xn.data(), M, yn.data(), cut, cols);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < cols; ++n) {
      double want = 0, magnitude = 0;
      for (int64_t k = 0; k < rows; ++k) {
        want += double(xn[m * rows + k]) * c.dense[k * cols + n];
        magnitude += std::fabs(double(xn[m * rows + k]) * c.dense[k * cols + n]);
      }
      expect_close(yn[m * cols + n], want, 1e-4, "qmm_n " + tag, affine ? 0.0 : magnitude);
    }

  // Dequantized tiles, from an inner row on (r0 > 0).
  const int64_t r0 = rows > 1 ? 1 : 0, tile_rows = rows - r0;
  std::vector<float> tile(tile_rows * cols);
  std::vector<uint16_t> tile16(tile_rows * cols);
  t.dequantize_f32(c.W, r0, rows, tile.data());
  t.dequantize_bf16(c.W, r0, rows, tile16.data());
  for (int64_t i = 0; i < tile_rows * cols; ++i) {
    const double want = c.dense[r0 * cols + i];
    expect_close(tile[i], want, 1e-6, "dequantize_f32 " + tag);
    expect_close(bf16_value(tile16[i]), want, 1.0 / 128, "dequantize_bf16 " + tag);
  }

  // quantize_row (affine only; it takes float rows whatever the scale storage): rows of several
  // magnitudes, with a constant group (the eps scale) and an all-zero group.
  const int gs = f.group_size, G = int(cols / gs);
  std::vector<float> wq(rows * cols);
  std::vector<uint8_t> qq(rows * cols), q_ref(rows * cols);
  std::vector<float> qs(rows * G), qb(rows * G), qs_ref(rows * G), qb_ref(rows * G);
  if (affine) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) wq[r * cols + k] = rng.symmetric() * 0.25f * float(r + 1);
    for (int i = 0; i < gs; ++i) wq[1 * cols + i] = 0.375f, wq[2 * cols + (G - 1) * gs + i] = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      t.quantize_row(wq.data() + r * cols, cols, gs, f.bits, qq.data() + r * cols, qs.data() + r * G, qb.data() + r * G);
      reference_quantize(wq.data() + r * cols, cols, gs, f.bits, q_ref.data() + r * cols, qs_ref.data() + r * G,
                         qb_ref.data() + r * G);
    }
    const double n_bins = double((1 << f.bits) - 1);
    for (int64_t r = 0; r < rows; ++r)
      for (int g = 0; g < G; ++g) {
        const int64_t i = r * G + g;
        expect_equal(qs[i], qs_ref[i], "quantize_row scale " + tag);
        expect_equal(qb[i], qb_ref[i], "quantize_row bias " + tag);
        const float* wg = wq.data() + r * cols + g * gs;
        double w_min = wg[0], w_max = wg[0];
        for (int k = 1; k < gs; ++k) w_min = std::min(w_min, double(wg[k])), w_max = std::max(w_max, double(wg[k]));
        // Every value within one level of the un-nudged scale (the edge is exact, the far end may clamp).
        const double level = std::max((w_max - w_min) / (f.bits == 1 ? 1.0 : n_bins), double(metalq::kQuantizeEps));
        for (int k = 0; k < gs; ++k) {
          const int64_t j = r * cols + g * gs + k;
          expect_equal(qq[j], q_ref[j], "quantize_row q " + tag);
          const double back = double(qs[i]) * qq[j] + double(qb[i]);
          if (std::fabs(back - wg[k]) > level * (1 + 1e-4) + 1e-6 && ++failures <= 20)
            std::printf("FAIL quantize_row round trip %s: %.8g -> %.8g\n", tag.c_str(), double(wg[k]), back);
        }
      }
  }

  if (print_digests && std::string(t.isa) == "generic") {
    in.add(x).add(xn).add(wq);
    auto hex = [](const Digest& d) {
      char buf[17];
      std::snprintf(buf, sizeof buf, "%016" PRIx64, d.h);
      return std::string(buf);
    };
    std::printf("digest %s in=%s prepare_x=%s qmm_t=%s qmm_n=%s dequantize_f32=%s dequantize_bf16=%s quantize_row=%s\n",
                tag.c_str(), hex(in).c_str(), hex(Digest().add(scratch)).c_str(), hex(Digest().add(y)).c_str(),
                hex(Digest().add(yn)).c_str(), hex(Digest().add(tile)).c_str(), hex(Digest().add(tile16)).c_str(),
                hex(Digest().add(qq).add(qs).add(qb)).c_str());
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// The dot-product x @ W.T (`name` the kernels): x is stored in the scales' float kind, so the reference
// uses the stored values.
// bf16_weights: the kernel multiplies W's values rounded (from float) to bfloat16, as a bfloat16 GEMM of
// the dequantized weight does.
void check_dot(const char* name, const DotQmmT& k, int64_t rows, int64_t cols, const Format& f, int64_t M, Rng& rng,
               bool bf16_weights = false) {
  const std::string tag = std::string(name) + " rows=" + std::to_string(rows) + " cols=" + std::to_string(cols) +
                          " bits=" + std::to_string(f.bits) + " gs=" + std::to_string(f.group_size) +
                          " kind=" + kind_name(f.kind) + " M=" + std::to_string(M);
  Case c = make_case(rows, cols, f, rng);
  std::vector<float> xv(M * cols);
  std::vector<uint16_t> x16(M * cols);
  for (int64_t i = 0; i < M * cols; ++i) {
    const float v = rng.symmetric();
    if (f.kind == ScalarKind::f32) {
      xv[i] = v;
    } else if (f.kind == ScalarKind::bf16) {
      x16[i] = to_bf16_bits(v);
      xv[i] = bf16_value(x16[i]);
    } else {
      const metalq::cpu::float16_storage h = v;
      std::memcpy(&x16[i], &h, 2);
      xv[i] = float(h);
    }
  }
  std::vector<uint8_t> scratch(k.scratch_bytes(c.W, M));
  k.prepare_x(c.W, f.kind == ScalarKind::f32 ? static_cast<const void*>(xv.data()) : x16.data(), M, scratch.data());
  std::vector<float> y(M * rows);
  k.qmm_t(c.W, scratch.data(), M, y.data(), rows, 0, rows / 2);
  k.qmm_t(c.W, scratch.data(), M, y.data(), rows, rows / 2, rows);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < rows; ++n) {
      double want = 0;
      for (int64_t k2 = 0; k2 < cols; ++k2) {
        const double w = c.dense[n * cols + k2];
        want += double(xv[m * cols + k2]) * (bf16_weights ? double(rounded_to_bf16(float(w))) : w);
      }
      expect_close(y[m * rows + n], want, 1e-4, "qmm_t " + tag);
    }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  print_digests = argc > 1 && std::string(argv[1]) == "--digest";
  std::vector<const KernelTable*> tables = {&metalq::cpu::generic::table()};
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("bmi2"))
    tables.push_back(&metalq::cpu::avx2::table());
  // The AVX512-BF16 table: the AVX2 one with its own affine dequantization.
  if (std::string(metalq::cpu::kernels().isa) == "avx512bf16" || std::string(metalq::cpu::kernels().isa) == "amx")
    tables.push_back(&metalq::cpu::kernels());
#endif
  int cases = 0, failed = 0;
  auto count = [&](int failures_before) {
    ++cases;
    if (failures != failures_before) ++failed;
  };
  // The fp modes: mxfp4, nvfp4 without and with a global scale, mxfp8.
  const Format fp_modes[] = {{4, 32, ScalarKind::e8m0, ValueCode::e2m1},
                             {4, 16, ScalarKind::e4m3, ValueCode::e2m1},
                             {4, 16, ScalarKind::e4m3, ValueCode::e2m1, 0.3f},
                             {8, 32, ScalarKind::e8m0, ValueCode::e4m3}};
  for (const KernelTable* t : tables) {
    // Every variant sees the same inputs. K: all tail (gs), whole blocks and tails (3 gs, 512 + gs);
    // M = 1, 2 and 7 = 4 + 3 run each row count of the x @ W.T micro-kernel (1 to 4).
    Rng rng(1234);
    for (int bits : metalq::kSupportedBits)
      for (int gs : metalq::kSupportedGroupSizes)
        for (ScalarKind kind : {ScalarKind::f32, ScalarKind::f16, ScalarKind::bf16})
          for (int64_t cols : {int64_t(gs), int64_t(3 * gs), int64_t(512 + gs)})
            for (int64_t M : {1, 2, 7}) {
              const int before = failures;
              check_table(*t, /*rows=*/(M == 1 ? 3 : 7), cols, Format{bits, gs, kind}, M, rng);
              count(before);
            }
    for (const Format& f : fp_modes)
      for (int64_t cols : {int64_t(f.group_size), int64_t(3 * f.group_size), int64_t(512 + f.group_size)})
        for (int64_t M : {1, 2, 7}) {
          const int before = failures;
          check_table(*t, /*rows=*/(M == 1 ? 3 : 7), cols, f, M, rng);
          count(before);
        }
  }
#if defined(__x86_64__) || defined(_M_X64)
  if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi")) {
    // K: a tail only (gs), tails after whole blocks (3 gs, 512 + gs), whole blocks (1024); M = 1, 3, 9 run
    // 1, 3, 8 + 1 rows per pass.
    Rng rng(4321);
    for (int bits : metalq::kSupportedBits)
      for (int gs : metalq::kSupportedGroupSizes)
        for (ScalarKind kind : {ScalarKind::f16, ScalarKind::bf16})
          for (int64_t cols : {int64_t(gs), int64_t(3 * gs), int64_t(512 + gs), int64_t(1024)})
            for (int64_t M : {1, 3, 9}) {
              const int before = failures;
              check_dot("dot", *metalq::cpu::avx512_bf16::kernels(bits, kind), 5, cols, Format{bits, gs, kind}, M, rng);
              count(before);
            }
  }
  if (metalq::cpu::avx512_bf16::amx_available()) {
    // Rows of W: a part of one block (5), and per thread's half a whole pass and then part of one (2 x 70);
    // M = 1, 2, 17 and 33: parts of a chunk of x's rows, whole chunks and part of one (bfloat16 x of 33
    // rows takes the dequantized tiles). float32 x too (3 parts). Then K = 4096: a panel of W holds two
    // passes of 4 blocks, so each half of 300 rows spans panels.
    Rng rng(2468);
    const auto check_amx = [&](int bits, int gs, ScalarKind kind, int64_t rows, int64_t cols, int64_t M) {
      const int before = failures;
      check_dot("amx", *metalq::cpu::avx512_bf16::amx_kernels(bits, kind, M), rows, cols, Format{bits, gs, kind}, M,
                rng, kind == ScalarKind::bf16 && M >= 32);
      count(before);
    };
    for (int bits : metalq::kSupportedBits)
      for (int gs : {32, 64, 128})
        for (ScalarKind kind : {ScalarKind::f32, ScalarKind::f16, ScalarKind::bf16}) {
          for (int64_t cols : {int64_t(gs), int64_t(3 * gs), int64_t(512 + gs)})
            for (int64_t M : {1, 2, 17, 33}) check_amx(bits, gs, kind, M == 17 ? 140 : 5, cols, M);
          if (gs == 64 && (bits == 3 || bits == 4))
            for (int64_t M : {17, 33}) check_amx(bits, gs, kind, 300, 4096, M);
        }
  }
#endif
  // The selection by CPU features (kernels.cpp) runs here too: on arm64 it is the generic table.
  const KernelTable& best = metalq::cpu::kernels();
  std::printf("kernels(): %s\n", best.isa);
#if !defined(__x86_64__) && !defined(_M_X64)
  const int before = failures;
  if (&best != &metalq::cpu::generic::table() && ++failures <= 20) std::printf("FAIL kernels() is %s\n", best.isa);
  count(before);
#endif
  std::printf("%d passed, %d failed\n", cases - failed, failed);
  return failed ? 1 : 0;
}
