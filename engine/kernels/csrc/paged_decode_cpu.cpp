// Paged decode attention for CPUs: one query token per sequence over its K/V, read in place from the paged cache.
//
// The torch version (engine/kernels/cpu.py) gathers every sequence's blocks into a fresh tensor, upcasts it to fp32
// and lets bmm copy it once more into its preferred layout: three passes over the whole KV of the batch per layer.
// Here each (sequence, KV head) task reads its K rows once and its V rows once, straight from the cache blocks (one
// table lookup per block), and the G query heads that share the KV head are served from the same reads. Scores,
// softmax and the weighted sum of V are fp32, as in the torch version, so outputs agree with it to rounding. bf16
// with head_dim 64 or 128 on AVX-512 BF16 CPUs (Zen 4, Sapphire Rapids) takes a one-pass hand-vectorised kernel
// (paged_decode_avx512.cpp); everything else this generic one, which the compiler vectorises.
// Measured on this project's 2-core Zen 4 VM, 24 sequences of 800 tokens, 16 query and 4 KV heads of 64, bf16, one
// layer, one thread: torch ops 33 ms, this generic path 5.6 ms, the AVX-512 kernel 1.8 ms.
// Threads: at::parallel_for is inline in ATen's headers and runs in parallel only where this file is compiled with
// OpenMP (-fopenmp, linking torch's own libgomp); without it, it calls the body once, on the calling thread.
//
// Layouts (validated by the caller, engine/kernels/__init__.py):
//   query        [B, H, D]                         any float dtype, contiguous
//   kv_layer     [num_blocks, 2, block_size, KVH, D] same dtype, any strides but a unit one for D (a layer of a
//                cache allocated block-major for KV transfer is strided)
//   block_tables [B, max_blocks] int32, seq_lens [B] int32 (<= 0: a padding row, left zero)
//   window       the sliding window (0: none): row b attends to [max(0, len - window), len)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernels.h"
#include "paged_decode_avx512.h"
#include "vec_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using splitserve::softmax_row;
using splitserve::to_float;

// One (sequence, KV head) task. D: head_dim when it is one of the common sizes (the loops then unroll and
// vectorise fully), else 0 and head_dim at run time.
template <typename T, int D>
void attend(const T* q_rows, const T* kv, const int32_t* table, int64_t start, int64_t len, T* out_rows,
            int64_t group, int64_t dim, int64_t block_size, int64_t block_stride, int64_t half_stride,
            int64_t token_stride, int64_t head_offset, float scale, std::vector<float>& q,
            std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& row_buf) {
  const int64_t head_dim = D > 0 ? D : dim;
  const int64_t n = len - start;
  for (int64_t i = 0; i < group * head_dim; ++i) q[i] = to_float(q_rows[i]) * scale;
  scores.resize(group * n);
  float* kf = row_buf.data();
  // Block by block: one table lookup per block, no division per position.
  const int64_t first_block = start / block_size, end_block = (len + block_size - 1) / block_size;
  for (int64_t blk = first_block; blk < end_block; ++blk) {
    const T* base = kv + table[blk] * block_stride + head_offset;
    const int64_t lo = std::max(start, blk * block_size), hi = std::min(len, (blk + 1) * block_size);
    for (int64_t p = lo; p < hi; ++p) {
      const T* k = base + (p - blk * block_size) * token_stride;
      for (int64_t d = 0; d < head_dim; ++d) kf[d] = to_float(k[d]);
      for (int64_t g = 0; g < group; ++g) {
        const float* qg = q.data() + g * head_dim;
        float dot = 0.f;
        for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * kf[d];
        scores[g * n + (p - start)] = dot;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_row(scores.data() + g * n, n);
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t blk = first_block; blk < end_block; ++blk) {
    const T* base = kv + table[blk] * block_stride + half_stride + head_offset;
    const int64_t lo = std::max(start, blk * block_size), hi = std::min(len, (blk + 1) * block_size);
    for (int64_t p = lo; p < hi; ++p) {
      const T* v = base + (p - blk * block_size) * token_stride;
      for (int64_t d = 0; d < head_dim; ++d) kf[d] = to_float(v[d]);
      for (int64_t g = 0; g < group; ++g) {
        const float weight = scores[g * n + (p - start)];
        float* a = acc.data() + g * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) a[d] += weight * kf[d];
      }
    }
  }
  for (int64_t i = 0; i < group * head_dim; ++i) out_rows[i] = static_cast<T>(acc[i]);
}

template <typename T>
void decode_attention(const T* query, const T* kv, const int32_t* tables, const int32_t* lens, T* out,
                      int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t block_size,
                      int64_t max_blocks, int64_t window, float scale, const int64_t* strides) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (splitserve::paged_decode_bf16_avx512(query, kv, tables, lens, out, batch, heads, kv_heads, head_dim,
                                             block_size, max_blocks, window, scale, strides))
      return;
  }
  const int64_t group = heads / kv_heads;
  const int64_t block_stride = strides[0], half_stride = strides[1], token_stride = strides[2];
  const int64_t head_stride = strides[3];
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * head_dim), scores, acc(group * head_dim), row_buf(head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, kvh = task % kv_heads;
      const int64_t len = lens[b];
      T* out_rows = out + (b * heads + kvh * group) * head_dim;
      if (len <= 0) {
        std::fill(out_rows, out_rows + group * head_dim, T(0));
        continue;
      }
      const int64_t start = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const T* q_rows = query + (b * heads + kvh * group) * head_dim;
      const int32_t* table = tables + b * max_blocks;
      const int64_t offset = kvh * head_stride;
#define SPLITSERVE_ATTEND(DIM)                                                                                  \
  attend<T, DIM>(q_rows, kv, table, start, len, out_rows, group, head_dim, block_size, block_stride, half_stride, \
                 token_stride, offset, scale, q, scores, acc, row_buf)
      switch (head_dim) {
        case 64: SPLITSERVE_ATTEND(64); break;
        case 128: SPLITSERVE_ATTEND(128); break;
        default: SPLITSERVE_ATTEND(0);
      }
#undef SPLITSERVE_ATTEND
    }
  });
}

}  // namespace

at::Tensor splitserve::paged_decode_attention(at::Tensor query, at::Tensor kv_layer, at::Tensor block_tables,
                                     at::Tensor seq_lens, double scale, int64_t window) {
  auto out = at::empty_like(query);
  const int64_t batch = query.size(0), heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = kv_layer.size(2), kv_heads = kv_layer.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(query.data_ptr<scalar_t>(), kv_layer.data_ptr<scalar_t>(),
                               block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                               out.data_ptr<scalar_t>(), batch, heads, kv_heads, head_dim, block_size,
                               block_tables.size(1), window, static_cast<float>(scale), kv_layer.strides().data());
  });
  return out;
}
