// Paged decode attention for bf16 caches on AVX-512 BF16 CPUs (Zen 4, Sapphire Rapids): the fast path of
// paged_decode_cpu.cpp, whose header gives the layouts.
//
// One pass over K and V (flash-decoding): keys go by tiles of 16, and for each tile and KV head the G query heads
// sharing it get their 16 scores, an online-softmax update (running max and sum, fp32) and the tile's V rows
// weighted into fp32 accumulators, while the tile is in L1.
//   - Scores: a zmm holds G segments of W = 16 / G lanes, one segment per query head. vdpbf16ps multiplies the query
//     heads' dim pairs with a K row's same W pairs broadcast to every segment (2 instructions per key and head, as
//     with whole rows, but no horizontal sum per key), and a tree of two-source permutes folds W keys' partial
//     sums into one zmm holding W keys for each head. The softmax max, exps and sums then run on all G heads at once.
//   - V: a 64-byte load of 32 bf16 widens to fp32 in two instructions (a shift for even dims, a mask for odd
//     ones); the accumulators keep that even/odd order and are put back in dim order once per sequence.
//   - Work is counted in blocks of the whole batch and cut into one equal slice per thread; a sequence cut by a
//     slice boundary gets partial (max, sum, accumulator) results from each side, merged afterwards. Every thread
//     thus gets the same number of tokens whatever the lengths, and a batch of one long sequence uses every thread.
//   - Group sizes that are not a power of two are padded to one with zero queries (their results are dropped).
//   - Memory order matters more than instruction count here: read head by head (2 of every 8 lines of a block, K
//     then V) the blocks streamed at ~6 GB/s on one core, against ~16 GB/s in address order. So the next block is
//     prefetched into L2 in address order while the current one is worked on, a few lines per key (one burst
//     per block stalled the loads behind it; prefetcht0 into L1 gained nothing; every 4th line gained nothing).
// Measured on the 2-core Zen 4 VM (medians of alternating runs, one layer, bf16, block 16; the VM is shared, so
// figures move by +-30%), against the previous kernel (per (sequence, KV head) task, two passes, one horizontal
// sum per key and head):
//   24 x 800 tokens, 16 query / 4 KV heads of 64 (19.7 MB of K/V): 4.35 -> 1.84 ms on one thread, 2.00 -> 0.75 ms
//   on two (the extension built with -fopenmp, see paged_decode_cpu.cpp); 8 x 1000, 32 / 8 heads of 128: 8.9 ->
//   2.3 ms, 5.4 -> 1.2 ms. Tried and dropped: probabilities rounded to bf16 for a vdpbf16ps P.V (~10% on one thread,
//   nothing on two, where memory bounds it; less accurate) and forced unrolling (slower).

#include "paged_decode_avx512.h"

#include <ATen/Parallel.h>

#include "vec_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
namespace {

using splitserve::exp_nonpositive;

constexpr int kTile = 16;          // keys per tile: one fp32 lane each
constexpr float kMasked = -1e30f;  // a finite "minus infinity" (the build uses -ffast-math: no infinities)

// Lane shuffles for G query heads per zmm: segment g (lanes g * W .. g * W + W - 1, W = 16 / G) is head g's.
template <int G>
struct Lanes {
  static constexpr int W = 16 / G;
  static constexpr int kLevels = W == 16 ? 4 : W == 8 ? 3 : W == 4 ? 2 : W == 2 ? 1 : 0;
  static constexpr uint32_t kSegments = [] {  // one bit per segment: times a segment's bits, the same in each
    uint32_t bits = 0;
    for (int g = 0; g < G; ++g) bits |= 1u << (g * W);
    return bits;
  }();
  // fold_lo/hi[level]: vpermt2ps indices taking two zmm whose segments hold `keys` keys x `parts` partial sums
  // each to one holding 2 x keys keys x parts / 2 sums (added). butterfly[level]: lane ^ 2^level, within segments.
  __m512i fold_lo[kLevels + 1], fold_hi[kLevels + 1], butterfly[kLevels + 1];

