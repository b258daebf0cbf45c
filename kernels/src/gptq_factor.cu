// kernels/src/gptq_factor.cu -- the batched factorisation of the GPTQ solver (see gptq_batched.cu for the
// formulation): A = J Hp J + lambda I, left-looking blocked Cholesky (diagonal blocks here, off-diagonal SGEMMs in
// gptq_api.cpp), blocked triangular inverse (diagonal blocks here), and the reversal U = J L^-1 J.
#include "gptq_workspace.cuh"
#include "launch.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// ---- factorisation ------------------------------------------------------------------------------------------------
// Helpers of the two diagonal-block kernels below. A block is bk x bk, column-major; the kernels keep its two work
// arrays A (the block) and X (its inverse) in shared memory (ld bk + 1) or, where the device's shared memory is too
// small (S < 2, smem_plan.h), in global memory with their own leading dimensions (ldA, ldX; the pointers start at
// the block, so indices stay below 128 * 65536). The arithmetic is the same either way. tid / nt are the thread and block size, tx = tid % 32, ty = tid / 32, ny = nt / 32.

// sA = the block of a at (k0, k0) (a column-major with ld C) when copy_a (else sA is that block itself); sX = I.
__device__ __forceinline__ void load_block_and_identity(const float* a, int64_t C, int64_t k0, int bk, bool copy_a,
                                                        float* sA, int ldA, float* sX, int ldX, int tid,
                                                        int nt) {
  for (int idx = tid; idx < bk * bk; idx += nt) {
    const int j = idx / bk, i = idx - j * bk;
    if (copy_a) sA[j * ldA + i] = a[(k0 + j) * C + k0 + i];
    sX[j * ldX + i] = i == j ? 1.0f : 0.0f;
  }
}

// sX = L^-1 for the lower triangle L of sA (sX = I on entry) by column-oriented forward elimination: row p is final
// once divided by L(p, p). Ends with a __syncthreads().
__device__ __forceinline__ void invert_lower_block(const float* sA, int ldA, float* sX, int ldX, int bk,
                                                   int tid, int nt, int tx, int ty, int ny) {
  for (int p = 0; p < bk; ++p) {
    const float dp = sA[p * ldA + p];
    for (int c = tid; c <= p; c += nt) sX[c * ldX + p] /= dp;
    __syncthreads();
    for (int c = ty; c <= p; c += ny) {
      const float xpc = sX[c * ldX + p];
      for (int i = p + 1 + tx; i < bk; i += 32) sX[c * ldX + i] = fmaf(-sA[p * ldA + i], xpc, sX[c * ldX + i]);
    }
    __syncthreads();
  }
}

// A(i, j) at j * C + i (column-major) = Hp(C-1-i, C-1-j) = h0(perm[C-1-i], perm[C-1-j]) (h0 is symmetric, read as
// h0[pj * C + pi] so that consecutive i read consecutive addresses without act-order).
__global__ void __launch_bounds__(256) build_kernel(float* __restrict__ A, const float* __restrict__ h0, int64_t C,
                                                    int64_t e0, const int32_t* __restrict__ perm,
                                                    const uint8_t* __restrict__ dead, const double* __restrict__ mean,
                                                    double frac) {
  const int64_t e = e0 + blockIdx.z, j = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= C) return;
  const int64_t pi = perm ? perm[e * C + (C - 1 - i)] : C - 1 - i;
  const int64_t pj = perm ? perm[e * C + (C - 1 - j)] : C - 1 - j;
  float v = h0[e * C * C + pj * C + pi];
  if (i == j) {
    const double d = dead[e * C + pi] ? 1.0 : static_cast<double>(v);
    v = static_cast<float>(d + frac * mean[e]);
  }
  A[e * C * C + j * C + i] = v;
}

