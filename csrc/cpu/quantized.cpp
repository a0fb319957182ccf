// CPU implementations of the metalq ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cmath>

#include "../checks.h"
#include "../plan.h"
#include "kernels.h"
#include "params.h"
#include "quantized.h"

namespace metalq {
namespace {

using cpu::pack_row;
using cpu::unpack_row;

// Rows of W dequantized per GEMM tile: large enough for an efficient GEMM, small enough to stay in
// the L2 cache of the thread that made it (256 x 4096 float32 = 4 MiB).
constexpr int64_t kTileRows = 256;
// Rows of W per work item of the fused qmm_t kernels: small enough to spread one product over many
// threads, large enough that starting an item costs little.
constexpr int64_t kFusedTileRows = 64;
// Bytes of W dequantized at a time for the GEMM of many rows of x: each chunk then runs one GEMM on every
// thread (single-thread GEMMs on tiles of W, one per thread, scaled 1.8x from one thread to two where
// the dense linear scales 2.2x, and cost 10-20% over it on small matrices such as MiniLM's). A thread that
// ran such a product keeps this much scratch (weight_scratch); 16 MiB chunks measured 7% faster than 8.
constexpr int64_t kGemmChunkBytes = 16 << 20;
// Units of columns handed to one thread by qmm_n: a multiple of every decoder block (at most 512).
constexpr int64_t kColumnUnit = 512;
// Rows of x laid out for the fused kernels per task: the AMX kernels' chunk of x (a multiple of it would do).
constexpr int64_t kPrepareRows = 16;

cpu::ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::ScalarKind::f32;
    case at::kHalf: return cpu::ScalarKind::f16;
    default: return cpu::ScalarKind::bf16;  // validated by the checks
  }
}

cpu::PackedMatrix packed_matrix(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& biases,
                                int64_t group_size, int64_t bits) {
  return cpu::PackedMatrix{static_cast<const uint8_t*>(w.data_ptr()), scales.data_ptr(), biases.data_ptr(),
                           scalar_kind(scales.scalar_type()), w.size(0), w.size(1) * 32 / bits, int(bits),
                           int(group_size)};
}

// ---- pack / unpack: the LSB-first bitstream of MLX's format -------------------------------------

at::Tensor pack_cpu(const at::Tensor& q, int64_t bits) {
  const auto sym_sizes = check_pack(q, bits);
  const auto sizes = C10_AS_INTARRAYREF_SLOW(sym_sizes);
  check_pack_values(q, bits);
  auto qc = q.contiguous();
  auto out = at::empty(sizes, q.options().dtype(at::kUInt32));
  const int64_t count = q.size(-1), rows = count ? qc.numel() / count : 0;
  auto* src = qc.data_ptr<uint8_t>();
  auto* dst = static_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) pack_row(src + r * count, count, int(bits), dst + r * count * bits / 32);
  });
  return out;
}

at::Tensor unpack_cpu(const at::Tensor& w, int64_t bits) {
  const auto sym_sizes = check_unpack(w, bits);
  const auto sizes = C10_AS_INTARRAYREF_SLOW(sym_sizes);
  auto wc = w.contiguous();
  auto out = at::empty(sizes, w.options().dtype(at::kByte));
  const int64_t words = w.size(-1), rows = words ? wc.numel() / words : 0, count = sizes.back();
  auto* src = static_cast<const uint32_t*>(wc.data_ptr());
  auto* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) unpack_row(src + r * words, count, int(bits), dst + r * count);
  });
  return out;
}

// ---- quantize: MLX's CPU rule, so checkpoints are bit-identical to mx.quantize ------------------

