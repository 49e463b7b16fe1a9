// Encoder attention on Intel AMX tiles: softmax(Q K^T * scale + mask) V for short sequences.
//
// q (B, H, Lq, D), k and v (B, H, Lk, D) bfloat16 with unit stride along D (any other strides);
// mask: additive float32 or bool (True = attend), (B, H, Lq, Lk) with unit stride along Lk (an
// expanded view: stride 0 on broadcast dims), or None; out (B, Lq, H, D) bfloat16 (transformers' attention layout).
// D a multiple of 32, Lk <= MAX_KEYS.
//
// Per (batch, head), on one thread: K and V are packed once into the VNNI layout AMX's B tiles
// read; then per block of 16 queries the scores S (16 x Lk, float32) come from one tile product per
// 16 keys and 32 head dims, the softmax runs in AVX-512 on the rows in cache (float32: scale, mask,
// max, exp, sum, divide), the probabilities are rounded to bfloat16 (as the math path of
// PyTorch's SDPA does before its second matmul) and P V comes from tile products of 32 keys. The
// whole score row fits in cache, so there is no online-softmax rescaling. A row whose keys are all
// masked gives zeros (SDPA gives NaN there).
// Up to four tile products are in flight at a time (accumulators in tiles 0-3, operands in 4-7),
// so each does not wait for the one before.
//
// Compiled with -mamx-tile -mamx-bf16 -mavx512f -mavx512bf16; the Python side loads it only
// where the CPU reports AMX-BF16, and asks the kernel (Linux arch_prctl) for the tile state. With
// -DSLIMFORMER_TILE_EMULATION (and no AMX flags) the same source runs on AVX512-BF16 alone: see
// the emulated tiles below. Measured on a 2-core AMD EPYC (Zen 4, torch 2.13), 32 rows x 12 heads
// of 32, bf16: 128 positions 10.5 -> 5.4 ms against SDPA, 64 positions 3.4 -> 1.6, 16 positions
// 0.57 -> 0.22.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr int64_t MAX_KEYS = 1024;
constexpr int TILE_ROWS = 16;   // queries (A rows, C rows) per tile
constexpr int TILE_K = 32;      // bf16 values per A row / per VNNI B column pair-row
constexpr int TILE_N = 16;      // C columns (fp32)

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#ifdef SLIMFORMER_TILE_EMULATION
// The same kernel without AMX, for CPUs with AVX512-BF16 only (AMD EPYC Zen 4, Intel Cooper Lake):
// each "tile" is emulated in this thread's memory. Operand tiles (A: 16 rows x 32 bf16, B: 16
// rows of 16 bf16 pairs, VNNI layout) are views of the bytes they were loaded from, which the
// kernel never changes before using them; accumulator tiles (16 x 16 float32) are buffers. A tile
// product is 256 VDPBF16PS: per A row, its 16 bf16 pairs broadcast against the 16 B rows held in
// registers (32 multiply-adds each, float32 accumulation as the AMX product's). The sums of a
// product's pairs may round differently from AMX's; both are within SDPA's bf16 rounding (tested).
struct EmulatedTile {
  const char* src;
  int64_t stride;
  alignas(64) float acc[16 * 16];
};
thread_local EmulatedTile emulated_tiles[8];

