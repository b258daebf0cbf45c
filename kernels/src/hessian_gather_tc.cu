// kernels/src/hessian_gather_tc.cu -- the scaled-row pass of the tensor-core Hessian paths (stage 1b of hessian.cu's
// pipeline): after the host planned the padded groups and uploaded poffsets, write sqrt(c) * x of every routed row
// once, directly in the GEMM input type and layout, zero-padded to the expert's group length, validating x.
// x is fp32, bf16 or fp16 (widened exactly to fp32 on load, so the rows do not depend on x's type for equal values).
#include "element_type.cuh"
#include "hessian_launch.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// The expert of padded row q: the last e with poffsets[e] <= q, so poffsets[e] <= q < poffsets[e + 1] (binary
// search; empty experts have poffsets[e] == poffsets[e + 1] and are skipped by it). q < poffsets[num_experts].
__device__ __forceinline__ int64_t expert_of_padded_row(const int32_t* poffsets, int64_t num_experts, int64_t q) {
  int64_t lo = 0, hi = num_experts;  // poffsets[lo] <= q < poffsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (poffsets[mid] <= q) lo = mid; else hi = mid;
  }
  return lo;
}

// Pass 5, sample-major variant (bf16), scalar: one block per padded row q (grid-stride) of the [row_capacity, ld]
// row matrix, expert e = expert_of_padded_row(q); row r = q - poffsets[e] is sqrt(c) * x[perm[offsets[e] + r]] (one
// fp32 __fmul_rn, the fp32 path's value) rounded once to OutT, or zeros past the expert's count. Takes the inputs
// gather_rows8_kernel cannot (dim not a multiple of 8, or x / ldx not 16-byte aligned).
template <typename InT, typename OutT>
__global__ void __launch_bounds__(256) gather_rows_kernel(const InT* __restrict__ x, int64_t dim, int64_t ldx,
                                                          const float* __restrict__ weights,
                                                          const int32_t* __restrict__ perm, int64_t num_experts,
                                                          const int32_t* __restrict__ offsets,
                                                          const int32_t* __restrict__ poffsets,
                                                          OutT* __restrict__ rows, int64_t ld,
                                                          unsigned long long* __restrict__ flags) {
  const int64_t total = poffsets[num_experts];
  for (int64_t q = blockIdx.x; q < total; q += gridDim.x) {
    const int64_t e = expert_of_padded_row(poffsets, num_experts, q);
    const int64_t r = q - poffsets[e];
    OutT* dst = rows + q * ld;
    if (r >= offsets[e + 1] - offsets[e]) {  // padding: zero rows
      for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) store_f32(dst + j, 0.0f);
      continue;
    }
    const int64_t row = perm[offsets[e] + r];
    const float s = weights ? sqrtf(__ldg(weights + row)) : 1.0f;
    const InT* src = x + row * ldx;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const float v = load_f32(src + j);
      if (!isfinite(v)) atomicMin(flags + 2, static_cast<unsigned long long>(row * dim + j));
      store_f32(dst + j, __fmul_rn(s, v));
    }
  }
}

