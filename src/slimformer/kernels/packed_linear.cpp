// slimformer::packed_linear -- y = x W^T + b for few rows of x (decoding, speculative verification),
// computed straight from slimformer's packed storage: codes (N, K*bits/8) uint8, scales (N, G) bf16
// or fp16, and per group either integer zero points (N, G) uint8 (implicit 2^(bits-1) when absent),
// W[n, k] = (q - z) * s, or float minima (N, G) fp16 (GGUF's Q4_1), W[n, k] = q * s + m. With the
// implicit zero point the same arithmetic covers GGUF's Q4_0 ((q - 8) d) and Q8_0 ((q + 128) - 128) d).
//
// 4-bit rows pack two codes per byte, the low nibble first (column 2j in the low nibble of byte j).
// Arithmetic is float32 throughout; write each group's weights as q * s + o (o = -z * s, or the
// minimum m). Several groups per channel: each code is dequantized in registers, fma(q, s, o), and
// multiplied into running sums. One group: sum_k q_k x_k (fused multiply-adds), then * s, plus
// o * sum_k x_k (the sum of x computed once per call). Rows of x share each weight row in tiles of
// two, and a row's result does not depend on the number of rows (a speculative verify step equals
// one-token steps bit for bit). Output channels are split across the intra-op threads.
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

#include "hsum.h"
#include "q8_rounding.h"

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
// Per group: sum_k q_k x_k in four independent accumulator chains per row (hiding the FMA
// latency), then * scale, plus offset * (group sum of x). Each row goes through the same operations
// whatever MT is, so a row's output does not depend on the rows it shares a tile with.
template <int BITS, int MT>
inline void channel(const float* x, int64_t K, const uint8_t* q, const GroupParams& gp, int64_t gs,
                    const float* xsum, int64_t groups, float* out, int64_t N, float b) {
  constexpr int A = 4;
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
  return mt == 1 ? channel<BITS, 1> : channel<BITS, 2>;
}

// MT rows of x (row stride K), one output channel, several groups: the codes are dequantized in
// registers once, fma(q, scale, offset), and multiplied straight into four running sums per row, so
// no per-group reduction is needed (at 32-wide groups it costs as much as the products). Each row
// goes through the same operations whatever MT is (a row's output does not depend on the others).
template <int BITS, bool HALF, bool MINS, int MT>
inline void channel_dequant(const float* x, int64_t K, const uint8_t* q, const GroupParams& gp, int64_t gs, int64_t groups,
                            float* out, int64_t N, float b) {
  const uint16_t* s = gp.s;
  const uint8_t* z = gp.z;
  const uint16_t* mn = gp.m;
  const float zdefault = gp.zdefault;
  __m256 acc[MT][4];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_ps();
  const uint8_t* qc = q;
  int64_t col = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const float sc = HALF ? half_bits_to_float(s[g]) : bf16_bits_to_float(s[g]);
    const float off = MINS ? half_bits_to_float(mn[g]) : -(z ? float(z[g]) : zdefault) * sc;
    const __m256 vs = _mm256_set1_ps(sc), vo = _mm256_set1_ps(off);
    for (int64_t c = 0; c < gs; c += kChunk, qc += kChunk * BITS / 8, col += kChunk) {
      __m256 c0, c1, c2, c3;
      load_chunk<BITS>(qc, c0, c1, c2, c3);
      const __m256 w0 = _mm256_fmadd_ps(c0, vs, vo), w1 = _mm256_fmadd_ps(c1, vs, vo);
      const __m256 w2 = _mm256_fmadd_ps(c2, vs, vo), w3 = _mm256_fmadd_ps(c3, vs, vo);
      for (int m = 0; m < MT; ++m) {
        const float* xc = x + m * K + col;
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xc), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xc + 8), acc[m][1]);
        acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xc + 16), acc[m][2]);
        acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xc + 24), acc[m][3]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    out[m * N] = hsum(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]))) + b;
}

using DequantFn = void (*)(const float*, int64_t, const uint8_t*, const GroupParams&, int64_t, int64_t, float*, int64_t, float);