inline void emulated_zero(int t) { std::memset(emulated_tiles[t].acc, 0, sizeof(emulated_tiles[t].acc)); }
inline void emulated_load(int t, const void* src, int64_t stride) {
  emulated_tiles[t].src = static_cast<const char*>(src);
  emulated_tiles[t].stride = stride;
}
inline void emulated_dp(int c, int a, int b) {
  const EmulatedTile& A = emulated_tiles[a];
  const EmulatedTile& B = emulated_tiles[b];
  float* C = emulated_tiles[c].acc;
  __m512bh brow[16];
  for (int p = 0; p < 16; ++p) brow[p] = (__m512bh)_mm512_loadu_si512(B.src + p * B.stride);
  for (int m0 = 0; m0 < 16; m0 += 8) {  // eight rows' chains side by side: each row's sum in pair order
    const uint32_t* arow[8];
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) {
      arow[i] = reinterpret_cast<const uint32_t*>(A.src + (m0 + i) * A.stride);
      acc[i] = _mm512_loadu_ps(C + (m0 + i) * 16);
    }
    for (int p = 0; p < 16; ++p)
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(static_cast<int>(arow[i][p])), brow[p]);
    for (int i = 0; i < 8; ++i) _mm512_storeu_ps(C + (m0 + i) * 16, acc[i]);
  }
}
inline void emulated_store(int t, void* dst, int64_t stride) {
  for (int m = 0; m < 16; ++m) std::memcpy(static_cast<char*>(dst) + m * stride, emulated_tiles[t].acc + m * 16, 64);
}
#define TILE_ZERO(t) emulated_zero(t)
#define TILE_LOAD(t, src, stride) emulated_load(t, src, stride)
#define TILE_DP(c, a, b) emulated_dp(c, a, b)
#define TILE_STORE(t, dst, stride) emulated_store(t, dst, stride)
#define TILE_RELEASE() ((void)0)

bool request_tile_state() { return true; }
void load_tile_config() {}
#else
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, src, stride) _tile_loadd(t, src, stride)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define TILE_STORE(t, dst, stride) _tile_stored(t, dst, stride)
#define TILE_RELEASE() _tile_release()
#define TILE_CONFIG(cfg) _tile_loadconfig(cfg)

bool request_tile_state() {
  // Linux keeps AMX's tile data off until a process asks for it (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  static const bool granted = [] { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }();
  return granted;
}

void load_tile_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {  // every tile 16 rows x 64 bytes
    cfg.rows[t] = TILE_ROWS;
    cfg.colsb[t] = 64;
  }
  TILE_CONFIG(&cfg);
}
#endif

// e^x for float32 lanes x <= 0 (scores minus their row maximum): x = n ln2 + r, |r| <= ln2/2,
// degree-5 Taylor polynomial of e^r (relative error < 3e-6, far below the bf16 rounding the
// probabilities get), scaled by 2^n. Lanes below -87 give 0 (masked scores are -inf).
inline __m512 exp_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 live = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(x, lo);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 120.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// r[n] = row n of a 16 x 16 matrix of 32-bit values -> r[t] = column t.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], 128-bit lane l: column 4l + j of rows 4i..4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // a 4 x 4 transpose of 128-bit lanes across u[j], u[4+j], u[8+j], u[12+j]
    __m512i a = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), b = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    __m512i c = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88), d = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    r[j] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[4 + j] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

inline void store_bf16(uint16_t* dst, __m512 v) {
  __m256bh h = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i&>(h));
}

struct Shapes {
  int64_t B, H, Lq, Lk, D;
  int64_t qs[3], ks[3], vs[3], ms[3];  // strides of batch, head, position (elements)
  float scale;
};

// 1 + the last key index that any query of (b, h) may attend to (0: none); s.Lk without a mask.
// A mask that is the same for every query (stride 0 along queries, as padding masks are) is read
// once; bool masks are scanned 64 keys at a time from the end.
int64_t attended_keys(const float* mask, const uint8_t* keep, const Shapes& s, int64_t b, int64_t h) {
  if (!mask && !keep) return s.Lk;
  const int64_t queries = s.ms[2] == 0 ? 1 : s.Lq;
  int64_t last = 0;
  for (int64_t i = 0; i < queries && last < s.Lk; ++i) {
    const int64_t row = b * s.ms[0] + h * s.ms[1] + i * s.ms[2];
    if (keep) {
      for (int64_t j0 = (s.Lk - 1) / 64 * 64; j0 + 64 > last && j0 >= 0; j0 -= 64) {
        const int64_t n = std::min<int64_t>(64, s.Lk - j0);
        const __mmask64 in = n == 64 ? ~0ULL : ((1ULL << n) - 1);
        const __m512i bytes = _mm512_maskz_loadu_epi8(in, keep + row + j0);
        const uint64_t hit = _mm512_test_epi8_mask(bytes, bytes);
        if (hit) {
          last = std::max<int64_t>(last, j0 + 64 - __builtin_clzll(hit));
          break;
        }
      }
    } else {
      for (int64_t j = s.Lk - 1; j >= last; --j)
        if (mask[row + j] != -std::numeric_limits<float>::infinity()) {
          last = j + 1;
          break;
        }
    }
  }
  return last;
}

