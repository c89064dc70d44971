// ember's CPU kernels for a decoder layer's products and elementwise steps, registered as
// torch.ops.ember_ops (cpu_ops.py builds this file on first use and decides, call by call, where
// each applies; quant.py's quantized linears call the integer-weight ones).
//
// Products y[m, n] = sum_k x[m, k] * w[n, k]:
// - one to a few rows of x (decodes), bound by reading the weight once, which PyTorch's GEMV paths
//   do at a fraction of the memory bandwidth; these stream each weight row once for all rows of x:
//   - integer weights (int8 per channel; int8 per group of 16 or 32 with optional offsets; int4 per
//     group in tiles of 4 output channels: ember's quantized linears and llama.cpp's blocks) by
//     integer dot products on AVX512-VNNI, x fp32 or bf16 (linear_gemv, linear_groups, linear_int4);
//   - bf16 weights by AVX512-BF16 dot products of bf16 pairs, x bf16 (linear_gemv);
// - bf16 batches of 3 rows up to a few thousand (bigger decode batches, prompt chunks): compute-bound,
//   over a "pair-packed" copy of the weight (pack_pairs, linear_pairs) in register tiles of rows x
//   blocks of 16 channels; a SwiGLU gate_up weight packed with each group's gate and up channels
//   together (pack_pairs_swiglu) gives silu(gate) * up straight from its tiles (linear_pairs_silu).
// Elementwise steps PyTorch runs as several ops, each a pass over memory, in one pass: RMSNorm, a
// residual add fused into the next RMSNorm, SwiGLU's silu(gate) * up, rotary embedding, argmax;
// for bf16 (AVX512-BF16 builds: rounded as PyTorch's bf16 ops are, the same bits) and for fp32
// (a quantized GGUF model computes in fp32).
// What a CPU lacks is compiled out and reported by gemv_supported() / int_gemv_supported(); the
// Python side then keeps PyTorch's kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

constexpr int kMaxRowsX = 4;  // rows of x per pass of the GEMVs
constexpr int64_t kFlushElems = 8192;  // int32 lanes are moved to fp32 before they could overflow
constexpr int64_t kPairBlock = 16;  // output channels per pair-packed block (linear_pairs)
constexpr int kTileRows = 6;
constexpr int kTileBlocks = 4;
constexpr int64_t kL1FetchMinTiles = 6, kL1FetchMaxTiles = 64;  // row tiles for which linear_pairs_rows fetches
                                                                  // the next group into L1
constexpr int kTile = 4;  // output channels per tile of the int4 layout (linear_int4)

// ---- integer weights (AVX512-VNNI): int8 per channel, int8 per group, int4 per group -------------
//
// x is rounded once per call to int16 with one scale per row (an error of 1/65534 of the row's
// largest value, far below the weights' own 4-8-bit steps), so the inner loops are integer pair dot
// products (32 multiply-adds per instruction, no per-weight conversion to floating point). x and the
// output are fp32 or bf16 (the model's dtype); none of this needs AVX512-BF16.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define EMBER_INT 1

inline __mmask16 tail_mask(int64_t k, int64_t n) {
  return k + 16 <= n ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
}

inline __m512 load_bf16(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) { return load_bf16(p, mask); }
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// Calls body(std::integral_constant<int, R>) for R = min(rows, kMaxRowsX) rows of x (R is a template
// argument, so each row count gets its own register allocation).
template <typename Body>
void with_rows(int64_t rows, const Body& body) {
  switch (std::min<int64_t>(kMaxRowsX, rows)) {
    case 1: body(std::integral_constant<int, 1>{}); break;
    case 2: body(std::integral_constant<int, 2>{}); break;
    case 3: body(std::integral_constant<int, 3>{}); break;
    default: body(std::integral_constant<int, 4>{}); break;
  }
}

template <typename Body>
void over_channels(int64_t n_dim, const Body& body) {
  // A few chunks per thread; each chunk streams its rows of weights once.
  const int64_t grain = std::max<int64_t>(16, n_dim / (at::get_num_threads() * 4));
  at::parallel_for(0, n_dim, grain, body);
}

// x [M, K] rounded to int16 per row, with the row scales and, for groups of `group` channels
// (0: none), each group's sum of x in x's units (what the weights' offsets multiply).
template <typename T>
struct QuantizedRows {
  std::vector<int16_t> q;
  std::vector<float> scales, group_sums;

  QuantizedRows(const T* x, int64_t m_dim, int64_t k_dim, int64_t group) : q(m_dim * k_dim), scales(m_dim) {
    for (int64_t m = 0; m < m_dim; ++m) {
      const T* row = x + m * k_dim;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < k_dim; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(row + k, tail_mask(k, k_dim))));
      const float top = _mm512_reduce_max_ps(amax);
      scales[m] = top > 0.f ? top / 32767.f : 1.f;
      const __m512 inv = _mm512_set1_ps(1.f / scales[m]);
      for (int64_t k = 0; k < k_dim; k += 16) {
        const __mmask16 mask = tail_mask(k, k_dim);
        // round to nearest (the default rounding mode), saturate to int16
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(row + k, mask), inv));
        _mm256_mask_storeu_epi16(q.data() + m * k_dim + k, mask, _mm512_cvtsepi32_epi16(v));
      }
    }
    if (group == 0) return;
    const int64_t groups = k_dim / group;
    group_sums.resize(m_dim * groups);
    for (int64_t m = 0; m < m_dim; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        int64_t sum = 0;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += q[m * k_dim + k];
        group_sums[m * groups + g] = static_cast<float>(sum) * scales[m];
      }
  }
};

// sum over g < groups of a[g] * b[g]
inline float dot(const float* a, const float* b, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 mask = tail_mask(g, groups);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, a + g), _mm512_maskz_loadu_ps(mask, b + g), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// int8 weights, one scale per output channel.
template <int M, typename T>
void gemv_int8_rows(const int16_t* xq, int64_t k_dim, const int8_t* w, int64_t n_begin, int64_t n_end,
                    const float* x_scales, const float* scales, const T* bias, T* out, int64_t out_stride) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = w + n * k_dim;
    __m512 total[M];
    __m512i acc[M][2];
    for (int m = 0; m < M; ++m) {
      total[m] = _mm512_setzero_ps();
      acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    }
    for (int64_t k0 = 0; k0 < k_dim; k0 += kFlushElems) {
      const int64_t k1 = std::min(k_dim, k0 + kFlushElems);
      int64_t k = k0;
      for (; k + 64 <= k1; k += 64) {
        const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
        const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 32)));
        for (int m = 0; m < M; ++m) {
          acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], _mm512_loadu_si512(xq + m * k_dim + k), w0);
          acc[m][1] = _mm512_dpwssd_epi32(acc[m][1], _mm512_loadu_si512(xq + m * k_dim + k + 32), w1);
        }
      }
      for (; k < k1; k += 32) {
        const __mmask32 mask = k + 32 <= k1 ? ~__mmask32(0) : (__mmask32(1) << (k1 - k)) - 1;
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row + k));
        for (int m = 0; m < M; ++m)
          acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], _mm512_maskz_loadu_epi16(mask, xq + m * k_dim + k), wv);
      }
      for (int m = 0; m < M; ++m) {
        total[m] = _mm512_add_ps(total[m], _mm512_cvtepi32_ps(_mm512_add_epi32(acc[m][0], acc[m][1])));
        acc[m][0] = acc[m][1] = _mm512_setzero_si512();
      }
    }
    for (int m = 0; m < M; ++m) {
      float y = _mm512_reduce_add_ps(total[m]) * x_scales[m] * scales[n];
      if (bias) y += static_cast<float>(bias[n]);
      out[m * out_stride + n] = static_cast<T>(y);
    }
  }
}

