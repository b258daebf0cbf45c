// kernels/src/gptq_batched.cu -- batched GPTQ kernels: all experts of one projection at once.
//
// Formulation (docs/kernels.md, "batched GPTQ"): the CPU solver's, per expert. Hp = P^T H P (act-order permutation,
// dead diagonal = 1, damped); U = upper Cholesky factor of Hp^-1 = J L^-1 J with L = chol(J Hp J) (J the reversal):
// one Cholesky and one triangular inverse (the CPU's "reversed-order" route), both batched over the experts.
// The column loop is the CPU's: e_j = (w_j - q_j) / U_jj, w[:, j+1:i2] -= e_j U[j, j+1:i2] inside the block, then the
// lazy update dW[:, i2:] -= E_blk U[i1:i2, i2:] (one strided-batched SGEMM). dW holds the accumulated lazy updates
// (w = W0 + dW, W0 the dead-zeroed original in processing order), so group parameters computed at a group's first
// column see exactly what the CPU sees: in-block columns with the in-block updates, later columns the lazy ones.
// (A Cholesky-only form w_j = W0_j + sum_m D_m R(m, j) / R(j, j) with Hp = R R^T reaches the same w_j at column j
// but different *intermediate* values, so its in-loop group parameters differ; hence the inverse.)
//
// Pieces here (the driver with the cuBLAS calls is gptq_api.cpp):
//   prepare_h_kernel  H -> h0 symmetrised from H's lower triangle (32x32 tiles), validation, dead flags
//   prepare_w_kernel  validates W; act-order: dw = dead-zeroed W (static group parameters come from it)
//   stats / rank      mean of the fixed diagonal (double, fixed order); act-order permutation (stable ranks)
//   (gptq_factor.cu)  build_kernel: A = J Hp J + lambda I (column-major, in the caller's H buffer)
//   chol_diag_kernel  left-looking blocked Cholesky, diagonal block: unblocked factorisation + inverse in shared
//                     memory (the off-diagonal GEMMs are cuBLAS), pivot check -> fail flag; on devices with less
//                     than 129 KiB of shared memory per block one or both arrays live in global memory (smem_plan.h)
//   inverse kernels   zero the strict upper part, invert the 128-diagonal blocks in place; the off-diagonal blocks
//                     come from the recursion X21 = -X22 L21 X11 (cuBLAS, gptq_api.cpp)
//   reverse_kernel    U = J X J as an in-place reversal of the array, check (finite, positive diagonal)
//   permute_w_kernel  act-order: dw = the dead-zeroed W in processing order (one block per row, gathered from the
//                     row once), so that every column block below reads and writes contiguous columns
//   gptq_block_kernel one warp per RW rows, lane = column of the block: the block's columns live in registers,
//                     column j is broadcast with shuffles, every lane quantizes redundantly (no __syncthreads in the
//                     column loop), the owner lane keeps e / q / dequantized; U's block sits in shared memory (or,
//                     below 64.5 KiB of shared memory per block, is read from global memory). Act-order: w = dw (W0
//                     plus the lazy updates, accumulated there by the trailing SGEMM), codes and dequantized values
//                     written in processing order (codes, and dw's own block columns)
//   unpermute_kernel  act-order, after the loop: codes and dequantized values back to the original column order
//   loss kernels      D = W - Q, then (after a per-expert SSYRK) sum h0 .* (D^T D) in double
#include "gptq_workspace.cuh"
#include "launch.h"
#include "quant_device.cuh"

#include <cuda_runtime.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// ---- quant.h arithmetic, operation for operation (quant_device.cuh, shared with quant_pack.cu) ------------------
using QP = QParamsT<float>;  // zero point kept as float for the arithmetic

__device__ inline float quantize_code(float x, const QP& p, float qmin, float qmax) {
  return std_min(std_max(rintf(__fadd_rn(__fdiv_rn(x, p.scale), p.zero)), qmin), qmax);
}

// ---- prepare ----------------------------------------------------------------------------------------------------
constexpr int kTile = 32;

