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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "simd.h"

// CPUs without AVX-512 but with AVX2 + FMA (e.g. AMD Zen 3) take decode_kernel_avx2.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define HERON_DECODE_AVX2 1
#else
#define HERON_DECODE_AVX2 0
#endif

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

// Whether a row with visibility (from, bits) sees slot ``pos`` (below its length): a draft-tree
// row laid out as a decode row sees the slots from ``from`` on only where their bit is set (its
// ancestors and itself); other rows pass from = their length and see every slot.
inline bool seen(int64_t pos, int64_t from, uint64_t bits) {
  const int64_t j = pos - from;
  return j < 0 || (j < 64 && ((bits >> j) & 1u));
}

// A sequence's blocks are attended in parts of this many tokens, one task per (part, KV head)
// or per part for all its KV heads, merged afterwards: at batch 1 SmolLM2's 3 KV heads ran on
// 2 threads as 2 + 1 heads, Gemma 3's single KV head on one thread. The parts depend only on
// the sequence's length, so its output does not depend on what else is in the batch.
constexpr int64_t kPartTokens = 256;

// The (sequence, first block to read, tokens) of every part, in sequence order. Parts lie on a
// grid of part_tokens() positions from slot 0; under a sliding window a sequence's parts
// begin with the one holding its first visible slot (lo).
struct Parts {
  std::vector<int64_t> seq, first, tokens, begin;  // begin[b]: sequence b's first part
  std::vector<int64_t> lo, grid0;  // per sequence: first visible slot, grid index of its first part
  int64_t blocks_per_part, block_size;

  int64_t part_tokens() const { return blocks_per_part * block_size; }
  int64_t count(int64_t b) const { return begin[b + 1] - begin[b]; }
};

// window > 0: a row of length len sees only slots len - window .. len - 1 (the query at slot
// len - 1 and the window - 1 before it: Gemma 3's local layers).
Parts decode_parts(const int64_t* lens, int64_t batch, int64_t width, int64_t block_size,
                   int64_t window) {
  Parts parts;
  parts.blocks_per_part = std::max<int64_t>(1, kPartTokens / block_size);
  parts.block_size = block_size;
  const int64_t part_tokens = parts.part_tokens();
  for (auto* v : {&parts.seq, &parts.first, &parts.tokens, &parts.begin, &parts.lo, &parts.grid0}) {
    v->reserve(batch + 1);
  }
  for (int64_t b = 0; b < batch; ++b) {
    parts.begin.push_back(static_cast<int64_t>(parts.seq.size()));
    const int64_t len = std::min(lens[b], width * block_size);
    const int64_t lo = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    parts.lo.push_back(lo);
    parts.grid0.push_back(lo / part_tokens);
    const int64_t start0 = lo / part_tokens * part_tokens;
    for (int64_t start = start0; start == start0 || start < len; start += part_tokens) {
      const int64_t from = std::max(start, lo);
      parts.seq.push_back(b);
      parts.first.push_back(from / block_size);
      parts.tokens.push_back(std::clamp<int64_t>(len - from, 0, part_tokens));
    }
  }
  parts.begin.push_back(static_cast<int64_t>(parts.seq.size()));
  return parts;
}

// A kernel's tasks, handed out largest first to whichever thread is free: a parallel_for's
// fixed ranges gave one thread a sequence's full parts and the other its short last ones.
// Which thread runs a task changes none of its arithmetic.
class TaskQueue {
 public:
  explicit TaskQueue(const std::vector<int64_t>& work) : order_(work.size()) {
    std::iota(order_.begin(), order_.end(), int64_t{0});
    std::sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) {
      return work[a] > work[b] || (work[a] == work[b] && a < b);
    });
  }

  // Runs ``worker`` on each thread (one call where there is a single task); it takes tasks
  // with next() until none are left, so per-thread buffers are set up once per call.
  template <typename F>
  void run(const F& worker) {
    const int64_t threads = std::min<int64_t>(at::get_num_threads(), order_.size());
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { worker(); });
  }

  bool next(int64_t& task) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= static_cast<int64_t>(order_.size())) return false;
    task = order_[i];
    return true;
  }

 private:
  std::vector<int64_t> order_;
  std::atomic<int64_t> next_{0};
};

// The work of the tasks of PartTask: (part, group of ``heads`` KV heads), in task order.
std::vector<int64_t> part_task_work(const Parts& parts, int64_t kv_heads, int64_t heads) {
  std::vector<int64_t> work;
  for (const int64_t tokens : parts.tokens) work.insert(work.end(), kv_heads / heads, tokens);
  return work;
}

// One task of a decode kernel: KV heads [h, h + heads) of part ``pi``, i.e. sequence b's
// blocks [first, end), and the row's visibility: slots from lo on, and ``seen``.
struct PartTask {
  int64_t pi, b, h, len, first, end, lo, from;
  uint64_t bits;