// int8 weights with a scale, and optionally an offset, per group of 16 or 32 input channels
// (w = q * scale + offset: llama.cpp's Q8_0, Q5_0/1, Q5_K and Q6_K blocks, decoded exactly), row by row.
// Per 64 channels and row of x, two dot products give 32 int32 lanes, lane i of each the sum over
// channels 2i and 2i + 1 of its 32: a group of 32 is one vector's 16 lanes, a group of 16 eight of them,
// so one permute spreads the group scales over the lanes. (The int4 tiles below measured slower for int8:
// twice the weight vectors per tile, the sums no longer fit the registers at 4 rows of x.)
template <int M, typename T>
void gemv_int8_groups_rows(const int16_t* xq, int64_t k_dim, const int8_t* w, int64_t group, int64_t n_begin,
                           int64_t n_end, const float* x_scales, const float* x_sums, const float* scales,
                           const float* offsets, const T* bias, T* out, int64_t out_stride) {
  const int64_t groups = k_dim / group;
  const __m512i lanes_a = group == 32 ? _mm512_set1_epi32(0) : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i lanes_b = group == 32 ? _mm512_set1_epi32(1) : _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
  const __mmask16 scales64 = group == 32 ? 0x3 : 0xF, scales32 = group == 32 ? 0x1 : 0x3;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = w + n * k_dim;
    const float* row_scales = scales + n * groups;
    __m512 total[M];
    for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= k_dim; k += 64) {
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k + 32)));
      const __m512 sv = _mm512_maskz_loadu_ps(scales64, row_scales + k / group);
      const __m512 sa = _mm512_permutexvar_ps(lanes_a, sv), sb = _mm512_permutexvar_ps(lanes_b, sv);
      for (int m = 0; m < M; ++m) {
        const __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xq + m * k_dim + k), w0);
        const __m512i b = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xq + m * k_dim + k + 32), w1);
        total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), sb, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sa, total[m]));
      }
    }
    if (k < k_dim) {  // 32 channels left
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k)));
      const __m512 sa = _mm512_permutexvar_ps(lanes_a, _mm512_maskz_loadu_ps(scales32, row_scales + k / group));
      for (int m = 0; m < M; ++m) {
        const __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(xq + m * k_dim + k), w0);
        total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sa, total[m]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float y = _mm512_reduce_add_ps(total[m]) * x_scales[m];
      if (offsets) y += dot(offsets + n * groups, x_sums + m * groups, groups);
      if (bias) y += static_cast<float>(bias[n]);
      out[m * out_stride + n] = static_cast<T>(y);
    }
  }
}

// int4 weights in tiles of 4 output channels, stored so that a tile reads as one ascending stream:
// w [tiles, K / 64, 4, 32] bytes (tile t, chunk c, row r: channels 64c + j in the low nibble and
// 64c + 32 + j in the high one of byte j, for row 4t + r), scales and offsets [tiles, groups, 4].
// The 4 rows' independent sums hide the multiply-add latency and each x vector serves 4 weight rows;
// their interleaving keeps the hardware prefetcher on one stream. Rows past N are padding.

template <int M, typename T>
void gemv_int4_tiles(const int16_t* xq, int64_t k_dim, const uint8_t* w, int64_t group, int64_t t_begin, int64_t t_end,
                     int64_t n_dim, const float* x_scales, const float* x_sums, const float* scales, const float* offsets,
                     const T* bias, T* out, int64_t out_stride) {
  const int64_t groups = k_dim / group, chunks = k_dim / 64, per_group = group / 64;  // per_group 0: group 32
  const __m512i low = _mm512_set1_epi16(0x0F);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const uint8_t* wt = w + t * chunks * kTile * 32;
    const float* st = scales + t * groups * kTile;
    __m512 total[M][kTile];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < kTile; ++r) total[m][r] = _mm512_setzero_ps();
    __m512i acc[M][kTile];  // groups of 64 channels and more: int32 sums until the group ends
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i lo[kTile], hi[kTile];
      for (int r = 0; r < kTile; ++r) {
        const __m512i bytes = _mm512_cvtepu8_epi16(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + (c * kTile + r) * 32)));
        lo[r] = _mm512_and_si512(bytes, low);
        hi[r] = _mm512_srli_epi16(bytes, 4);
      }
      const int16_t* xc = xq + c * 64;
      if (per_group == 0) {  // group 32: the two halves of each 64 channels have their own scales
        const float* s0 = st + (2 * c) * kTile;
        for (int m = 0; m < M; ++m) {
          const __m512i xa = _mm512_loadu_si512(xc + m * k_dim), xb = _mm512_loadu_si512(xc + m * k_dim + 32);
          for (int r = 0; r < kTile; ++r) {
            const __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), xa, lo[r]);
            const __m512i b = _mm512_dpwssd_epi32(_mm512_setzero_si512(), xb, hi[r]);
            total[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), _mm512_set1_ps(s0[kTile + r]),
                                          _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(s0[r]), total[m][r]));
          }
        }
        continue;
      }
      const bool first = c % per_group == 0, last = c % per_group == per_group - 1;
      for (int m = 0; m < M; ++m) {
        const __m512i xa = _mm512_loadu_si512(xc + m * k_dim), xb = _mm512_loadu_si512(xc + m * k_dim + 32);
        for (int r = 0; r < kTile; ++r)
          acc[m][r] = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(first ? _mm512_setzero_si512() : acc[m][r], xa, lo[r]),
                                          xb, hi[r]);
      }
      if (last) {
        const float* sg = st + (c / per_group) * kTile;
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < kTile; ++r)
            total[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][r]), _mm512_set1_ps(sg[r]), total[m][r]);
      }
    }
    for (int m = 0; m < M; ++m) {
      __m128 shift = _mm_setzero_ps();  // the offsets' share for the 4 rows: sum_g offset[g, r] * (sum of x over g)
      if (offsets) {
        const float* ot = offsets + t * groups * kTile;
        for (int64_t g = 0; g < groups; ++g)
          shift = _mm_fmadd_ps(_mm_loadu_ps(ot + g * kTile), _mm_set1_ps(x_sums[m * groups + g]), shift);
      }
      alignas(16) float shifts[kTile];
      _mm_store_ps(shifts, shift);
      for (int r = 0; r < kTile; ++r) {
        const int64_t n = t * kTile + r;
        if (n >= n_dim) break;
        float y = _mm512_reduce_add_ps(total[m][r]) * x_scales[m] + shifts[r];
        if (bias) y += static_cast<float>(bias[n]);
        out[m * out_stride + n] = static_cast<T>(y);
      }
    }
  }
}