// Specialised for the scale format (bf16 / fp16), the offset kind (integer zero points / fp16
// minima) and the rows per tile (1 or 2), so the per-group reads carry no run-time branches.
template <int BITS, int MT>
DequantFn dequant_fn(bool half, bool mins) {
  if (mins) return half ? channel_dequant<BITS, true, true, MT> : channel_dequant<BITS, false, true, MT>;
  return half ? channel_dequant<BITS, true, false, MT> : channel_dequant<BITS, false, false, MT>;
}

template <int BITS>
DequantFn dequant_fn(bool half, bool mins, int mt) {
  return mt == 1 ? dequant_fn<BITS, 1>(half, mins) : dequant_fn<BITS, 2>(half, mins);
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
    if (G == 1)  // only the one-group form adds offset * sum(x); the dequantize form folds it in
      for (int64_t k = 0; k < K; ++k) xsum[m] += src[k];
  }
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  // One channel at a time, rows in tiles of kTile (the weight row stays in L1 across the tiles). Several
  // groups per channel: the dequantize-in-registers form; one group: the group-sum form. Either way a
  // row is computed by the same operations whatever the number of rows (lossless speculation needs a
  // verify step's rows to equal one-token steps bit for bit).
  constexpr int64_t kTile = 2;
  const bool mn = gp.m != nullptr;
  // The kernel for a tile of 1 or 2 rows (index mt - 1), chosen once per call.
  const DequantFn dequant[2] = {bits == 4 ? dequant_fn<4>(half, mn, 1) : dequant_fn<8>(half, mn, 1),
                                bits == 4 ? dequant_fn<4>(half, mn, 2) : dequant_fn<8>(half, mn, 2)};
  const ChannelFn group_sum[2] = {bits == 4 ? channel_fn<4>(1) : channel_fn<8>(1), bits == 4 ? channel_fn<4>(2) : channel_fn<8>(2)};
  at::parallel_for(0, N, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float b0 = bp ? bp[n] : 0.f;
      const GroupParams g0 = gp.row(n, G);
      const uint8_t* qn = qp + n * row_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int mt = int(std::min<int64_t>(kTile, M - m0));
        if (G > 1) {
          dequant[mt - 1](xr.data() + m0 * K, K, qn, g0, group_size, G, op + m0 * N + n, N, b0);
        } else {
          group_sum[mt - 1](xr.data() + m0 * K, K, qn, g0, group_size, xsum.data() + m0 * G, G, op + m0 * N + n, N, b0);
        }
      }
    }
  });
  return out;
}


// ---- slimformer::packed_linear_q8a: the same stored codes, activations rounded to int8 ----------
// x is rounded per block of 32 columns to int8 codes (symmetric: d = max|x| / 127, xq = round(x / d)),
// as llama.cpp's Q8 activations are, so that each 32 weight codes meet their 32 activation codes in
// integer dot products, four products summed into each int32 lane: AVX-512 VNNI's vpdpbusd (unsigned
// weight codes times signed activation codes, 64-byte steps) where the CPU has it, else AVX2's
// vpmaddubsw + vpmaddwd on 32-byte halves of the same steps (8-bit codes centred to q - 128 first so
// that no 16-bit pair sum saturates). Per block the int32 sums are widened, times d, summed per
// group, times the group's scale; the offset part (o = -z s, or the minimum m) multiplies the group
// sums of the rounded x, so the result is the product of the dequantized weight and the int8-rounded
// activations, in float32 arithmetic. Every row of x is computed by the same sequence of operations
// whatever the number of rows, so a row's output does not depend on the rows beside it. The two
// forms add the same products in a different order (float32 rounding apart, the same result).

// Activations of one row, laid out for the weight steps. A step is 64 bytes of codes: 8-bit, two
// blocks of 32 columns (int32 lanes 0-7 and 8-15); 4-bit, four blocks (lanes 4i..4i+3 for block i),
// the low nibbles meeting each block's even columns and the high nibbles its odd ones.
struct RowQ8 {
  const int8_t* lo;   // per step 64 activation codes meeting the step's bytes (4-bit: their low nibbles)
  const int8_t* hi;   // 4-bit: per step the 64 codes meeting the high nibbles; nullptr for 8-bit
  const float* dx;    // per step 16 floats: each int32 lane's activation scale (0 past the width)
  const float* xsum;  // per group the sum of the rounded x
};

template <int BITS>
struct StepLayout {
  static constexpr int64_t cols = BITS == 8 ? 64 : 128;  // columns per step
  static constexpr int blocks = int(cols / 32);          // blocks of 32 columns per step
};

