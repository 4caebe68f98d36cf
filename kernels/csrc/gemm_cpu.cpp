// fp32 and bf16 linear layers for the small row counts of CPU decode: y = x W^T (+ bias).
//
// The weight W [N, K] is repacked once into column panels, [ceil(N / 16), K, 16]: panel p
// holds output columns 16p..16p+15 (zero-padded), one 64-byte row per k, so the inner loop
// reads the weight as one sequential stream. A register tile of up to 8 rows x 3 panels
// (24 zmm accumulators) broadcasts x[r, k] against three weight vectors per k; each thread
// takes whole groups of 3 panels and walks every 8-row tile of x over a group while its
// ~110-300 KB stay in L2. The weight is read from memory once per call whatever the row
// count, so at 1-32 rows this is bandwidth-bound where library GEMMs (tuned for large M)
// are not. Accumulation is fp32 in k order. Needs AVX-512F, or AVX2 with FMA (below);
// gemm_supported() says whether this build has one (the engine falls back to library GEMMs
// otherwise).
//
// bf16 (AVX512-BF16, gemm_bf16_supported()): the same tiling on panels of k pairs,
// [ceil(N / 16), K / 2, 16, 2]: one 64-byte line holds W[16p + j, 2k'] and W[16p + j, 2k' + 1]
// for the panel's 16 columns, which is what vdpbf16ps multiplies against a broadcast pair
// (x[r, 2k'], x[r, 2k' + 1]), accumulating in fp32; the result is rounded to bf16 once (bias
// added in fp32 first). Half the bytes of the fp32 weight, so a decode step reads half as
// much: measured on a Zen 4 (2 threads), oneDNN's packed bf16 linear reached half the
// bandwidth the fp32 panels reach.
//
// AVX2 with FMA (no AVX-512: e.g. Zen 2/3, Intel before Skylake-SP): the same panels and the
// same thread split, a panel's 16 columns held as two ymm and register tiles of up to 6 rows
// x one panel (12 accumulators of the 16 ymm registers). bf16 panels are widened to fp32 as
// they are read (a k pair's two values are the low and high halves of one 32-bit word), or,
// from kAvx2WidenRows rows on, once per panel group into a task's buffer for the fp32 tiles;
// x is widened once per call; accumulation is fp32 in k order, rounded to bf16 once.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#define SPLITSERVE_GEMM_AVX2 1  // also in AVX-512 builds: their bf16 path without AVX512-BF16
#endif
#if defined(__AVX512F__) || defined(SPLITSERVE_GEMM_AVX2)
#include <immintrin.h>
#endif

#include <memory>
#include <type_traits>

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

#if defined(SPLITSERVE_GEMM_AVX2)
constexpr int64_t kAvx2Rows = 6;  // rows of x per AVX2 register tile (12 ymm accumulators)
constexpr int64_t kAvx2TileRows = 24;  // rows per call: each panel is walked by 4 register tiles
#define SPLITSERVE_INLINE inline __attribute__((always_inline))

// Lanes h*8..h*8+7 of a panel with `valid` real columns, as a maskload/maskstore mask.
SPLITSERVE_INLINE __m256i half_mask(int64_t valid, int h) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid - 8 * h)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The bias of a panel's columns (zero without one), as two ymm.
SPLITSERVE_INLINE void load_bias(const float* bias, int64_t valid, __m256 (&b)[2]) {
  for (int h = 0; h < 2; ++h)
    b[h] = bias ? _mm256_maskload_ps(bias + 8 * h, half_mask(valid, h)) : _mm256_setzero_ps();
}

// acc[r][h] (+)= sum over k of x[r, k] * panel[k, 8h..8h+7]: R rows against one fp32 panel.
template <int R>
SPLITSERVE_INLINE void panel_fp32_avx2(const float* x, int64_t ldx, const float* w, int64_t k_dim,
                            __m256 (&acc)[kAvx2Rows][2]) {
  for (int64_t k = 0; k < k_dim; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * kLanes), w1 = _mm256_loadu_ps(w + k * kLanes + 8);
    _mm_prefetch(reinterpret_cast<const char*>(w + (k + kPrefetchRows) * kLanes), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
}

// The same for a bf16 panel of k pairs, x already widened to fp32 (its row stride ldx).
template <int R>
SPLITSERVE_INLINE void panel_bf16_avx2(const float* x, int64_t ldx, const uint16_t* w, int64_t k_pairs,
                            __m256 (&acc)[kAvx2Rows][2]) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t kp = 0; kp < k_pairs; ++kp) {
    const uint16_t* line = w + kp * 2 * kLanes;
    _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchRows * 2 * kLanes), _MM_HINT_T0);
    __m256 even[2], odd[2];  // W[16p + 8h + j, 2kp] and W[16p + 8h + j, 2kp + 1] as fp32
    for (int h = 0; h < 2; ++h) {
      const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line + 16 * h));
      even[h] = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
      odd[h] = _mm256_castsi256_ps(_mm256_and_si256(pairs, high));
    }
    for (int r = 0; r < R; ++r) {
      const __m256 xe = _mm256_broadcast_ss(x + r * ldx + 2 * kp);
      const __m256 xo = _mm256_broadcast_ss(x + r * ldx + 2 * kp + 1);
      for (int h = 0; h < 2; ++h) {
        acc[r][h] = _mm256_fmadd_ps(xe, even[h], acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(xo, odd[h], acc[r][h]);
      }
    }
  }
}

