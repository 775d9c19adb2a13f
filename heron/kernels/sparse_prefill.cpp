// Block-sparse causal attention for a prefill chunk (CPU, bf16, AMX).
//
// Each (query head, query block) row attends only to the key blocks its pattern kept, given
// as a CSR list, and reads them where they are: the keys and values of the whole context are
// packed once per call into the VNNI layout AMX multiplies ([D/2, B, 2] for K^T, [B/2, D, 2]
// for V), then every row runs a flash-attention loop over its kept blocks: S = Q K^T and
// O += P V through oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the one
// PyTorch's own CPU flash attention uses), an online softmax in between. No gathered copy of
// the kept blocks, no per-count batching, no separate causal call for the diagonal block and
// no log-sum-exp merge: the PyTorch path (heron/sparse/attention.py) needed all four.
#include "heron_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The kernel needs AVX-512 with bf16 conversions at build time and AMX at run time (brgemm's
// bf16 VNNI path); elsewhere heron keeps the PyTorch path.
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HERON_SPARSE_PREFILL 1
#else
#define HERON_SPARSE_PREFILL 0
#endif

#if HERON_SPARSE_PREFILL
#include <immintrin.h>

namespace {

using bf16 = c10::BFloat16;

// The running maximum before any score: finite, as the build assumes finite math.
constexpr float kNoScore = -1e30f;

// Lanes [0, n) of a 16-lane vector (all for n >= 16).
inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// exp(x) for x <= 0 (scores minus their running maximum): 2^(x log2 e) split into an integer
// power (scalef) and 2^f, |f| <= 1/2, by its degree-6 Taylor polynomial (relative error
// ~1e-7). libmvec's exp took more time than the two matrix products of a block together.
inline __m512 exp_neg(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)),
                                 _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.540353e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550411e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline bf16 to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bf16(static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16),
              bf16::from_bits());
}

// The context's keys and values in VNNI layout, one [block x D] tile per (KV head, key block);
// only the blocks some row keeps are packed.
void pack_context(const bf16* k, const bf16* v, int64_t k_stride0, int64_t k_stride1,
                  int64_t v_stride0, int64_t v_stride1, int64_t ctx,
                  int64_t kv_heads, int64_t nkb, int64_t block, int64_t dim,
                  const std::vector<char>& used, bf16* kp, bf16* vp) {
  const int64_t tile = block * dim;
  at::parallel_for(0, kv_heads * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (!used[t]) continue;
      const int64_t g = t / nkb, kb = t % nkb;
      bf16* kt = kp + t * tile;  // [D/2, block, 2]
      bf16* vt = vp + t * tile;  // [block/2, D, 2]
      for (int64_t j = 0; j < block; ++j) {
        const int64_t pos = kb * block + j;
        if (pos < ctx) {
          const bf16* kr = k + pos * k_stride0 + g * k_stride1;
          const bf16* vr = v + pos * v_stride0 + g * v_stride1;
          for (int64_t d = 0; d < dim; ++d) kt[(d / 2) * block * 2 + j * 2 + d % 2] = kr[d];
          bf16* vrow = vt + (j / 2) * dim * 2 + j % 2;
          for (int64_t d = 0; d < dim; ++d) vrow[d * 2] = vr[d];
        } else {  // past the context: zeros (the causal mask hides these keys)
          for (int64_t d = 0; d < dim; ++d) kt[(d / 2) * block * 2 + j * 2 + d % 2] = bf16(0.f);
          bf16* vrow = vt + (j / 2) * dim * 2 + j % 2;
          for (int64_t d = 0; d < dim; ++d) vrow[d * 2] = bf16(0.f);
        }
      }
    }
  });
}

}  // namespace
#endif

bool sparse_prefill_supported() {
  return HERON_SPARSE_PREFILL && at::native::cpublas::could_pack(at::kBFloat16);
}

