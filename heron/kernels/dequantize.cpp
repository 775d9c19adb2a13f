// Packed weights back to bf16 (AVX-512 builds) or float32 (any build) for the many-row
// (prefill) path of Int4Linear / Int8Linear, in one pass each.
//
// PyTorch's CPU int4 pack is [out / block_n, in, block_n / 2] bytes: byte [b, k, j] holds
// row b * block_n + j in its low nibble and row b * block_n + block_n / 2 + j in its high one.
// Int4Linear.dequantize unpacks that with PyTorch ops (two strided copies, then the level's
// offset, scale and zero as three bf16 ops: six passes over the weight, and a prefill step
// dequantizes every weight). Here one gather reads
// the bytes of four rows for 16 inputs (a stride of block_n / 2 bytes apart), and each row's
// 16 values are computed and rounded where the PyTorch ops round: the same bits.
#include "heron_kernels.h"

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
#define HERON_DEQUANTIZE 1
#include "simd.h"
#else
#define HERON_DEQUANTIZE 0
#endif

bool dequantize_supported() { return HERON_DEQUANTIZE; }

void check_int4_pack(const torch::Tensor& packed, const torch::Tensor& scale_zero,
                     int64_t out_features, int64_t in_features, int64_t group_size,
                     const char* op) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.numel() * 2 == out_features * in_features,
              op, ": packed must be contiguous uint8 holding out * in nibbles");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.is_contiguous() &&
                  scale_zero.numel() == in_features / group_size * out_features * 2,
              op, ": scale_zero must be contiguous bf16 [in / group, out, 2]");
}

namespace {

// `into` when given (a reused buffer: a fresh tensor of a big weight's size costs a page
// fault per 4 kB, more than the dequantization itself), else a new [rows, cols] bf16 tensor.
torch::Tensor bf16_output(const std::optional<torch::Tensor>& into, int64_t rows, int64_t cols,
                          const torch::Tensor& like) {
  if (!into.has_value()) return torch::empty({rows, cols}, like.options().dtype(at::kBFloat16));
  TORCH_CHECK(into->scalar_type() == at::kBFloat16 && into->is_contiguous() &&
                  into->dim() == 2 && into->size(0) == rows && into->size(1) == cols,
              "dequantize: `into` must be a contiguous bf16 [out, in] tensor");
  return *into;
}

}  // namespace

torch::Tensor dequantize_int4(torch::Tensor packed, torch::Tensor scale_zero,
                              int64_t out_features, int64_t in_features, int64_t group_size,
                              int64_t block_n, std::optional<torch::Tensor> into) {
#if HERON_DEQUANTIZE
  check_int4_pack(packed, scale_zero, out_features, in_features, group_size, "dequantize_int4");
  TORCH_CHECK(block_n % 8 == 0 && out_features % block_n == 0 && in_features % 16 == 0 &&
                  group_size % 16 == 0 && in_features % group_size == 0,
              "dequantize_int4: block, group and input sizes must tile the weight");
  torch::Tensor out = bf16_output(into, out_features, in_features, packed);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* sz = reinterpret_cast<const uint16_t*>(scale_zero.data_ptr<at::BFloat16>());
  uint16_t* w = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t half = block_n / 2;
  // Lane i of a gather reads the 4 bytes at input k0 + i.
  const __m512i offsets = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(half)));
  const __m512i nibble = _mm512_set1_epi32(15);
  const __m512 eight = _mm512_set1_ps(8.f);
  auto as_float = [](uint16_t bits) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(bits) << 16));
  };
  auto widen = [](__m256bh x) {  // bf16 -> fp32, exact
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(x)), 16));
  };
  // Tasks: (row block, 4 consecutive j); each writes 8 rows.
  const int64_t quads = half / 4;
  at::parallel_for(0, out_features / block_n * quads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / quads, j0 = (task % quads) * 4;
      const uint8_t* base = p + b * in_features * half + j0;
      for (int64_t k0 = 0; k0 < in_features; k0 += 16) {
        const __m512i bytes = _mm512_i32gather_epi32(offsets, base + k0 * half, 1);
        const int64_t g = k0 / group_size;
        for (int64_t jj = 0; jj < 4; ++jj) {
          const __m512i byte = _mm512_and_si512(_mm512_srli_epi32(bytes, 8 * jj),
                                                _mm512_set1_epi32(255));
          for (int64_t hi = 0; hi < 2; ++hi) {
            const int64_t r = b * block_n + hi * half + j0 + jj;
            const __m512i level =
                _mm512_and_si512(hi ? _mm512_srli_epi32(byte, 4) : byte, nibble);
            const uint16_t* s = sz + (g * out_features + r) * 2;
            // (level - 8) * scale, rounded to bf16; + zero, rounded to bf16.
            const __m512 scaled = widen(_mm512_cvtneps_pbh(_mm512_mul_ps(
                _mm512_sub_ps(_mm512_cvtepi32_ps(level), eight), as_float(s[0]))));
            const __m256bh value = _mm512_cvtneps_pbh(_mm512_add_ps(scaled, as_float(s[1])));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(w + r * in_features + k0),
                                reinterpret_cast<__m256i>(value));
          }
        }
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "dequantize_int4: needs AVX-512 with bf16 conversions");
  return {};
