// kernels/src/quant_pack.cu -- RTN quantization, dequantization and int32 bit packing on the GPU.
//
// Bit-exactness with libmoequant/include/moequant/quant.h and pack.h is the contract, so:
//   * every float / double operation that appears in quant.h is an explicit round-to-nearest intrinsic
//     (__fadd_rn, __fmul_rn, __fdiv_rn, __dadd_rn, ...): nvcc contracts a*b+c into an FMA by default
//     (-fmad=true), which would change the last bit relative to the CPU's separate multiply and add;
//   * rintf is round-half-to-even like std::nearbyint in the default rounding mode;
//   * std::min / std::max are reproduced as the exact ternaries the standard library uses
//     (std::min(a, b) = b < a ? b : a), so signed zeros resolve the same way;
//   * the MSE error of a candidate is accumulated in double, sequentially in element order, by one chain of
//     __dadd_rn (the per-element terms are computed in parallel by the warp and handed to the chain with
//     shuffles) -- the same sum as the CPU loop, not a tree reduction.
// The only operation without a bit-exact twin is pow(double, double): CUDA's pow is within 2 ulp and glibc's
// within 1 ulp, so a candidate's MSE error may differ in its last bits from the CPU's. The chosen scale can
// only differ when two *different* candidates have errors within a few ulp of each other (identical
// candidates are skipped, see search_qparams), which real weight groups practically never produce.
#include "launch.h"
#include "quant_device.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// Exact, std_min / std_max, round_to_bf16 / round_to_fp16 / round_scale, scale_epsilon and qparams_from_range
// live in quant_device.cuh (shared with gptq_batched.cu).

using QP = QParamsT<int32_t>;

__host__ __device__ inline int32_t quantize_value(float x, const QP& p, int bits) {
  const float v = rintf(Exact::add(Exact::div(x, p.scale), static_cast<float>(p.zero)));
  const float c = std_min(std_max(v, static_cast<float>(-(1 << (bits - 1)))), static_cast<float>((1 << (bits - 1)) - 1));
  return static_cast<int32_t>(c);
}

__host__ __device__ inline float dequantize_value(int32_t q, const QP& p) {
  return Exact::mul(static_cast<float>(q - p.zero), p.scale);
}

// compute_qparams of quant.h after the min/max pass: `err(p)` must return the group's sequential MSE error.
// A candidate identical to the previously evaluated one is skipped: its error is the same number, which can
// never pass the strict `<` (either the previous one won and best_err equals it, or it lost and best_err is
// already <= it), so the result is unchanged and many pow() evaluations are saved (bf16 scales collapse
// neighbouring shrink factors onto the same scale).
template <class ErrFn>
__host__ __device__ QP search_qparams(float lo, float hi, const RtnParams& s, const ErrFn& err) {
  QP best = qparams_from_range<int32_t>(lo, hi, s);
  if (!s.mse) return best;
  double best_err = err(best);
  QP prev = best;
  for (int i = 1; i <= s.mse_steps; ++i) {
    const float shrink = Exact::to_float(Exact::dsub(1.0, Exact::ddiv(static_cast<double>(i), s.mse_grid)));
    const QP p = qparams_from_range<int32_t>(Exact::mul(shrink, lo), Exact::mul(shrink, hi), s);
    if (p.scale == prev.scale && p.zero == prev.zero) continue;
    prev = p;
    const double e = err(p);
    if (e < best_err) {
      best_err = e;
      best = p;
    }
  }
  return best;
}

// |v - dequant(quant(v))|^norm in double, the CPU's per-element term.
__host__ __device__ inline double mse_term(float v, const QP& p, int bits, double norm) {
  const float d = dequantize_value(quantize_value(v, p, bits), p);
  return pow(fabs(Exact::dsub(static_cast<double>(v), static_cast<double>(d))), norm);
}