// bf16 bits of 8 fp32 lanes (round to nearest even; NaN -> 0x7FC0), in 32-bit lanes.
SPLITSERVE_INLINE __m256i bf16_bits_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

// One panel's R rows: accumulators from the bias, the k loop, then the stores (the valid
// columns only). x is fp32 (bf16 x widened by the caller); y is T.
template <int R, typename W, typename T>
SPLITSERVE_INLINE void panel_avx2(const float* x, int64_t ldx, const W* w, int64_t k_steps,
                       const float* bias, T* y, int64_t ldy, int64_t valid) {
  __m256 acc[kAvx2Rows][2];
  __m256 b[2];
  load_bias(bias, valid, b);
  for (int r = 0; r < R; ++r) acc[r][0] = b[0], acc[r][1] = b[1];
  if constexpr (std::is_same_v<W, float>) {
    panel_fp32_avx2<R>(x, ldx, w, k_steps, acc);
  } else {
    panel_bf16_avx2<R>(x, ldx, w, k_steps, acc);
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (std::is_same_v<T, float>) {
      for (int h = 0; h < 2; ++h) _mm256_maskstore_ps(y + r * ldy + 8 * h, half_mask(valid, h), acc[r][h]);
    } else {
      // packus interleaves 128-bit halves: [lo0-3, hi0-3, lo4-7, hi4-7] -> permute to order.
      const __m256i packed = _mm256_permute4x64_epi64(
          _mm256_packus_epi32(bf16_bits_avx2(acc[r][0]), bf16_bits_avx2(acc[r][1])), 0xD8);
      if (valid >= kLanes) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), packed);
      } else {
        alignas(32) uint16_t row[kLanes];
        _mm256_store_si256(reinterpret_cast<__m256i*>(row), packed);
        std::memcpy(y + r * ldy, row, static_cast<size_t>(valid) * sizeof(uint16_t));
      }
    }
  }
}

// `rows` (<= kAvx2TileRows) rows of x against P panels, kAvx2Rows rows at a time per panel.
template <int P, typename W, typename T>
void tile_rows_avx2(int64_t rows, const float* x, int64_t ldx, const W* w, int64_t panel_stride,
                    int64_t k_steps, const float* bias, T* y, int64_t ldy, int64_t columns_left) {
  for (int p = 0; p < P; ++p) {
    const int64_t valid = std::min(kLanes, columns_left - p * kLanes);
    const W* wp = w + p * panel_stride;
    const float* bp = bias ? bias + p * kLanes : nullptr;
    for (int64_t r0 = 0; r0 < rows; r0 += kAvx2Rows) {
      const float* xr = x + r0 * ldx;
      T* yr = y + r0 * ldy + p * kLanes;
      switch (std::min(kAvx2Rows, rows - r0)) {
        case 1: panel_avx2<1>(xr, ldx, wp, k_steps, bp, yr, ldy, valid); break;
        case 2: panel_avx2<2>(xr, ldx, wp, k_steps, bp, yr, ldy, valid); break;
        case 3: panel_avx2<3>(xr, ldx, wp, k_steps, bp, yr, ldy, valid); break;
        case 4: panel_avx2<4>(xr, ldx, wp, k_steps, bp, yr, ldy, valid); break;
        case 5: panel_avx2<5>(xr, ldx, wp, k_steps, bp, yr, ldy, valid); break;
        default: panel_avx2<6>(xr, ldx, wp, k_steps, bp, yr, ldy, valid); break;
      }
    }
  }
}
#endif