  Lanes() {
    for (int level = 0, keys = 1; level < kLevels; ++level, keys *= 2) {
      alignas(64) int32_t lo[16], hi[16], swap[16];
      const int parts = W / keys, half = parts / 2;
      for (int lane = 0; lane < 16; ++lane) {
        const int segment = lane / W, key = (lane % W) / half, part = lane % half;
        lo[lane] = (segment * W + (key % keys) * parts + part) | (key >= keys ? 16 : 0);
        hi[lane] = lo[lane] + half;
        swap[lane] = lane ^ (1 << level);
      }
      fold_lo[level] = _mm512_load_si512(lo);
      fold_hi[level] = _mm512_load_si512(hi);
      butterfly[level] = _mm512_load_si512(swap);
    }
  }
};

// W dim pairs of a K row starting at p, repeated in each of the G segments.
template <int W>
inline __m512bh broadcast_pairs(const uint16_t* p) {
  if constexpr (W == 16) {
    return (__m512bh)_mm512_loadu_si512(p);
  } else if constexpr (W == 8) {
    return (__m512bh)_mm512_broadcast_i32x8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else if constexpr (W == 4) {
    return (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (W == 2) {
    int64_t v;
    std::memcpy(&v, p, sizeof(v));
    return (__m512bh)_mm512_set1_epi64(v);
  } else {
    int32_t v;
    std::memcpy(&v, p, sizeof(v));
    return (__m512bh)_mm512_set1_epi32(v);
  }
}

// Prefetches lines [line, end) of a block into L2, per_key lines at each key of a tile: spread out, as bursts of
// prefetches stall the loads behind them. Lines [0, half_lines) are the block's K half, the rest its V half.
struct Prefetcher {
  const char* k_half = nullptr;
  const char* v_half = nullptr;
  int64_t half_lines = 0, line = 0, end = 0, per_key = 0;
  __attribute__((always_inline)) void key() {
    for (const int64_t stop = std::min(end, line + per_key); line < stop; ++line)
      _mm_prefetch(line < half_lines ? k_half + 64 * line : v_half + 64 * (line - half_lines), _MM_HINT_T1);
  }
};

// Unscaled scores of a tile's 16 keys (rows k, k + stride, ...): s[i] lane g * W + j = head g . key i * W + j.
// q + 16 * c holds, in segment g, head g's dim pairs c * W .. c * W + W - 1.
template <int G, int D>
inline void tile_scores(const uint32_t* q, const uint16_t* k, int64_t stride, const Lanes<G>& lanes, __m512* s,
                        Prefetcher& prefetch) {
  constexpr int W = 16 / G, kChunks = D / 2 / W;
  for (int i = 0; i < G; ++i) {
    __m512 v[W];
    for (int j = 0; j < W; ++j) {
      const uint16_t* row = k + (i * W + j) * stride;
      prefetch.key();
      __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();  // two chains hide vdpbf16ps' latency
      for (int c = 0; c < kChunks; c += 2) {
        even = _mm512_dpbf16_ps(even, (__m512bh)_mm512_loadu_si512(q + 16 * c), broadcast_pairs<W>(row + 2 * W * c));
        if (c + 1 < kChunks)
          odd = _mm512_dpbf16_ps(odd, (__m512bh)_mm512_loadu_si512(q + 16 * (c + 1)),
                                 broadcast_pairs<W>(row + 2 * W * (c + 1)));
      }
      v[j] = _mm512_add_ps(even, odd);
    }
    for (int level = 0, n = W / 2; level < Lanes<G>::kLevels; ++level, n /= 2)
      for (int j = 0; j < n; ++j)
        v[j] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * j], lanes.fold_lo[level], v[2 * j + 1]),
                             _mm512_permutex2var_ps(v[2 * j], lanes.fold_hi[level], v[2 * j + 1]));
    s[i] = v[0];
  }
}

// acc[h] += sum over the tile's keys lo..hi-1 of p(h, key) * V row, after acc[h] *= alpha[h * W] (if alpha).
// acc per head: for each 32-dim group, its 16 even dims then its 16 odd dims, fp32.
template <int G, int D>
inline void tile_values(const uint16_t* v, int64_t stride, int lo, int hi, const float* p, float* acc,
                        const float* alpha) {
  constexpr int W = 16 / G, kGroups = D / 32;
  constexpr int kHeads = G < 256 / D ? G : 256 / D;  // heads per sweep: their accumulators fill 16 registers
  const __m512i odd_bits = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int h0 = 0; h0 < G; h0 += kHeads) {
    __m512 even[kHeads][kGroups], odd[kHeads][kGroups];
    for (int h = 0; h < kHeads; ++h) {
      const float* a = acc + (h0 + h) * D;
      for (int c = 0; c < kGroups; ++c) {
        even[h][c] = _mm512_loadu_ps(a + 32 * c);
        odd[h][c] = _mm512_loadu_ps(a + 32 * c + 16);
        if (alpha != nullptr) {
          even[h][c] = _mm512_mul_ps(even[h][c], _mm512_set1_ps(alpha[(h0 + h) * W]));
          odd[h][c] = _mm512_mul_ps(odd[h][c], _mm512_set1_ps(alpha[(h0 + h) * W]));
        }
      }
    }
    for (int key = lo; key < hi; ++key) {
      const uint16_t* row = v + key * stride;
      __m512 ve[kGroups], vo[kGroups];
      for (int c = 0; c < kGroups; ++c) {
        const __m512i x = _mm512_loadu_si512(row + 32 * c);
        ve[c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        vo[c] = _mm512_castsi512_ps(_mm512_and_si512(x, odd_bits));
      }
      const float* pk = p + (key / W) * 16 + key % W;
      for (int h = 0; h < kHeads; ++h) {
        const __m512 w = _mm512_set1_ps(pk[(h0 + h) * W]);
        for (int c = 0; c < kGroups; ++c) {
          even[h][c] = _mm512_fmadd_ps(w, ve[c], even[h][c]);
          odd[h][c] = _mm512_fmadd_ps(w, vo[c], odd[h][c]);
        }
      }
    }
    for (int h = 0; h < kHeads; ++h) {
      float* a = acc + (h0 + h) * D;
      for (int c = 0; c < kGroups; ++c) {
        _mm512_storeu_ps(a + 32 * c, even[h][c]);
        _mm512_storeu_ps(a + 32 * c + 16, odd[h][c]);
      }
    }
  }
}

// One tile (keys lo..hi-1 valid) of one KV head: scores, online-softmax update of (m, l), and V into acc.
// m: the running max, the same in each lane of a segment; l: lane-wise partial sums of exp(score - m).
template <int G, int D>
inline void attend_tile(const uint16_t* k, const uint16_t* v, int64_t stride, int lo, int hi, const uint32_t* q,
                        __m512 scale, const Lanes<G>& lanes, __m512& m, __m512& l, float* acc, float* p,
                        Prefetcher& prefetch) {
  constexpr int W = 16 / G;
  __m512 s[G];
  tile_scores<G, D>(q, k, stride, lanes, s, prefetch);
  const bool partial = lo > 0 || hi < kTile;
  const uint32_t valid = ((1u << hi) - 1) & ~((1u << lo) - 1);
  __mmask16 masks[G];
  __m512 top = _mm512_set1_ps(kMasked);
  for (int i = 0; i < G; ++i) {
    s[i] = _mm512_mul_ps(s[i], scale);
    if (partial) {  // keys outside the tile's range (garbage, maybe NaN) never reach a max or a sum
      masks[i] = static_cast<__mmask16>(((valid >> (i * W)) & ((1u << W) - 1)) * Lanes<G>::kSegments);
      s[i] = _mm512_mask_mov_ps(_mm512_set1_ps(kMasked), masks[i], s[i]);
    }
    top = _mm512_max_ps(top, s[i]);
  }
  for (int level = 0; level < Lanes<G>::kLevels; ++level)
    top = _mm512_max_ps(top, _mm512_permutexvar_ps(lanes.butterfly[level], top));
  const __m512 m_new = _mm512_max_ps(m, top);
  alignas(64) float alpha[16];
  const bool rescale = _mm512_cmp_ps_mask(m_new, m, _CMP_GT_OQ) != 0;
  if (rescale) {  // most tiles after the first few leave every max unchanged
    const __m512 a = exp_nonpositive(_mm512_sub_ps(m, m_new));
    l = _mm512_mul_ps(l, a);
    _mm512_store_ps(alpha, a);
    m = m_new;
  }
  for (int i = 0; i < G; ++i) {
    __m512 e = exp_nonpositive(_mm512_sub_ps(s[i], m));
    if (partial) e = _mm512_maskz_mov_ps(masks[i], e);
    l = _mm512_add_ps(l, e);
    _mm512_storeu_ps(p + 16 * i, e);
  }
  tile_values<G, D>(v, stride, lo, hi, p, acc, rescale ? alpha : nullptr);
}

struct Geometry {
  int64_t heads, kv_heads, group, block_size, max_blocks, window;
  int64_t block_stride, half_stride, token_stride, head_stride;
  float scale;
};

// One thread's running state over one sequence's KV heads (G: the group padded to a power of two).
struct State {
  std::vector<float> m, l, acc, p;  // [KVH][16], [KVH][16], [KVH][G][D], [G][16]
  std::vector<uint32_t> q;          // [KVH][D * G / 32][16] query pairs laid out for tile_scores
  State(int64_t kv_heads, int64_t group, int64_t head_dim)
      : m(kv_heads * 16), l(kv_heads * 16), acc(kv_heads * group * head_dim), p(group * 16),
        q(kv_heads * group * head_dim / 2) {}
};

// Sequence row b over its blocks blk_lo .. blk_hi - 1 (of those its range [start, len) touches), from scratch.
// `after`: the block the thread reads next (nullptr: none), prefetched during the last one.
template <int G, int D>
void attend_blocks(const c10::BFloat16* query, const uint16_t* kv, const int32_t* table, int64_t start,
                   int64_t len, int64_t blk_lo, int64_t blk_hi, const uint16_t* after, const Geometry& geo,
                   const Lanes<G>& lanes, State& st) {
  constexpr int W = 16 / G, kChunks = D * G / 32;
  const uint32_t* pairs = reinterpret_cast<const uint32_t*>(query);
  for (int64_t h = 0; h < geo.kv_heads; ++h)
    for (int c = 0; c < kChunks; ++c)
      for (int lane = 0; lane < 16; ++lane) {
        const int64_t g = lane / W;  // padding heads (g >= group) get zero queries
        st.q[(h * kChunks + c) * 16 + lane] =
            g < geo.group ? pairs[(h * geo.group + g) * (D / 2) + c * W + lane % W] : 0u;
      }
  std::fill(st.m.begin(), st.m.end(), kMasked);
  std::fill(st.l.begin(), st.l.end(), 0.f);
  std::fill(st.acc.begin(), st.acc.end(), 0.f);
  const __m512 scale = _mm512_set1_ps(geo.scale);
  Prefetcher prefetch;
  prefetch.half_lines = geo.block_size * geo.token_stride * 2 / 64;
  const int64_t half_lines = prefetch.half_lines;
  for (int64_t blk = blk_lo; blk < blk_hi; ++blk) {
    const uint16_t* block = kv + table[blk] * geo.block_stride;
    // The next block is prefetched while this one is worked on, a share per tile and head: blocks sit at random
    // places, so the hardware prefetchers cannot run ahead across blocks, and within one they follow only a
    // stream in address order, not this loop's order (head by head, K rows then V rows, each 2 of every 8 lines).
    const uint16_t* next = blk + 1 < blk_hi ? kv + table[blk + 1] * geo.block_stride : after;
    const int64_t steps = geo.block_size / kTile * geo.kv_heads, lines = next != nullptr ? 2 * half_lines : 0;
    if (next != nullptr) {
      prefetch.k_half = reinterpret_cast<const char*>(next);
      prefetch.v_half = reinterpret_cast<const char*>(next + geo.half_stride);
    }
    for (int64_t t0 = 0; t0 < geo.block_size; t0 += kTile) {
      const int64_t pos = blk * geo.block_size + t0;
      const int lo = static_cast<int>(std::clamp<int64_t>(start - pos, 0, kTile));
      const int hi = static_cast<int>(std::clamp<int64_t>(len - pos, 0, kTile));
      if (lo >= hi) continue;
      const uint16_t* k = block + t0 * geo.token_stride;
      for (int64_t h = 0; h < geo.kv_heads; ++h) {
        const int64_t step = t0 / kTile * geo.kv_heads + h;  // this tile and head's share of the next block
        prefetch.line = step * lines / steps;
        prefetch.end = (step + 1) * lines / steps;
        prefetch.per_key = (prefetch.end - prefetch.line + kTile - 1) / kTile;
        __m512 m = _mm512_loadu_ps(st.m.data() + 16 * h), l = _mm512_loadu_ps(st.l.data() + 16 * h);
        attend_tile<G, D>(k + h * geo.head_stride, k + geo.half_stride + h * geo.head_stride, geo.token_stride, lo,
                          hi, st.q.data() + h * kChunks * 16, scale, lanes, m, l, st.acc.data() + h * G * D,
                          st.p.data(), prefetch);
        _mm512_storeu_ps(st.m.data() + 16 * h, m);
        _mm512_storeu_ps(st.l.data() + 16 * h, l);
      }
    }
  }
}

// acc (even/odd order, see tile_values) times inv, in dim order, rounded to bf16.
template <int D>
void write_head(const float* acc, float inv, c10::BFloat16* out) {
  for (int c = 0; c < D / 32; ++c)
    for (int j = 0; j < 16; ++j) {
      out[32 * c + 2 * j] = c10::BFloat16(acc[32 * c + j] * inv);
      out[32 * c + 2 * j + 1] = c10::BFloat16(acc[32 * c + 16 + j] * inv);
    }
}

// A sequence's results per query head: (max, sum, accumulator) as a partial [H][2 + D], or final into out [H][D].
template <int G, int D>
void emit(const State& st, const Geometry& geo, float* partial, c10::BFloat16* out) {
  constexpr int W = 16 / G;
  for (int64_t h = 0; h < geo.kv_heads; ++h)
    for (int64_t g = 0; g < geo.group; ++g) {
      const float* l = st.l.data() + 16 * h + g * W;
      float sum = 0.f;
      for (int j = 0; j < W; ++j) sum += l[j];
      const float* acc = st.acc.data() + (h * G + g) * D;
      const int64_t head = h * geo.group + g;
      if (partial == nullptr) {
        write_head<D>(acc, 1.f / sum, out + head * D);
      } else {
        float* slot = partial + head * (2 + D);
        slot[0] = st.m[16 * h + g * W];
        slot[1] = sum;
        std::copy(acc, acc + D, slot + 2);
      }
    }
}

// Merges the partials of one sequence (slots: [H][2 + D] each) into out [H][D].
template <int D>
void merge(const std::vector<const float*>& slots, int64_t heads, c10::BFloat16* out) {
  std::vector<float> acc(D);
  for (int64_t head = 0; head < heads; ++head) {
    float top = kMasked;
    for (const float* slot : slots) top = std::max(top, slot[head * (2 + D)]);
    float sum = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (const float* slot : slots) {
      const float* part = slot + head * (2 + D);
      const float weight = std::exp(part[0] - top);
      sum += weight * part[1];
      for (int d = 0; d < D; ++d) acc[d] += weight * part[2 + d];
    }
    write_head<D>(acc.data(), 1.f / sum, out + head * D);
  }
}

template <int G, int D>
void run(const c10::BFloat16* query, const c10::BFloat16* kv, const int32_t* tables, const int32_t* lens,
         c10::BFloat16* out, int64_t batch, const Geometry& geo) {
  const int64_t heads = geo.heads, block_size = geo.block_size;
  // The batch's work in blocks: row b owns units first[b] .. first[b + 1] - 1, blocks first_block[b] onwards.
  std::vector<int64_t> first(batch + 1, 0), start(batch, 0), first_block(batch, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = lens[b];
    int64_t blocks = 0;
    if (len > 0) {
      start[b] = geo.window > 0 ? std::max<int64_t>(0, len - geo.window) : 0;
      first_block[b] = start[b] / block_size;
      blocks = (len + block_size - 1) / block_size - first_block[b];
    } else {
      std::fill(out + b * heads * D, out + (b + 1) * heads * D, c10::BFloat16(0.f));
    }
    first[b + 1] = first[b] + blocks;
  }
  const int64_t total = first[batch];
  if (total == 0) return;
  const int64_t slices = std::clamp<int64_t>(at::get_num_threads(), 1, total);
  // Each slice may leave a partial at each end: slot 2s for its first row (begun before it), 2s+1 for its last.
  const int64_t slot_size = heads * (2 + D);
  std::vector<int64_t> slot_row(2 * slices, -1);
  std::vector<float> slot_data(2 * slices * slot_size);
  const Lanes<G> lanes;
  const uint16_t* kv_bits = reinterpret_cast<const uint16_t*>(kv);
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    State st(geo.kv_heads, G, D);
    for (int64_t slice = begin; slice < end; ++slice) {
      const int64_t u_lo = total * slice / slices, u_hi = total * (slice + 1) / slices;
      int64_t b = std::upper_bound(first.begin(), first.end(), u_lo) - first.begin() - 1;
      for (int64_t u = u_lo; u < u_hi; ++b) {
        if (first[b + 1] <= u) continue;  // a padding row: no blocks
        const int64_t lo = u - first[b], hi = std::min(u_hi, first[b + 1]) - first[b];
        int64_t b_next = b + 1;  // the next row of the slice, if any, starts at its first block
        while (b_next < batch && first[b_next + 1] == first[b_next]) ++b_next;
        const uint16_t* after = first[b] + hi < u_hi && b_next < batch
                                    ? kv_bits + tables[b_next * geo.max_blocks + first_block[b_next]] * geo.block_stride
                                    : nullptr;
        attend_blocks<G, D>(query + b * heads * D, kv_bits, tables + b * geo.max_blocks, start[b], lens[b],
                            first_block[b] + lo, first_block[b] + hi, after, geo, lanes, st);
        if (lo == 0 && first[b] + hi == first[b + 1]) {
          emit<G, D>(st, geo, nullptr, out + b * heads * D);
        } else {
          const int64_t slot = 2 * slice + (lo > 0 ? 0 : 1);
          slot_row[slot] = b;
          emit<G, D>(st, geo, slot_data.data() + slot * slot_size, nullptr);
        }
        u = first[b] + hi;
      }
    }
  });
  for (int64_t i = 0; i < 2 * slices; ++i) {
    if (slot_row[i] < 0 || (i > 0 && std::find(slot_row.begin(), slot_row.begin() + i, slot_row[i]) !=
                                         slot_row.begin() + i))
      continue;  // no partial, or its row already merged
    std::vector<const float*> parts;
    for (int64_t j = i; j < 2 * slices; ++j)
      if (slot_row[j] == slot_row[i]) parts.push_back(slot_data.data() + j * slot_size);
    merge<D>(parts, heads, out + slot_row[i] * heads * D);
  }
}

}  // namespace
#endif

