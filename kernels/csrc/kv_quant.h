// The quantized KV cache formats (kernels/kv_quant.py): rows of head_dim one-byte values
// (int8, or e4m3fn codes stored as uint8) then an fp16 scale. Rows whose head_dim is a
// power of two are stored as H x, H the orthonormal Walsh-Hadamard matrix (symmetric,
// H H = I), which spreads a few large channels over all of them before the per-row scale is
// chosen (fp8: while kFp8Rotated). Internal to this folder.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>

namespace splitserve_cpu {

inline bool kv_rotates(int64_t head_dim) {
  return head_dim >= 2 && (head_dim & (head_dim - 1)) == 0;
}

// x = H x in place (fp32), in the butterfly order of kv_quant.py's torch code (bit for bit:
// the same adds and subtracts, then one multiply by 1/sqrt(n) rounded to fp32).
inline void hadamard_inplace(float* x, int64_t n) {
  for (int64_t h = 1; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  for (int64_t j = 0; j < n; ++j) x[j] *= norm;
}

// ---- fp8 (OCP e4m3fn: sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities,
// 0x7F / 0xFF are NaN and never written) ----------------------------------------------

constexpr float kFp8Max = 448.0f;
constexpr bool kFp8Rotated = true;   // kv_quant.py's ROTATED["fp8"]
constexpr float kFp8RowLimit = 448.0f * 65504.0f;  // the largest |y| a row can hold

// The code of v (|v| <= 448), rounded to nearest even like torch's float8_e4m3fn
// conversion: e = max(exponent of |v|, -6) (-6: the subnormal range shares 2^-6's step),
// r = rne(|v| * 2^(3 - e)) (an exact scaling; r in [0, 16]), code = (e + 6) * 8 + r, where
// r = 16 carries into the next exponent by itself.
inline uint8_t fp8_e4m3_encode(float v) {
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const float a = std::fabs(v);
  const int32_t e = std::max(static_cast<int32_t>((bits >> 23) & 0xFF) - 127, -6);
  const float step = std::bit_cast<float>(static_cast<uint32_t>(130 - e) << 23);  // 2^(3-e)
  const int32_t r = static_cast<int32_t>(std::nearbyint(a * step));
  return static_cast<uint8_t>(((bits >> 31) << 7) | ((e + 6) * 8 + r));
}

// The value of a code, exactly (NaN codes read as 480, like the Triton interpreter).
constexpr float fp8_e4m3_decode(uint8_t code) {
  const int32_t e = (code >> 3) & 0xF, m = code & 0x7;
  float magnitude = e == 0 ? static_cast<float>(m) : static_cast<float>(8 + m);
  // * 2^(max(e, 1) - 10), by halvings and doublings (exact; constexpr before C++23 ldexp)
  for (int32_t k = std::max(e, 1) - 10; k < 0; ++k) magnitude *= 0.5f;
  for (int32_t k = std::max(e, 1) - 10; k > 0; --k) magnitude *= 2.0f;
  return (code & 0x80) ? -magnitude : magnitude;
}

inline const std::array<float, 256>& fp8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[c] = fp8_e4m3_decode(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}

}  // namespace splitserve_cpu