// Output tile (tr, tc) of h0: entries (r, c) with r >= c come from H[r][c], the others from H[c][r]. Every block also
// validates its own tile of H (so every entry of H is checked once, as the CPU checks the whole matrix).
__global__ void __launch_bounds__(kTile * 8) prepare_h_kernel(const float* __restrict__ H, int64_t C,
                                                              float* __restrict__ h0, uint8_t* __restrict__ dead,
                                                              unsigned long long* __restrict__ flags) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t e = blockIdx.z, tr = blockIdx.y, tc = blockIdx.x;
  const float* h = H + e * C * C;
  float* o = h0 + e * C * C;
  const int tx = threadIdx.x, ty = threadIdx.y;
  float own[kTile / 8];
#pragma unroll
  for (int k = 0; k < kTile / 8; ++k) {
    const int64_t r = tr * kTile + ty + 8 * k, c = tc * kTile + tx;
    own[k] = 0.0f;
    if (r < C && c < C) {
      const float v = h[r * C + c];
      own[k] = v;
      if (!isfinite(v)) atomicMin(flags + 1, static_cast<unsigned long long>((e * C + r) * C + c));
      if (r == c) {
        if (v < 0.0f) atomicMin(flags + 2, static_cast<unsigned long long>(e * C + r));
        dead[e * C + r] = v == 0.0f ? 1 : 0;
      }
    }
  }
  // mirror source: the transposed tile (tc, tr) for tiles above the diagonal, the own tile on the diagonal
  if (tr <= tc) {
#pragma unroll
    for (int k = 0; k < kTile / 8; ++k) {
      const int64_t r = tc * kTile + ty + 8 * k, c = tr * kTile + tx;
      tile[ty + 8 * k][tx] = (r < C && c < C) ? h[r * C + c] : 0.0f;
    }
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kTile / 8; ++k) {
    const int64_t r = tr * kTile + ty + 8 * k, c = tc * kTile + tx;
    if (r < C && c < C) o[r * C + c] = r >= c ? own[k] : tile[tx][ty + 8 * k];
  }
}

__global__ void __launch_bounds__(256) prepare_w_kernel(const float* __restrict__ W, int64_t E, int64_t rows,
                                                        int64_t C, const uint8_t* __restrict__ dead,
                                                        float* __restrict__ dw, unsigned long long* __restrict__ flags) {
  const int64_t total = E * rows * C, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const float v = W[i];
    if (!isfinite(v)) atomicMin(flags + 0, static_cast<unsigned long long>(i));
    if (dw) {
      const int64_t c = i % C, e = i / (rows * C);
      dw[i] = dead[e * C + c] ? 0.0f : v;
    }
  }
}

// One block per expert: mean of the fixed diagonal in double, a fixed-shape tree (deterministic).
__global__ void __launch_bounds__(256) stats_kernel(const float* __restrict__ h0, int64_t C,
                                                    const uint8_t* __restrict__ dead, double* __restrict__ mean) {
  __shared__ double part[256];
  const int64_t e = blockIdx.x;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < C; i += blockDim.x)
    s += dead[e * C + i] ? 1.0 : static_cast<double>(h0[e * C * C + i * C + i]);
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = 128; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) mean[e] = part[0] / static_cast<double>(C);
}

// perm[rank(i)] = i with rank(i) = #{k : d_k > d_i or (d_k == d_i and k < i)}: descending diagonal, ties in
// column order (a stable sort). d = fixed diagonal (dead -> 1). O(C^2) comparisons per expert, through smem tiles.
__global__ void __launch_bounds__(256) rank_kernel(const float* __restrict__ h0, int64_t C,
                                                   const uint8_t* __restrict__ dead, int32_t* __restrict__ perm,
                                                   int32_t* __restrict__ inv) {
  __shared__ float tile[256];
  const int64_t e = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float* h = h0 + e * C * C;
  const float di = i < C ? (dead[e * C + i] ? 1.0f : h[i * C + i]) : 0.0f;
  int64_t rank = 0;
  for (int64_t k0 = 0; k0 < C; k0 += 256) {
    const int64_t k = k0 + threadIdx.x;
    tile[threadIdx.x] = k < C ? (dead[e * C + k] ? 1.0f : h[k * C + k]) : 0.0f;
    __syncthreads();
    const int64_t kn = C - k0 < 256 ? C - k0 : 256;
    for (int64_t t = 0; t < kn; ++t) {
      const float dk = tile[t];
      rank += (dk > di || (dk == di && k0 + t < i)) ? 1 : 0;
    }
    __syncthreads();
  }
  if (i < C) {
    perm[e * C + rank] = static_cast<int32_t>(i);
    inv[e * C + i] = static_cast<int32_t>(rank);
  }
}

