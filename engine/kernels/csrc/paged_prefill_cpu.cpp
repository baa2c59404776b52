// Prefill attention for CPUs: each prompt chunk's queries over its sequence's K/V, read from the paged cache.
//
// torch's scaled_dot_product_attention on CPU (its flash-attention kernel) ran this project's prefill chunks at
// ~50 GFLOP/s in bf16 on the 2-core Zen 4 VM, a fifth of the step, where the linear layers reach ~400. This kernel
// is a flash-attention loop written for AVX-512 BF16 (vdpbf16ps: 32 bf16 products summed into 16 fp32 lanes):
//   - K of the task's context is repacked once per task into tiles of 16 keys, "pair-interleaved": the 32-bit
//     lane j of row d2 holds key j's dims (2*d2, 2*d2+1). One vdpbf16ps with a query's dim pair broadcast to all
//     lanes then advances 16 scores at once, with no horizontal sums; 16 queries share each K load.
//   - V is repacked into key pairs: lane d of pair j holds (v[2j][d], v[2j+1][d]), so P.V is vdpbf16ps again
//     with the two probabilities broadcast.
//   - softmax is online (running max and sum per query in fp32); probabilities are rounded to bf16 for P.V, as
//     flash-attention kernels (torch's CPU one included) do for bf16 inputs.
// Tasks are (chunk, KV head, range of query rows); 16 query vectors (rows x the G query heads sharing the KV head)
// form one tile and walk the key tiles up to the tile's last position (causal; a sliding window skips tiles below
// it). Tasks are taken largest first from a shared counter, so unequal chunks do not leave a core idle.
//
// Layouts (validated by the caller, engine/kernels/cpu.py):
//   query, out   [T, H, D] bf16, contiguous; only the rows of the chunks are read and written
//   kv_layer     [num_blocks, 2, block_size, KVH, D] bf16, unit stride on D (other strides arbitrary)
//   tables       [C, max_blocks] int32 block ids, ids and counts already checked against the cache
//   chunks       [C, 3] int32: first row in query, query rows n, context length ctx (queries sit at ctx-n..ctx-1)
//   window       sliding window (0: none): position p attends to (p - window, p]

#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>

#include "kernels.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define SPLITSERVE_PREFILL_KERNEL 1
#endif