torch::Tensor sparse_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             torch::Tensor row_ptr, torch::Tensor cols,
                             int64_t q_start, int64_t block, double scale) {
  TORCH_CHECK(sparse_prefill_supported(), "sparse_prefill: needs AVX-512 bf16 and AMX");
#if HERON_SPARSE_PREFILL
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "sparse_prefill: q/k/v are 3-D");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "sparse_prefill: bf16 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "sparse_prefill: the head dimension must be contiguous");
  TORCH_CHECK(block % 16 == 0 && q.size(2) % 2 == 0,
              "sparse_prefill: the block must be a multiple of 16 and the head dim even");
  row_ptr = row_ptr.contiguous();
  cols = cols.contiguous();
  const int64_t q_len = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(1), group = heads / kv_heads;
  const int64_t ctx = k.size(0);
  TORCH_CHECK(ctx == q_start + q_len, "sparse_prefill: the context must end with the chunk");
  const int64_t qb0 = q_start / block;
  const int64_t nqb = (q_start + q_len - 1) / block - qb0 + 1;
  const int64_t nkb = (ctx + block - 1) / block;
  TORCH_CHECK(row_ptr.size(0) == heads * nqb + 1, "sparse_prefill: row_ptr has H * nQB + 1");
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t* cp = cols.data_ptr<int64_t>();

  std::vector<char> used(kv_heads * nkb, 0);
  for (int64_t r = 0; r < heads * nqb; ++r) {
    const int64_t g = (r / nqb) / group;
    TORCH_CHECK(rp[r + 1] > rp[r], "sparse_prefill: every row keeps its diagonal block");
    for (int64_t i = rp[r]; i < rp[r + 1]; ++i) {
      TORCH_CHECK(cp[i] >= 0 && cp[i] <= qb0 + r % nqb, "sparse_prefill: a non-causal block");
      used[g * nkb + cp[i]] = 1;
    }
  }
  const int64_t tile = block * dim;
  auto kp = torch::empty({kv_heads * nkb * tile}, q.options());
  auto vp = torch::empty({kv_heads * nkb * tile}, q.options());
  pack_context(k.data_ptr<bf16>(), v.data_ptr<bf16>(), k.stride(0), k.stride(1), v.stride(0),
               v.stride(1), ctx, kv_heads, nkb, block, dim, used,
               kp.data_ptr<bf16>(), vp.data_ptr<bf16>());

  auto out = torch::empty({q_len, heads, dim}, q.options());
  const bf16* qd = q.data_ptr<bf16>();
  const bf16* kpd = kp.data_ptr<bf16>();
  const bf16* vpd = vp.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, heads * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(block * block), acc(block * dim), row_max(block), row_sum(block);
    std::vector<bf16> p(block * block);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r / nqb, qb = qb0 + r % nqb, g = h / group;
      const int64_t first = std::max(q_start, qb * block);  // positions of this row's queries
      const int64_t last = std::min(ctx, (qb + 1) * block);
      const int64_t m = last - first;
      const bf16* qr = qd + (first - q_start) * qs0 + h * qs1;
      std::fill(row_max.begin(), row_max.begin() + m, kNoScore);
      std::fill(row_sum.begin(), row_sum.begin() + m, 0.f);
      bool started = false;
      for (int64_t i = rp[r]; i < rp[r + 1]; ++i) {
        const int64_t kb = cp[i];
        const int64_t t = g * nkb + kb;
        at::native::cpublas::brgemm(m, block, dim, qs0, block, block, false, qr,
                                    kpd + t * tile, s.data(), true);
        for (int64_t a = 0; a < m; ++a) {
          // Keys up to the query's own position: the whole block below the diagonal.
          const int64_t valid = std::min(block, first + a - kb * block + 1);
          float* sa = s.data() + a * block;
          __m512 vmax = _mm512_set1_ps(kNoScore);
          for (int64_t j = 0; j < valid; j += 16) {
            const __mmask16 live = tail_mask(valid - j);
            vmax = _mm512_mask_max_ps(vmax, live, vmax, _mm512_maskz_loadu_ps(live, sa + j));
          }
          const float new_max = std::max(row_max[a], _mm512_reduce_max_ps(vmax) * sc);
          const float alpha = std::exp(row_max[a] - new_max);
          const __m512 vsc = _mm512_set1_ps(sc), vneg = _mm512_set1_ps(-new_max);
          __m512 vsum = _mm512_setzero_ps();
          for (int64_t j = 0; j < block; j += 16) {
            const __mmask16 live = j < valid ? tail_mask(valid - j) : 0;
            const __m512 x = _mm512_fmadd_ps(_mm512_loadu_ps(sa + j), vsc, vneg);
            const __m512 e = _mm512_maskz_mov_ps(live, exp_neg(x));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.data() + a * block + j),
                                (__m256i)_mm512_cvtneps_pbh(e));
          }
          row_sum[a] = row_sum[a] * alpha + _mm512_reduce_add_ps(vsum);
          row_max[a] = new_max;
          if (started) {
            float* oa = acc.data() + a * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) oa[d] *= alpha;
          }
        }
        at::native::cpublas::brgemm(m, dim, block, block, dim, dim, started, p.data(),
                                    vpd + t * tile, acc.data(), true);
        started = true;
      }
      for (int64_t a = 0; a < m; ++a) {
        const float inv = 1.f / row_sum[a];
        const float* oa = acc.data() + a * dim;
        bf16* dst = od + (first - q_start + a) * heads * dim + h * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = to_bf16(oa[d] * inv);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
  return out;
#else
  return {};
#endif
}
