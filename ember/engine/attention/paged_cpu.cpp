// Paged attention on CPU over K/V blocks read in place, and the writes of new tokens' K/V into
// those blocks; the ops are registered as torch.ops.ember_cpu (cpu_paged.py builds this file on
// first use and decides which batches and layers go through it).
//
// Two cache layouts, two kernels, one online softmax (flash-decoding: scores, running max,
// rescaled accumulator) visiting each row's keys in vector-width chunks. Each row carries its
// request's block table and its visible key range (a sliding window included), so decodes,
// prompt chunks over cached context and speculative drafts share one code path.
// - attention_kernel, the "transposed" layout: K blocks [num_blocks, kv_heads, head_dim,
//   block_size] (keys transposed, so a vector of consecutive keys' scores comes from multiply-adds
//   with no horizontal sums), V blocks [num_blocks, kv_heads, block_size, head_dim]; fp32, bf16 or
//   fp16, or int8 with a bf16 scale per token and head; Gemma 2's logit soft-capping and gpt-oss's
//   attention sinks. One work item is (query row, KV head): a GQA group's query heads share every
//   K/V load. Arithmetic is fp32 through ATen's Vectorized<float> (AVX-512/AVX2 as compiled), in a
//   fixed order, so a row's result does not depend on the rest of the batch.
// - paired_kernel, the "paired" bf16 layout for AVX512-BF16's dot products of bf16 pairs (see the
//   layout there): a work item is a tile of up to R rows of one request (R = 1 for decodes), so a
//   prompt chunk's rows share each K/V load; threads take items longest first.
// - write_transposed / write_paired: a batch's new K/V rows into their slots in one op.
// - decode_attention_paired: a decode-only batch, each row's new K/V written by the paired kernel
//   just before it reads that chunk (FreshTokens), with the same cache contents and output bits
//   as write_paired followed by paged_attention.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <cmath>
#include <cstring>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int kChains = 4;  // independent accumulators in the q.k loop
constexpr int kSpan = 4;  // chunks of keys per online-softmax update
constexpr int64_t kWriteAhead = 4;  // tokens whose cache lines write_paired fetches ahead

