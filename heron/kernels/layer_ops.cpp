// Fused element-wise ops of the decoder layers (CPU): RMSNorm (with the residual add before
// it), rotary embedding in place, and SiLU(gate) * up. In PyTorch each is 3 to 12 ops, each
// with its own dispatch and temporary; at batch 1 they cost more than the matmuls around them.
//
// Each op rounds where the PyTorch code it replaces rounds (to bf16 / fp16 after every op that
// produced a tensor of that dtype), so in bf16 the outputs match that code bit for bit; in
// fp32 they differ in the last bits (summation order, and the build's -ffast-math).
#include "heron_kernels.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float v) { return v; }
inline float to_float(double v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }
inline float to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// v rounded to T's precision (round to nearest even), kept as a float.
template <typename T>
inline float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}
template <>
inline float round_to<float>(float v) {
  return v;
}
template <>
inline float round_to<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return c10::BFloat16(static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16),
                       c10::BFloat16::from_bits());
}

// Rows of a [rows, D] or [T, H, D] tensor whose last dimension is contiguous: the offset of
// row i (in elements).
struct Rows {
  int64_t count, inner, stride0, stride1;
  explicit Rows(const torch::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "heron kernels: expected a 2-D or 3-D tensor");
    TORCH_CHECK(x.stride(-1) == 1, "heron kernels: the last dimension must be contiguous");
    inner = x.dim() == 3 ? x.size(1) : 1;
    count = x.size(0) * inner;
    stride0 = x.stride(0);
    stride1 = x.dim() == 3 ? x.stride(1) : 0;
  }
  int64_t offset(int64_t i) const { return (i / inner) * stride0 + (i % inner) * stride1; }
};

// Rows per parallel task: a batch-1 step's few rows run inline (no thread wake-up).
inline int64_t grain(int64_t row_len) { return std::max<int64_t>(1, 16384 / row_len); }

// The norm's weight (+ offset) as floats, read in place (a tensor conversion would cost a
// dispatch and an allocation per call).
std::vector<float> weight_as_float(const torch::Tensor& w, float offset) {
  TORCH_CHECK(w.is_contiguous(), "rms_norm: weight must be contiguous");
  std::vector<float> out(w.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "rms_norm_w", [&] {
    const scalar_t* p = w.data_ptr<scalar_t>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = to_float(p[i]) + offset;
  });
  return out;
}

// out = norm(x + residual) (or norm(x)), sum = x + residual rounded to T. With a weight offset
// (Gemma) the scaled value is rounded once; without, the normalised value is rounded first
// and then scaled, as in the Hugging Face implementations.
template <typename T>
void rms_norm_kernel(const T* x, const T* residual, const Rows& rows, const float* w,
                     bool has_offset, float eps, int64_t dim, T* sum, T* out) {
  at::parallel_for(0, rows.count, grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<float> h(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + rows.offset(r);
      float squares = 0.f;
      if (residual != nullptr) {
        const T* rr = residual + r * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const float v = round_to<T>(to_float(xr[d]) + to_float(rr[d]));
          sum[r * dim + d] = from_float<T>(v);
          h[d] = v;
        }
      } else {
        for (int64_t d = 0; d < dim; ++d) h[d] = to_float(xr[d]);
      }
      for (int64_t d = 0; d < dim; ++d) squares += h[d] * h[d];
      const float inv = 1.f / std::sqrt(squares / static_cast<float>(dim) + eps);
      T* o = out + r * dim;
      if (has_offset) {
        for (int64_t d = 0; d < dim; ++d) o[d] = from_float<T>(w[d] * (h[d] * inv));
      } else {
        for (int64_t d = 0; d < dim; ++d) o[d] = from_float<T>(w[d] * round_to<T>(h[d] * inv));
      }
    }
  });
}

// x[t, h, :] = x * cos[t] + roll(x, D/2) * sin[t] in place (sin carries rotate-half's sign).
template <typename T>
void rotary_kernel(T* x, const Rows& rows, const T* cos, const T* sin, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows.count, grain(dim), [&](int64_t begin, int64_t end) {
    std::vector<float> v(dim);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + rows.offset(r);
      const T* c = cos + (r / rows.inner) * dim;
      const T* s = sin + (r / rows.inner) * dim;
      for (int64_t d = 0; d < dim; ++d) v[d] = to_float(xr[d]);
      // the two halves apart, so that each loop vectorizes (no index wrap-around)
      for (int64_t d = 0; d < half; ++d) {
        const float a = round_to<T>(v[d] * to_float(c[d]));
        const float b = round_to<T>(v[d + half] * to_float(s[d]));
        xr[d] = from_float<T>(a + b);
      }
      for (int64_t d = half; d < dim; ++d) {
        const float a = round_to<T>(v[d] * to_float(c[d]));
        const float b = round_to<T>(v[d - half] * to_float(s[d]));
        xr[d] = from_float<T>(a + b);
      }
    }
  });
}

// out[t] = silu(gate) * up, gate and up the two halves of gate_up[t].
template <typename T>
void silu_mul_kernel(const T* gate_up, const Rows& rows, int64_t width, T* out) {
  at::parallel_for(0, rows.count, grain(width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + rows.offset(r);
      const T* u = g + width;
      T* o = out + r * width;
      for (int64_t d = 0; d < width; ++d) {
        const float gv = to_float(g[d]);
        const float act = round_to<T>(gv / (1.f + std::exp(-gv)));
        o[d] = from_float<T>(act * to_float(u[d]));
      }
    }
  });
}

}  // namespace

std::vector<torch::Tensor> rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual,
                                    torch::Tensor weight, double eps, double offset) {
  const Rows rows(x);
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.numel() == dim, "rms_norm: weight size");
  auto out = torch::empty(x.sizes(), x.options());
  torch::Tensor sum;
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rms_norm: residual shape/dtype");
    *residual = residual->contiguous();
    sum = torch::empty(x.sizes(), x.options());
  }
  const auto w = weight_as_float(weight, static_cast<float>(offset));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(),
                              residual ? residual->data_ptr<scalar_t>() : nullptr, rows, w.data(),
                              offset != 0.0, static_cast<float>(eps), dim,
                              residual ? sum.data_ptr<scalar_t>() : nullptr,
                              out.data_ptr<scalar_t>());
  });
  if (residual) return {sum, out};
  return {out};
}

void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  const Rows rows(x);
  const int64_t dim = x.size(-1);
  TORCH_CHECK(dim % 2 == 0, "rotary: odd head dim");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary: cos/sin must be in x's dtype");
  TORCH_CHECK(cos.numel() == x.size(0) * dim && sin.numel() == cos.numel(),
              "rotary: cos/sin must hold one row per token");
  cos = cos.contiguous();
  sin = sin.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary", [&] {
    rotary_kernel<scalar_t>(x.data_ptr<scalar_t>(), rows, cos.data_ptr<scalar_t>(),
                            sin.data_ptr<scalar_t>(), dim);
  });
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "silu_mul: expected [T, 2I]");
  const Rows rows(gate_up);
  const int64_t width = gate_up.size(1) / 2;
  auto out = torch::empty({gate_up.size(0), width}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul",
                                  [&] {
                                    silu_mul_kernel<scalar_t>(gate_up.data_ptr<scalar_t>(), rows,
                                                              width, out.data_ptr<scalar_t>());
                                  });
  return out;
}