template <class T>
void quantize_rows(const T* w, int64_t rows, int64_t K, int64_t group_size, int bits, uint32_t* wq, T* scales,
                   T* biases) {
  const auto& k = cpu::kernels();
  const int64_t G = K / group_size, words = K * bits / 32;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<float> wf(K), s(G), b(G);
    std::vector<uint8_t> q(K);
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = w + r * K;
      for (int64_t i = 0; i < K; ++i) wf[i] = float(src[i]);
      k.quantize_row(wf.data(), K, int(group_size), bits, q.data(), s.data(), b.data());
      for (int64_t g = 0; g < G; ++g) {
        scales[r * G + g] = T(s[g]);
        biases[r * G + g] = T(b[g]);
      }
      pack_row(q.data(), K, bits, wq + r * words);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_quantize_cpu(const at::Tensor& w, int64_t group_size,
                                                                   int64_t bits) {
  check_affine_quantize(w, group_size, bits);
  check_finite_weights(w);
  auto wc = w.contiguous();
  auto wq = at::empty(C10_AS_INTARRAYREF_SLOW(packed_sizes(w, bits)), w.options().dtype(at::kUInt32));
  const auto sym_gsizes = group_sizes(w, group_size);
  const auto gsizes = C10_AS_INTARRAYREF_SLOW(sym_gsizes);
  auto scales = at::empty(gsizes, w.options());
  auto biases = at::empty(gsizes, w.options());
  const int64_t K = w.size(-1), rows = K ? w.numel() / K : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "affine_quantize", [&] {
    quantize_rows(wc.data_ptr<scalar_t>(), rows, K, group_size, int(bits), static_cast<uint32_t*>(wq.data_ptr()),
                  scales.data_ptr<scalar_t>(), biases.data_ptr<scalar_t>());
  });
  return {wq, scales, biases};
}

// ---- dequantize: w = scale * q + bias with MLX's roundings (the product, then the sum, in T) -------

template <class T>
T dequantize_value(uint32_t q, T scale, T bias) {
  if constexpr (std::is_same_v<T, float>) {
    // The double product is exact, so this rounds q * scale once and cannot be fused into an FMA.
    const float product = float(double(q) * double(scale));
    return product + bias;
  } else {
    const T product = T(float(q) * float(scale));  // exact in float for q < 256
    return T(float(product) + float(bias));
  }
}

at::Tensor affine_dequantize_cpu(const at::Tensor& wq, const at::Tensor& scales, const at::Tensor& biases,
                                 int64_t group_size, int64_t bits) {
  const int64_t K = check_affine_dequantize(wq, scales, biases, group_size, bits).expect_int();
  auto sizes = wq.sizes().vec();
  sizes.back() = K;
  auto out = at::empty(sizes, scales.options());
  auto wc = wq.contiguous(), sc = scales.contiguous(), bc = biases.contiguous();
  const int64_t words = wq.size(-1), rows = words ? wq.numel() / words : 0, G = K / group_size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scales.scalar_type(), "affine_dequantize", [&] {
    auto* w = static_cast<const uint32_t*>(wc.data_ptr());
    auto* s = sc.data_ptr<scalar_t>();
    auto* b = bc.data_ptr<scalar_t>();
    auto* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      std::vector<uint8_t> q(K);
      for (int64_t r = r0; r < r1; ++r) {
        unpack_row(w + r * words, K, int(bits), q.data());
        for (int64_t k = 0; k < K; ++k)
          o[r * K + k] = dequantize_value<scalar_t>(q[k], s[r * G + k / group_size], b[r * G + k / group_size]);
      }
    });
  });
  return out;
}

// ---- quantized matmul ---------------------------------------------------------------------------

// Rows [r0, r1) of W dequantized into out, contiguous [r1 - r0, W.cols] float32 or bfloat16.
void dequantize_rows(const cpu::PackedMatrix& W, int64_t r0, int64_t r1, void* out, at::ScalarType dtype) {
  const auto& k = cpu::kernels();
  if (dtype == at::kBFloat16)
    k.dequantize_bf16(W, r0, r1, static_cast<uint16_t*>(out));
  else
    k.dequantize_f32(W, r0, r1, static_cast<float*>(out));
}

// A [rows, cols] tensor of `opts` on this thread's scratch for dequantized weights, valid until the
// thread's next call. The scratch is kept between calls: a fresh allocation of megabytes goes back to
// the OS when freed and faults its pages in again on every call (0.2 ms of a 3 ms MiniLM layer).
at::Tensor weight_scratch(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  thread_local std::vector<uint8_t> scratch;
  const size_t bytes = size_t(rows * cols) * opts.dtype().itemsize();
  if (scratch.size() < bytes) scratch.resize(bytes);
  return at::from_blob(scratch.data(), {rows, cols}, opts);
}

