// Decode attention straight from the paged KV cache (CPU).
//
// One query token per sequence; the query heads sharing a KV head (the GQA group) are handled
// together, so each key and value row is read from the cache once, in place: no gathered copy
// of the context, which at batch 64 cost as much as the attention itself. Per block of the
// block table: the group's scores for the block's tokens, one online-softmax rescale, then the
// weighted values. Accumulation is in fp32 whatever the cache dtype.
#include "heron_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// The running maximum before any score: finite, so that the build may assume finite math
// (-ffast-math, which lets the compiler vectorize the exp and dot-product loops).
constexpr float kNoScore = -1e30f;

// A row of the cache (or the query) as fp32. bf16 is the top half of an fp32: a shift the
// compiler vectorizes (c10's conversion operator it does not).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void load_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

// kDim > 0: the head dimension as a compile-time constant (the common ones), which lets the
// compiler unroll the per-row loops without remainder code; 0: read from ``head_dim``.
template <typename T, int64_t kDim>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                   const int64_t* lens, const int64_t* visible, T* out, int64_t batch,
                   int64_t kv_heads, int64_t group, int64_t head_dim, int64_t width,
                   int64_t block_size, float scale) {
  const int64_t dim = kDim > 0 ? kDim : head_dim;
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores(group * block_size);
    std::vector<float> row_max(group), row_sum(group), kf(dim), vf(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, h = task % kv_heads;
      const int64_t len = lens[b];
      // A draft-tree row sees slots from `from` on only where its bit is set (its ancestors
      // and itself); other rows see every slot below len.
      const int64_t from = visible != nullptr ? visible[2 * b] : len;
      const uint64_t bits = visible != nullptr ? static_cast<uint64_t>(visible[2 * b + 1]) : 0;
      const T* qp = q + (b * kv_heads + h) * group * dim;
      load_row(qp, qf.data(), group * dim);
      for (int64_t i = 0; i < group * dim; ++i) qf[i] *= scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), kNoScore);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      for (int64_t blk = 0; blk * block_size < len && blk < width; ++blk) {
        const int64_t base = tables[b * width + blk] * block_size;
        const int64_t n = std::min(block_size, len - blk * block_size);
        if ((blk + 1) * block_size < len && blk + 1 < width) {
          // The blocks of a table lie anywhere in the cache: ask for the next one's rows now,
          // so that their loads overlap this block's arithmetic.
          const int64_t next = tables[b * width + blk + 1] * block_size;
          for (int64_t t = 0; t < block_size; ++t) {
            const int64_t row = ((next + t) * kv_heads + h) * dim;
            for (int64_t off = 0; off < dim; off += 64 / static_cast<int64_t>(sizeof(T))) {
              __builtin_prefetch(k_cache + row + off);
              __builtin_prefetch(v_cache + row + off);
            }
          }
        }
        for (int64_t t = 0; t < n; ++t) {
          const T* kp = k_cache + ((base + t) * kv_heads + h) * dim;
          load_row(kp, kf.data(), dim);
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < dim; ++d) s += qg[d] * kf[d];
            scores[g * block_size + t] = s;
          }
        }
        for (int64_t t = std::max<int64_t>(0, from - blk * block_size); t < n; ++t) {
          const int64_t j = blk * block_size + t - from;
          if (j < 64 && ((bits >> j) & 1u)) continue;
          for (int64_t g = 0; g < group; ++g) scores[g * block_size + t] = kNoScore;
        }
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * block_size;
          float m = row_max[g];
          for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
          const float correction = std::exp(row_max[g] - m);
          row_max[g] = m;
          row_sum[g] *= correction;
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] *= correction;
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t t = 0; t < n; ++t) {
            sg[t] = std::exp(sg[t] - m);
            total += sg[t];
          }
          row_sum[g] += total;
        }
        for (int64_t t = 0; t < n; ++t) {
          const T* vp = v_cache + ((base + t) * kv_heads + h) * dim;
          load_row(vp, vf.data(), dim);
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * block_size + t];
            float* ag = acc.data() + g * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) ag[d] += p * vf[d];
          }
        }
      }
      T* op = out + (b * kv_heads + h) * group * dim;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = row_sum[g] > 0.f ? 1.f / row_sum[g] : 0.f;
        for (int64_t d = 0; d < dim; ++d) op[g * dim + d] = static_cast<T>(acc[g * dim + d] * inv);
      }
    }
  });
}

}  // namespace

// q: [B, Hkv, G, D]; k_cache, v_cache: [slots, Hkv, D]; tables: [B, W] int64 block ids;
// lens: [B] int64 tokens in the cache per sequence (slots < len are attended); visible:
// optional [B, 2] int64 (from, bits): slot from + j (j < 64) is attended only where bit j of
// bits is set (a draft tree's row: its ancestors). Returns [B, Hkv, G, D] in q's dtype.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens,
                           std::optional<torch::Tensor> visible, int64_t block_size,
                           double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and the caches must share a dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong,
              "paged_decode: tables and lens must be int64");
  q = q.contiguous();
  k_cache = k_cache.contiguous();
  v_cache = v_cache.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t* vis = nullptr;
  if (visible.has_value()) {
    TORCH_CHECK(visible->scalar_type() == at::kLong && visible->dim() == 2 &&
                    visible->size(0) == q.size(0) && visible->size(1) == 2,
                "paged_decode: visible must be [B, 2] int64");
    visible = visible->contiguous();
    vis = visible->data_ptr<int64_t>();
  }
  const int64_t batch = q.size(0), kv_heads = q.size(1), group = q.size(2), dim = q.size(3);
  TORCH_CHECK(k_cache.size(1) == kv_heads && k_cache.size(2) == dim, "paged_decode: head shape");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto head_dim) {
      decode_kernel<scalar_t, decltype(head_dim)::value>(
          q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
          tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), vis, out.data_ptr<scalar_t>(),
          batch, kv_heads, group, dim, tables.size(1), block_size, static_cast<float>(scale));
    };
    switch (dim) {
      case 64: run(std::integral_constant<int64_t, 64>{}); break;
      case 128: run(std::integral_constant<int64_t, 128>{}); break;
      case 256: run(std::integral_constant<int64_t, 256>{}); break;
      default: run(std::integral_constant<int64_t, 0>{});
    }
  });
  return out;
}