// One (batch row, head), or with ``length`` >= 0 one packed sequence of the single batch row
// (positions start .. start + length - 1, attending only to each other): everything in this
// thread's buffers.
void attend(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* mask, const uint8_t* keep, uint16_t* out, const Shapes& s,
            int64_t b, int64_t h, int64_t start, int64_t length, std::vector<uint16_t>& kpack, std::vector<uint16_t>& vpack, std::vector<float>& scores,
            std::vector<uint16_t>& probs, std::vector<float>& acc, std::vector<uint16_t>& qtail) {
  const int64_t D = s.D, Lq = length >= 0 ? length : s.Lq;
  // Keys after the last one any query may attend to carry no weight: they are not computed
  // (with padding masks, a short row in a long batch costs its own length, not the batch's).
  const int64_t Lk = length >= 0 ? length : attended_keys(mask, keep, s, b, h);
  if (Lk == 0) {  // every key masked for every query: zero rows
    for (int64_t i = 0; i < Lq; ++i) std::memset(out + ((b * s.Lq + start + i) * s.H + h) * D, 0, D * 2);
    return;
  }
  const int64_t kpad = (Lk + 31) / 32 * 32;  // keys rounded up to whole 32-key chunks (zeros)
  const int64_t dchunks = D / TILE_K, nblocks = D / TILE_N;
  const uint16_t* qb = q + b * s.qs[0] + h * s.qs[1] + start * s.qs[2];
  const uint16_t* kb = k + b * s.ks[0] + h * s.ks[1] + start * s.ks[2];
  const uint16_t* vb = v + b * s.vs[0] + h * s.vs[1] + start * s.vs[2];
  // K^T as B tiles: for each 16-key block and 32-dim chunk, 16 rows (dim pairs) x 16 keys x 2:
  // a 16 x 16 transpose of 32-bit pairs.
  for (int64_t kbk = 0; kbk < kpad / 16; ++kbk)
    for (int64_t dc = 0; dc < dchunks; ++dc) {
      __m512i r[16];
      for (int n = 0; n < 16; ++n) {
        int64_t key = kbk * 16 + n;
        r[n] = key < Lk ? _mm512_loadu_si512(kb + key * s.ks[2] + dc * TILE_K) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      uint16_t* tile = kpack.data() + (kbk * dchunks + dc) * 512;
      for (int t = 0; t < 16; ++t) _mm512_storeu_si512(tile + t * 32, r[t]);
    }
  // V as B tiles: for each 32-key chunk and 16-dim block, 16 rows (key pairs) x 16 dims x 2:
  // rows 2t and 2t+1 interleaved.
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                         23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t kc = 0; kc < kpad / 32; ++kc)
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      uint16_t* tile = vpack.data() + (kc * nblocks + nb) * 512;
      for (int t = 0; t < 16; ++t) {
        int64_t key = kc * 32 + 2 * t;
        __m256i even = key < Lk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + key * s.vs[2] + nb * TILE_N)) : _mm256_setzero_si256();
        __m256i odd = key + 1 < Lk ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vb + (key + 1) * s.vs[2] + nb * TILE_N)) : _mm256_setzero_si256();
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
        _mm512_storeu_si512(tile + t * 32, _mm512_permutexvar_epi16(pairs, both));
      }
    }
  const __m512 scale = _mm512_set1_ps(s.scale);
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float sums[TILE_ROWS];
  for (int64_t q0 = 0; q0 < Lq; q0 += TILE_ROWS) {
    const int64_t rows = std::min<int64_t>(TILE_ROWS, Lq - q0);
    const uint16_t* qsrc = qb + q0 * s.qs[2];
    int64_t qstride = s.qs[2];
    if (rows < TILE_ROWS) {  // a partial block: copy into zero-padded rows (tile loads read 16)
      std::fill(qtail.begin(), qtail.end(), 0);
      for (int64_t i = 0; i < rows; ++i) std::memcpy(qtail.data() + i * D, qsrc + i * s.qs[2], D * 2);
      qsrc = qtail.data();
      qstride = D;
    }
    // S = Q K^T, one 16 x 16 tile per key block; four key blocks in flight (accumulators 0-3,
    // the query chunk in tile 4, key chunks in tiles 5-7) so that the tile products overlap
    // instead of each waiting for the one before.
    for (int64_t kbk = 0; kbk < kpad / 16; kbk += 4) {
      const int64_t live = std::min<int64_t>(4, kpad / 16 - kbk);  // kpad is a multiple of 32: 2 or 4
      TILE_ZERO(0);
      TILE_ZERO(1);
      if (live == 4) {
        TILE_ZERO(2);
        TILE_ZERO(3);
      }
      for (int64_t dc = 0; dc < dchunks; ++dc) {
        const uint16_t* kt = kpack.data() + (kbk * dchunks + dc) * 512;
        TILE_LOAD(4, qsrc + dc * TILE_K, qstride * 2);
        TILE_LOAD(5, kt, 64);
        TILE_DP(0, 4, 5);
        TILE_LOAD(6, kt + dchunks * 512, 64);
        TILE_DP(1, 4, 6);
        if (live == 4) {
          TILE_LOAD(7, kt + 2 * dchunks * 512, 64);
          TILE_DP(2, 4, 7);
          TILE_LOAD(5, kt + 3 * dchunks * 512, 64);
          TILE_DP(3, 4, 5);
        }
      }
      TILE_STORE(0, scores.data() + kbk * 16, kpad * 4);
      TILE_STORE(1, scores.data() + (kbk + 1) * 16, kpad * 4);
      if (live == 4) {
        TILE_STORE(2, scores.data() + (kbk + 2) * 16, kpad * 4);
        TILE_STORE(3, scores.data() + (kbk + 3) * 16, kpad * 4);
      }
    }
    // softmax per row, in float32: scores scaled and masked, row maximum, then e^(x - max) rounded
    // to bf16 into P and summed; the rows of P V are divided by the sums below. Rows are swept
    // eight at a time with their maxima and sums in registers, so their dependency chains
    // overlap; all 16 rows are computed (a partial block's extra rows have zero queries and are
    // not written out). A mask that is the same for every query (padding; the log-size bias of
    // merged tokens) is read once per 16 keys for all eight rows and both sweeps only read the
    // scores: the first takes the maximum of scale * s + bias, the second recomputes it inside
    // the exponent. A mask that differs per query is applied in the first sweep, which writes
    // the scaled, masked scores back for the second.
    const bool per_query = (mask || keep) && s.ms[2] != 0;
    const float* kbias = mask && !per_query ? mask + b * s.ms[0] + h * s.ms[1] : nullptr;
    const uint8_t* kkeep = keep && !per_query ? keep + b * s.ms[0] + h * s.ms[1] : nullptr;
    for (int64_t half = 0; half < TILE_ROWS; half += 8) {
      const float* mrow[8];
      const uint8_t* krow[8];
      __m512 max_v[8], sum_v[8];
      for (int i = 0; i < 8; ++i) {
        const int64_t r = half + i;
        mrow[i] = per_query && mask && r < rows ? mask + b * s.ms[0] + h * s.ms[1] + (q0 + r) * s.ms[2] : nullptr;
        krow[i] = per_query && keep && r < rows ? keep + b * s.ms[0] + h * s.ms[1] + (q0 + r) * s.ms[2] : nullptr;
        max_v[i] = neg_inf;
        sum_v[i] = _mm512_setzero_ps();
      }
      float* base = scores.data() + half * kpad;
      for (int64_t j = 0; j < kpad; j += 16) {
        const __mmask16 valid = j + 16 <= Lk ? (__mmask16)0xFFFF : (j < Lk ? (__mmask16)((1u << (Lk - j)) - 1) : (__mmask16)0);
        if (!per_query) {
          __mmask16 live = valid;
          if (kkeep) {
            __m128i kb8 = _mm_maskz_loadu_epi8(valid, kkeep + j);
            live &= _mm_test_epi8_mask(kb8, kb8);
          }
          if (kbias) {
            const __m512 bias = _mm512_maskz_loadu_ps(valid, kbias + j);
            for (int i = 0; i < 8; ++i) max_v[i] = _mm512_mask_max_ps(max_v[i], live, max_v[i], _mm512_fmadd_ps(_mm512_loadu_ps(base + i * kpad + j), scale, bias));
          } else {
            for (int i = 0; i < 8; ++i) max_v[i] = _mm512_mask_max_ps(max_v[i], live, max_v[i], _mm512_loadu_ps(base + i * kpad + j));
          }
          continue;
        }
        for (int i = 0; i < 8; ++i) {
          float* at = base + i * kpad + j;
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(at), scale);
          __mmask16 live = valid;
          if (mrow[i]) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(valid, mrow[i] + j));
          if (krow[i]) {
            __m128i kb8 = _mm_maskz_loadu_epi8(valid, krow[i] + j);
            live &= _mm_test_epi8_mask(kb8, kb8);
          }
          x = _mm512_mask_blend_ps(live, neg_inf, x);
          _mm512_storeu_ps(at, x);
          max_v[i] = _mm512_max_ps(max_v[i], x);
        }
      }
      for (int i = 0; i < 8; ++i) {
        float m = _mm512_reduce_max_ps(max_v[i]);
        if (!per_query && !kbias) m *= s.scale;  // the maximum of the raw scores
        max_v[i] = _mm512_set1_ps(m == -std::numeric_limits<float>::infinity() ? 0.0f : m);  // all masked: e = 0
      }
      for (int64_t j = 0; j < kpad; j += 16) {
        if (per_query) {  // scaled and masked in the first sweep
          for (int i = 0; i < 8; ++i) {
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(base + i * kpad + j), max_v[i]));
            sum_v[i] = _mm512_add_ps(sum_v[i], e);
            store_bf16(probs.data() + (half + i) * kpad + j, e);
          }
          continue;
        }
        // keys past Lk (zero-padded to the 32-key chunk) and masked keys get e = 0
        __mmask16 live = j + 16 <= Lk ? (__mmask16)0xFFFF : (j < Lk ? (__mmask16)((1u << (Lk - j)) - 1) : (__mmask16)0);
        if (kkeep) {
          __m128i kb8 = _mm_maskz_loadu_epi8(live, kkeep + j);
          live &= _mm_test_epi8_mask(kb8, kb8);
        }
        const __m512 bias = kbias ? _mm512_maskz_loadu_ps(live, kbias + j) : _mm512_setzero_ps();
        for (int i = 0; i < 8; ++i) {
          const __m512 raw = _mm512_loadu_ps(base + i * kpad + j);
          __m512 e = exp_ps(kbias ? _mm512_sub_ps(_mm512_fmadd_ps(raw, scale, bias), max_v[i]) : _mm512_fmsub_ps(raw, scale, max_v[i]));
          if (live != 0xFFFF) e = _mm512_maskz_mov_ps(live, e);
          sum_v[i] = _mm512_add_ps(sum_v[i], e);
          store_bf16(probs.data() + (half + i) * kpad + j, e);
        }
      }
      for (int i = 0; i < 8; ++i) sums[half + i] = _mm512_reduce_add_ps(sum_v[i]);
    }
    // O = P V: up to four 16-dim blocks in flight (accumulators 0-3), each summed over 32-key
    // chunks (P chunk in tile 4, V chunks in tiles 5-7)
    for (int64_t nb0 = 0; nb0 < nblocks; nb0 += 4) {
      const int64_t live = std::min<int64_t>(4, nblocks - nb0);  // D is a multiple of 32: 2 or 4
      TILE_ZERO(0);
      TILE_ZERO(1);
      if (live == 4) {
        TILE_ZERO(2);
        TILE_ZERO(3);
      }
      for (int64_t kc = 0; kc < kpad / 32; ++kc) {
        const uint16_t* vt = vpack.data() + (kc * nblocks + nb0) * 512;
        TILE_LOAD(4, probs.data() + kc * 32, kpad * 2);
        TILE_LOAD(5, vt, 64);
        TILE_DP(0, 4, 5);
        TILE_LOAD(6, vt + 512, 64);
        TILE_DP(1, 4, 6);
        if (live == 4) {
          TILE_LOAD(7, vt + 1024, 64);
          TILE_DP(2, 4, 7);
          TILE_LOAD(5, vt + 1536, 64);
          TILE_DP(3, 4, 5);
        }
      }
      TILE_STORE(0, acc.data() + nb0 * TILE_N, D * 4);
      TILE_STORE(1, acc.data() + (nb0 + 1) * TILE_N, D * 4);
      if (live == 4) {
        TILE_STORE(2, acc.data() + (nb0 + 2) * TILE_N, D * 4);
        TILE_STORE(3, acc.data() + (nb0 + 3) * TILE_N, D * 4);
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      uint16_t* orow = out + ((b * s.Lq + start + q0 + i) * s.H + h) * D;
      const __m512 inv = _mm512_set1_ps(sums[i] > 0.0f ? 1.0f / sums[i] : 0.0f);
      for (int64_t d = 0; d < D; d += 16) store_bf16(orow + d, _mm512_mul_ps(_mm512_loadu_ps(acc.data() + i * D + d), inv));
    }
  }
}

