// Element types as fp32 for the CPU kernels (fused_ops_cpu.cpp; paged_decode_cpu.cpp uses
// the vector layer): per element and per vector of kLanes fp32 lanes (16 with AVX-512, 8
// with AVX2 + FMA + F16C; SPLITSERVE_SIMD says a build has one). Internal to this folder;
// an includer's own FP contraction setting applies (fused_ops_cpu.cpp turns contraction
// off before including it; no function here has an expression it could contract).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SPLITSERVE_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPLITSERVE_SIMD 1
#define SPLITSERVE_SIMD_AVX2 1
#endif

namespace splitserve_cpu {

#ifdef SPLITSERVE_SIMD
constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// One vector of fp32 lanes and the operations the kernels use, the same for either width.
// Each arithmetic operation rounds once, like its scalar operator (no fused multiply-add
// unless named), so a vector loop gives the bits of the scalar loop it replaces.
#ifdef SPLITSERVE_SIMD_AVX2
using Vec = __m256;
using VecI = __m256i;   // kLanes 32-bit integer lanes
using VecH = __m128i;   // kLanes 16-bit lanes
constexpr int64_t kLanes = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline float vsum(Vec v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vfnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vec vround(Vec v) { return _mm256_round_ps(v, kRoundNearest); }
inline Vec vneg(Vec v) { return _mm256_xor_ps(v, _mm256_set1_ps(-0.0f)); }
// where a > b (ordered), if_greater, else v
inline Vec vselect_gt(Vec a, Vec b, Vec if_greater, Vec v) {
  return _mm256_blendv_ps(v, if_greater, _mm256_cmp_ps(a, b, _CMP_GT_OQ));
}
inline Vec vselect_nan(Vec a, Vec if_nan, Vec v) {
  return _mm256_blendv_ps(v, if_nan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
// p * 2^n for integral n in [-125, 128] and p in [0.5, 2): p * 2^(n - 1) * 2, each exact
// while the result is normal (what _mm512_scalef_ps gives).
inline Vec vscale_pow2(Vec p, Vec n) {
  const VecI biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126));
  const Vec scale = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, scale), _mm256_set1_ps(2.0f));
}
inline VecI vbits(Vec v) { return _mm256_castps_si256(v); }
inline Vec vfrom_bits(VecI v) { return _mm256_castsi256_ps(v); }
inline VecI vadd_i(VecI a, VecI b) { return _mm256_add_epi32(a, b); }
inline VecI vand_i(VecI a, VecI b) { return _mm256_and_si256(a, b); }
inline VecI vset1_i(int32_t v) { return _mm256_set1_epi32(v); }
template <int kShift> VecI vshr_i(VecI v) { return _mm256_srli_epi32(v, kShift); }
template <int kShift> VecI vshl_i(VecI v) { return _mm256_slli_epi32(v, kShift); }
inline VecH load_half(const uint16_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline void store_half(uint16_t* p, VecH v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v);
}
inline VecI widen_u16(VecH v) { return _mm256_cvtepu16_epi32(v); }
// The low 16 bits of each 32-bit lane (every lane holds a value <= 0xFFFF).
inline VecH narrow_u16(VecI v) {
  return _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
}
inline Vec half_to_float(VecH v) { return _mm256_cvtph_ps(v); }
inline VecH float_to_half(Vec v) { return _mm256_cvtps_ph(v, kRoundNearest); }
#else
using Vec = __m512;
using VecI = __m512i;
using VecH = __m256i;
constexpr int64_t kLanes = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vfmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vfnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }
inline Vec vround(Vec v) { return _mm512_roundscale_ps(v, kRoundNearest); }
inline Vec vneg(Vec v) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), sign));
}
inline Vec vselect_gt(Vec a, Vec b, Vec if_greater, Vec v) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), v, if_greater);
}
inline Vec vselect_nan(Vec a, Vec if_nan, Vec v) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), v, if_nan);
}
inline Vec vscale_pow2(Vec p, Vec n) { return _mm512_scalef_ps(p, n); }
inline VecI vbits(Vec v) { return _mm512_castps_si512(v); }
inline Vec vfrom_bits(VecI v) { return _mm512_castsi512_ps(v); }
inline VecI vadd_i(VecI a, VecI b) { return _mm512_add_epi32(a, b); }
inline VecI vand_i(VecI a, VecI b) { return _mm512_and_si512(a, b); }
inline VecI vset1_i(int32_t v) { return _mm512_set1_epi32(v); }
template <int kShift> VecI vshr_i(VecI v) { return _mm512_srli_epi32(v, kShift); }
template <int kShift> VecI vshl_i(VecI v) { return _mm512_slli_epi32(v, kShift); }
inline VecH load_half(const uint16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void store_half(uint16_t* p, VecH v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
inline VecI widen_u16(VecH v) { return _mm512_cvtepu16_epi32(v); }
inline VecH narrow_u16(VecI v) { return _mm512_cvtepi32_epi16(v); }
inline Vec half_to_float(VecH v) { return _mm512_cvtph_ps(v); }
inline VecH float_to_half(Vec v) { return _mm512_cvtps_ph(v, kRoundNearest); }
#endif

// bf16 bits, rounded like BF16::store (NaN -> 0x7FC0), in the low half of each 32-bit lane.
inline VecI bf16_bits(Vec v) {
  const VecI u = vbits(v);
  const VecI bias = vadd_i(vand_i(vshr_i<16>(u), vset1_i(1)), vset1_i(0x7FFF));
  const VecI rounded = vshr_i<16>(vadd_i(u, bias));
  return vbits(vselect_nan(v, vfrom_bits(vset1_i(0x7FC0)), vfrom_bits(rounded)));
}
#endif  // SPLITSERVE_SIMD

// The values of one element type as fp32: load, store (round to nearest even) and round
// (store then load: what a torch op writing a tensor of that dtype does to an fp32 result);
// with SIMD the same for kLanes lanes (loadv, storev, roundv), bit-identical.
struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float round(float v) { return v; }
#ifdef SPLITSERVE_SIMD
  static Vec loadv(const float* p) { return vload(p); }
  static void storev(float* p, Vec v) { vstore(p, v); }
  static Vec roundv(Vec v) { return v; }
#endif
};

struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t bits) { return std::bit_cast<float>(uint32_t{bits} << 16); }
  static uint16_t store(float v) {  // c10::BFloat16's rounding, branch-free
    const uint32_t u = std::bit_cast<uint32_t>(v);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
  static float round(float v) { return load(store(v)); }
#ifdef SPLITSERVE_SIMD
  static Vec loadv(const uint16_t* p) { return vfrom_bits(vshl_i<16>(widen_u16(load_half(p)))); }
  static void storev(uint16_t* p, Vec v) { store_half(p, narrow_u16(bf16_bits(v))); }
  static Vec roundv(Vec v) { return vfrom_bits(vshl_i<16>(bf16_bits(v))); }
#endif
};