// Runs rows(xq, x scales, x group sums, output) over every kMaxRowsX rows of x and a share of the
// output channels per thread.
template <typename T, typename Rows>
void over_rows_and_channels(const QuantizedRows<T>& xq, int64_t m_dim, int64_t k_dim, int64_t units, int64_t out_stride,
                            int64_t groups, T* out, const Rows& rows) {
  over_channels(units, [&](int64_t u0, int64_t u1) {  // units: output channels, or tiles of them
    for (int64_t m = 0; m < m_dim; m += kMaxRowsX) {
      const float* sums = xq.group_sums.empty() ? nullptr : xq.group_sums.data() + m * groups;
      with_rows(m_dim - m, [&](auto count) {
        rows(count, xq.q.data() + m * k_dim, xq.scales.data() + m, sums, u0, u1, out + m * out_stride);
      });
    }
  });
}

template <typename T>
void gemv_int8(const at::Tensor& x, const at::Tensor& w, const float* scales, const T* bias, at::Tensor& out) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = w.size(0);
  const QuantizedRows<T> xq(x.data_ptr<T>(), m_dim, k_dim, 0);
  const auto* wp = w.data_ptr<int8_t>();
  over_rows_and_channels(xq, m_dim, k_dim, n_dim, n_dim, 0, out.data_ptr<T>(),
                         [&](auto count, const int16_t* q, const float* s, const float*, int64_t n0, int64_t n1, T* o) {
    gemv_int8_rows<decltype(count)::value>(q, k_dim, wp, n0, n1, s, scales, bias, o, n_dim);
  });
}

template <typename T>
void gemv_groups(const at::Tensor& x, const at::Tensor& w, int64_t group, const float* scales, const float* offsets,
                 const T* bias, at::Tensor& out) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = w.size(0), groups = k_dim / group;
  const QuantizedRows<T> xq(x.data_ptr<T>(), m_dim, k_dim, offsets ? group : 0);
  over_rows_and_channels(xq, m_dim, k_dim, n_dim, n_dim, groups, out.data_ptr<T>(),
                         [&](auto count, const int16_t* q, const float* s, const float* sums, int64_t n0, int64_t n1, T* o) {
    gemv_int8_groups_rows<decltype(count)::value>(q, k_dim, w.data_ptr<int8_t>(), group, n0, n1, s, sums, scales,
                                                  offsets, bias, o, n_dim);
  });
}

template <typename T>
void gemv_int4(const at::Tensor& x, const at::Tensor& w, int64_t n_dim, int64_t group, const float* scales,
               const float* offsets, const T* bias, at::Tensor& out) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), tiles = w.size(0), groups = k_dim / group;
  const QuantizedRows<T> xq(x.data_ptr<T>(), m_dim, k_dim, offsets ? group : 0);
  over_rows_and_channels(xq, m_dim, k_dim, tiles, n_dim, groups, out.data_ptr<T>(),
                         [&](auto count, const int16_t* q, const float* s, const float* sums, int64_t t0, int64_t t1, T* o) {
    gemv_int4_tiles<decltype(count)::value>(q, k_dim, w.data_ptr<uint8_t>(), group, t0, t1, n_dim, s, sums, scales,
                                            offsets, bias, o, n_dim);
  });
}

// ---- fp32 elementwise steps (AVX-512F): the same fusions as the bf16 ones below, for fp32 models
// (a quantized GGUF computes in fp32), each one pass over memory instead of PyTorch's several.

// x / sqrt(mean(x^2) + eps) * w per row (transformers' RMSNorm in fp32); with `delta`, x + delta
// first, stored to `sum`.
void rms_norm_rows_f32(const float* x, const float* w, float* out, int64_t rows, int64_t h, float eps,
                       const float* delta = nullptr, float* sum = nullptr) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * h;
      if (delta) {
        for (int64_t k = 0; k < h; k += 16) {
          const __mmask16 mask = tail_mask(k, h);
          _mm512_mask_storeu_ps(sum + r * h + k, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, xr + k),
                                                                     _mm512_maskz_loadu_ps(mask, delta + r * h + k)));
        }
        xr = sum + r * h;
      }
      __m512 squares = _mm512_setzero_ps();
      for (int64_t k = 0; k < h; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask(k, h), xr + k);
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / h + eps));
      for (int64_t k = 0; k < h; k += 16) {
        const __mmask16 mask = tail_mask(k, h);
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + k), inv),
                                       _mm512_maskz_loadu_ps(mask, w + k));
        _mm512_mask_storeu_ps(out + r * h + k, mask, y);
      }
    }
  });
}

// silu(gate) * up over rows [gate | up] of width 2 * inter (ATen's own vectorized exp).
void silu_mul_rows_f32(const float* x, float* out, int64_t rows, int64_t inter) {
  using Vec = at::vec::Vectorized<float>;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* gate = x + r * 2 * inter;
      const float* up = gate + inter;
      for (int64_t k = 0; k < inter; k += 16) {
        const __mmask16 mask = tail_mask(k, inter);
        const Vec g(_mm512_maskz_loadu_ps(mask, gate + k));
        const __m512 act = g / (Vec(1.f) + g.neg().exp());
        _mm512_mask_storeu_ps(out + r * inter + k, mask, _mm512_mul_ps(act, _mm512_maskz_loadu_ps(mask, up + k)));
      }
    }
  });
}

