// Fused elementwise ops of the decoder (work in progress).
#include "kernels.h"