// dw[row, k] = dead[perm[k]] ? 0 : W[row, perm[k]]: one block per row of one expert (the row's gathers hit L1 / L2).
__global__ void __launch_bounds__(256) permute_w_kernel(const float* __restrict__ W, int64_t rows, int64_t C,
                                                        const int32_t* __restrict__ perm,
                                                        const uint8_t* __restrict__ dead, float* __restrict__ dw) {
  const int64_t row = blockIdx.x, e = row / rows;
  const int32_t* pe = perm + e * C;
  const uint8_t* de = dead + e * C;
  for (int64_t k = threadIdx.x; k < C; k += blockDim.x) {
    const int32_t o = pe[k];
    dw[row * C + k] = de[o] ? 0.0f : W[row * C + o];
  }
}

// codes[row, j] = codes'[row, inv[j]] (in place through shared memory: the row's C bytes), deq[row, j] =
// dw[row, inv[j]]: from processing order to the original columns, one block per row.
__global__ void __launch_bounds__(256) unpermute_kernel(int64_t rows, int64_t C, const int32_t* __restrict__ inv,
                                                        int8_t* __restrict__ codes, const float* __restrict__ dw,
                                                        float* __restrict__ deq) {
  extern __shared__ int8_t row_codes[];
  const int64_t row = blockIdx.x, e = row / rows;
  const int32_t* ie = inv + e * C;
  for (int64_t k = threadIdx.x; k < C; k += blockDim.x) row_codes[k] = codes[row * C + k];
  __syncthreads();
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const int32_t k = ie[j];
    codes[row * C + j] = row_codes[k];
    deq[row * C + j] = dw[row * C + k];
  }
}

// ---- the column loop ----------------------------------------------------------------------------------------------
constexpr int kBlockWarps = 8;
constexpr int kSlots = kGptqMaxBlock / kWarp;  // register slots per lane: columns lane + 32 s

