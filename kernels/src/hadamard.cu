// kernels/src/hadamard.cu -- orthonormal Hadamard transform along the last dimension (fp32 / bf16 / fp16).
//
// out[row] = x[row] (H_m (x) H_p) / sqrt(n), n = m * p, p = 2^k, m in {1, 12, 20, 28, 40} (hadamard.h has the
// contract; hadamard_tables.h the sign tables). Arithmetic in fp32 registers, one rounding to the output dtype.
//
// Main kernel (p >= 32): one pass, one CTA per `rpc` whole rows, the rows in shared memory as fp32 between stages.
// The index bits of each length-p segment are processed five at a time: in every stage a thread owns 32 elements
// whose indices differ only in a five-bit window [w0, w0 + 5) and does those butterflies in registers.
//   stage 0     32 contiguous elements straight from global memory (16-byte loads), window [0, 5);
//   stage s>0   window [min(5s, k - 5), +5) read from shared memory; only bits [5s, min(5s + 5, k)) are transformed
//               (the last window is shifted down so it stays inside the segment);
//   last stage  m = 1: scaled and stored to global memory (K = 6..9: back to shared memory, then coalesced 16-byte
//               stores, see staged_store); m > 1: back to shared memory, then the mix.
// Mix (m = 12, 20, 28; 40 * 2^k runs as 20 * 2^(k+1)): a thread owns the m values X[a][b] of one column b and forms
// y_c = sum_a H[a][c] X[a][b] with the signs as compile-time constants, four rows of H at a time: the 8 sign
// patterns (x0 +- x1 +- x2 +- x3) cost 12 adds and every column then takes one of them (+-), so a column costs
// m/4 adds instead of m.
// Shared memory is addressed through swz(i) = i ^ ((i >> 5) & 31): the write of stage 0 (lanes 32 elements apart)
// and every later read / write (lanes on consecutive indices: the window never covers bits 0..4 once k >= 10; for
// k < 10 the lanes' upper bits land in bits >= k and are XORed into distinct banks) are free of bank conflicts.
// Small p (< 32: n = 1..16, 12..m*16) takes the general kernel below (rows in shared memory, three bits per pass).
// x and out may be the same buffer (every CTA reads its rows completely before it writes them).
#include "launch.h"

#include <moequant/hadamard_tables.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

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

template <typename T>
__device__ inline float to_f32(T v);
template <>
__device__ inline float to_f32<float>(float v) { return v; }
template <>
__device__ inline float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ inline float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ inline T from_f32(float v);
template <>
__device__ inline float from_f32<float>(float v) { return v; }
template <>
__device__ inline __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ inline __half from_f32<__half>(float v) { return __float2half_rn(v); }

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
#pragma unroll
    for (int h = 0; h < NB; ++h) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r & (1 << h)) continue;
        const float a = v[r], b = v[r | (1 << h)];
        v[r] = a + b;
        v[r | (1 << h)] = a - b;
      }
    }
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
  for (int i = threadIdx.x; i < total; i += blockDim.x) sm[i] = to_f32<T>(src[i]);
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

// ---- main kernel: five index bits per stage in registers ---------------------------------------------------
constexpr int kE = 32, kLogE = 5;

__device__ __forceinline__ int swz(int i) { return i ^ ((i >> 5) & 31); }

// Butterflies over register-index bits [LO, LO + F) of v[0..32).
template <int LO, int F>
__device__ __forceinline__ void butterflies(float (&v)[kE]) {
#pragma unroll
  for (int h = LO; h < LO + F; ++h) {
#pragma unroll
    for (int r = 0; r < kE; ++r) {
      if (r & (1 << h)) continue;
      const float a = v[r], b = v[r | (1 << h)];
      v[r] = a + b;
      v[r | (1 << h)] = a - b;
    }
  }
}

// 32 contiguous elements (16-byte aligned) -> fp32 registers.
template <typename T>
__device__ __forceinline__ void load32(const T* src, float (&v)[kE]) {
  constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte load
  const uint4* s4 = reinterpret_cast<const uint4*>(src);
#pragma unroll
  for (int q = 0; q < kE / kPer; ++q) {
    const uint4 raw = __ldg(s4 + q);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[q * kPer + i] = to_f32<T>(e[i]);
  }
}

// Same, element by element (x not 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load32_scalar(const T* src, float (&v)[kE]) {
#pragma unroll
  for (int i = 0; i < kE; ++i) v[i] = to_f32<T>(src[i]);
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

template <int M, int... Q>
__device__ __forceinline__ void mix_all(float (&acc)[M], const float* sm, int base, int p, std::integer_sequence<int, Q...>) {
  auto block = [&](auto qc) {
    constexpr int q = decltype(qc)::value;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = sm[swz(base + (4 * q + i) * p)];
    mix_rows<M, q>(acc, x);
  };
  (block(std::integral_constant<int, Q>{}), ...);
}