template <typename T>
inline Vec load_vec(const T* p) {
  Vec v;
  at::vec::load_to_float<T>(p, v);
  return v;
}
template <>
inline Vec load_vec<float>(const float* p) {
  return Vec::loadu(p);
}
// int8 caches: one vector of keys (or value dims) widened to fp32.
template <>
inline Vec load_vec<int8_t>(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return Vec(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#else
  alignas(64) float wide[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) wide[i] = p[i];
  return Vec::loadu(wide);
#endif
}

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}
inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// G: query heads per KV head, a compile-time constant so the group's accumulators stay in registers.
// T: the dtype of q and out; C: the caches' (T, or int8 with a bf16 scale per token and head:
// scales [num_blocks, kv_heads, block_size], applied to the scores and to the probabilities).
template <typename T, typename C, int G>
void attention_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const c10::BFloat16* k_scales, const c10::BFloat16* v_scales,
                      const int64_t* block_tables, int64_t max_blocks, const int64_t* token_request,
                      const int64_t* kv_lens, int64_t window, float scale, float softcap, const float* sinks,
                      at::Tensor& out) {
  constexpr bool kQuantized = std::is_same_v<C, int8_t>;
  constexpr int64_t W = Vec::size();  // keys per chunk: one vector of scores
  const int64_t num_rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(3), group = G;
  const T* qp = q.data_ptr<T>();
  const C* kp = k_cache.data_ptr<C>();
  const C* vp = v_cache.data_ptr<C>();
  T* op = out.data_ptr<T>();
  const int64_t block_elems = k_cache.stride(0);  // K and V blocks may sit side by side (see blocks_contiguous)
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, num_rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * dim), acc(G * dim);
    float max_score[G], denom[G], correction[G];
    alignas(64) float probs[G][kSpan * W];
    Vec out_acc[G];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / kv_heads, kvh = item % kv_heads;
      for (int64_t i = 0; i < group * dim; ++i) qf[i] = static_cast<float>(qp[n * q.stride(0) + kvh * group * dim + i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(max_score, max_score + G, neg_inf);
      std::fill(denom, denom + G, 0.f);
      if (sinks)  // each head's sink logit starts its softmax: exp(sink - max) = 1 in the denominator, no value
        for (int g = 0; g < G; ++g) max_score[g] = sinks[kvh * group + g], denom[g] = 1.f;
      const int64_t last = kv_lens[n];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window) : 0;
      const int64_t* table = block_tables + token_request[n] * max_blocks;

      // kSpan chunks of W keys share one softmax update per head (one max and one sum reduction, one
      // scalar exp and one rescaling of the accumulators per kSpan * W keys instead of per W; alone this
      // was level, the reads being the bound), and the next span's blocks are fetched while one computes.
      // Spans start on a grid of kSpan * W keys, so a row's bits do not depend on the batch.
      constexpr int64_t S = kSpan;
      for (int64_t span = first - first % (S * W); span < last; span += S * W) {
        const int64_t chunks = std::min<int64_t>(S, (last - span + W - 1) / W);
        const C* values[S];
        int64_t lo[S], hi[S], scale_at[S];
        Vec scores[S][G];
        // The next span's K and V blocks (this head) fetched into L2 a few lines per q.k step of this one:
        // a burst of a block's lines two blocks ahead read these scattered pieces ~1.4x slower (fp32,
        // SmolLM2-135M's heads: 16 decode rows x 30 layers 17.1 -> 12.3 ms, one row 1.81 -> 1.25 ms).
        const char* fetch_start[2 * S];
        int64_t ranges = 0, fetched = 0;
        const int64_t range_lines = dim * block_size * static_cast<int64_t>(sizeof(C)) / 64;
        for (int64_t key = span + S * W; key < std::min(last, span + 2 * S * W); key += block_size) {
          const int64_t base = table[key / block_size] * block_elems;
          fetch_start[ranges++] = reinterpret_cast<const char*>(kp + base + kvh * dim * block_size);
          fetch_start[ranges++] = reinterpret_cast<const char*>(vp + base + kvh * block_size * dim);
          if (ranges == 2 * S) break;
        }
        const int64_t fetch_lines = ranges * range_lines;
        const int64_t fetch_per_step = (fetch_lines + chunks * (dim / kChains) - 1) / (chunks * (dim / kChains));
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t start = span + c * W;
          const int64_t block = table[start / block_size], offset = start % block_size;
          const C* keys = kp + block * block_elems + kvh * dim * block_size + offset;  // [dim][block_size]
          values[c] = vp + block * block_elems + (kvh * block_size + offset) * dim;  // [block_size][dim]
          scale_at[c] = (block * kv_heads + kvh) * block_size + offset;  // int8 caches only
          lo[c] = std::max<int64_t>(first - start, 0), hi[c] = std::min<int64_t>(last - start, W);
          if (lo[c] >= hi[c]) {  // before a window's first key
            for (int g = 0; g < G; ++g) scores[c][g] = Vec(neg_inf);
            continue;
          }
          // Scores of this chunk's keys for every head of the group: each K row is loaded once, and
          // kChains independent sums per head keep the multiply-adds from waiting on each other.
          Vec part[G][kChains];
          for (int g = 0; g < G; ++g)
            for (int ch = 0; ch < kChains; ++ch) part[g][ch] = Vec(0.f);
          for (int64_t d = 0; d < dim; d += kChains) {
            for (int64_t e = 0; e < fetch_per_step && fetched < fetch_lines; ++e, ++fetched)
              __builtin_prefetch(fetch_start[fetched / range_lines] + fetched % range_lines * 64, 0, 2);  // into L2
            for (int ch = 0; ch < kChains; ++ch) {
              const Vec key = load_vec(keys + (d + ch) * block_size);
              for (int g = 0; g < G; ++g) part[g][ch] = at::vec::fmadd(Vec(qf[g * dim + d + ch]), key, part[g][ch]);
            }
          }
          for (int g = 0; g < G; ++g) scores[c][g] = (part[g][0] + part[g][1]) + (part[g][2] + part[g][3]);
          if constexpr (kQuantized) {
            const Vec key_scale = load_vec(k_scales + scale_at[c]);
            for (int g = 0; g < G; ++g) scores[c][g] = scores[c][g] * key_scale;
          }
          if (softcap > 0.f)  // Gemma 2: logits -> softcap * tanh(logits / softcap)
            for (int g = 0; g < G; ++g) scores[c][g] = (scores[c][g] * Vec(1.f / softcap)).tanh() * Vec(softcap);
          if (lo[c] > 0 || hi[c] < W) {  // a partial chunk at either end of the visible range
            for (int g = 0; g < G; ++g) {
              scores[c][g].store(probs[g]);
              for (int64_t j = 0; j < W; ++j) probs[g][j] = (j >= lo[c] && j < hi[c]) ? probs[g][j] : neg_inf;
              scores[c][g] = Vec::loadu(probs[g]);
            }
          }
        }
        for (int g = 0; g < G; ++g) {
          Vec top = scores[0][g];
          for (int64_t c = 1; c < chunks; ++c) top = at::vec::maximum(top, scores[c][g]);
          const float new_max = std::max(max_score[g], reduce_max(top));  // finite: the span sees a key
          correction[g] = max_score[g] == neg_inf ? 0.f : std::exp(max_score[g] - new_max);
          max_score[g] = new_max;
          Vec total(0.f);
          for (int64_t c = 0; c < chunks; ++c) {
            // exp_u20, as the bf16 kernel and PyTorch's CPU flash attention: ~1e-6 relative error
            const Vec p = (scores[c][g] - Vec(new_max)).exp_u20();
            total = total + p;
            if constexpr (kQuantized) {
              (p * load_vec(v_scales + scale_at[c])).store(probs[g] + c * W);  // each int8 V row's scale folded in
            } else {
              p.store(probs[g] + c * W);
            }
          }
          denom[g] = denom[g] * correction[g] + reduce_sum(total);
        }
        // Weighted V rows: each V row is loaded once for the whole group.
        for (int64_t d = 0; d < dim; d += W) {
          for (int g = 0; g < G; ++g) out_acc[g] = Vec::loadu(acc.data() + g * dim + d) * Vec(correction[g]);
          for (int64_t c = 0; c < chunks; ++c) {
            for (int64_t j = lo[c]; j < hi[c]; ++j) {
              const Vec value = load_vec(values[c] + j * dim + d);
              for (int g = 0; g < G; ++g) out_acc[g] = at::vec::fmadd(Vec(probs[g][c * W + j]), value, out_acc[g]);
            }
          }
          for (int g = 0; g < G; ++g) out_acc[g].store(acc.data() + g * dim + d);
        }
      }
      for (int g = 0; g < G; ++g) {
        const float inv = 1.f / denom[g];
        T* dst = op + (n * heads + kvh * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<T>(acc[g * dim + d] * inv);
      }
    }
  });
}

// f(std::integral_constant<int, n>{}, h0) for H heads in blocks of 4 (the last one 1-3 when H is not a
// multiple of 4): the register tiles of the paired kernel's prompt q.k and of its weighing of values.
template <int H, typename F>
inline void head_blocks(F&& f) {
  for (int h0 = 0; h0 + 4 <= H; h0 += 4) f(std::integral_constant<int, std::min(4, H)>{}, h0);
  constexpr int tail = H % 4;
  if constexpr (tail > 0) f(std::integral_constant<int, tail>{}, H - tail);
}

// 16 floats to bf16 with c10::BFloat16's rounding (to nearest even; NaN as 0x7FC0) and no flush of
// subnormals, unlike vcvtneps2bf16 (a loop of scalar conversions took up to ~10% of prompt attention).
inline void store_bf16(c10::BFloat16* dst, __m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_set1_epi32(0x7fc0), rounded);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(rounded));
}

// One new token's K and V rows (one KV head) into its slot of a paired-layout cache (see paired_kernel):
// K as (dim 2i, 2i+1) pairs a row of block_size apart, V interleaved with the slot's neighbour key.
inline void write_slot(uint32_t* k_cache, uint16_t* v_cache, const uint16_t* key, const uint16_t* value,
                       int64_t head_offset, int64_t offset, int64_t block_size, int64_t dim) {
  uint32_t* kdst = k_cache + head_offset / 2 + offset;  // [pairs][block_size] of (2i, 2i+1)
  for (int64_t i = 0; i < dim / 2; ++i) {
    uint32_t pair;
    std::memcpy(&pair, key + 2 * i, sizeof(pair));
    kdst[i * block_size] = pair;
  }
  uint16_t* vdst = v_cache + head_offset + (offset / 2) * dim * 2 + offset % 2;  // [dim][2]
  for (int64_t d = 0; d < dim; ++d) vdst[2 * d] = value[d];
}

