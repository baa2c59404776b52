// Prefill attention over the paged KV cache (work in progress).
#include "kernels.h"
