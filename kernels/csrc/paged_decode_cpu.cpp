// Paged decode attention for CPUs: one query token per sequence attends over its KV blocks
// read in place (no gathered copy). Layouts as in kernels/reference.py:
//   q, out:            [num_seqs, num_heads, head_dim]
//   k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim] (contiguous)
//   block_tables:      int32 [num_seqs, max_blocks_per_seq]
//   context_lens:      int32 [num_seqs]
// One task per (sequence, kv head) handles all query heads of that group, so each K/V row
// is read once per kv head, in one pass with an online softmax (runs of up to kChunk slots:
// scores, rescale the running max and sum, add the V rows). Scores, softmax and
// accumulation are fp32 for every input type; AVX-512 builds (16 lanes) and AVX2 builds with
// FMA (8 lanes: same loops, twice the registers per row) use intrinsics for the dot products
// and V updates, others the scalar loops; a bf16 or fp16 row is converted to fp32 once for
// the whole group of query heads (groups of 2-4), not once per head. A bf16 or fp16 cache
// under an fp32 query (a half-width cache for a full-precision model) is read as fp32 the
// same way. An int8 or fp8 cache (kernels/kv_quant.py: rows of head_dim int8 values or
// e4m3 codes, then an fp16 scale) is dequantized as it is read: the dot product and the V
// update run on the decoded values and the row's scale multiplies the score and the
// softmax weight; rows stored rotated (H x, kv_quant.h) are met by rotating the query in
// and the output back.
#include "ops.h"
#include "cpu_dtype_io.h"
#include "kv_quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// One e4m3fn code of an fp8 cache row (a distinct type, so templates tell it from uint8).
struct E4M3 {
  uint8_t code;
  explicit operator float() const { return splitserve_cpu::fp8_e4m3_table()[code]; }
};
static_assert(sizeof(E4M3) == 1);

template <typename cache_t>
constexpr bool kQuantized = std::is_same_v<cache_t, int8_t> || std::is_same_v<cache_t, E4M3>;

// e^x for x <= 0 (softmax numerators), branch-free so loops over it vectorize: x = n ln2 + r,
// e^r by a degree-6 Taylor polynomial on |r| <= ln2/2 (relative error < 2e-7), 2^n by
// building the float's exponent bits. Inputs below -87 flush to 0.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693147180559945309f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// The vector layer of cpu_dtype_io.h (Vec: kLanes fp32 lanes, 16 with AVX-512, 8 with
// AVX2), and vload for kLanes elements of every cache type as fp32.
#if defined(SPLITSERVE_SIMD)
using splitserve_cpu::kLanes;
using splitserve_cpu::Vec;
using splitserve_cpu::vfmadd;
using splitserve_cpu::vload;  // float rows; the cache types' overloads below
using splitserve_cpu::vmul;
using splitserve_cpu::vset1;
using splitserve_cpu::vstore;
using splitserve_cpu::vsum;
using splitserve_cpu::vzero;
#if defined(SPLITSERVE_SIMD_AVX2)
inline Vec vload(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline Vec vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
// e4m3 codes as fp16 bits, as in the AVX-512 version below.
inline Vec vload(const E4M3* p) {
  const __m128i raw = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i magnitude = _mm_slli_epi16(_mm_and_si128(raw, _mm_set1_epi16(0x7F)), 7);
  const __m128i sign = _mm_slli_epi16(_mm_and_si128(raw, _mm_set1_epi16(0x80)), 8);
  return _mm256_mul_ps(_mm256_cvtph_ps(_mm_or_si128(magnitude, sign)), _mm256_set1_ps(256.0f));
}
#else
inline Vec vload(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline Vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline Vec vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// e4m3 codes as fp16 bits (sign to bit 15, exponent and mantissa shifted up by 7): the same
// value divided by 2^8 (the biases differ by 8), subnormals included; then * 2^8 (exact).
inline Vec vload(const E4M3* p) {
  const __m256i raw =
      _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i magnitude = _mm256_slli_epi16(_mm256_and_si256(raw, _mm256_set1_epi16(0x7F)), 7);
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(raw, _mm256_set1_epi16(0x80)), 8);
  return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_or_si256(magnitude, sign)),
                       _mm512_set1_ps(256.0f));
}
#endif
#endif

// Bytes after the int8 values of a quantized row: its fp16 scale.
constexpr int64_t kScaleBytes = 2;

