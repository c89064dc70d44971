// bf16 products on CPUs with AVX2 and FMA but no AVX512-BF16 (most laptops and many servers),
// registered as torch.ops.ember_avx2 (cpu_ops.py builds this file on first use).
//
// There PyTorch multiplies bf16 matrices element by element through its generic kernel (about a
// fifth of what the same CPU does in fp32), and fp32 weights would double the memory a model
// needs. linear_blocks keeps the weight in bf16, in a copy made once (pack_blocks: [N/16, K, 16],
// sixteen output channels side by side for every k), widens each weight vector to fp32 in registers
// and multiplies-adds in fp32. Register tiles of up to 5 rows x 16 channels, or 1 row x 64 channels
// for single rows, fit the 16 ymm registers.
//
// Batch invariance: every output is one fp32 chain over k ascending, whichever tile, thread or
// chunk of rows computes it, so a row's result never depends on the other rows of the batch,
// their number, or the thread count; bias is added and the sum rounded to bf16 (to nearest even)
// at the end.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EMBER_AVX2 1
#endif
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <tuple>
#include <optional>
#include <vector>

namespace {

constexpr int64_t kPair = 16;  // output channels per packed group: two ymm of fp32
constexpr int kTileRows = 5;  // 5 rows x 16 channels: 10 accumulators, 2 weight vectors, a broadcast and a zero

#ifdef EMBER_AVX2
// One k of a packed group: 16 bf16 stored as channels (0-3, 8-11, 4-7, 12-15), so that interleaving
// them with zeros (the bf16 -> fp32 widening: bf16 is fp32's upper half) gives channels 0-7 and 8-15
// in order, one instruction each.
inline void widen_pair(const uint16_t* p, __m256& lo, __m256& hi) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}

// R rows of x (fp32, row stride k_dim) times P packed groups of the weight -> out (bf16, row stride n_dim).
template <int R, int P>
void tile(const float* x, int64_t k_dim, const uint16_t* w, const float* bias, int64_t n0, int64_t n_dim,
          c10::BFloat16* out) {
  __m256 acc[R][2 * P];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 2 * P; ++b) acc[r][b] = _mm256_setzero_ps();
  const int64_t group_stride = k_dim * kPair;
  for (int64_t k = 0; k < k_dim; ++k) {
    __m256 wv[2 * P];
    for (int p = 0; p < P; ++p) widen_pair(w + p * group_stride + k * kPair, wv[2 * p], wv[2 * p + 1]);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * k_dim + k);
      for (int b = 0; b < 2 * P; ++b) acc[r][b] = _mm256_fmadd_ps(xv, wv[b], acc[r][b]);
    }
  }
  // All sums leave the registers at once, after the loop: an epilogue that reads acc[r][b] under
  // conditions made GCC keep acc in memory and store every accumulator on every k (half the speed).
  alignas(32) float sums[R][2 * P][8];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 2 * P; ++b) _mm256_store_ps(sums[r][b], acc[r][b]);
  for (int b = 0; b < 2 * P; ++b) {
    const int64_t n = n0 + b * 8;
    const int64_t valid = std::min<int64_t>(8, n_dim - n);
    for (int r = 0; r < R; ++r) {
      c10::BFloat16* dst = out + r * n_dim + n;
      for (int64_t j = 0; j < valid; ++j) dst[j] = c10::BFloat16(bias ? sums[r][b][j] + bias[n + j] : sums[r][b][j]);
    }
  }
}

// body(std::integral_constant<int, v>) for v = min(value, MAX) >= 1, so v is a template argument.
template <int MAX, typename Body>
void with_constant(int64_t value, const Body& body) {
  if constexpr (MAX > 1) {
    if (value < MAX) return with_constant<MAX - 1>(value, body);
  }
  body(std::integral_constant<int, MAX>{});
}