// Rows [r0, r1) of W dequantized into this thread's weight scratch.
at::Tensor dequantized_tile(const cpu::PackedMatrix& W, int64_t r0, int64_t r1, const at::TensorOptions& opts) {
  auto tile = weight_scratch(r1 - r0, W.cols, opts);
  dequantize_rows(W, r0, r1, tile.data_ptr(), tile.scalar_type());
  return tile;
}

// y = x2 @ W.T into out, W dequantized in chunks of rows of at most kGemmChunkBytes (each chunk's rows spread
// over the threads), each chunk then one GEMM on every thread into its columns of out.
void chunked_gemm_qmm_t(const cpu::PackedMatrix& W, const at::Tensor& x2, at::Tensor out) {
  const int64_t row_bytes = W.cols * x2.element_size();
  const int64_t chunk_rows = std::max<int64_t>(kGemmChunkBytes / row_bytes, 1);
  for (int64_t c0 = 0; c0 < W.rows; c0 += chunk_rows) {
    const int64_t c1 = std::min(W.rows, c0 + chunk_rows);
    auto wd = weight_scratch(c1 - c0, W.cols, x2.options());
    at::parallel_for(c0, c1, kFusedTileRows, [&](int64_t r0, int64_t r1) {
      dequantize_rows(W, r0, r1, static_cast<uint8_t*>(wd.data_ptr()) + (r0 - c0) * row_bytes, wd.scalar_type());
    });
    auto cols = out.narrow(1, c0, c1 - c0);
    // Straight into out's columns (row stride N) where the dtypes match: a GEMM writes a strided output
    // without a copy (bfloat16 x with fused blocks beside has a float32 y).
    if (cols.scalar_type() == x2.scalar_type())
      at::mm_out(cols, x2, wd.t());
    else
      cols.copy_(at::mm(x2, wd.t()));
  }
}

// x2 [M, K] float32; W [K, N]: x2 @ W as a K-tiled float GEMM. Each thread accumulates its K-tiles
// into a partial product; the partials are summed at the end.
at::Tensor qmm_n_gemm(const cpu::PackedMatrix& W, const at::Tensor& x2) {
  const int64_t M = x2.size(0), K = W.rows, N = W.cols;
  const int64_t tiles = (K + kTileRows - 1) / kTileRows;
  std::vector<at::Tensor> partials(at::get_num_threads());
  const at::ThreadLocalState caller;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    at::ThreadLocalStateGuard guard(caller);
    auto& y = partials[at::get_thread_num()];
    if (!y.defined()) y = at::zeros({M, N}, x2.options());
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t k0 = t * kTileRows, k1 = std::min(K, k0 + kTileRows);
      y.addmm_(x2.narrow(1, k0, k1 - k0), dequantized_tile(W, k0, k1, x2.options()));
    }
  });
  at::Tensor y = at::zeros({M, N}, x2.options());
  for (const auto& p : partials)
    if (p.defined()) y += p;
  return y;
}

// Rows [row0, row0 + rows) of the left operand, all multiplied by the packed matrix W. A plain
// matmul is one such block; a gather matmul has one block per expert in use.
struct RowBlock {
  cpu::PackedMatrix W;
  int64_t row0, rows;
  // x @ W: few rows run through the fused kernels, many dequantize tiles of W into a GEMM.
  bool fused() const { return rows < cpu::kGemmMinRows; }
};

