// Paged decode attention for CPUs: one query token per sequence attends over its KV blocks
// read in place (no gathered copy). Layouts as in kernels/reference.py:
//   q, out:            [num_seqs, num_heads, head_dim]
//   k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim] (contiguous)
//   block_tables:      int32 [num_seqs, max_blocks_per_seq]
//   context_lens:      int32 [num_seqs]
// One task per (sequence, kv head) handles all query heads of that group, so each K/V row
// is read once per kv head. Scores, softmax and accumulation are fp32 for every input type.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode_kernel(const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                   const torch::Tensor& context_lens, double scale, torch::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t q_seq_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t o_seq_stride = out.stride(0), o_head_stride = out.stride(1);
  const int64_t token_stride = num_kv_heads * head_dim;  // one slot of one cache
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t length = lens[seq];
      scores.assign(group * length, 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = q_ptr + seq * q_seq_stride + (kv_head * group + g) * q_head_stride;
        for (int64_t d = 0; d < head_dim; ++d) qf[g * head_dim + d] = static_cast<float>(src[d]);
      }
      // Scores: q . k for every context slot, fp32, walking the block table.
      for (int64_t t0 = 0; t0 < length; t0 += block_size) {
        const int64_t block = tables[seq * max_blocks + t0 / block_size];
        const int64_t count = std::min(block_size, length - t0);
        const scalar_t* kblock = k_ptr + block * block_size * token_stride + kv_head * head_dim;
        for (int64_t i = 0; i < count; ++i) {
          const scalar_t* krow = kblock + i * token_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(krow[d]);
            scores[g * length + t0 + i] = dot * fscale;
          }
        }
      }
      // Softmax per query head.
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        float max_s = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < length; ++t) max_s = std::max(max_s, s[t]);
        float sum = 0.0f;
        for (int64_t t = 0; t < length; ++t) {
          s[t] = std::exp(s[t] - max_s);
          sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < length; ++t) s[t] *= inv;
      }
      // Weighted sum of V rows.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t0 = 0; t0 < length; t0 += block_size) {
        const int64_t block = tables[seq * max_blocks + t0 / block_size];
        const int64_t count = std::min(block_size, length - t0);
        const scalar_t* vblock = v_ptr + block * block_size * token_stride + kv_head * head_dim;
        for (int64_t i = 0; i < count; ++i) {
          const scalar_t* vrow = vblock + i * token_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * length + t0 + i];
            float* a = acc.data() + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(vrow[d]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = out_ptr + seq * o_seq_stride + (kv_head * group + g) * o_head_stride;
        for (int64_t d = 0; d < head_dim; ++d)
          dst[d] = static_cast<scalar_t>(acc[g * head_dim + d]);
      }
    }
  });
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache,
                                     torch::Tensor v_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale,
                                     torch::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q [S,H,D] and caches [N,B,KVH,D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "head_dim must be the innermost dim");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous());
  TORCH_CHECK(context_lens.scalar_type() == torch::kInt32 && context_lens.is_contiguous());
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads % num_kv_heads != 0");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    decode_kernel<scalar_t>(q, k_cache, v_cache, block_tables, context_lens, scale, out);
  });
  return out;
}
