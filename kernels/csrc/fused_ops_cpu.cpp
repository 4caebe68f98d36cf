// Fused elementwise CPU ops of one decoder layer, each replacing a chain of torch ops.
// Every intermediate the torch chain stores in a tensor is rounded to that tensor's dtype
// here too (round to nearest even), so rope + KV store and RMSNorm are bit-exact with the
// chain (RMSNorm: on x86 torch builds, see sum_of_squares) and silu differs only by its exp.
// Math is fp32 for every dtype. Layouts:
//   qkv:               [num_tokens, (num_heads + 2 * num_kv_heads) * head_dim], q | k | v heads
//   cos, sin:          [num_tokens, head_dim] or [num_tokens, 1, head_dim] (rope table rows)
//   k_cache, v_cache:  [num_blocks, block_size, num_kv_heads, head_dim] (contiguous): qkv's
//                      dtype, bf16 / fp16 (K/V rounded to it), or quantized (kv_quant.h)
//   slot_mapping:      int64 [num_tokens], block_id * block_size + offset, negative = skip
//   gate_up:           [num_tokens, 2 * intermediate] -> out [num_tokens, intermediate]
//   x, residual, out:  [num_tokens, hidden]; weight: [hidden]
// Rows may be strided (row stride free, innermost stride 1) except the caches. Tokens are
// split over threads (at::parallel_for; one token runs inline); two tokens given one slot
// race, as they would in index_copy_.
#include "ops.h"
#include "kv_quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// torch rounds a*b before adding c (separate kernels); gcc would contract a*b + c into one
// FMA even under -std=c++20, which changes fp32 results. Off for this file only (the
// attention kernel keeps it); fused multiply-adds that are wanted are written as madd().
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "cpu_dtype_io.h"

