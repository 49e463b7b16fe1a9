// The sum of a float vector's 8 lanes, in one fixed order (the two 128-bit halves added, then two
// horizontal adds): shared by the kernels that reduce across lanes (dense_linear.cpp,
// packed_linear.cpp, decode_attention.cpp), so each reduces the same way. Included by their
// sources; kernels/__init__.py hashes it into their build keys. AVX.
#pragma once

#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
