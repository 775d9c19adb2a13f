// bf16 products of a decode step's few rows (PackedLinear up to its gemv_rows rows; a tied LM
// head reads the embedding's own weight).
//
// At batch 1 a bf16 step reads every weight once (SmolLM2-135M: 270 MB), so its speed is the
// speed at which the products stream their weights. oneDNN's packed GEMM (what PackedLinear
// calls for many rows) streams them well below the memory's speed at one row; this kernel
// reads the plain [out, in] weight, eight rows ahead in L2 (heron_simd::prefetch_l2), close
// to it. Each weight vector meets up to four activation rows (vdpbf16ps: 32 products
// per instruction, fp32 sums), so a few-row speculative verify step reads the weight once as
// well. Each output is one activation row's dot product with one weight row, summed in the
// same order whatever the number of rows: a row's result does not depend on the other rows
// of the call (oneDNN's does), so speculative decoding's verify rows give plain decoding's
// very tokens in bf16 too.
#include "heron_kernels.h"

#include <ATen/native/CPUBlas.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
#define HERON_BF16_GEMV 1
#include "simd.h"
#else
#define HERON_BF16_GEMV 0
#endif

bool bf16_gemv_supported() { return HERON_BF16_GEMV; }

// Rows up to which bf16_gemv beats oneDNN's packed GEMM: without AMX its lead shrinks as rows
// grow (every row past the fourth reads the weight again) and is gone past 64; prefill
// chunks and bigger batches stay with oneDNN. With AMX, oneDNN's many-row products are
// several times faster (tile multiplies): there the kernel takes 16 rows at most (a guess,
// not tuned on an AMX CPU).
int64_t bf16_gemv_max_rows() { return at::native::cpublas::could_pack(at::kBFloat16) ? 16 : 64; }

namespace {

#if HERON_BF16_GEMV
constexpr int64_t kRows = 4;    // weight rows per pass: four dot products share each x load
constexpr int64_t kXRows = 4;   // activation rows per pass over a block of weight rows
constexpr int64_t kAhead = 8;   // prefetch distance, in weight rows

inline __m512bh load32(const uint16_t* p, __mmask32 mask, bool partial) {
  return (__m512bh)(partial ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p));
}

// Lanes i of the result = the sum of v[i]'s 16 lanes, i < 4.
inline __m128 sum_lanes4(const __m512* v) {
  __m256 h[4];
  HERON_UNROLL for (int i = 0; i < 4; ++i) {
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
  }
  // Within each 128-bit half: [sum of v0's four, v1's, v2's, v3's]; then the halves added.
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// Output columns [n, n + Rows) of y = x w^T (+ bias) for activation rows [m0, m0 + XRows):
// both constants, every loop over the accumulators unrolled (HERON_UNROLL), so they stay in
// registers. Every pass asks for the weight rows kAhead on into L2 (the first fetches them,
// the others find them there or on their way): so memory keeps streaming while the block's
// later passes compute from L1 (prefetching in the first pass only was slower).
template <int64_t Rows, int64_t XRows>
void bf16_pass(const uint16_t* x, const uint16_t* w, const float* bias, at::BFloat16* y,
               int64_t m0, int64_t K, int64_t N, int64_t n) {
  const uint16_t* w0 = w + n * K;
  const uint16_t* ahead = w0 + kAhead * K;
  const uint16_t* end = w + N * K;
  __m512 acc[XRows][Rows];
  HERON_UNROLL for (int64_t i = 0; i < XRows; ++i) {
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) acc[i][r] = _mm512_setzero_ps();
  }
  // One step of 32 inputs; `mask` only on the last, partial one (a masked load costs here).
  const auto step = [&](int64_t k, __mmask32 mask, bool partial) {
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
      if (ahead + r * K + k < end) heron_simd::prefetch_l2(ahead + r * K + k);
    }
    __m512bh wv[Rows];
    HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) wv[r] = load32(w0 + r * K + k, mask, partial);
    HERON_UNROLL for (int64_t i = 0; i < XRows; ++i) {
      const __m512bh xv = load32(x + (m0 + i) * K + k, mask, partial);
      HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
        acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, wv[r]);
      }
    }
  };
  const int64_t full = K / 32 * 32;
  for (int64_t k = 0; k < full; k += 32) step(k, 0, false);
  if (full < K) step(full, (1u << (K - full)) - 1, true);
  HERON_UNROLL for (int64_t i = 0; i < XRows; ++i) {
    at::BFloat16* out = y + (m0 + i) * N + n;
    if constexpr (Rows == 4) {
      __m128 sums = sum_lanes4(acc[i]);
      if (bias) sums = _mm_add_ps(sums, _mm_loadu_ps(bias + n));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out), (__m128i)_mm_cvtneps_pbh(sums));
    } else {
      HERON_UNROLL for (int64_t r = 0; r < Rows; ++r) {
        const float sum = _mm512_reduce_add_ps(acc[i][r]);
        out[r] = at::BFloat16(bias ? sum + bias[n + r] : sum);
      }
    }
  }
}

#endif

}  // namespace

torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor weight,
                        std::optional<torch::Tensor> bias) {
#if HERON_BF16_GEMV
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 &&
                  weight.is_contiguous(),
              "bf16_gemv: weight must be contiguous bf16 [out, in]");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.size(1) == weight.size(1),
              "bf16_gemv: x must be bf16 [rows, in_features]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const torch::Tensor xc = x.contiguous();
  torch::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bf16_gemv: one bias per output");
    bf = bias->to(at::kFloat).contiguous();
  }
  torch::Tensor y = torch::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const float* bp = bias.has_value() ? bf.data_ptr<float>() : nullptr;
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  heron_simd::parallel_column_blocks<kRows>(N, [&](auto rows, int64_t n) {
    heron_simd::for_row_blocks<kXRows>(M, [&](auto xrows, int64_t m0) {
      bf16_pass<rows.value, xrows.value>(xp, wp, bp, yp, m0, K, N, n);
    });
  });
  return y;
#else
  TORCH_CHECK(false, "bf16_gemv: built without AVX512_BF16");
#endif
}
