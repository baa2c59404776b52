// The AVX-512 BF16 fast path of paged decode attention (paged_decode_avx512.cpp), called by paged_decode_cpu.cpp.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace splitserve {

// Decode attention for a bf16 cache, with the arguments and layouts of paged_decode_cpu.cpp. Returns false, having
// written nothing, where it does not apply (no AVX-512 BF16 in this build, head_dim other than 64 and 128, query
// heads per KV head other than 1, 2, 4, 8, 16, block_size not a multiple of 16): the caller's generic path serves.
bool paged_decode_bf16_avx512(const c10::BFloat16* query, const c10::BFloat16* kv, const int32_t* tables,
                              const int32_t* lens, c10::BFloat16* out, int64_t batch, int64_t heads,
                              int64_t kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                              int64_t window, float scale, const int64_t* strides);

}  // namespace splitserve