// The scale of one cache row: 1 for float caches, the stored fp16 for quantized ones.
template <typename cache_t>
inline float row_scale(const cache_t* row, int64_t head_dim) {
  if constexpr (kQuantized<cache_t>) {
    uint16_t bits;
    std::memcpy(&bits, row + head_dim, sizeof(bits));
    return c10::detail::fp16_ieee_to_fp32_value(bits);
  } else {
    return 1.0f;
  }
}

// sum_d a[d] * b[d] in fp32.
template <typename scalar_t>
inline float dot(const float* a, const scalar_t* b, int64_t n) {
  int64_t d = 0;
  float total = 0.0f;
#if defined(SPLITSERVE_SIMD)
  if constexpr (!std::is_same_v<scalar_t, double>) {
    Vec acc = vzero();
    for (; d + kLanes <= n; d += kLanes) acc = vfmadd(vload(a + d), vload(b + d), acc);
    total = vsum(acc);
  }
#endif
  for (; d < n; ++d) total += a[d] * static_cast<float>(b[d]);
  return total;
}

// a[d] += p * b[d] in fp32.
template <typename scalar_t>
inline void axpy(float* a, float p, const scalar_t* b, int64_t n) {
  int64_t d = 0;
#if defined(SPLITSERVE_SIMD)
  if constexpr (!std::is_same_v<scalar_t, double>) {
    const Vec pv = vset1(p);
    for (; d + kLanes <= n; d += kLanes) vstore(a + d, vfmadd(pv, vload(b + d), vload(a + d)));
  }
#endif
  for (; d < n; ++d) a[d] += p * static_cast<float>(b[d]);
}

// Asks for the cache lines of one K/V row ahead of use: the rows of a sequence are scattered
// over its blocks, so the hardware prefetcher cannot follow them across block boundaries.
template <int Locality, typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t n) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < n * static_cast<int64_t>(sizeof(scalar_t)); byte += 64)
    __builtin_prefetch(p + byte, 0, Locality);
}

constexpr int64_t kPrefetchAhead = 8;  // K rows requested ahead of the dot products

// Slots per run of the online softmax (scores of one run are kept, then folded in).
constexpr int64_t kChunk = 64;

#if defined(SPLITSERVE_SIMD)
// Register-blocked loops for unquantized caches whose head_dim is kVecs x kLanes (64,
// 128): one query head's q (for the scores) or output row (for the V sum) stays in kVecs
// vector registers (with AVX2 at head_dim 128 the compiler spills some)
// across a run of slots, instead of a load and store per slot. Each loop also asks for
// `ahead_count` rows of `ahead_elems` elements of the same cache at ahead_offset[i], one per
// slot: the next run's rows, so the requests spread over the computation that hides them
// (asked for all at once at the start of each run instead, the attention of a SmolLM2
// batch-16 decode step, 30 layers, took 14.0 ms against 11.8 on a 2-core Zen 4).

// s[i] = q . K[row_offset[i]] for the run's `count` slots; q: kVecs x kLanes floats.
template <int kVecs, typename cache_t>
inline void run_scores(const float* q, const cache_t* k_ptr, const int64_t* row_offset,
                       int64_t count, float* s, const int64_t* ahead_offset,
                       int64_t ahead_count, int64_t ahead_elems) {
  Vec qv[kVecs];
  for (int j = 0; j < kVecs; ++j) qv[j] = vload(q + kLanes * j);
  for (int64_t i = 0; i < count; ++i) {
    if (i < ahead_count) prefetch_row<2>(k_ptr + ahead_offset[i], ahead_elems);
    const cache_t* row = k_ptr + row_offset[i];
    Vec t = vmul(qv[0], vload(row));
    for (int j = 1; j < kVecs; ++j) t = vfmadd(qv[j], vload(row + kLanes * j), t);
    s[i] = vsum(t);
  }
}