void check_heads(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, Shapes& s) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "tile_attention: q, k, v must be (batch, heads, positions, dim)");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "tile_attention: q, k, v must be bfloat16");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "tile_attention: unit stride along dim required");
  s.B = q.size(0), s.H = q.size(1), s.Lq = q.size(2), s.D = q.size(3), s.Lk = k.size(2);
  TORCH_CHECK(s.D % TILE_K == 0, "tile_attention: head dim must be a multiple of 32");
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B && k.size(1) == s.H && v.size(1) == s.H && v.size(2) == s.Lk && k.size(3) == s.D && v.size(3) == s.D,
              "tile_attention: q, k, v shapes disagree");
  for (int i = 0; i < 3; ++i) {
    s.qs[i] = q.stride(i);
    s.ks[i] = k.stride(i);
    s.vs[i] = v.stride(i);
  }
  TORCH_CHECK(request_tile_state(), "tile_attention: the kernel refused AMX tile state (arch_prctl)");
}

// Runs ``items`` (batch row or sequence, head) tasks over the intra-op threads, interleaved so
// that tasks of different lengths spread evenly; ``keys`` = the longest task's keys.
template <typename Task>
void run_tasks(int64_t items, int64_t keys, const Shapes& s, const Task& task) {
  const int64_t kpad = (keys + 31) / 32 * 32;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> kpack(kpad * s.D), vpack(kpad * s.D), probs(TILE_ROWS * kpad), qtail(TILE_ROWS * s.D);
    std::vector<float> scores(TILE_ROWS * kpad), acc(TILE_ROWS * s.D);
    load_tile_config();
    for (int64_t t = begin; t < end; ++t)
      for (int64_t item = t; item < items; item += threads) task(item, kpack, vpack, scores, probs, acc, qtail);
    TILE_RELEASE();
  });
}

