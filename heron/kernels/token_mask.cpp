// Constrained decoding's token masks applied to the logits before sampling: a logit whose
// bit is clear becomes -inf. One bit per token, 32 tokens to an int32 word (xgrammar's
// bitmask layout). A general loop over 49k tokens a row costs several ms at batch 32; here
// a word whose 32 tokens are all allowed (most of a JSON string's) is skipped, and with
// AVX-512 a word is two masked stores.
#include "heron_kernels.h"

#include <limits>

#include "simd.h"

namespace {

void mask_row(float* logits, const uint32_t* words, int64_t vocab_size) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t full_words = vocab_size / 32;
#if defined(__AVX512F__)
  const __m512 ninf = _mm512_set1_ps(neg_inf);
  for (int64_t w = 0; w < full_words; ++w) {
    const uint32_t bits = words[w];
    if (bits == ~0u) continue;
    _mm512_mask_storeu_ps(logits + w * 32, static_cast<__mmask16>(~bits & 0xFFFF), ninf);
    _mm512_mask_storeu_ps(logits + w * 32 + 16, static_cast<__mmask16>(~bits >> 16), ninf);
  }
#else
  for (int64_t w = 0; w < full_words; ++w) {
    const uint32_t bits = words[w];
    if (bits == ~0u) continue;
    float* out = logits + w * 32;
    HERON_UNROLL
    for (int j = 0; j < 32; ++j) out[j] = (bits >> j) & 1u ? out[j] : neg_inf;
  }
#endif
  for (int64_t t = full_words * 32; t < vocab_size; ++t) {
    if (!((words[t / 32] >> (t % 32)) & 1u)) logits[t] = neg_inf;
  }
}

}  // namespace

void apply_token_bitmask_(torch::Tensor logits, torch::Tensor bitmask, torch::Tensor rows,
                          int64_t vocab_size) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "apply_token_bitmask_: logits must be a [B, V] float32 tensor, rows contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == at::kInt && bitmask.is_contiguous(),
              "apply_token_bitmask_: bitmask must be a contiguous [B, W] int32 tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong,
              "apply_token_bitmask_: rows must be a 1-D int64 tensor");
  TORCH_CHECK(vocab_size <= logits.size(1) && vocab_size <= bitmask.size(1) * 32,
              "apply_token_bitmask_: vocab_size exceeds the logits or the bitmask");
  const auto row_ids = rows.contiguous();
  const int64_t* ids = row_ids.data_ptr<int64_t>();
  const int64_t n = row_ids.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < logits.size(0) && ids[i] < bitmask.size(0),
                "apply_token_bitmask_: row out of range");
  }
  float* base = logits.data_ptr<float>();
  const auto* words = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int64_t ls = logits.stride(0), ws = bitmask.size(1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      mask_row(base + ids[i] * ls, words + ids[i] * ws, vocab_size);
    }
  });
}
