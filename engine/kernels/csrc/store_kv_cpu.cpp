// Writing a step's new K/V rows into their cache slots on CPUs.
//
// The torch version (engine/kernels/cpu.py) runs two advanced-indexing assignments plus the slot arithmetic: ~80 us a
// layer for a one-token decode step here, 0.7 ms of a ~18 ms step over 8 layers. Here each token is two row copies.
// Slots are checked before anything is written (an out-of-range slot raises IndexError, as the torch version does);
// negative slots are padding and skipped.
//
// Layouts (validated by the caller): key, value [T, KVH, D], each token's KVH x D values contiguous (rows may be
// strided: views of the fused qkv output); kv_layer [num_blocks, 2, block_size, KVH, D] with each token's
// KVH x D values contiguous; slots [T] int64.

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "kernels.h"

#include <cstdint>
#include <cstring>

void splitserve::store_kv(at::Tensor key, at::Tensor value, at::Tensor kv_layer, at::Tensor slots) {
  const int64_t tokens = key.size(0), row_elems = key.size(1) * key.size(2);
  const int64_t capacity = kv_layer.size(0) * kv_layer.size(2), block_size = kv_layer.size(2);
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK_INDEX(slot[t] < capacity, "store_kv: slot ", slot[t], " is outside the cache (", capacity, " slots)");
  const int64_t item = key.element_size(), row_bytes = row_elems * item;
  const auto* k = static_cast<const char*>(key.data_ptr());
  const auto* v = static_cast<const char*>(value.data_ptr());
  auto* cache = static_cast<char*>(kv_layer.data_ptr());
  const int64_t key_stride = key.stride(0) * item, value_stride = value.stride(0) * item;
  const int64_t block_stride = kv_layer.stride(0) * item, half_stride = kv_layer.stride(1) * item;
  const int64_t token_stride = kv_layer.stride(2) * item;
  // Rows are a few KB: threads pay off only for prefill-sized steps.
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slot[t] < 0) continue;
      char* dst = cache + (slot[t] / block_size) * block_stride + (slot[t] % block_size) * token_stride;
      std::memcpy(dst, k + t * key_stride, row_bytes);
      std::memcpy(dst + half_stride, v + t * value_stride, row_bytes);
    }
  });
}
