// The decoder's elementwise glue, fused: RMSNorm, residual add + RMSNorm, SiLU-and-mul and rotary embedding.
//
// In torch ops each of these is 3-8 passes over the activations with a fresh tensor per pass (a bf16 RMSNorm is
// .float(), pow, mean, add, rsqrt, mul, .to(bf16), mul); here each is one pass over a row that stays in L1.
//
// Results are bit-identical to the torch ops of engine/models/layers.py on AVX-512 hosts (tests/unit/
// test_fused_ops.py checks it; a 156M Llama's greedy outputs are the same tokens either way):
//  * every rounding step of the torch version is kept: a bf16/fp16 op computes in fp32 and rounds to the dtype
//    once per torch op (so `w * round(x * rstd)` rounds twice, `a + b` once, and RoPE's `q*cos + rot(q)*sin`
//    three times);
//  * fp32 arithmetic uses the AVX-512 embedded-rounding intrinsics (_mm512_add_round_ps, ...). The extension is
//    built with -ffast-math, under which GCC may fuse a plain `a * b + c` into an FMA or reassociate it; it treats
//    these builtins as opaque, so each one rounds exactly once, as torch's own (non-fast-math) kernels do;
//  * the RMSNorm sum of squares adds in the order of torch's CPU sum (see sum_squares), so the mean, and every
//    output, matches bit for bit rather than to an ulp;
//  * exp in SiLU is torch's own: Sleef_expf16_u10 (exported by libtorch_cpu) where torch's vector loop uses it,
//    glibc's expf for the elements its scalar loop takes (see silu_and_mul_row). One case stays apart: torch
//    splits a tensor of >= 32k elements between threads at an element count, which can fall mid-row, and that
//    row's vector/scalar split then differs (fp32 results may move by an ulp there; not for widths that are
//    multiples of 64, as models' intermediate sizes are).
// Hosts without AVX-512 BW/VL get plain loops, which the compiler may reassociate: close, not bit-identical.
//
// Layouts (checked by the caller, engine/kernels/fused.py): the last dimension is contiguous; rows may have any
// stride. Outputs are new contiguous tensors, except add_rms_norm_'s residual, updated in place.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SPLITSERVE_FUSED_AVX512 1
// torch's vectorised exp on AVX-512 (ATen's Vectorized<float>::exp). Weak: where a torch build hides it, the
// lanes fall back to std::exp (then SiLU is close to torch's, not identical).
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
#endif

namespace {

// Rows per parallel task: about 32k elements, torch's own grain (smaller batches run on the calling thread,
// where a pool wake-up would cost more than the work: a decode step's [24, 1024] norm takes ~3 us).
int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elements));
}

#if SPLITSERVE_FUSED_AVX512
constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

inline __m512 add_rn(__m512 a, __m512 b) { return _mm512_add_round_ps(a, b, kRound); }
inline __m512 mul_rn(__m512 a, __m512 b) { return _mm512_mul_round_ps(a, b, kRound); }
inline __m512 div_rn(__m512 a, __m512 b) { return _mm512_div_round_ps(a, b, kRound); }
inline float add_rn(float a, float b) { return _mm_cvtss_f32(_mm_add_round_ss(_mm_set_ss(a), _mm_set_ss(b), kRound)); }
inline float div_rn(float a, float b) { return _mm_cvtss_f32(_mm_div_round_ss(_mm_set_ss(a), _mm_set_ss(b), kRound)); }
inline float sqrt_rn(float a) { return _mm_cvtss_f32(_mm_sqrt_round_ss(_mm_setzero_ps(), _mm_set_ss(a), kRound)); }
inline __m512 negate(__m512 a) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(INT32_MIN)));
}
inline __mmask16 lanes_from(int64_t i, int64_t n) {
  return n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
}

// 16 values of T as fp32 (masked lanes read nothing and are zero), stored back rounded to nearest even, and
// `round`: to T and back, the rounding every torch op on a T tensor applies to its fp32 result.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  static __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
  static __m512 round(__m512 v) { return v; }
};

