// A decode step's decoder layers (Llama, SmolLM2, Qwen2, Gemma3) in one C++ loop.
//
// At batch 1 the ~20 ops around a layer's matmuls are little work, but in Python each op costs
// a dispatch, a module call and attribute lookups: a large share of a small model's step.
// This replays the decoder layers' forward (heron.models.llama,
// heron.models.gemma3) for a step of plain decode rows (one query each, attending through
// paged_decode to a plain cache) with the same ops in the same order, so its output equals
// the Python path's bit for bit: the Python modules stay the reference and serve every other
// step (prefill chunks, quantized KV caches, KV policies, quantized weights beyond their
// few-row kernels' rows). heron.models.decode_loop decides and builds.
#include "heron_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <utility>
#include <vector>

namespace {

// oneDNN's linear on a weight packed at load (heron.layers.packed_linear), called as Python
// calls it: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "").
torch::Tensor onednn_packed_linear(const torch::Tensor& x, const torch::Tensor& w,
                            const std::optional<torch::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

DecodeLinear::DecodeLinear(std::string kind, torch::Tensor weight,
                           std::optional<torch::Tensor> scales, int64_t group_size,
                           std::optional<torch::Tensor> bias,
                           std::optional<torch::Tensor> few_rows_weight)
    : weight_(std::move(weight)), scales_(std::move(scales)), group_size_(group_size),
      bias_(std::move(bias)), few_rows_weight_(std::move(few_rows_weight)) {
  if (kind == "dense") {
    kind_ = Kind::kDense;
  } else if (kind == "mkldnn") {
    kind_ = Kind::kMkldnn;
  } else if (kind == "int8" || kind == "int4" || kind == "int8_aten" || kind == "int4_aten") {
    TORCH_CHECK(scales_.has_value(), "DecodeLinear: ", kind, " needs its scales");
    kind_ = kind == "int8"        ? Kind::kInt8
            : kind == "int4"      ? Kind::kInt4
            : kind == "int8_aten" ? Kind::kInt8Aten
                                  : Kind::kInt4Aten;
  } else {
    TORCH_CHECK(false, "DecodeLinear: unknown kind ", kind);
  }
  TORCH_CHECK(!few_rows_weight_ || kind_ == Kind::kMkldnn,
              "DecodeLinear: only mkldnn takes a few-rows weight");
}

// What the module's forward computes for a 2-D x of at most its max_gemv_rows rows: the packed
// kernels take bf16 activations and give bf16, converted back to x's dtype, then the bias
// added in place (heron.layers.quantized_linear's _in_kernel_dtype and _finish).
torch::Tensor DecodeLinear::operator()(const torch::Tensor& x) const {
  switch (kind_) {
    case Kind::kDense:
      return at::linear(x, weight_, bias_);
    case Kind::kMkldnn:
      if (few_rows_weight_ && x.size(0) <= bf16_gemv_max_rows()) {
        return bf16_gemv(x, *few_rows_weight_, bias_);
      }
      return onednn_packed_linear(x, weight_, bias_);
    case Kind::kInt8:
    case Kind::kInt4:
    case Kind::kInt8Aten:
    case Kind::kInt4Aten: {
      const torch::Tensor xk = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
      torch::Tensor y;
      switch (kind_) {
        case Kind::kInt8:
          y = int8_gemv(xk, weight_, *scales_);
          break;
        case Kind::kInt4:
          y = int4_gemv(xk, weight_, *scales_, group_size_, weight_.numel() * 2 / x.size(1));
          break;
        case Kind::kInt8Aten:
          y = at::_weight_int8pack_mm(xk, weight_, *scales_);
          break;
        default:
          y = at::_weight_int4pack_mm_for_cpu(xk, weight_, group_size_, *scales_);
      }
      if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
      return bias_ ? y.add_(*bias_) : y;
    }
  }
  return {};
}

DecodeLayers::DecodeLayers(std::vector<DecodeLayer> layers, DecodeOptions options)
    : layers_(std::move(layers)), options_(options) {
  TORCH_CHECK(options_.num_heads % options_.num_kv_heads == 0, "DecodeLayers: whole GQA groups");
}

torch::Tensor DecodeLayers::norm(const torch::Tensor& x, const torch::Tensor& weight) const {
  return rms_norm(x, std::nullopt, weight, options_.eps, options_.offset)[0];
}

// GatedMLP.forward
torch::Tensor DecodeLayers::mlp(const DecodeLayer& layer, const torch::Tensor& x) const {
  const torch::Tensor gate_up = layer.gate_up(x);
  if (!options_.gelu_tanh) return layer.down(silu_mul(gate_up));
  const std::vector<torch::Tensor> halves = gate_up.chunk(2, -1);
  return layer.down(at::gelu(halves[0], "tanh") * halves[1]);
}

// ``rotary``: the global layers' cos and sin, then the local layers' (Gemma3); ``window``: the
// local layers' sliding window (0: none).
torch::Tensor DecodeLayers::forward(torch::Tensor x, const std::vector<torch::Tensor>& rotary,
                                    const std::vector<torch::Tensor>& k_caches,
                                    const std::vector<torch::Tensor>& v_caches,
                                    const torch::Tensor& slots, const torch::Tensor& tables,
                                    const torch::Tensor& lens,
                                    const std::optional<torch::Tensor>& visible,
                                    int64_t block_size, int64_t window,
                                    const std::vector<int64_t>& which) const {
  const int64_t t = x.size(0), heads = options_.num_heads, kv_heads = options_.num_kv_heads;
  const int64_t dim = options_.head_dim;
  TORCH_CHECK(x.dim() == 2 && tables.size(0) == t && lens.size(0) == t,
              "DecodeLayers: one decode row per sequence");
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
              "DecodeLayers: a cache per layer");
  TORCH_CHECK(rotary.size() == 2 || rotary.size() == 4, "DecodeLayers: cos, sin [, local]");
  for (const int64_t i : which) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()), "DecodeLayers: layer ", i);
    const DecodeLayer& layer = layers_[i];
    // SelfAttention.forward
    const torch::Tensor qkv = layer.qkv(norm(x, layer.input_norm)).view({t, -1, dim});
    torch::Tensor qk = qkv.narrow(1, 0, heads + kv_heads);
    if (layer.q_norm) {
      qk = at::cat({norm(qk.narrow(1, 0, heads), *layer.q_norm),
                    norm(qk.narrow(1, heads, kv_heads), *layer.k_norm)},
                   1);
    }
    const size_t r = layer.local && rotary.size() == 4 ? 2 : 0;
    rotary_(qk, rotary[r], rotary[r + 1]);
    // paged_attention: the step's K/V into the cache, then the kernel over it.
    write_rows_(k_caches[i], slots, qk.narrow(1, heads, kv_heads));
    write_rows_(v_caches[i], slots, qkv.narrow(1, heads + kv_heads, kv_heads));
    const torch::Tensor q = qk.narrow(1, 0, heads).view({t, kv_heads, heads / kv_heads, dim});
    const torch::Tensor o = paged_decode(q, k_caches[i], v_caches[i], tables, lens, visible,
                                         block_size, options_.scale, layer.local ? window : 0);
    const torch::Tensor h = layer.o(o.view({t, heads * dim}));
    if (layer.pre_ff_norm) {  // Gemma3DecoderLayer.forward
      x = x + norm(h, layer.post_norm);
      x = x + norm(mlp(layer, norm(x, *layer.pre_ff_norm)), *layer.post_ff_norm);
    } else {  // LlamaDecoderLayer: post_attention_layernorm.add_and_norm(h, x), then the MLP
      const std::vector<torch::Tensor> sum_normed =
          rms_norm(h, x, layer.post_norm, options_.eps, options_.offset);
      x = sum_normed[0] + mlp(layer, sum_normed[1]);
    }
  }
  return x;
}