// Rotary embedding in place on the first `heads` heads of each (possibly strided) row:
// x * cos + rotate_half(x) * sin.
void rotary_rows_f32(float* x, int64_t row_stride, const float* cos, const float* sin, int64_t rows, int64_t heads,
                     int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* c = cos + r * dim;
      const float* s = sin + r * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* head = x + r * row_stride + h * dim;
        for (int64_t k = 0; k < half; k += 16) {
          const __mmask16 mask = tail_mask(k, half);
          const __m512 x1 = _mm512_maskz_loadu_ps(mask, head + k), x2 = _mm512_maskz_loadu_ps(mask, head + half + k);
          const __m512 lo = _mm512_fmsub_ps(x1, _mm512_maskz_loadu_ps(mask, c + k),
                                            _mm512_mul_ps(x2, _mm512_maskz_loadu_ps(mask, s + k)));
          const __m512 hi = _mm512_fmadd_ps(x2, _mm512_maskz_loadu_ps(mask, c + half + k),
                                            _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(mask, s + half + k)));
          _mm512_mask_storeu_ps(head + k, mask, lo);
          _mm512_mask_storeu_ps(head + half + k, mask, hi);
        }
      }
    }
  });
}
// Each row's argmax (the first of equal maxima, NaN above all, as torch.argmax).
template <typename T>
void argmax_rows(const T* x, int64_t* out, int64_t rows, int64_t n) {
  constexpr int A = 4;  // independent (max, index) pairs: one would wait on each compare-and-blend
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * n;
      __m512 best[A];
      __m512i best_at[A];
      for (int a = 0; a < A; ++a) best[a] = neg_inf, best_at[a] = _mm512_setzero_si512();
      __mmask16 nan = 0;
      // each pair keeps the first maximum of its own vectors (strictly greater replaces)
      const auto take = [&](int a, int64_t k, __mmask16 mask) {
        const __m512 v = _mm512_mask_blend_ps(mask, neg_inf, load16(row + k, mask));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        const __mmask16 greater = _mm512_cmp_ps_mask(v, best[a], _CMP_GT_OQ);
        best[a] = _mm512_mask_blend_ps(greater, best[a], v);
        best_at[a] = _mm512_mask_blend_epi32(greater, best_at[a], _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(k))));
      };
      int64_t k = 0;
      for (; k + 16 * A <= n; k += 16 * A)
        for (int a = 0; a < A; ++a) take(a, k + 16 * a, 0xFFFF);
      for (; k < n; k += 16) take(0, k, tail_mask(k, n));
      // the largest value, at its smallest index: the first maximum of the row
      alignas(64) float values[A][16];
      alignas(64) int32_t at[A][16];
      for (int a = 0; a < A; ++a) {
        _mm512_store_ps(values[a], best[a]);
        _mm512_store_si512(at[a], best_at[a]);
      }
      int64_t arg = at[0][0];
      float top = values[0][0];
      for (int a = 0; a < A; ++a)
        for (int i = 0; i < 16; ++i)
          if (values[a][i] > top || (values[a][i] == top && at[a][i] < arg)) top = values[a][i], arg = at[a][i];
      if (nan) {  // rare: the first NaN wins
        for (int64_t j = 0; j < n; ++j)
          if (std::isnan(static_cast<float>(row[j]))) { arg = j; break; }
      }
      out[r] = arg;
    }
  });
}

#endif  // EMBER_INT


// ---- bf16 weights and elementwise steps (AVX512-BF16) ----------------------------------------------
#if defined(EMBER_INT) && defined(__AVX512BF16__)
#define EMBER_GEMV 1

// One output channel at a time, so the weights stream strictly in order (as the hardware
// prefetcher likes best); kChains partial sums per row of x hide the dot product's latency.
// bf16 weights, x rows of length k_dim.
template <int M>
void gemv_rows(const c10::BFloat16* x, const c10::BFloat16* w, int64_t k_dim, int64_t n_begin, int64_t n_end,
               const c10::BFloat16* bias, c10::BFloat16* out, int64_t out_stride) {
  constexpr int kChains = 4;
  constexpr int64_t kStep = 32 * kChains;
  const int64_t k_main = k_dim / kStep * kStep;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const c10::BFloat16* row = w + n * k_dim;
    __m512 acc[M][kChains];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < kChains; ++c) acc[m][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_main; k += kStep) {
      __m512bh wv[kChains];
      for (int c = 0; c < kChains; ++c) wv[c] = (__m512bh)_mm512_loadu_si512(row + k + 32 * c);
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < kChains; ++c)
          acc[m][c] = _mm512_dpbf16_ps(acc[m][c], (__m512bh)_mm512_loadu_si512(x + m * k_dim + k + 32 * c), wv[c]);
    }
    for (int64_t k = k_main; k < k_dim; k += 32) {
      const __mmask32 mask = k + 32 <= k_dim ? ~__mmask32(0) : (__mmask32(1) << (k_dim - k)) - 1;
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, row + k);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * k_dim + k), wv);
    }
    for (int m = 0; m < M; ++m) {
      float y = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                   _mm512_add_ps(acc[m][2], acc[m][3])));
      if (bias) y += static_cast<float>(bias[n]);
      out[m * out_stride + n] = static_cast<c10::BFloat16>(y);
    }
  }
}

void gemv_bf16(const at::Tensor& x, const at::Tensor& w, const c10::BFloat16* bias, at::Tensor& out) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), n_dim = w.size(0);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = w.data_ptr<c10::BFloat16>();
  auto* op = out.data_ptr<c10::BFloat16>();
  over_channels(n_dim, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < m_dim; m += kMaxRowsX) {
      const auto* xm = xp + m * k_dim;
      auto* om = op + m * n_dim;
      with_rows(m_dim - m, [&](auto rows) {
        gemv_rows<decltype(rows)::value>(xm, wp, k_dim, n0, n1, bias, om, n_dim);
      });
    }
  });
}

inline __m512 round_bf16(__m512 v) {  // round to bf16 (nearest even) and back, as a bf16 tensor op would
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// silu(g) for every bf16 g, indexed by g's bits: PyTorch's bf16 silu (ATen's vectorized formula in fp32,
// rounded to bf16), computed once when the library loads. A lookup is one gather where the formula took
// ~45 cycles a vector (exp and a divide), and ~78 inside linear_pairs_silu's tiles, whose accumulators the
// call to ATen's exp spilled (BENCHMARKS.md). Two spare entries: a gather reads 4 bytes from its entry.
struct SiluTable {
  alignas(64) uint16_t bits[65536 + 2] = {};
  SiluTable() {
    using Vec = at::vec::Vectorized<float>;
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int32_t i = 0; i < 65536; i += 16) {
      const Vec g(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_set1_epi32(i), lanes), 16)));
      const __m512 act = g / (Vec(1.f) + g.neg().exp());
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + i), (__m256i)_mm512_cvtneps_pbh(act));
    }
  }
};
const SiluTable kSilu;

// silu(gate) * up as PyTorch's two bf16 ops round it (silu rounded to bf16, then the product in fp32); gate
// and up hold bf16 values. silu_mul_rows and linear_pairs_silu's tiles both use it, so the fused product
// keeps silu_mul's bits.
inline __m512 silu_times(__m512 gate, __m512 up) {
  const __m512i index = _mm512_srli_epi32(_mm512_castps_si512(gate), 16);
  const __m512i act = _mm512_i32gather_epi32(index, kSilu.bits, 2);  // bits of entries index and index + 1
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(act, 16)), up);
}

// transformers' LlamaRMSNorm in bf16: x / sqrt(mean(x^2) + eps) in fp32, rounded to bf16, times the weight.
// With `delta`, x + delta first (a residual add, rounded to bf16 as PyTorch's add is), stored to `sum`.
void rms_norm_rows(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* out, int64_t rows, int64_t h,
                   float eps, const c10::BFloat16* delta = nullptr, c10::BFloat16* sum = nullptr) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* xr = x + r * h;
      if (delta) {
        for (int64_t k = 0; k < h; k += 16) {
          const __mmask16 mask = tail_mask(k, h);
          const __m512 v = _mm512_add_ps(load_bf16(xr + k, mask), load_bf16(delta + r * h + k, mask));
          _mm256_mask_storeu_epi16(sum + r * h + k, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
        xr = sum + r * h;
      }
      __m512 squares = _mm512_setzero_ps();
      for (int64_t k = 0; k < h; k += 16) {
        const __m512 v = load_bf16(xr + k, tail_mask(k, h));
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / h + eps));
      for (int64_t k = 0; k < h; k += 16) {
        const __mmask16 mask = tail_mask(k, h);
        const __m512 y = _mm512_mul_ps(round_bf16(_mm512_mul_ps(load_bf16(xr + k, mask), inv)), load_bf16(w + k, mask));
        _mm256_mask_storeu_epi16(out + r * h + k, mask, (__m256i)_mm512_cvtneps_pbh(y));
      }
    }
  });
}

