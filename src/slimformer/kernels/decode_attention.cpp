// slimformer::decode_attention -- softmax(q k^T * scale + mask) v for a few query tokens against a
// long (static) KV cache: the decode step and the speculative verify step.
//
// query (B, H, Q, D), key/value (B, KVH, S, D) with H a multiple of KVH (grouped-query heads: query
// head h reads key/value head h / (H / KVH)), all float32 or all bfloat16, D a multiple of 8; mask
// None, boolean (B, 1, Q, S) (true = attend) or additive float32 (B, 1, Q, S). Output (B, Q, H, D)
// contiguous in the query's dtype, as transformers' attention functions return it.
//
// One task per (batch, query head), its Q tokens together. Slots no token of the batch row attends
// to (false, or an additive value at the float32 minimum or below) are not read at all: a static
// cache of 512 slots holding 60 tokens costs 60 dot products per token, eight at a time where they
// are contiguous. The softmax is vectorized (a polynomial exp, ~2e-7 relative) and treats masked
// slots as PyTorch does with a float32-minimum fill (a token with every slot masked averages all
// values). float32 arithmetic throughout; bf16 keys and values are widened as they are read.
// Built for AVX2 + FMA, like packed_linear.cpp; see slimformer/kernels/decode_attention.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <limits>
#include <cmath>
#include <cstring>
#include <vector>

#include "hsum.h"