bool splitserve::paged_decode_bf16_avx512(const c10::BFloat16* query, const c10::BFloat16* kv,
                                          const int32_t* tables, const int32_t* lens, c10::BFloat16* out,
                                          int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim,
                                          int64_t block_size, int64_t max_blocks, int64_t window, float scale,
                                          const int64_t* strides) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  const int64_t group = heads / kv_heads;
  if (block_size % kTile != 0 || (head_dim != 64 && head_dim != 128) || group < 1 || group > 16) return false;
  const Geometry geo{heads,      kv_heads,   group,      block_size, max_blocks, window,
                     strides[0], strides[1], strides[2], strides[3], scale};
  auto with_dim = [&](auto padded_group) {
    constexpr int G = decltype(padded_group)::value;
    if (head_dim == 64)
      run<G, 64>(query, kv, tables, lens, out, batch, geo);
    else
      run<G, 128>(query, kv, tables, lens, out, batch, geo);
  };
  if (group == 1)
    with_dim(std::integral_constant<int, 1>{});
  else if (group == 2)
    with_dim(std::integral_constant<int, 2>{});
  else if (group <= 4)
    with_dim(std::integral_constant<int, 4>{});
  else if (group <= 8)
    with_dim(std::integral_constant<int, 8>{});
  else
    with_dim(std::integral_constant<int, 16>{});
  return true;
#else
  (void)query, (void)kv, (void)tables, (void)lens, (void)out, (void)batch, (void)heads, (void)kv_heads;
  (void)head_dim, (void)block_size, (void)max_blocks, (void)window, (void)scale, (void)strides;
  return false;
#endif
}