at::Tensor tile_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask_opt, double scale) {
  Shapes s;
  check_heads(q, k, v, s);
  TORCH_CHECK(s.Lk >= 1 && s.Lk <= MAX_KEYS, "tile_attention: 1 to 1024 keys");
  const float* mptr = nullptr;
  const uint8_t* kptr = nullptr;
  if (mask_opt.has_value() && mask_opt->defined()) {
    const at::Tensor& mask = *mask_opt;
    TORCH_CHECK(mask.dim() == 4 && (mask.scalar_type() == at::kFloat || mask.scalar_type() == at::kBool) && mask.stride(3) == 1 && mask.size(3) == s.Lk,
                "tile_attention: mask must be float32 (additive) or bool (True = attend), (batch, heads, queries, keys) with unit key stride");
    TORCH_CHECK(mask.size(0) == s.B && mask.size(1) == s.H && mask.size(2) == s.Lq, "tile_attention: expand the mask to (batch, heads, queries, keys)");
    if (mask.scalar_type() == at::kFloat)
      mptr = mask.data_ptr<float>();
    else
      kptr = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    for (int i = 0; i < 3; ++i) s.ms[i] = mask.stride(i);
  }
  s.scale = static_cast<float>(scale);
  at::Tensor out = at::empty({s.B, s.Lq, s.H, s.D}, q.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  run_tasks(s.B * s.H, s.Lk, s, [&](int64_t bh, auto& kpack, auto& vpack, auto& scores, auto& probs, auto& acc, auto& qtail) {
    attend(qp, kp, vp, mptr, kptr, op, s, bh / s.H, bh % s.H, 0, -1, kpack, vpack, scores, probs, acc, qtail);
  });
  return out;
}

// Packed sequences: q, k, v (1, H, T, D) hold S sequences back to back, sequence i at positions
// cu_seqlens[i] .. cu_seqlens[i + 1] - 1 (int64, S + 1 offsets from 0 to T); each attends only to
// itself (FlashAttention's varlen layout; no padding anywhere). ``key_bias`` (T,) float32, optional:
// added to every query's logit of that key (the log-size of merged tokens, proportional
// attention), the same-for-every-query path of the mask. Output (1, T, H, D).
at::Tensor tile_attention_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens, double scale,
                                 const std::optional<at::Tensor>& key_bias) {
  Shapes s;
  check_heads(q, k, v, s);
  TORCH_CHECK(s.B == 1 && s.Lk == s.Lq, "tile_attention_packed: q, k, v must be (1, heads, tokens, dim) with as many keys as queries");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.scalar_type() == at::kLong && cu_seqlens.is_contiguous() && cu_seqlens.numel() >= 2,
              "tile_attention_packed: cu_seqlens must be int64 (sequences + 1)");
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t S = cu_seqlens.numel() - 1;
  TORCH_CHECK(cu[0] == 0 && cu[S] == s.Lq, "tile_attention_packed: cu_seqlens must run from 0 to the token count");
  int64_t longest = 1;
  for (int64_t i = 0; i < S; ++i) {
    TORCH_CHECK(cu[i + 1] >= cu[i], "tile_attention_packed: cu_seqlens must not decrease");
    longest = std::max(longest, cu[i + 1] - cu[i]);
  }
  TORCH_CHECK(longest <= MAX_KEYS, "tile_attention_packed: sequences of 1 to 1024 tokens");
  s.scale = static_cast<float>(scale);
  const float* bias = nullptr;
  if (key_bias.has_value() && key_bias->defined()) {
    TORCH_CHECK(key_bias->dim() == 1 && key_bias->scalar_type() == at::kFloat && key_bias->is_contiguous() && key_bias->size(0) == s.Lq,
                "tile_attention_packed: key_bias must be contiguous float32 (tokens,)");
    bias = key_bias->data_ptr<float>();
  }
  for (int i = 0; i < 3; ++i) s.ms[i] = 0;  // the bias is one row of keys shared by every query and head
  at::Tensor out = at::empty({1, s.Lq, s.H, s.D}, q.options());
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  run_tasks(S * s.H, longest, s, [&](int64_t sh, auto& kpack, auto& vpack, auto& scores, auto& probs, auto& acc, auto& qtail) {
    const int64_t i = sh / s.H;
    if (cu[i + 1] > cu[i])
      attend(qp, kp, vp, bias ? bias + cu[i] : nullptr, nullptr, op, s, 0, sh % s.H, cu[i], cu[i + 1] - cu[i], kpack, vpack, scores, probs, acc, qtail);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(slimformer, m) {
  m.def("tile_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("tile_attention_packed(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, Tensor? key_bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(slimformer, CPU, m) {
  m.impl("tile_attention", &tile_attention);
  m.impl("tile_attention_packed", &tile_attention_packed);
}