// Sequential error of one group, computed by a whole warp: lane j evaluates the term of element base + j, then
// every lane runs the same chain e += term_0, term_1, ... (shuffled in element order), so the sum is the CPU's
// left-to-right sum, identical in every lane (no divergence, no broadcast needed).
// 32-bit indices on purpose (the API caps in_features at INT32_MAX): pow() is an out-of-line call and every
// register live across it beyond the callee-saved set would spill.
struct WarpGroupErr {
  const float* x;
  int n;
  int bits;
  double norm;
  int lane;
  __device__ double operator()(const QP& p) const {
    double e = 0.0;
    for (int base = 0; base < n; base += kWarp) {
      const int i = base + lane;
      const double t = i < n ? mse_term(__ldg(x + i), p, bits, norm) : 0.0;
      const int cnt = n - base < kWarp ? n - base : kWarp;
      for (int j = 0; j < cnt; ++j) e = Exact::dadd(e, __shfl_sync(kFullMask, t, j));
    }
    return e;
  }
};

// One warp per (row, group), grid-stride over groups. The group's min/max is a warp reduction (exact: min and
// max of non-NaN floats do not depend on the order, and lo starts at +0 so -0 never enters, as on the CPU),
// the parameter search runs redundantly in all lanes (cheap scalar code, keeps the warp converged), and the
// elementwise quantize / dequantize is spread over the lanes with coalesced accesses.
__global__ void __launch_bounds__(256) quantize_rtn_kernel(const float* __restrict__ w, int64_t rows, int64_t cols,
                                                           int64_t ld, RtnParams p, int8_t* __restrict__ codes,
                                                           float* __restrict__ scales, int32_t* __restrict__ zeros,
                                                           float* __restrict__ dequantized,
                                                           unsigned long long* __restrict__ bad_index) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t gs = p.group_size, ng = cols / gs, total = rows * ng;
  for (int64_t t = warp; t < total; t += num_warps) {  // uniform per warp: shuffles below are safe
    const int64_t r = t / ng, g = t - r * ng;
    const float* x = w + r * ld + g * gs;
    float lo = 0.0f, hi = 0.0f;
    int64_t first_bad = -1;
    for (int64_t i = lane; i < gs; i += kWarp) {
      const float v = __ldg(x + i);
      if (!isfinite(v) && first_bad < 0) first_bad = i;
      lo = std_min(lo, v);
      hi = std_max(hi, v);
    }
    if (first_bad >= 0) atomicMin(bad_index, static_cast<unsigned long long>(r * cols + g * gs + first_bad));
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    const QP qp = search_qparams(lo, hi, p, WarpGroupErr{x, static_cast<int>(gs), p.bits, p.mse_norm, lane});
    if (lane == 0) {
      if (scales) scales[t] = qp.scale;  // t == r * ng + g
      if (zeros) zeros[t] = qp.zero;
    }
    if (codes || dequantized) {
      const int64_t o = r * cols + g * gs;
      for (int64_t i = lane; i < gs; i += kWarp) {
        const int32_t q = quantize_value(__ldg(x + i), qp, p.bits);
        if (codes) codes[o + i] = static_cast<int8_t>(q);
        if (dequantized) dequantized[o + i] = dequantize_value(q, qp);
      }
    }
  }
}

// One thread per element, grid-stride; memory-bound, so the simple mapping is enough.
__global__ void __launch_bounds__(256) dequantize_kernel(const int8_t* __restrict__ codes,
                                                         const float* __restrict__ scales,
                                                         const int32_t* __restrict__ zeros, int64_t rows, int64_t cols,
                                                         int64_t gs, float* __restrict__ out) {
  const int64_t ng = cols / gs, total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / cols, c = i - r * cols;
    const int64_t pi = r * ng + c / gs;
    const QP qp{scales[pi], zeros ? zeros[pi] : 0};
    out[i] = dequantize_value(codes[i], qp);
  }
}

