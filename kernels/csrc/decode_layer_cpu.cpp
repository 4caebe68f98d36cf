// One decoder layer of a decode-only step in one call: the sequence of kernels that
// engine/model.py's fused CPU path runs for a layer (DecoderLayer.forward_fused, then the
// residual add and the next layer's RMSNorm), on the same tensors in the same order, so the
// bits are those of that path. What it saves is the Python between the kernels (nn.Module
// calls, attribute lookups, views, wrappers) and the OpenMP threads' wait for it between
// parallel regions: SmolLM2's batch-1 decode step 1.12-1.18x faster on a 2.4 GHz Zen 3
// (BENCHMARKS.md, "Each decoder layer of a decode step in one C++ call").
//
//   x:             [n, hidden], this layer's input_layernorm(residual)
//   residual:      [n, hidden], the residual stream; on return, this layer's output, in place
//   returns:       the next layer's input, next_norm(residual) (a new tensor)
//   cos, sin:      the step's rope table rows; caches, slot_mapping, block_tables,
//                  context_lens: as for rotary_store_kv_ and paged_decode_attention
//                  (one query token per sequence: row i of x is sequence i)
//   then the layer's own, the same at every step: pack_linear_weight of qkv_proj, o_proj,
//   gate_up_proj and down_proj with their optional biases and output widths, the
//   post-attention and the next layer's RMSNorm weights and eps, the attention's scale and
//   head layout.
#include "ops.h"

namespace {

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed,
                     const std::optional<torch::Tensor>& bias, int64_t out_features) {
  torch::Tensor out = x.new_empty({x.size(0), out_features});
  linear_packed(x, packed, bias, out);
  return out;
}

}  // namespace

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
    double scale, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  const int64_t n = x.size(0), q_size = num_heads * head_dim;
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.sizes() == x.sizes(),
              "x and residual [num_tokens, hidden], x contiguous");
  TORCH_CHECK(block_tables.size(0) == n && context_lens.size(0) == n,
              "a decode-only step: one block table and context length per row");
  torch::Tensor qkv = linear(x, qkv_packed, qkv_bias, qkv_features);
  rotary_store_kv_(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                   head_dim);
  torch::Tensor q = qkv.narrow(1, 0, q_size).view({n, num_heads, head_dim});
  torch::Tensor attn = torch::empty_like(q);
  paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, attn);
  torch::Tensor h = linear(attn.view({n, q_size}), o_packed, o_bias, o_features);
  add_rms_norm_(h, residual, post_norm_weight, post_norm_eps);  // residual += h; h = norm
  torch::Tensor gate_up = linear(h, gate_up_packed, gate_up_bias, gate_up_features);
  torch::Tensor act = gate_up.new_empty({n, gate_up_features / 2});
  silu_and_mul(gate_up, act);
  torch::Tensor mlp = linear(act, down_packed, down_bias, down_features);
  add_rms_norm_(mlp, residual, next_norm_weight, next_norm_eps);  // residual += mlp
  return mlp;
}