// A decode-only batch's new K/V rows, written by the attention kernel itself: each row's token goes in
// right before the chunk holding it is read, when the kernel's own prefetch has brought those cache
// lines in; a separate pass beforehand finds them cold (BENCHMARKS.md has what that cost). Only for
// batches where no row reads a block another row writes into (decode_attention_paired checks).
struct FreshTokens {
  const uint16_t* k;  // [rows, kv_heads, head_dim], heads contiguous
  const uint16_t* v;
  int64_t k_stride, v_stride;  // between rows
  const int64_t* blocks;  // each row's slot
  const int64_t* offsets;
  uint32_t* k_cache;
  uint16_t* v_cache;
};

#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
#define EMBER_BF16_PAIRS 1
// bf16 caches in "paired" layout, for AVX512-BF16's dot product of bf16 pairs:
// K blocks [num_blocks, kv_heads, head_dim / 2, block_size, 2] (dims 2i and 2i+1 of a key adjacent),
// V blocks [num_blocks, kv_heads, block_size / 2, head_dim, 2] (keys 2j and 2j+1 of a dim adjacent).
// One vdpbf16ps then scores 16 keys over two dims, or adds two keys' weighted values to 16 dims.
// The probabilities are rounded to bf16 for the second product (as GPU flash attention does).
//
// A work item is a tile of up to R consecutive rows of one request and one KV head: its R x G
// query heads share every K and V load, which makes prompt chunks over cached context compute-bound
// instead of load-bound (R = 1 for decodes). Each row keeps its own visible key range.
//
// A row's arithmetic depends on C (independent sums per head in q.k), S (chunks of keys per softmax
// update) and where the spans of S chunks start; never on R or on the tile's other rows: keys a row
// does not see score -inf and add exact zeros. Spans start on a grid of S * W keys, so a row's
// updates fall at the same keys whichever tile holds it. With one C and S for every tile
// (paired_attention's invariant tiling) a row's bits are the same as a decode, in any batch.
template <int G, int R, int C, int S>
void paired_kernel(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const int64_t* block_tables, int64_t max_blocks, const int64_t* token_request,
                   const int64_t* kv_lens, int64_t window, float scale, const std::vector<int64_t>& tiles,
                   at::Tensor& out, const FreshTokens* fresh = nullptr) {
  static_assert(R >= 1);
  constexpr int64_t W = 16;
  constexpr int H = G * R;  // query heads per work item
  const int64_t heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1), block_size = k_cache.size(3);
  const int64_t pairs = dim / 2, dim_vecs = dim / W;
  const int64_t num_tiles = static_cast<int64_t>(tiles.size()) / 2;
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<c10::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<c10::BFloat16>());
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t head_elems = block_size * dim;  // one head's K (or V) rows in a block
  const int64_t block_elems = k_cache.stride(0);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 neg_inf = _mm512_set1_ps(kNegInf);

  // Work items vary a lot (a prompt's first rows see a few keys, its last rows all of them): the
  // threads take items from a shared counter, longest first, instead of fixed halves of the list.
  std::vector<int64_t> order(num_tiles);
  std::vector<int64_t> cost(num_tiles);
  for (int64_t t = 0; t < num_tiles; ++t) {
    order[t] = t;
    cost[t] = kv_lens[tiles[2 * t] + tiles[2 * t + 1] - 1];  // the tile's last row sees the most keys
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::atomic<int64_t> next_item{0};
  // Decodes of a big batch: one item per row over all its KV heads, so each block is read as one
  // stretch of all heads' K (then V) rows (8 KiB for 4 heads of 64 dims, block 16) instead of
  // separate 2 KiB pieces: fewer, longer random reads, which the memory system serves faster
  // (BENCHMARKS.md). From 4 rows per thread: 16 decode rows over 2 threads (Qwen2-0.5B's W1) 3.92 -> 3.57 ms
  // a step of 24 layers, bench-llama-56m's 1.62 -> 1.39 (the bound was 16 rows per thread; Zen 4, with the
  // span fetches below); level at 4-8 rows. Fewer rows or prompt tiles keep one item per KV head, for parallelism.
  const int64_t kh_per_item = R == 1 && num_tiles >= 4 * at::get_num_threads() ? kv_heads : 1;
  const int64_t items_per_tile = kv_heads / kh_per_item;
  const int64_t num_items = num_tiles * items_per_tile;

  // A span's K and V blocks (this item's heads) fetched into L2 a few lines per q.k step of the span before.
  struct SpanFetch {
    const char* start[2 * S];
    int64_t lines = 0, ranges = 0, range_lines = 0, done = 0, per_step = 0;
    const uint16_t *kp, *vp;
    int64_t block_size, block_elems, head_elems, kh_per_item;
    void add_span(const int64_t* table, int64_t span, int64_t hi, int64_t kvh0) {
      range_lines = kh_per_item * head_elems * 2 / 64;
      for (int64_t c = 0; c < S; ++c) {
        const int64_t start_key = span + c * W;
        if (start_key >= hi) break;
        if (start_key % block_size != 0) continue;  // a block of several chunks: fetched whole at its first
        const int64_t base = table[start_key / block_size] * block_elems + kvh0 * head_elems;
        start[ranges++] = reinterpret_cast<const char*>(kp + base);
        start[ranges++] = reinterpret_cast<const char*>(vp + base);
      }
      lines = ranges * range_lines;
    }
    void spread_over(int64_t steps) { per_step = (lines + steps - 1) / std::max<int64_t>(1, steps); }
    void step() {
      for (int64_t e = 0; e < per_step && done < lines; ++e, ++done)
        _mm_prefetch(start[done / range_lines] + done % range_lines * 64, _MM_HINT_T1);
    }
  };
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<uint32_t> qpairs(kh_per_item * H * pairs);
    std::vector<float> acc(kh_per_item * H * dim);
    std::vector<float> max_score(kh_per_item * H), denom(kh_per_item * H);
    float correction[H];
    int64_t first[R], last[R];
    alignas(64) uint32_t ppairs[S][H][W / 2];
    // Each thread claims its next item one ahead, so the last span of one can fetch the next one's first.
    int64_t upcoming = next_item.fetch_add(1, std::memory_order_relaxed);
    for (int64_t item; (item = upcoming) < num_items;) {
      upcoming = next_item.fetch_add(1, std::memory_order_relaxed);
      // a tile's KV heads side by side
      const int64_t tile = order[item / items_per_tile], kvh0 = item % items_per_tile * kh_per_item;
      const int64_t row0 = tiles[2 * tile], rows = tiles[2 * tile + 1];
      int64_t lo_all = std::numeric_limits<int64_t>::max(), hi_all = 0;
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          for (int64_t j = 0; j < kh_per_item; ++j)
            std::memcpy(&qpairs[(j * H + r * G) * pairs], qp + (row0 + r) * q.stride(0) + (kvh0 + j) * G * dim,
                        G * dim * sizeof(uint16_t));
          last[r] = kv_lens[row0 + r];
          first[r] = window > 0 ? std::max<int64_t>(0, last[r] - window) : 0;
          lo_all = std::min(lo_all, first[r]);
          hi_all = std::max(hi_all, last[r]);
        } else {  // a short tile (kh_per_item is 1): these heads score nothing and are never written
          std::fill(&qpairs[r * G * pairs], &qpairs[(r + 1) * G * pairs], 0u);
          first[r] = last[r] = 0;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(max_score.begin(), max_score.end(), kNegInf);
      std::fill(denom.begin(), denom.end(), 0.f);
      const int64_t* table = block_tables + token_request[row0] * max_blocks;
      // A decode's new token goes in right before the chunk holding it is read (see FreshTokens).
      const auto write_fresh = [&](int64_t kvh) {
        write_slot(fresh->k_cache, fresh->v_cache, fresh->k + row0 * fresh->k_stride + kvh * dim,
                   fresh->v + row0 * fresh->v_stride + kvh * dim,
                   fresh->blocks[row0] * block_elems + kvh * head_elems, fresh->offsets[row0], block_size, dim);
      };

      // S chunks of W keys share one softmax update: one max and one sum reduction, one
      // rescaling of the accumulators, per S * W keys instead of per W.
      for (int64_t span = lo_all - lo_all % (S * W); span < hi_all; span += S * W) {
        const int64_t chunks = std::min<int64_t>(S, (hi_all - span + W - 1) / W);
        // Decodes: the next span's blocks into L2 meanwhile (in an item's last span, the first span of
        // this thread's next item), a few lines per q.k step. Alone, the L1 fetch below of the next
        // block left decode attention reading ~18 GB/s of the ~33 a sequential read gets on Zen 4; with
        // this, 9.0 -> 5.5-6.6 ms a step of W1's 64 rows x 8 layers (BENCHMARKS.md). Two spans ahead
        // was slower, and so was this without the L1 fetch.
        SpanFetch ahead{{}, 0, 0, 0, 0, 0, kp, vp, block_size, block_elems, head_elems, kh_per_item};
        if (R == 1) {
          if (span + S * W < hi_all) {
            ahead.add_span(table, span + S * W, hi_all, kvh0);
          } else if (upcoming < num_items) {
            const int64_t next_tile = order[upcoming / items_per_tile];
            const int64_t next_row = tiles[2 * next_tile], next_hi = kv_lens[next_row];
            const int64_t next_lo = window > 0 ? std::max<int64_t>(0, next_hi - window) : 0;
            ahead.add_span(block_tables + token_request[next_row] * max_blocks, next_lo - next_lo % (S * W), next_hi,
                           upcoming % items_per_tile * kh_per_item);
          }
          ahead.spread_over(kh_per_item * chunks * (pairs / C));
        }
        for (int64_t kh = 0; kh < kh_per_item; ++kh) {  // this item's KV heads, one after another
          const int64_t kvh = kvh0 + kh;
          const uint32_t* qj = &qpairs[kh * H * pairs];
          float* accj = &acc[kh * H * dim];
          float* msj = &max_score[kh * H];
          float* dj = &denom[kh * H];
          const uint16_t* keys[S];
          const uint16_t* values[S];
          int64_t lo[S], hi[S];  // the tile's visible keys in each chunk (the union of its rows')
          __m512 scores[S][H];
          for (int64_t c = 0; c < chunks; ++c) {
            const int64_t start = span + c * W;
            const int64_t block = table[start / block_size], offset = start % block_size;
            const int64_t base = block * block_elems + kvh * head_elems;
            if (R == 1 && fresh && hi_all - 1 >= start && hi_all - 1 < start + W) write_fresh(kvh);  // its own token
            keys[c] = kp + base + offset * 2;         // row i at keys + i * block_size * 2
            values[c] = vp + base + offset * dim;     // key pair j at values + j * dim * 2
            lo[c] = std::max<int64_t>(lo_all - start, 0);
            hi[c] = std::min<int64_t>(hi_all - start, W);
            // The next block's K and V lines of this head, fetched into L1 a few at a time while this
            // chunk's q.k runs: a burst of them at the block's end (into L2, two blocks ahead, as before)
            // left each core with ~13 GB/s of these random 16 KiB reads (BENCHMARKS.md). Decodes only:
            // a prompt tile computes R times as long on each block, and the fetches cost it ~7%.
            const char* fetch_k = nullptr;
            const char* fetch_v = nullptr;
            if (R == 1 && (start + W) % block_size == 0 && start + block_size < hi_all) {
              const int64_t next = table[(start + block_size) / block_size] * block_elems + kvh * head_elems;
              fetch_k = reinterpret_cast<const char*>(kp + next);
              fetch_v = reinterpret_cast<const char*>(vp + next);
            }
            if (R > 1) continue;  // a prompt tile's q.k: a register tile over the span, below
            // C independent sums per head: a single chain would wait on each multiply-add's latency.
            __m512 part[H][C];
            for (int h = 0; h < H; ++h)
              for (int ch = 0; ch < C; ++ch) part[h][ch] = _mm512_setzero_ps();
            const int64_t fetch_lines = head_elems * 2 / 64, fetch_per_step = (fetch_lines * C + pairs - 1) / pairs;
            for (int64_t i = 0; i < pairs; i += C) {
              ahead.step();
              if (fetch_k) {
                for (int64_t l = i / C * fetch_per_step; l < std::min(fetch_lines, (i / C + 1) * fetch_per_step); ++l) {
                  _mm_prefetch(fetch_k + l * 64, _MM_HINT_T0);
                  _mm_prefetch(fetch_v + l * 64, _MM_HINT_T0);
                }
              }
              for (int ch = 0; ch < C; ++ch) {
                const __m512bh k = (__m512bh)_mm512_loadu_si512(keys[c] + (i + ch) * block_size * 2);
                for (int h = 0; h < H; ++h)
                  part[h][ch] = _mm512_dpbf16_ps(part[h][ch], (__m512bh)_mm512_set1_epi32(qj[h * pairs + i + ch]), k);
              }
            }
            for (int r = 0; r < R; ++r) {
              const int64_t rlo = std::clamp<int64_t>(first[r] - start, 0, W), rhi = std::clamp<int64_t>(last[r] - start, 0, W);
              const __mmask16 valid = rhi > rlo ? static_cast<__mmask16>(((1u << rhi) - 1) & ~((1u << rlo) - 1)) : 0;
              for (int g = 0; g < G; ++g) {
                const int h = r * G + g;
                __m512 sum = part[h][0];
                for (int ch = 1; ch < C; ++ch) sum = _mm512_add_ps(sum, part[h][ch]);
                scores[c][h] = _mm512_mask_blend_ps(valid, neg_inf, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
              }
            }
          }
          if constexpr (R > 1) {
            // A prompt tile's q.k as register tiles of up to 4 heads x the span's chunks: each broadcast q
            // pair serves every chunk's keys and each key load 4 heads (a chunk at a time took a broadcast
            // per multiply-add). One chain at a time, its sums added into `scores` in order, so each head's
            // sum runs over the same pairs in the same order as a decode's: the same bits.
            const auto score_tile = [&](auto num_chunks, auto num_heads, int h0) {
              constexpr int NC = decltype(num_chunks)::value, QH = decltype(num_heads)::value;
              for (int ch = 0; ch < C; ++ch) {
                __m512 part[NC][QH];
                for (int c = 0; c < NC; ++c)
                  for (int h = 0; h < QH; ++h) part[c][h] = _mm512_setzero_ps();
                for (int64_t i = ch; i < pairs; i += C) {
                  __m512bh k[NC];
                  for (int c = 0; c < NC; ++c) k[c] = (__m512bh)_mm512_loadu_si512(keys[c] + i * block_size * 2);
                  for (int h = 0; h < QH; ++h) {
                    const __m512bh qb = (__m512bh)_mm512_set1_epi32(qj[(h0 + h) * pairs + i]);
                    for (int c = 0; c < NC; ++c) part[c][h] = _mm512_dpbf16_ps(part[c][h], qb, k[c]);
                  }
                }
                for (int c = 0; c < NC; ++c)
                  for (int h = 0; h < QH; ++h)
                    scores[c][h0 + h] = ch == 0 ? part[c][h] : _mm512_add_ps(scores[c][h0 + h], part[c][h]);
              }
            };
            head_blocks<H>([&](auto num_heads, int h0) {
              switch (chunks) {
                case 1: score_tile(std::integral_constant<int, 1>{}, num_heads, h0); break;
                case 2: score_tile(std::integral_constant<int, std::min(2, S)>{}, num_heads, h0); break;
                case 3: score_tile(std::integral_constant<int, std::min(3, S)>{}, num_heads, h0); break;
                default: score_tile(std::integral_constant<int, std::min(4, S)>{}, num_heads, h0); break;
              }
            });
            for (int64_t c = 0; c < chunks; ++c) {
              const int64_t start = span + c * W;
              for (int r = 0; r < R; ++r) {
                const int64_t rlo = std::clamp<int64_t>(first[r] - start, 0, W), rhi = std::clamp<int64_t>(last[r] - start, 0, W);
                const __mmask16 valid = rhi > rlo ? static_cast<__mmask16>(((1u << rhi) - 1) & ~((1u << rlo) - 1)) : 0;
                for (int g = 0; g < G; ++g) {
                  const int h = r * G + g;
                  scores[c][h] = _mm512_mask_blend_ps(valid, neg_inf, _mm512_mul_ps(scores[c][h], _mm512_set1_ps(scale)));
                }
              }
            }
          }
          for (int h = 0; h < H; ++h) {
            __m512 top = scores[0][h];
            for (int64_t c = 1; c < chunks; ++c) top = _mm512_max_ps(top, scores[c][h]);
            const float new_max = std::max(msj[h], _mm512_reduce_max_ps(top));
            if (new_max == kNegInf) {  // nothing visible to this row yet (a window, or a short tile)
              correction[h] = 1.f;
              for (int64_t c = 0; c < chunks; ++c) std::fill(ppairs[c][h], ppairs[c][h] + W / 2, 0u);
              continue;
            }
            correction[h] = msj[h] == kNegInf ? 0.f : std::exp(msj[h] - new_max);
            msj[h] = new_max;
            __m512 total = _mm512_setzero_ps();
            for (int64_t c = 0; c < chunks; ++c) {
              // exp_u20 (as PyTorch's CPU flash attention): ~1e-6 relative error, far below the
              // bf16 rounding of p below, and cheaper than Sleef's exp (BENCHMARKS.md).
              const __m512 p = (Vec(scores[c][h]) - Vec(new_max)).exp_u20();
              total = _mm512_add_ps(total, p);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(ppairs[c][h]), (__m256i)_mm512_cvtneps_pbh(p));
            }
            dj[h] = dj[h] * correction[h] + _mm512_reduce_add_ps(total);
          }
          // A register tile of D vectors of value dims x VH heads per pass: each broadcast probability
          // pair serves D vectors and each value load VH heads, and the D x VH independent sums hide the
          // multiply-add latency. Every sum runs over the same keys in the same order whatever the tiling.
          const auto weigh_values = [&](auto num_vecs, auto num_heads, int64_t dv, int h0) {
            constexpr int D = decltype(num_vecs)::value, VH = decltype(num_heads)::value;
            __m512 a[D][VH];
            for (int d = 0; d < D; ++d)
              for (int h = 0; h < VH; ++h)
                a[d][h] = _mm512_mul_ps(_mm512_loadu_ps(&accj[(h0 + h) * dim + (dv + d) * W]), _mm512_set1_ps(correction[h0 + h]));
            for (int64_t c = 0; c < chunks; ++c) {
              const int64_t jlo = lo[c] / 2, jhi = (hi[c] + 1) / 2;
              for (int64_t j = jlo; j < jhi; ++j) {
                __m512i v[D];
                for (int d = 0; d < D; ++d) v[d] = _mm512_loadu_si512(values[c] + j * dim * 2 + (dv + d) * W * 2);
                if (2 * j < lo[c] || 2 * j + 1 >= hi[c]) {  // one key of the pair is outside: never read its slot
                  const __mmask32 keep = (2 * j >= lo[c] ? 0x55555555u : 0u) | (2 * j + 1 < hi[c] ? 0xAAAAAAAAu : 0u);
                  for (int d = 0; d < D; ++d) v[d] = _mm512_maskz_mov_epi16(keep, v[d]);
                }
                for (int h = 0; h < VH; ++h) {
                  const __m512bh p = (__m512bh)_mm512_set1_epi32(ppairs[c][h0 + h][j]);
                  for (int d = 0; d < D; ++d) a[d][h] = _mm512_dpbf16_ps(a[d][h], p, (__m512bh)v[d]);
                }
              }
            }
            for (int d = 0; d < D; ++d)
              for (int h = 0; h < VH; ++h) _mm512_storeu_ps(&accj[(h0 + h) * dim + (dv + d) * W], a[d][h]);
          };
          // 4 x 4 sums, 4 values and a broadcast fit the 32 registers
          head_blocks<H>([&](auto num_heads, int h0) {
            int64_t dv = 0;
            for (; dv + 4 <= dim_vecs; dv += 4) weigh_values(std::integral_constant<int, 4>{}, num_heads, dv, h0);
            for (; dv < dim_vecs; ++dv) weigh_values(std::integral_constant<int, 1>{}, num_heads, dv, h0);
          });
        }
      }
      for (int64_t j = 0; j < kh_per_item; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          for (int g = 0; g < G; ++g) {
            const int64_t h = j * H + r * G + g;
            const float inv = 1.f / denom[h];
            c10::BFloat16* dst = op + ((row0 + r) * heads + (kvh0 + j) * G + g) * dim;
            for (int64_t d = 0; d < dim; d += W)
              store_bf16(dst + d, _mm512_mul_ps(_mm512_loadu_ps(&acc[h * dim + d]), _mm512_set1_ps(inv)));
          }
        }
      }
    }
  });
}

