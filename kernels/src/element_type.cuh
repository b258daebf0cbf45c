// kernels/src/element_type.cuh -- the device side of ElementType (moequant/cuda/element_type.h) for the kernels that
// take float32, bfloat16 or float16 arrays (hessian.cu, hessian_gather_tc.cu, hadamard.cu): the launchers' dispatch
// from the code to the device type, exact widening to fp32 (values and read-only loads) and the one rounding back
// (values and stores). nvcc only.
#pragma once

#include <moequant/cuda/element_type.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstring>
#include <type_traits>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// The device type of an ElementType, handed to dispatch_element's callable.
template <typename T>
struct ElementTag {
  using type = T;
};

/// Calls f(ElementTag<T>{}) with T the device type of t (float, __nv_bfloat16 or __half) and returns its result;
/// the callable reads T as `typename decltype(tag)::type`. Values other than kBf16 / kF16 take float (the API
/// validated them).
template <typename F>
inline auto dispatch_element(ElementType t, F&& f) {
  if (t == ElementType::kBf16) return f(ElementTag<__nv_bfloat16>{});
  if (t == ElementType::kF16) return f(ElementTag<__half>{});
  return f(ElementTag<float>{});
}

/// One element widened exactly to fp32.
__device__ inline float to_f32(float v) { return v; }
__device__ inline float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float to_f32(__half v) { return __half2float(v); }

/// fp32 rounded once (to nearest even) to T.
template <typename T>
__device__ inline T from_f32(float v);
template <>
__device__ inline float from_f32<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ inline __half from_f32<__half>(float v) { return __float2half_rn(v); }

/// *p = v rounded once to T.
template <typename T>
__device__ inline void store_f32(T* p, float v) { *p = from_f32<T>(v); }

/// *p through the read-only data cache (__ldg), widened exactly to fp32.
__device__ inline float load_f32(const float* p) { return __ldg(p); }
__device__ inline float load_f32(const __nv_bfloat16* p) {
  return to_f32(__ushort_as_bfloat16(__ldg(reinterpret_cast<const unsigned short*>(p))));
}
__device__ inline float load_f32(const __half* p) {
  return to_f32(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

/// p[0..8) (16-byte aligned) widened exactly to fp32 into a (elements 0..3) and b (4..7): fp32 two float4 loads,
/// 16-bit types one 16-byte load, all through the read-only data cache.
__device__ inline void load8_f32(const float* p, float4& a, float4& b) {
  a = __ldg(reinterpret_cast<const float4*>(p));
  b = __ldg(reinterpret_cast<const float4*>(p) + 1);
}
template <typename H2>
__device__ inline float2 widen2(unsigned u) {
  H2 h;
  memcpy(&h, &u, sizeof(u));
  if constexpr (std::is_same<H2, __nv_bfloat162>::value) return __bfloat1622float2(h);
  else return __half22float2(h);
}
template <typename H2>
__device__ inline void load8_16(const void* p, float4& a, float4& b) {
  const uint4 u = __ldg(static_cast<const uint4*>(p));
  const float2 f0 = widen2<H2>(u.x), f1 = widen2<H2>(u.y), f2 = widen2<H2>(u.z), f3 = widen2<H2>(u.w);
  a = make_float4(f0.x, f0.y, f1.x, f1.y);
  b = make_float4(f2.x, f2.y, f3.x, f3.y);
}
__device__ inline void load8_f32(const __nv_bfloat16* p, float4& a, float4& b) { load8_16<__nv_bfloat162>(p, a, b); }
__device__ inline void load8_f32(const __half* p, float4& a, float4& b) { load8_16<__half2>(p, a, b); }

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