// SMEM: U's diagonal block is copied into shared memory (bw x (bw + 1) floats); otherwise (a device or a forced limit
// with less shared memory, smem_plan.h) the kernel reads the same values from Rt where they are. Same arithmetic.
template <bool ACT, int RW, bool SMEM>
__global__ void __launch_bounds__(kBlockWarps * kWarp, 1) gptq_block_kernel(
    const float* __restrict__ W, const float* __restrict__ Rt, float* __restrict__ dW, float* __restrict__ Dblk,
    const int32_t* __restrict__ perm, const uint8_t* __restrict__ dead, float* __restrict__ scales,
    int32_t* __restrict__ zeros, int8_t* __restrict__ codes, float* __restrict__ deq, int64_t rows, int64_t C,
    int64_t gs, int64_t i1, int bw, int ldd, RtnParams qs) {
  extern __shared__ float smem[];
  const int64_t e = blockIdx.y, ng = C / gs;
  const float* rt = Rt + e * C * C;
  // sR[c * LDR + j] = U(i1 + j, i1 + c) (rt[(i1 + c) * C + i1 + j])
  const int LDR = SMEM ? bw + 1 : static_cast<int>(C);
  const float* sR = SMEM ? smem : rt + i1 * C + i1;
  if constexpr (SMEM) {
    for (int idx = threadIdx.x; idx < bw * bw; idx += blockDim.x) {
      const int c = idx / bw, j = idx - c * bw;
      smem[c * LDR + j] = rt[(i1 + c) * C + i1 + j];
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kBlockWarps + warp) * RW;
  if (r0 >= rows) return;  // whole warp (no block-level barrier follows)
  const float qmin = static_cast<float>(-(1 << (qs.bits - 1))), qmax = static_cast<float>((1 << (qs.bits - 1)) - 1);
  const int32_t* pe = perm ? perm + e * C : nullptr;
  const uint8_t* de = dead + e * C;

  float wv[RW][kSlots], w0[RW][kSlots];  // current w; after processing: wv = e (scaled error), w0 = dequantized
  float sc[ACT ? RW : 1][ACT ? kSlots : 1], zp[ACT ? RW : 1][ACT ? kSlots : 1];
  uint32_t qb[RW];  // codes of the 4 slots, one byte each
  int32_t orig[kSlots];  // original column of each slot (cols <= 65535)
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int c = lane + kWarp * s;
    orig[s] = c < bw ? (pe ? pe[i1 + c] : static_cast<int32_t>(i1 + c)) : 0;
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      const int64_t r = r0 + i;
      const bool ok = c < bw && r < rows;
      const int64_t row = e * rows + r;
      if constexpr (ACT) {  // dW: W0 in processing order (dead columns zero) plus the lazy updates
        wv[i][s] = ok ? dW[row * C + i1 + c] : 0.0f;
        w0[i][s] = 0.0f;
      } else {
        const bool dd = c < bw ? de[orig[s]] != 0 : true;
        const float x0 = ok && !dd ? W[row * C + orig[s]] : 0.0f;
        const float delta = ok && i1 > 0 ? dW[row * C + i1 + c] : 0.0f;
        w0[i][s] = x0;
        wv[i][s] = x0 + delta;
      }
      if constexpr (ACT) {
        const int64_t g = orig[s] / gs;
        sc[i][s] = ok ? scales[row * ng + g] : 1.0f;
        zp[i][s] = ok ? static_cast<float>(zeros[row * ng + g]) : 0.0f;
      }
    }
  }
  QP cur[ACT ? 1 : RW];
  if constexpr (!ACT) {
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      cur[i] = QP{1.0f, 0.0f};
      const int64_t r = r0 + i;
      if (i1 % gs != 0 && r < rows) {  // the block starts inside a group: its parameters exist already
        const int64_t pi = (e * rows + r) * ng + i1 / gs;
        cur[i] = QP{scales[pi], static_cast<float>(zeros[pi])};
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RW; ++i) qb[i] = 0;

#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    for (int l = 0; l < kWarp; ++l) {
      const int jj = kWarp * s + l;
      if (jj >= bw) break;  // warp-uniform
      const int64_t j = i1 + jj;
      if constexpr (!ACT) {
        if (j % gs == 0) {  // a group starts: parameters from the current (updated) columns [j, j + gs)
          const int64_t gend = j + gs, i2 = i1 + bw;
#pragma unroll
          for (int i = 0; i < RW; ++i) {
            float lo = 0.0f, hi = 0.0f;
#pragma unroll
            for (int s2 = 0; s2 < kSlots; ++s2) {
              const int c2 = lane + kWarp * s2;
              if (c2 >= jj && c2 < bw && i1 + c2 < gend) {
                lo = std_min(lo, wv[i][s2]);
                hi = std_max(hi, wv[i][s2]);
              }
            }
            const int64_t r = r0 + i;
            if (r < rows) {  // warp-uniform
              const int64_t row = e * rows + r;
              // Columns past the block hold the lazy updates only; as on the CPU, the block's pending updates from
              // its processed columns [i1, j) are applied to them first: v -= sum_m e_m U(m, c) (the e_m live in
              // the owner lanes' wv registers and are broadcast by shuffles).
              for (int64_t cb = i2; cb < gend; cb += kWarp) {
                const int64_t c = cb + lane;
                const bool valid = c < gend;
                float v = valid ? (de[c] ? 0.0f : W[row * C + c]) + (i1 > 0 ? dW[row * C + c] : 0.0f) : 0.0f;
#pragma unroll
                for (int s3 = 0; s3 < kSlots; ++s3) {
                  for (int l3 = 0; l3 < kWarp; ++l3) {
                    if (kWarp * s3 + l3 >= jj) break;  // warp-uniform
                    const float em = __shfl_sync(kFullMask, wv[i][s3], l3);
                    if (valid) v = fmaf(-em, rt[c * C + i1 + kWarp * s3 + l3], v);
                  }
                }
                if (valid) {
                  lo = std_min(lo, v);
                  hi = std_max(hi, v);
                }
              }
            }
#pragma unroll
            for (int off = 16; off > 0; off /= 2) {
              lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
              hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
            }
            cur[i] = qparams_from_range<float>(lo, hi, qs);
            if (lane == 0 && r < rows) {
              const int64_t pi = (e * rows + r) * ng + j / gs;
              scales[pi] = cur[i].scale;
              zeros[pi] = static_cast<int32_t>(cur[i].zero);
            }
          }
        }
      }
      float d[RW];
      const float ujj = sR[jj * LDR + jj];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const float w = __shfl_sync(kFullMask, wv[i][s], l);
        QP p;
        if constexpr (ACT) {
          p.scale = __shfl_sync(kFullMask, sc[i][s], l);
          p.zero = __shfl_sync(kFullMask, zp[i][s], l);
        } else {
          p = cur[i];
        }
        const float q = quantize_code(w, p, qmin, qmax);
        // + 0: rintf of a small negative value is -0.0, which the CPU's integer code (quant.h) dequantizes to +0.0
        const float dq = __fmul_rn(__fadd_rn(__fsub_rn(q, p.zero), 0.0f), p.scale);
        d[i] = __fdiv_rn(__fsub_rn(w, dq), ujj);  // the CPU's (w - dequantized) / U_jj
        if (lane == l) {
          wv[i][s] = d[i];
          w0[i][s] = dq;
          qb[i] |= (static_cast<uint32_t>(static_cast<int32_t>(q)) & 0xFFu) << (8 * s);
        }
      }
