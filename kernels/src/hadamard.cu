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
// Shared memory per block (smem_plan.h, plan_hadamard): the launch takes the rows per CTA that fit the device; a row
// that does not fit alone (32768 and 28 * 1024 on 99 KiB devices) runs in hadamard_scratch_kernel, the same code with
// the row in global memory.
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

// Rows per CTA (hadamard_rows_per_cta) and the padded layout (hadamard_padded) are in smem_plan.h, shared with the
// host-side plan: m = 1 batches >= 256 items of 32 elements, m > 1 >= 512 columns (fewer where the device's shared
// memory per block is smaller); the padding is dropped where it would cost a CTA per SM on sm_90 (only 28 x 1024; on
// sm_80 the choice stays correct but may cost a CTA per SM).
template <int M, int K>
constexpr bool padded() {
  return hadamard_padded(M, K);
}

// Layout of the working copy: shared memory is padded (kPadded) or XOR-swizzled (kSwizzled), see padded(); the
// global scratch of hadamard_scratch_kernel is linear (kLinear: no banks to avoid, and a thread's 32 elements of
// stage 0 are then 128 contiguous bytes, stored as eight float4 instead of 32 scattered words).
constexpr int kSwizzled = 0, kPadded = 1, kLinear = 2;
template <int M, int K>
constexpr int shared_layout() {
  return padded<M, K>() ? kPadded : kSwizzled;
}

// Index of element base + off in layout L (off compile-time; no carry from base into off's bits, or off a multiple
// of 32: pad(base + off) = pad(base) + pad(off)).
template <int L>
__device__ __forceinline__ int sidx(int base, int off) {
  if constexpr (L == kPadded) {
    return base + (base >> kLogE) + off + (off >> kLogE);
  } else if constexpr (L == kSwizzled) {
    const int i = base + off;
    return i ^ ((i >> kLogE) & 31);
  } else {
    return base + off;
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
    for (int i = 0; i < kPer; ++i) v[q * kPer + i] = to_f32(e[i]);
  }
}

// Same, element by element (x not 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load32_scalar(const T* src, float (&v)[kE]) {
#pragma unroll
  for (int i = 0; i < kE; ++i) v[i] = to_f32(src[i]);
}

template <int M, int K, int L, int... Q>
__device__ __forceinline__ void mix_all(float (&acc)[M], const float* sm, int base, std::integer_sequence<int, Q...>) {
  auto block = [&](auto qc) {
    constexpr int q = decltype(qc)::value;
    float x[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = sm[sidx<L>(base, (4 * q + i) << K)];
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
template <typename T, int M, int K, int L, int S>
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
    for (int j = 0; j < kE; ++j) v[j] = sm[sidx<L>(base, j << kW0)];
    butterflies<kLogE - kF, kF>(v);
    if constexpr (kLastGlobal) {
#pragma unroll
      for (int j = 0; j < kE; ++j) dst[base + (j << kW0)] = from_f32<T>(v[j] * scale);
    } else {
#pragma unroll
      for (int j = 0; j < kE; ++j) sm[sidx<L>(base, j << kW0)] = v[j];
    }
  }
}

template <typename T, int M, int K, int L, int... S>
__device__ __forceinline__ void reg_stages(float* sm, T* dst, int items, float scale, std::integer_sequence<int, S...>) {
  (reg_stage<T, M, K, L, S + 1>(sm, dst, items, scale), ...);
}

// See the top of the file. n = M << K with K >= 5; rpc rows per CTA; threads loop over the items of a stage. `sm`:
// the CTA's fp32 working copy of its rows in layout kL: shared memory (hadamard_reg_bytes(M, K, rpc) bytes) or the
// linear global scratch (n floats, 16-byte aligned).
template <typename T, int M, int K, int kL>
__device__ __forceinline__ void hadamard_reg_body(const T* x, T* out, int64_t rows, int rpc, bool vec, bool vec_out,
                                                  float scale, float* sm) {
  constexpr int kN = M << K, kStages = (K + kLogE - 1) / kLogE;
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
    } else if constexpr (kL == kLinear) {
      float4* d4 = reinterpret_cast<float4*>(sm + u * kE);
#pragma unroll
      for (int q = 0; q < kE / 4; ++q) d4[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < kE; ++j) sm[sidx<kL>(u * kE, j)] = v[j];
    }
  }
  reg_stages<T, M, K, kL>(sm, dst, items, scale, std::make_integer_sequence<int, kStages - 1>{});
  if constexpr (staged_store<M, K>()) {
    __syncthreads();
    constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte store; a CTA's rows are a multiple of 64 elements
    const int total = rows_here * kN;
    for (int e = threadIdx.x * kPer; e < total; e += blockDim.x * kPer) {
      alignas(16) T o[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) o[i] = from_f32<T>(sm[sidx<kL>(e, i)] * scale);
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
      mix_all<M, K, kL>(acc, sm, base, std::make_integer_sequence<int, M / 4>{});
#pragma unroll
      for (int c = 0; c < M; ++c) dst[base + (c << K)] = from_f32<T>(acc[c] * scale);
    }
  }
}

