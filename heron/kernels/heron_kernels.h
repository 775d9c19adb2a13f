// heron's CPU kernels: one declaration per op bound in bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <vector>

// paged_decode.cpp
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor lens, int64_t block_size,
                           double scale);

// layer_ops.cpp
std::vector<torch::Tensor> rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual,
                                    torch::Tensor weight, double eps, double offset);
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);

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