#pragma unroll
      for (int s2 = s; s2 < kSlots; ++s2) {
        const int c2 = lane + kWarp * s2;
        if (c2 > jj && c2 < bw) {
          const float rv = sR[c2 * LDR + jj];
#pragma unroll
          for (int i = 0; i < RW; ++i) wv[i][s2] = fmaf(-d[i], rv, wv[i][s2]);
        }
      }
    }
  }
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int c = lane + kWarp * s;
    if (c >= bw) continue;
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      const int64_t r = r0 + i;
      if (r >= rows) continue;
      const int64_t row = e * rows + r;
      Dblk[row * ldd + c] = wv[i][s];
      const int8_t q = static_cast<int8_t>((qb[i] >> (8 * s)) & 0xFFu);
      if constexpr (ACT) {  // processing order; launch_gptq_unpermute moves them after the loop
        codes[row * C + i1 + c] = q;
        dW[row * C + i1 + c] = w0[i][s];
      } else {
        codes[row * C + orig[s]] = q;
        deq[row * C + orig[s]] = w0[i][s];
      }
    }
  }
}

// ---- loss -----------------------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(256) loss_diff_kernel(const float* __restrict__ W, const float* __restrict__ dq,
                                                        int64_t total, float* __restrict__ D) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    D[i] = W[i] - dq[i];
}

// Block (chunk, e): column-major upper entries (i <= j) of S for j in the chunk's kLossRowsPerChunk columns.
__global__ void __launch_bounds__(256) loss_partial_kernel(const float* __restrict__ S, const float* __restrict__ h0,
                                                           int64_t C, double* __restrict__ partial, int64_t chunks) {
  __shared__ double part[256];
  const int64_t e = blockIdx.y, j0 = static_cast<int64_t>(blockIdx.x) * kLossRowsPerChunk;
  const float* s = S + e * C * C;
  const float* h = h0 + e * C * C;
  double acc = 0.0;
  for (int64_t j = j0; j < j0 + kLossRowsPerChunk && j < C; ++j)
    for (int64_t i = threadIdx.x; i <= j; i += blockDim.x) {
      const double t = static_cast<double>(s[j * C + i]) * static_cast<double>(h[j * C + i]);
      acc += i == j ? t : 2.0 * t;
    }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int w = 128; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[e * chunks + blockIdx.x] = part[0];
}

__global__ void loss_final_kernel(const double* __restrict__ partial, int64_t E, int64_t chunks,
                                  double* __restrict__ losses) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  double s = 0.0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[e * chunks + c];
  losses[e] = s;
}

}  // namespace