template <>
struct Lanes<c10::BFloat16> {
  static __m512 load(const c10::BFloat16* p, __mmask16 m) {
    const __m256i half = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  static __m256i narrow(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
  }
  static void store(c10::BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, narrow(v)); }
  static __m512 round(__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(narrow(v)), 16));
  }
};

template <>
struct Lanes<c10::Half> {
  static __m512 load(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
  static void store(c10::Half* p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, kRound));
  }
  static __m512 round(__m512 v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, kRound)); }
};

// expf of one float from glibc, as torch's scalar loops call it. Not inlined, so that no loop around it is
// vectorised into libmvec's expf (a different result in the last bit).
__attribute__((noinline)) float glibc_expf(float x) { return std::exp(x); }

inline __m512 exp_lanes_scalar(__m512 x) {
  alignas(64) float v[16];
  _mm512_store_ps(v, x);
  for (float& e : v) e = glibc_expf(e);
  return _mm512_load_ps(v);
}

template <typename T>
inline __m512 square(const T* p) {
  const __m512 v = Lanes<T>::load(p, 0xFFFF);
  return mul_rn(v, v);
}

template <typename T>
inline float square_of(T value) {
  const float v = static_cast<float>(value);
  return _mm_cvtss_f32(_mm_mul_round_ss(_mm_set_ss(v), _mm_set_ss(v), kRound));
}

// Sum of squares of row[0..n) in fp32, added in exactly the order of torch's CPU sum of x.float().pow(2) over a
// contiguous row (aten/src/ATen/native/cpu/SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum). torch
// runs that kernel at AVX2 width even on AVX-512 hosts (sum_stub has no AVX-512 registration), so its vectors are
// 8 lanes: 4 interleaved accumulators of 8-lane vectors, cascaded into 3 more levels every 16 steps, the leftover
// vectors, then a scalar pass over the tail elements and the 8 lanes in order. Here one 16-lane register holds two
// of those 8-lane accumulators. Rows shorter than 8 take torch's scalar version (the same scheme with 1 lane).
template <typename T>
float sum_squares(const T* row, int64_t n) {
  constexpr int kLevels = 4, kLanes = 8;
  const int64_t vectors = n >= kLanes ? n / kLanes : n, lanes = n >= kLanes ? kLanes : 1;
  const int64_t groups = vectors / 4;  // 4 vectors each: accumulators 0-1 in pair[.][0], 2-3 in pair[.][1]
  int64_t ceil_log2 = 1;  // torch's utils::CeilLog2(groups)
  if (groups > 2) ceil_log2 = 64 - __builtin_clzll(static_cast<uint64_t>(groups - 1));
  const int64_t level_power = std::max<int64_t>(4, ceil_log2 / kLevels);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  alignas(64) float acc[4][kLanes] = {};
  float sum = 0.f;
  if (lanes == kLanes) {
    __m512 pair[kLevels][2];
    for (auto& level : pair) level[0] = level[1] = _mm512_setzero_ps();
    const auto add_group = [&](int64_t i) {
      pair[0][0] = add_rn(pair[0][0], square(row + i * 32));
      pair[0][1] = add_rn(pair[0][1], square(row + i * 32 + 16));
    };
    int64_t i = 0;
    while (i + level_step <= groups) {
      for (int64_t j = 0; j < level_step; ++j, ++i) add_group(i);
      for (int level = 1; level < kLevels; ++level) {
        for (int h = 0; h < 2; ++h) {
          pair[level][h] = add_rn(pair[level][h], pair[level - 1][h]);
          pair[level - 1][h] = _mm512_setzero_ps();
        }
        if ((i & (level_mask << (level * level_power))) != 0) break;
      }
    }
    for (; i < groups; ++i) add_group(i);
    for (int level = 1; level < kLevels; ++level)
      for (int h = 0; h < 2; ++h) pair[0][h] = add_rn(pair[0][h], pair[level][h]);
    _mm512_store_ps(acc[0], pair[0][0]);  // acc[0] and acc[1]
    _mm512_store_ps(acc[2], pair[0][1]);  // acc[2] and acc[3]
  } else {  // n < 8: no cascade level fills (16 groups), scalars only
    for (int64_t i = 0; i < groups; ++i)
      for (int k = 0; k < 4; ++k) acc[k][0] = add_rn(acc[k][0], square_of(row[i * 4 + k]));
  }
  // row_sum: the leftover vectors into accumulator 0, then accumulators 1-3 into it.
  for (int64_t v = groups * 4; v < vectors; ++v)
    for (int64_t l = 0; l < lanes; ++l) acc[0][l] = add_rn(acc[0][l], square_of(row[v * lanes + l]));
  for (int k = 1; k < 4; ++k)
    for (int64_t l = 0; l < lanes; ++l) acc[0][l] = add_rn(acc[0][l], acc[k][l]);
  // vectorized_inner_sum: 0, the tail elements, then the lanes, one at a time.
  for (int64_t e = vectors * lanes; e < n; ++e) sum = add_rn(sum, square_of(row[e]));
  for (int64_t l = 0; l < lanes; ++l) sum = add_rn(sum, acc[0][l]);
  return sum;
}

