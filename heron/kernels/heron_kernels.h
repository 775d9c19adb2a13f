// heron's CPU kernels: one declaration per op bound in bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

// paged_decode.cpp
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens,
                           std::optional<torch::Tensor> visible, int64_t block_size,
                           double scale, int64_t window);
void write_rows_(torch::Tensor cache, torch::Tensor slots, torch::Tensor x);

// layer_ops.cpp
std::vector<torch::Tensor> rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual,
                                    torch::Tensor weight, double eps, double offset);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);

// token_mask.cpp
void apply_token_bitmask_(torch::Tensor logits, torch::Tensor bitmask, torch::Tensor rows,
                          int64_t vocab_size);

// sparse_prefill.cpp
bool sparse_prefill_supported();
torch::Tensor sparse_prefill(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                             std::optional<torch::Tensor> table, int64_t cache_block,
                             torch::Tensor row_ptr, torch::Tensor cols,
                             int64_t q_start, int64_t block, double scale);
torch::Tensor xattention_scores(torch::Tensor q, torch::Tensor k,
                                std::optional<torch::Tensor> table, int64_t cache_block,
                                int64_t q_start, int64_t block, int64_t stride, double scale);
torch::Tensor select_blocks(torch::Tensor scores, double threshold, int64_t qb0);
torch::Tensor vnni_matmul(torch::Tensor a, torch::Tensor b, std::optional<torch::Tensor> c);

// dequantize.cpp
bool dequantize_supported();
// The checks both int4 kernels make of PyTorch's CPU int4 pack and its scales and zeros.
void check_int4_pack(const torch::Tensor& packed, const torch::Tensor& scale_zero,
                     int64_t out_features, int64_t in_features, int64_t group_size,
                     const char* op);
torch::Tensor dequantize_int4(torch::Tensor packed, torch::Tensor scale_zero,
                              int64_t out_features, int64_t in_features, int64_t group_size,
                              int64_t block_n, std::optional<torch::Tensor> into);
torch::Tensor dequantize_int8(torch::Tensor weight, torch::Tensor scale,
                              std::optional<torch::Tensor> into);
torch::Tensor dequantize_int4_float(torch::Tensor packed, torch::Tensor scale_zero,
                                    int64_t out_features, int64_t in_features,
                                    int64_t group_size, int64_t block_n,
                                    std::optional<torch::Tensor> into);
torch::Tensor dequantize_int8_float(torch::Tensor weight, torch::Tensor scale,
                                    std::optional<torch::Tensor> into);

// quantized_gemv.cpp
bool int8_gemv_supported();
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor weight, torch::Tensor scale);
bool int4_gemv_supported();
int64_t int4_gemv_block();
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale_zero,
                        int64_t group_size, int64_t out_features);

// bf16_gemv.cpp
bool bf16_gemv_supported();
int64_t bf16_gemv_max_rows();
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor weight, std::optional<torch::Tensor> bias);

// decode_layers.cpp
// One linear as its module computes it for a decode step's few rows: "dense" (F.linear),
// "mkldnn" (a oneDNN-packed bf16 weight; with `few_rows_weight`, the plain weight that
// bf16_gemv reads for up to bf16_gemv_max_rows() rows), "int8" / "int4" (int8_gemv /
// int4_gemv above), "int8_aten" / "int4_aten" (PyTorch's packed CPU kernels).
class DecodeLinear {
 public:
  DecodeLinear(std::string kind, torch::Tensor weight, std::optional<torch::Tensor> scales,
               int64_t group_size, std::optional<torch::Tensor> bias,
               std::optional<torch::Tensor> few_rows_weight);
  torch::Tensor operator()(const torch::Tensor& x) const;

 private:
  enum class Kind { kDense, kMkldnn, kInt8, kInt4, kInt8Aten, kInt4Aten };
  Kind kind_;
  torch::Tensor weight_;
  std::optional<torch::Tensor> scales_;
  int64_t group_size_;
  std::optional<torch::Tensor> bias_;
  std::optional<torch::Tensor> few_rows_weight_;
};

// A decoder layer's weights. Llama / Qwen2: input_norm, attention, post_norm (added to the
// residual first), SwiGLU MLP. Gemma3 also has q/k norms and sandwich norms: post_norm on the
// attention output before the residual add, pre_ff_norm before the MLP and post_ff_norm on
// its output; its local (sliding-window) layers take the local rotary tables.
struct DecodeLayer {
  torch::Tensor input_norm;
  DecodeLinear qkv, o;
  torch::Tensor post_norm;
  DecodeLinear gate_up, down;
  std::optional<torch::Tensor> q_norm, k_norm, pre_ff_norm, post_ff_norm;
  bool local;
};

// What the families' layers differ in besides their weights.
struct DecodeOptions {
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;        // attention scale
  double eps, offset;  // RMSNorm: x / rms(x) * (weight + offset)
  bool gelu_tanh;      // GeGLU (tanh GELU) instead of SwiGLU
};

class DecodeLayers {
 public:
  DecodeLayers(std::vector<DecodeLayer> layers, DecodeOptions options);
  torch::Tensor forward(torch::Tensor x, const std::vector<torch::Tensor>& rotary,
                        const std::vector<torch::Tensor>& k_caches,
                        const std::vector<torch::Tensor>& v_caches, const torch::Tensor& slots,
                        const torch::Tensor& tables, const torch::Tensor& lens,
                        const std::optional<torch::Tensor>& visible, int64_t block_size,
                        int64_t window, const std::vector<int64_t>& which) const;

 private:
  torch::Tensor norm(const torch::Tensor& x, const torch::Tensor& weight) const;
  torch::Tensor mlp(const DecodeLayer& layer, const torch::Tensor& x) const;

  std::vector<DecodeLayer> layers_;
  DecodeOptions options_;
};
