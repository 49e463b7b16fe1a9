// slimformer::q8a_tiles_linear -- y = x W^T + b for few rows of x (decoding, speculative verification)
// from 4/8-bit codes laid out in channel tiles, activations rounded to int8 per block of 32 columns.
//
// Why: the stored-layout kernel (packed_linear_q8a) computes one output channel at a time: every
// 64-byte step of codes is one integer dot product per row, widened to float, scaled and summed, and
// each channel ends in a horizontal reduction per row. A one-row step is then near the memory rate,
// but each further row adds nearly as much arithmetic again: on a 2-core AMD EPYC the 8-bit SmolLM2
// linears took 3.5x as long for 8 rows as for 1, and a speculative verify step of 7 tokens cost
// 1.7-1.9 one-token steps. Here the codes of 16 output channels are interleaved, four columns per
// channel in each 32-bit lane (the layout AVX-512 VNNI's vpdpbusd multiplies against one broadcast
// group of four activation codes), so one 64-byte load serves 16 channels for every row, the int32
// sums of a 32-column block are widened once per block (not per step), and the 16 results of a row
// leave as one vector, with no horizontal reduction.
//
// Layout (built by slimformer/kernels/q8a_tiles.py, out features padded to a multiple of 16):
//   tiles  uint8 (N/16, steps, 16, 4): 8-bit: step s holds columns 4s..4s+3 of each of the 16
//          channels; 4-bit: step s covers columns 8s..8s+7, byte j of a channel holding column 8s+j
//          in its low nibble and column 8s+4+j in its high nibble;
//   scales, offsets float32 (N/16, groups, 16): W[n, k] = q[n, k] * scale[n, g] + offset[n, g].
// x (M, K) float32 contiguous, K a multiple of 32 and of the group size; output (M, N) float32.
// Activations: per block of 32 columns d = max|x| / 127, codes round(x / d) (half to even), as
// llama.cpp's Q8 activations and packed_linear_q8a. Per row and channel, in this order: per block
// the int32 dot product, widened, times d, summed over the group's blocks; times the group's scale
// plus the offset times the group's sum of the rounded x, summed over groups; plus the bias. Every
// row is computed by the same operations whatever M is, so a row's output does not depend on the
// rows beside it (a verify step equals one-token steps bit for bit). Compiled for AVX-512 VNNI by a
// target pragma; callers check q8a_tiles_supported() (slimformer/kernels/q8a_tiles.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "q8_rounding.h"

namespace {

constexpr int kMaxRows = 8;  // rows of x per pass over a tile (accumulators: 3 registers per row)

bool q8a_tiles_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
}

// One row of x rounded to int8 per block of 32 columns: codes (K), d (K/32) and, per group, the sum
// of the rounded values (d times the sum of the block's codes, block by block).
void quantize_row(const float* x, int64_t K, int64_t gs, int8_t* codes, float* d, float* xsum) {
  const int64_t blocks = K / 32, per_group = gs / 32;
  float acc = 0.f;
  for (int64_t bl = 0; bl < blocks; ++bl) {
    int32_t total;
    d[bl] = round_block_q8(x + bl * 32, codes + bl * 32, &total);
    acc += d[bl] * float(total);
    if ((bl + 1) % per_group == 0) {
      xsum[bl / per_group] = acc;
      acc = 0.f;
    }
  }
}

struct Rows {  // the rounded activations of a tile of rows
  const int8_t* codes;  // (rows, K)
  const float* d;       // (rows, K/32)
  const float* xsum;    // (rows, groups)
};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")

// 16 output channels (one tile column) for R rows.
template <int BITS, int R>
void tile_rows(const Rows& rows, int64_t K, int64_t gs, const uint8_t* tile, const float* scales, const float* offsets,
               const float* bias16, float* out, int64_t N, int64_t n0) {
  const int64_t groups = K / gs, blocks_per_group = gs / 32, blocks = K / 32;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 tot[R];
  for (int r = 0; r < R; ++r) tot[r] = _mm512_setzero_ps();
  const uint8_t* w = tile;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 facc[R];
    for (int r = 0; r < R; ++r) facc[r] = _mm512_setzero_ps();
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m512i iacc[R];
      for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
      if constexpr (BITS == 8) {
        for (int s = 0; s < 8; ++s, w += 64) {
          const __m512i wv = _mm512_loadu_si512(w);
          for (int r = 0; r < R; ++r) {
            const int32_t* xq = reinterpret_cast<const int32_t*>(rows.codes + r * K + b * 32 + s * 4);
            iacc[r] = _mm512_dpbusd_epi32(iacc[r], wv, _mm512_set1_epi32(*xq));
          }
        }
      } else {
        for (int s = 0; s < 4; ++s, w += 64) {
          const __m512i wv = _mm512_loadu_si512(w);
          const __m512i lo = _mm512_and_si512(wv, nib), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), nib);
          for (int r = 0; r < R; ++r) {
            const int32_t* xq = reinterpret_cast<const int32_t*>(rows.codes + r * K + b * 32 + s * 8);
            iacc[r] = _mm512_dpbusd_epi32(iacc[r], lo, _mm512_set1_epi32(xq[0]));
            iacc[r] = _mm512_dpbusd_epi32(iacc[r], hi, _mm512_set1_epi32(xq[1]));
          }
        }
      }
      for (int r = 0; r < R; ++r) facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r]), _mm512_set1_ps(rows.d[r * blocks + b]), facc[r]);
    }
    const __m512 sv = _mm512_loadu_ps(scales + g * 16), ov = _mm512_loadu_ps(offsets + g * 16);
    for (int r = 0; r < R; ++r) {
      tot[r] = _mm512_fmadd_ps(facc[r], sv, tot[r]);
      tot[r] = _mm512_fmadd_ps(ov, _mm512_set1_ps(rows.xsum[r * groups + g]), tot[r]);
    }
  }
  const int64_t left = std::min<int64_t>(16, N - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1u);
  const __m512 bv = bias16 ? _mm512_maskz_loadu_ps(mask, bias16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * N + n0, mask, _mm512_add_ps(tot[r], bv));
}

