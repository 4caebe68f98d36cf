// fp32 linear layers for the small row counts of CPU decode: y = x W^T (+ bias).
//
// The weight W [N, K] is repacked once into column panels, [ceil(N / 16), K, 16]: panel p
// holds output columns 16p..16p+15 (zero-padded), one 64-byte row per k, so the inner loop
// reads the weight as one sequential stream. A register tile of up to 8 rows x 3 panels
// (24 zmm accumulators) broadcasts x[r, k] against three weight vectors per k; each thread
// takes whole groups of 3 panels and walks every 8-row tile of x over a group while its
// ~110-300 KB stay in L2. The weight is read from memory once per call whatever the row
// count, so at 1-32 rows this is bandwidth-bound where library GEMMs (tuned for large M)
// are not. Accumulation is fp32 in k order. Needs AVX-512F; gemm_supported() says whether
// this build has it (the engine falls back to library GEMMs otherwise).
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;     // output columns per panel (one zmm of fp32)
constexpr int64_t kPanels = 3;     // panels per register tile
constexpr int64_t kTileRows = 8;   // rows of x per register tile
constexpr int64_t kPrefetchRows = 32;  // weight rows (64 B each) requested ahead of use

#if defined(__AVX512F__)
// y[r, 16p + j] = bias + sum_k x[r, k] * panel_p[k, j] for R rows and P panels.
template <int R, int P>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t panel_stride, int64_t k_dim,
                 const float* bias, float* y, int64_t ldy, int64_t columns_left) {
  __m512 acc[R][P];
  __mmask16 mask[P];  // the panel's real columns (the last panel may be partly padding)
  for (int p = 0; p < P; ++p) {
    const int64_t valid = std::min(kLanes, columns_left - p * kLanes);
    mask[p] = static_cast<__mmask16>(valid >= kLanes ? 0xFFFF : (1u << valid) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask[p], bias + p * kLanes) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][p] = b;
  }
  for (int64_t k = 0; k < k_dim; ++k) {
    __m512 wk[P];
    for (int p = 0; p < P; ++p) {
      wk[p] = _mm512_loadu_ps(w + p * panel_stride + k * kLanes);
      // One weight row is one cache line; asking for rows ahead overlaps the DRAM stream
      // with the FMAs (measured: -14% at 32 rows). Past the panel's end it touches the next
      // panel, or nothing harmful (prefetches do not fault).
      const float* ahead = w + p * panel_stride + (k + kPrefetchRows) * kLanes;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_fmadd_ps(xb, wk[p], acc[r][p]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + p * kLanes, mask[p], acc[r][p]);
}

template <int P>
void tile_rows(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t panel_stride,
               int64_t k_dim, const float* bias, float* y, int64_t ldy, int64_t columns_left) {
  switch (rows) {
#define SPLITSERVE_TILE_CASE(R) \
  case R: return tile<R, P>(x, ldx, w, panel_stride, k_dim, bias, y, ldy, columns_left);
    SPLITSERVE_TILE_CASE(1)
    SPLITSERVE_TILE_CASE(2)
    SPLITSERVE_TILE_CASE(3)
    SPLITSERVE_TILE_CASE(4)
    SPLITSERVE_TILE_CASE(5)
    SPLITSERVE_TILE_CASE(6)
    SPLITSERVE_TILE_CASE(7)
    default: return tile<8, P>(x, ldx, w, panel_stride, k_dim, bias, y, ldy, columns_left);
#undef SPLITSERVE_TILE_CASE
  }
}
#endif

}  // namespace

bool gemm_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

torch::Tensor pack_linear_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat32, "fp32 [N, K] weight");
  const int64_t n_dim = weight.size(0), k_dim = weight.size(1);
  const int64_t panels = (n_dim + kLanes - 1) / kLanes;
  // Padding columns must be zero: the tile computes them (and never stores them).
  auto packed = torch::zeros({panels, k_dim, kLanes}, weight.options());
  packed.narrow(0, 0, n_dim / kLanes)
      .copy_(weight.narrow(0, 0, n_dim / kLanes * kLanes).view({-1, kLanes, k_dim})
                 .transpose(1, 2));
  if (n_dim % kLanes) {
    packed[panels - 1].narrow(1, 0, n_dim % kLanes).copy_(
        weight.narrow(0, n_dim / kLanes * kLanes, n_dim % kLanes).transpose(0, 1));
  }
  return packed;
}

void linear_packed(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias,
                   torch::Tensor out) {
  TORCH_CHECK(gemm_supported(), "linear_packed needs an AVX-512 build");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 3, "x [M, K], out [M, N]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && out.scalar_type() == torch::kFloat32 &&
              packed.scalar_type() == torch::kFloat32, "fp32 only");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && packed.is_contiguous(),
              "rows of x and out must be contiguous");
  const int64_t rows = x.size(0), k_dim = x.size(1), n_dim = out.size(1);
  TORCH_CHECK(packed.size(1) == k_dim && packed.size(2) == kLanes, "packed weight K mismatch");
  TORCH_CHECK(packed.size(0) == (n_dim + kLanes - 1) / kLanes && out.size(0) == rows,
              "out [M, N] does not fit the packed weight");
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_dim && bias->is_contiguous() &&
                bias->scalar_type() == torch::kFloat32, "bias [N] fp32, contiguous");
    bias_ptr = bias->data_ptr<float>();  // the tile's masked loads stay inside [0, N)
  }
#if defined(__AVX512F__)
  const float* x_ptr = x.data_ptr<float>();
  const float* w_ptr = packed.data_ptr<float>();
  float* y_ptr = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  const int64_t panel_stride = k_dim * kLanes;
  const int64_t panels = packed.size(0);
  const int64_t groups = (panels + kPanels - 1) / kPanels;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * kPanels, count = std::min(kPanels, panels - first);
      const int64_t column = first * kLanes;
      const float* w = w_ptr + first * panel_stride;
      const float* b = bias_ptr ? bias_ptr + column : nullptr;
      for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
        const int64_t r = std::min(kTileRows, rows - r0);
        const float* xr = x_ptr + r0 * ldx;
        float* yr = y_ptr + r0 * ldy + column;
        const int64_t left = n_dim - column;
        if (count == 3) tile_rows<3>(r, xr, ldx, w, panel_stride, k_dim, b, yr, ldy, left);
        else if (count == 2) tile_rows<2>(r, xr, ldx, w, panel_stride, k_dim, b, yr, ldy, left);
        else tile_rows<1>(r, xr, ldx, w, panel_stride, k_dim, b, yr, ldy, left);
      }
    }
  });
#endif
}
