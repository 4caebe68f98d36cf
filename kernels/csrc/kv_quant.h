// The int8 KV cache format's rotation (kernels/kv_quant.py): rows whose head_dim is a power
// of two are stored as H x, H the orthonormal Walsh-Hadamard matrix (symmetric, H H = I),
// which spreads a few large channels over all of them before the per-row int8 scale is
// chosen. Internal to this folder.
#pragma once

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

}  // namespace splitserve_cpu