namespace {

#if defined(SPLITSERVE_PREFILL_KERNEL)

using splitserve::exp_nonpositive;

constexpr int kTileKeys = 16;     // keys per K tile: one zmm of fp32 scores
constexpr int kTileQueries = 16;  // query vectors sharing each K and V load (their accumulators fill 16 registers)
constexpr int kSpanTiles = 4;     // K tiles per softmax update
constexpr int64_t kVectorsPerTask = 256;  // query vectors (rows x group) per task: amortise the K/V repacking
constexpr float kMasked = -1e30f;  // a finite "minus infinity" (the build uses -ffast-math: no infinities)

struct Task {
  int64_t chunk, kv_head, row_begin, row_end;
  double cost;
};

// Per-thread scratch, reused across tasks.
struct Scratch {
  std::vector<uint32_t> k_tiles;   // [tiles][D/2][16] key dim pairs
  std::vector<uint32_t> v_pairs;   // [tiles * 8][D] pairs of keys' values
  std::vector<uint32_t> queries;   // [16][D/2] query dim pairs
  std::vector<float> acc;          // [16][D] output accumulators
  std::vector<float> scores;       // [16][span keys] scores of the current span
  std::vector<uint32_t> probs;     // [16][span keys / 2] probability pairs of the current span
};

inline uint32_t pair_of(const c10::BFloat16* lo, const c10::BFloat16* hi) {
  return static_cast<uint32_t>(lo->x) | (static_cast<uint32_t>(hi->x) << 16);
}

// Repack keys [0, keys) of one KV head: K into pair-interleaved tiles, V into key pairs (padding zeroed).
void repack(const c10::BFloat16* kv, const int32_t* table, int64_t keys, int64_t head_dim, int64_t block_size,
            const int64_t* strides, int64_t head_offset, Scratch& s) {
  const int64_t pairs = head_dim / 2, tiles = (keys + kTileKeys - 1) / kTileKeys;
  s.k_tiles.assign(tiles * pairs * kTileKeys, 0u);
  s.v_pairs.assign(tiles * (kTileKeys / 2) * head_dim, 0u);  // whole tiles: 0 * garbage could be a NaN
  const int64_t block_stride = strides[0], half_stride = strides[1], token_stride = strides[2];
  for (int64_t key = 0; key < keys; ++key) {
    const c10::BFloat16* row =
        kv + table[key / block_size] * block_stride + (key % block_size) * token_stride + head_offset;
    uint32_t* tile = s.k_tiles.data() + (key / kTileKeys) * pairs * kTileKeys + key % kTileKeys;
    for (int64_t d2 = 0; d2 < pairs; ++d2) tile[d2 * kTileKeys] = pair_of(row + 2 * d2, row + 2 * d2 + 1);
    const c10::BFloat16* v = row + half_stride;
    c10::BFloat16* dst = reinterpret_cast<c10::BFloat16*>(s.v_pairs.data() + (key / 2) * head_dim) + key % 2;
    for (int64_t d = 0; d < head_dim; ++d) dst[2 * d] = v[d];
  }
}

// Scores of the tile's 16 query vectors for `tiles` 16-key tiles of K (vdpbf16ps with each query's dim pair
// broadcast to all lanes). Tiles go two at a time against 8 queries, so each broadcast feeds two products: the
// broadcasts are half the instructions otherwise.
template <int D>
inline void span_scores(const uint32_t* queries, const uint32_t* k_tiles, int tiles, float* scores, int stride) {
  constexpr int kPairs = D / 2, kHalf = kTileQueries / 2;
  int t = 0;
  for (; t + 2 <= tiles; t += 2) {
    const uint32_t* k0 = k_tiles + t * kPairs * kTileKeys;
    const uint32_t* k1 = k0 + kPairs * kTileKeys;
    for (int h = 0; h < kTileQueries; h += kHalf) {
      __m512 acc0[kHalf], acc1[kHalf];
      for (int i = 0; i < kHalf; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
      for (int d2 = 0; d2 < kPairs; ++d2) {
        const __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + d2 * kTileKeys);
        const __m512bh b = (__m512bh)_mm512_loadu_si512(k1 + d2 * kTileKeys);
        for (int i = 0; i < kHalf; ++i) {
          const __m512bh q = (__m512bh)_mm512_set1_epi32(queries[(h + i) * kPairs + d2]);
          acc0[i] = _mm512_dpbf16_ps(acc0[i], q, a);
          acc1[i] = _mm512_dpbf16_ps(acc1[i], q, b);
        }
      }
      for (int i = 0; i < kHalf; ++i) {
        _mm512_storeu_ps(scores + (h + i) * stride + t * kTileKeys, acc0[i]);
        _mm512_storeu_ps(scores + (h + i) * stride + (t + 1) * kTileKeys, acc1[i]);
      }
    }
  }
  if (t < tiles) {
    const uint32_t* k = k_tiles + t * kPairs * kTileKeys;
    __m512 acc[kTileQueries];
    for (int i = 0; i < kTileQueries; ++i) acc[i] = _mm512_setzero_ps();
    for (int d2 = 0; d2 < kPairs; ++d2) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(k + d2 * kTileKeys);
      for (int i = 0; i < kTileQueries; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_set1_epi32(queries[i * kPairs + d2]), kv);
    }
    for (int i = 0; i < kTileQueries; ++i) _mm512_storeu_ps(scores + i * stride + t * kTileKeys, acc[i]);
  }
}