// acc += sum_i p[i] * V[row_offset[i]] over the run; acc: kVecs x kLanes floats.
template <int kVecs, typename cache_t>
inline void run_values(float* acc, const float* p, const cache_t* v_ptr,
                       const int64_t* row_offset, int64_t count, const int64_t* ahead_offset,
                       int64_t ahead_count, int64_t ahead_elems) {
  Vec av[kVecs];
  for (int j = 0; j < kVecs; ++j) av[j] = vload(acc + kLanes * j);
  for (int64_t i = 0; i < count; ++i) {
    if (i < ahead_count) prefetch_row<2>(v_ptr + ahead_offset[i], ahead_elems);
    const cache_t* row = v_ptr + row_offset[i];
    const Vec pi = vset1(p[i]);
    for (int j = 0; j < kVecs; ++j) av[j] = vfmadd(pi, vload(row + kLanes * j), av[j]);
  }
  for (int j = 0; j < kVecs; ++j) vstore(acc + kLanes * j, av[j]);
}

// Grouped forms for caches whose rows are converted as they are read (bf16, fp16): each row
// is converted once for all kGroup query heads of its kv head, instead of once per head
// (the per-head loops above convert every K and V row `group` times: at SmolLM2's group of
// 3 that conversion bounded the AVX2 decode attention's time). Per head the products are
// added in the same order as in the per-head loops, so the results are the same bits.

// s[g * kChunk + i] = q_g . K[row_offset[i]] for every head g of the group.
template <int kVecs, int kGroup, typename cache_t>
inline void run_scores_grouped(const float* q, int64_t head_dim, const cache_t* k_ptr,
                               const int64_t* row_offset, int64_t count, float* s,
                               const int64_t* ahead_offset, int64_t ahead_count) {
  for (int64_t i = 0; i < count; ++i) {
    if (i < ahead_count) prefetch_row<2>(k_ptr + ahead_offset[i], head_dim);
    const cache_t* row = k_ptr + row_offset[i];
    Vec kv[kVecs];
    for (int j = 0; j < kVecs; ++j) kv[j] = vload(row + kLanes * j);
    for (int g = 0; g < kGroup; ++g) {
      const float* qg = q + g * head_dim;
      Vec t = vmul(vload(qg), kv[0]);
      for (int j = 1; j < kVecs; ++j) t = vfmadd(vload(qg + kLanes * j), kv[j], t);
      s[g * kChunk + i] = vsum(t);
    }
  }
}

// acc_g += sum_i p[g * kChunk + i] * V[row_offset[i]] for every head g, kSlice vectors of
// the row at a time (kGroup x kSlice accumulators stay in registers).
template <int kVecs, int kGroup, typename cache_t>
inline void run_values_grouped(float* acc, int64_t head_dim, const float* p,
                               const cache_t* v_ptr, const int64_t* row_offset, int64_t count,
                               const int64_t* ahead_offset, int64_t ahead_count) {
  constexpr int kSlice = 2;
  static_assert(kVecs % kSlice == 0);
  for (int j0 = 0; j0 < kVecs; j0 += kSlice) {
    Vec av[kGroup][kSlice];
    for (int g = 0; g < kGroup; ++g)
      for (int j = 0; j < kSlice; ++j) av[g][j] = vload(acc + g * head_dim + kLanes * (j0 + j));
    for (int64_t i = 0; i < count; ++i) {
      if (j0 == 0 && i < ahead_count) prefetch_row<2>(v_ptr + ahead_offset[i], head_dim);
      const cache_t* row = v_ptr + row_offset[i] + kLanes * j0;
      Vec pv[kGroup];
      for (int g = 0; g < kGroup; ++g) pv[g] = vset1(p[g * kChunk + i]);
      for (int j = 0; j < kSlice; ++j) {
        const Vec v = vload(row + kLanes * j);
        for (int g = 0; g < kGroup; ++g) av[g][j] = vfmadd(pv[g], v, av[g][j]);
      }
    }
    for (int g = 0; g < kGroup; ++g)
      for (int j = 0; j < kSlice; ++j) vstore(acc + g * head_dim + kLanes * (j0 + j), av[g][j]);
  }
}
#endif

// Cache types the register loops read (vload has them; quantized rows carry scales).
template <typename cache_t>
constexpr bool kRegisterLoops = !kQuantized<cache_t> && !std::is_same_v<cache_t, double>;

// The register loops' kVecs for this cache type and head_dim, or 0 where they do not apply.
template <typename cache_t>
inline int register_vecs(int64_t head_dim) {
#if defined(SPLITSERVE_SIMD)
  if constexpr (kRegisterLoops<cache_t>) {
    if (head_dim == 64 || head_dim == 128) return static_cast<int>(head_dim / kLanes);
  }
#endif
  return 0;
}