// tile_rows<P>, tile_rows_bf16<P>, tile_rows_avx2<P, W, Y>: `rows` rows of x against P
// panels; k_steps is K (fp32) or K / 2 (bf16 k pairs). x and the bias are X (fp32, or bf16
// for AVX512-BF16), the weight W, the output Y.
template <typename X, typename W, typename Y>
using TileRowsFn = void (*)(int64_t rows, const X* x, int64_t ldx, const W* w,
                            int64_t panel_stride, int64_t k_steps, const X* bias, Y* y,
                            int64_t ldy, int64_t columns_left);

// y = x W^T (+ bias): each task takes a group of kPanels panels (the last may hold fewer) and
// walks every TileRows-row tile of x over it, so the group's weights stay in L2.
template <int64_t TileRows = kTileRows, typename X, typename W, typename Y>
void over_panel_groups(const TileRowsFn<X, W, Y> (&tiles)[kPanels], int64_t rows, int64_t n_dim,
                       int64_t panels, int64_t panel_stride, int64_t k_steps, const X* x,
                       int64_t ldx, const W* w, const X* bias, Y* y, int64_t ldy) {
  const int64_t groups = (panels + kPanels - 1) / kPanels;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * kPanels, count = std::min(kPanels, panels - first);
      const int64_t column = first * kLanes;
      for (int64_t r0 = 0; r0 < rows; r0 += TileRows) {
        tiles[count - 1](std::min(TileRows, rows - r0), x + r0 * ldx, ldx,
                         w + first * panel_stride, panel_stride, k_steps,
                         bias ? bias + column : nullptr, y + r0 * ldy + column, ldy,
                         n_dim - column);
      }
    }
  });
}

#if defined(SPLITSERVE_GEMM_AVX2)
// From this many rows on, a bf16 AVX2 linear widens each panel group to fp32 once per task
// and runs the fp32 tiles over it. Widening in the register tile (panel_bf16_avx2) costs
// the tile its registers (gcc spills two accumulators at 6 rows): at 64-384 rows it ran
// 1.26-1.44x the fp32 panels' time on a Zen 3; with fewer rows the weight's bytes decide
// and reading it as bf16 wins. Same products, same k order: the same sums to the bit.
constexpr int64_t kAvx2WidenRows = 2 * kAvx2TileRows;

// A group of `count` bf16 panels of k pairs, widened to fp32 panels [count, K, 16] in `dst`.
void widen_panels(const uint16_t* w, int64_t count, int64_t k_pairs, float* dst) {
  for (int64_t p = 0; p < count; ++p) {
    const uint16_t* panel = w + p * k_pairs * 2 * kLanes;
    float* out = dst + p * k_pairs * 2 * kLanes;
    for (int64_t kp = 0; kp < k_pairs; ++kp) {
      for (int h = 0; h < 2; ++h) {  // a pair's two values: the low and high half of a word
        const __m256i pairs = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(panel + kp * 2 * kLanes + 16 * h));
        _mm256_storeu_ps(out + (2 * kp) * kLanes + 8 * h,
                         _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)));
        _mm256_storeu_ps(out + (2 * kp + 1) * kLanes + 8 * h, _mm256_castsi256_ps(
            _mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))));
      }
    }
  }
}

// over_panel_groups for bf16 panels and many rows: each task widens its group into a buffer
// of its own (3 panels x K x 16 fp32: 295 KB at K = 1,536, beside the 24-row x tile in L2).
void over_widened_panel_groups(int64_t rows, int64_t n_dim, int64_t panels, int64_t k_dim,
                               const float* x, int64_t ldx, const uint16_t* w, const float* bias,
                               uint16_t* y, int64_t ldy) {
  static constexpr TileRowsFn<float, float, uint16_t> kTiles[kPanels] = {
      tile_rows_avx2<1, float, uint16_t>, tile_rows_avx2<2, float, uint16_t>,
      tile_rows_avx2<3, float, uint16_t>};
  const int64_t groups = (panels + kPanels - 1) / kPanels, panel_stride = k_dim * kLanes;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    const std::unique_ptr<float[]> widened(new float[kPanels * panel_stride]);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * kPanels, count = std::min(kPanels, panels - first);
      const int64_t column = first * kLanes;
      widen_panels(w + first * panel_stride, count, k_dim / 2, widened.get());
      for (int64_t r0 = 0; r0 < rows; r0 += kAvx2TileRows) {
        kTiles[count - 1](std::min(kAvx2TileRows, rows - r0), x + r0 * ldx, ldx, widened.get(),
                          panel_stride, k_dim, bias ? bias + column : nullptr,
                          y + r0 * ldy + column, ldy, n_dim - column);
      }
    }
  });
}
#endif

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
#if defined(__AVX512BF16__) || defined(SPLITSERVE_GEMM_AVX2)
  return true;