// Rows -> (first row, row count) tiles: requests with one row (decodes) as tiles of 1, longer
// ones cut into tiles of up to `rows_per_tile` rows.
std::pair<std::vector<int64_t>, std::vector<int64_t>> row_tiles(const int64_t* token_request, int64_t num_rows,
                                                                int64_t rows_per_tile) {
  std::vector<int64_t> single, multi;
  for (int64_t n = 0; n < num_rows;) {
    int64_t m = n + 1;
    while (m < num_rows && token_request[m] == token_request[n]) ++m;
    if (m - n == 1) {
      single.insert(single.end(), {n, 1});
    } else {
      for (int64_t t = n; t < m; t += rows_per_tile) multi.insert(multi.end(), {t, std::min(rows_per_tile, m - t)});
    }
    n = m;
  }
  return {single, multi};
}

// Independent q.k sums per head for `heads` query heads per item: a single chain would wait on each
// multiply-add's latency; 8 chains in all keep the unit busy. Decodes wait on memory, not on the
// chains: 4 in all there (a prompt tile runs the same chains one after another in its register tiles;
// 8 for decodes measured level).
constexpr int chains_for(int heads) { return heads >= 8 ? 1 : 8 / heads; }
constexpr int decode_chains(int group) { return group >= 4 ? 1 : 4 / group; }