// f(std::integral_constant<int, kVecs>{}) for vecs = register_vecs(head_dim): 4 or 8 (AVX-512),
// 8 or 16 (AVX2).
template <typename F>
inline void with_vecs(int vecs, F&& f) {
  if (vecs == 4)
    f(std::integral_constant<int, 4>{});
  else if (vecs == 8)
    f(std::integral_constant<int, 8>{});
  else
    f(std::integral_constant<int, 16>{});
}

// Cache types the grouped loops read: those converted to fp32 as they are read.
template <typename cache_t>
constexpr bool kGroupedLoops =
    std::is_same_v<cache_t, c10::BFloat16> || std::is_same_v<cache_t, c10::Half>;

// The grouped loops' group size for this cache, kVecs and group, or 0 where they do not
// apply (the row's vectors, a few accumulators and q's loads must fit the registers).
template <typename cache_t>
inline int grouped_heads(int vecs, int64_t group) {
  if constexpr (kGroupedLoops<cache_t>) {
    if (vecs > 0 && vecs <= 8 && group >= 2 && group <= 4) return static_cast<int>(group);
  }
  return 0;
}

// f(kVecs, kGroup) as integral constants, for vecs in {4, 8} and group in {2, 3, 4}.
template <typename F>
inline void with_vecs_and_group(int vecs, int group, F&& f) {
  with_vecs(vecs, [&](auto v) {
    if constexpr (decltype(v)::value <= 8) {
      if (group == 2)
        f(v, std::integral_constant<int, 2>{});
      else if (group == 3)
        f(v, std::integral_constant<int, 3>{});
      else
        f(v, std::integral_constant<int, 4>{});
    }
  });
}

// Largest query-head group and head_dim served from stack scratch.
constexpr int64_t kStackGroup = 16;
constexpr int64_t kStackHeadDim = 256;

