// Element types as fp32 for the fused CPU kernels (fused_ops_cpu.cpp): per element and, with
// AVX-512, per 16 lanes. Internal to this folder; an includer's own FP contraction setting
// applies (fused_ops_cpu.cpp turns contraction off before including it).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace splitserve_cpu {

#if defined(__AVX512F__)
using Vec = __m512;  // 16 fp32 lanes
#define SPLITSERVE_AVX512 1

// bf16 bits, rounded like BF16::store, in the low half of each 32-bit lane.
inline __m512i bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7FC0));
}

inline __m256i load_256(const uint16_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void store_256(uint16_t* p, __m256i v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif

// The values of one element type as fp32: load, store (round to nearest even) and round
// (store then load: what a torch op writing a tensor of that dtype does to an fp32 result);
// with AVX-512 the same for 16 lanes (load16, store16, round16), bit-identical.
struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
  static float round(float v) { return v; }
#ifdef SPLITSERVE_AVX512
  static Vec load16(const float* p) { return _mm512_loadu_ps(p); }
  static void store16(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static Vec round16(Vec v) { return v; }
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
#ifdef SPLITSERVE_AVX512
  static Vec load16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(load_256(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static void store16(uint16_t* p, Vec v) { store_256(p, _mm512_cvtepi32_epi16(bf16_bits(v))); }
  static Vec round16(Vec v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16)); }
#endif
};

struct F16 {
  using storage = uint16_t;
  // c10::Half's conversions (F16C where built with it); they do not auto-vectorize.
  static float load(uint16_t bits) { return c10::detail::fp16_ieee_to_fp32_value(bits); }
  static uint16_t store(float v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
  static float round(float v) { return load(store(v)); }
#ifdef SPLITSERVE_AVX512
  static Vec load16(const uint16_t* p) { return _mm512_cvtph_ps(load_256(p)); }
  static void store16(uint16_t* p, Vec v) { store_256(p, _mm512_cvtps_ph(v, kRoundNearest)); }
  static Vec round16(Vec v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, kRoundNearest)); }
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
#ifdef SPLITSERVE_AVX512
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(buf + i, IO::load16(src + i));
#endif
    for (; i < n; ++i) buf[i] = IO::load(src[i]);
    return buf;
  }
}

}  // namespace splitserve_cpu