void linear_rows(const at::Tensor& x, const at::Tensor& packed, int64_t n_dim, const float* bias, at::Tensor& out) {
  const int64_t m_dim = x.size(0), k_dim = x.size(1), groups = packed.size(0);
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  auto* op = out.data_ptr<c10::BFloat16>();
  // Rows in chunks whose fp32 copy (~192 KiB) stays in L2 while the thread's weights stream past it.
  const int64_t chunk = std::max<int64_t>(kTileRows, 49152 / k_dim / kTileRows * kTileRows);
  const int64_t per_tile = m_dim == 1 ? 4 : 1;  // a single row takes 4 groups a pass (8 accumulators)
  const int64_t units = (groups + per_tile - 1) / per_tile;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    // Each thread widens the chunk's rows of x to fp32 itself (a few KiB to a few hundred): no separate
    // conversion op, allocation or pass over memory per call, which single-token decoding felt.
    std::vector<float> xf(std::min(chunk, m_dim) * k_dim);
    float* xp = xf.data();
    for (int64_t m0 = 0; m0 < m_dim; m0 += chunk) {
      const int64_t m1 = std::min(m_dim, m0 + chunk);
      const uint16_t* src = xb + m0 * k_dim;
      const int64_t count = (m1 - m0) * k_dim;
      int64_t i = 0;
      for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(xp + i, _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), 16)));
      for (; i < count; ++i) {
        const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
        std::memcpy(xp + i, &bits, sizeof(bits));
      }
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t g = u * per_tile, n0 = g * kPair;
        const uint16_t* w = wp + g * k_dim * kPair;
        if (per_tile == 4) {
          with_constant<4>(groups - g, [&](auto count) { tile<1, decltype(count)::value>(xp, k_dim, w, bias, n0, n_dim, op); });
          continue;
        }
        for (int64_t m = m0; m < m1; m += kTileRows) {
          with_constant<kTileRows>(m1 - m, [&](auto rows) {
            tile<decltype(rows)::value, 1>(xp + (m - m0) * k_dim, k_dim, w, bias, n0, n_dim, op + m * n_dim);
          });
        }
      }
    }
  });
}
#endif  // EMBER_AVX2

// RMSNorm (with an optional residual add before it) and SwiGLU's silu(gate) * up in one pass each,
// with the arithmetic and roundings of cpu_ops.cpp's AVX512-BF16 versions (transformers' RMSNorm: fp32
// statistics, the normalised value rounded to bf16, then times the weight; silu by ATen's own vectorized
// formula, rounded, then the product): on a CPU without them these were five and three PyTorch ops
// each, and single-token decoding paid a dispatch for every one.
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// The vector paths below need Vectorized<float> to be one ymm: an AVX2 build of ATen's vectors. On an
// AVX-512 CPU without AVX512-BF16 (Skylake to Ice Lake servers) it is a zmm, and the scalar paths serve.
#if defined(EMBER_AVX2) && defined(CPU_CAPABILITY_AVX2)
#define EMBER_AVX2_VEC 1
constexpr bool kAvx2Lanes = kLanes == 8;
inline __m256i rounded_bits(__m256 v) {  // fp32 -> bf16 bits in the upper half, to nearest even (c10's rule, NaN quiet)
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i sum = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(_mm256_and_si256(sum, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))),
                            _mm256_set1_epi32(0x7FC00000), nan);
}
#else
constexpr bool kAvx2Lanes = false;
#endif

inline Vec load_bf16(const c10::BFloat16* p, int64_t n) {
#if defined(EMBER_AVX2_VEC)
  if constexpr (kAvx2Lanes) {
    if (n == kLanes)
      return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
  }
#endif
  alignas(64) float tmp[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

inline void store_bf16(c10::BFloat16* p, const Vec& v, int64_t n) {
#if defined(EMBER_AVX2_VEC)
  if constexpr (kAvx2Lanes) {
    if (n == kLanes) {
      const __m256i hi = _mm256_srli_epi32(rounded_bits(__m256(v)), 16);
      const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
      return;
    }
  }
#endif
  alignas(64) float tmp[kLanes];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = c10::BFloat16(tmp[i]);
}

inline Vec round_bf16(const Vec& v) {
#if defined(EMBER_AVX2_VEC)
  if constexpr (kAvx2Lanes) return Vec(_mm256_castsi256_ps(rounded_bits(__m256(v))));
#endif
  alignas(64) float tmp[kLanes];
  v.store(tmp);
  for (int64_t i = 0; i < kLanes; ++i) tmp[i] = static_cast<float>(c10::BFloat16(tmp[i]));
  return Vec::loadu(tmp);
}

void rms_norm_rows(const c10::BFloat16* x, const c10::BFloat16* w, c10::BFloat16* out, int64_t rows, int64_t h,
                   float eps, const c10::BFloat16* delta, c10::BFloat16* sum) {
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* xr = x + r * h;
      if (delta) {
        for (int64_t k = 0; k < h; k += kLanes) {
          const int64_t n = std::min(kLanes, h - k);
          store_bf16(sum + r * h + k, load_bf16(xr + k, n) + load_bf16(delta + r * h + k, n), n);
        }
        xr = sum + r * h;
      }
      Vec squares(0.f);
      for (int64_t k = 0; k < h; k += kLanes) {
        const Vec v = load_bf16(xr + k, std::min(kLanes, h - k));
        squares = at::vec::fmadd(v, v, squares);
      }
      alignas(64) float lanes[kLanes];
      squares.store(lanes);
      float total = 0.f;
      for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
      const Vec inv(1.f / std::sqrt(total / h + eps));
      for (int64_t k = 0; k < h; k += kLanes) {
        const int64_t n = std::min(kLanes, h - k);
        store_bf16(out + r * h + k, round_bf16(load_bf16(xr + k, n) * inv) * load_bf16(w + k, n), n);
      }
    }
  });
}

