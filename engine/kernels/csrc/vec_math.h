// Vector helpers shared by the CPU kernels: bf16 -> fp32, exp and a softmax row, with AVX-512 where the host has it.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace splitserve {

template <typename T>
inline float to_float(T value) {
  return static_cast<float>(value);
}

// bf16 is the top half of an fp32: a shift, which the compiler vectorises (c10's conversion does not inline as well).
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 value) {
  uint32_t bits = static_cast<uint32_t>(value.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#if defined(__AVX512F__)
// exp for x <= 0 (scores less their row's maximum), 16 lanes at once: x = k ln2 + r, exp(x) = 2^k * exp(r), with
// exp(r) on |r| <= ln2 / 2 by Cephes' degree-6 polynomial (relative error ~1e-7, like libm's expf). Below -87 the
// result would be subnormal; it is clamped there (e^-87 ~ 1.6e-38: nothing next to the row's maximum, whose exp is 1).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);  // ln2 in two parts, for precision
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, k);
}

// Softmax of row[0..n) in place (n >= 1).
inline void softmax_row(float* row, int64_t n) {
  __m512 top = _mm512_set1_ps(row[0]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + i));
  float best = _mm512_reduce_max_ps(top);
  for (; i < n; ++i) best = std::max(best, row[i]);
  const __m512 shift = _mm512_set1_ps(best);
  __m512 total = _mm512_setzero_ps();
  for (i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + i), shift));
    _mm512_mask_storeu_ps(row + i, lanes, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(row + i, lanes, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + i), inv));
  }
}
#else
// Softmax of row[0..n) in place (n >= 1).
inline void softmax_row(float* row, int64_t n) {
  float top = row[0];
  for (int64_t i = 1; i < n; ++i) top = std::max(top, row[i]);
  float total = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    row[i] = std::exp(row[i] - top);
    total += row[i];
  }
  const float inv = 1.f / total;
  for (int64_t i = 0; i < n; ++i) row[i] *= inv;
}
#endif


#if defined(__AVX512F__)
// 16 bf16 values widened to fp32 (exact: bf16 is the top half of an fp32).
inline __m512 bf16_to_fp32(__m256i half) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#endif

}  // namespace splitserve
