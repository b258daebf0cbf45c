// kernels/src/hadamard_device.cuh -- device helpers of hadamard.cu: the register butterflies, the m x m mix with compile-time signs (see the
// top of hadamard.cu); the dtype conversions (to_f32 / from_f32) come from element_type.cuh. Included by hadamard.cu
// (through hadamard_small.cuh) only.
#pragma once

#include <moequant/hadamard_tables.h>

#include "element_type.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// In-register butterflies over register-index bits [LO, LO + F) of v[0..R): for each bit h, the pairs (r, r | 2^h)
// with bit h of r clear become (a + b, a - b). Shared by the main kernel (R = 32) and the small one (R = 2^NB).
template <int LO, int F, int R>
__device__ __forceinline__ void butterflies(float (&v)[R]) {
  static_assert(LO >= 0 && F >= 0 && (1 << (LO + F)) <= R, "the bits must index v");
#pragma unroll
  for (int h = LO; h < LO + F; ++h) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r & (1 << h)) continue;
      const float a = v[r], b = v[r | (1 << h)];
      v[r] = a + b;
      v[r | (1 << h)] = a - b;
    }
  }
}

// Sign of H_M(a, c) as a compile-time constant (true: -1).
template <int M>
constexpr bool neg_sign(int a, int c) {
  return hadamard_tables::table(M)[a * M + c] == '-';
}

// Column c's use of the 8 patterns of rows 4q..4q+3: bits 0..2 select x0 +- x1 +- x2 +- x3 (bit i set: the sign of
// x_{i+1} differs from the sign of x0), bit 3 negates (x0 enters with -1).
template <int M>
constexpr int pattern(int q, int c) {
  const bool s0 = neg_sign<M>(4 * q, c);
  return (neg_sign<M>(4 * q + 1, c) != s0 ? 1 : 0) | (neg_sign<M>(4 * q + 2, c) != s0 ? 2 : 0) |
         (neg_sign<M>(4 * q + 3, c) != s0 ? 4 : 0) | (s0 ? 8 : 0);
}

template <int M, int Q, int C>
__device__ __forceinline__ void mix_term(float (&acc)[M], const float (&pat)[8]) {
  constexpr int code = pattern<M>(Q, C);
  const float t = pat[code & 7];
  if constexpr (Q == 0) acc[C] = (code & 8) ? -t : t;
  else acc[C] = (code & 8) ? acc[C] - t : acc[C] + t;
}

template <int M, int Q, int... C>
__device__ __forceinline__ void mix_terms(float (&acc)[M], const float (&pat)[8], std::integer_sequence<int, C...>) {
  (mix_term<M, Q, C>(acc, pat), ...);
}

// acc[c] (+)= sum over rows a = 4Q..4Q+3 of H(a, c) x[a - 4Q].
template <int M, int Q>
__device__ __forceinline__ void mix_rows(float (&acc)[M], const float (&x)[4]) {
  const float a0 = x[0] + x[1], a1 = x[0] - x[1], b0 = x[2] + x[3], b1 = x[2] - x[3];
  // pattern i = x0 + s1 x1 + s2 x2 + s3 x3 = A[bit 0] + s2 * B[bit 1 ^ bit 2], A = (a0, a1), B = (b0, b1)
  const float pat[8] = {a0 + b0, a1 + b0, a0 - b1, a1 - b1, a0 + b1, a1 + b1, a0 - b0, a1 - b0};
  mix_terms<M, Q>(acc, pat, std::make_integer_sequence<int, M>{});
}

}  // namespace
}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