// SwiGLU's silu(gate) * up over rows [gate | up] of width 2 * inter, in one pass, rounded as
// PyTorch's two bf16 ops are (silu in fp32 by ATen's own vectorized formula, rounded to bf16,
// then the product in fp32, rounded again): the same bits, a third of the memory traffic.
void silu_mul_rows(const c10::BFloat16* x, c10::BFloat16* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* gate = x + r * 2 * inter;
      const c10::BFloat16* up = gate + inter;
      for (int64_t k = 0; k < inter; k += 16) {
        const __mmask16 mask = tail_mask(k, inter);
        const __m512 y = silu_times(load_bf16(gate + k, mask), load_bf16(up + k, mask));
        _mm256_mask_storeu_epi16(out + r * inter + k, mask, (__m256i)_mm512_cvtneps_pbh(y));
      }
    }
  });
}

// Rotary embedding in place on the first `heads` heads of each row (rows may be strided, as q|k
// inside a fused qkv output): x * cos + rotate_half(x) * sin, rounded as ember's PyTorch path
// (`apply_rotary`: x * cos rounded to bf16, then addcmul in fp32, rounded once more).
void rotary_rows(c10::BFloat16* x, int64_t row_stride, const c10::BFloat16* cos, const c10::BFloat16* sin,
                 int64_t rows, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* c = cos + r * dim;
      const c10::BFloat16* s = sin + r * dim;
      for (int64_t h = 0; h < heads; ++h) {
        c10::BFloat16* head = x + r * row_stride + h * dim;
        for (int64_t k = 0; k < half; k += 16) {
          const __mmask16 mask = tail_mask(k, half);
          const __m512 x1 = load_bf16(head + k, mask), x2 = load_bf16(head + half + k, mask);
          const __m512 lo = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), load_bf16(s + k, mask),
                                            round_bf16(_mm512_mul_ps(x1, load_bf16(c + k, mask))));
          const __m512 hi = _mm512_fmadd_ps(x1, load_bf16(s + half + k, mask),
                                            round_bf16(_mm512_mul_ps(x2, load_bf16(c + half + k, mask))));
          _mm256_mask_storeu_epi16(head + k, mask, (__m256i)_mm512_cvtneps_pbh(lo));
          _mm256_mask_storeu_epi16(head + half + k, mask, (__m256i)_mm512_cvtneps_pbh(hi));
        }
      }
    }
  });
}

// Batches of 3 rows and more (and every batch under batch invariance: cpu_ops.py): compute-bound once the
// weights are read once for many rows, which the row-by-row GEMV above does not do beyond 4 rows. Weights go "pair-packed" in groups of
// kTileBlocks blocks of 16 output channels, [N/64][K/2][64][2] (see pack_pairs): one 64-byte load is
// 16 channels x 2 inputs, one vdpbf16ps per row of x adds them to that row's 16 outputs, so no
// horizontal sums are needed, and a tile's 4 loads for one pair of inputs are 256 consecutive bytes:
// a group is one sequential stream (four streams 16 KiB apart, the layout before, read a single row's
// weights ~20-25% slower: BENCHMARKS.md).
// A tile is up to kTileRows rows x kTileBlocks blocks (24 accumulators + 4 weight vectors + one
// broadcast fit the 32 vector registers; per pair of inputs 4 loads and 6 broadcasts feed 24
// multiply-adds). 6x4 is the one tile shape of those tried (12x2, 14x2, 8x3, 6x4, 5x5, 4x6 rows x
// blocks) that was fastest or close to it on both bench models' shapes, and it was ahead of or level
// with oneDNN's prepacked GEMM wherever measured (BENCHMARKS.md: session 6 and the measurements moved
// from comments). The accumulation order (k ascending per output) is the same for every tile, so
// results do not depend on the batch.

// SWIGLU (linear_pairs_silu): the group's blocks are 32 gate channels then the same 32 up channels
// (pack_pairs_swiglu), and the tile stores silu(gate) * up for its 32 channels, rounded as gate_up's own
// output and silu_mul would round them: the same bits as linear_pairs then silu_mul, without writing and
// re-reading gate_up's output.
template <int R, bool SWIGLU = false>
void pairs_tile(const uint32_t* x, int64_t x_stride, const uint32_t* w, int64_t k_pairs, const c10::BFloat16* bias,
                int64_t n0, int64_t n_dim, c10::BFloat16* out, int64_t out_stride, const char* fetch, int64_t fetch_lines,
                bool fetch_l1) {
  constexpr int B = kTileBlocks;
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_ps();
  const int64_t fetch_step = (fetch_lines + k_pairs - 1) / k_pairs;
  for (int64_t kp = 0; kp < k_pairs; ++kp) {
    for (int64_t line = kp * fetch_step; line < std::min(fetch_lines, (kp + 1) * fetch_step); ++line)
      fetch_l1 ? _mm_prefetch(fetch + line * 64, _MM_HINT_T0) : _mm_prefetch(fetch + line * 64, _MM_HINT_T1);
    __m512bh wv[B];
    for (int b = 0; b < B; ++b) wv[b] = (__m512bh)_mm512_loadu_si512(w + (kp * B + b) * kPairBlock);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(x[r * x_stride + kp]);
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], xv, wv[b]);
    }
  }
  if constexpr (SWIGLU) {
    const int64_t inter = n_dim / 2, first = n0 / 2;  // this group's 32 channels of silu(gate) * up
    for (int half = 0; half < B / 2; ++half) {
      const int64_t c = first + half * kPairBlock;
      const __m512 gate_bias = bias ? load_bf16(bias + c, 0xFFFF) : _mm512_setzero_ps();
      const __m512 up_bias = bias ? load_bf16(bias + inter + c, 0xFFFF) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m512 gate = round_bf16(_mm512_add_ps(acc[r][half], gate_bias));  // as gate_up's bf16 output
        const __m512 up = round_bf16(_mm512_add_ps(acc[r][half + B / 2], up_bias));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * out_stride + c),
                            (__m256i)_mm512_cvtneps_pbh(silu_times(gate, up)));
      }
    }
  } else {
    for (int b = 0; b < B; ++b) {
      const int64_t n = n0 + b * kPairBlock;
      const __mmask16 mask = n < n_dim ? tail_mask(n, n_dim) : 0;
      const __m512 bv = bias ? load_bf16(bias + n, mask) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r)
        _mm256_mask_storeu_epi16(out + r * out_stride + n, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][b], bv)));
    }
  }
}