struct F16 {
  using storage = uint16_t;
  // c10::Half's conversions (F16C where built with it); they do not auto-vectorize.
  static float load(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }
  static uint16_t store(float v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
  static float round(float v) { return load(store(v)); }
#ifdef SPLITSERVE_SIMD
  static Vec loadv(const uint16_t* p) { return half_to_float(load_half(p)); }
  static void storev(uint16_t* p, Vec v) { store_half(p, float_to_half(v)); }
  static Vec roundv(Vec v) { return half_to_float(float_to_half(v)); }
#endif
};

template <typename Fn>
void dispatch(at::ScalarType dtype, const char* name, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(F32{});
    case at::kBFloat16: return fn(BF16{});
    case at::kHalf: return fn(F16{});
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

template <typename IO>
typename IO::storage* ptr(const torch::Tensor& t) {
  return reinterpret_cast<typename IO::storage*>(t.data_ptr());
}

// Tokens per parallel_for task: about at::internal::GRAIN_SIZE elements of plain
// elementwise work, scaled by a relative cost; one token never starts a thread.
inline int64_t grain(int64_t elems_per_token, int64_t cost = 1) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems_per_token * cost));
}

inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// A row of fp32 values: the row itself for fp32, else converted into buf.
template <typename IO>
const float* as_float(const typename IO::storage* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<typename IO::storage, float>) {
    return src;
  } else {
    int64_t i = 0;
#ifdef SPLITSERVE_SIMD
    for (; i + kLanes <= n; i += kLanes) vstore(buf + i, IO::loadv(src + i));
#endif
    for (; i < n; ++i) buf[i] = IO::load(src[i]);
    return buf;
  }
}

}  // namespace splitserve_cpu