#else
  return false;
#endif
}

bool gemm_supported() {
#if defined(__AVX512F__) || defined(SPLITSERVE_GEMM_AVX2)
  return true;
#else
  return false;
#endif
}

std::string gemm_isa(bool bf16) {
#if defined(__AVX512BF16__)
  if (bf16) return "avx512_bf16";
#endif
#if defined(__AVX512F__)
  if (!bf16) return "avx512";
#endif
#if defined(SPLITSERVE_GEMM_AVX2)
  return "avx2";
#else
  return "none";
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
  TORCH_CHECK(gemm_bf16_supported(), "a bf16 linear_packed needs an AVX512-BF16 or AVX2 build");
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
  static constexpr TileRowsFn<uint16_t, uint16_t, uint16_t> kTiles[kPanels] = {
      tile_rows_bf16<1>, tile_rows_bf16<2>, tile_rows_bf16<3>};
  over_panel_groups(kTiles, rows, n_dim, packed.size(0), k_dim * kLanes, k_dim / 2, x_ptr, ldx,
                    w_ptr, bias_ptr, y_ptr, ldy);
#elif defined(SPLITSERVE_GEMM_AVX2)
  // x (and the bias) widened to fp32 once: every panel reads all of x. Rows in parallel (a
  // prefill chunk's x is megabytes).
  const auto widen = [](const uint16_t* src, int64_t count, int64_t stride, int64_t n,
                        float* dst) {
    at::parallel_for(0, count, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t k = 0; k < n; ++k)
          dst[r * n + k] = std::bit_cast<float>(uint32_t{src[r * stride + k]} << 16);
    });
  };
  // Uninitialized (new float[]): every element is written by widen.
  const std::unique_ptr<float[]> x_fp32(new float[rows * k_dim]);
  const std::unique_ptr<float[]> bias_fp32(bias_ptr ? new float[n_dim] : nullptr);
  widen(reinterpret_cast<const uint16_t*>(x.data_ptr()), rows, x.stride(0), k_dim, x_fp32.get());
  if (bias_ptr) widen(bias_ptr, 1, n_dim, n_dim, bias_fp32.get());
  if (rows >= kAvx2WidenRows) {
    over_widened_panel_groups(rows, n_dim, packed.size(0), k_dim, x_fp32.get(), k_dim,
                              reinterpret_cast<const uint16_t*>(packed.data_ptr()),
                              bias_fp32.get(), reinterpret_cast<uint16_t*>(out.data_ptr()),
                              out.stride(0));
    return;
  }
  static constexpr TileRowsFn<float, uint16_t, uint16_t> kTiles[kPanels] = {
      tile_rows_avx2<1, uint16_t, uint16_t>, tile_rows_avx2<2, uint16_t, uint16_t>,
      tile_rows_avx2<3, uint16_t, uint16_t>};
  over_panel_groups<kAvx2TileRows>(kTiles, rows, n_dim, packed.size(0), k_dim * kLanes, k_dim / 2,
                    x_fp32.get(), k_dim, reinterpret_cast<const uint16_t*>(packed.data_ptr()),
                    bias_fp32.get(),
                    reinterpret_cast<uint16_t*>(out.data_ptr()), out.stride(0));
#endif
}

}  // namespace

void linear_packed(torch::Tensor x, torch::Tensor packed, std::optional<torch::Tensor> bias,
                   torch::Tensor out) {
  if (packed.scalar_type() == torch::kBFloat16) return linear_packed_bf16(x, packed, bias, out);
  TORCH_CHECK(gemm_supported(), "linear_packed needs an AVX-512 or AVX2 (with FMA) build");
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
  static constexpr TileRowsFn<float, float, float> kTiles[kPanels] = {
      tile_rows<1>, tile_rows<2>, tile_rows<3>};
  over_panel_groups(kTiles, rows, n_dim, packed.size(0), k_dim * kLanes, k_dim, x_ptr, ldx, w_ptr,
                    bias_ptr, y_ptr, ldy);
#elif defined(SPLITSERVE_GEMM_AVX2)
  static constexpr TileRowsFn<float, float, float> kTiles[kPanels] = {
      tile_rows_avx2<1, float, float>, tile_rows_avx2<2, float, float>,
      tile_rows_avx2<3, float, float>};
  over_panel_groups<kAvx2TileRows>(kTiles, rows, n_dim, packed.size(0), k_dim * kLanes, k_dim,
                    x.data_ptr<float>(), x.stride(0), packed.data_ptr<float>(), bias_ptr,
                    out.data_ptr<float>(), out.stride(0));
#endif
}
