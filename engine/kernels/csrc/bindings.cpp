// The Python module of the C++ CPU kernels (built by engine/kernels/cpu_native.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &splitserve::paged_decode_attention,
        "paged decode attention over a CPU KV cache");
  // store_kv_cpu.cpp
  m.def("store_kv", &splitserve::store_kv, "write new K/V rows into their cache slots");
  // paged_prefill_cpu.cpp
  m.def("prefill_attention_supported", &splitserve::prefill_attention_supported,
        "whether this build has the prefill-attention kernel for a head_dim");
  m.def("paged_prefill_attention", &splitserve::paged_prefill_attention,
        "prefill chunks' attention over a CPU KV cache, written into out's rows");

  // fused_ops_cpu.cpp
  m.def("rms_norm", &splitserve::rms_norm, "RMSNorm of [A, B, D] rows, bit-identical to layers.rms_norm");
  m.def("add_rms_norm_", &splitserve::add_rms_norm_, "residual += delta in place, then RMSNorm of it");
  m.def("silu_and_mul", &splitserve::silu_and_mul, "silu(gate) * up over a [N, 2I] gate_up output");
  m.def("rotary_embedding", &splitserve::rotary_embedding, "rotate-half RoPE of q and k into new tensors");
}