// out += P . V for a span's key pairs. Two 16-dim blocks of V at a time against 8 queries, so each broadcast
// probability pair feeds two products.
template <int D>
inline void span_values(const uint32_t* probs, int probs_stride, const uint32_t* v_pairs, int pairs, float* acc) {
  constexpr int kBlocks = D / 16, kHalf = kTileQueries / 2;
  int b = 0;
  for (; b + 2 <= kBlocks; b += 2) {
    for (int h = 0; h < kTileQueries; h += kHalf) {
      __m512 a0[kHalf], a1[kHalf];
      for (int i = 0; i < kHalf; ++i) {
        a0[i] = _mm512_loadu_ps(acc + (h + i) * D + 16 * b);
        a1[i] = _mm512_loadu_ps(acc + (h + i) * D + 16 * b + 16);
      }
      for (int j = 0; j < pairs; ++j) {
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(v_pairs + j * D + 16 * b);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(v_pairs + j * D + 16 * b + 16);
        for (int i = 0; i < kHalf; ++i) {
          const __m512bh p = (__m512bh)_mm512_set1_epi32(probs[(h + i) * probs_stride + j]);
          a0[i] = _mm512_dpbf16_ps(a0[i], p, v0);
          a1[i] = _mm512_dpbf16_ps(a1[i], p, v1);
        }
      }
      for (int i = 0; i < kHalf; ++i) {
        _mm512_storeu_ps(acc + (h + i) * D + 16 * b, a0[i]);
        _mm512_storeu_ps(acc + (h + i) * D + 16 * b + 16, a1[i]);
      }
    }
  }
  if (b < kBlocks) {  // head_dim 16 (one block)
    __m512 a[kTileQueries];
    for (int i = 0; i < kTileQueries; ++i) a[i] = _mm512_loadu_ps(acc + i * D + 16 * b);
    for (int j = 0; j < pairs; ++j) {
      const __m512bh v = (__m512bh)_mm512_loadu_si512(v_pairs + j * D + 16 * b);
      for (int i = 0; i < kTileQueries; ++i)
        a[i] = _mm512_dpbf16_ps(a[i], (__m512bh)_mm512_set1_epi32(probs[i * probs_stride + j]), v);
    }
    for (int i = 0; i < kTileQueries; ++i) _mm512_storeu_ps(acc + i * D + 16 * b, a[i]);
  }
}