using TileFn = void (*)(const Rows&, int64_t, int64_t, const uint8_t*, const float*, const float*, const float*, float*, int64_t, int64_t);

template <int BITS>
TileFn tile_fn(int rows) {
  switch (rows) {
    case 1: return tile_rows<BITS, 1>;
    case 2: return tile_rows<BITS, 2>;
    case 3: return tile_rows<BITS, 3>;
    case 4: return tile_rows<BITS, 4>;
    case 5: return tile_rows<BITS, 5>;
    case 6: return tile_rows<BITS, 6>;
    case 7: return tile_rows<BITS, 7>;
    default: return tile_rows<BITS, 8>;
  }
}

#pragma GCC pop_options

at::Tensor q8a_tiles_linear(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& scales, const at::Tensor& offsets,
                            int64_t bits, int64_t group_size, int64_t out_features, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(q8a_tiles_supported(), "q8a_tiles_linear: this CPU lacks AVX-512 VNNI");
  TORCH_CHECK(bits == 4 || bits == 8, "q8a_tiles_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "q8a_tiles_linear: x must be a contiguous (rows, in) float32 tensor");
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0 && K % group_size == 0, "q8a_tiles_linear: the width and the group size must be multiples of 32, the group size dividing the width");
  const int64_t G = K / group_size, NT = (N + 15) / 16, steps = bits == 8 ? K / 4 : K / 8;
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() && tiles.dim() == 4 && tiles.size(0) == NT && tiles.size(1) == steps &&
                  tiles.size(2) == 16 && tiles.size(3) == 4,
              "q8a_tiles_linear: tiles must be contiguous uint8 (", NT, ", ", steps, ", 16, 4)");
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == NT && t->size(1) == G && t->size(2) == 16,
                "q8a_tiles_linear: scales and offsets must be contiguous float32 (", NT, ", ", G, ", 16)");
  const float* bp = nullptr;
  std::vector<float> bias_padded;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "q8a_tiles_linear: bias must be a contiguous float32 (out,) tensor");
    bias_padded.assign(NT * 16, 0.f);
    std::copy(bias->data_ptr<float>(), bias->data_ptr<float>() + N, bias_padded.begin());
    bp = bias_padded.data();
  }
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  std::vector<int8_t> codes(M * K);
  std::vector<float> d(M * (K / 32)), xsum(M * G);
  const float* xp = x.data_ptr<float>();
  int8_t* const cp = codes.data();
  float* const dp = d.data();
  float* const xs = xsum.data();
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, group_size, cp + m * K, dp + m * (K / 32), xs + m * G);
  float* op = out.data_ptr<float>();
  const uint8_t* tp = tiles.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* ofp = offsets.data_ptr<float>();
  const int64_t tile_bytes = steps * 64;
  at::parallel_for(0, NT, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rt = int(std::min<int64_t>(kMaxRows, M - m0));
        const Rows rows{cp + m0 * K, dp + m0 * (K / 32), xs + m0 * G};
        const TileFn fn = bits == 8 ? tile_fn<8>(rt) : tile_fn<4>(rt);
        fn(rows, K, group_size, tp + t * tile_bytes, sp + t * G * 16, ofp + t * G * 16, bp ? bp + t * 16 : nullptr, op + m0 * N, N, t * 16);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimformer, m) {
  m.def("q8a_tiles_linear(Tensor x, Tensor tiles, Tensor scales, Tensor offsets, int bits, int group_size, int out_features, Tensor? bias) -> Tensor");
  m.def("q8a_tiles_supported() -> bool", &q8a_tiles_supported);
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) { m.impl("q8a_tiles_linear", &q8a_tiles_linear); }
