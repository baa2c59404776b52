// The Python module of the C++ CPU kernels (built by engine/kernels/cpu_native.py).
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &splitserve::paged_decode_attention,
        "paged decode attention over a CPU KV cache");
  // paged_prefill_cpu.cpp

  // fused_ops_cpu.cpp
}