template <typename T, int M, int K>
__global__ void __launch_bounds__(max_threads<M>(), min_ctas<M>())
    hadamard_reg_kernel(const T* x, T* out, int64_t rows, int rpc, bool vec, bool vec_out, float scale) {
  extern __shared__ float sm[];
  hadamard_reg_body<T, M, K, shared_layout<M, K>()>(x, out, rows, rpc, vec, vec_out, scale, sm);
}

// The same transform, one row per CTA, with the row's fp32 working copy in global memory (scratch + blockIdx.x *
// scratch_floats, linear layout) instead of shared memory: for rows longer than the device's shared memory per block
// (smem_plan.h; e.g. 32768 or 28 x 1024 on the 99 KiB of sm_86 / sm_89 / sm_120). __syncthreads orders the block's
// global accesses as it orders shared ones; the arithmetic is that of hadamard_reg_kernel (the layout only moves
// where a value is kept).
template <typename T, int M, int K>
__global__ void __launch_bounds__(max_threads<M>(), min_ctas<M>())
    hadamard_scratch_kernel(const T* x, T* out, int64_t rows, bool vec, bool vec_out, float scale, float* scratch,
                            int64_t scratch_floats) {
  hadamard_reg_body<T, M, K, kLinear>(x, out, rows, 1, vec, vec_out, scale, scratch + blockIdx.x * scratch_floats);
}

template <typename T, int M, int K>
cudaError_t launch_reg(const T* x, T* out, int64_t rows, const HadamardPlan& plan, cudaStream_t stream) {
  constexpr int kN = M << K, kPerRow = kN >> kLogE;
  const int rpc = plan.rpc;
  int threads = M > 1 ? rpc << K : rpc * kPerRow;  // m > 1: columns >= items (m < 32)
  while (threads > max_threads<M>()) threads = (threads + 1) / 2;
  threads = (threads + 31) / 32 * 32;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(kN)));
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;  // rows are 32 elements = 64 or 128 bytes apart
  const bool vec_out = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (plan.kernel == HadamardKernel::kShared) {
    if (plan.smem_bytes != hadamard_reg_bytes(M, K, rpc)) return cudaErrorInvalidValue;
    const cudaError_t err = raise_smem_limit(hadamard_reg_kernel<T, M, K>, plan.smem_bytes);
    if (err != cudaSuccess) return err;
    const int64_t blocks = (rows + rpc - 1) / rpc;
    hadamard_reg_kernel<T, M, K><<<static_cast<unsigned>(blocks), threads, plan.smem_bytes, stream>>>(
        x, out, rows, rpc, vec, vec_out, scale);
    return cudaGetLastError();
  }
  if constexpr (hadamard_has_scratch(M, K)) {
    if (plan.kernel != HadamardKernel::kScratch || rpc != 1 || plan.scratch_bytes != hadamard_scratch_bytes(M, K))
      return cudaErrorInvalidValue;
    // One row per CTA; the rows go in launches of at most two CTAs per SM, which share one scratch buffer (the
    // launches are ordered on the stream).
    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) return err;
    const int64_t chunk = rows < 2 * static_cast<int64_t>(sms) ? rows : 2 * static_cast<int64_t>(sms);
    const int64_t floats = static_cast<int64_t>(plan.scratch_bytes / sizeof(float));
    void* scratch = nullptr;
    if ((err = cudaMallocAsync(&scratch, static_cast<size_t>(chunk) * plan.scratch_bytes, stream)) != cudaSuccess)
      return err;
    for (int64_t r0 = 0; r0 < rows && err == cudaSuccess; r0 += chunk) {
      const int64_t n_rows = rows - r0 < chunk ? rows - r0 : chunk;
      hadamard_scratch_kernel<T, M, K><<<static_cast<unsigned>(n_rows), threads, 0, stream>>>(
          x + r0 * kN, out + r0 * kN, n_rows, vec, vec_out, scale, static_cast<float*>(scratch), floats);
      err = cudaGetLastError();
    }
    const cudaError_t free_err = cudaFreeAsync(scratch, stream);
    return err != cudaSuccess ? err : free_err;
  } else {
    return cudaErrorInvalidValue;  // no scratch kernel for this length: its rows always fit (plan_hadamard)
  }
}