  PartTask(const Parts& parts, int64_t task, int64_t kv_heads, int64_t heads,
           const int64_t* lens, const int64_t* visible, int64_t width, int64_t block_size) {
    pi = task / (kv_heads / heads);
    b = parts.seq[pi];
    h = task % (kv_heads / heads) * heads;
    len = lens[b];
    first = parts.first[pi];
    const int64_t bpp = parts.blocks_per_part;
    end = std::min({width, (len + block_size - 1) / block_size, (first / bpp + 1) * bpp});
    lo = parts.lo[b];
    from = visible != nullptr ? visible[2 * b] : len;
    bits = visible != nullptr ? static_cast<uint64_t>(visible[2 * b + 1]) : 0;
  }
};

// The blocks of a table lie anywhere in the cache: a kernel asks for the next block's rows
// (of heads [h, h + heads), from cache row ``base`` on) while it computes on the current one.
template <typename T>
inline void prefetch_block(const T* k_cache, const T* v_cache, int64_t base, int64_t block_size,
                           int64_t kv_heads, int64_t h, int64_t heads, int64_t dim) {
  for (int64_t t = 0; t < block_size; ++t) {
    const int64_t row = ((base + t) * kv_heads + h) * dim;
    for (int64_t off = 0; off < heads * dim; off += 64 / static_cast<int64_t>(sizeof(T))) {
      heron_simd::prefetch_l2(k_cache + row + off);
      heron_simd::prefetch_l2(v_cache + row + off);
    }
  }
}

// Where a task leaves a query's sums over a part: its unnormalised sums and softmax statistics
// in ``partial`` (fp32, [parts, Hkv, G, D + 2]) for merge_parts, or, for a sequence of one
// part, the finished output row (the bits merge_parts would give it: a lone part weighs
// exactly 1), which spares short contexts the merge.
template <typename T>
struct PartSink {
  const Parts& parts;
  float* partial;  // null where every sequence has one part
  T* out;          // [B, Hkv, G, D]
  int64_t kv_heads, group, dim;

  // sums: fp32 [D] of query hg (= KV head * G + g) over part pi; row_max in natural-log units.
  void put(int64_t pi, int64_t hg, const float* sums, float row_max, float row_sum) const {
    const int64_t b = parts.seq[pi];
    if (parts.count(b) == 1) {
      const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;
      T* op = out + (b * kv_heads * group + hg) * dim;
      for (int64_t d = 0; d < dim; ++d) op[d] = static_cast<T>(sums[d] * inv);
      return;
    }
    float* dst = partial + (pi * kv_heads * group + hg) * (dim + 2);
    std::copy(sums, sums + dim, dst);
    dst[dim] = row_max;
    dst[dim + 1] = row_sum;
  }
};

// kDim > 0: the head dimension as a compile-time constant (the common ones), which lets the
// compiler unroll the per-row loops without remainder code; 0: read from ``head_dim``.
// Each task is a (part, KV head).
template <typename T, int64_t kDim>
void decode_kernel(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                   const int64_t* lens, const int64_t* visible, const Parts& parts,
                   const PartSink<T>& sink, int64_t kv_heads, int64_t group, int64_t head_dim,
                   int64_t width, int64_t block_size, float scale) {
  const int64_t dim = kDim > 0 ? kDim : head_dim;
  TaskQueue queue(part_task_work(parts, kv_heads, 1));
  queue.run([&] {
    std::vector<float> qf(group * dim), acc(group * dim), scores(group * block_size);
    std::vector<float> row_max(group), row_sum(group), kf(dim), vf(dim);
    for (int64_t task; queue.next(task);) {
      const PartTask pt(parts, task, kv_heads, 1, lens, visible, width, block_size);
      const int64_t b = pt.b, h = pt.h, len = pt.len, from = pt.from;
      const uint64_t bits = pt.bits;
      const T* qp = q + (b * kv_heads + h) * group * dim;
      load_row(qp, qf.data(), group * dim);
      for (int64_t i = 0; i < group * dim; ++i) qf[i] *= scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(row_max.begin(), row_max.end(), kNoScore);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      for (int64_t blk = pt.first; blk < pt.end; ++blk) {
        const int64_t base = tables[b * width + blk] * block_size;
        const int64_t n = std::min(block_size, len - blk * block_size);
        const int64_t t0 = std::max<int64_t>(0, pt.lo - blk * block_size);  // below: unseen
        if (blk + 1 < pt.end) {
          prefetch_block(k_cache, v_cache, tables[b * width + blk + 1] * block_size, block_size,
                         kv_heads, h, 1, dim);
        }
        for (int64_t t = t0; t < n; ++t) {
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
        for (int64_t t = std::max(t0, from - blk * block_size); t < n; ++t) {
          if (seen(blk * block_size + t, from, bits)) continue;
          for (int64_t g = 0; g < group; ++g) scores[g * block_size + t] = kNoScore;
        }
        for (int64_t g = 0; g < group; ++g) {
          float* sg = scores.data() + g * block_size;
          float m = row_max[g];
          for (int64_t t = t0; t < n; ++t) m = std::max(m, sg[t]);
          const float correction = std::exp(row_max[g] - m);
          row_max[g] = m;
          row_sum[g] *= correction;
          float* ag = acc.data() + g * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) ag[d] *= correction;
          float total = 0.f;
#pragma omp simd reduction(+ : total)
          for (int64_t t = t0; t < n; ++t) {
            sg[t] = std::exp(sg[t] - m);
            total += sg[t];
          }
          row_sum[g] += total;
        }
        for (int64_t t = t0; t < n; ++t) {
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
      for (int64_t g = 0; g < group; ++g) {
        sink.put(pt.pi, h * group + g, acc.data() + g * dim, row_max[g], row_sum[g]);
      }
    }
  });
}

// The output [B, Hkv, G, D] of the sequences of several parts from the kernels' ``partial``:
// one softmax over all parts of a sequence, each part's sums rescaled from its own running
// maximum to the sequence's.
template <typename T>
void merge_parts(const float* partial, const Parts& parts, T* out, int64_t batch,
                 int64_t kv_heads, int64_t group, int64_t dim) {
  at::parallel_for(0, batch * kv_heads * group, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(dim);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (kv_heads * group), hg = row % (kv_heads * group);
      if (parts.count(b) == 1) continue;  // finished by its task
      const auto part = [&](int64_t i) {
        return partial + (i * kv_heads * group + hg) * (dim + 2);
      };
      float m = kNoScore;
      for (int64_t i = parts.begin[b]; i < parts.begin[b + 1]; ++i) m = std::max(m, part(i)[dim]);
      float total = 0.f;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = parts.begin[b]; i < parts.begin[b + 1]; ++i) {
        const float* p = part(i);
        const float w = p[dim + 1] > 0.f ? std::exp(p[dim] - m) : 0.f;
        total += w * p[dim + 1];
        for (int64_t d = 0; d < dim; ++d) acc[d] += w * p[d];
      }
      const float inv = total > 0.f ? 1.f / total : 0.f;
      T* op = out + row * dim;
      for (int64_t d = 0; d < dim; ++d) op[d] = static_cast<T>(acc[d] * inv);
    }
  });
}

