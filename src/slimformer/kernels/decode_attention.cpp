// slimformer::decode_attention -- softmax(q k^T * scale + mask) v for a few query tokens against a
// long (static) KV cache: the decode step and the speculative verify step.
//
// query (B, H, Q, D), key/value (B, KVH, S, D) with H a multiple of KVH (grouped-query heads: query
// head h reads key/value head h / (H / KVH)), all float32 or all bfloat16, D a multiple of 8; mask
// None, boolean (B, 1, Q, S) (true = attend) or additive float32 (B, 1, Q, S). Output (B, Q, H, D)
// contiguous in the query's dtype, as transformers' attention functions return it.
//
// Per (batch, key/value head) the G = H / KVH query heads times Q tokens that share it are one
// block of rows: each cached key is loaded once for all of them. Masked slots (false, or an
// additive value at the float32 minimum or below) are not computed at all: a static cache of 512
// slots holding 60 tokens costs 60 dot products per row. The softmax treats masked slots as
// PyTorch does with a float32-minimum fill (a row with every slot masked averages all values).
// float32 arithmetic throughout; bf16 keys and values are widened as they are read.
// Built for AVX2 + FMA, like packed_linear.cpp; see slimformer/kernels/decode_attention.py.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int kMaxRows = 64;  // query rows (G * Q) of one block

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

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

template <typename T>
void attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const c10::optional<at::Tensor>& mask,
            double scale, at::Tensor& out) {
  constexpr bool BF16 = std::is_same_v<T, at::BFloat16>;
  const int64_t B = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t KVH = key.size(1), S = key.size(2), G = H / KVH, R = G * Q;
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
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(R * D), scores(R * S), acc(R * D);
    std::vector<int32_t> slots;
    slots.reserve(S);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t b = bk / KVH, kvh = bk % KVH;
      // Rows r = g * Q + t: query head kvh * G + g, token t; widened to float32 and pre-scaled.
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < Q; ++t) {
          const T* src = qp + (((b * H + kvh * G + g) * Q + t) * D);
          for (int64_t d = 0; d < D; ++d) qf[(g * Q + t) * D + d] = to_float(src[d]) * sc;
        }
      // Slots some row attends to (the others are never computed).
      slots.clear();
      for (int64_t s = 0; s < S; ++s) {
        bool any = !mask.has_value();
        for (int64_t t = 0; t < Q && !any; ++t) {
          const int64_t mi = (b * Q + t) * S + s;
          any = mb ? mb[mi] : ma[mi] > lowest;
        }
        if (any) slots.push_back(int32_t(s));
      }
      const T* kb = kp + (b * KVH + kvh) * S * D;
      const T* vb = vp + (b * KVH + kvh) * S * D;
      std::fill(scores.begin(), scores.end(), lowest);
      for (int32_t s : slots) {
        const T* ks = kb + int64_t(s) * D;
        for (int64_t r = 0; r < R; ++r) {
          const int64_t t = r % Q, mi = (b * Q + t) * S + s;
          if (mb && !mb[mi]) continue;
          const float add = ma ? ma[mi] : 0.f;
          if (ma && !(add > lowest)) continue;
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          const float* qr = qf.data() + r * D;
          int64_t d = 0;
          for (; d + 16 <= D; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8<BF16>(ks, d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d + 8), load8<BF16>(ks, d + 8), a1);
          }
          for (; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qr + d), load8<BF16>(ks, d), a0);
          scores[r * S + s] = hsum(_mm256_add_ps(a0, a1)) + add;
        }
      }
      // Softmax per row over all S slots (masked ones hold the float32 minimum), then p v.
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t r = 0; r < R; ++r) {
        float* sr = scores.data() + r * S;
        float mx = lowest;
        for (int32_t s : slots) mx = std::max(mx, sr[s]);
        const bool all_masked = mx == lowest;  // every slot equal: PyTorch averages all values
        float total = 0.f;
        if (all_masked) {
          for (int64_t s = 0; s < S; ++s) sr[s] = 1.f;
          total = float(S);
        } else {  // slots outside the list hold the minimum: exp(minimum - max) is 0
          for (int32_t s : slots) {
            const float e = std::exp(sr[s] - mx);
            sr[s] = e;
            total += e;
          }
        }
        const float inv = 1.f / total;
        float* ar = acc.data() + r * D;
        auto add_slot = [&](int64_t s) {
          const float p = sr[s] * inv;
          if (p == 0.f) return;
          const __m256 vpv = _mm256_set1_ps(p);
          const T* vs = vb + s * D;
          for (int64_t d = 0; d < D; d += 8)
            _mm256_storeu_ps(ar + d, _mm256_fmadd_ps(vpv, load8<BF16>(vs, d), _mm256_loadu_ps(ar + d)));
        };
        if (all_masked) {
          for (int64_t s = 0; s < S; ++s) add_slot(s);
        } else {
          for (int32_t s : slots) add_slot(s);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = 0; t < Q; ++t) {
          T* dst = op + ((b * Q + t) * H + kvh * G + g) * D;
          const float* src = acc.data() + (g * Q + t) * D;
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