template <typename scalar_t, typename cache_t, bool kOnStack>
void decode_kernel(const torch::Tensor& q, const torch::Tensor& k_cache,
                   const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                   const torch::Tensor& context_lens, double scale, torch::Tensor& out) {
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const cache_t* k_ptr = reinterpret_cast<const cache_t*>(k_cache.data_ptr());
  const cache_t* v_ptr = reinterpret_cast<const cache_t*>(v_cache.data_ptr());
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const int64_t q_seq_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t o_seq_stride = out.stride(0), o_head_stride = out.stride(1);
  const int64_t row_width = k_cache.size(3);  // head_dim, or head_dim + scale bytes
  const int64_t token_stride = num_kv_heads * row_width;  // one slot of one cache
  const float fscale = static_cast<float>(scale);
  const int vecs = register_vecs<cache_t>(row_width);
  [[maybe_unused]] const int grouped = grouped_heads<cache_t>(vecs, group);
  const bool rotated = splitserve_cpu::kv_rotates(head_dim) &&
                       (std::is_same_v<cache_t, int8_t> ||
                        (std::is_same_v<cache_t, E4M3> && splitserve_cpu::kFp8Rotated));

  // One pass over the context with an online softmax: for each run of up to kChunk slots,
  // scores for every query head of the group, rescale the running sums, add the V rows.
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch for the group's query heads: on the stack for the usual shapes
    // (the compiler then knows it aliases nothing), else on the heap.
    alignas(64) float q_stack[kOnStack ? kStackGroup * kStackHeadDim : 1];
    alignas(64) float acc_stack[kOnStack ? kStackGroup * kStackHeadDim : 1];
    alignas(64) float score_stack[kOnStack ? kStackGroup * kChunk : 1];
    std::vector<float> q_heap, acc_heap, score_heap;
    if constexpr (!kOnStack) {
      q_heap.resize(group * head_dim);
      acc_heap.resize(group * head_dim);
      score_heap.resize(group * kChunk);
    }
    float* qf = kOnStack ? q_stack : q_heap.data();
    float* acc = kOnStack ? acc_stack : acc_heap.data();
    float* scores = kOnStack ? score_stack : score_heap.data();
    std::vector<float> running_max(group), running_sum(group);
    int64_t row_offset[kChunk], next_offset[kChunk];
    int64_t next_count = 0;  // rows of next_offset asked for (by the previous run or task)
    for (int64_t task = begin; task < end; ++task) {
      const bool asked_ahead = task > begin && next_count > 0;
      const int64_t seq = task / num_kv_heads, kv_head = task % num_kv_heads;
      const int64_t length = lens[seq];
      for (int64_t g = 0; g < group; ++g) {
        const scalar_t* src = q_ptr + seq * q_seq_stride + (kv_head * group + g) * q_head_stride;
        for (int64_t d = 0; d < head_dim; ++d)
          qf[g * head_dim + d] = static_cast<float>(src[d]) * fscale;
        running_max[g] = -std::numeric_limits<float>::infinity();
        running_sum[g] = 0.0f;
        if (rotated) splitserve_cpu::hadamard_inplace(qf + g * head_dim, head_dim);
      }
      std::fill(acc, acc + group * head_dim, 0.0f);
      const int32_t* table = tables + seq * max_blocks;
      const int64_t head_offset = kv_head * row_width;
      int64_t block_index = 0, slot = 0;
      for (int64_t t0 = 0; t0 < length; t0 += kChunk) {
        const int64_t count = std::min(kChunk, length - t0);
        // Element offsets of this run's slots (shared by K and V), walking the block table.
        for (int64_t i = 0; i < count; ++i) {
          row_offset[i] = (table[block_index] * block_size + slot) * token_stride + head_offset;
          if (++slot == block_size) slot = 0, ++block_index;
          if (!vecs && i < kPrefetchAhead) prefetch_row<3>(k_ptr + row_offset[i], head_dim);
        }
        if (vecs) {
          if (t0 == 0 && !asked_ahead)  // nothing asked for the task's first run yet
            for (int64_t i = 0; i < count; ++i) {
              prefetch_row<3>(k_ptr + row_offset[i], head_dim);
              prefetch_row<2>(v_ptr + row_offset[i], head_dim);
            }
          // The rows of the next run, or of the next task's first run, to ask for meanwhile.
          next_count = std::max<int64_t>(0, std::min(kChunk, length - t0 - kChunk));
          int64_t next_block = block_index, next_slot = slot;
          for (int64_t i = 0; i < next_count; ++i) {
            next_offset[i] =
                (table[next_block] * block_size + next_slot) * token_stride + head_offset;
            if (++next_slot == block_size) next_slot = 0, ++next_block;
          }
          if (next_count == 0 && task + 1 < end) {
            const int64_t next_seq = (task + 1) / num_kv_heads;
            const int64_t next_head = ((task + 1) % num_kv_heads) * row_width;
            const int32_t* next_table = tables + next_seq * max_blocks;
            next_count = std::min<int64_t>(kChunk, lens[next_seq]);
            for (int64_t i = 0; i < next_count; ++i)
              next_offset[i] = (next_table[i / block_size] * block_size + i % block_size) *
                                   token_stride + next_head;
          }
#if defined(SPLITSERVE_SIMD)
          if constexpr (kRegisterLoops<cache_t>) {
            if (grouped)
              with_vecs_and_group(vecs, grouped, [&](auto v, auto g) {
                run_scores_grouped<decltype(v)::value, decltype(g)::value>(
                    qf, head_dim, k_ptr, row_offset, count, scores, next_offset, next_count);
              });
            else
              for (int64_t g = 0; g < group; ++g)
                with_vecs(vecs, [&](auto v) {
                  run_scores<decltype(v)::value>(qf + g * head_dim, k_ptr, row_offset, count,
                                                 scores + g * kChunk, next_offset,
                                                 g == 0 ? next_count : 0, head_dim);
                });
          }
#endif
        } else for (int64_t i = 0; i < count; ++i) {
          const cache_t* krow = k_ptr + row_offset[i];
          if (i + kPrefetchAhead < count)
            prefetch_row<3>(k_ptr + row_offset[i + kPrefetchAhead], head_dim);
          prefetch_row<2>(v_ptr + row_offset[i], head_dim);  // used after this run's scores
          const float kscale = row_scale(krow, head_dim);
          for (int64_t g = 0; g < group; ++g)
            scores[g * kChunk + i] = dot(qf + g * head_dim, krow, head_dim) * kscale;
        }
        for (int64_t g = 0; g < group; ++g) {
          float* s = scores + g * kChunk;
          float chunk_max = running_max[g];
          for (int64_t i = 0; i < count; ++i) chunk_max = std::max(chunk_max, s[i]);
          const float correction = exp_nonpositive(running_max[g] - chunk_max);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < count; ++i) {
            s[i] = exp_nonpositive(s[i] - chunk_max);
            sum += s[i];
          }
          running_sum[g] = running_sum[g] * correction + sum;
          running_max[g] = chunk_max;
          if (correction != 1.0f) {
            float* a = acc + g * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] *= correction;
          }
        }
        if (vecs) {
#if defined(SPLITSERVE_SIMD)
          if constexpr (kRegisterLoops<cache_t>) {
            if (grouped)
              with_vecs_and_group(vecs, grouped, [&](auto v, auto g) {
                run_values_grouped<decltype(v)::value, decltype(g)::value>(
                    acc, head_dim, scores, v_ptr, row_offset, count, next_offset, next_count);
              });
            else
              for (int64_t g = 0; g < group; ++g)
                with_vecs(vecs, [&](auto v) {
                  run_values<decltype(v)::value>(acc + g * head_dim, scores + g * kChunk,
                                                 v_ptr, row_offset, count, next_offset,
                                                 g == 0 ? next_count : 0, head_dim);
                });
          }
#endif
        } else for (int64_t i = 0; i < count; ++i) {
          const cache_t* vrow = v_ptr + row_offset[i];
          const float vscale = row_scale(vrow, head_dim);
          for (int64_t g = 0; g < group; ++g)
            axpy(acc + g * head_dim, scores[g * kChunk + i] * vscale, vrow, head_dim);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        scalar_t* dst = out_ptr + seq * o_seq_stride + (kv_head * group + g) * o_head_stride;
        // An empty context (length 0) gives zeros, as the reference does.
        const float inv = running_sum[g] > 0.0f ? 1.0f / running_sum[g] : 0.0f;
        if (rotated) splitserve_cpu::hadamard_inplace(acc + g * head_dim, head_dim);
        for (int64_t d = 0; d < head_dim; ++d)
          dst[d] = static_cast<scalar_t>(acc[g * head_dim + d] * inv);
      }
    }
  });
}

}  // namespace