namespace {

using namespace splitserve_cpu;

// ---- rope + KV store ------------------------------------------------------------------

// One head in place: out = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1],
// rounding each product and the sum like torch's three elementwise ops.
template <typename IO>
void rotate_head(typename IO::storage* __restrict lo, typename IO::storage* __restrict hi,
                 const float* __restrict cos, const float* __restrict sin, int64_t half) {
  int64_t j = 0;
#ifdef SPLITSERVE_SIMD
  for (; j + kLanes <= half; j += kLanes) {
    const Vec x1 = IO::loadv(lo + j), x2 = IO::loadv(hi + j);
    const Vec a1 = IO::roundv(vmul(x1, vload(cos + j)));
    const Vec b1 = IO::roundv(vmul(x2, vload(sin + j)));
    const Vec a2 = IO::roundv(vmul(x2, vload(cos + half + j)));
    const Vec b2 = IO::roundv(vmul(x1, vload(sin + half + j)));
    IO::storev(lo + j, vsub(a1, b1));
    IO::storev(hi + j, vadd(a2, b2));
  }
#endif
  for (; j < half; ++j) {
    const float x1 = IO::load(lo[j]), x2 = IO::load(hi[j]);
    const float a1 = IO::round(x1 * cos[j]), b1 = IO::round(x2 * sin[j]);
    const float a2 = IO::round(x2 * cos[half + j]), b2 = IO::round(x1 * sin[half + j]);
    lo[j] = IO::store(a1 - b1);
    hi[j] = IO::store(a2 + b2);
  }
}

// One (token, head) row into a quantized cache (kernels/kv_quant.py's formats, bit for bit).
// y = H x for a power-of-two head_dim (int8; fp8 only if kFp8Rotated), else y = x.
// int8: scale = fp16(max |y| / 127), values round-half-even(y / scale) clamped to +-127.
// fp8: y made finite (NaN -> 0, clamped to +-kFp8RowLimit), scale = fp16(max |y| / 448),
// values the e4m3 codes of y / scale clamped to +-448. `y` is head_dim floats of scratch.
template <typename IO, bool kFp8>
void store_quantized_row(const typename IO::storage* src, uint8_t* dst, int64_t head_dim,
                         float* y) {
  for (int64_t d = 0; d < head_dim; ++d) y[d] = IO::load(src[d]);
  if (kv_rotates(head_dim) && (!kFp8 || kFp8Rotated)) hadamard_inplace(y, head_dim);
  if constexpr (kFp8) {
    for (int64_t d = 0; d < head_dim; ++d)
      y[d] = std::isnan(y[d]) ? 0.0f : std::min(kFp8RowLimit, std::max(-kFp8RowLimit, y[d]));
  }
  const float qmax = kFp8 ? kFp8Max : 127.0f;
  float amax = 0.0f;
  for (int64_t d = 0; d < head_dim; ++d) amax = std::max(amax, std::fabs(y[d]));
  const uint16_t bits = c10::detail::fp16_ieee_from_fp32_value(amax / qmax);
  const float scale = c10::detail::fp16_ieee_to_fp32_value(bits);
  const float safe = scale > 0.0f ? scale : 1.0f;
  for (int64_t d = 0; d < head_dim; ++d) {
    const float q = y[d] / safe;
    if constexpr (kFp8)
      dst[d] = fp8_e4m3_encode(std::min(qmax, std::max(-qmax, q)));
    else
      dst[d] = static_cast<uint8_t>(
          static_cast<int8_t>(std::min(qmax, std::max(-qmax, std::nearbyint(q)))));
  }
  std::memcpy(dst + head_dim, &bits, sizeof(bits));
}

// n values of one element type as another (round to nearest even), like Tensor.to.
template <typename From, typename To>
void convert_row(const typename From::storage* src, typename To::storage* dst, int64_t n) {
  int64_t i = 0;
#ifdef SPLITSERVE_SIMD
  for (; i + kLanes <= n; i += kLanes) To::storev(dst + i, From::loadv(src + i));
#endif
  for (; i < n; ++i) dst[i] = To::store(From::load(src[i]));
}

// CacheIO: the element type of a float cache (IO's own, or bf16 / fp16 under a wider qkv:
// the rows rounded to it as they are stored); unused for a quantized cache.
template <typename IO, typename CacheIO>
void rotary_store_kernel(const torch::Tensor& qkv, const torch::Tensor& cos,
                         const torch::Tensor& sin, const torch::Tensor& k_cache,
                         const torch::Tensor& v_cache, const int64_t* slots,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  using T = typename IO::storage;
  using C = typename CacheIO::storage;
  T* qkv_ptr = ptr<IO>(qkv);
  const T* cos_ptr = ptr<IO>(cos);
  const T* sin_ptr = ptr<IO>(sin);
  // An int8 (kChar) or fp8 (kByte: e4m3 codes) cache holds quantized rows of head_dim + 2
  // bytes (values, fp16 scale).
  const bool fp8 = k_cache.scalar_type() == torch::kByte;
  const bool quantized = fp8 || k_cache.scalar_type() == torch::kChar;
  C* k_ptr = quantized ? nullptr : ptr<CacheIO>(k_cache);
  C* v_ptr = quantized ? nullptr : ptr<CacheIO>(v_cache);
  uint8_t* kq_ptr = quantized ? static_cast<uint8_t*>(k_cache.data_ptr()) : nullptr;
  uint8_t* vq_ptr = quantized ? static_cast<uint8_t*>(v_cache.data_ptr()) : nullptr;
  const auto store_row = fp8 ? store_quantized_row<IO, true> : store_quantized_row<IO, false>;
  const int64_t row_stride = qkv.stride(0), cos_stride = cos.stride(0), sin_stride = sin.stride(0);
  const int64_t half = head_dim / 2, kv_size = num_kv_heads * head_dim;
  const int64_t q_size = num_heads * head_dim, num_rotated = num_heads + num_kv_heads;
  const int64_t num_tokens = qkv.size(0);

  at::parallel_for(0, num_tokens, grain(qkv.size(1), 2), [&](int64_t begin, int64_t end) {
    std::vector<float> table(2 * head_dim);  // this token's cos | sin in fp32 (half types)
    std::vector<float> rotated(quantized ? head_dim : 0);  // a row being quantized
    float* cf = table.data();
    float* sf = cf + head_dim;
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv_ptr + t * row_stride;
      const float* cos_row = as_float<IO>(cos_ptr + t * cos_stride, cf, head_dim);
      const float* sin_row = as_float<IO>(sin_ptr + t * sin_stride, sf, head_dim);
      for (int64_t h = 0; h < num_rotated; ++h) {
        T* x = row + h * head_dim;
        rotate_head<IO>(x, x + half, cos_row, sin_row, half);
      }
      if (slots[t] < 0) continue;
      if (quantized) {
        const int64_t qrow = head_dim + 2, offset = slots[t] * num_kv_heads * qrow;
        for (int64_t h = 0; h < num_kv_heads; ++h) {
          store_row(row + q_size + h * head_dim, kq_ptr + offset + h * qrow, head_dim,
                    rotated.data());
          store_row(row + q_size + kv_size + h * head_dim, vq_ptr + offset + h * qrow,
                    head_dim, rotated.data());
        }
        continue;
      }
      if constexpr (std::is_same_v<IO, CacheIO>) {
        std::memcpy(k_ptr + slots[t] * kv_size, row + q_size, kv_size * sizeof(T));
        std::memcpy(v_ptr + slots[t] * kv_size, row + q_size + kv_size, kv_size * sizeof(T));
      } else {
        convert_row<IO, CacheIO>(row + q_size, k_ptr + slots[t] * kv_size, kv_size);
        convert_row<IO, CacheIO>(row + q_size + kv_size, v_ptr + slots[t] * kv_size, kv_size);
      }
    }
  });
}