// One block per expert: factorise the bk x bk diagonal block at (k0, k0) (already updated by the left-looking
// GEMM), write L11 back (lower part) and L11^-1 (column-major, ld kCholBlock) to dinv. S work arrays in shared memory
// (smem_plan.h): 2 both; 1 A only, X built in dinv directly; 0 also A, factorised in place in `a`.
template <int S>
__global__ void __launch_bounds__(256) chol_diag_kernel(float* __restrict__ A, int64_t C, int64_t k0, int bk, int64_t e0,
                                                        float* __restrict__ dinv, int32_t* __restrict__ fail) {
  extern __shared__ float smem[];
  const int64_t e = e0 + blockIdx.x;
  float* a = A + e * C * C;
  float* di = dinv + e * kCholBlock * kCholBlock;
  const int ldA = S >= 1 ? bk + 1 : static_cast<int>(C), ldX = S == 2 ? bk + 1 : kCholBlock;
  float* sA = S >= 1 ? smem : a + k0 * C + k0;     // column-major, ld ldA
  float* sX = S == 2 ? smem + bk * (bk + 1) : di;  // inverse, column-major, ld ldX
  const int tid = threadIdx.x, tx = tid & 31, ty = tid >> 5, nt = blockDim.x, ny = nt >> 5;
  load_block_and_identity(a, C, k0, bk, S >= 1, sA, ldA, sX, ldX, tid, nt);
  bool failed = false;  // the same in every thread: all read the same pivots
  __syncthreads();
  for (int p = 0; p < bk; ++p) {
    float piv = sA[p * ldA + p];
    const bool bad = !(piv > 0.0f) || !isfinite(piv);  // the same value in every thread
    if (bad) piv = 1.0f;
    failed = failed || bad;
    const float d = sqrtf(piv), inv = 1.0f / d;
    __syncthreads();  // everyone has read the pivot
    for (int i = p + 1 + tid; i < bk; i += nt) sA[p * ldA + i] *= inv;
    if (tid == 0) sA[p * ldA + p] = d;
    __syncthreads();
    for (int j = p + 1 + ty; j < bk; j += ny) {
      const float lj = sA[p * ldA + j];
      for (int i = j + tx; i < bk; i += 32) sA[j * ldA + i] = fmaf(-sA[p * ldA + i], lj, sA[j * ldA + i]);
    }
    __syncthreads();
  }
  invert_lower_block(sA, ldA, sX, ldX, bk, tid, nt, tx, ty, ny);  // X = L^-1
  for (int idx = tid; idx < bk * bk; idx += nt) {
    const int j = idx / bk, i = idx - j * bk;
    if (i >= j) a[(k0 + j) * C + k0 + i] = failed ? (i == j ? 1.0f : 0.0f) : sA[j * ldA + i];
    di[j * kCholBlock + i] = failed ? (i == j ? 1.0f : 0.0f) : sX[j * ldX + i];
  }
  if (failed && tid == 0) fail[e] = 1;
}

__global__ void __launch_bounds__(256) panel_copy_kernel(float* __restrict__ A, const float* __restrict__ panel,
                                                         int64_t C, int64_t k0, int64_t k1, int64_t e0) {
  const int64_t e = e0 + blockIdx.z, jj = blockIdx.y;
  const int64_t i = k1 + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= C) return;
  A[e * C * C + (k0 + jj) * C + i] = panel[e * C * kCholBlock + jj * C + i];
}

// Zeroes the strict upper part (i < j, memory j * C + i) of the column-major factor: the inverse's GEMMs read the
// triangular blocks as full squares.
__global__ void __launch_bounds__(256) zero_upper_kernel(float* __restrict__ A, int64_t C, int64_t e0) {
  const int64_t e = e0 + blockIdx.z, j = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < j) A[e * C * C + j * C + i] = 0.0f;
}

// Block (b, e): the kCholBlock diagonal block b of L (lower, column-major) is replaced by its inverse (lower). S work
// arrays in shared memory as in chol_diag_kernel: with S < 2 the inverse is built in `scratch` (the panel region of
// the workspace: kCholBlock x kCholBlock floats per block, C x kCholBlock per expert), with S = 0 L is read where it
// is (the final copy follows the last __syncthreads of the inverse, so no thread still reads it).
template <int S>
__global__ void __launch_bounds__(256) diag_inverse_kernel(float* __restrict__ A, int64_t C, int64_t e0,
                                                           float* __restrict__ scratch) {
  extern __shared__ float smem[];
  const int64_t e = e0 + blockIdx.y, k0 = static_cast<int64_t>(blockIdx.x) * kCholBlock;
  const int bk = static_cast<int>(C - k0 < kCholBlock ? C - k0 : kCholBlock);
  float* a = A + e * C * C;
  const int ldA = S >= 1 ? bk + 1 : static_cast<int>(C), ldX = S == 2 ? bk + 1 : kCholBlock;
  float* sA = S >= 1 ? smem : a + k0 * C + k0;
  float* sX = S == 2 ? smem + bk * (bk + 1) : scratch + e * C * kCholBlock + k0 * kCholBlock;
  const int tid = threadIdx.x, tx = tid & 31, ty = tid >> 5, nt = blockDim.x, ny = nt >> 5;
  load_block_and_identity(a, C, k0, bk, S >= 1, sA, ldA, sX, ldX, tid, nt);
  __syncthreads();
  invert_lower_block(sA, ldA, sX, ldX, bk, tid, nt, tx, ty, ny);
  for (int idx = tid; idx < bk * bk; idx += nt) {
    const int j = idx / bk, i = idx - j * bk;
    a[(k0 + j) * C + k0 + i] = i >= j ? sX[j * ldX + i] : 0.0f;
  }
}