// torch: rsqrt(sum.div_(n) + eps), each op rounding once.
inline float inverse_rms(float sum_of_squares, int64_t n, float eps) {
  return div_rn(1.f, sqrt_rn(add_rn(div_rn(sum_of_squares, static_cast<float>(n)), eps)));
}

// out = round(w * round(x * rstd)).
template <typename T>
void normalize_row(const T* x, const T* weight, T* out, int64_t n, float rstd) {
  const __m512 scale = _mm512_set1_ps(rstd);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_from(i, n);
    const __m512 normed = Lanes<T>::round(mul_rn(Lanes<T>::load(x + i, m), scale));
    Lanes<T>::store(out + i, mul_rn(Lanes<T>::load(weight + i, m), normed), m);
  }
}

// residual[0..n) = round(residual + delta), in place.
template <typename T>
void add_row(T* residual, const T* delta, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_from(i, n);
    Lanes<T>::store(residual + i, add_rn(Lanes<T>::load(residual + i, m), Lanes<T>::load(delta + i, m)), m);
  }
}

inline __m512 exp_lanes(__m512 x) {
  if (Sleef_expf16_u10 != nullptr) return Sleef_expf16_u10(x);
  return exp_lanes_scalar(x);
}

// out = round(round(gate / (1 + exp(-gate))) * up): torch's silu, then its mul. torch's silu loop takes two vectors
// at a time (32 fp32 or 64 bf16/fp16 elements) with Sleef's exp and the rest of each row one by one with glibc's
// expf; the same split here keeps every element's exp the same as torch's.
template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  constexpr int64_t kTorchStep = sizeof(T) == 4 ? 32 : 64;
  const int64_t vector_end = n - n % kTorchStep;
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lanes_from(i, n);
    const __m512 g = Lanes<T>::load(gate + i, m);
    const __m512 e = i < vector_end ? exp_lanes(negate(g)) : exp_lanes_scalar(negate(g));
    const __m512 silu = Lanes<T>::round(div_rn(g, add_rn(one, e)));
    Lanes<T>::store(out + i, mul_rn(silu, Lanes<T>::load(up + i, m)), m);
  }
}

