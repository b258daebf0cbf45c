// kernels/src/quant_device.cuh -- the scalar arithmetic of quant.h shared by the CUDA kernels (quant_pack.cu,
// gptq_batched.cu): exact IEEE operations, std::min / std::max as libstdc++ defines them, scale rounding
// (round_to_bf16 / round_to_fp16 / round_scale / scale_epsilon) and qparams_from_range, operation for operation.
// Bit-exactness with libmoequant/include/moequant/quant.h is the contract; see the notes at the top of quant_pack.cu
// (why every operation is an explicit round-to-nearest intrinsic on the device).
#pragma once

#include "launch.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

// ---- exact scalar arithmetic: intrinsics on the device, plain IEEE ops on the host ---------------------------
// The host branch exists so that the very same code can be checked against quant.h on a machine without a GPU
// (x86-64 SSE arithmetic, no FMA contraction).
struct Exact {
  __host__ __device__ static float add(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
  }
  __host__ __device__ static float sub(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
  }
  __host__ __device__ static float mul(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
  }
  __host__ __device__ static float div(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
  }
  __host__ __device__ static double dadd(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
  }
  __host__ __device__ static double dsub(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
  }
  __host__ __device__ static double ddiv(double a, double b) {
#ifdef __CUDA_ARCH__
    return __ddiv_rn(a, b);
#else
    return a / b;
#endif
  }
  __host__ __device__ static float to_float(double a) {
#ifdef __CUDA_ARCH__
    return __double2float_rn(a);
#else
    return static_cast<float>(a);
#endif
  }
  __host__ __device__ static uint32_t bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
  }
  __host__ __device__ static float from_bits(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
  }
};

// std::min / std::max exactly as libstdc++ defines them (first argument wins ties, incl. -0 vs +0).
__host__ __device__ inline float std_min(float a, float b) { return (b < a) ? b : a; }
__host__ __device__ inline float std_max(float a, float b) { return (a < b) ? b : a; }

// ---- scale rounding: the same bit manipulation as round_to_bf16 / round_to_fp16 in quant.h ----------------------
__host__ __device__ inline float round_to_bf16(float f) {
  uint32_t u = Exact::bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return Exact::from_bits(u & 0xFFFF0000u);
}

__host__ __device__ inline float round_to_fp16(float f) {
  const float a = fabsf(f);
  if (a >= 65520.0f) return copysignf(__builtin_huge_valf(), f);
  if (a < 6.103515625e-05f) {  // subnormal half: a multiple of 2^-24 (the scalings by 2^24 are exact)
    const float q = Exact::div(rintf(Exact::mul(a, 16777216.0f)), 16777216.0f);
    return copysignf(q, f);
  }
  uint32_t u = Exact::bits(f);
  u += 0x0FFFu + ((u >> 13) & 1u);
  return Exact::from_bits(u & 0xFFFFE000u);
}

__host__ __device__ inline float round_scale(float s, int dtype) {
  if (dtype == 1) return round_to_bf16(s);
  if (dtype == 2) return round_to_fp16(s);
  return s;
}

__host__ __device__ inline float scale_epsilon(int dtype) {
  if (dtype == 1) return 0.0078125f;     // 2^-7
  if (dtype == 2) return 0.0009765625f;  // 2^-10
  return 0x1p-23f;                       // std::numeric_limits<float>::epsilon()
}

/// Quantization parameters; the zero point is an integer value in [qmin, qmax] (0 when symmetric), held as `Zero`:
/// int32_t in quant_pack.cu (the type the outputs store), float in the GPTQ column loop (kept for the arithmetic).
template <class Zero>
struct QParamsT {
  float scale;
  Zero zero;
};

// qparams_from_range of quant.h, operation for operation.
template <class Zero>
__host__ __device__ inline QParamsT<Zero> qparams_from_range(float lo, float hi, const RtnParams& s) {
  const int qmin = -(1 << (s.bits - 1)), qmax = (1 << (s.bits - 1)) - 1;
  lo = std_min(lo, 0.0f);
  hi = std_max(hi, 0.0f);
  QParamsT<Zero> p{1.0f, Zero(0)};
  if (s.symmetric) {
    const float amax = std_max(-lo, hi);
    p.scale = Exact::div(amax, Exact::div(static_cast<float>(qmax - qmin), 2.0f));
  } else {
    p.scale = Exact::div(Exact::sub(hi, lo), static_cast<float>(qmax - qmin));
  }
  p.scale = round_scale(p.scale, s.scale_dtype);
  if (p.scale == 0.0f) p.scale = scale_epsilon(s.scale_dtype);
  if (!s.symmetric) {
    const float z = rintf(Exact::sub(static_cast<float>(qmin), Exact::div(lo, p.scale)));
    p.zero = static_cast<Zero>(std_min(std_max(z, static_cast<float>(qmin)), static_cast<float>(qmax)));
  }
  return p;
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