// One tile of up to 16 query vectors over the repacked keys it can see. The task's query vectors are numbered
// row-major (vector v: row v / group of the task, query head v % group of the KV head); the tile holds vectors
// first_vector .. first_vector + count - 1. Row r of the task is query row first_row + r at position first_pos + r.
// Keys go by spans of up to kSpanTiles 16-key tiles: scores of a whole span first, then one max and one rescale
// per query per span (the horizontal reductions cost as much as a tile's dot products), then P.V for the span.
template <int D>
void attend_tile(const c10::BFloat16* query, c10::BFloat16* out, int64_t heads, int64_t kv_head, int64_t group,
                 int64_t first_row, int64_t first_pos, int64_t first_vector, int64_t count, int64_t window,
                 float scale, Scratch& s) {
  constexpr int kPairs = D / 2, kBlocks = D / 16, kSpanKeys = kSpanTiles * kTileKeys;
  int64_t pos[kTileQueries], lo_key[kTileQueries];
  float running_max[kTileQueries], running_sum[kTileQueries];
  int64_t keys_lo = INT64_MAX, keys_hi = 0;  // keys any vector sees: [keys_lo, keys_hi)
  int64_t full_lo = 0, full_hi = INT64_MAX;  // keys every vector sees: [full_lo, full_hi)
  for (int i = 0; i < kTileQueries; ++i) {
    running_max[i] = kMasked;
    running_sum[i] = 0.f;
    uint32_t* q = s.queries.data() + i * kPairs;
    if (i < count) {
      const int64_t v = first_vector + i, row = first_row + v / group, head = kv_head * group + v % group;
      pos[i] = first_pos + v / group;
      lo_key[i] = window > 0 ? std::max<int64_t>(0, pos[i] - window + 1) : 0;
      const c10::BFloat16* src = query + (row * heads + head) * D;
      for (int d2 = 0; d2 < kPairs; ++d2) q[d2] = pair_of(src + 2 * d2, src + 2 * d2 + 1);
      keys_lo = std::min(keys_lo, lo_key[i]);
      keys_hi = std::max(keys_hi, pos[i] + 1);
      full_lo = std::max(full_lo, lo_key[i]);
      full_hi = std::min(full_hi, pos[i] + 1);
    } else {
      pos[i] = -1;  // padding vector: sees no key, so is never updated
      lo_key[i] = 0;
      std::fill(q, q + kPairs, 0u);
    }
  }
  std::fill(s.acc.begin(), s.acc.begin() + kTileQueries * D, 0.f);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 scale_v = _mm512_set1_ps(scale), masked_v = _mm512_set1_ps(kMasked);
  float* scores = s.scores.data();  // [16][kSpanKeys]
  uint32_t* probs = s.probs.data();  // [16][kSpanKeys / 2]
  for (int64_t span0 = keys_lo / kTileKeys * kTileKeys; span0 < keys_hi; span0 += kSpanKeys) {
    const int tiles = static_cast<int>(std::min<int64_t>(kSpanTiles, (keys_hi - span0 + kTileKeys - 1) / kTileKeys));
    span_scores<D>(s.queries.data(), s.k_tiles.data() + span0 / kTileKeys * kPairs * kTileKeys, tiles, scores,
                   kSpanKeys);
    const bool all_valid = span0 >= full_lo && span0 + tiles * kTileKeys <= full_hi;
    for (int i = 0; i < kTileQueries; ++i) {
      float* row_scores = scores + i * kSpanKeys;
      uint32_t* row_probs = probs + i * (kSpanKeys / 2);
      __mmask16 valid[kSpanTiles];
      bool any = false;
      __m512 top = masked_v;
      for (int t = 0; t < tiles; ++t) {
        if (all_valid) {
          valid[t] = 0xFFFF;
        } else {
          const __m512i keys = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(span0 + t * kTileKeys)), lane);
          valid[t] = _mm512_cmple_epi32_mask(keys, _mm512_set1_epi32(static_cast<int32_t>(pos[i]))) &
                     _mm512_cmpge_epi32_mask(keys, _mm512_set1_epi32(static_cast<int32_t>(lo_key[i])));
        }
        any |= valid[t] != 0;
        const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row_scores + t * kTileKeys), scale_v);
        _mm512_storeu_ps(row_scores + t * kTileKeys, x);
        top = _mm512_mask_max_ps(top, valid[t], top, x);
      }
      if (!any) {
        std::fill(row_probs, row_probs + tiles * kTileKeys / 2, 0u);
        continue;
      }
      const float new_max = std::max(running_max[i], _mm512_reduce_max_ps(top));
      if (new_max > running_max[i]) {
        const float alpha = std::exp(running_max[i] - new_max);  // 0 on the first keys (kMasked - max)
        running_sum[i] *= alpha;
        float* a = s.acc.data() + i * D;
        for (int b = 0; b < kBlocks; ++b)
          _mm512_storeu_ps(a + 16 * b, _mm512_mul_ps(_mm512_loadu_ps(a + 16 * b), _mm512_set1_ps(alpha)));
        running_max[i] = new_max;
      }
      const __m512 shift = _mm512_set1_ps(new_max);
      __m512 total = _mm512_setzero_ps();
      for (int t = 0; t < tiles; ++t) {
        const __m512 p = _mm512_maskz_mov_ps(
            valid[t], exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row_scores + t * kTileKeys), shift)));
        total = _mm512_add_ps(total, p);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_probs + t * kTileKeys / 2),
                            (__m256i)_mm512_cvtneps_pbh(p));
      }
      running_sum[i] += _mm512_reduce_add_ps(total);
    }
    span_values<D>(probs, kSpanKeys / 2, s.v_pairs.data() + (span0 / 2) * D, tiles * kTileKeys / 2, s.acc.data());
  }
  for (int i = 0; i < count; ++i) {
    const int64_t v = first_vector + i, row = first_row + v / group, head = kv_head * group + v % group;
    const __m512 inv = _mm512_set1_ps(1.f / running_sum[i]);  // every query sees at least its own key
    c10::BFloat16* dst = out + (row * heads + head) * D;
    for (int b = 0; b < kBlocks; ++b) {
      const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(s.acc.data() + i * D + 16 * b), inv);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * b), (__m256i)_mm512_cvtneps_pbh(o));
    }
  }
}

template <int D>
void run_task(const Task& task, const c10::BFloat16* query, c10::BFloat16* out, const c10::BFloat16* kv,
              const int32_t* tables, const int32_t* chunks, int64_t max_blocks, int64_t heads, int64_t group,
              int64_t block_size, const int64_t* strides, int64_t window, float scale, Scratch& s) {
  const int32_t* meta = chunks + task.chunk * 3;
  const int64_t first_row = meta[0], n = meta[1], ctx = meta[2];
  const int64_t first_pos = ctx - n;
  // Keys the task's queries can see: up to its last row's position.
  const int64_t keys = first_pos + task.row_end;
  repack(kv, tables + task.chunk * max_blocks, keys, D, block_size, strides, task.kv_head * strides[3], s);
  const int64_t vectors = (task.row_end - task.row_begin) * group;
  for (int64_t v0 = 0; v0 < vectors; v0 += kTileQueries)
    attend_tile<D>(query, out, heads, task.kv_head, group, first_row + task.row_begin, first_pos + task.row_begin,
                   v0, std::min<int64_t>(kTileQueries, vectors - v0), window, scale, s);
}