// ---- silu(gate) * up -----------------------------------------------------------------

// exp(x) for sigmoid's 1 + exp(x): n = round(x / ln2), r = x - n ln2 in two parts (the
// first exact), exp(r) by Taylor to degree 7 (|r| <= ln2/2: truncation < 1e-8 relative),
// times 2^n. Branch-free; the vector version below computes the same bits. Below -86 it
// returns exp(-86) (1 + anything under 2^-25 is 1); above ln(FLT_MAX), inf.
constexpr float kExpMin = -86.0f, kExpMax = 88.72283935546875f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kTaylor[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f,
                             1.0f};

inline float exp_for_sigmoid(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = std::min(std::max(x, kExpMin), kExpMax);
  const float shifted = xc * kLog2e + kShift;
  const float n = shifted - kShift;
  float r = xc - n * kLn2Hi;  // ln2's leading 9 bits: n * kLn2Hi is exact
  r = madd(-n, kLn2Lo, r);
  float p = kTaylor[0];
  for (int k = 1; k < 8; ++k) p = madd(p, r, kTaylor[k]);
  // 2^(n - 1) then * 2, so n = 128 (the top of the range) still has a normal scale.
  const uint32_t biased = std::bit_cast<uint32_t>(shifted) - 0x4B400000u + 126u;
  const float e = p * std::bit_cast<float>(biased << 23) * 2.0f;
  return x > kExpMax ? std::numeric_limits<float>::infinity() : e;
}

#ifdef SPLITSERVE_SIMD
inline Vec exp_for_sigmoid_v(Vec x) {
  const Vec xc = vmin(vmax(x, vset1(kExpMin)), vset1(kExpMax));
  const Vec n = vround(vmul(xc, vset1(kLog2e)));
  Vec r = vfnmadd(n, vset1(kLn2Hi), xc);  // n * kLn2Hi exact: the scalar version's bits
  r = vfnmadd(n, vset1(kLn2Lo), r);
  Vec p = vset1(kTaylor[0]);
  for (int k = 1; k < 8; ++k) p = vfmadd(p, r, vset1(kTaylor[k]));
  return vselect_gt(x, vset1(kExpMax), vset1(std::numeric_limits<float>::infinity()),
                    vscale_pow2(p, n));
}
#endif