// Pass 5, sample-major bf16 with 16-byte stores (dim a multiple of 8, ldx a multiple of 16 bytes / sizeof(InT), x
// 16-byte aligned): the same values as gather_rows_kernel, 8 features per thread and step (load8_f32: fp32 x two
// float4 loads, 16-bit x one 16-byte load; then one uint4 store of 8 bf16), two steps' loads issued before their
// stores.
__device__ inline uint4 pack8(float4 a, float4 b) {
  __nv_bfloat162 o[4] = {__floats2bfloat162_rn(a.x, a.y), __floats2bfloat162_rn(a.z, a.w),
                         __floats2bfloat162_rn(b.x, b.y), __floats2bfloat162_rn(b.z, b.w)};
  return *reinterpret_cast<const uint4*>(o);
}
__device__ inline float4 scale4(float s, float4 v) {
  return make_float4(__fmul_rn(s, v.x), __fmul_rn(s, v.y), __fmul_rn(s, v.z), __fmul_rn(s, v.w));
}
__device__ inline void check4(float4 v, int64_t at, unsigned long long* flags) {
  if (!(isfinite(v.x) && isfinite(v.y) && isfinite(v.z) && isfinite(v.w))) {
    const int k = !isfinite(v.x) ? 0 : !isfinite(v.y) ? 1 : !isfinite(v.z) ? 2 : 3;
    atomicMin(flags + 2, static_cast<unsigned long long>(at + k));
  }
}
template <typename InT>
__global__ void __launch_bounds__(256) gather_rows8_kernel(const InT* __restrict__ x, int64_t dim, int64_t ldx,
                                                           const float* __restrict__ weights,
                                                           const int32_t* __restrict__ perm, int64_t num_experts,
                                                           const int32_t* __restrict__ offsets,
                                                           const int32_t* __restrict__ poffsets,
                                                           __nv_bfloat16* __restrict__ rows, int64_t ld,
                                                           unsigned long long* __restrict__ flags) {
  const int64_t total = poffsets[num_experts];
  const int64_t chunks = dim / 8, step = blockDim.x;
  for (int64_t q = blockIdx.x; q < total; q += gridDim.x) {
    const int64_t e = expert_of_padded_row(poffsets, num_experts, q);
    const int64_t r = q - poffsets[e];
    uint4* dst = reinterpret_cast<uint4*>(rows + q * ld);
    if (r >= offsets[e + 1] - offsets[e]) {  // padding: zero rows
      for (int64_t c = threadIdx.x; c < chunks; c += step) dst[c] = make_uint4(0u, 0u, 0u, 0u);
      continue;
    }
    const int64_t row = perm[offsets[e] + r];
    const float s = weights ? sqrtf(__ldg(weights + row)) : 1.0f;
    const InT* src = x + row * ldx;
    for (int64_t c = threadIdx.x; c < chunks; c += 2 * step) {
      const int64_t c2 = c + step;
      float4 a, b, a2 = make_float4(0.f, 0.f, 0.f, 0.f), b2 = a2;
      load8_f32(src + 8 * c, a, b);
      if (c2 < chunks) load8_f32(src + 8 * c2, a2, b2);
      check4(a, row * dim + 8 * c, flags);
      check4(b, row * dim + 8 * c + 4, flags);
      dst[c] = pack8(scale4(s, a), scale4(s, b));
      if (c2 < chunks) {
        check4(a2, row * dim + 8 * c2, flags);
        check4(b2, row * dim + 8 * c2 + 4, flags);
        dst[c2] = pack8(scale4(s, a2), scale4(s, b2));
      }
    }
  }
}

