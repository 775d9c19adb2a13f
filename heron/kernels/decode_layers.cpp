// A decode step's decoder layers for the Llama family (Llama, SmolLM2, Qwen2) in one C++ loop.
//
// At batch 1 a layer's matmuls take ~160 us and the ~20 ops around them ~5 us of work, but in
// Python each op costs a dispatch, a module call and attribute lookups: ~70 us per layer, ~2 ms
// of a ~10 ms step. This replays heron.models.llama.LlamaDecoderLayer.forward for a step of
// plain decode rows (one query each, attending through paged_decode to a plain cache) with
// the same ops in the same order, so its output equals the Python path's bit for bit: the
// Python modules stay the reference and serve every other step (prefill, draft trees, KV
// policies, quantized caches, big batches).
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
                           std::optional<torch::Tensor> bias)
    : weight_(std::move(weight)), scales_(std::move(scales)), group_size_(group_size),
      bias_(std::move(bias)) {
  if (kind == "dense") {
    kind_ = Kind::kDense;
  } else if (kind == "mkldnn") {
    kind_ = Kind::kMkldnn;
  } else if (kind == "int8" || kind == "int4") {
    TORCH_CHECK(scales_.has_value(), "DecodeLinear: ", kind, " needs its scales");
    kind_ = kind == "int8" ? Kind::kInt8 : Kind::kInt4;
  } else {
    TORCH_CHECK(false, "DecodeLinear: unknown kind ", kind);
  }
}

// What the module's forward computes for a 2-D x of at most GEMV_MAX_ROWS rows: the packed
// kernels take bf16 activations and give bf16, converted back to x's dtype, then the bias
// added in place (heron.layers.quantized_linear's _in_kernel_dtype and _finish).
torch::Tensor DecodeLinear::operator()(const torch::Tensor& x) const {
  switch (kind_) {
    case Kind::kDense:
      return at::linear(x, weight_, bias_);
    case Kind::kMkldnn:
      return onednn_packed_linear(x, weight_, bias_);
    case Kind::kInt8:
    case Kind::kInt4: {
      const torch::Tensor xk = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
      torch::Tensor y = kind_ == Kind::kInt8
                            ? at::_weight_int8pack_mm(xk, weight_, *scales_)
                            : at::_weight_int4pack_mm_for_cpu(xk, weight_, group_size_, *scales_);
      if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
      return bias_ ? y.add_(*bias_) : y;
    }
  }
  return {};
}

DecodeLayers::DecodeLayers(std::vector<DecodeLayer> layers, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, double eps, double scale)
    : layers_(std::move(layers)), num_heads_(num_heads), num_kv_heads_(num_kv_heads),
      head_dim_(head_dim), eps_(eps), scale_(scale) {
  TORCH_CHECK(num_heads % num_kv_heads == 0, "DecodeLayers: whole GQA groups");
}

torch::Tensor DecodeLayers::forward(torch::Tensor x, const torch::Tensor& cos,
                                    const torch::Tensor& sin,
                                    const std::vector<torch::Tensor>& k_caches,
                                    const std::vector<torch::Tensor>& v_caches,
                                    const torch::Tensor& slots, const torch::Tensor& tables,
                                    const torch::Tensor& lens,
                                    const std::optional<torch::Tensor>& visible,
                                    int64_t block_size, const std::vector<int64_t>& which) const {
  const int64_t t = x.size(0), heads = num_heads_, kv_heads = num_kv_heads_, dim = head_dim_;
  TORCH_CHECK(x.dim() == 2 && tables.size(0) == t && lens.size(0) == t,
              "DecodeLayers: one decode row per sequence");
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
              "DecodeLayers: a cache per layer");
  for (const int64_t i : which) {
    TORCH_CHECK(i >= 0 && i < static_cast<int64_t>(layers_.size()), "DecodeLayers: layer ", i);
    const DecodeLayer& layer = layers_[i];
    // SelfAttention.forward
    const torch::Tensor qkv =
        layer.qkv(rms_norm(x, std::nullopt, layer.input_norm, eps_, 0.0)[0])
            .view({t, -1, dim});
    rotary_(qkv.narrow(1, 0, heads + kv_heads), cos, sin);
    // paged_attention: the step's K/V into the cache, then the kernel over it.
    write_rows_(k_caches[i], slots, qkv.narrow(1, heads, kv_heads));
    write_rows_(v_caches[i], slots, qkv.narrow(1, heads + kv_heads, kv_heads));
    const torch::Tensor q = qkv.narrow(1, 0, heads).view({t, kv_heads, heads / kv_heads, dim});
    const torch::Tensor o =
        paged_decode(q, k_caches[i], v_caches[i], tables, lens, visible, block_size, scale_);
    const torch::Tensor h = layer.o(o.view({t, heads * dim}));
    // post_attention_layernorm.add_and_norm(h, x), then x + mlp(normed)
    const std::vector<torch::Tensor> sum_normed =
        rms_norm(h, x, layer.post_norm, eps_, 0.0);
    x = sum_normed[0] + layer.down(silu_mul(layer.gate_up(sum_normed[1])));
  }
  return x;
}