// dst[i] = round(round(silu(gate[i])) * up[i]), silu(g) = g / (1 + exp(-g)) like F.silu.
template <typename IO>
void silu_mul_row(const typename IO::storage* __restrict gate,
                  const typename IO::storage* __restrict up, typename IO::storage* __restrict dst,
                  int64_t n) {
  int64_t i = 0;
#ifdef SPLITSERVE_SIMD
  const Vec one = vset1(1.0f);
  for (; i + kLanes <= n; i += kLanes) {
    const Vec g = IO::loadv(gate + i);
    const Vec silu = IO::roundv(vdiv(g, vadd(one, exp_for_sigmoid_v(vneg(g)))));
    IO::storev(dst + i, vmul(silu, IO::loadv(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float g = IO::load(gate[i]);
    const float silu = IO::round(g / (1.0f + exp_for_sigmoid(-g)));
    dst[i] = IO::store(silu * IO::load(up[i]));
  }
}

template <typename IO>
void silu_mul_kernel(const torch::Tensor& gate_up, const torch::Tensor& out) {
  using T = typename IO::storage;
  const T* in_ptr = ptr<IO>(gate_up);
  T* out_ptr = ptr<IO>(out);
  const int64_t n = out.size(1), in_stride = gate_up.stride(0), out_stride = out.stride(0);
  at::parallel_for(0, out.size(0), grain(n, 4), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* gate = in_ptr + t * in_stride;
      silu_mul_row<IO>(gate, gate + n, out_ptr + t * out_stride, n);
    }
  });
}

// ---- RMSNorm ---------------------------------------------------------------------------

// sum(x[i]^2) over a row in the order of torch's fp32 sum of a contiguous row on x86
// (cascade_sum in aten/src/ATen/native/cpu/SumKernel.cpp, 8-lane vectors): 4 interleaved
// vector accumulators with cascade levels every 16 steps, the leftover vectors into the
// first, the accumulators together, then a scalar sum of the tail plus the 8 lanes in order.
// Matching it makes RMSNorm bit-exact with torch's (for rows under 32768 elements, which
// torch does not split across threads); any order would be within a few ulp.
constexpr int64_t kMaxHidden = int64_t{1} << 24;  // torch's cascade step is 16 up to here

float sum_of_squares(const float* x, int64_t n) {
  constexpr int64_t kLanes = 8, kRows = 4, kLevels = 4, kPower = 4;
  constexpr int64_t kStep = int64_t{1} << kPower;
  const int64_t num_vecs = n / kLanes, size = num_vecs / kRows;
  float acc[kLevels][kRows * kLanes] = {};
  auto add_vecs = [&](float* into, int64_t first_vec, int64_t count) {
    const float* src = x + first_vec * kLanes;
    for (int64_t j = 0; j < count * kLanes; ++j) into[j] += src[j] * src[j];
  };
  int64_t i = 0;
  while (i + kStep <= size) {
    for (int64_t j = 0; j < kStep; ++j, ++i) add_vecs(acc[0], i * kRows, kRows);
    for (int64_t level = 1; level < kLevels; ++level) {
      for (int64_t j = 0; j < kRows * kLanes; ++j) {
        acc[level][j] += acc[level - 1][j];
        acc[level - 1][j] = 0.0f;
      }
      if ((i & ((kStep - 1) << (level * kPower))) != 0) break;
    }
  }
  for (; i < size; ++i) add_vecs(acc[0], i * kRows, kRows);
  for (int64_t level = 1; level < kLevels; ++level)
    for (int64_t j = 0; j < kRows * kLanes; ++j) acc[0][j] += acc[level][j];
  for (int64_t v = size * kRows; v < num_vecs; ++v) add_vecs(acc[0], v, 1);
  for (int64_t row = 1; row < kRows; ++row)
    for (int64_t lane = 0; lane < kLanes; ++lane) acc[0][lane] += acc[0][row * kLanes + lane];
  float total = 0.0f;
  for (int64_t j = num_vecs * kLanes; j < n; ++j) total += x[j] * x[j];
  for (int64_t lane = 0; lane < kLanes; ++lane) total += acc[0][lane];
  return total;
}

// out = round(round(x * r) * weight), r = 1 / sqrt(mean(x^2) + eps) (torch's rsqrt): for
// fp32 F.rms_norm with the weight; for half types the fp32 norm rounded, then times the
// weight (the model's RMSNorm).
template <typename IO>
void rms_norm_row(const float* x, const typename IO::storage* weight, typename IO::storage* out,
                  int64_t n, float eps) {
  const float r = 1.0f / std::sqrt(sum_of_squares(x, n) / static_cast<float>(n) + eps);
  int64_t i = 0;
#ifdef SPLITSERVE_SIMD
  const Vec rv = vset1(r);
  for (; i + kLanes <= n; i += kLanes) {
    const Vec normed = IO::roundv(vmul(vload(x + i), rv));
    IO::storev(out + i, vmul(normed, IO::loadv(weight + i)));
  }
#endif
  for (; i < n; ++i) out[i] = IO::store(IO::round(x[i] * r) * IO::load(weight[i]));
}

template <typename IO>
void rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& weight, float eps,
                     const torch::Tensor& out) {
  using T = typename IO::storage;
  const T* x_ptr = ptr<IO>(x);
  const T* w_ptr = ptr<IO>(weight);
  T* out_ptr = ptr<IO>(out);
  const int64_t n = x.size(1), x_stride = x.stride(0), out_stride = out.stride(0);
  at::parallel_for(0, x.size(0), grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : n);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = as_float<IO>(x_ptr + t * x_stride, buf.data(), n);
      rms_norm_row<IO>(row, w_ptr, out_ptr + t * out_stride, n, eps);
    }
  });
}