namespace {

constexpr int kMaxRows = 64;  // grouped query heads x query tokens per key/value head (as the Python side checks)

template <bool BF16>
inline __m256 load8(const void* p, int64_t i) {
  if constexpr (BF16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

inline float to_float(const at::BFloat16& v) { return float(v); }
inline float to_float(float v) { return v; }

// exp(x) for x <= 0 in AVX2 (Cephes' polynomial on a range reduced by ln 2): relative error ~2e-7.
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// Eight dot products of q (D floats) with keys k0 + j * D (j < 8), D a multiple of 8.
template <bool BF16>
inline __m256 dots8(const float* q, const void* k0, int64_t D) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8<BF16>(k0, j * D + d), a[j]);
  }
  // Transpose-and-add: lane j of the result is the sum of a[j].
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// One dot product, added up in exactly the order of a lane of dots8 ((a0+a1)+(a2+a3)) + ((a4+a5)+(a6+a7)),
// so a slot's score does not depend on whether its neighbours are listed (a verify step lists the
// draft tokens' slots too): each token gets the numbers of a one-token step, as lossless
// speculation requires.
template <bool BF16>
inline float dot1(const float* q, const void* k, int64_t D) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8<BF16>(k, d), a);
  const __m256 h = _mm256_hadd_ps(a, a);
  const __m256 h2 = _mm256_hadd_ps(h, h);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h2), _mm256_extractf128_ps(h2, 1)));
}

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const c10::optional<at::Tensor>& mask,
            double scale, at::Tensor& out) {
  constexpr bool BF16 = std::is_same_v<T, at::BFloat16>;
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t KVH = key.size(1), S = key.size(2), G = H / KVH;
  const T* qp = query.data_ptr<T>();
  const T* kp = key.data_ptr<T>();
  const T* vp = value.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const bool* mb = nullptr;
  const float* ma = nullptr;
  if (mask.has_value()) {
    if (mask->scalar_type() == at::kBool) mb = mask->data_ptr<bool>();
    else ma = mask->data_ptr<float>();
  }
  const float sc = float(scale), lowest = std::numeric_limits<float>::lowest();
  auto masked = [&](int64_t b, int64_t t, int64_t s) {
    const int64_t mi = (b * Q + t) * S + s;
    return mb ? !mb[mi] : (ma ? !(ma[mi] > lowest) : false);
  };
  // Per batch row: the slots some query token attends to, in order (the others are never read).
  std::vector<std::vector<int32_t>> slots(B);
  for (int64_t b = 0; b < B; ++b) {
    slots[b].reserve(S);
    for (int64_t s = 0; s < S; ++s) {
      bool any = false;
      for (int64_t t = 0; t < Q && !any; ++t) any = !masked(b, t, s);
      if (any) slots[b].push_back(int32_t(s));
    }
  }
  // One task per (batch, query head): its Q tokens against the shared key/value head.
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Q * D), acc(Q * D), kept;
    std::vector<float> scores;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, kvh = h / G;
      const std::vector<int32_t>& list = slots[b];
      const int64_t n = int64_t(list.size()), npad = (n + 7) / 8 * 8;
      scores.assign(Q * npad, lowest);
      for (int64_t t = 0; t < Q; ++t) {
        const T* src = qp + ((b * H + h) * Q + t) * D;
        for (int64_t d = 0; d < D; ++d) qf[t * D + d] = to_float(src[d]) * sc;
      }
      const T* kb = kp + (b * KVH + kvh) * S * D;
      const T* vb = vp + (b * KVH + kvh) * S * D;
      // Scores of the listed slots, eight at a time where they are contiguous in the cache.
      for (int64_t i = 0; i < n;) {
        const bool run8 = i + 8 <= n && list[i + 7] - list[i] == 7;
        for (int64_t t = 0; t < Q; ++t) {
          float* st = scores.data() + t * npad + i;
          if (run8) {
            _mm256_storeu_ps(st, dots8<BF16>(qf.data() + t * D, kb + int64_t(list[i]) * D, D));
          } else {
            st[0] = dot1<BF16>(qf.data() + t * D, kb + int64_t(list[i]) * D, D);
          }
        }
        i += run8 ? 8 : 1;
      }
      // Masks (a slot listed for one token may be masked for another), then softmax per token.
      for (int64_t t = 0; t < Q; ++t) {
        float* st = scores.data() + t * npad;
        bool hole = false, gap = false;  // gap: a slot this token sees comes after one masked for it
        if (mask.has_value())
          for (int64_t i = 0; i < n; ++i) {
            const int64_t s = list[i];
            if (masked(b, t, s)) {
              st[i] = lowest;
              hole = true;
            } else {
              gap = gap || hole;
              if (ma) st[i] += ma[(b * Q + t) * S + s];
            }
          }
        float* ar = acc.data() + t * D;
        std::fill(ar, ar + D, 0.f);
        __m256 vmax = _mm256_set1_ps(lowest);
        for (int64_t i = 0; i < npad; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(st + i));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        const float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
        if (mx == lowest) {  // every slot masked: PyTorch's minimum fill gives equal weights to all S slots
          const float p = 1.f / float(S);
          for (int64_t s = 0; s < S; ++s)
            for (int64_t d = 0; d < D; d += 8)
              _mm256_storeu_ps(ar + d, _mm256_fmadd_ps(_mm256_set1_ps(p), load8<BF16>(vb + s * D, d), _mm256_loadu_ps(ar + d)));
          continue;
        }
        const __m256 vm = _mm256_set1_ps(mx), low = _mm256_set1_ps(lowest);
        __m256 tot = _mm256_setzero_ps();
        for (int64_t i = 0; i < npad; i += 8) {
          const __m256 x = _mm256_loadu_ps(st + i);
          const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, low, _CMP_EQ_OQ), exp256(_mm256_sub_ps(x, vm)));  // masked: exactly 0
          _mm256_storeu_ps(st + i, e);
          tot = _mm256_add_ps(tot, e);
        }
        if (gap) {
          // The denominator over this token's own slots only, in order: slots masked for it but
          // listed for another token (a token tree's other branches) would shift which lane each
          // term is added in, and the sum would differ in its last bits from the same token's
          // step without them. Where its masked slots all come last (a chain, a one-token step)
          // the sum above is already this one, bit for bit, and is kept.
          kept.assign(npad, 0.f);
          int64_t m = 0;
          for (int64_t i = 0; i < n; ++i)
            if (!masked(b, t, list[i])) kept[m++] = st[i];
          tot = _mm256_setzero_ps();
          for (int64_t i = 0; i < m; i += 8) tot = _mm256_add_ps(tot, _mm256_loadu_ps(kept.data() + i));
        }
        const float inv = 1.f / hsum(tot);
        // p v over the listed slots, D in chunks of up to 64 held in registers.
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
          const int64_t chunks = std::min<int64_t>(8, (D - d0) / 8);
          __m256 a[8];
          for (int c = 0; c < 8; ++c) a[c] = _mm256_setzero_ps();
          for (int64_t i = 0; i < n; ++i) {
            const float p = st[i];
            if (p == 0.f) continue;
            const __m256 pv = _mm256_set1_ps(p);
            const T* vs = vb + int64_t(list[i]) * D + d0;
            for (int c = 0; c < chunks; ++c) a[c] = _mm256_fmadd_ps(pv, load8<BF16>(vs, 8 * c), a[c]);
          }
          const __m256 vi = _mm256_set1_ps(inv);
          for (int c = 0; c < chunks; ++c) _mm256_storeu_ps(ar + d0 + 8 * c, _mm256_mul_ps(a[c], vi));
        }
      }
      for (int64_t t = 0; t < Q; ++t) {
        T* dst = op + ((b * Q + t) * H + h) * D;
        const float* src = acc.data() + t * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = T(src[d]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4, "decode_attention: query, key and value must be 4-D (batch, heads, tokens, dim)");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type() &&
              (query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16),
              "decode_attention: query, key and value must all be float32 or all bfloat16");
  TORCH_CHECK(query.is_contiguous() && key.is_contiguous() && value.is_contiguous(), "decode_attention: inputs must be contiguous");
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t KVH = key.size(1), S = key.size(2);
  TORCH_CHECK(key.size(0) == B && value.sizes() == key.sizes() && key.size(3) == D, "decode_attention: key/value shapes do not match the query");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "decode_attention: query heads must be a multiple of key/value heads");
  TORCH_CHECK(D % 8 == 0, "decode_attention: the head size must be a multiple of 8");
  TORCH_CHECK((H / KVH) * Q <= kMaxRows, "decode_attention: at most ", kMaxRows, " query rows per key/value head");
  if (mask.has_value()) {
    TORCH_CHECK(mask->is_contiguous() && mask->dim() == 4 && mask->size(0) == B && mask->size(1) == 1 && mask->size(2) == Q && mask->size(3) == S,
                "decode_attention: the mask must be contiguous (batch, 1, query tokens, slots)");
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kFloat, "decode_attention: the mask must be bool or float32");
  }
  at::Tensor out = at::empty({B, Q, H, D}, query.options());
  if (query.scalar_type() == at::kFloat) attend<float>(query, key, value, mask, scale, out);
  else attend<at::BFloat16>(query, key, value, mask, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimformer, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) { m.impl("decode_attention", &decode_attention); }