// Word c of a packed row: it holds stream bits [32c, 32c + 32) and element i sits at stream bit i*b, so the word
// gathers elements floor(32c / b) .. floor((32c + 31) / b). An element that starts in the previous word
// contributes its high bits (u >> -s), one that runs into the next word its low bits (u << s, truncated to 32
// bits) -- the two halves pack.h writes with `placed` and `placed >> 32`. Bits past the last element stay zero.
// *bad receives the first element of the word outside [qmin, qmax] (left unchanged when there is none).
__host__ __device__ inline uint32_t pack_word(const int8_t* row, int64_t cols, int bits, int64_t c, int64_t* bad) {
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  const uint32_t offset = 1u << (bits - 1), mask = (1u << bits) - 1u;
  const int64_t bit0 = c * 32;
  const int64_t first = bit0 / bits;
  int64_t last = (bit0 + 31) / bits;
  if (last > cols - 1) last = cols - 1;
  uint32_t acc = 0;
  for (int64_t i = first; i <= last; ++i) {
    const int v = row[i];
    if ((v < qmin || v > qmax) && *bad < 0) *bad = i;
    const uint32_t u = static_cast<uint32_t>(v + static_cast<int>(offset)) & mask;
    const int s = static_cast<int>(i * bits - bit0);  // in (-bits, 32)
    acc |= s >= 0 ? (u << s) : (u >> -s);
  }
  return acc;
}

// Code i of a packed row of `words` words: the (at most two) words its bits live in, as unpack_codes reads them.
__host__ __device__ inline int8_t unpack_code(const int32_t* row, int64_t words, int bits, int64_t i) {
  const int offset = 1 << (bits - 1);
  const uint64_t mask = (1u << bits) - 1u;
  const int64_t bit = i * bits, word = bit / 32;
  const int shift = static_cast<int>(bit % 32);
  uint64_t v = static_cast<uint32_t>(row[word]);
  if (word + 1 < words) v |= static_cast<uint64_t>(static_cast<uint32_t>(row[word + 1])) << 32;
  return static_cast<int8_t>(static_cast<int>((v >> shift) & mask) - offset);
}

// One thread per output word: no atomics, each word written exactly once; neighbouring threads read
// neighbouring bytes of q, so the warp's reads stay coalesced.
__global__ void __launch_bounds__(256) pack_rows_kernel(const int8_t* __restrict__ q, int64_t rows, int64_t cols,
                                                        int bits, int64_t words, int32_t* __restrict__ out,
                                                        unsigned long long* __restrict__ bad_index) {
  const int64_t total = rows * words;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t r = t / words, c = t - r * words;
    int64_t bad = -1;
    const uint32_t acc = pack_word(q + r * cols, cols, bits, c, &bad);
    if (bad >= 0) atomicMin(bad_index, static_cast<unsigned long long>(r * cols + bad));
    out[t] = static_cast<int32_t>(acc);
  }
}

// One thread per code (byte stores, coalesced across the warp).
__global__ void __launch_bounds__(256) unpack_rows_kernel(const int32_t* __restrict__ packed, int64_t rows,
                                                          int64_t cols, int bits, int64_t words,
                                                          int8_t* __restrict__ q) {
  const int64_t total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t r = t / cols, i = t - r * cols;
    q[t] = unpack_code(packed + r * words, words, bits, i);
  }
}

}  // namespace

cudaError_t launch_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const RtnParams& p,
                                int8_t* codes, float* scales, int32_t* zeros, float* dequantized,
                                unsigned long long* bad_index, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(bad_index, 0xFF, sizeof(unsigned long long), stream);  // = kNoBadIndex
  if (err != cudaSuccess) return err;
  const int64_t groups = rows * (cols / p.group_size);
  if (groups == 0) return cudaSuccess;
  constexpr int kThreads = 256;  // 8 warps = 8 groups per block
  quantize_rtn_kernel<<<grid_for(groups, kThreads / kWarp), kThreads, 0, stream>>>(
      w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index);
  return cudaGetLastError();
}

cudaError_t launch_dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows,
                              int64_t cols, int64_t group_size, float* out, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  dequantize_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(codes, scales, zeros, rows, cols, group_size,
                                                                         out);
  return cudaGetLastError();
}

cudaError_t launch_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out,
                             unsigned long long* bad_index, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(bad_index, 0xFF, sizeof(unsigned long long), stream);
  if (err != cudaSuccess) return err;
  const int64_t words = (cols * bits + 31) / 32;
  const int64_t total = rows * words;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  pack_rows_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(q, rows, cols, bits, words, out, bad_index);
  return cudaGetLastError();
}

cudaError_t launch_unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q,
                               cudaStream_t stream) {
  const int64_t words = (cols * bits + 31) / 32;
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  unpack_rows_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(packed, rows, cols, bits, words, q);
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