#endif  // SPLITSERVE_PREFILL_KERNEL

}  // namespace

bool splitserve::prefill_attention_supported(int64_t head_dim) {
#if defined(SPLITSERVE_PREFILL_KERNEL)
  switch (head_dim) {
    case 16: case 32: case 64: case 96: case 128: case 256: return true;
    default: return false;
  }
#else
  (void)head_dim;
  return false;
#endif
}

void splitserve::paged_prefill_attention(at::Tensor query, at::Tensor out, at::Tensor kv_layer, at::Tensor tables,
                                         at::Tensor chunks, double scale, int64_t window) {
#if defined(SPLITSERVE_PREFILL_KERNEL)
  const int64_t heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = kv_layer.size(2), kv_heads = kv_layer.size(3), group = heads / kv_heads;
  if (!prefill_attention_supported(head_dim) || query.scalar_type() != at::kBFloat16)
    throw std::invalid_argument("paged_prefill_attention: bf16 with head_dim 16, 32, 64, 96, 128 or 256 only");
  const int64_t rows_per_task = std::max<int64_t>(kVectorsPerTask / group, 16);
  const int32_t* meta = chunks.data_ptr<int32_t>();
  std::vector<Task> tasks;
  for (int64_t c = 0; c < chunks.size(0); ++c) {
    const int64_t n = meta[c * 3 + 1], first_pos = meta[c * 3 + 2] - meta[c * 3 + 1];
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t r = 0; r < n; r += rows_per_task) {
        const int64_t end = std::min(n, r + rows_per_task);
        // Work ~ query rows x keys they see (the triangle's mean), plus the repacking of those keys.
        const double cost = (end - r) * (first_pos + (r + end) / 2.0) * group + (first_pos + end);
        tasks.push_back({c, h, r, end, cost});
      }
  }
  std::sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  const auto* q = reinterpret_cast<const c10::BFloat16*>(query.data_ptr<at::BFloat16>());
  auto* o = reinterpret_cast<c10::BFloat16*>(out.data_ptr<at::BFloat16>());
  const auto* kv = reinterpret_cast<const c10::BFloat16*>(kv_layer.data_ptr<at::BFloat16>());
  const int32_t* table_ptr = tables.data_ptr<int32_t>();
  const int64_t max_blocks = tables.size(1);
  const int64_t* strides = kv_layer.strides().data();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      Scratch s;
      s.queries.resize(kTileQueries * head_dim / 2);
      s.acc.resize(kTileQueries * head_dim);
      s.scores.resize(kTileQueries * kSpanTiles * kTileKeys);
      s.probs.resize(kTileQueries * kSpanTiles * kTileKeys / 2);
      for (int64_t i = next++; i < static_cast<int64_t>(tasks.size()); i = next++) {
#define SPLITSERVE_RUN_TASK(DIM)                                                                               \
  run_task<DIM>(tasks[i], q, o, kv, table_ptr, meta, max_blocks, heads, group, block_size, strides, window, \
                static_cast<float>(scale), s)
        switch (head_dim) {
          case 16: SPLITSERVE_RUN_TASK(16); break;
          case 32: SPLITSERVE_RUN_TASK(32); break;
          case 64: SPLITSERVE_RUN_TASK(64); break;
          case 96: SPLITSERVE_RUN_TASK(96); break;
          case 128: SPLITSERVE_RUN_TASK(128); break;
          default: SPLITSERVE_RUN_TASK(256);
        }
#undef SPLITSERVE_RUN_TASK
      }
    }
  });
#else
  (void)query, (void)out, (void)kv_layer, (void)tables, (void)chunks, (void)scale, (void)window;
  throw std::invalid_argument("paged_prefill_attention: this build has no AVX-512 BF16 kernel");
#endif
}