// body(std::integral_constant<int, V>) for V = min(value, MAX) >= 1, so V is a template argument.
template <int MAX, typename Body>
void with_constant(int64_t value, const Body& body) {
  if constexpr (MAX > 1) {
    if (value < MAX) return with_constant<MAX - 1>(value, body);
  }
  body(std::integral_constant<int, MAX>{});
}

template <bool SWIGLU = false>
void linear_pairs_rows(const at::Tensor& x, const at::Tensor& packed, int64_t n_dim, const c10::BFloat16* bias,
                       at::Tensor& out) {
  const int64_t out_stride = SWIGLU ? n_dim / 2 : n_dim;
  const int64_t m_dim = x.size(0), k_pairs = x.size(1) / 2, groups = packed.size(0);
  const int64_t row_tiles = (m_dim + kTileRows - 1) / kTileRows;
  const int64_t group_elems = k_pairs * kTileBlocks * kPairBlock;  // uint32 pairs per group
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  auto* op = out.data_ptr<c10::BFloat16>();
  // Threads take groups one at a time from a shared counter (each claims its next one ahead, so it can
  // fetch it); each group's weights (64 KiB at K = 512) stay in L2 while every row tile passes over them.
  // Fixed halves made the thread whose core another process shares hold up the other at the end: with a
  // process taking ~40% of one core, bench-llama-56m's products 12-15% faster this way; quiet, level
  // (BENCHMARKS.md).
  std::atomic<int64_t> next_group{0};
  at::parallel_for(0, std::min<int64_t>(groups, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    int64_t upcoming = next_group.fetch_add(1, std::memory_order_relaxed);
    for (int64_t g; (g = upcoming) < groups;) {
      upcoming = next_group.fetch_add(1, std::memory_order_relaxed);
      const uint32_t* w = wp + g * group_elems;
      // The next group's weights into L2 meanwhile, a slice per row tile (the hardware prefetcher
      // alone left the first tile of each group waiting on memory). Not for a single tile of rows (1-6
      // rows: single-stream decodes): there the weights stream once and the hardware prefetcher alone
      // reads them faster (Zen 4, one process, alternating: all of bench-llama-56m's products for one row
      // 2.71 -> 2.43 ms, Qwen2-0.5B's 32.6 -> 30.4; 4-6 rows 3-6% faster; BENCHMARKS.md).
      const bool fetch_next = upcoming < groups && row_tiles > 1;
      const int64_t next_lines = fetch_next ? group_elems * 4 / 64 : 0;
      const char* next = reinterpret_cast<const char*>(wp + upcoming * group_elems);
      const int64_t slice = (next_lines + row_tiles - 1) / row_tiles;
      // Batches of 6 to 64 tiles (~32-384 rows: big decode batches) fetch it into L1 outright, their
      // slice per tile small enough for it: a decode step of bench-llama-56m's products and LM head, the
      // weights cold, 7.38 -> 6.90 ms at 32 rows, 13.36 -> 13.07 at 64, 24.5 -> 24.2 at 128 (Zen 4, one
      // process, alternating). Fewer tiles fetch a whole group in a few slices, which L1 cannot hold
      // (1-16 rows: 6-15% slower), and prompt chunks' hundreds of tiles were ~1% faster with L2.
      const bool fetch_l1 = row_tiles >= kL1FetchMinTiles && row_tiles <= kL1FetchMaxTiles;
      for (int64_t tile = 0, m = 0; tile < row_tiles; ++tile) {
        const int64_t rows = (m_dim - m) / (row_tiles - tile);  // near-equal tiles: 64 rows = 5, 5, then 6s
        const int64_t first_line = std::min(tile * slice, next_lines);
        with_constant<kTileRows>(rows, [&](auto num_rows) {
          constexpr int R = decltype(num_rows)::value;
          pairs_tile<R, SWIGLU>(xp + m * k_pairs, k_pairs, w, k_pairs, bias, g * kTileBlocks * kPairBlock, n_dim,
                                op + m * out_stride, out_stride, next + first_line * 64,
                                std::min(slice, next_lines - first_line), fetch_l1);
        });
        m += rows;
      }
    }
  });
}
#endif  // EMBER_GEMV

bool gemv_supported() {
#ifdef EMBER_GEMV
  return true;
#else
  return false;
#endif
}

bool int_gemv_supported() {
#ifdef EMBER_INT
  return true;
#else
  return false;
#endif
}

// x for the integer kernels: contiguous fp32 or bf16 [M, K]; bias, if any, [N] in x's dtype.
void check_rows(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t n_dim, const char* op) {
  TORCH_CHECK(int_gemv_supported(), op, ": built without AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x: contiguous fp32 or bf16 [M, K]");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == n_dim),
              "bias: [N] in x's dtype");
}

template <typename T>
const T* bias_ptr(const std::optional<at::Tensor>& bias) {
  return bias ? bias->data_ptr<T>() : nullptr;
}

at::Tensor linear_gemv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scales,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1), "w: contiguous [N, K]");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 || (w.scalar_type() == at::kChar && scales), "w: bf16, or int8 with scales");
  TORCH_CHECK(!scales || (scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->numel() == w.size(0)),
              "scales: fp32 [N]");
  check_rows(x, bias, w.size(0), "linear_gemv");
  TORCH_CHECK(w.scalar_type() == at::kChar || (gemv_supported() && x.scalar_type() == at::kBFloat16),
              "linear_gemv: bf16 weights need bf16 x and AVX512-BF16");
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
#ifdef EMBER_INT
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  if (w.scalar_type() == at::kChar) {
    if (x.scalar_type() == at::kFloat) gemv_int8<float>(x, w, sp, bias_ptr<float>(bias), out);
    else gemv_int8<c10::BFloat16>(x, w, sp, bias_ptr<c10::BFloat16>(bias), out);
  }
#endif
#ifdef EMBER_GEMV
  if (w.scalar_type() == at::kBFloat16) gemv_bf16(x, w, bias_ptr<c10::BFloat16>(bias), out);
#endif
  return out;
}

// int8 weights per group (gemv_int8_groups_rows): w int8 [N, K], K a multiple of 32, group 16 or 32;
// scales and offsets (optional): fp32 [N, K / group].
at::Tensor linear_groups(const at::Tensor& x, const at::Tensor& w, int64_t group, const at::Tensor& scales,
                         const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias) {
  const int64_t n_dim = w.size(0), k_dim = x.size(1);
  check_rows(x, bias, n_dim, "linear_groups");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar && w.size(1) == k_dim &&
              k_dim % 32 == 0 && (group == 16 || group == 32), "w: contiguous int8 [N, K], K a multiple of 32, group 16 or 32");
  for (const at::Tensor* t : {&scales, offsets ? &*offsets : &scales})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n_dim * (k_dim / group),
                "scales, offsets: fp32 [N, K / group]");
  at::Tensor out = at::empty({x.size(0), n_dim}, x.options());
