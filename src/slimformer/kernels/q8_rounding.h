// Activations rounded to int8 per block of 32 columns, as llama.cpp's Q8 activations: shared by the
// int8-activation kernels (packed_linear.cpp's packed_linear_q8a, q8a_tiles.cpp). Included by their
// sources; kernels/__init__.py hashes it into their build keys. AVX2.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Rounds the 32 floats at xb to int8 codes: d = max|x| / 127, codes round(x / d) (half to even, as
// the default MXCSR does) clamped to [-127, 127], written to codes[0..31] in column order. Returns
// d; *total receives the sum of the codes.
static inline float round_block_q8(const float* xb, int8_t* codes, int32_t* total) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 a[4], m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    a[i] = _mm256_loadu_ps(xb + 8 * i);
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, a[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float amax = _mm_cvtss_f32(m4);
  const __m256 vi = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i c[4], sum = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(a[i], vi));
    c[i] = _mm256_max_epi32(_mm256_min_epi32(c[i], _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    sum = _mm256_add_epi32(sum, c[i]);
  }
  // Narrow to bytes: the packs interleave 128-bit lanes, the permutation puts the columns back in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  *total = _mm_cvtsi128_si32(s4);
  return amax / 127.f;
}