// The vector kernels' key scores: a query's kN vectors times a key's, as lanes of partial
// sums, in kSums independent FMA chains added at the end: one chain of kN dependent FMAs
// waits on each FMA's latency.
#if HERON_DECODE_AVX2
inline __m256 vec_mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 vec_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 vec_fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
#elif defined(__AVX512F__)
inline __m512 vec_mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 vec_add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 vec_fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
#endif
#if HERON_DECODE_AVX2 || defined(__AVX512F__)
template <int kN, int kSums, typename V>
inline V dot_lanes(const V* q, const V* k) {
  V sums[kSums];
  for (int c = 0; c < kSums; ++c) sums[c] = vec_mul(q[c], k[c]);
  for (int c = kSums; c < kN; c += kSums) {  // in steps of kSums, which GCC unrolls
    for (int j = 0; j < kSums; ++j) sums[j] = vec_fmadd(q[c + j], k[c + j], sums[j]);
  }
  for (int c = kSums / 2; c > 0; c /= 2) {
    for (int j = 0; j < c; ++j) sums[j] = vec_add(sums[j], sums[j + c]);
  }
  return sums[0];
}
#endif

#if HERON_DECODE_AVX2
// decode_kernel with AVX2 intrinsics for head dims of 16 * kPairs, in the same parts (so the
// same merge and the same batch invariance). The portable kernel spends ~140 instructions per
// key and KV head at SmolLM2's shape: a horizontal sum per key and query, the accumulators in
// memory, scalar exps. Here, as in the AVX-512 kernel: 8 keys at a time, their dot products
// kept as 8-lane partial sums and reduced together (sum_lanes8), the online softmax on 8
// scores at once with a polynomial exp2, and each query's accumulators in registers across
// the 8 weighted values. Where there are parts enough to keep every thread busy, a task takes
// all KV heads of its part: the rows of one cached token's heads lie side by side, and reading
// all of them at once streams memory that one head's task reads at a stride of kv_heads rows.

using heron_simd::exp2_neg8;
using heron_simd::hmax8;
using heron_simd::hsum8;
using heron_simd::lane_mask8;
using heron_simd::load8;
using heron_simd::sum_lanes8;

// 16 elements as two 8-lane fp32 vectors. bf16: one 32-byte load gives the even elements (a
// shift) and the odd ones (a mask), half the work of widening each half; the order does not
// matter to a dot product as long as the query is loaded the same way, and store_pair undoes it.
template <typename T>
inline void load_pair(const T* p, __m256& a, __m256& b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    a = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    b = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(-65536)));
  } else {
    a = load8(p);
    b = load8(p + 8);
  }
}

// The 16 fp32 values that load_pair's layout holds in a and b, in element order.
template <typename T>
inline void store_pair(float* out, __m256 a, __m256 b) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m256 lo = _mm256_unpacklo_ps(a, b), hi = _mm256_unpackhi_ps(a, b);
    a = _mm256_permute2f128_ps(lo, hi, 0x20);
    b = _mm256_permute2f128_ps(lo, hi, 0x31);
  }
  _mm256_storeu_ps(out, a);
  _mm256_storeu_ps(out + 8, b);
}