#ifdef EMBER_INT
  const float* op = offsets ? offsets->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    gemv_groups<float>(x, w, group, scales.data_ptr<float>(), op, bias_ptr<float>(bias), out);
  else
    gemv_groups<c10::BFloat16>(x, w, group, scales.data_ptr<float>(), op, bias_ptr<c10::BFloat16>(bias), out);
#endif
  return out;
}

// int4 weights in tiles of 4 channels (gemv_int4_tiles): w uint8 [ceil(N / 4), K / 64, 4, 32], K a multiple
// of 64, group 32 or a multiple of 64; scales and offsets (optional): fp32 [ceil(N / 4), K / group, 4].
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, int64_t n_dim, int64_t group, const at::Tensor& scales,
                       const std::optional<at::Tensor>& offsets, const std::optional<at::Tensor>& bias) {
  const int64_t k_dim = x.size(1), tiles = (n_dim + kTile - 1) / kTile;
  check_rows(x, bias, n_dim, "linear_int4");
  TORCH_CHECK(w.dim() == 4 && w.is_contiguous() && w.scalar_type() == at::kByte && w.size(0) == tiles &&
              w.size(1) * 64 == k_dim && w.size(2) == kTile && w.size(3) == 32,
              "w: contiguous uint8 [ceil(N / 4), K / 64, 4, 32]");
  TORCH_CHECK(k_dim % group == 0 && (group == 32 || group % 64 == 0), "group: 32 or a multiple of 64 dividing K");
  for (const at::Tensor* t : {&scales, offsets ? &*offsets : &scales})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == tiles * (k_dim / group) * kTile,
                "scales, offsets: fp32 [ceil(N / 4), K / group, 4]");
  at::Tensor out = at::empty({x.size(0), n_dim}, x.options());
#ifdef EMBER_INT
  const float* op = offsets ? offsets->data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    gemv_int4<float>(x, w, n_dim, group, scales.data_ptr<float>(), op, bias_ptr<float>(bias), out);
  else
    gemv_int4<c10::BFloat16>(x, w, n_dim, group, scales.data_ptr<float>(), op, bias_ptr<c10::BFloat16>(bias), out);
#endif
  return out;
}

// [N, K] bf16 -> [ceil(N / 64), K / 2, 64, 2]: the layout linear_pairs reads (channels past N are zero).
at::Tensor pack_pairs(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(1) % 2 == 0, "w: bf16 [N, K] with K even");
  constexpr int64_t width = kTileBlocks * kPairBlock;
  const int64_t n_dim = w.size(0), k_dim = w.size(1), groups = (n_dim + width - 1) / width;
  at::Tensor padded = at::zeros({groups * width, k_dim}, w.options());
  padded.narrow(0, 0, n_dim).copy_(w);
  return padded.view({groups, width, k_dim / 2, 2}).transpose(1, 2).contiguous();
}

// SwiGLU's [2I, K] gate_up weight (gate rows, then up rows; I a multiple of 32) for linear_pairs_silu:
// pack_pairs of the rows reordered so each group of 64 is 32 gate channels and the same 32 up channels.
at::Tensor pack_pairs_swiglu(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % 64 == 0, "w: [2I, K] gate_up weight with I a multiple of 32");
  const int64_t inter = w.size(0) / 2;
  return pack_pairs(w.view({2, inter / 32, 32, w.size(1)}).transpose(0, 1).reshape({2 * inter, w.size(1)}));
}

void check_pairs(const at::Tensor& x, const at::Tensor& packed, int64_t n_dim, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(gemv_supported(), "linear_pairs: built without AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16 && x.size(1) % 2 == 0,
              "x: contiguous bf16 [M, K] with K even");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
              packed.size(1) * 2 == x.size(1) && packed.size(2) == kTileBlocks * kPairBlock && packed.size(3) == 2 &&
              packed.size(0) == (n_dim + kTileBlocks * kPairBlock - 1) / (kTileBlocks * kPairBlock),
              "packed: pack_pairs(w) of a [n_dim, K] weight");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == n_dim),
              "bias: bf16 [N]");
}

at::Tensor linear_pairs(const at::Tensor& x, const at::Tensor& packed, int64_t n_dim, const std::optional<at::Tensor>& bias) {
  check_pairs(x, packed, n_dim, bias);
  at::Tensor out = at::empty({x.size(0), n_dim}, x.options());
#ifdef EMBER_GEMV
  linear_pairs_rows(x, packed, n_dim, bias ? bias->data_ptr<c10::BFloat16>() : nullptr, out);
#endif
  return out;
}

// silu(x @ gate.T) * (x @ up.T) -> [M, I] over pack_pairs_swiglu(gate_up); bias (optional) [2I] as gate_up's.
at::Tensor linear_pairs_silu(const at::Tensor& x, const at::Tensor& packed, int64_t inter,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(inter > 0 && inter % 32 == 0, "linear_pairs_silu: I a multiple of 32 expected, got ", inter);
  check_pairs(x, packed, 2 * inter, bias);
  at::Tensor out = at::empty({x.size(0), inter}, x.options());
#ifdef EMBER_GEMV
  linear_pairs_rows<true>(x, packed, 2 * inter, bias ? bias->data_ptr<c10::BFloat16>() : nullptr, out);
#endif
  return out;
}

// The elementwise ops take bf16 (AVX512-BF16 builds) or fp32 (AVX-512F builds); x and weight share a dtype.
bool elementwise_supported(const at::Tensor& x) {
  return (x.scalar_type() == at::kBFloat16 && gemv_supported()) || (x.scalar_type() == at::kFloat && int_gemv_supported());
}

void check_elementwise(const at::Tensor& x, const char* op) {
  TORCH_CHECK(elementwise_supported(x), op, ": needs bf16 with AVX512-BF16 or fp32 with AVX-512F");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_elementwise(x, "rms_norm");
  TORCH_CHECK(x.is_contiguous(), "x: contiguous");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == h,
              "weight: [H] in x's dtype");
  at::Tensor out = at::empty_like(x);
#ifdef EMBER_INT
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows_f32(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.numel() / h, h,
                      static_cast<float>(eps));
#endif
#ifdef EMBER_GEMV
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                  x.numel() / h, h, static_cast<float>(eps));
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  check_elementwise(x, "add_rms_norm");
  TORCH_CHECK(x.is_contiguous() && delta.is_contiguous() && x.sizes() == delta.sizes() &&
              delta.scalar_type() == x.scalar_type(), "x, delta: contiguous, one shape and dtype");
  const int64_t h = x.size(-1);
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == h,
              "weight: [H] in x's dtype");
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
#ifdef EMBER_INT
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows_f32(x.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.numel() / h, h,
                      static_cast<float>(eps), delta.data_ptr<float>(), sum.data_ptr<float>());
#endif
#ifdef EMBER_GEMV
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                  x.numel() / h, h, static_cast<float>(eps), delta.data_ptr<c10::BFloat16>(), sum.data_ptr<c10::BFloat16>());
#endif
  return {sum, out};
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_elementwise(x, "silu_mul");
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 2 == 0, "x: contiguous [..., 2 * I]");
  const int64_t inter = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = inter;
  at::Tensor out = at::empty(sizes, x.options());
