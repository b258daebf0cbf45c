// kernels/src/gptq_format.cu -- batched GPTQ in the weight formats of moequant/format.h: the static tile parameters and
// the column kernel. Everything else (preparation, factorisation with escalation, the lazy trailing SGEMM, the loss) is
// the int solve's (gptq_batched.cu, gptq_factor.cu), driven by cuda_gptq_batched_format in gptq_api.cpp.
//
// As on the CPU (moequant/gptq_format.h): every tile's parameters and the NVFP4 global scale come from the original W
// with its dead columns zeroed, computed before the column loop by format.h's own derive_group_params (so they are
// format_quantize's, bit for bit); the column loop rounds column j with quantize_element / dequantize_element of the
// tile each element belongs to, e_j = (w - dq) / U_jj, and updates the block's later columns with w - e_j U(j, c) as a
// rounded product and a rounded difference (the CPU's operations; no FMA). Like the int solve, the trailing update is a
// cuBLAS SGEMM of the block's errors and U comes from an fp32 factorisation, so the codes are GPTQ's on the same inputs
// with other rounding, not the CPU's bit for bit (tests/python/test_fp_gptq_cuda.py: policy and the exact cases).
//
//   fmt_range_kernel     per expert max(-w, 0) and max(w, 0) over the dead-zeroed W (bits, atomicMax): per-tensor
//                        scales and computed global scales
//   fmt_global_kernel    per expert global scale: the caller's (checked: finite, > 0) or 448 * max_elem / amax; 1
//                        for formats without one
//   fmt_params_kernel    one warp per scale tile (min / max by shuffles), or the expert's range for a per-tensor scale;
//                        derive_group_params -> scales, scale codes, zero points; a non-finite effective scale (fp16
//                        overflow) is flagged
//   gptq_format_block_kernel  the int solve's gptq_block_kernel<ACT = true> (static parameters) with format.h's element
//                        rounding: one warp per RW rows, lane = column of the block, columns in registers
#include "gptq_format_launch.h"
#include "gptq_workspace.cuh"
#include "launch.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

using fmt_detail::bits_of;
using fmt_detail::is_finite_bits;
using fmt_detail::mq_fdiv;
using fmt_detail::mq_fsub;
using fmt_detail::std_max;
using fmt_detail::std_min;

constexpr int kThreads = 256;

struct FmtWs {
  unsigned int* range;           // [E][2]: neg, hi bits
  float* gscale;                 // [E]
  unsigned long long* fflags;    // [2]
};
inline FmtWs carve_fmt(void* base, const GptqFormatLayout& x) {
  char* b = static_cast<char*>(base);
  return {reinterpret_cast<unsigned int*>(b + x.range), reinterpret_cast<float*>(b + x.gscale),
          reinterpret_cast<unsigned long long*>(b + x.fflags)};
}

__device__ inline float dead_zeroed(const float* __restrict__ W, const uint8_t* __restrict__ dead, int64_t e,
                                    int64_t rows, int64_t C, int64_t r, int64_t c) {
  return dead[e * C + c] ? 0.0f : W[(e * rows + r) * C + c];
}

// ---- range, global scale, tile parameters ---------------------------------------------------------------------------

// Block (chunk, e): max(-w, 0) and max(w, 0) over expert e's dead-zeroed W (non-finite values are skipped: W's error is
// reported by the preparation's flags). Non-negative floats order like their bits, so atomicMax on the bits is exact.
__global__ void __launch_bounds__(kThreads) fmt_range_kernel(const float* __restrict__ W,
                                                             const uint8_t* __restrict__ dead, int64_t rows, int64_t C,
                                                             unsigned int* __restrict__ range) {
  __shared__ float s_neg[kThreads / kWarp], s_hi[kThreads / kWarp];
  const int64_t e = blockIdx.y, n = rows * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  float neg = 0.0f, hi = 0.0f;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / C, c = i - r * C;
    const float v = dead_zeroed(W, dead, e, rows, C, r, c);
    if (!is_finite_bits(bits_of(v))) continue;
    neg = std_max(neg, mq_fsub(0.0f, std_min(v, 0.0f)));
    hi = std_max(hi, v);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    neg = std_max(neg, __shfl_xor_sync(kFullMask, neg, off));
    hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    s_neg[warp] = neg;
    s_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads / kWarp; ++i) {
      neg = std_max(neg, s_neg[i]);
      hi = std_max(hi, s_hi[i]);
    }
    atomicMax(range + 2 * e, __float_as_uint(neg));
    atomicMax(range + 2 * e + 1, __float_as_uint(hi));
  }
}

