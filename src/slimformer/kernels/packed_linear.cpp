// slimformer::packed_linear -- y = x W^T + b for few rows of x (decoding, speculative verification),
// computed straight from slimformer's packed storage: codes (N, K*bits/8) uint8, scales (N, G) bf16
// or fp16, and per group either integer zero points (N, G) uint8 (implicit 2^(bits-1) when absent),
// W[n, k] = (q - z) * s, or float minima (N, G) fp16 (GGUF's Q4_1), W[n, k] = q * s + m. With the
// implicit zero point the same arithmetic covers GGUF's Q4_0 ((q - 8) d) and Q8_0 ((q + 128) - 128) d).
//
// 4-bit rows pack two codes per byte, the low nibble first (column 2j in the low nibble of byte j).
// Arithmetic is float32 throughout; write each group's weights as q * s + o (o = -z * s, or the
// minimum m). One row of x with several groups per channel: each code is dequantized in registers,
// fma(q, s, o), and multiplied into running sums. Otherwise: per group, sum_k q_k x_k (fused
// multiply-adds), then * s, plus o * sum_k x_k (the group sums of x computed once per call), with
// channels in pairs when several rows share a pass. Output
// channels are split across the intra-op threads.
//
// x (M, K) float32 contiguous; output (M, N) float32. Requirements (checked): bits 4 or 8, the group
// size a multiple of 32 dividing K. Built for AVX2 + FMA (x86-64); see slimformer/kernels/__init__.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int kChunk = 32;  // columns per inner step: 16 bytes of 4-bit codes, 32 of 8-bit codes
constexpr int kRowTile = 4;  // rows of x that share one pass over a weight row

inline float bf16_bits_to_float(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_bits_to_float(uint16_t v) { return _cvtsh_ss(v); }

// Scale and offset of group g: W = q * scale + offset.
struct GroupParams {
  const uint16_t* s;  // scales, bf16 or fp16 bits
  bool half;          // fp16 scales
  const uint8_t* z;   // integer zero points or nullptr
  const uint16_t* m;  // fp16 minima or nullptr
  float zdefault;
  inline void get(int64_t g, float& sc, float& off) const {
    sc = half ? half_bits_to_float(s[g]) : bf16_bits_to_float(s[g]);
    off = m ? half_bits_to_float(m[g]) : -(z ? float(z[g]) : zdefault) * sc;
  }
  inline GroupParams row(int64_t n, int64_t G) const {
    return {s + n * G, half, z ? z + n * G : nullptr, m ? m + n * G : nullptr, zdefault};
  }
};

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// Codes of one 32-column chunk as four float vectors, in the order the x layout below expects.
template <int BITS>
inline void load_chunk(const uint8_t* q, __m256& c0, __m256& c1, __m256& c2, __m256& c3) {
  if constexpr (BITS == 4) {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
    c0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, mask));  // even columns 0..14
    c1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, mask));  // even columns 16..30
    c2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));    // odd columns 1..15
    c3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));    // odd columns 17..31
  } else {
    c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8))));
    c2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 16))));
    c3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 24))));
  }
}

// One output channel for MT rows of x. ``x`` is laid out so that the four code vectors of a chunk
// meet four consecutive 8-float blocks (4-bit: even columns then odd columns of the chunk).
// Per group: sum_k q_k x_k in two independent accumulator chains per row (four for a single row,
// hiding the FMA latency), then * scale, plus offset * (group sum of x).
template <int BITS, int MT>
inline void channel(const float* x, int64_t K, const uint8_t* q, const GroupParams& gp, int64_t gs,
                    const float* xsum, int64_t groups, float* out, int64_t N, float b) {
  constexpr int A = MT == 1 ? 4 : 2;
  __m256 tot[MT];
  float oacc[MT];
  for (int m = 0; m < MT; ++m) {
    tot[m] = _mm256_setzero_ps();
    oacc[m] = 0.f;
  }
  const uint8_t* qc = q;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MT][A];
    for (int m = 0; m < MT; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    for (int64_t c = g * gs; c < (g + 1) * gs; c += kChunk, qc += kChunk * BITS / 8) {
      __m256 c0, c1, c2, c3;
      load_chunk<BITS>(qc, c0, c1, c2, c3);
      for (int m = 0; m < MT; ++m) {
        const float* xm = x + m * K + c;
        acc[m][0] = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xm), acc[m][0]);
        acc[m][1 % A] = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xm + 8), acc[m][1 % A]);
        acc[m][2 % A] = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xm + 16), acc[m][2 % A]);
        acc[m][3 % A] = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xm + 24), acc[m][3 % A]);
      }
    }
    float sc, off;
    gp.get(g, sc, off);
    const __m256 vs = _mm256_set1_ps(sc);
    for (int m = 0; m < MT; ++m) {
      __m256 a = acc[m][0];
      for (int i = 1; i < A; ++i) a = _mm256_add_ps(a, acc[m][i]);
      tot[m] = _mm256_fmadd_ps(a, vs, tot[m]);
      oacc[m] += off * xsum[m * groups + g];
    }
  }
  for (int m = 0; m < MT; ++m) out[m * N] = hsum(tot[m]) + oacc[m] + b;
}