void silu_mul_rows(const c10::BFloat16* x, c10::BFloat16* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / inter), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const c10::BFloat16* gate = x + r * 2 * inter;
      const c10::BFloat16* up = gate + inter;
      for (int64_t k = 0; k < inter; k += kLanes) {
        const int64_t n = std::min(kLanes, inter - k);
        const Vec g = load_bf16(gate + k, n);
        const Vec act = g / (Vec(1.f) + g.neg().exp());
        store_bf16(out + r * inter + k, round_bf16(act) * load_bf16(up + k, n), n);
      }
    }
  });
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() >= 1, "x: contiguous bf16");
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() && weight.numel() == x.size(-1),
              "weight: contiguous bf16 [hidden]");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  at::Tensor out = at::empty_like(x);
  const int64_t h = x.size(-1);
  rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                x.numel() / h, h, static_cast<float>(eps), nullptr, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  check_norm(x, weight);
  TORCH_CHECK(delta.sizes() == x.sizes() && delta.scalar_type() == at::kBFloat16 && delta.is_contiguous(),
              "delta: contiguous bf16 shaped as x");
  at::Tensor sum = at::empty_like(x), out = at::empty_like(x);
  const int64_t h = x.size(-1);
  rms_norm_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
                x.numel() / h, h, static_cast<float>(eps), delta.data_ptr<c10::BFloat16>(), sum.data_ptr<c10::BFloat16>());
  return {sum, out};
}

at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.size(-1) % 2 == 0,
              "x: contiguous bf16 [..., 2 * inter]");
  const int64_t inter = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = inter;
  at::Tensor out = at::empty(sizes, x.options());
  silu_mul_rows(x.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), x.numel() / (2 * inter), inter);
  return out;
}

bool supported() {
#ifdef EMBER_AVX2
  return true;
#else
  return false;
#endif
}

// [N, K] bf16 -> [ceil(N / 16), K, 16] bf16, each k's 16 channels in widen_pair's order: the layout
// linear_blocks reads (channels past N are zero).
at::Tensor pack_blocks(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "w: bf16 [N, K]");
  const int64_t n_dim = w.size(0), k_dim = w.size(1), groups = (n_dim + kPair - 1) / kPair;
  at::Tensor padded = at::zeros({groups * kPair, k_dim}, w.options());
  padded.narrow(0, 0, n_dim).copy_(w);
  const at::Tensor order = at::tensor({0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15}, at::kLong);
  return padded.view({groups, kPair, k_dim}).index_select(1, order).transpose(1, 2).contiguous();
}

at::Tensor linear_blocks(const at::Tensor& x, const at::Tensor& packed, int64_t n_dim, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(supported(), "linear_blocks: built without AVX2/FMA");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x: bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
              packed.size(1) == x.size(1) && packed.size(2) == kPair && packed.size(0) == (n_dim + kPair - 1) / kPair,
              "packed: pack_blocks(w) of a [n_dim, K] weight");
  TORCH_CHECK(!bias || (bias->numel() == n_dim), "bias: [n_dim]");
  TORCH_CHECK(x.size(1) > 0, "x: K must be positive");
  at::Tensor out = at::empty({x.size(0), n_dim}, x.options());
  if (x.size(0) == 0) return out;
  const at::Tensor xc = x.contiguous();
  std::optional<at::Tensor> bf;
  if (bias) bf = bias->to(at::kFloat).contiguous();
#ifdef EMBER_AVX2
  linear_rows(xc, packed, n_dim, bf ? bf->data_ptr<float>() : nullptr, out);
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY(ember_avx2, m) {
  m.def("pack_blocks(Tensor w) -> Tensor");
  m.def("linear_blocks(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("supported() -> bool", &supported);
}

TORCH_LIBRARY_IMPL(ember_avx2, CPU, m) {
  m.impl("pack_blocks", &pack_blocks);
  m.impl("linear_blocks", &linear_blocks);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_mul", &silu_mul);
}