__global__ void fmt_global_kernel(FormatCore core, const float* __restrict__ global_in, int64_t E,
                                  const unsigned int* __restrict__ range, float* __restrict__ gscale,
                                  unsigned long long* __restrict__ fflags) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= E) return;
  float g = 1.0f;
  if (core.global_scale) {
    if (global_in != nullptr) {
      g = global_in[e];
      if (!(is_finite_bits(bits_of(g)) && g > 0.0f)) {
        atomicMin(fflags, static_cast<unsigned long long>(e));
        g = 1.0f;
      }
    } else {
      g = global_scale_from_amax(core, std_max(__uint_as_float(range[2 * e]), __uint_as_float(range[2 * e + 1])));
    }
  }
  gscale[e] = g;
}

// One warp per scale tile t of expert e (linear index e * sr * sc + t); per-tensor scales use the range pass.
__global__ void __launch_bounds__(kThreads) fmt_params_kernel(const float* __restrict__ W,
                                                              const uint8_t* __restrict__ dead, int64_t E, int64_t rows,
                                                              int64_t C, FormatLaunch p,
                                                              const unsigned int* __restrict__ range,
                                                              const float* __restrict__ gscale,
                                                              float* __restrict__ scales,
                                                              uint8_t* __restrict__ scale_codes,
                                                              int32_t* __restrict__ zeros,
                                                              unsigned long long* __restrict__ fflags) {
  const int64_t tr = p.tile_rows, tc = p.tile_cols, sc = p.scale_cols, sr = (rows + tr - 1) / tr;
  const int64_t tiles = E * sr * sc;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; t < tiles;
       t += warps) {  // warp-uniform
    const int64_t e = t / (sr * sc), s = t - e * sr * sc, br = s / sc, bc = s - br * sc;
    float lo = 0.0f, hi = 0.0f;
    if (p.from_range) {
      lo = mq_fsub(0.0f, __uint_as_float(range[2 * e]));
      hi = __uint_as_float(range[2 * e + 1]);
    } else {
      const int64_t r0 = br * tr, c0 = bc * tc;
      const int64_t h = (r0 + tr < rows ? r0 + tr : rows) - r0, wd = (c0 + tc < C ? c0 + tc : C) - c0;
      for (int64_t k = lane; k < h * wd; k += kWarp) {
        const int64_t dr = k / wd;
        const float v = dead_zeroed(W, dead, e, rows, C, r0 + dr, c0 + (k - dr * wd));
        lo = std_min(lo, v);
        hi = std_max(hi, v);
      }
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) {
        lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
        hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
      }
    }
    if (lane == 0) {
      const GroupParams gp = derive_group_params(p.core, lo, hi, gscale[e]);
      scales[t] = gp.scale;
      if (scale_codes) scale_codes[t] = gp.scale_code;
      if (zeros) zeros[t] = gp.zero;
      if (!is_finite_bits(bits_of(gp.effective))) atomicMin(fflags + 1, static_cast<unsigned long long>(t));
    }
  }
}

// ---- the column loop --------------------------------------------------------------------------------------------------
constexpr int kBlockWarps = 8;
constexpr int kSlots = kGptqMaxBlock / kWarp;  // register slots per lane: columns lane + 32 s