template <typename T, int kPairs>
void decode_kernel_avx2(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                        const int64_t* lens, const int64_t* visible, const Parts& parts,
                        const PartSink<T>& sink, int64_t kv_heads, int64_t group, int64_t width,
                        int64_t block_size, float scale) {
  constexpr int kVecs = 2 * kPairs;
  constexpr int64_t dim = 16 * kPairs;
  // The weighted values in tiles of up to 8 accumulators, to stay within 16 registers.
  constexpr int kTile = kVecs < 8 ? kVecs : 8;
  constexpr int kSums = kVecs >= 16 ? 4 : 2;  // dot_lanes' FMA chains
  const float sc2 = scale * 1.44269504f;  // scores in log2 units
  const int64_t num_parts = static_cast<int64_t>(parts.seq.size());
  // Which heads share a task changes no head's arithmetic (nor the batch invariance).
  const int64_t heads = num_parts >= 2 * at::get_num_threads() ? kv_heads : 1;
  const int64_t queries = heads * group;  // a task's queries, head by head
  TaskQueue queue(part_task_work(parts, kv_heads, heads));
  queue.run([&] {
    std::vector<__m256> qf(queries * kVecs), acc(queries * kVecs), part(queries * 8);
    std::vector<__m256> vf(8 * heads * kVecs);
    std::vector<float> probs(queries * 8), row_max(queries), row_sum(queries);
    for (int64_t task; queue.next(task);) {
      const PartTask pt(parts, task, kv_heads, heads, lens, visible, width, block_size);
      const int64_t b = pt.b, h = pt.h;
      const T* qp = q + (b * kv_heads + h) * group * dim;
      for (int64_t i = 0; i < queries * kPairs; ++i) {
        load_pair(qp + 16 * i, qf[2 * i], qf[2 * i + 1]);
        qf[2 * i] = _mm256_mul_ps(qf[2 * i], _mm256_set1_ps(sc2));
        qf[2 * i + 1] = _mm256_mul_ps(qf[2 * i + 1], _mm256_set1_ps(sc2));
      }
      std::fill(acc.begin(), acc.end(), _mm256_setzero_ps());
      std::fill(row_max.begin(), row_max.end(), kNoScore);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      for (int64_t blk = pt.first; blk < pt.end; ++blk) {
        const int64_t base = tables[b * width + blk] * block_size;
        const int64_t n = std::min(block_size, pt.len - blk * block_size);
        if (blk + 1 < pt.end) {
          prefetch_block(k_cache, v_cache, tables[b * width + blk + 1] * block_size, block_size,
                         kv_heads, h, heads, dim);
        }
        // From the 8 keys holding slot lo on (those below it unseen).
        const int64_t first_key = std::max<int64_t>(0, pt.lo - blk * block_size) / 8 * 8;
        for (int64_t t0 = first_key; t0 < n; t0 += 8) {
          const int64_t count = std::min<int64_t>(8, n - t0), p0 = blk * block_size + t0;
          const int64_t before = std::clamp<int64_t>(pt.lo - p0, 0, 8);
          unsigned live = ((1u << count) - 1) & ~((1u << before) - 1);
          for (int64_t t = std::max<int64_t>(0, pt.from - p0); t < count; ++t) {
            if (!seen(p0 + t, pt.from, pt.bits)) live &= ~(1u << t);
          }
          // Scores: each key's dot products with its head's queries, as 8-lane partial sums.
          for (int64_t t = 0; t < 8; ++t) {
            if (t >= count) {
              for (int64_t i = 0; i < queries; ++i) part[i * 8 + t] = _mm256_setzero_ps();
              continue;
            }
            for (int64_t hh = 0; hh < heads; ++hh) {
              const int64_t row = ((base + t0 + t) * kv_heads + h + hh) * dim;
              __m256 kv[kVecs];
              for (int i = 0; i < kPairs; ++i) {
                load_pair(k_cache + row + 16 * i, kv[2 * i], kv[2 * i + 1]);
              }
              for (int64_t i = hh * group; i < (hh + 1) * group; ++i) {
                part[i * 8 + t] = dot_lanes<kVecs, kSums>(&qf[i * kVecs], kv);
              }
              __m256* vt = &vf[(t * heads + hh) * kVecs];
              for (int i = 0; i < kPairs; ++i) {
                load_pair(v_cache + row + 16 * i, vt[2 * i], vt[2 * i + 1]);
              }
            }
          }
          // Online softmax over the 8 scores of each query; unseen keys weigh exactly 0.
          const __m256 mask = lane_mask8(live);
          for (int64_t i = 0; i < queries; ++i) {
            const __m256 si =
                _mm256_blendv_ps(_mm256_set1_ps(kNoScore), sum_lanes8(&part[i * 8]), mask);
            const float m = std::max(row_max[i], hmax8(si));
            const float alpha = exp2f(row_max[i] - m);
            const __m256 e = _mm256_and_ps(exp2_neg8(_mm256_sub_ps(si, _mm256_set1_ps(m))), mask);
            row_sum[i] = row_sum[i] * alpha + hsum8(e);
            row_max[i] = m;
            _mm256_storeu_ps(&probs[i * 8], e);
            const __m256 va = _mm256_set1_ps(alpha);
            for (int c = 0; c < kVecs; ++c) {
              acc[i * kVecs + c] = _mm256_mul_ps(acc[i * kVecs + c], va);
            }
          }
          // The weighted values.
          for (int64_t i = 0; i < queries; ++i) {
            const int64_t hh = i / group;
            for (int c0 = 0; c0 < kVecs; c0 += kTile) {
              __m256 a[kTile];
              for (int c = 0; c < kTile; ++c) a[c] = acc[i * kVecs + c0 + c];
              for (int64_t t = 0; t < count; ++t) {
                const __m256 p = _mm256_set1_ps(probs[i * 8 + t]);
                const __m256* vt = &vf[(t * heads + hh) * kVecs + c0];
                for (int c = 0; c < kTile; ++c) a[c] = _mm256_fmadd_ps(p, vt[c], a[c]);
              }
              for (int c = 0; c < kTile; ++c) acc[i * kVecs + c0 + c] = a[c];
            }
          }
        }
      }
      for (int64_t i = 0; i < queries; ++i) {
        float sums[dim];
        for (int j = 0; j < kPairs; ++j) {
          store_pair<T>(sums + 16 * j, acc[i * kVecs + 2 * j], acc[i * kVecs + 2 * j + 1]);
        }
        // merge_parts works in natural-log units
        sink.put(pt.pi, h * group + i, sums, row_max[i] * 0.69314718f, row_sum[i]);
      }
    }
  });
}
#endif

