// slimformer::dense_linear -- y = x W^T + b for few rows of x (decoding, speculative verification)
// on a dense float32 or bfloat16 weight, read in place.
//
// Why: a decode step is a matrix-vector product per layer, bound by the bytes of the weight it
// streams. PyTorch's CPU GEMV for one row goes through the BLAS it was built with, which on some CPUs
// reads memory at a fraction of the rate the machine sustains (measured on a 2-core AMD EPYC: ~11 GB/s
// against ~30 GB/s for a plain elementwise pass). This kernel streams each weight row once per call,
// with channels split across the intra-op threads; whether it
// beats the BLAS here is for the execution planner to measure.
//
// x (M, K) float32 contiguous; weight (N, K) float32 or bfloat16 contiguous (bf16 widened exactly as
// it is read); bias (N,) float32 or None; output (M, N) float32. Arithmetic is float32: per channel,
// four accumulator chains of 8 lanes over the columns (the tail of K % 8 columns in scalar code),
// added, reduced across lanes, plus the bias. Each output element is computed by the same sequence
// whatever M is, so a row's result does not depend on the rows passed with it (speculative verify
// steps equal one-token steps bit for bit). Built for AVX2 + FMA; see slimformer/kernels/dense_linear.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstring>

#include "hsum.h"

namespace {

inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }

inline __m256 load8(const uint16_t* w) {  // 8 bf16 values widened exactly to float32
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

inline float load1(const float* w) { return *w; }

inline float load1(const uint16_t* w) {
  uint32_t u = uint32_t(*w) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One channel (a row of W, ``w``) against R rows of x (row stride K): out[r * N] = w . x_r + b.
// Per row, four accumulator chains of 8 lanes over 32-column steps, then 8-column steps into the
// first, then a scalar tail: the same operations in the same order for every R, so a row's result
// does not depend on the rows it shares a tile with. Each 8 weights are loaded (and, for bf16,
// widened) once for the R rows.
template <typename W, int R>
inline void channel(const float* x, const W* w, int64_t K, float b, float* out, int64_t N) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int j = 0; j < 4; ++j) {
      const __m256 wj = load8(w + k + 8 * j);
      for (int r = 0; r < R; ++r) a[r][j] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x + r * K + k + 8 * j), a[r][j]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wk = load8(w + k);
    for (int r = 0; r < R; ++r) a[r][0] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(x + r * K + k), a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3])));
    for (int64_t t = k; t < K; ++t) s += load1(w + t) * x[r * K + t];
    out[r * N] = s + b;
  }
}

constexpr int kRowTile = 2;  // rows of x per pass over a weight row (3 measured slower on the AMD EPYC: register spills)

// Channels are split across the threads; each weight row is read from memory once and then from
// the L1 cache for the further tiles of rows of x. (One weight row at a time: streaming several
// rows side by side halved the rate the hardware prefetchers sustained on an AMD EPYC.)
template <typename W>
void run(const float* x, const W* w, const float* bias, float* out, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? bias[n] : 0.f;
      const W* wn = w + n * K;
      int64_t m = 0;
      for (; m + kRowTile <= M; m += kRowTile) channel<W, kRowTile>(x + m * K, wn, K, b, out + m * N + n, N);
      if (m < M) channel<W, 1>(x + m * K, wn, K, b, out + m * N + n, N);  // an odd last row
    }
  });
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "dense_linear: x must be a contiguous float32 (rows, in) tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "dense_linear: weight must be a contiguous float32 or bfloat16 (out, in) tensor");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "dense_linear: x has ", K, " columns but weight has ", weight.size(1));
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "dense_linear: bias must be a contiguous float32 (out,) tensor");
    bp = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (weight.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), weight.data_ptr<float>(), bp, out.data_ptr<float>(), M, N, K);
  } else {
    run(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), bp, out.data_ptr<float>(), M, N, K);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimformer, m) {
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) { m.impl("dense_linear", &dense_linear); }