using ChannelQ8Fn = void (*)(const RowQ8*, int64_t, const uint8_t*, const GroupParams&, int64_t, int64_t, float*, int64_t, float);

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

// The AVX-512 VNNI form (64-byte steps); called only where cpu_has_vnni().
// Scales of the groups a step spans, one per int32 lane (groups of 32 or 64 columns, smaller than a
// step); lanes past the width get 0.
template <int BITS, bool HALF>
inline __m512 step_scales(const uint16_t* s, int64_t first_group, int groups_here, const __m512i& lane_group) {
  const __mmask8 m = static_cast<__mmask8>((1u << groups_here) - 1u);
  const __m128i bits = _mm_maskz_loadu_epi16(m, s + first_group);
  const __m256 v = HALF ? _mm256_cvtph_ps(bits) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
  return _mm512_permutexvar_ps(lane_group, _mm512_castps256_ps512(v));
}

// One output channel for MT rows. Groups of a multiple of a step: per group the dot products are
// summed, times d per lane, and the sum scaled once; groups smaller than a step (32 or 64 columns):
// each lane is scaled by its own group's scale.
template <int BITS, int MT, bool HALF, bool MINS>
inline void channel_q8(const RowQ8* rows, int64_t K, const uint8_t* q, const GroupParams& gp, int64_t gs,
                       int64_t groups, float* out, int64_t N, float b) {
  using L = StepLayout<BITS>;
  const int64_t steps = (K + L::cols - 1) / L::cols;
  const int64_t row_bytes = K * BITS / 8;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
  auto products = [&](int64_t st, __mmask64 mask, __m512i* is) {
    const __m512i w = _mm512_maskz_loadu_epi8(mask, q + st * 64);
    if constexpr (BITS == 8) {
      for (int m = 0; m < MT; ++m) is[m] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(rows[m].lo + st * 64));
    } else {
      const __m512i lo = _mm512_and_si512(w, nib), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
      for (int m = 0; m < MT; ++m) {
        is[m] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(rows[m].lo + st * 64));
        is[m] = _mm512_dpbusd_epi32(is[m], hi, _mm512_loadu_si512(rows[m].hi + st * 64));
      }
    }
  };
  auto step_mask = [&](int64_t st) -> __mmask64 {
    const int64_t left = row_bytes - st * 64;
    return left >= 64 ? ~__mmask64(0) : ((__mmask64(1) << left) - 1);
  };
  if (gs < L::cols) {  // several groups per step
    const int bpg = int(gs / 32), groups_per_step = L::blocks / bpg;
    const int shift = groups_per_step == 4 ? 2 : groups_per_step == 2 ? 3 : 4;  // log2 of the lanes per group
    const __m512i lane_group = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), shift);
    for (int64_t st = 0; st < steps; ++st) {
      __m512i is[MT];
      products(st, step_mask(st), is);
      const int here = int(std::min<int64_t>(groups_per_step, groups - st * groups_per_step));
      const __m512 sv = step_scales<BITS, HALF>(gp.s, st * groups_per_step, here, lane_group);
      for (int m = 0; m < MT; ++m)
        tot[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(is[m]), _mm512_loadu_ps(rows[m].dx + st * 16)), sv, tot[m]);
    }
  } else {  // whole steps per group
    const int64_t steps_per_group = gs / L::cols;
    int64_t st = 0;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[MT];
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t j = 0; j < steps_per_group; ++j, ++st) {
        __m512i is[MT];
        products(st, ~__mmask64(0), is);
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(is[m]), _mm512_loadu_ps(rows[m].dx + st * 16), acc[m]);
      }
      const float sc = HALF ? half_bits_to_float(gp.s[g]) : bf16_bits_to_float(gp.s[g]);
      const __m512 vs = _mm512_set1_ps(sc);
      for (int m = 0; m < MT; ++m) tot[m] = _mm512_fmadd_ps(acc[m], vs, tot[m]);
    }
  }
  // Offsets: sum_g o_g * (sum of the rounded x over group g), sixteen groups at a time (the last
  // ones masked), in vector arithmetic only, so that every row gets the same operations whatever MT is.
  __m512 oacc[MT];
  for (int m = 0; m < MT; ++m) oacc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const int64_t n16 = std::min<int64_t>(16, groups - g);
    const __mmask16 mask = static_cast<__mmask16>((1u << n16) - 1u);
    __m512 off;
    if constexpr (MINS) {
      off = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, gp.m + g));
    } else {
      const __m256i sbits = _mm256_maskz_loadu_epi16(mask, gp.s + g);
      const __m512 sc = HALF ? _mm512_cvtph_ps(sbits) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(sbits), 16));
      const __m512 z = gp.z ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, gp.z + g))) : _mm512_set1_ps(gp.zdefault);
      off = _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), sc);
    }
    for (int m = 0; m < MT; ++m) oacc[m] = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(mask, rows[m].xsum + g), oacc[m]);
  }
  for (int m = 0; m < MT; ++m) out[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(tot[m], oacc[m])) + b;
}