using ChannelFn = void (*)(const float*, int64_t, const uint8_t*, const GroupParams&, int64_t, const float*, int64_t,
                           float*, int64_t, float);

template <int BITS>
ChannelFn channel_fn(int mt) {
  switch (mt) {
    case 1: return channel<BITS, 1>;
    case 2: return channel<BITS, 2>;
    case 3: return channel<BITS, 3>;
    default: return channel<BITS, 4>;
  }
}

// One row of x, one output channel, several groups: the codes are dequantized in registers,
// fma(q, scale, offset), and multiplied straight into four running sums, so no per-group
// reduction is needed (at 32-wide groups it costs as much as the products).
template <int BITS, bool HALF, bool MINS>
inline void channel_dequant(const float* x, const uint8_t* q, const GroupParams& gp, int64_t gs, int64_t groups,
                            float* out, float b) {
  const uint16_t* s = gp.s;
  const uint8_t* z = gp.z;
  const uint16_t* mn = gp.m;
  const float zdefault = gp.zdefault;
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const uint8_t* qc = q;
  const float* xc = x;
  for (int64_t g = 0; g < groups; ++g) {
    const float sc = HALF ? half_bits_to_float(s[g]) : bf16_bits_to_float(s[g]);
    const float off = MINS ? half_bits_to_float(mn[g]) : -(z ? float(z[g]) : zdefault) * sc;
    const __m256 vs = _mm256_set1_ps(sc), vo = _mm256_set1_ps(off);
    for (int64_t c = 0; c < gs; c += kChunk, qc += kChunk * BITS / 8, xc += kChunk) {
      __m256 c0, c1, c2, c3;
      load_chunk<BITS>(qc, c0, c1, c2, c3);
      acc[0] = _mm256_fmadd_ps(_mm256_fmadd_ps(c0, vs, vo), _mm256_loadu_ps(xc), acc[0]);
      acc[1] = _mm256_fmadd_ps(_mm256_fmadd_ps(c1, vs, vo), _mm256_loadu_ps(xc + 8), acc[1]);
      acc[2] = _mm256_fmadd_ps(_mm256_fmadd_ps(c2, vs, vo), _mm256_loadu_ps(xc + 16), acc[2]);
      acc[3] = _mm256_fmadd_ps(_mm256_fmadd_ps(c3, vs, vo), _mm256_loadu_ps(xc + 24), acc[3]);
    }
  }
  *out = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))) + b;
}

using DequantFn = void (*)(const float*, const uint8_t*, const GroupParams&, int64_t, int64_t, float*, float);

// The single-row kernel specialised for the scale format (bf16 / fp16) and offset kind (integer
// zero points / fp16 minima), so the per-group reads carry no run-time branches.
template <int BITS>
DequantFn dequant_fn(bool half, bool mins) {
  if (mins) return half ? channel_dequant<BITS, true, true> : channel_dequant<BITS, false, true>;
  return half ? channel_dequant<BITS, true, false> : channel_dequant<BITS, false, false>;
}

// Two output channels (rows n and n + 1 of W) for MT rows of x: every x block loaded is used by
// both channels, which halves the loads per multiply-add when several rows share a pass (the
// speculative verify step). One accumulator chain per (row, channel).
template <int BITS>
inline __m256 codes_block(const uint8_t* q, int i) {
  if constexpr (BITS == 4) {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * (i & 1))));
    return _mm256_cvtepi32_ps(i < 2 ? _mm256_and_si256(b, mask) : _mm256_srli_epi32(b, 4));
  } else {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * i))));
  }
}

template <int BITS, int MT>
inline void channel_pair(const float* x, int64_t K, const uint8_t* q, int64_t row_bytes, const GroupParams& gp0,
                         const GroupParams& gp1, int64_t gs, const float* xsum, int64_t groups, float* out, int64_t N,
                         float b0, float b1) {
  __m256 tot[MT][2];
  float oacc[MT][2];
  for (int m = 0; m < MT; ++m)
    for (int h = 0; h < 2; ++h) {
      tot[m][h] = _mm256_setzero_ps();
      oacc[m][h] = 0.f;
    }
  const uint8_t* q0 = q;
  const uint8_t* q1 = q + row_bytes;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[MT][2];
    for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t c = g * gs; c < (g + 1) * gs; c += kChunk, q0 += kChunk * BITS / 8, q1 += kChunk * BITS / 8) {
      for (int i = 0; i < 4; ++i) {
        const __m256 w0 = codes_block<BITS>(q0, i), w1 = codes_block<BITS>(q1, i);
        for (int m = 0; m < MT; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + c + 8 * i);
          acc[m][0] = _mm256_fmadd_ps(w0, xv, acc[m][0]);
          acc[m][1] = _mm256_fmadd_ps(w1, xv, acc[m][1]);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      float sc, off;
      (h ? gp1 : gp0).get(g, sc, off);
      const __m256 vs = _mm256_set1_ps(sc);
      for (int m = 0; m < MT; ++m) {
        tot[m][h] = _mm256_fmadd_ps(acc[m][h], vs, tot[m][h]);
        oacc[m][h] += off * xsum[m * groups + g];
      }
    }
  }
  for (int m = 0; m < MT; ++m) {
    out[m * N] = hsum(tot[m][0]) + oacc[m][0] + b0;
    out[m * N + 1] = hsum(tot[m][1]) + oacc[m][1] + b1;
  }
}