// Decodes as tiles of one row; a prompt's rows in tiles of R. Fast: R x G = 8 query heads per item,
// one chain each and 2 chunks per softmax update (the registers they leave). Invariant: every tile
// with the decodes' C and S, R = 4 (2 for 8 heads per KV head), q.k and the values in register tiles
// of up to 4 heads, the scores of a span on the stack. Measured in W1 (bench-llama-56m, G = 2, before
// the register tiles), prompt attention took 0.20 s invariant against 0.23 s fast and 0.31 s with
// invariant tiles of 2 rows and 4 chains; decodes level.
template <int G>
void paired_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const int64_t* block_tables, int64_t max_blocks, const int64_t* token_request,
                      const int64_t* kv_lens, int64_t window, float scale, bool invariant, at::Tensor& out) {
  constexpr int R = G >= 8 ? 1 : 8 / G, RI = G >= 8 ? 2 : 4;
  auto [single, multi] = row_tiles(token_request, q.size(0), invariant ? RI : R);
  if (!single.empty())
    paired_kernel<G, 1, decode_chains(G), kSpan>(q, k_cache, v_cache, block_tables, max_blocks, token_request, kv_lens,
                                              window, scale, single, out);
  if (multi.empty()) return;
  if (invariant)
    paired_kernel<G, RI, decode_chains(G), kSpan>(q, k_cache, v_cache, block_tables, max_blocks, token_request, kv_lens,
                                               window, scale, multi, out);
  else
    paired_kernel<G, R, chains_for(G * R), 2>(q, k_cache, v_cache, block_tables, max_blocks, token_request, kv_lens,
                                              window, scale, multi, out);
}
#endif