#if defined(__AVX512F__)
// The same attention with AVX-512 intrinsics, for head dims of 16 * kChunks: 16 keys at a
// time, each key's G dot products kept as 16-lane partial sums and reduced together (one
// transpose-and-add pass instead of a horizontal sum per key and query), the online softmax
// on 16 scores at once with a polynomial exp2 (the portable kernel's std::exp ran as scalar
// calls), the 16 values converted to fp32 once for all G queries, and the next 16 rows
// prefetched. In the same parts as the other kernels, and with all KV heads per task where
// parts alone keep the threads busy (see decode_kernel_avx2).

using heron_simd::exp2_neg;
using heron_simd::load16;

// Lane t = the sum of v[t]'s 16 lanes. Each round adds halves of pairs: 16 vectors of 16
// partial sums become 8 of 8, 4 of 4 (pairs of 128-bit lanes), 2 of 2 and 1 of 1, which holds
// v[i + 4 j] at lane 4 i + j; a permutation puts it back in order.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  }
  for (int i = 0; i < 2; ++i) {
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xDD));
  }
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88),
                                 _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, z);
}

// Consecutive rows that attend to one context: a draft tree's rows laid out as decode rows
// (the same block table and the same `from`, before their lengths). A task takes such a run
// of rows together, so each key and value is loaded and widened once for all their queries.
// A task is one part of a run (part: its index on the grid; the parts of all its rows), for one
// KV head or all of them.
struct RunPart {
  int64_t first, count, part, tokens;  // tokens: the most positions any of its rows sees in it
};

constexpr int64_t kMaxRun = 16;  // rows per run: bounds a task's per-query state

std::vector<RunPart> run_parts(const int64_t* tables, const int64_t* lens,
                               const int64_t* visible, const Parts& parts, int64_t batch,
                               int64_t width, int64_t kv_heads) {
  struct RowRun {
    int64_t first, count;
  };
  std::vector<RowRun> runs;
  for (int64_t b = 0; b < batch; ++b) {
    const bool tree = visible != nullptr && visible[2 * b] < lens[b];
    if (tree && !runs.empty()) {
      RowRun& run = runs.back();
      const int64_t a = run.first;
      if (run.count < kMaxRun && visible[2 * a] < lens[a] && visible[2 * a] == visible[2 * b] &&
          std::memcmp(tables + a * width, tables + b * width, width * sizeof(int64_t)) == 0) {
        ++run.count;
        continue;
      }
    }
    runs.push_back({b, 1});
  }
  // A run's parts: grid indices from its rows' first part to their last.
  const auto grid_range = [&](const RowRun& run) {
    int64_t lo = parts.grid0[run.first], hi = 0;
    for (int64_t b = run.first; b < run.first + run.count; ++b) {
      lo = std::min(lo, parts.grid0[b]);
      hi = std::max(hi, parts.grid0[b] + parts.count(b));
    }
    return std::pair{lo, hi};
  };
  // Keep both cores busy: a short tree's run at batch 1 is all the work there is.
  const int64_t wanted = 2 * at::get_num_threads();
  for (;;) {
    int64_t tasks = 0;
    for (const RowRun& run : runs) {
      const auto [lo, hi] = grid_range(run);
      tasks += (hi - lo) * kv_heads;
    }
    if (tasks >= wanted) break;
    auto largest = std::max_element(runs.begin(), runs.end(), [](const RowRun& x, const RowRun& y) {
      return x.count < y.count;
    });
    if (largest->count == 1) break;
    const RowRun second{largest->first + largest->count / 2, largest->count - largest->count / 2};
    largest->count /= 2;
    runs.insert(largest + 1, second);
  }
  std::vector<RunPart> out;
  for (const RowRun& run : runs) {
    const auto [lo, hi] = grid_range(run);
    for (int64_t p = lo; p < hi; ++p) {
      int64_t tokens = 0;
      for (int64_t b = run.first; b < run.first + run.count; ++b) {
        const int64_t i = p - parts.grid0[b];
        if (i >= 0 && i < parts.count(b)) {
          tokens = std::max(tokens, parts.tokens[parts.begin[b] + i]);
        }
      }
      out.push_back({run.first, run.count, p, tokens});
    }
  }
  return out;
}

