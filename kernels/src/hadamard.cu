// kernels/src/hadamard.cu -- orthonormal Hadamard transform along the last dimension (fp32 / bf16 / fp16).
//
// out[row] = x[row] (H_m (x) H_p) / sqrt(n), n = m * p, p = 2^k, m in {1, 12, 20, 28, 40} (hadamard.h has the
// contract; hadamard_tables.h the sign tables). Arithmetic in fp32 registers, one rounding to the output dtype.
//
// Main kernel (p >= 32): one pass, one CTA per `rpc` whole rows, the rows in shared memory as fp32 between stages.
// The index bits of each length-p segment are processed five at a time: in every stage a thread owns 32 elements
// whose indices differ only in a five-bit window [w0, w0 + 5) and does those butterflies in registers.
//   stage 0     32 contiguous elements (16-byte loads), window [0, 5);
//   stage s>0   window [min(5s, k - 5), +5) read from shared memory; only bits [5s, min(5s + 5, k)) are transformed
//               (the last window is shifted down so it stays inside the segment);
//   last stage  m = 1: scaled and stored to global memory (K = 6..9: back to shared memory, then coalesced 16-byte
//               stores, see staged_store); m > 1: back to shared memory, then the mix.
// Mix (m = 12, 20, 28; 40 * 2^k runs as 20 * 2^(k+1)): a thread owns the m values X[a][b] of one column b and forms
// y_c = sum_a H[a][c] X[a][b] with the signs as compile-time constants, four rows of H at a time: the 8 sign
// patterns (x0 +- x1 +- x2 +- x3) cost 12 adds and every column then takes one of them (+-), so a column costs
// m/4 adds instead of m (hadamard_device.cuh).
// Shared memory is addressed through pad(i) = i + i / 32 (one spare word per 32): the write of stage 0 (lanes 32
// elements apart) and every later access (lanes on consecutive indices, or for k < 10 on consecutive items) are
// free of bank conflicts, and a thread's 32 addresses are one register plus compile-time offsets. Where the padding
// would cost a CTA per SM (28 * 1024) the XOR swizzle i ^ ((i / 32) % 32) is used instead (same conflict freedom).
// Small p (< 32: n = 1..16, 12..m*16) takes the general kernel of hadamard_small.cuh.
// x and out may be the same buffer (every CTA reads its rows completely before it writes them).
#include "launch.h"

#include "element_type.cuh"
#include "hadamard_device.cuh"
#include "hadamard_small.cuh"


namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

constexpr int kE = 32, kLogE = 5;

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

// Rows per CTA. m = 1: >= 256 items of 32 elements; m > 1: >= 512 columns (a mix thread's work, two per thread).
template <int M, int K>
constexpr int rows_per_cta() {
  constexpr int kPerRow = (M << K) >> kLogE;
  if constexpr (M > 1) return K < 9 ? 512 >> K : 1;
  return kPerRow < 256 ? (256 + kPerRow - 1) / kPerRow : 1;
}

// Padded layout unless the padding lowers the CTAs per SM below both three and the unpadded count. The count uses
// sm_90's 228 KiB of shared memory per SM (H100 / H200, where the kernels are tuned); on sm_80 (164 KiB) the choice
// stays correct but may cost a CTA per SM for some lengths.
template <int M, int K>
constexpr bool padded() {
  constexpr long kB = static_cast<long>(rows_per_cta<M, K>()) * (M << K) * 4, kSM = 228 * 1024, kRes = 1024;
  return kSM / (kB + kB / 32 + kRes) >= 3 || kSM / (kB + kB / 32 + kRes) == kSM / (kB + kRes);
}

// Shared-memory index of element base + off (off compile-time; no carry from base into off's bits, or off a
// multiple of 32: pad(base + off) = pad(base) + pad(off)).
template <bool P>
__device__ __forceinline__ int sidx(int base, int off) {
  if constexpr (P) {
    return base + (base >> kLogE) + off + (off >> kLogE);
  } else {
    const int i = base + off;
    return i ^ ((i >> kLogE) & 31);
  }
}

// Floats of shared memory for `elems` elements (a multiple of 32).
template <bool P>
constexpr int64_t smem_floats(int64_t elems) {
  return P ? elems + elems / 32 : elems;
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
    for (int i = 0; i < kPer; ++i) v[q * kPer + i] = to_f32(e[i]);
  }
}

// Same, element by element (x not 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load32_scalar(const T* src, float (&v)[kE]) {
#pragma unroll
  for (int i = 0; i < kE; ++i) v[i] = to_f32(src[i]);
}

template <int M, int K, bool P, int... Q>
__device__ __forceinline__ void mix_all(float (&acc)[M], const float* sm, int base, std::integer_sequence<int, Q...>) {
  auto block = [&](auto qc) {
    constexpr int q = decltype(qc)::value;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = sm[sidx<P>(base, (4 * q + i) << K)];
    mix_rows<M, q>(acc, x);
  };
  (block(std::integral_constant<int, Q>{}), ...);
}

