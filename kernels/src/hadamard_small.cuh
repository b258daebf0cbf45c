// kernels/src/hadamard_small.cuh -- the general Hadamard kernel of hadamard.cu for p = 2^k < 32 (n = 1..16 and
// m * 1..16): rows in shared memory, three index bits per pass, then the m x m mix with signs from a table in
// constant memory. Included by hadamard.cu only.
#pragma once

#include "hadamard_device.cuh"

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// Bit c of masks[t][r] is set when entry (r, c) of table t (orders 12, 20, 28, 40) is -1. Built at compile time
// from the strings of hadamard_tables.h.
struct SignMasks {
  uint64_t v[4][40];
};
constexpr SignMasks make_masks() {
  SignMasks mk{};
  constexpr int orders[4] = {12, 20, 28, 40};
  for (int t = 0; t < 4; ++t) {
    const int m = orders[t];
    const char* s = hadamard_tables::table(m);
    for (int r = 0; r < m; ++r) {
      uint64_t bits = 0;
      for (int c = 0; c < m; ++c)
        if (s[r * m + c] == '-') bits |= uint64_t{1} << c;
      mk.v[t][r] = bits;
    }
  }
  return mk;
}
__constant__ SignMasks c_masks = make_masks();

// One pass over index bits [s, s + NB) of every power-of-two segment in the CTA's `total` elements.
template <int NB>
__device__ inline void butterfly_pass(float* sm, int total, int s) {
  constexpr int R = 1 << NB;
  const int items = total >> NB;  // total is a multiple of p >= 2^(s + NB)
  const int low_mask = (1 << s) - 1;
  for (int t = threadIdx.x; t < items; t += blockDim.x) {
    // t = (segment, high, low): insert NB zero bits at position s
    const int low = t & low_mask, high = t >> s;  // high also carries the segment index (p-aligned)
    const int base = (high << (s + NB)) | low;
    float v[R];
#pragma unroll
    for (int r = 0; r < R; ++r) v[r] = sm[base + (r << s)];
    butterflies<0, NB>(v);
#pragma unroll
    for (int r = 0; r < R; ++r) sm[base + (r << s)] = v[r];
  }
}

// Mix across the M segments of each row: out[c * p + b] = scale * sum_a sign(a, c) * X[a][b].
template <int M, typename T>
__device__ inline void mix_store(const float* sm, T* out, int rows_here, int p, int n, int table, float scale) {
  const int work = rows_here * p;
  for (int t = threadIdx.x; t < work; t += blockDim.x) {
    const int row = t / p, b = t - row * p;
    const float* xr = sm + row * n + b;
    float y[M];
#pragma unroll
    for (int a = 0; a < M; ++a) y[a] = xr[a * p];
    T* o = out + static_cast<int64_t>(row) * n + b;
#pragma unroll 4
    for (int c = 0; c < M; ++c) {
      float acc = 0.0f;
#pragma unroll
      for (int a = 0; a < M; ++a) {
        const bool neg = (c_masks.v[table][a] >> c) & 1u;
        acc += neg ? -y[a] : y[a];
      }
      o[static_cast<int64_t>(c) * p] = from_f32<T>(acc * scale);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(512) hadamard_kernel(const T* __restrict__ x, T* out, int64_t rows, int n, int m,
                                                        int logp, int rpc, float scale) {
  extern __shared__ float sm[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rpc;
  const int rows_here = static_cast<int>(rows - row0 < rpc ? rows - row0 : rpc);
  const int total = rows_here * n;
  const T* src = x + row0 * n;
  for (int i = threadIdx.x; i < total; i += blockDim.x) sm[i] = to_f32(src[i]);
  __syncthreads();
  for (int s = 0; s < logp; s += 3) {
    const int nb = logp - s < 3 ? logp - s : 3;
    if (nb == 3) butterfly_pass<3>(sm, total, s);
    else if (nb == 2) butterfly_pass<2>(sm, total, s);
    else butterfly_pass<1>(sm, total, s);
    __syncthreads();
  }
  T* dst = out + row0 * n;
  const int p = 1 << logp;
  switch (m) {  // 40 * 2^k is decomposed as 20 * 2^(k+1) (hadamard_tables::decompose), so m is 1, 12, 20 or 28
    case 12: mix_store<12>(sm, dst, rows_here, p, n, 0, scale); break;
    case 20: mix_store<20>(sm, dst, rows_here, p, n, 1, scale); break;
    case 28: mix_store<28>(sm, dst, rows_here, p, n, 2, scale); break;
    default:
      for (int i = threadIdx.x; i < total; i += blockDim.x) dst[i] = from_f32<T>(sm[i] * scale);
  }
}

}  // namespace
}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