template <typename T, int kChunks>
void decode_kernel_avx512(const T* q, const T* k_cache, const T* v_cache, const int64_t* tables,
                          const int64_t* lens, const int64_t* visible, const Parts& parts,
                          const PartSink<T>& sink, int64_t batch, int64_t kv_heads, int64_t group,
                          int64_t width, int64_t block_size, float scale) {
  constexpr int64_t dim = 16 * kChunks;
  constexpr int kSums = kChunks >= 8 ? 2 : 1;  // dot_lanes' FMA chains
  const float sc2 = scale * 1.44269504f;  // scores in log2 units
  const std::vector<RunPart> tasks =
      run_parts(tables, lens, visible, parts, batch, width, kv_heads);
  const int64_t part_tokens = parts.part_tokens();
  // Which heads share a task changes no head's arithmetic (nor the batch invariance).
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
  const int64_t heads = num_tasks >= 2 * at::get_num_threads() ? kv_heads : 1;
  int64_t most = 1;
  for (const RunPart& rp : tasks) most = std::max(most, rp.count);
  const int64_t max_queries = most * heads * group;
  std::vector<int64_t> work;
  for (const RunPart& rp : tasks) work.insert(work.end(), kv_heads / heads, rp.tokens * rp.count);
  TaskQueue queue(work);
  queue.run([&] {
    std::vector<__m512> qf(max_queries * kChunks), acc(max_queries * kChunks);
    std::vector<__m512> part(max_queries * 16), vf(16 * heads * kChunks);
    std::vector<float> probs(max_queries * 16), row_max(max_queries), row_sum(max_queries);
    std::vector<int64_t> row_len(most), row_lo(most);
    std::vector<uint64_t> row_bits(most);
    std::vector<__mmask16> live(most);
    for (int64_t task; queue.next(task);) {
      const RunPart rp = tasks[task / (kv_heads / heads)];
      const int64_t h = task % (kv_heads / heads) * heads, b0 = rp.first;
      // A task's queries: row by row, head by head, then the head's group.
      const int64_t per_row = heads * group, queries = rp.count * per_row;
      // The rows' visibility (``seen``); the run reads the keys up to its longest row.
      const int64_t from = visible != nullptr ? visible[2 * b0] : lens[b0];
      int64_t len = 0, lo = parts.lo[b0];
      for (int64_t r = 0; r < rp.count; ++r) {
        row_len[r] = std::min(lens[b0 + r], width * block_size);
        row_lo[r] = parts.lo[b0 + r];
        row_bits[r] = visible != nullptr ? static_cast<uint64_t>(visible[2 * (b0 + r) + 1]) : 0;
        len = std::max(len, row_len[r]);
        lo = std::min(lo, row_lo[r]);
      }
      const int64_t start = std::max(rp.part * part_tokens, lo);
      const int64_t stop = std::min(len, rp.part * part_tokens + part_tokens);
      for (int64_t r = 0; r < rp.count; ++r) {
        const T* qp = q + ((b0 + r) * kv_heads + h) * group * dim;
        for (int64_t i = 0; i < per_row * kChunks; ++i) {
          qf[r * per_row * kChunks + i] = _mm512_mul_ps(load16(qp + i * 16), _mm512_set1_ps(sc2));
        }
      }
      std::fill(acc.begin(), acc.begin() + queries * kChunks, _mm512_setzero_ps());
      std::fill(row_max.begin(), row_max.begin() + queries, kNoScore);
      std::fill(row_sum.begin(), row_sum.begin() + queries, 0.f);
      // Up to 16 positions at a time, at offsets 16 i .. 16 i + 15 of one cache block (the
      // same steps for a row alone as in a run with an earlier start): n from p on, at cache
      // row (row of head h); the keys and values of the next ones are asked for meanwhile.
      auto run_at = [&](int64_t p, int64_t& n) {
        const int64_t off = p % block_size;
        n = std::min<int64_t>({16 - off % 16, stop - p, block_size - off});
        return (tables[b0 * width + p / block_size] * block_size + off) * kv_heads + h;
      };
      int64_t n = 0;
      for (int64_t p0 = start; p0 < stop; p0 += n) {
        const int64_t row0 = run_at(p0, n);
        if (p0 + n < stop) {
          int64_t n1 = 0;
          const int64_t row1 = run_at(p0 + n, n1);
          for (int64_t t = 0; t < n1; ++t) {
            const T* kp = k_cache + (row1 + t * kv_heads) * dim;
            const T* vp = v_cache + (row1 + t * kv_heads) * dim;
            for (int64_t d = 0; d < heads * dim; d += 64 / static_cast<int64_t>(sizeof(T))) {
              heron_simd::prefetch_l2(kp + d);
              heron_simd::prefetch_l2(vp + d);
            }
          }
        }
        // Each row's keys here: from its first visible slot, below its length, and seen.
        for (int64_t r = 0; r < rp.count; ++r) {
          const int64_t own = std::clamp<int64_t>(row_len[r] - p0, 0, n);
          const int64_t before = std::clamp<int64_t>(row_lo[r] - p0, 0, n);
          __mmask16 mask = static_cast<__mmask16>(((1u << own) - 1) & ~((1u << before) - 1));
          for (int64_t t = std::max<int64_t>(0, from - p0); t < own; ++t) {
            if (!seen(p0 + t, from, row_bits[r])) mask &= static_cast<__mmask16>(~(1u << t));
          }
          live[r] = mask;
        }
        // Scores: each key's dot products with its head's queries, as 16-lane partial sums.
        for (int64_t t = 0; t < 16; ++t) {
          if (t >= n) {
            for (int64_t i = 0; i < queries; ++i) part[i * 16 + t] = _mm512_setzero_ps();
            continue;
          }
          for (int64_t hh = 0; hh < heads; ++hh) {
            const int64_t row = (row0 + t * kv_heads + hh) * dim;
            __m512 kv[kChunks];
            for (int c = 0; c < kChunks; ++c) kv[c] = load16(k_cache + row + c * 16);
            for (int64_t r = 0; r < rp.count; ++r) {
              for (int64_t i = r * per_row + hh * group; i < r * per_row + (hh + 1) * group; ++i) {
                part[i * 16 + t] = dot_lanes<kChunks, kSums>(&qf[i * kChunks], kv);
              }
            }
            __m512* vt = &vf[(t * heads + hh) * kChunks];
            for (int c = 0; c < kChunks; ++c) vt[c] = load16(v_cache + row + c * 16);
          }
        }
        // Online softmax over the 16 scores of each query. A row's keys past its own length
        // are masked out: zero weight, so its sums are those of a run of its own.
        for (int64_t i = 0; i < queries; ++i) {
          const __mmask16 seen_here = live[i / per_row];
          const __m512 s = sum_lanes16(&part[i * 16]);
          const float m = std::max(row_max[i], _mm512_mask_reduce_max_ps(seen_here, s));
          const float alpha = exp2f(row_max[i] - m);
          const __m512 e =
              _mm512_maskz_mov_ps(seen_here, exp2_neg(_mm512_sub_ps(s, _mm512_set1_ps(m))));
          row_sum[i] = row_sum[i] * alpha + _mm512_reduce_add_ps(e);
          row_max[i] = m;
          _mm512_storeu_ps(&probs[i * 16], e);
          const __m512 va = _mm512_set1_ps(alpha);
          for (int c = 0; c < kChunks; ++c) {
            acc[i * kChunks + c] = _mm512_mul_ps(acc[i * kChunks + c], va);
          }
        }
        // The weighted values: row r's keys [first, own), head hh's values for its queries.
        for (int64_t r = 0; r < rp.count; ++r) {
          const int64_t first = std::clamp<int64_t>(row_lo[r] - p0, 0, n);
          const int64_t own = std::clamp<int64_t>(row_len[r] - p0, 0, n);
          for (int64_t hh = 0; hh < heads; ++hh) {
            for (int64_t i = (r * heads + hh) * group; i < (r * heads + hh + 1) * group; ++i) {
              __m512 a[kChunks];
              for (int c = 0; c < kChunks; ++c) a[c] = acc[i * kChunks + c];
              for (int64_t t = first; t < own; ++t) {
                const __m512 pt = _mm512_set1_ps(probs[i * 16 + t]);
                const __m512* vt = &vf[(t * heads + hh) * kChunks];
                for (int c = 0; c < kChunks; ++c) a[c] = _mm512_fmadd_ps(pt, vt[c], a[c]);
              }
              for (int c = 0; c < kChunks; ++c) acc[i * kChunks + c] = a[c];
            }
          }
        }
      }
      // Each row's sums of this part, where the row has it (a shorter row may not).
      for (int64_t r = 0; r < rp.count; ++r) {
        const int64_t b = b0 + r, nth = rp.part - parts.grid0[b];  // the row's nth part
        if (nth < 0 || nth >= parts.count(b)) continue;
        const int64_t pi = parts.begin[b] + nth;
        for (int64_t j = 0; j < per_row; ++j) {
          const int64_t i = r * per_row + j;
          float sums[dim];
          for (int c = 0; c < kChunks; ++c) _mm512_storeu_ps(sums + 16 * c, acc[i * kChunks + c]);
          // merge_parts works in natural-log units
          sink.put(pi, h * group + j, sums, row_max[i] * 0.69314718f, row_sum[i]);
        }
      }
    }
  });
}
#endif

}  // namespace

