// fp32 and bf16 linear layers for the small row counts of CPU decode: y = x W^T (+ bias).
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
//
// bf16 (AVX512-BF16, gemm_bf16_supported()): the same tiling on panels of k pairs,
// [ceil(N / 16), K / 2, 16, 2]: one 64-byte line holds W[16p + j, 2k'] and W[16p + j, 2k' + 1]
// for the panel's 16 columns, which is what vdpbf16ps multiplies against a broadcast pair
// (x[r, 2k'], x[r, 2k' + 1]), accumulating in fp32; the result is rounded to bf16 once (bias
// added in fp32 first). Half the bytes of the fp32 weight, so a decode step reads half as
// much: measured on a Zen 4 (2 threads), oneDNN's packed bf16 linear reached half the
// bandwidth the fp32 panels reach.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

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

// tile_rows<P> (fp32) and tile_rows_bf16<P>: `rows` rows of x against P panels; k_steps is K
// (fp32) or K / 2 (bf16 k pairs).
template <typename T>
using TileRowsFn = void (*)(int64_t rows, const T* x, int64_t ldx, const T* w,
                            int64_t panel_stride, int64_t k_steps, const T* bias, T* y,
                            int64_t ldy, int64_t columns_left);

// y = x W^T (+ bias): each task takes a group of kPanels panels (the last may hold fewer) and
// walks every kTileRows-row tile of x over it, so the group's weights stay in L2.
template <typename T>
void over_panel_groups(const TileRowsFn<T> (&tiles)[kPanels], int64_t rows, int64_t n_dim,
                       int64_t panels, int64_t panel_stride, int64_t k_steps, const T* x,
                       int64_t ldx, const T* w, const T* bias, T* y, int64_t ldy) {
  const int64_t groups = (panels + kPanels - 1) / kPanels;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * kPanels, count = std::min(kPanels, panels - first);
      const int64_t column = first * kLanes;
      for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
        tiles[count - 1](std::min(kTileRows, rows - r0), x + r0 * ldx, ldx,
                         w + first * panel_stride, panel_stride, k_steps,
                         bias ? bias + column : nullptr, y + r0 * ldy + column, ldy,
                         n_dim - column);
      }
    }
  });
}

#if defined(__AVX512BF16__)
inline __m512 bf16x16_to_fp32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// y[r, 16p + j] = bias + sum_k x[r, k] W[16p + j, k] for R rows and P panels of k pairs.
template <int R, int P>
inline void tile_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t panel_stride,
                      int64_t k_pairs, const uint16_t* bias, uint16_t* y, int64_t ldy,
                      int64_t columns_left) {
  __m512 acc[R][P];
  __mmask16 mask[P];
  for (int p = 0; p < P; ++p) {
    const int64_t valid = std::min(kLanes, columns_left - p * kLanes);
    mask[p] = static_cast<__mmask16>(valid >= kLanes ? 0xFFFF : (1u << valid) - 1);
    const __m512 b = bias ? bf16x16_to_fp32(_mm256_maskz_loadu_epi16(mask[p], bias + p * kLanes))
                          : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) acc[r][p] = b;
  }
  for (int64_t kp = 0; kp < k_pairs; ++kp) {
    __m512bh wk[P];
    for (int p = 0; p < P; ++p) {
      const uint16_t* line = w + p * panel_stride + kp * 2 * kLanes;
      wk[p] = (__m512bh)_mm512_loadu_si512(line);
      _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchRows * 2 * kLanes), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * kp, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], xb, wk[p]);
    }
  }
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < R; ++r)
      _mm256_mask_storeu_epi16(y + r * ldy + p * kLanes, mask[p],
                               (__m256i)_mm512_cvtneps_pbh(acc[r][p]));
}