// decode_kernel with its scratch on the stack where the group and head_dim fit.
template <typename scalar_t, typename cache_t>
void run_decode(bool on_stack, const torch::Tensor& q, const torch::Tensor& k_cache,
                const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                const torch::Tensor& context_lens, double scale, torch::Tensor& out) {
  if (on_stack)
    decode_kernel<scalar_t, cache_t, true>(q, k_cache, v_cache, block_tables, context_lens,
                                           scale, out);
  else
    decode_kernel<scalar_t, cache_t, false>(q, k_cache, v_cache, block_tables, context_lens,
                                            scale, out);
}

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
  TORCH_CHECK(q.scalar_type() == out.scalar_type(), "out dtype must match q");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V caches differ in dtype");
  // int8 rows (kChar) or fp8 rows (kByte: e4m3 codes), each followed by an fp16 scale; or
  // a float cache: q's dtype, or bf16 / fp16 under a wider (or other half) q, whose rows are
  // read as fp32 like q's own dtype.
  const auto cache_type = k_cache.scalar_type();
  const bool int8 = cache_type == torch::kChar;
  const bool fp8 = cache_type == torch::kByte;
  const bool same = cache_type == q.scalar_type();
  const bool half_cache = !same && (cache_type == at::kBFloat16 || cache_type == at::kHalf);
  TORCH_CHECK(int8 || fp8 || same || (half_cache && q.scalar_type() != at::kDouble),
              "cache dtype must match q (or be bfloat16 / float16 under a float q, int8, or "
              "uint8 for fp8)");
  TORCH_CHECK(k_cache.size(3) == q.size(2) + (int8 || fp8 ? kScaleBytes : 0),
              "cache rows must be head_dim wide (head_dim + 2 for int8 and fp8)");
  const bool on_stack = q.size(1) / k_cache.size(2) <= kStackGroup && q.size(2) <= kStackHeadDim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const auto run = [&](auto cache_tag) {
      run_decode<scalar_t, decltype(cache_tag)>(on_stack, q, k_cache, v_cache, block_tables,
                                                context_lens, scale, out);
    };
    if (int8) {
      run(int8_t{});
    } else if (fp8) {
      run(E4M3{});
    } else if (same) {
      run(scalar_t{});
    } else if constexpr (!std::is_same_v<scalar_t, double>) {
      if (cache_type == at::kBFloat16)
        run(c10::BFloat16{});
      else
        run(c10::Half{});
    }
  });
  return out;
}