// y = x @ W.T for every block: x [rows, K], returns float32 [rows, N], or bfloat16 where x is and every
// block runs a GEMM (the bfloat16 GEMM's output, with no float32 round trip). The fused blocks share one
// parallel region over (block, tile of N), so each W is read once and small blocks still spread over the
// threads; then each GEMM block runs its chunks.
at::Tensor blocks_qmm_t(const std::vector<RowBlock>& blocks, const at::Tensor& x) {
  const auto& k = cpu::kernels();
  const cpu::PackedMatrix& W = blocks.front().W;  // every block has W's format
  const int64_t N = W.rows;
  // The fused kernels read x in its dtype where this CPU has dot-product kernels for the block, else in
  // float32. bfloat16 activations get a bfloat16 GEMM (as a dense bfloat16 linear would); others a float32 one.
  const bool bf16_x = x.scalar_type() == at::kBFloat16;
  // A block runs fused below the GEMM threshold of its kernels.
  std::vector<const cpu::DotQmmT*> dots(blocks.size(), nullptr);
  std::vector<char> fused(blocks.size());
  bool float_fused = false, any_fused = false;
  for (size_t b = 0; b < blocks.size(); ++b) {
    const cpu::DotQmmT* dot = k.dot_qmm_t(blocks[b].W, blocks[b].rows);
    fused[b] = blocks[b].rows < (dot ? dot->gemm_min_rows : cpu::kGemmMinRows);
    dots[b] = fused[b] ? dot : nullptr;
    float_fused = float_fused || (fused[b] && !dot);
    any_fused = any_fused || fused[b];
  }
  const auto x_dot = x.contiguous();
  const auto x_float = float_fused ? x.to(at::kFloat).contiguous() : at::Tensor();
  const auto x_gemm = x.to(bf16_x ? at::kBFloat16 : at::kFloat).contiguous();
  std::vector<at::Tensor> scratch(blocks.size());  // x laid out for the decoder, per fused block
  for (size_t b = 0; b < blocks.size(); ++b) {
    const RowBlock& blk = blocks[b];
    if (fused[b])
      scratch[b] = dots[b] ? at::empty({dots[b]->scratch_bytes(blk.W, blk.rows)}, x.options().dtype(at::kByte))
                           : at::empty({cpu::qmm_t_scratch_floats(blk.W, blk.rows)}, x.options().dtype(at::kFloat));
  }
  // x is laid out in runs of kPrepareRows rows over all threads (a layout starts afresh at every such run:
  // its scratch is scratch_bytes(W, m0) in).
  struct Rows { int64_t block, m0, m1; };
  std::vector<Rows> runs;
  for (int64_t b = 0; b < int64_t(blocks.size()); ++b)
    if (fused[b])
      for (int64_t m0 = 0; m0 < blocks[b].rows; m0 += kPrepareRows)
        runs.push_back({b, m0, std::min(blocks[b].rows, m0 + kPrepareRows)});
  at::parallel_for(0, int64_t(runs.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Rows& run = runs[i];
      const RowBlock& blk = blocks[run.block];
      const int64_t row = blk.row0 + run.m0, rows = run.m1 - run.m0;
      if (const cpu::DotQmmT* dot = dots[run.block])
        dot->prepare_x(blk.W, x_dot[row].data_ptr(), rows,
                       static_cast<uint8_t*>(scratch[run.block].data_ptr()) + dot->scratch_bytes(blk.W, run.m0));
      else
        k.prepare_x(blk.W, x_float[row].data_ptr<float>(), rows,
                    scratch[run.block].data_ptr<float>() + cpu::qmm_t_scratch_floats(blk.W, run.m0));
    }
  });
  struct Tile { int64_t block, n0, n1; };
  const int64_t threads = at::get_num_threads();
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < int64_t(blocks.size()); ++b)
    if (fused[b]) {
      // Each tile reads all of the block's x: from a few chunks of x on, one tile per thread.
      const int64_t rows = blocks[b].rows < kPrepareRows * 2 ? kFusedTileRows
                           : (N + kFusedTileRows * threads - 1) / (kFusedTileRows * threads) * kFusedTileRows;
      for (int64_t n0 = 0; n0 < N; n0 += rows) tiles.push_back({b, n0, std::min(N, n0 + rows)});
    }
  auto y = at::empty({x.size(0), N}, x.options().dtype(bf16_x && !any_fused ? at::kBFloat16 : at::kFloat));
  at::parallel_for(0, int64_t(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Tile& tile = tiles[t];
      const RowBlock& blk = blocks[tile.block];
      float* out = y.data_ptr<float>() + blk.row0 * N;
      if (dots[tile.block])
        dots[tile.block]->qmm_t(blk.W, scratch[tile.block].data_ptr(), blk.rows, out, N, tile.n0, tile.n1);
      else
        k.qmm_t(blk.W, scratch[tile.block].data_ptr<float>(), blk.rows, out, N, tile.n0, tile.n1);
    }
  });
  for (size_t b = 0; b < blocks.size(); ++b)
    if (!fused[b])
      chunked_gemm_qmm_t(blocks[b].W, x_gemm.narrow(0, blocks[b].row0, blocks[b].rows),
                         y.narrow(0, blocks[b].row0, blocks[b].rows));
  return y;
}