template <int BITS, bool HALF, bool MINS>
ChannelQ8Fn channel_q8_fn(int mt) {
  switch (mt) {
    case 1: return channel_q8<BITS, 1, HALF, MINS>;
    case 2: return channel_q8<BITS, 2, HALF, MINS>;
    case 3: return channel_q8<BITS, 3, HALF, MINS>;
    default: return channel_q8<BITS, 4, HALF, MINS>;
  }
}

template <int BITS>
ChannelQ8Fn channel_q8_fn(int mt, bool half, bool mins) {
  if (mins) return half ? channel_q8_fn<BITS, true, true>(mt) : channel_q8_fn<BITS, false, true>(mt);
  return half ? channel_q8_fn<BITS, true, false>(mt) : channel_q8_fn<BITS, false, false>(mt);
}

#pragma GCC pop_options

bool cpu_has_vnni() {
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

// Rounds one row of x (K floats) to int8 codes per block of 32 and lays them out for the steps.
// lo/hi: steps * 64 bytes each and dx: steps * 16 floats, zero-filled by the caller; xsum: groups floats.
void quantize_row(const float* x, int64_t K, int bits, int64_t gs, int8_t* lo, int8_t* hi, float* dx, float* xsum) {
  const int64_t blocks = K / 32;
  const int per_step = bits == 8 ? 2 : 4, lanes = 16 / per_step;
  std::vector<float> block_d(blocks);
  std::vector<int32_t> block_sum(blocks);
  for (int64_t bl = 0; bl < blocks; ++bl) {
    int8_t codes[32];
    int32_t total;
    const float d = round_block_q8(x + bl * 32, codes, &total);
    block_d[bl] = d;
    block_sum[bl] = total;
    const int64_t st = bl / per_step, i = bl % per_step;
    if (bits == 8) {
      std::memcpy(lo + st * 64 + i * 32, codes, 32);
    } else {  // block i of the step: bytes 16i..16i+15, even columns low, odd columns high
      for (int j = 0; j < 16; ++j) {
        lo[st * 64 + i * 16 + j] = codes[2 * j];
        hi[st * 64 + i * 16 + j] = codes[2 * j + 1];
      }
    }
    for (int l = 0; l < lanes; ++l) dx[st * 16 + i * lanes + l] = d;
  }
  // Group sums of the rounded x (d times the sum of its codes, block by block): the offset part then
  // multiplies the same activations as the codes part, so the whole product is W times rounded x.
  for (int64_t gi = 0; gi < K / gs; ++gi) {
    float acc = 0.f;
    for (int64_t bl = gi * gs / 32; bl < (gi + 1) * gs / 32; ++bl) acc += block_d[bl] * float(block_sum[bl]);
    xsum[gi] = acc;
  }
}

// The AVX2 form: the 64-byte steps taken as two 32-byte halves (half h: the codes' bytes 32h..32h+31,
// int32 lanes as the VNNI form's lanes 8(h%2)..8(h%2)+7). vpmaddubsw multiplies unsigned by signed
// bytes into saturating 16-bit pair sums: 4-bit codes (<= 15) go in as they are; 8-bit codes are
// centred (w = q - 128) and multiplied as |w| times x carrying w's sign, so every pair sum stays
// within 2 * 128 * 127; the offset then takes the 128 back (+128 s per group).
template <int BITS, int MT, bool HALF, bool MINS>
inline void channel_q8_avx2(const RowQ8* rows, int64_t K, const uint8_t* q, const GroupParams& gp, int64_t gs,
                            int64_t groups, float* out, int64_t N, float b) {
  const int64_t row_bytes = K * BITS / 8, halves = (row_bytes + 31) / 32;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(char(0x80));
  __m256 tot[MT];
  for (int m = 0; m < MT; ++m) tot[m] = _mm256_setzero_ps();
  auto products = [&](int64_t h, __m256i* is) {
    const int64_t left = row_bytes - h * 32;
    const __m256i w = left >= 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + h * 32))
                                 : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + h * 32)), 0);
    if constexpr (BITS == 8) {
      const __m256i c = _mm256_xor_si256(w, flip);  // q - 128 as a signed byte
      const __m256i mag = _mm256_sign_epi8(c, c);   // |q - 128| (0x80 read as 128 by vpmaddubsw)
      for (int m = 0; m < MT; ++m) {
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].lo + h * 32)), c);
        is[m] = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, xs), ones);
      }
    } else {
      const __m256i lo = _mm256_and_si256(w, nib), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), nib);
      for (int m = 0; m < MT; ++m) {
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].lo + h * 32))),
                                           _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[m].hi + h * 32))));
        is[m] = _mm256_madd_epi16(p, ones);
      }
    }
  };
  auto scale_of = [&](int64_t g) { return g < groups ? (HALF ? half_bits_to_float(gp.s[g]) : bf16_bits_to_float(gp.s[g])) : 0.f; };
  if (BITS == 4 && gs == 32) {  // two groups per half: lanes 0-3 and 4-7
    for (int64_t h = 0; h < halves; ++h) {
      __m256i is[MT];
      products(h, is);
      const __m256 sv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(scale_of(2 * h))), _mm_set1_ps(scale_of(2 * h + 1)), 1);
      for (int m = 0; m < MT; ++m)
        tot[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(is[m]), _mm256_loadu_ps(rows[m].dx + h * 8)), sv, tot[m]);
    }
  } else {  // whole halves per group
    const int64_t halves_per_group = gs * BITS / 8 / 32;
    int64_t h = 0;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 acc[MT];
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t j = 0; j < halves_per_group; ++j, ++h) {
        __m256i is[MT];
        products(h, is);
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(is[m]), _mm256_loadu_ps(rows[m].dx + h * 8), acc[m]);
      }
      const __m256 vs = _mm256_set1_ps(scale_of(g));
      for (int m = 0; m < MT; ++m) tot[m] = _mm256_fmadd_ps(acc[m], vs, tot[m]);
    }
  }
  // Offsets, eight groups at a time (zero-padded), vector arithmetic only (the same for every MT).
  __m256 oacc[MT];
  for (int m = 0; m < MT; ++m) oacc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g += 8) {
    const int64_t n8 = std::min<int64_t>(8, groups - g);
    alignas(32) float off[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    alignas(32) int32_t keep[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n8; ++i) {
      float sc, o;
      gp.get(g + i, sc, o);
      off[i] = BITS == 8 ? o + 128.f * sc : o;
      keep[i] = -1;
    }
    const __m256 ov = _mm256_load_ps(off);
    const __m256i mk = _mm256_load_si256(reinterpret_cast<const __m256i*>(keep));
    for (int m = 0; m < MT; ++m) oacc[m] = _mm256_fmadd_ps(ov, _mm256_maskload_ps(rows[m].xsum + g, mk), oacc[m]);
  }
  for (int m = 0; m < MT; ++m) out[m * N] = hsum(_mm256_add_ps(tot[m], oacc[m])) + b;
}