// m = 1 with the last window starting below bit 5 (K = 6..9): the last stage's outputs would leave in runs of
// 2^w0 < 32 elements, so they go back to shared memory and leave in coalesced 16-byte stores (lanes on consecutive
// 16-byte chunks).
template <int M, int K>
constexpr bool staged_store() {
  return M == 1 && K > kLogE && K < 2 * kLogE;  // two stages, the last window [K - 5, K)
}

// Stage S >= 1 of the transform of segments of 2^K (see the top of the file); all shifts are compile-time.
template <typename T, int M, int K, bool P, int S>
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
    for (int j = 0; j < kE; ++j) v[j] = sm[sidx<P>(base, j << kW0)];
    butterflies<kLogE - kF, kF>(v);
    if constexpr (kLastGlobal) {
#pragma unroll
      for (int j = 0; j < kE; ++j) dst[base + (j << kW0)] = from_f32<T>(v[j] * scale);
    } else {
#pragma unroll
      for (int j = 0; j < kE; ++j) sm[sidx<P>(base, j << kW0)] = v[j];
    }
  }
}

template <typename T, int M, int K, bool P, int... S>
__device__ __forceinline__ void reg_stages(float* sm, T* dst, int items, float scale, std::integer_sequence<int, S...>) {
  (reg_stage<T, M, K, P, S + 1>(sm, dst, items, scale), ...);
}

// See the top of the file. n = M << K with K >= 5; rpc rows per CTA; threads loop over the items of a stage.
template <typename T, int M, int K>
__global__ void __launch_bounds__(max_threads<M>(), min_ctas<M>())
    hadamard_reg_kernel(const T* x, T* out, int64_t rows, int rpc, bool vec, bool vec_out, float scale) {
  extern __shared__ float sm[];
  constexpr int kN = M << K, kStages = (K + kLogE - 1) / kLogE;
  constexpr bool kP = padded<M, K>();
  constexpr bool kDirect = M == 1 && kStages == 1;  // n = 32: stage 0 is the whole transform
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rpc;
  const int rows_here = static_cast<int>(rows - row0 < rpc ? rows - row0 : rpc);
  const int items = rows_here * (kN >> kLogE);
  const T* src = x + row0 * kN;
  T* dst = out + row0 * kN;
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
      for (int j = 0; j < kE; ++j) sm[sidx<kP>(u * kE, j)] = v[j];
    }
  }
  reg_stages<T, M, K, kP>(sm, dst, items, scale, std::make_integer_sequence<int, kStages - 1>{});
  if constexpr (staged_store<M, K>()) {
    __syncthreads();
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte store; a CTA's rows are a multiple of 64 elements
    const int total = rows_here * kN;
    for (int e = threadIdx.x * kPer; e < total; e += blockDim.x * kPer) {
      alignas(16) T o[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) o[i] = from_f32<T>(sm[sidx<kP>(e, i)] * scale);
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
      mix_all<M, K, kP>(acc, sm, base, std::make_integer_sequence<int, M / 4>{});
#pragma unroll
      for (int c = 0; c < M; ++c) dst[base + (c << K)] = from_f32<T>(acc[c] * scale);
    }
  }
}

template <typename T, int M, int K>
cudaError_t launch_reg(const T* x, T* out, int64_t rows, cudaStream_t stream) {
  constexpr int kN = M << K, kPerRow = kN >> kLogE, kRpc = rows_per_cta<M, K>();
  constexpr bool kDirect = M == 1 && K == kLogE;
  const int rpc = rows < kRpc ? static_cast<int>(rows) : kRpc;
  int threads = M > 1 ? rpc << K : rpc * kPerRow;  // m > 1: columns >= items (m < 32)
  while (threads > max_threads<M>()) threads = (threads + 1) / 2;
  threads = (threads + 31) / 32 * 32;
  auto smem_for = [](int r) { return kDirect ? size_t{0} : smem_floats<padded<M, K>()>(int64_t{r} * kN) * sizeof(float); };
  const cudaError_t err = raise_smem_limit(hadamard_reg_kernel<T, M, K>, smem_for(kRpc));
  if (err != cudaSuccess) return err;
  const int64_t blocks = (rows + rpc - 1) / rpc;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(kN)));
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;  // rows are 32 elements = 64 or 128 bytes apart
  const bool vec_out = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  hadamard_reg_kernel<T, M, K><<<static_cast<unsigned>(blocks), threads, smem_for(rpc), stream>>>(
      x, out, rows, rpc, vec, vec_out, scale);
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

cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, int64_t n, int m, int logp, ElementType dtype,
                            cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int ni = static_cast<int>(n);
  return dispatch_element(dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(x, out, rows, ni, m, logp, stream);
  });
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