// y = x @ W for every block (W [K, N]): x [rows, K], returns float32 [rows, N]. Fused blocks share one
// parallel region over (block, unit of columns); GEMM blocks split their K-tiles over the threads.
at::Tensor blocks_qmm_n(const std::vector<RowBlock>& blocks, const at::Tensor& x) {
  const auto& k = cpu::kernels();
  const int64_t N = blocks.front().W.cols, K = x.size(1);
  const auto x32 = x.to(at::kFloat).contiguous();
  auto y = at::empty({x.size(0), N}, x32.options());
  const int64_t units = (N + kColumnUnit - 1) / kColumnUnit;
  std::vector<int64_t> fused;
  for (int64_t b = 0; b < int64_t(blocks.size()); ++b) {
    if (blocks[b].fused()) {
      fused.push_back(b);
    } else {
      const RowBlock& blk = blocks[b];
      y.narrow(0, blk.row0, blk.rows).copy_(qmm_n_gemm(blk.W, x32.narrow(0, blk.row0, blk.rows)));
    }
  }
  at::parallel_for(0, int64_t(fused.size()) * units, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const RowBlock& blk = blocks[fused[i / units]];
      const int64_t n0 = (i % units) * kColumnUnit;
      k.qmm_n(blk.W, x32.data_ptr<float>() + blk.row0 * K, blk.rows, y.data_ptr<float>() + blk.row0 * N, n0,
              std::min(N, n0 + kColumnUnit));
    }
  });
  return y;
}

}  // namespace

namespace cpu {

at::Tensor batched_qmm(const QmmShape& shape, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                       const at::Tensor& biases, const MatrixOf& matrix, bool transpose) {
  const int64_t K = shape.K.expect_int();
  const auto out_sizes = C10_AS_INTARRAYREF_SLOW(shape.out_sizes);
  if (c10::multiply_integers(out_sizes) == 0 || K == 0) return at::zeros(out_sizes, x.options());
  const QmmOperands ops = qmm_operands(x, w, scales, biases);
  const int64_t M = ops.M, count = ops.batch.count;
  const int64_t rows = ops.w.size(-2);
  const at::Tensor ws = ops.w.view({-1, rows, ops.w.size(-1)});
  const at::Tensor ss = ops.scales.view({-1, rows, ops.scales.size(-1)});
  const at::Tensor bs = biases.defined() ? ops.biases.view({-1, rows, ops.biases.size(-1)}) : at::Tensor();
  // One row block per run of batch items that share a matrix of w (all of them for a 2-D w), so the
  // whole batch is one parallel region and each matrix of w is decoded once per run.
  std::vector<RowBlock> blocks;
  std::vector<int64_t> x_matrices(count);
  bool x_in_order = true;
  for (int64_t b = 0; b < count; ++b) {
    const BatchMatrices m = batch_matrices(ops.batch, uint32_t(b));
    x_matrices[b] = m.x;
    x_in_order = x_in_order && m.x == b;
    if (b == 0 || m.w != batch_matrices(ops.batch, uint32_t(b - 1)).w) {
      blocks.push_back({matrix(ws[m.w], ss[m.w], bs.defined() ? bs[m.w] : at::Tensor()), b * M, 0});
    }
    blocks.back().rows += M;
  }
  // x as the rows of y in order: a copy only where a batch dimension broadcasts x.
  const at::Tensor x_rows = x_in_order ? ops.x.view({-1, K})
                                       : ops.x.view({-1, M, K}).index_select(0, at::tensor(x_matrices)).view({-1, K});
  const auto y = transpose ? blocks_qmm_t(blocks, x_rows) : blocks_qmm_n(blocks, x_rows);
  return y.to(x.scalar_type()).view(out_sizes);
}

}  // namespace cpu