template <typename IO>
void add_rms_norm_kernel(const torch::Tensor& x, const torch::Tensor& residual,
                         const torch::Tensor& weight, float eps) {
  using T = typename IO::storage;
  T* x_ptr = ptr<IO>(x);
  T* res_ptr = ptr<IO>(residual);
  const T* w_ptr = ptr<IO>(weight);
  const int64_t n = x.size(1), x_stride = x.stride(0), res_stride = residual.stride(0);
  at::parallel_for(0, x.size(0), grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> sum(n);  // residual + x, rounded to the dtype, in fp32
    for (int64_t t = begin; t < end; ++t) {
      T* __restrict xr = x_ptr + t * x_stride;
      T* __restrict res = res_ptr + t * res_stride;
      int64_t i = 0;
#ifdef SPLITSERVE_SIMD
      for (; i + kLanes <= n; i += kLanes) {
        const Vec h = IO::roundv(vadd(IO::loadv(res + i), IO::loadv(xr + i)));
        vstore(sum.data() + i, h);
        IO::storev(res + i, h);
      }
#endif
      for (; i < n; ++i) {
        sum[i] = IO::round(IO::load(res[i]) + IO::load(xr[i]));
        res[i] = IO::store(sum[i]);
      }
      rms_norm_row<IO>(sum.data(), w_ptr, xr, n, eps);
    }
  });
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [num_tokens, n] with stride 1");
}

}  // namespace