// In place: U[p] = X[C^2 - 1 - p] (pairs p, C^2 - 1 - p swap): with X = L^-1 column-major, U(k, j) = X(C-1-k, C-1-j)
// lands at j * C + k. rbad[e] = 1 when an upper entry (k <= j) is non-finite or a diagonal entry is not > 0.
__global__ void __launch_bounds__(256) reverse_kernel(float* __restrict__ A, int64_t C, int64_t e0,
                                                      int32_t* __restrict__ rbad) {
  const int64_t e = e0 + blockIdx.y, n2 = C * C, half = (n2 + 1) / 2;
  float* a = A + e * n2;
  bool bad = false;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < half; p += stride) {
    const int64_t q = n2 - 1 - p;
    const float vp = a[p], vq = a[q];
    const int64_t jp = p / C, kp = p - jp * C, jq = q / C, kq = q - jq * C;
    if (kp <= jp && !isfinite(vq)) bad = true;
    if (kq <= jq && !isfinite(vp)) bad = true;
    if (kp == jp && !(vq > 0.0f)) bad = true;
    if (kq == jq && !(vp > 0.0f)) bad = true;
    a[p] = vq;
    a[q] = vp;
  }
  if (bad) rbad[e] = 1;
}

template <int S>
cudaError_t launch_chol_diag_s(float* H, int64_t cols, int64_t k0, int bk, int64_t e0, int64_t n, const Ws& ws,
                               cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(S) * chol_array_bytes(bk);
  const cudaError_t err = raise_smem_limit(chol_diag_kernel<S>, smem);
  if (err != cudaSuccess) return err;
  chol_diag_kernel<S><<<static_cast<unsigned>(n), 256, smem, stream>>>(H, cols, k0, bk, e0, ws.dinv, ws.fail);
  return cudaGetLastError();
}

template <int S>
cudaError_t launch_diag_inverse_s(float* H, int64_t cols, int64_t e0, int64_t n, const Ws& ws, cudaStream_t stream) {
  const int bk = static_cast<int>(cols < kCholBlock ? cols : kCholBlock);
  const size_t smem = static_cast<size_t>(S) * chol_array_bytes(bk);
  const cudaError_t err = raise_smem_limit(diag_inverse_kernel<S>, smem);
  if (err != cudaSuccess) return err;
  diag_inverse_kernel<S><<<dim3(static_cast<unsigned>((cols + kCholBlock - 1) / kCholBlock), static_cast<unsigned>(n)),
                           256, smem, stream>>>(H, cols, e0, ws.panel);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_gptq_build(float* H, int64_t cols, int64_t e0, int64_t n, double frac, bool act_order,
                              void* workspace, const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  cudaError_t err = cudaMemsetAsync(ws.fail + e0, 0, static_cast<size_t>(n) * 4, stream);
  if (err != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(ws.rbad + e0, 0, static_cast<size_t>(n) * 4, stream)) != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(cols), static_cast<unsigned>(n));
  build_kernel<<<grid, 256, 0, stream>>>(H, ws.h0, cols, e0, act_order ? ws.perm : nullptr, ws.dead, ws.mean, frac);
  return cudaGetLastError();
}

cudaError_t launch_chol_diag(float* H, int64_t cols, int64_t k0, int bk, int64_t e0, int64_t n, void* workspace,
                             const GptqLayout& l, const GptqSmemPlan& sp, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  switch (sp.chol_shared) {
    case 2: return launch_chol_diag_s<2>(H, cols, k0, bk, e0, n, ws, stream);
    case 1: return launch_chol_diag_s<1>(H, cols, k0, bk, e0, n, ws, stream);
    case 0: return launch_chol_diag_s<0>(H, cols, k0, bk, e0, n, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_chol_panel_copy(float* H, int64_t cols, int64_t k0, int64_t k1, int bk, int64_t e0, int64_t n,
                                   void* workspace, const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  const dim3 grid(static_cast<unsigned>((cols - k1 + 255) / 256), static_cast<unsigned>(bk), static_cast<unsigned>(n));
  panel_copy_kernel<<<grid, 256, 0, stream>>>(H, ws.panel, cols, k0, k1, e0);
  return cudaGetLastError();
}

cudaError_t launch_gptq_invert_prepare(float* H, int64_t cols, int64_t e0, int64_t n, void* workspace,
                                       const GptqLayout& l, const GptqSmemPlan& sp, cudaStream_t stream) {
  zero_upper_kernel<<<dim3(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(cols),
                           static_cast<unsigned>(n)),
                      256, 0, stream>>>(H, cols, e0);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const Ws ws = carve(workspace, l);
  switch (sp.chol_shared) {
    case 2: return launch_diag_inverse_s<2>(H, cols, e0, n, ws, stream);
    case 1: return launch_diag_inverse_s<1>(H, cols, e0, n, ws, stream);
    case 0: return launch_diag_inverse_s<0>(H, cols, e0, n, ws, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_gptq_finish_factor(float* H, int64_t cols, int64_t e0, int64_t n, void* workspace,
                                      const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  const int64_t half = (cols * cols + 1) / 2;
  reverse_kernel<<<dim3(grid_for(half, 256 * 4), static_cast<unsigned>(n)), 256, 0, stream>>>(H, cols, e0, ws.rbad);
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