bool bf16_pairs_supported() {
#ifdef EMBER_BF16_PAIRS
  return true;
#else
  return false;
#endif
}

// f(std::integral_constant<int, group>) for query heads per KV head 1-8 (the kernels' template argument).
template <typename F>
void with_group(int64_t group, F&& f) {
  switch (group) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Caches are [num_blocks, ...] with each block contiguous; K's and V's block stride is the same
// and may exceed a block's size, which lets a layer's K and V blocks alternate in one buffer.
// Whether every dimension but the first is contiguous (what `t[0].is_contiguous()` says, without the
// select op: this runs twice per layer per step).
bool block_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

int64_t block_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

bool blocks_contiguous(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  return k_cache.dim() == v_cache.dim() && k_cache.numel() > 0 && block_contiguous(k_cache) &&
         block_contiguous(v_cache) && k_cache.stride(0) == v_cache.stride(0) && k_cache.stride(0) >= block_numel(k_cache) &&
         block_numel(k_cache) == block_numel(v_cache);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& token_request,
                           const at::Tensor& kv_lens, int64_t window, double scale,
                           const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& v_scales,
                           double softcap, const std::optional<at::Tensor>& sinks, bool invariant) {
  const bool quantized = k_cache.scalar_type() == at::kChar;
  const bool paired = k_cache.dim() == 5;  // see paired_kernel for that layout
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "q: [tokens, heads, head_dim] with each row's heads contiguous expected");
  TORCH_CHECK(blocks_contiguous(k_cache, v_cache), "k/v caches: each block contiguous, one block stride for both");
  TORCH_CHECK(paired || k_cache.dim() == 4, "k_cache: [blocks, kv_heads, head_dim, block_size] expected");
  TORCH_CHECK(!paired || (bf16_pairs_supported() && q.scalar_type() == at::kBFloat16), "paired layout needs bf16 and AVX512-BF16");
  TORCH_CHECK(k_cache.size(3) % Vec::size() == 0 && q.size(2) % Vec::size() == 0,
              "block_size and head_dim must be multiples of the vector width");
  TORCH_CHECK(quantized || (q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type()),
              "dtypes differ");
  TORCH_CHECK(!quantized || (v_cache.scalar_type() == at::kChar && k_scales && v_scales &&
                             k_scales->scalar_type() == at::kBFloat16 && v_scales->scalar_type() == at::kBFloat16 &&
                             k_scales->is_contiguous() && v_scales->is_contiguous()),
              "int8 caches need contiguous bf16 k_scales and v_scales");
  const c10::BFloat16* ks = quantized ? k_scales->data_ptr<c10::BFloat16>() : nullptr;
  const c10::BFloat16* vs = quantized ? v_scales->data_ptr<c10::BFloat16>() : nullptr;
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous(), "int64 block_tables");
  TORCH_CHECK(!sinks || (sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->numel() == q.size(1)),
              "sinks: fp32 [heads]");
  TORCH_CHECK(!paired || (softcap == 0.0 && !sinks), "the paired layout's kernel has no soft-capping or sinks");
  const float* sink_logits = sinks ? sinks->data_ptr<float>() : nullptr;
  TORCH_CHECK(token_request.scalar_type() == at::kLong && kv_lens.scalar_type() == at::kLong, "int64 indices");
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous, whatever q's row stride
  const int64_t group = q.size(1) / k_cache.size(1);
  TORCH_CHECK(group >= 1 && group <= 8 && q.size(1) == group * k_cache.size(1), "1-8 query heads per KV head supported");
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    const auto go = [&](auto g) {
#ifdef EMBER_BF16_PAIRS
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (paired) {
          paired_attention<decltype(g)::value>(q, k_cache, v_cache, block_tables.data_ptr<int64_t>(),
                                               block_tables.size(1), token_request.data_ptr<int64_t>(),
                                               kv_lens.data_ptr<int64_t>(), window, static_cast<float>(scale),
                                               invariant, out);
          return;
        }
      }