using PairFn = void (*)(const float*, int64_t, const uint8_t*, int64_t, const GroupParams&, const GroupParams&, int64_t,
                        const float*, int64_t, float*, int64_t, float, float);

template <int BITS>
PairFn pair_fn(int mt) {
  switch (mt) {
    case 1: return channel_pair<BITS, 1>;
    case 2: return channel_pair<BITS, 2>;
    case 3: return channel_pair<BITS, 3>;
    default: return channel_pair<BITS, 4>;
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& mins, int64_t bits,
                         int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "packed_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "packed_linear: x must be a contiguous (rows, in) float32 tensor");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "packed_linear: codes must be contiguous uint8");
  const bool half = scales.scalar_type() == at::kHalf;
  TORCH_CHECK((half || scales.scalar_type() == at::kBFloat16) && scales.is_contiguous(), "packed_linear: scales must be contiguous bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(group_size % kChunk == 0 && K % group_size == 0, "packed_linear: the group size must be a multiple of 32 dividing the width");
  const int64_t G = K / group_size, row_bytes = K * bits / 8;
  TORCH_CHECK(qweight.size(1) == row_bytes && scales.size(0) == N && scales.size(1) == G, "packed_linear: codes/scales shapes do not match x");
  TORCH_CHECK(!(zeros.has_value() && mins.has_value()), "packed_linear: pass zero points or minima, not both");
  GroupParams gp{reinterpret_cast<const uint16_t*>(scales.data_ptr()), half, nullptr, nullptr, float(1 << (bits - 1))};
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous() && zeros->size(0) == N && zeros->size(1) == G, "packed_linear: zero points must be contiguous (out, groups) uint8");
    gp.z = zeros->data_ptr<uint8_t>();
  }
  if (mins.has_value()) {
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->size(0) == N && mins->size(1) == G, "packed_linear: minima must be contiguous (out, groups) float16");
    gp.m = reinterpret_cast<const uint16_t*>(mins->data_ptr());
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "packed_linear: bias must be a contiguous float32 (out,) tensor");
    bp = bias->data_ptr<float>();
  }
  // x rearranged per 32-column chunk (4-bit: even columns, then odd ones) and its group sums.
  std::vector<float> xr(M * K), xsum(M * G, 0.f);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* src = xp + m * K;
    float* dst = xr.data() + m * K;
    if (bits == 4) {
      for (int64_t c = 0; c < K; c += kChunk)
        for (int j = 0; j < kChunk / 2; ++j) {
          dst[c + j] = src[c + 2 * j];
          dst[c + kChunk / 2 + j] = src[c + 2 * j + 1];
        }
    } else {
      std::memcpy(dst, src, K * sizeof(float));
    }
    for (int64_t k = 0; k < K; ++k) xsum[m * G + k / group_size] += src[k];
  }
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  // One row of x: one channel at a time. Several rows: channels in pairs, rows in tiles of
  // kRowTile (the weight rows stay in L1 across the tiles).
  const int64_t step = M == 1 ? 1 : 2;
  const DequantFn dequant = bits == 4 ? dequant_fn<4>(half, gp.m != nullptr) : dequant_fn<8>(half, gp.m != nullptr);
  at::parallel_for(0, (N + step - 1) / step, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin * step; n < std::min(end * step, N); n += step) {
      const bool pair = step == 2 && n + 1 < N;
      const float b0 = bp ? bp[n] : 0.f, b1 = (bp && pair) ? bp[n + 1] : 0.f;
      const GroupParams g0 = gp.row(n, G);
      const uint8_t* qn = qp + n * row_bytes;
      if (M == 1 && G > 1) {
        dequant(xr.data(), qn, g0, group_size, G, op + n, b0);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int mt = int(std::min<int64_t>(kRowTile, M - m0));
        if (pair) {
          const GroupParams g1 = gp.row(n + 1, G);
          PairFn fn = bits == 4 ? pair_fn<4>(mt) : pair_fn<8>(mt);
          fn(xr.data() + m0 * K, K, qn, row_bytes, g0, g1, group_size, xsum.data() + m0 * G, G, op + m0 * N + n, N, b0, b1);
        } else {
          ChannelFn fn = bits == 4 ? channel_fn<4>(mt) : channel_fn<8>(mt);
          fn(xr.data() + m0 * K, K, qn, g0, group_size, xsum.data() + m0 * G, G, op + m0 * N + n, N, b0);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(slimformer, m) {
  m.def("packed_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? mins, int bits, int group_size, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) { m.impl("packed_linear", &packed_linear); }