// Up to n / 32 = 1024 items per row. m > 1: 256 threads and at least three CTAs per SM (<= 85 registers; the mix
// holds m accumulators), so that CTAs in different phases (loads / butterflies / mix and stores) overlap on an SM.
template <int M>
constexpr int max_threads() {
  return M == 1 ? 1024 : 256;
}
template <int M>
constexpr int min_ctas() {
  return M == 1 ? 1 : 3;
}

// m = 1 with the last window starting below bit 5 (K = 6..9): the last stage's outputs would leave in runs of
// 2^w0 < 32 elements, so they go back to shared memory and leave in coalesced 16-byte stores (lanes on consecutive
// 16-byte chunks).
template <int M, int K>
constexpr bool staged_store() {
  return M == 1 && K > kLogE && K < 2 * kLogE;  // two stages, the last window [K - 5, K)
}

// Stage S >= 1 of the transform of segments of 2^K (see the top of the file); all shifts are compile-time.
template <typename T, int M, int K, int S>
__device__ __forceinline__ void reg_stage(float* sm, T* dst, int items, float scale) {
  constexpr int kStages = (K + kLogE - 1) / kLogE, kVBits = K - kLogE;
  constexpr int kW0 = kLogE * S < kVBits ? kLogE * S : kVBits;
  constexpr int kF = K - kLogE * S < kLogE ? K - kLogE * S : kLogE;
  constexpr bool kLastGlobal = M == 1 && S == kStages - 1 && !staged_store<M, K>();
  __syncthreads();
  for (int u = threadIdx.x; u < items; u += blockDim.x) {
    const int seg = u >> kVBits, vv = u & ((1 << kVBits) - 1);
    const int base = (seg << K) + (((vv >> kW0) << (kW0 + kLogE)) | (vv & ((1 << kW0) - 1)));
    float v[kE];
#pragma unroll
    for (int j = 0; j < kE; ++j) v[j] = sm[swz(base + (j << kW0))];
    butterflies<kLogE - kF, kF>(v);
    if constexpr (kLastGlobal) {
#pragma unroll
      for (int j = 0; j < kE; ++j) dst[base + (j << kW0)] = from_f32<T>(v[j] * scale);
    } else {
#pragma unroll
      for (int j = 0; j < kE; ++j) sm[swz(base + (j << kW0))] = v[j];
    }
  }
}

template <typename T, int M, int K, int... S>
__device__ __forceinline__ void reg_stages(float* sm, T* dst, int items, float scale, std::integer_sequence<int, S...>) {
  (reg_stage<T, M, K, S + 1>(sm, dst, items, scale), ...);
}

// See the top of the file. n = M << K with K >= 5; rpc rows per CTA; threads loop over the items of a stage.
template <typename T, int M, int K>
__global__ void __launch_bounds__(max_threads<M>(), min_ctas<M>())
    hadamard_reg_kernel(const T* x, T* out, int64_t rows, int rpc, bool vec, bool vec_out, float scale) {
  extern __shared__ float sm[];
  constexpr int kN = M << K, kStages = (K + kLogE - 1) / kLogE;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rpc;
  const int rows_here = static_cast<int>(rows - row0 < rpc ? rows - row0 : rpc);
  const int items = rows_here * (kN >> kLogE);
  const T* src = x + row0 * kN;
  T* dst = out + row0 * kN;
  constexpr bool kDirect = M == 1 && kStages == 1;  // n = 32: stage 0 is the whole transform
  for (int u = threadIdx.x; u < items; u += blockDim.x) {
    float v[kE];
    if (vec) load32<T>(src + u * kE, v);
    else load32_scalar<T>(src + u * kE, v);
    butterflies<0, kLogE>(v);
    if constexpr (kDirect) {
#pragma unroll
      for (int j = 0; j < kE; ++j) dst[u * kE + j] = from_f32<T>(v[j] * scale);
    } else {
#pragma unroll
      for (int j = 0; j < kE; ++j) sm[swz(u * kE + j)] = v[j];
    }
  }
  reg_stages<T, M, K>(sm, dst, items, scale, std::make_integer_sequence<int, kStages - 1>{});
  if constexpr (staged_store<M, K>()) {
    __syncthreads();
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte store; a CTA's rows are a multiple of 64 elements
    const int total = rows_here * kN;
    for (int e = threadIdx.x * kPer; e < total; e += blockDim.x * kPer) {
      alignas(16) T o[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) o[i] = from_f32<T>(sm[swz(e + i)] * scale);
      if (vec_out) {
        *reinterpret_cast<uint4*>(dst + e) = *reinterpret_cast<const uint4*>(o);
      } else {
#pragma unroll
        for (int i = 0; i < kPer; ++i) dst[e + i] = o[i];
      }
    }
  }
  if constexpr (M > 1) {
    __syncthreads();
    const int cols = rows_here << K;  // (row, b) pairs
    for (int t = threadIdx.x; t < cols; t += blockDim.x) {
      const int lr = t >> K, b = t & ((1 << K) - 1);
      const int base = lr * kN + b;
      float acc[M];
      mix_all<M>(acc, sm, base, 1 << K, std::make_integer_sequence<int, M / 4>{});
#pragma unroll
      for (int c = 0; c < M; ++c) dst[base + (c << K)] = from_f32<T>(acc[c] * scale);
    }
  }
}