#endif
      const auto args = std::make_tuple(block_tables.data_ptr<int64_t>(), block_tables.size(1),
                                        token_request.data_ptr<int64_t>(), kv_lens.data_ptr<int64_t>(), window,
                                        static_cast<float>(scale), static_cast<float>(softcap), sink_logits);
      if (quantized) {
        std::apply([&](auto... a) { attention_kernel<T, int8_t, decltype(g)::value>(q, k_cache, v_cache, ks, vs, a..., out); }, args);
      } else {
        std::apply([&](auto... a) { attention_kernel<T, T, decltype(g)::value>(q, k_cache, v_cache, ks, vs, a..., out); }, args);
      }
    };
    with_group(group, go);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "paged_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

// New tokens' K and V rows into their slots of a paired-layout cache (see paired_kernel), one
// pass instead of two index_put copies. k, v: [tokens, kv_heads, head_dim], rows may be strided.
void write_paired(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& blocks, const at::Tensor& offsets) {
  TORCH_CHECK(k_cache.dim() == 5 && blocks_contiguous(k_cache, v_cache), "paired k/v caches expected");
  TORCH_CHECK(k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
              k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16, "bf16 expected");
  const int64_t tokens = k.size(0), kv_heads = k_cache.size(1), dim = k.size(2), block_size = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == kv_heads && k.size(2) == 2 * k_cache.size(2),
              "k, v: [tokens, kv_heads, head_dim] matching the cache");
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == dim && v.stride(2) == 1 && v.stride(1) == dim, "k, v: heads contiguous");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && blocks.is_contiguous() &&
              offsets.is_contiguous() && blocks.numel() == tokens && offsets.numel() == tokens, "int64 blocks, offsets [tokens]");
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<c10::BFloat16>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>());
  uint32_t* kc = reinterpret_cast<uint32_t*>(k_cache.data_ptr<c10::BFloat16>());
  uint16_t* vc = reinterpret_cast<uint16_t*>(v_cache.data_ptr<c10::BFloat16>());
  const int64_t pairs = dim / 2, block_elems = k_cache.stride(0);
  const auto destinations = [&](int64_t t, auto&& visit) {  // the cache lines token t writes
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t head = bp[t] * block_elems + h * block_size * dim;  // in bf16 elements
      for (int64_t i = 0; i < pairs; ++i) visit(kc + head / 2 + i * block_size + op[t]);
      for (int64_t d = 0; d < dim; d += 16) visit(vc + head + ((op[t] / 2) * dim + d) * 2);
    }
  };
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      // Each token's K pairs land a row apart (one cache line each): fetch the lines of the
      // tokens a few ahead for writing, or every store waits for memory in turn.
      if (t == t0)
        for (int64_t a = t; a < std::min(t1, t + kWriteAhead); ++a) destinations(a, [](auto* p) { __builtin_prefetch(p, 1, 3); });
      if (t + kWriteAhead < t1) destinations(t + kWriteAhead, [](auto* p) { __builtin_prefetch(p, 1, 3); });
      const int64_t block = bp[t], offset = op[t];
      TORCH_CHECK(block >= 0 && block < k_cache.size(0) && offset >= 0 && offset < block_size, "slot out of range");
      for (int64_t h = 0; h < kv_heads; ++h)
        write_slot(kc, vc, kp + t * k.stride(0) + h * dim, vp + t * v.stride(0) + h * dim,
                   block * block_elems + h * block_size * dim, offset, block_size, dim);
    }
  });
}

// New tokens' K and V rows into their slots of a transposed-layout cache (K [blocks, kv_heads,
// head_dim, block_size], V [blocks, kv_heads, block_size, head_dim]), one op instead of two
// index_put copies and their index views. k, v: [tokens, kv_heads, head_dim], heads contiguous.
template <typename T>
void write_transposed_rows(T* kc, T* vc, const T* k, const T* v, int64_t k_stride, int64_t v_stride, const int64_t* bp,
                           const int64_t* op, int64_t tokens, int64_t kv_heads, int64_t dim, int64_t block_size,
                           int64_t block_elems) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t head = bp[t] * block_elems + h * block_size * dim;
      const T* kr = k + t * k_stride + h * dim;
      for (int64_t d = 0; d < dim; ++d) kc[head + d * block_size + op[t]] = kr[d];
      std::memcpy(vc + head + op[t] * dim, v + t * v_stride + h * dim, dim * sizeof(T));
    }
}