// gptq_batched.cu's gptq_block_kernel<ACT = true>, with the tile parameters of format.h. SMEM: U's diagonal block in
// shared memory (bw x (bw + 1) floats), else read from Rt.
template <int RW, bool SMEM>
__global__ void __launch_bounds__(kBlockWarps * kWarp, 1) gptq_format_block_kernel(
    const float* __restrict__ W, const float* __restrict__ Rt, float* __restrict__ dW, float* __restrict__ Dblk,
    const int32_t* __restrict__ perm, const uint8_t* __restrict__ dead, const float* __restrict__ scales,
    const int32_t* __restrict__ zeros, const float* __restrict__ gscale, uint8_t* __restrict__ codes,
    float* __restrict__ deq, int64_t rows, int64_t C, int64_t i1, int bw, int ldd, FormatLaunch p) {
  extern __shared__ float smem[];
  const int64_t e = blockIdx.y;
  const float* rt = Rt + e * C * C;
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
  const int32_t* pe = perm ? perm + e * C : nullptr;
  const uint8_t* de = dead + e * C;
  const int64_t tr = p.tile_rows, tc = p.tile_cols, sc = p.scale_cols, sr = (rows + tr - 1) / tr;
  const float g = gscale[e];
  const bool is_int = p.core.element == static_cast<int>(ElementKind::kInt);

  float wv[RW][kSlots], w0[RW][kSlots];  // current w; after processing: wv = e (scaled error), w0 = dequantized
  float ef[RW][kSlots];                  // effective scale of each element's tile
  int32_t zp[RW][kSlots];                // int zero point (0 for floats)
  uint32_t qb[RW];                       // codes of the 4 slots, one byte each
  int32_t orig[kSlots];                  // original column of each slot (cols <= 65535)
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int c = lane + kWarp * s;
    orig[s] = c < bw ? (pe ? pe[i1 + c] : static_cast<int32_t>(i1 + c)) : 0;
    const bool dd = c < bw ? de[orig[s]] != 0 : true;
#pragma unroll
    for (int i = 0; i < RW; ++i) {
      const int64_t r = r0 + i;
      const bool ok = c < bw && r < rows;
      const int64_t row = e * rows + r;
      if (pe) {  // act-order: dW = W0 in processing order (dead columns zero) plus the lazy updates
        w0[i][s] = 0.0f;
        wv[i][s] = ok ? dW[row * C + i1 + c] : 0.0f;
      } else {
        const float x0 = ok && !dd ? W[row * C + orig[s]] : 0.0f;
        w0[i][s] = x0;
        wv[i][s] = ok && i1 > 0 ? __fadd_rn(x0, dW[row * C + i1 + c]) : x0;
      }
      ef[i][s] = 1.0f;
      zp[i][s] = 0;
      if (ok) {
        const int64_t ti = e * sr * sc + (r / tr) * sc + orig[s] / tc;
        const float sv = scales[ti];
        ef[i][s] = p.core.global_scale ? mq_fdiv(sv, g) : sv;
        if (is_int) zp[i][s] = zeros[ti];
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
      float d[RW];
      const float ujj = sR[jj * LDR + jj];
#pragma unroll
      for (int i = 0; i < RW; ++i) {
        const float w = __shfl_sync(kFullMask, wv[i][s], l);
        GroupParams gp;
        gp.effective = __shfl_sync(kFullMask, ef[i][s], l);
        gp.scale = gp.effective;  // what quantize_element reads for ints (their effective scale is the scale)
        gp.zero = __shfl_sync(kFullMask, zp[i][s], l);
        const uint8_t q = quantize_element(p.core, w, gp);
        const float dq = dequantize_element(p.core, q, gp.effective, gp.zero);
        d[i] = __fdiv_rn(__fsub_rn(w, dq), ujj);  // the CPU's (w - dequantized) / U_jj
        if (lane == l) {
          wv[i][s] = d[i];
          w0[i][s] = dq;
          qb[i] |= static_cast<uint32_t>(q) << (8 * s);
        }
      }
#pragma unroll
      for (int s2 = s; s2 < kSlots; ++s2) {
        const int c2 = lane + kWarp * s2;
        if (c2 > jj && c2 < bw) {
          const float rv = sR[c2 * LDR + jj];
#pragma unroll
          for (int i = 0; i < RW; ++i) wv[i][s2] = __fsub_rn(wv[i][s2], __fmul_rn(d[i], rv));  // the CPU's w - e u
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
      const uint8_t q = static_cast<uint8_t>((qb[i] >> (8 * s)) & 0xFFu);
      if (pe) {  // processing order; launch_gptq_unpermute moves them after the loop
        codes[row * C + i1 + c] = q;
        dW[row * C + i1 + c] = w0[i][s];
      } else {
        codes[row * C + orig[s]] = q;
        deq[row * C + orig[s]] = w0[i][s];
      }
    }
  }
}

}  // namespace

cudaError_t launch_gptq_format_params(const float* W, int64_t E, int64_t rows, int64_t cols, const FormatLaunch& p,
                                      const float* global_in, float* scales, uint8_t* scale_codes, int32_t* zeros,
                                      void* workspace, const GptqLayout& l, const GptqFormatLayout& x,
                                      cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  const FmtWs fw = carve_fmt(workspace, x);
  cudaError_t err = cudaMemsetAsync(fw.range, 0, static_cast<size_t>(E) * 8, stream);
  if (err != cudaSuccess) return err;
  if ((err = cudaMemsetAsync(fw.fflags, 0xFF, 16, stream)) != cudaSuccess) return err;
  if (p.from_range || (p.core.global_scale && global_in == nullptr)) {
    const unsigned chunks = grid_for(rows * cols, kThreads * 16) > 1024 ? 1024 : grid_for(rows * cols, kThreads * 16);
    fmt_range_kernel<<<dim3(chunks, static_cast<unsigned>(E)), kThreads, 0, stream>>>(W, ws.dead, rows, cols,
                                                                                        fw.range);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  fmt_global_kernel<<<static_cast<unsigned>((E + 127) / 128), 128, 0, stream>>>(p.core, global_in, E, fw.range,
                                                                                fw.gscale, fw.fflags);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  const int64_t sr = (rows + p.tile_rows - 1) / p.tile_rows;
  const int64_t tiles = E * sr * p.scale_cols;
  fmt_params_kernel<<<grid_for(tiles, kThreads / kWarp), kThreads, 0, stream>>>(
      W, ws.dead, E, rows, cols, p, fw.range, fw.gscale, scales, scale_codes, zeros, fw.fflags);
  return cudaGetLastError();
}

cudaError_t launch_gptq_format_block(const float* W, const float* H, int64_t E, int64_t rows, int64_t cols, int64_t i1,
                                     int bw, const FormatLaunch& p, bool act_order, uint8_t* codes, const float* scales,
                                     const int32_t* zeros, float* dequantized, void* workspace, const GptqLayout& l,
                                     const GptqFormatLayout& x, const GptqSmemPlan& sp, cudaStream_t stream) {
  const Ws ws = carve(workspace, l);
  const FmtWs fw = carve_fmt(workspace, x);
  constexpr int RW = 4;
  const size_t smem = sp.block_shared ? gptq_block_bytes(bw) : 0;
  const dim3 grid(static_cast<unsigned>((rows + kBlockWarps * RW - 1) / (kBlockWarps * RW)), static_cast<unsigned>(E));
  auto kernel = sp.block_shared ? gptq_format_block_kernel<RW, true> : gptq_format_block_kernel<RW, false>;
  const cudaError_t err = raise_smem_limit(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kBlockWarps * kWarp, smem, stream>>>(W, H, ws.dw, ws.dblk, act_order ? ws.perm : nullptr, ws.dead,
                                                      scales, zeros, fw.gscale, codes, dequantized, rows, cols, i1, bw,
                                                      static_cast<int>(l.block), p);
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