namespace {

at::Tensor affine_qmm_cpu(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                          const at::Tensor& biases, int64_t group_size, int64_t bits, bool transpose) {
  const QmmShape shape = check_affine_qmm(op, x, w, scales, biases, group_size, bits, transpose);
  return cpu::batched_qmm(shape, x, w, scales, biases,
                          [&](const at::Tensor& wm, const at::Tensor& sm, const at::Tensor& bm) {
                            return packed_matrix(wm, sm, bm, group_size, bits);
                          },
                          transpose);
}

at::Tensor affine_qmm_t_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return affine_qmm_cpu("affine_qmm_t", x, w, scales, biases, group_size, bits, true);
}

at::Tensor affine_qmm_n_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                            const at::Tensor& biases, int64_t group_size, int64_t bits) {
  return affine_qmm_cpu("affine_qmm_n", x, w, scales, biases, group_size, bits, false);
}


// ---- gather quantized matmul: out[i] = x[lhs[i]] @ W[rhs[i]], a mixture of experts ----------------

// The output matrices are processed grouped by expert, so each expert's packed weights are read once
// per call and all of its rows are multiplied together (one fused decode for a few decode tokens,
// one GEMM per tile for many). A stable sort keeps already sorted indices in place, so
// sorted_indices=True (which skips the sort) gives the same result.
at::Tensor affine_gather_qmm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                                 const at::Tensor& biases, const std::optional<at::Tensor>& lhs_indices,
                                 const std::optional<at::Tensor>& rhs_indices, bool transpose, int64_t group_size,
                                 int64_t bits, bool sorted_indices) {
  const GatherQmmShape shape =
      check_affine_gather_qmm(x, w, scales, biases, lhs_indices, rhs_indices, group_size, bits, transpose);
  auto [lhs, rhs] = gather_index_pairs(shape, lhs_indices, rhs_indices, x, w);
  const int64_t M = shape.M.expect_int(), K = shape.K.expect_int(), N = shape.N.expect_int();
  const int64_t items = lhs.numel();
  const auto sym_out_sizes = shape.out_sizes();
  const auto out_sizes = C10_AS_INTARRAYREF_SLOW(sym_out_sizes);
  if (items * M * N == 0 || K == 0) return at::zeros(out_sizes, x.options());
  at::Tensor order;  // item -> output position, when the items were reordered
  if (!sorted_indices) {
    order = std::get<1>(rhs.sort(/*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false));
    lhs = lhs.index_select(0, order);
    rhs = rhs.index_select(0, order);
  }
  const int64_t x_count = shape.x_count.expect_int(), w_count = shape.w_count.expect_int();
  const auto xs = x.reshape({x_count, M, K}).index_select(0, lhs).view({items * M, K});
  const auto w3 = w.reshape({w_count, w.size(-2), w.size(-1)}).contiguous();
  const auto s3 = scales.reshape({w_count, scales.size(-2), scales.size(-1)}).contiguous();
  const auto b3 = biases.reshape({w_count, biases.size(-2), biases.size(-1)}).contiguous();
  std::vector<RowBlock> blocks;
  const int64_t* expert = rhs.data_ptr<int64_t>();
  for (int64_t i = 0; i < items; ++i) {
    if (i == 0 || expert[i] != expert[i - 1]) {
      const int64_t e = expert[i];
      blocks.push_back({packed_matrix(w3[e], s3[e], b3[e], group_size, bits), i * M, 0});
    }
    blocks.back().rows += M;
  }
  auto y = (transpose ? blocks_qmm_t(blocks, xs) : blocks_qmm_n(blocks, xs))
               .to(x.scalar_type()).view({items, M, N});
  if (order.defined()) y = at::empty_like(y).index_copy_(0, order, y);
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalq, CPU, m) {
  m.impl("affine_quantize", &affine_quantize_cpu);
  m.impl("affine_dequantize", &affine_dequantize_cpu);
  m.impl("affine_qmm_t", &affine_qmm_t_cpu);
  m.impl("affine_qmm_n", &affine_qmm_n_cpu);
  m.impl("affine_gather_qmm", &affine_gather_qmm_cpu);
  m.impl("pack", &pack_cpu);
  m.impl("unpack", &unpack_cpu);
}

}  // namespace metalq
