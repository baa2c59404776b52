// The C++ CPU kernels' entry points, bound to Python in bindings.cpp. Only bindings.cpp includes
// torch/extension.h (pybind11 and all of torch's headers, ~20 s of compile time per file); the kernels need ATen only.
#pragma once

#include <ATen/core/Tensor.h>

namespace splitserve {

// paged_decode_cpu.cpp
at::Tensor paged_decode_attention(at::Tensor query, at::Tensor kv_layer, at::Tensor block_tables,
                                     at::Tensor seq_lens, double scale, int64_t window);

// paged_prefill_cpu.cpp

// fused_ops_cpu.cpp

}  // namespace splitserve
