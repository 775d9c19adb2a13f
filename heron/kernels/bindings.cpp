// The Python module of heron's CPU kernels (heron/kernels/__init__.py documents each op).
#include "heron_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
  m.def("write_rows_", &write_rows_, "rows of x into the paged cache at their slots");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally of x + residual (returns [sum,] normed)");
  m.def("rotary_", &rotary_, "rotary embedding in place");
  m.def("sparse_prefill_supported", &sparse_prefill_supported,
        "whether sparse_prefill runs here (AVX512_BF16)");
  m.def("sparse_prefill", &sparse_prefill, "block-sparse causal attention of a prefill chunk");
  m.def("xattention_scores", &xattention_scores, "XAttention's antidiagonal block scores");
  m.def("select_blocks", &select_blocks, "cumulative-threshold block selection per row");
  m.def("vnni_matmul", &vnni_matmul, "c + a b through the kernels' AVX512_BF16 tile loop");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
  m.def("apply_token_bitmask_", &apply_token_bitmask_,
        "-inf in the rows' logits wherever their token bitmask has a clear bit");
  m.def("int8_gemv_supported", &int8_gemv_supported,
        "whether int8_gemv runs here (AVX-512 or AVX2)");
  m.def("int8_gemv", &int8_gemv, "int8 weight-only product of a few bf16 rows");
  m.def("int4_gemv_supported", &int4_gemv_supported,
        "whether int4_gemv runs here (AVX-512 VNNI and VBMI, or AVX2)");
  m.def("int4_gemv_block", &int4_gemv_block, "the int4 pack's row block int4_gemv reads");
  m.def("int4_gemv", &int4_gemv, "int4 weight-only product of a few bf16 rows");
  m.def("bf16_gemv_supported", &bf16_gemv_supported,
        "whether bf16_gemv runs here (AVX512_BF16)");
  m.def("bf16_gemv_max_rows", &bf16_gemv_max_rows, "rows up to which bf16_gemv beats oneDNN");
  m.def("bf16_gemv", &bf16_gemv, "bf16 product of a few bf16 rows with a plain weight");
  m.def("dequantize_supported", &dequantize_supported,
        "whether dequantize_int4 and dequantize_int8 run here (AVX-512 bf16)");
  m.def("dequantize_int4", &dequantize_int4, "PyTorch's CPU int4 pack back to a bf16 weight");
  m.def("dequantize_int8", &dequantize_int8, "an int8 weight and its scales as bf16");
  m.def("dequantize_int4_float", &dequantize_int4_float,
        "PyTorch's CPU int4 pack back to a float32 weight");
  m.def("dequantize_int8_float", &dequantize_int8_float,
        "an int8 weight and its scales as float32");
  py::class_<DecodeLinear>(m, "DecodeLinear")
      .def(py::init<std::string, torch::Tensor, std::optional<torch::Tensor>, int64_t,
                    std::optional<torch::Tensor>, std::optional<torch::Tensor>>());
  using OptTensor = std::optional<torch::Tensor>;
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<torch::Tensor, DecodeLinear, DecodeLinear, torch::Tensor, DecodeLinear,
                    DecodeLinear, OptTensor, OptTensor, OptTensor, OptTensor, bool>());
  py::class_<DecodeOptions>(m, "DecodeOptions")
      .def(py::init<int64_t, int64_t, int64_t, double, double, double, bool>());
  py::class_<DecodeLayers>(m, "DecodeLayers")
      .def(py::init<std::vector<DecodeLayer>, DecodeOptions>())
      .def("forward", &DecodeLayers::forward, "the decoder layers of a step of decode rows");
}