void write_transposed(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                      const at::Tensor& blocks, const at::Tensor& offsets) {
  TORCH_CHECK(k_cache.dim() == 4 && blocks_contiguous(k_cache, v_cache), "transposed k/v caches expected");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "k, v and the caches: one dtype");
  const int64_t tokens = k.size(0), kv_heads = k_cache.size(1), dim = k_cache.size(2), block_size = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(1) == kv_heads && k.size(2) == dim &&
              k.stride(2) == 1 && k.stride(1) == dim && v.stride(2) == 1 && v.stride(1) == dim,
              "k, v: [tokens, kv_heads, head_dim] matching the cache, heads contiguous");
  TORCH_CHECK(blocks.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong && blocks.is_contiguous() &&
              offsets.is_contiguous() && blocks.numel() == tokens && offsets.numel() == tokens, "int64 blocks, offsets [tokens]");
  const int64_t* bp = blocks.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(bp[t] >= 0 && bp[t] < k_cache.size(0) && op[t] >= 0 && op[t] < block_size, "slot out of range");
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    write_transposed_rows<T>(k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), k.stride(0),
                             v.stride(0), bp, op, tokens, kv_heads, dim, block_size, k_cache.stride(0));
  };
  switch (k.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(c10::BFloat16{}); break;
    case at::kHalf: run(c10::Half{}); break;
    default: TORCH_CHECK(false, "write_transposed: unsupported dtype ", k.scalar_type());
  }
}

// A decode-only batch (row r: request r's one new token): the new K/V rows written by the attention
// kernel as it reaches them (FreshTokens), not by write_paired beforehand. Same cache contents and
// the same output bits as write_paired followed by paged_attention.
at::Tensor decode_attention_paired(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& blocks, const at::Tensor& offsets,
                                   const at::Tensor& block_tables, const at::Tensor& kv_lens, int64_t window,
                                   double scale) {
#ifdef EMBER_BF16_PAIRS
  TORCH_CHECK(k_cache.dim() == 5 && blocks_contiguous(k_cache, v_cache), "paired k/v caches expected");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16 &&
              k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16, "bf16 expected");
  const int64_t rows = q.size(0), kv_heads = k_cache.size(1), dim = q.size(2), block_size = k_cache.size(3);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == dim, "q: [rows, heads, head_dim], heads contiguous");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == rows && k.size(1) == kv_heads && k.size(2) == dim &&
              dim == 2 * k_cache.size(2) && k.stride(2) == 1 && k.stride(1) == dim && v.stride(2) == 1 && v.stride(1) == dim,
              "k, v: [rows, kv_heads, head_dim] matching q and the cache, heads contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2 &&
              block_tables.size(0) == rows, "block_tables: int64 [rows, max_blocks]");
  for (const at::Tensor* t : {&blocks, &offsets, &kv_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == rows, "int64 blocks, offsets, kv_lens [rows]");
  const int64_t group = q.size(1) / kv_heads;
  TORCH_CHECK(group >= 1 && group <= 8 && q.size(1) == group * kv_heads, "1-8 query heads per KV head supported");
  const int64_t *table = block_tables.data_ptr<int64_t>(), *bp = blocks.data_ptr<int64_t>(),
                *op = offsets.data_ptr<int64_t>(), *lens = kv_lens.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t r = 0; r < rows; ++r) {  // each token's slot is where its row will read it
    const int64_t pos = lens[r] - 1;
    TORCH_CHECK(pos >= 0 && pos / block_size < max_blocks && bp[r] >= 0 && bp[r] < k_cache.size(0) &&
                bp[r] == table[r * max_blocks + pos / block_size] && op[r] == pos % block_size,
                "row ", r, ": slot (", bp[r], ", ", op[r], ") is not the block table's position ", pos);
  }
  // A block can be in another row's table in the step that fills it (the prefix cache shares a block as
  // soon as it is scheduled full): then that row may read this token, so every token goes in first.
  std::vector<std::pair<int64_t, int64_t>> writers(rows);  // (slot block, row), sorted by block
  for (int64_t r = 0; r < rows; ++r) writers[r] = {bp[r], r};
  std::sort(writers.begin(), writers.end());
  bool shared = false;
  for (int64_t r = 1; r < rows && !shared; ++r) shared = writers[r].first == writers[r - 1].first;
  for (int64_t r = 0; r < rows && !shared; ++r) {
    for (int64_t j = 0; j <= (lens[r] - 1) / block_size && !shared; ++j) {
      const int64_t block = table[r * max_blocks + j];
      const auto it = std::lower_bound(writers.begin(), writers.end(), std::make_pair(block, int64_t{0}));
      shared = it != writers.end() && it->first == block && it->second != r;
    }
  }
  const FreshTokens fresh{reinterpret_cast<const uint16_t*>(k.data_ptr<c10::BFloat16>()),
                          reinterpret_cast<const uint16_t*>(v.data_ptr<c10::BFloat16>()), k.stride(0), v.stride(0), bp, op,
                          reinterpret_cast<uint32_t*>(k_cache.data_ptr<c10::BFloat16>()),
                          reinterpret_cast<uint16_t*>(v_cache.data_ptr<c10::BFloat16>())};
  if (shared) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < kv_heads; ++h)
        write_slot(fresh.k_cache, fresh.v_cache, fresh.k + r * fresh.k_stride + h * dim, fresh.v + r * fresh.v_stride + h * dim,
                   bp[r] * k_cache.stride(0) + h * block_size * dim, op[r], block_size, dim);
  }
  std::vector<int64_t> token_request(rows), tiles(2 * rows);
  for (int64_t r = 0; r < rows; ++r) {
    token_request[r] = r;
    tiles[2 * r] = r;
    tiles[2 * r + 1] = 1;
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto go = [&](auto g) {
    constexpr int G = decltype(g)::value;
    paired_kernel<G, 1, decode_chains(G), kSpan>(q, k_cache, v_cache, table, max_blocks, token_request.data(), lens, window,
                                         static_cast<float>(scale), tiles, out, shared ? nullptr : &fresh);
  };
  with_group(group, go);
  return out;
#else
  TORCH_CHECK(false, "decode_attention_paired needs AVX512-BF16");
#endif
}

}  // namespace

TORCH_LIBRARY(ember_cpu, m) {
  m.def("write_paired(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor blocks, Tensor offsets) -> ()");
  m.def("write_transposed(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor blocks, Tensor offsets) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor token_request, "
        "Tensor kv_lens, int window, float scale, Tensor? k_scales=None, Tensor? v_scales=None, float softcap=0.0, "
        "Tensor? sinks=None, bool invariant=False) -> Tensor");
  m.def("decode_attention_paired(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor blocks, "
        "Tensor offsets, Tensor block_tables, Tensor kv_lens, int window, float scale) -> Tensor");
  m.def("bf16_pairs_supported() -> bool", &bf16_pairs_supported);
}

TORCH_LIBRARY_IMPL(ember_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("write_paired", &write_paired);
  m.impl("write_transposed", &write_transposed);
  m.impl("decode_attention_paired", &decode_attention_paired);
}