// Pass 5, feature-major variant (tf32): the scaled rows of expert e, transposed: [dim, K_e] with K_e =
// poffsets[e + 1] - poffsets[e] (its group's padded length, a multiple of kTcPadRows), element (f, r) at
// poffsets[e] * dim + f * K_e + r, zeros for r >= the expert's count. Feature-major makes both GEMM operands K-major
// (the "TN" layout), which Hopper's TF32 tensor-core instructions require. One block per tile of kGatherRows padded
// rows x kGatherCols features (a tile never straddles two experts: segments are multiples of kGatherRows), through
// shared memory: coalesced reads of 64 consecutive features of a row of x (256 bytes fp32, 128 bytes 16-bit), coalesced writes along r. The value is sqrt(c) * x (one fp32
// __fmul_rn, the fp32 path's value) rounded once to OutT. Validates x (flag 2) for the routed rows it reads.
constexpr int kGatherRows = 32, kGatherCols = 64, kGatherThreads = 256;
static_assert(kTcPadRows % kGatherRows == 0, "padded segments must be whole gather tiles");
template <typename InT, typename OutT>
__global__ void __launch_bounds__(kGatherThreads) gather_tc_kernel(
    const InT* __restrict__ x, int64_t dim, int64_t ldx, const float* __restrict__ weights,
    const int32_t* __restrict__ perm, int64_t num_experts, const int32_t* __restrict__ offsets,
    const int32_t* __restrict__ poffsets, OutT* __restrict__ rows, unsigned long long* __restrict__ flags) {
  __shared__ float tile[kGatherRows][kGatherCols + 1];
  __shared__ int64_t src[kGatherRows];
  __shared__ float scale[kGatherRows];
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % kGatherCols, ty = tid / kGatherCols;   // loads: a 64-feature row slice per 64 threads
  const int sx = tid % kGatherRows, sy = tid / kGatherRows;   // stores: a 32-sample run per 32 threads
  constexpr int kLoadSteps = kGatherThreads / kGatherCols, kStoreSteps = kGatherThreads / kGatherRows;
  const int64_t row_tiles = poffsets[num_experts] / kGatherRows;
  const int64_t col_tiles = (dim + kGatherCols - 1) / kGatherCols;
  for (int64_t t = blockIdx.x; t < row_tiles * col_tiles; t += gridDim.x) {
    const int64_t q0 = (t / col_tiles) * kGatherRows, f0 = (t % col_tiles) * kGatherCols;
    const int64_t e = expert_of_padded_row(poffsets, num_experts, q0);
    const int64_t seg = poffsets[e], K = poffsets[e + 1] - seg, r0 = q0 - seg;
    const int64_t count = offsets[e + 1] - offsets[e];
    if (tid < kGatherRows) {
      const int64_t r = r0 + tid;
      const int64_t row = r < count ? static_cast<int64_t>(perm[offsets[e] + r]) : -1;
      src[tid] = row;
      scale[tid] = row >= 0 && weights ? sqrtf(__ldg(weights + row)) : 1.0f;  // IEEE sqrt, as the fp32 path
    }
    __syncthreads();
    const int64_t f = f0 + tx;
    for (int k = ty; k < kGatherRows; k += kLoadSteps) {
      const int64_t row = src[k];
      float v = 0.0f;
      if (row >= 0 && f < dim) {
        v = load_f32(x + row * ldx + f);
        if (!isfinite(v)) atomicMin(flags + 2, static_cast<unsigned long long>(row * dim + f));
        v = __fmul_rn(scale[k], v);
      }
      tile[k][tx] = v;
    }
    __syncthreads();
    OutT* out = rows + seg * dim + r0;
    for (int k = sy; k < kGatherCols; k += kStoreSteps) {
      const int64_t ff = f0 + k;
      if (ff < dim) store_f32(out + ff * K + sx, tile[sx][k]);
    }
    __syncthreads();  // tile, src and scale are rewritten by the next iteration
  }
}

}  // namespace

cudaError_t launch_hessian_gather_tc(const void* x, ElementType x_type, int64_t dim, int64_t ldx, const float* weights,
                                     int64_t num_experts, void* workspace, const HessianLayout& layout,
                                     cudaStream_t stream) {
  const HessianWorkspace ws = carve_hessian(workspace, layout);
  if (layout.feature_major) {  // tf32
    const int64_t tiles = layout.row_capacity / kGatherRows * ((dim + kGatherCols - 1) / kGatherCols);
    dispatch_element(x_type, [&](auto tag) {
      using InT = typename decltype(tag)::type;
      gather_tc_kernel<<<grid_for(tiles, 1), kGatherThreads, 0, stream>>>(
          static_cast<const InT*>(x), dim, ldx, weights, ws.perm, num_experts, ws.offsets, ws.poffsets,
          static_cast<float*>(ws.rows), ws.flags);
    });
    return cudaGetLastError();
  }
  // bf16: 16-byte loads and stores when dim is a multiple of 8 and every row start of x is 16-byte aligned, else
  // the scalar kernel.
  const bool vec8 = dim % 8 == 0 && (ldx * static_cast<int64_t>(element_size(x_type))) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const unsigned grid = grid_for(layout.row_capacity, 1);
  auto* out = static_cast<__nv_bfloat16*>(ws.rows);
  dispatch_element(x_type, [&](auto tag) {
    using InT = typename decltype(tag)::type;
    const InT* xt = static_cast<const InT*>(x);
    if (vec8) {
      gather_rows8_kernel<InT><<<grid, dim >= 2048 ? 256 : 128, 0, stream>>>(
          xt, dim, ldx, weights, ws.perm, num_experts, ws.offsets, ws.poffsets, out, layout.ld, ws.flags);
    } else {
      gather_rows_kernel<InT, __nv_bfloat16><<<grid, dim >= 1024 ? 256 : 128, 0, stream>>>(
          xt, dim, ldx, weights, ws.perm, num_experts, ws.offsets, ws.poffsets, out, layout.ld, ws.flags);
    }
  });
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