template <int BITS, bool HALF, bool MINS>
ChannelQ8Fn channel_q8_avx2_fn(int mt) {
  switch (mt) {
    case 1: return channel_q8_avx2<BITS, 1, HALF, MINS>;
    case 2: return channel_q8_avx2<BITS, 2, HALF, MINS>;
    case 3: return channel_q8_avx2<BITS, 3, HALF, MINS>;
    default: return channel_q8_avx2<BITS, 4, HALF, MINS>;
  }
}

template <int BITS>
ChannelQ8Fn channel_q8_avx2_fn(int mt, bool half, bool mins) {
  if (mins) return half ? channel_q8_avx2_fn<BITS, true, true>(mt) : channel_q8_avx2_fn<BITS, false, true>(mt);
  return half ? channel_q8_avx2_fn<BITS, true, false>(mt) : channel_q8_avx2_fn<BITS, false, false>(mt);
}


at::Tensor packed_linear_q8a(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& mins, int64_t bits,
                             int64_t group_size, const c10::optional<at::Tensor>& bias, bool portable) {
  const bool vnni = cpu_has_vnni() && !portable;
  TORCH_CHECK(bits == 4 || bits == 8, "packed_linear_q8a: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "packed_linear_q8a: x must be a contiguous (rows, in) float32 tensor");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "packed_linear_q8a: codes must be contiguous uint8");
  const bool half = scales.scalar_type() == at::kHalf;
  TORCH_CHECK((half || scales.scalar_type() == at::kBFloat16) && scales.is_contiguous(), "packed_linear_q8a: scales must be contiguous bfloat16 or float16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(group_size % kChunk == 0 && K % group_size == 0, "packed_linear_q8a: the group size must be a multiple of 32 dividing the width");
  TORCH_CHECK(group_size <= 64 || group_size % (bits == 8 ? 64 : 128) == 0,
              "packed_linear_q8a: the group size must be 32, 64 or a multiple of ", bits == 8 ? 64 : 128, " columns");
  const int64_t G = K / group_size, row_bytes = K * bits / 8;
  TORCH_CHECK(qweight.size(1) == row_bytes && scales.size(0) == N && scales.size(1) == G, "packed_linear_q8a: codes/scales shapes do not match x");
  TORCH_CHECK(!(zeros.has_value() && mins.has_value()), "packed_linear_q8a: pass zero points or minima, not both");
  GroupParams gp{reinterpret_cast<const uint16_t*>(scales.data_ptr()), half, nullptr, nullptr, float(1 << (bits - 1))};
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == at::kByte && zeros->is_contiguous() && zeros->size(0) == N && zeros->size(1) == G, "packed_linear_q8a: zero points must be contiguous (out, groups) uint8");
    gp.z = zeros->data_ptr<uint8_t>();
  }
  if (mins.has_value()) {
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->size(0) == N && mins->size(1) == G, "packed_linear_q8a: minima must be contiguous (out, groups) float16");
    gp.m = reinterpret_cast<const uint16_t*>(mins->data_ptr());
  }
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "packed_linear_q8a: bias must be a contiguous float32 (out,) tensor");
    bp = bias->data_ptr<float>();
  }
  const int64_t step_cols = bits == 8 ? 64 : 128, steps = (K + step_cols - 1) / step_cols;
  std::vector<int8_t> lo(M * steps * 64, 0), hi(bits == 4 ? M * steps * 64 : 0, 0);
  std::vector<float> dx(M * steps * 16, 0.f), xsum(M * G, 0.f);
  std::vector<RowQ8> rows(M);
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    int8_t* hm = bits == 4 ? hi.data() + m * steps * 64 : nullptr;
    quantize_row(xp + m * K, K, int(bits), group_size, lo.data() + m * steps * 64, hm, dx.data() + m * steps * 16, xsum.data() + m * G);
    rows[m] = {lo.data() + m * steps * 64, hm, dx.data() + m * steps * 16, xsum.data() + m * G};
  }
  at::Tensor out = at::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const GroupParams g0 = gp.row(n, G);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int mt = int(std::min<int64_t>(kRowTile, M - m0));
        const bool mn = gp.m != nullptr;
        ChannelQ8Fn fn = vnni ? (bits == 4 ? channel_q8_fn<4>(mt, half, mn) : channel_q8_fn<8>(mt, half, mn))
                              : (bits == 4 ? channel_q8_avx2_fn<4>(mt, half, mn) : channel_q8_avx2_fn<8>(mt, half, mn));
        fn(rows.data() + m0, K, qp + n * row_bytes, g0, group_size, G, op + m0 * N + n, N, bp ? bp[n] : 0.f);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(slimformer, m) {
  m.def("packed_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? mins, int bits, int group_size, Tensor? bias) -> Tensor");
  m.def("packed_linear_q8a(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? mins, int bits, int group_size, Tensor? bias, bool portable=False) -> Tensor");
  m.def("cpu_has_vnni() -> bool", &cpu_has_vnni);
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_linear_q8a", &packed_linear_q8a);
}