#ifdef EMBER_INT
  if (x.scalar_type() == at::kFloat)
    silu_mul_rows_f32(x.data_ptr<float>(), out.data_ptr<float>(), x.numel() / (2 * inter), inter);
#endif
#ifdef EMBER_GEMV
  if (x.scalar_type() == at::kBFloat16)
    silu_mul_rows(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), x.numel() / (2 * inter), inter);
#endif
  return out;
}

at::Tensor rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  check_elementwise(x, "rotary_");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [tokens, width], rows contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
              cos.size(0) == x.size(0) && cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos, sin: contiguous [tokens, head_dim] in x's dtype");
  const int64_t dim = cos.size(1);
  TORCH_CHECK(dim % 2 == 0 && heads * dim <= x.size(1), "heads * head_dim must fit in a row");
#ifdef EMBER_INT
  if (x.scalar_type() == at::kFloat)
    rotary_rows_f32(x.data_ptr<float>(), x.stride(0), cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0), heads, dim);
#endif
#ifdef EMBER_GEMV
  if (x.scalar_type() == at::kBFloat16)
    rotary_rows(x.data_ptr<c10::BFloat16>(), x.stride(0), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(),
                x.size(0), heads, dim);
#endif
  return x;
}

at::Tensor argmax_rows_op(const at::Tensor& x) {
  check_elementwise(x, "argmax");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "x: contiguous [rows, n]");
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
#ifdef EMBER_INT
  if (x.scalar_type() == at::kFloat) argmax_rows(x.data_ptr<float>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
  else argmax_rows(x.data_ptr<c10::BFloat16>(), out.data_ptr<int64_t>(), x.size(0), x.size(1));
#endif
  return out;
}

// A decode-only step's decoder layers in one call: DecoderLayer.forward_cpu_rows's kernels in its
// order, with the same bits, and no Python between them (a small model's single-stream token spent
// about a fifth of its time in the ~12 op calls per layer from Python). Per layer, `weights` holds
// 6 tensors (input norm, qkv pairs, o pairs, post-attention norm, gate_up in pack_pairs_swiglu's layout, down pairs),
// `biases` 4, `sizes` 5 after the first 3 (heads, kv_heads, head_dim): qkv, o, gate_up and down
// widths and the sliding window (0: none), `eps` 2. Attention is cpu_paged's decode kernel
// (ember_cpu::decode_attention_paired, through the dispatcher). Returns (x, delta) as
// forward_cpu_rows does: their sum is the last layer's output; with `final_norm` (the model's RMSNorm
// weight), (that sum, its norm) as add_rms_norm would: one op less between steps.
std::tuple<at::Tensor, at::Tensor> decode_stack(
    const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::IntArrayRef sizes, at::ArrayRef<double> eps, double scale,
    at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& blocks, const at::Tensor& offsets,
    const at::Tensor& block_tables, const at::Tensor& kv_lens, const std::optional<at::Tensor>& final_norm,
    double final_eps) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == 6 * layers &&
              static_cast<int64_t>(biases.size()) == 4 * layers && static_cast<int64_t>(sizes.size()) == 3 + 5 * layers &&
              static_cast<int64_t>(eps.size()) == 2 * layers && static_cast<int64_t>(v_caches.size()) == layers,
              "decode_stack: per-layer lists of 6 weights, 4 biases, 5 sizes, 2 eps, one K and one V cache");
  static const auto attend = c10::Dispatcher::singleton()
      .findSchemaOrThrow("ember_cpu::decode_attention_paired", "")
      .typed<at::Tensor(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double)>();
  const int64_t heads = sizes[0], kv_heads = sizes[1], head_dim = sizes[2], rows = x_in.size(0);
  at::Tensor x = x_in, delta;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = &weights[6 * l];
    const int64_t* n = &sizes[3 + 5 * l];
    const auto bias = [&](int i) { return biases.get(4 * l + i); };
    at::Tensor h;
    if (!delta.defined()) {
      h = rms_norm(x, w[0], eps[2 * l]);
    } else {
      std::tie(x, h) = add_rms_norm(x, delta, w[0], eps[2 * l]);
    }
    at::Tensor qkv = linear_pairs(h, w[1], n[0], bias(0));
    rotary_(qkv, cos, sin, heads + kv_heads);
    const at::Tensor split = qkv.view({rows, heads + 2 * kv_heads, head_dim});
    at::Tensor k_cache = k_caches[l], v_cache = v_caches[l];
    const at::Tensor out = attend.call(split.narrow(1, 0, heads), k_cache, v_cache, split.narrow(1, heads, kv_heads),
                                       split.narrow(1, heads + kv_heads, kv_heads), blocks, offsets, block_tables, kv_lens,
                                       n[4], scale);
    std::tie(x, h) = add_rms_norm(x, linear_pairs(out.view({rows, heads * head_dim}), w[2], n[1], bias(1)), w[3],
                                  eps[2 * l + 1]);
    delta = linear_pairs(linear_pairs_silu(h, w[4], n[2] / 2, bias(2)), w[5], n[3], bias(3));
  }
  if (final_norm) return add_rms_norm(x, delta, *final_norm, final_eps);
  return {x, delta};
}

}  // namespace

TORCH_LIBRARY(ember_ops, m) {
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("pack_pairs(Tensor w) -> Tensor");
  m.def("linear_pairs(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor");
  m.def("pack_pairs_swiglu(Tensor w) -> Tensor");
  m.def("linear_pairs_silu(Tensor x, Tensor packed, int inter, Tensor? bias=None) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, int heads) -> Tensor(a!)");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("decode_stack(Tensor x, Tensor cos, Tensor sin, Tensor[] weights, Tensor?[] biases, int[] sizes, float[] eps, "
        "float scale, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor blocks, Tensor offsets, Tensor block_tables, "
        "Tensor kv_lens, Tensor? final_norm=None, float final_eps=0.0) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("linear_gemv(Tensor x, Tensor w, Tensor? scales=None, Tensor? bias=None) -> Tensor");
  m.def("linear_groups(Tensor x, Tensor w, int group, Tensor scales, Tensor? offsets=None, Tensor? bias=None) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, int n, int group, Tensor scales, Tensor? offsets=None, Tensor? bias=None) -> Tensor");
  m.def("gemv_supported() -> bool", &gemv_supported);
  m.def("int_gemv_supported() -> bool", &int_gemv_supported);
}

TORCH_LIBRARY_IMPL(ember_ops, CPU, m) {
  m.impl("linear_gemv", &linear_gemv);
  m.impl("linear_groups", &linear_groups);
  m.impl("linear_int4", &linear_int4);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("pack_pairs", &pack_pairs);
  m.impl("linear_pairs", &linear_pairs);
  m.impl("pack_pairs_swiglu", &pack_pairs_swiglu);
  m.impl("linear_pairs_silu", &linear_pairs_silu);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_", &rotary_);
  m.impl("argmax", &argmax_rows_op);
  m.impl("decode_stack", &decode_stack);
}