// One head of rotate-half RoPE: out = round(round(x * cos) + round(rotate_half(x) * sin)), with cos/sin already
// rounded to T (the torch version casts the fp32 tables to the activation dtype first).
template <typename T>
void rotate_head(const T* x, T* out, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = lanes_from(i, half);
    const __m512 lo = Lanes<T>::load(x + i, m), hi = Lanes<T>::load(x + half + i, m);
    const __m512 c_lo = _mm512_maskz_loadu_ps(m, cos + i), c_hi = _mm512_maskz_loadu_ps(m, cos + half + i);
    const __m512 s_lo = _mm512_maskz_loadu_ps(m, sin + i), s_hi = _mm512_maskz_loadu_ps(m, sin + half + i);
    const __m512 out_lo = add_rn(Lanes<T>::round(mul_rn(lo, c_lo)), Lanes<T>::round(mul_rn(negate(hi), s_lo)));
    const __m512 out_hi = add_rn(Lanes<T>::round(mul_rn(hi, c_hi)), Lanes<T>::round(mul_rn(lo, s_hi)));
    Lanes<T>::store(out + i, out_lo, m);
    Lanes<T>::store(out + half + i, out_hi, m);
  }
}

template <typename T>
void round_table_row(const float* in, float* out, int64_t dim) {
  for (int64_t i = 0; i < dim; i += 16) {
    const __mmask16 m = lanes_from(i, dim);
    _mm512_mask_storeu_ps(out + i, m, Lanes<T>::round(_mm512_maskz_loadu_ps(m, in + i)));
  }
}

#else  // no AVX-512: plain loops in fp32 (close to the torch ops, not bit-identical under -ffast-math)

template <typename T>
float sum_squares(const T* row, int64_t n) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(row[i]) * static_cast<float>(row[i]);
  return sum;
}

inline float inverse_rms(float sum_of_squares, int64_t n, float eps) {
  return 1.f / std::sqrt(sum_of_squares / static_cast<float>(n) + eps);
}

template <typename T>
void normalize_row(const T* x, const T* weight, T* out, int64_t n, float rstd) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<T>(static_cast<float>(weight[i]) *
                            static_cast<float>(static_cast<T>(static_cast<float>(x[i]) * rstd)));
}

template <typename T>
void add_row(T* residual, const T* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    residual[i] = static_cast<T>(static_cast<float>(residual[i]) + static_cast<float>(delta[i]));
}

template <typename T>
void silu_and_mul_row(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(gate[i]);
    const T silu = static_cast<T>(g / (1.f + std::exp(-g)));
    out[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
  }
}

template <typename T>
void rotate_head(const T* x, T* out, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float lo = static_cast<float>(x[i]), hi = static_cast<float>(x[half + i]);
    const float a = static_cast<float>(static_cast<T>(lo * cos[i]));
    const float b = static_cast<float>(static_cast<T>(-hi * sin[i]));
    const float c = static_cast<float>(static_cast<T>(hi * cos[half + i]));
    const float d = static_cast<float>(static_cast<T>(lo * sin[half + i]));
    out[i] = static_cast<T>(a + b);
    out[half + i] = static_cast<T>(c + d);
  }
}

template <typename T>
void round_table_row(const float* in, float* out, int64_t dim) {
  for (int64_t i = 0; i < dim; ++i) out[i] = static_cast<float>(static_cast<T>(in[i]));
}
#endif

// Dispatch over the three activation dtypes (AT_DISPATCH would also instantiate double, which Lanes lacks).
template <typename F>
void dispatch(at::ScalarType dtype, const char* name, F&& body) {
  switch (dtype) {
    case at::kFloat: body(float{}); break;
    case at::kBFloat16: body(c10::BFloat16{}); break;
    case at::kHalf: body(c10::Half{}); break;
    default: TORCH_CHECK_VALUE(false, name, ": unsupported dtype ", dtype);
  }
}

}  // namespace

at::Tensor splitserve::rms_norm(at::Tensor x, at::Tensor weight, double eps) {
  // x: [A, B, D] with a unit stride for D (a [T, H, D] view of the fused qkv output for Qwen3's per-head norms).
  const int64_t outer = x.size(0), inner = x.size(1), dim = x.size(2);
  auto out = at::empty({outer, inner, dim}, x.options());
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(x.data_ptr());
    const T* w = static_cast<const T*>(weight.data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, outer * inner, grain_rows(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = in + (r / inner) * s0 + (r % inner) * s1;
        normalize_row(row, w, dst + r * dim, dim, inverse_rms(sum_squares(row, dim), dim, float(eps)));
      }
    });
  });
  return out;
}