// q: [B, Hkv, G, D]; k_cache, v_cache: [slots, Hkv, D]; tables: [B, W] int64 block ids;
// lens: [B] int64 tokens in the cache per sequence (slots < len are attended); visible:
// optional [B, 2] int64 (from, bits): slot from + j (j < 64) is attended only where bit j of
// bits is set (a draft tree's row: its ancestors); window > 0: only the slots from
// len - window on are attended (a sliding-window layer). Returns [B, Hkv, G, D] in q's dtype.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens,
                           std::optional<torch::Tensor> visible, int64_t block_size,
                           double scale, int64_t window) {
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
      constexpr int64_t kDim = decltype(head_dim)::value;
      const Parts parts = decode_parts(lens.data_ptr<int64_t>(), batch, tables.size(1),
                                       block_size, window);
      const int64_t num_parts = static_cast<int64_t>(parts.seq.size());
      std::vector<float> partial(num_parts > batch ? num_parts * kv_heads * group * (dim + 2) : 0);
      const PartSink<scalar_t> sink{parts, partial.data(), out.data_ptr<scalar_t>(), kv_heads,
                                    group, dim};
      const auto* qp = q.data_ptr<scalar_t>();
      const auto* kp = k_cache.data_ptr<scalar_t>();
      const auto* vp = v_cache.data_ptr<scalar_t>();
      const int64_t* tp = tables.data_ptr<int64_t>();
      const int64_t* lp = lens.data_ptr<int64_t>();
#if defined(__AVX512F__)
      if constexpr (kDim > 0 && !std::is_same_v<scalar_t, double>) {
        decode_kernel_avx512<scalar_t, kDim / 16>(qp, kp, vp, tp, lp, vis, parts, sink,
                                                  batch, kv_heads, group, tables.size(1),
                                                  block_size, static_cast<float>(scale));
      } else
#elif HERON_DECODE_AVX2
      constexpr bool kAvx2Type = std::is_same_v<scalar_t, float> ||
                                 std::is_same_v<scalar_t, c10::BFloat16>
#if defined(__F16C__)
                                 || std::is_same_v<scalar_t, c10::Half>
#endif
          ;
      if constexpr (kDim > 0 && kAvx2Type) {
        decode_kernel_avx2<scalar_t, kDim / 16>(qp, kp, vp, tp, lp, vis, parts, sink,
                                                kv_heads, group, tables.size(1), block_size,
                                                static_cast<float>(scale));
      } else
#endif
      {
        decode_kernel<scalar_t, kDim>(qp, kp, vp, tp, lp, vis, parts, sink, kv_heads,
                                      group, dim, tables.size(1), block_size,
                                      static_cast<float>(scale));
      }
      if (num_parts > batch) {
        merge_parts(partial.data(), parts, out.data_ptr<scalar_t>(), batch, kv_heads, group, dim);
      }
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

// cache[slots[t]] = x[t] for x [T, Hkv, D] (any strides, D contiguous) and a contiguous cache
// [rows, Hkv, D] of the same dtype: a step's new keys (or values) into the paged cache.
// index_copy_ does the same through a generic indexing loop, slow for what are plain row
// copies, and a step makes two calls per layer.
void write_rows_(torch::Tensor cache, torch::Tensor slots, torch::Tensor x) {
  TORCH_CHECK(cache.dim() == 3 && x.dim() == 3 && cache.is_contiguous() &&
                  cache.size(1) == x.size(1) && cache.size(2) == x.size(2) &&
                  x.stride(2) == 1 && cache.scalar_type() == x.scalar_type(),
              "write_rows_: cache [rows, H, D] contiguous, x [T, H, D] of its dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 &&
                  slots.size(0) == x.size(0),
              "write_rows_: one int64 slot per row of x");
  slots = slots.contiguous();
  const int64_t rows = cache.size(0), heads = x.size(1);
  const int64_t bytes = x.size(2) * x.element_size();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < x.size(0); ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < rows, "write_rows_: slot ", sp[t], " outside the cache");
  }
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* src = static_cast<const char*>(x.data_ptr());
  const int64_t s0 = x.stride(0) * x.element_size(), s1 = x.stride(1) * x.element_size();
  at::parallel_for(0, x.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        std::memcpy(dst + (sp[t] * heads + h) * bytes, src + t * s0 + h * s1, bytes);
      }
    }
  });
}