cudaError_t launch_gptq_prepare(const float* W, const float* H, int64_t E, int64_t rows, int64_t cols, bool act_order,
                                void* workspace, const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  cudaError_t err = cudaMemsetAsync(ws.flags, 0xFF, 4 * sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return err;
  const unsigned tiles = static_cast<unsigned>((cols + kTile - 1) / kTile);
  prepare_h_kernel<<<dim3(tiles, tiles, static_cast<unsigned>(E)), dim3(kTile, 8), 0, stream>>>(H, cols, ws.h0, ws.dead,
                                                                                                ws.flags);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  prepare_w_kernel<<<grid_for(E * rows * cols, 256 * 8), 256, 0, stream>>>(W, E, rows, cols, ws.dead,
                                                                          act_order ? ws.dw : nullptr, ws.flags);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  stats_kernel<<<static_cast<unsigned>(E), 256, 0, stream>>>(ws.h0, cols, ws.dead, ws.mean);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (act_order) {
    rank_kernel<<<dim3(static_cast<unsigned>((cols + 255) / 256), static_cast<unsigned>(E)), 256, 0, stream>>>(
        ws.h0, cols, ws.dead, ws.perm, ws.inv);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t launch_gptq_permute_w(const float* W, int64_t E, int64_t rows, int64_t cols, void* workspace,
                                  const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  permute_w_kernel<<<static_cast<unsigned>(E * rows), 256, 0, stream>>>(W, rows, cols, ws.perm, ws.dead, ws.dw);
  return cudaGetLastError();
}

cudaError_t launch_gptq_unpermute(int64_t E, int64_t rows, int64_t cols, int8_t* codes, float* dequantized,
                                  void* workspace, const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  const size_t smem = static_cast<size_t>(cols);
  const cudaError_t err = raise_smem_limit(unpermute_kernel, smem);
  if (err != cudaSuccess) return err;
  unpermute_kernel<<<static_cast<unsigned>(E * rows), 256, smem, stream>>>(rows, cols, ws.inv, codes, ws.dw,
                                                                          dequantized);
  return cudaGetLastError();
}

cudaError_t launch_gptq_block(const float* W, const float* H, int64_t E, int64_t rows, int64_t cols, int64_t i1, int bw,
                              const RtnParams& p, bool act_order, int8_t* codes, float* scales, int32_t* zeros,
                              float* dequantized, void* workspace, const GptqLayout& l, const GptqSmemPlan& sp,
                              cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  constexpr int RW = 4;
  const size_t smem = sp.block_shared ? gptq_block_bytes(bw) : 0;
  const dim3 grid(static_cast<unsigned>((rows + kBlockWarps * RW - 1) / (kBlockWarps * RW)), static_cast<unsigned>(E));
  auto kernel = act_order ? (sp.block_shared ? gptq_block_kernel<true, RW, true> : gptq_block_kernel<true, RW, false>)
                          : (sp.block_shared ? gptq_block_kernel<false, RW, true> : gptq_block_kernel<false, RW, false>);
  const cudaError_t err = raise_smem_limit(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kBlockWarps * kWarp, smem, stream>>>(W, H, ws.dw, ws.dblk, act_order ? ws.perm : nullptr, ws.dead,
                                                      scales, zeros, codes, dequantized, rows, cols, p.group_size, i1,
                                                      bw, static_cast<int>(l.block), p);
  return cudaGetLastError();
}

cudaError_t launch_gptq_loss_diff(const float* W, const float* dequantized, int64_t E, int64_t rows, int64_t cols,
                                  void* workspace, const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  const int64_t total = E * rows * cols;
  loss_diff_kernel<<<grid_for(total, 256 * 8), 256, 0, stream>>>(W, dequantized, total, ws.dw);
  return cudaGetLastError();
}

cudaError_t launch_gptq_loss_reduce(const float* H, int64_t E, int64_t cols, double* losses, void* workspace,
                                    const GptqLayout& l, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  loss_partial_kernel<<<dim3(static_cast<unsigned>(l.loss_chunks), static_cast<unsigned>(E)), 256, 0, stream>>>(
      H, ws.h0, cols, ws.partial, l.loss_chunks);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  loss_final_kernel<<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(ws.partial, E, l.loss_chunks, losses);
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
