// SIMD helpers shared by heron's kernels: an AVX-512 set (16 lanes) and an AVX2 + FMA set (8
// lanes, for CPUs without AVX-512 such as AMD Zen 3); each exists only where the build's
// -march=native has its instructions.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace heron_simd {

// Asks for the cache line holding p into L2 (prefetcht1), not L1 (prefetcht0), ahead of its
// use by a kernel that streams from memory: every streaming kernel, AVX-512 and AVX2 builds
// alike, ran faster this way. Lines asked into L1 early seem to crowd out the ones in use.
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// Put before every loop over a register-blocked kernel's accumulator array (its set-up, its
// inner products, its stores): the loops are then unrolled whole and the array lives in
// registers only. GCC 12 otherwise keeps the array on the stack as well and stores all of it
// on every step where it holds more than 8 vectors or a loop over it stays rolled (a
// horizontal sum per element, say): the prefill block kernel's 4 x 4 tile stored all 16
// accumulators per 16 vdpbf16ps, and so did the int8 GEMV's 4 x 4 passes. (int4_group_pass,
// two arrays of at most 8 vectors with short loops, compiles to registers without it.)
#define HERON_UNROLL _Pragma("GCC unroll 16")

// A register-blocked kernel's block sizes are template constants (HERON_UNROLL above); these
// turn run-time counts into them. ``pass(std::integral_constant<int64_t, R>{}, m0)`` for the
// rows [m0, m0 + R) of M: blocks of kMax rows, then the R < kMax that remain.
template <int64_t R, typename Pass>
inline void with_rows(int64_t rows, int64_t m0, Pass& pass) {
  if constexpr (R > 1) {
    if (rows < R) return with_rows<R - 1>(rows, m0, pass);
  }
  pass(std::integral_constant<int64_t, R>{}, m0);
}

template <int64_t kMax, typename Pass>
inline void for_row_blocks(int64_t M, Pass&& pass) {
  for (int64_t m0 = 0; m0 < M; m0 += kMax) with_rows<kMax>(std::min(kMax, M - m0), m0, pass);
}

// ``block(std::integral_constant<int64_t, R>{}, n)`` for the output columns [n, n + R) of N on
// all threads: blocks of kMax columns, a last partial block one column at a time (R = 1).
template <int64_t kMax, typename Block>
inline void parallel_column_blocks(int64_t N, Block&& block) {
  at::parallel_for(0, (N + kMax - 1) / kMax, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if ((b + 1) * kMax <= N) {
        block(std::integral_constant<int64_t, kMax>{}, b * kMax);
      } else {
        for (int64_t n = b * kMax; n < N; ++n) block(std::integral_constant<int64_t, 1>{}, n);
      }
    }
  });
}

// 2^f for |f| <= 1/2 by its degree-5 Taylor polynomial, highest degree first (Horner): the
// fractional part of exp2_neg and exp2_neg8.
constexpr float kExp2Taylor[6] = {1.333355e-3f, 9.618129e-3f, 5.550411e-2f,
                                  2.402265e-1f, 6.931472e-1f, 1.f};

#if defined(__AVX512F__)

// Lanes [0, n) of a 16-lane vector (all for n >= 16): the tail of a row not a multiple of 16.
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// 2^t for t <= 0 (scores minus their running maximum, in log2 units): an integer power
// (scalef, which also flushes very negative t to 0) times 2^f, |f| <= 1/2, by its degree-5
// Taylor polynomial (relative error < 3e-6, far below the bf16 rounding of the
// probabilities). libmvec's exp took more time than a block's two matrix products.
inline __m512 exp2_neg(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(kExp2Taylor[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Taylor[i]));
  return _mm512_scalef_ps(p, n);
}

// 16 elements as fp32 (bf16 is the top half of an fp32: a widening shift).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#if defined(__AVX512BW__) && defined(__AVX512VL__)
// 16 int8s as fp32 (exact); lanes cleared in `mask` read nothing and are 0.
inline __m512 load16(const int8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}
#endif
#endif  // __AVX512F__

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

inline float hmax8(__m256 v) {
  const __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}

// Lane t = the sum of v[t]'s 8 lanes: two rounds of pairwise adds within 128-bit halves give
// each vector's low-half and high-half sums side by side; one cross-half add finishes.
inline __m256 sum_lanes8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// exp2_neg with 8 lanes: no scalef here, so 2^n is built in the exponent field, with t
// clamped at -126 (a weight of 2^-126 instead of 0: callers mask the lanes that must be 0).
inline __m256 exp2_neg8(__m256 t) {
  t = _mm256_max_ps(t, _mm256_set1_ps(-126.f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(kExp2Taylor[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Taylor[i]));
  const __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}

// All-ones lanes where bit t of ``bits`` is set (t < 8).
inline __m256 lane_mask8(unsigned bits) {
  const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit);
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit));
}

// 8 elements as fp32 (bf16: the top halves, a widening shift).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#if defined(__F16C__)
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif
#endif  // __AVX2__ && __FMA__

}  // namespace heron_simd