at::Tensor splitserve::add_rms_norm_(at::Tensor residual, at::Tensor delta, at::Tensor weight, double eps) {
  // residual: [N, D] contiguous, updated in place; delta: [N, D] with a unit stride for D.
  const int64_t rows = residual.size(0), dim = residual.size(1), delta_stride = delta.stride(0);
  auto out = at::empty({rows, dim}, residual.options());
  dispatch(residual.scalar_type(), "add_rms_norm_", [&](auto tag) {
    using T = decltype(tag);
    T* res = static_cast<T*>(residual.data_ptr());
    const T* d = static_cast<const T*>(delta.data_ptr());
    const T* w = static_cast<const T*>(weight.data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, grain_rows(dim), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = res + r * dim;
        add_row(row, d + r * delta_stride, dim);  // the rounded sum is what the norm reads, as in torch
        normalize_row(row, w, dst + r * dim, dim, inverse_rms(sum_squares(row, dim), dim, float(eps)));
      }
    });
  });
  return out;
}

at::Tensor splitserve::silu_and_mul(at::Tensor gate_up) {
  // gate_up: [N, 2I] with a unit stride for the last dim; gate is the first half, up the second.
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = at::empty({rows, width}, gate_up.options());
  dispatch(gate_up.scalar_type(), "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    const T* in = static_cast<const T*>(gate_up.data_ptr());
    T* dst = static_cast<T*>(out.data_ptr());
    at::parallel_for(0, rows, grain_rows(width), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        silu_and_mul_row(in + r * stride, in + r * stride + width, dst + r * width, width);
    });
  });
  return out;
}

std::vector<at::Tensor> splitserve::rotary_embedding(at::Tensor q, at::Tensor k, at::Tensor positions,
                                                     at::Tensor cos, at::Tensor sin) {
  // q: [T, H, D], k: [T, KVH, D], unit stride for D; positions: [T] int64; cos, sin: [P, D] fp32 contiguous.
  const int64_t tokens = q.size(0), heads = q.size(1), kv_heads = k.size(1), dim = q.size(2);
  const int64_t table_rows = cos.size(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)  // the tables are indexed with these: check them all first
    TORCH_CHECK_INDEX(pos[t] >= 0 && pos[t] < table_rows, "rotary_embedding: position ", pos[t],
                      " is outside the tables' 0..", table_rows - 1);
  auto q_out = at::empty({tokens, heads, dim}, q.options());
  auto k_out = at::empty({tokens, kv_heads, dim}, k.options());
  const float* cos_table = cos.data_ptr<float>();
  const float* sin_table = sin.data_ptr<float>();
  dispatch(q.scalar_type(), "rotary_embedding", [&](auto tag) {
    using T = decltype(tag);
    const T* q_in = static_cast<const T*>(q.data_ptr());
    const T* k_in = static_cast<const T*>(k.data_ptr());
    T* q_dst = static_cast<T*>(q_out.data_ptr());
    T* k_dst = static_cast<T*>(k_out.data_ptr());
    const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
    at::parallel_for(0, tokens, grain_rows((heads + kv_heads) * dim), [&](int64_t begin, int64_t end) {
      std::vector<float> c(dim), s(dim);
      for (int64_t t = begin; t < end; ++t) {
        round_table_row<T>(cos_table + pos[t] * dim, c.data(), dim);
        round_table_row<T>(sin_table + pos[t] * dim, s.data(), dim);
        for (int64_t h = 0; h < heads; ++h)
          rotate_head(q_in + t * qs0 + h * qs1, q_dst + (t * heads + h) * dim, c.data(), s.data(), dim);
        for (int64_t h = 0; h < kv_heads; ++h)
          rotate_head(k_in + t * ks0 + h * ks1, k_dst + (t * kv_heads + h) * dim, c.data(), s.data(), dim);
      }
    });
  });
  return {q_out, k_out};
}