void rotary_store_kv_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                      torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                      int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  const int64_t num_tokens = qkv.size(0);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even, got ", head_dim);
  TORCH_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim, "qkv width ",
              qkv.size(1), " != (num_heads + 2 * num_kv_heads) * head_dim");
  for (const torch::Tensor* table : {&cos, &sin}) {
    const bool rows = table->dim() == 2 || (table->dim() == 3 && table->size(1) == 1);
    TORCH_CHECK(rows && table->size(0) == num_tokens && table->size(-1) == head_dim &&
                    table->stride(-1) == 1,
                "cos/sin must be [num_tokens, head_dim] or [num_tokens, 1, head_dim]");
    TORCH_CHECK(table->scalar_type() == qkv.scalar_type(), "cos/sin dtype must match qkv");
  }
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "caches must both be [num_blocks, block_size, num_kv_heads, head_dim]");
  const bool quantized =
      k_cache.scalar_type() == torch::kChar || k_cache.scalar_type() == torch::kByte;
  TORCH_CHECK(k_cache.size(2) == num_kv_heads &&
                  k_cache.size(3) == head_dim + (quantized ? 2 : 0),
              "cache heads/head_dim do not match (int8/fp8 rows are head_dim + 2 wide)");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const bool half_cache = k_cache.scalar_type() == torch::kBFloat16 ||
                         k_cache.scalar_type() == torch::kHalf;
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  (quantized || half_cache || k_cache.scalar_type() == qkv.scalar_type()),
              "cache dtype must match qkv (or be bfloat16 / float16, int8, or uint8 for fp8)");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == num_tokens && slot_mapping.is_contiguous(),
              "slot_mapping must be contiguous int64 [num_tokens]");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < num_tokens; ++t)  // before any write: fail with the caches intact
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " out of range [0, ", num_slots, ")");
  if (num_tokens == 0) return;
  dispatch(qkv.scalar_type(), "rotary_store_kv_", [&](auto io) {
    using IO = decltype(io);
    if (quantized || k_cache.scalar_type() == qkv.scalar_type())
      return rotary_store_kernel<IO, IO>(qkv, cos, sin, k_cache, v_cache, slots, num_heads,
                                         num_kv_heads, head_dim);
    dispatch(k_cache.scalar_type(), "rotary_store_kv_ (cache)", [&](auto cache_io) {
      rotary_store_kernel<IO, decltype(cache_io)>(qkv, cos, sin, k_cache, v_cache, slots,
                                                  num_heads, num_kv_heads, head_dim);
    });
  });
}

void silu_and_mul(torch::Tensor gate_up, torch::Tensor out) {
  check_rows(gate_up, "gate_up");
  check_rows(out, "out");
  TORCH_CHECK(gate_up.size(0) == out.size(0) && gate_up.size(1) == 2 * out.size(1),
              "gate_up [num_tokens, 2 * n] needs out [num_tokens, n]");
  TORCH_CHECK(gate_up.scalar_type() == out.scalar_type(), "out dtype must match gate_up");
  dispatch(gate_up.scalar_type(), "silu_and_mul",
           [&](auto io) { silu_mul_kernel<decltype(io)>(gate_up, out); });
}

namespace {
void check_norm(const torch::Tensor& x, const torch::Tensor& weight) {
  check_rows(x, "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(),
              "weight must be contiguous [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype must match x");
  TORCH_CHECK(x.size(1) <= kMaxHidden, "hidden size ", x.size(1), " too large");
}
}  // namespace

void rms_norm(torch::Tensor x, torch::Tensor weight, double eps, torch::Tensor out) {
  check_norm(x, weight);
  check_rows(out, "out");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must match x");
  dispatch(x.scalar_type(), "rms_norm", [&](auto io) {
    rms_norm_kernel<decltype(io)>(x, weight, static_cast<float>(eps), out);
  });
}

// x and residual must not overlap.
void add_rms_norm_(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_norm(x, weight);
  check_rows(residual, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "residual must match x");
  dispatch(x.scalar_type(), "add_rms_norm_", [&](auto io) {
    add_rms_norm_kernel<decltype(io)>(x, residual, weight, static_cast<float>(eps));
  });
}