#endif
}

// Int8Linear.dequantize in bf16 is bf16(q) * bf16(scale), rounded once (the product of an
// int8 and a bf16 is exact in fp32): one pass, where PyTorch's mixed-dtype mul is slow and
// wants an int8 -> bf16 copy first.
torch::Tensor dequantize_int8(torch::Tensor weight, torch::Tensor scale,
                              std::optional<torch::Tensor> into) {
#if HERON_DEQUANTIZE
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "dequantize_int8: weight must be contiguous int8 [out, in]");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == weight.size(0),
              "dequantize_int8: one bf16 scale per output row");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  torch::Tensor out = bf16_output(into, rows, cols, weight);
  const torch::Tensor sf = scale.to(at::kFloat).contiguous();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = sf.data_ptr<float>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const __m512 sv = _mm512_set1_ps(s[r]);
      for (int64_t k = 0; k < cols; k += 16) {
        const __mmask16 mask = heron_simd::tail_mask(cols - k);
        const __m512 q = heron_simd::load16(w + r * cols + k, mask);
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(q, sv));
        _mm256_mask_storeu_epi16(o + r * cols + k, mask, reinterpret_cast<__m256i>(v));
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "dequantize_int8: needs AVX-512 with bf16 conversions");
  return {};
#endif
}

// The float32 forms, for CPUs that only emulate bf16 matmul (the many-row path runs its GEMM in
// float32 there): plain loops the compiler vectorizes for the machine, rounding where the
// PyTorch ops of Int4Linear / Int8Linear.dequantize(float32) round, so the same bits, in one
// pass where those ops take six.
namespace {

torch::Tensor float_output(const std::optional<torch::Tensor>& into, int64_t rows, int64_t cols,
                           const torch::Tensor& like) {
  if (!into.has_value()) return torch::empty({rows, cols}, like.options().dtype(at::kFloat));
  TORCH_CHECK(into->scalar_type() == at::kFloat && into->is_contiguous() && into->dim() == 2 &&
                  into->size(0) == rows && into->size(1) == cols,
              "dequantize: `into` must be a contiguous float32 [out, in] tensor");
  return *into;
}

// (level - 8) * scale, rounded, then + zero, rounded: two roundings, never one fused
// multiply-add.
__attribute__((optimize("fp-contract=off"))) void int4_row_float(
    const uint8_t* bytes, int64_t stride, int shift, const float* scale, const float* zero,
    int64_t group_size, int64_t cols, float* out) {
  for (int64_t k0 = 0, g = 0; k0 < cols; k0 += group_size, ++g) {
    const float s = scale[g], z = zero[g];
    for (int64_t k = k0; k < k0 + group_size; ++k) {
      const float level = static_cast<float>((bytes[k * stride] >> shift) & 15);
      const float scaled = (level - 8.f) * s;
      out[k] = scaled + z;
    }
  }
}

}  // namespace

torch::Tensor dequantize_int4_float(torch::Tensor packed, torch::Tensor scale_zero,
                                    int64_t out_features, int64_t in_features,
                                    int64_t group_size, int64_t block_n,
                                    std::optional<torch::Tensor> into) {
  check_int4_pack(packed, scale_zero, out_features, in_features, group_size,
                  "dequantize_int4_float");
  TORCH_CHECK(block_n % 2 == 0 && out_features % block_n == 0 && in_features % group_size == 0,
              "dequantize_int4_float: block, group and input sizes must tile the weight");
  torch::Tensor out = float_output(into, out_features, in_features, packed);
  // [in / group, out, 2] -> per row: its scales and zeros over the groups, as float32.
  const torch::Tensor sz = scale_zero.view({in_features / group_size, out_features, 2})
                               .permute({1, 2, 0})
                               .to(at::kFloat)
                               .contiguous();  // [out, 2, groups]
  const int64_t groups = in_features / group_size, half = block_n / 2;
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* szp = sz.data_ptr<float>();
  float* w = out.data_ptr<float>();
  at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / block_n, j = r % block_n;
      const uint8_t* bytes = p + b * in_features * half + j % half;
      const float* s = szp + r * 2 * groups;
      int4_row_float(bytes, half, j < half ? 0 : 4, s, s + groups, group_size, in_features,
                     w + r * in_features);
    }
  });
  return out;
}

torch::Tensor dequantize_int8_float(torch::Tensor weight, torch::Tensor scale,
                                    std::optional<torch::Tensor> into) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "dequantize_int8_float: weight must be contiguous int8 [out, in]");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == weight.size(0),
              "dequantize_int8_float: one float32 scale per output row");
  const int64_t rows = weight.size(0), cols = weight.size(1);
  torch::Tensor out = float_output(into, rows, cols, weight);
  const torch::Tensor sf = scale.contiguous();
  const int8_t* q = weight.data_ptr<int8_t>();
  const float* s = sf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t k = 0; k < cols; ++k)
        o[r * cols + k] = static_cast<float>(q[r * cols + k]) * s[r];
  });
  return out;
}