template <int P>
void tile_rows_bf16(int64_t rows, const uint16_t* x, int64_t ldx, const uint16_t* w,
                    int64_t panel_stride, int64_t k_pairs, const uint16_t* bias, uint16_t* y,
                    int64_t ldy, int64_t columns_left) {
  switch (rows) {
#define SPLITSERVE_TILE_CASE(R) \
  case R: return tile_bf16<R, P>(x, ldx, w, panel_stride, k_pairs, bias, y, ldy, columns_left);
    SPLITSERVE_TILE_CASE(1)
    SPLITSERVE_TILE_CASE(2)
    SPLITSERVE_TILE_CASE(3)
    SPLITSERVE_TILE_CASE(4)
    SPLITSERVE_TILE_CASE(5)
    SPLITSERVE_TILE_CASE(6)
    SPLITSERVE_TILE_CASE(7)
    default: return tile_bf16<8, P>(x, ldx, w, panel_stride, k_pairs, bias, y, ldy, columns_left);
#undef SPLITSERVE_TILE_CASE
  }
}
#endif

}  // namespace

bool gemm_bf16_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

bool gemm_supported() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

torch::Tensor pack_linear_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2, "[N, K] weight");
  const int64_t n_dim = weight.size(0), k_dim = weight.size(1);
  const int64_t panels = (n_dim + kLanes - 1) / kLanes;
  if (weight.scalar_type() == torch::kBFloat16) {  // panels of k pairs [P, K/2, 16, 2]
    TORCH_CHECK(k_dim % 2 == 0, "a bf16 weight needs an even K");
    auto padded = torch::zeros({panels * kLanes, k_dim}, weight.options());
    padded.narrow(0, 0, n_dim).copy_(weight);
    return padded.view({panels, kLanes, k_dim / 2, 2}).permute({0, 2, 1, 3}).contiguous();
  }
  TORCH_CHECK(weight.scalar_type() == torch::kFloat32, "fp32 or bf16 weight");
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

namespace {

void linear_packed_bf16(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias,
                        torch::Tensor out) {
  TORCH_CHECK(gemm_bf16_supported(), "a bf16 linear_packed needs an AVX512-BF16 build");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 4, "x [M, K], out [M, N]");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && out.scalar_type() == torch::kBFloat16,
              "bf16 x and out");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1 && packed.is_contiguous(),
              "rows of x and out must be contiguous");
  const int64_t rows = x.size(0), k_dim = x.size(1), n_dim = out.size(1);
  TORCH_CHECK(packed.size(1) * 2 == k_dim && packed.size(2) == kLanes && packed.size(3) == 2,
              "packed weight K mismatch");
  TORCH_CHECK(packed.size(0) == (n_dim + kLanes - 1) / kLanes && out.size(0) == rows,
              "out [M, N] does not fit the packed weight");
  const uint16_t* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_dim && bias->is_contiguous() &&
                bias->scalar_type() == torch::kBFloat16, "bias [N] bf16, contiguous");
    bias_ptr = reinterpret_cast<const uint16_t*>(bias->data_ptr());
  }
#if defined(__AVX512BF16__)
  const auto* x_ptr = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  auto* y_ptr = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldx = x.stride(0), ldy = out.stride(0);
  static constexpr TileRowsFn<uint16_t> kTiles[kPanels] = {
      tile_rows_bf16<1>, tile_rows_bf16<2>, tile_rows_bf16<3>};
  over_panel_groups(kTiles, rows, n_dim, packed.size(0), k_dim * kLanes, k_dim / 2, x_ptr, ldx,
                    w_ptr, bias_ptr, y_ptr, ldy);
#endif
}

}  // namespace

void linear_packed(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias,
                   torch::Tensor out) {
  if (packed.scalar_type() == torch::kBFloat16) return linear_packed_bf16(x, packed, bias, out);
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
  static constexpr TileRowsFn<float> kTiles[kPanels] = {tile_rows<1>, tile_rows<2>, tile_rows<3>};
  over_panel_groups(kTiles, rows, n_dim, packed.size(0), k_dim * kLanes, k_dim, x_ptr, ldx, w_ptr,
                    bias_ptr, y_ptr, ldy);
#endif
}