template <typename T, int M, int K>
cudaError_t launch_reg(const T* x, T* out, int64_t rows, cudaStream_t stream) {
  constexpr int kN = M << K, kPerRow = kN >> kLogE;  // items (32 elements) per row
  int64_t rpc = 1;
  if (M > 1) {
    rpc = K < 9 ? (512 >> K) : 1;  // >= 512 columns (a mix thread's work) per CTA: two per thread
  } else if (kPerRow < 256) {
    rpc = (256 + kPerRow - 1) / kPerRow;  // batch small rows: >= 256 items per CTA
  }
  if (rpc > rows) rpc = rows;
  const int items = static_cast<int>(rpc) * kPerRow;
  int threads = M > 1 ? static_cast<int>(rpc << K) : items;  // m > 1: columns >= items (m < 32)
  while (threads > max_threads<M>()) threads = (threads + 1) / 2;
  threads = (threads + 31) / 32 * 32;
  constexpr bool kDirect = M == 1 && K == kLogE;
  const size_t smem = kDirect ? 0 : static_cast<size_t>(rpc) * kN * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(hadamard_reg_kernel<T, M, K>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = (rows + rpc - 1) / rpc;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(kN)));
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;  // rows are 32 elements = 64 or 128 bytes apart
  const bool vec_out = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  hadamard_reg_kernel<T, M, K><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
      x, out, rows, static_cast<int>(rpc), vec, vec_out, scale);
  return cudaGetLastError();
}

// K = log2 p in [5, KMax]: one instantiation per supported length.
template <typename T, int M, int K, int KMax>
cudaError_t launch_reg_k(const T* x, T* out, int64_t rows, int logp, cudaStream_t stream) {
  if constexpr (K < KMax) {
    if (logp != K) return launch_reg_k<T, M, K + 1, KMax>(x, out, rows, logp, stream);
  }
  return launch_reg<T, M, K>(x, out, rows, stream);
}

template <typename T>
cudaError_t launch_typed(const void* xv, void* outv, int64_t rows, int n, int m, int logp, cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  if (logp >= kLogE) {
    switch (m) {  // 40 * 2^k is decomposed as 20 * 2^(k+1) (hadamard_tables::decompose), so m is 1, 12, 20 or 28
      case 12: return launch_reg_k<T, 12, kLogE, 11>(x, out, rows, logp, stream);  // 12 * 2048 <= 32768
      case 20: return launch_reg_k<T, 20, kLogE, 10>(x, out, rows, logp, stream);
      case 28: return launch_reg_k<T, 28, kLogE, 10>(x, out, rows, logp, stream);
      default: return launch_reg_k<T, 1, kLogE, 15>(x, out, rows, logp, stream);
    }
  }
  // p < 32: the general kernel. At least ~2048 elements per CTA (rows of small n are batched), one thread per 8
  // elements of a pass.
  const int rpc = n >= 2048 ? 1 : 2048 / n;
  const int64_t elems = static_cast<int64_t>(rpc) * n;
  int threads = static_cast<int>(elems / 8);
  if (threads < 128) threads = 128;
  if (threads > 512) threads = 512;
  const size_t smem = static_cast<size_t>(elems) * sizeof(float);
  const int64_t blocks = (rows + rpc - 1) / rpc;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(n)));
  hadamard_kernel<T><<<static_cast<unsigned>(blocks), threads, smem, stream>>>(x, out, rows, n, m, logp, rpc, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, int64_t n, int m, int logp, int dtype,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int ni = static_cast<int>(n);
  if (dtype == 1) return launch_typed<__nv_bfloat16>(x, out, rows, ni, m, logp, stream);
  if (dtype == 2) return launch_typed<__half>(x, out, rows, ni, m, logp, stream);
  return launch_typed<float>(x, out, rows, ni, m, logp, stream);
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
