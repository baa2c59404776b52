// The C++ CPU kernels' entry points, bound to Python in bindings.cpp. Only bindings.cpp includes
// torch/extension.h (pybind11 and all of torch's headers, ~20 s of compile time per file); the kernels need ATen only.
#pragma once

#include <ATen/core/Tensor.h>

namespace splitserve {

// paged_decode_cpu.cpp
at::Tensor paged_decode_attention(at::Tensor query, at::Tensor kv_layer, at::Tensor block_tables,
                                     at::Tensor seq_lens, double scale, int64_t window);

// store_kv_cpu.cpp
void store_kv(at::Tensor key, at::Tensor value, at::Tensor kv_layer, at::Tensor slots);

// paged_prefill_cpu.cpp
bool prefill_attention_supported(int64_t head_dim);
void paged_prefill_attention(at::Tensor query, at::Tensor out, at::Tensor kv_layer, at::Tensor tables,
                             at::Tensor chunks, double scale, int64_t window);

// fused_ops_cpu.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
at::Tensor add_rms_norm_(at::Tensor residual, at::Tensor delta, at::Tensor weight, double eps);
at::Tensor silu_and_mul(at::Tensor gate_up);
std::vector<at::Tensor> rotary_embedding(at::Tensor q, at::Tensor k, at::Tensor positions, at::Tensor cos,
                                         at::Tensor sin);

}  // namespace splitserve