// K = log2 p in [5, KMax]: one instantiation per supported length.
template <typename T, int M, int K, int KMax>
cudaError_t launch_reg_k(const T* x, T* out, int64_t rows, int logp, const HadamardPlan& plan, cudaStream_t stream) {
  if constexpr (K < KMax) {
    if (logp != K) return launch_reg_k<T, M, K + 1, KMax>(x, out, rows, logp, plan, stream);
  }
  return launch_reg<T, M, K>(x, out, rows, plan, stream);
}

template <typename T>
cudaError_t launch_typed(const void* xv, void* outv, int64_t rows, int n, int m, int logp, const HadamardPlan& plan,
                         cudaStream_t stream) {
  const T* x = static_cast<const T*>(xv);
  T* out = static_cast<T*>(outv);
  if (logp >= kLogE) {
    switch (m) {  // 40 * 2^k is decomposed as 20 * 2^(k+1) (hadamard_tables::decompose), so m is 1, 12, 20 or 28
      case 12: return launch_reg_k<T, 12, kLogE, 11>(x, out, rows, logp, plan, stream);  // 12 * 2048 <= 32768
      case 20: return launch_reg_k<T, 20, kLogE, 10>(x, out, rows, logp, plan, stream);
      case 28: return launch_reg_k<T, 28, kLogE, 10>(x, out, rows, logp, plan, stream);
      default: return launch_reg_k<T, 1, kLogE, 15>(x, out, rows, logp, plan, stream);
    }
  }
  // p < 32: the general kernel. At least ~2048 elements per CTA (rows of small n are batched; fewer where the
  // plan's limit says so), one thread per 8 elements of a pass.
  if (plan.kernel != HadamardKernel::kSmall || plan.smem_bytes != hadamard_small_bytes(n, plan.rpc))
    return cudaErrorInvalidValue;
  const int rpc = plan.rpc;
  const int64_t elems = static_cast<int64_t>(rpc) * n;
  int threads = static_cast<int>(elems / 8);
  if (threads < 128) threads = 128;
  if (threads > 512) threads = 512;
  const int64_t blocks = (rows + rpc - 1) / rpc;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(n)));
  hadamard_kernel<T><<<static_cast<unsigned>(blocks), threads, plan.smem_bytes, stream>>>(x, out, rows, n, m, logp, rpc,
                                                                                        scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, int64_t n, int m, int logp, ElementType dtype,
                            const HadamardPlan& plan, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (!plan.fits) return cudaErrorInvalidValue;  // the API reports it (needed and available bytes) before launching
  const int ni = static_cast<int>(n);
  return dispatch_element(dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(x, out, rows, ni, m, logp, plan, stream);
  });
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
