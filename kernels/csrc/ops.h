// Declarations of the CPU kernels bound in bindings.cpp (one extension module).
#pragma once

#include <torch/extension.h>

// paged_decode_cpu.cpp
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     torch::Tensor out);

// fused_ops_cpu.cpp (layouts and rounding rules at the top of that file)
void rotary_store_kv_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                      torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
void silu_and_mul(torch::Tensor gate_up, torch::Tensor out);
void rms_norm(torch::Tensor x, torch::Tensor weight, double eps, torch::Tensor out);
void add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);

// gemm_cpu.cpp: fp32 linear on a weight repacked into 16-column panels [ceil(N/16), K, 16];
// bf16 on panels of k pairs [ceil(N/16), K/2, 16, 2] (AVX512-BF16, or AVX2 widening to fp32)
bool gemm_supported();
bool gemm_bf16_supported();
std::string gemm_isa(bool bf16);
torch::Tensor pack_linear_weight(torch::Tensor weight);
void linear_packed(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias,
                   torch::Tensor out);

// One decoder layer of a decode-only step (decode_layer_cpu.cpp).
torch::Tensor decode_layer_(
    torch::Tensor x, torch::Tensor residual, torch::Tensor cos, torch::Tensor sin,
    torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
    torch::Tensor block_tables, torch::Tensor context_lens,
    torch::Tensor qkv_packed, std::optional<torch::Tensor> qkv_bias, int64_t qkv_features,
    torch::Tensor o_packed, std::optional<torch::Tensor> o_bias, int64_t o_features,
    torch::Tensor gate_up_packed, std::optional<torch::Tensor> gate_up_bias,
    int64_t gate_up_features,
    torch::Tensor down_packed, std::optional<torch::Tensor> down_bias, int64_t down_features,
    torch::Tensor post_norm_weight, double post_norm_eps,
    torch::Tensor next_norm_weight, double next_norm_eps,
    double scale, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
