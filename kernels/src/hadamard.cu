// kernels/src/hadamard.cu -- orthonormal Hadamard transform along the last dimension (fp32 / bf16 / fp16).
//
// out[row] = x[row] (H_m (x) H_p) / sqrt(n), n = m * p, p = 2^k, m in {1, 12, 20, 28, 40} (hadamard.h has the
// contract; hadamard_tables.h the sign tables). Arithmetic in fp32 registers, one rounding to the output dtype.
//
// Main kernel (p >= 32): one pass, a CTA transforms tiles of `rpc` whole rows, the rows in shared memory as fp32
// between stages. The index bits of each length-p segment are processed five at a time: in every stage a thread
// owns 32 elements whose indices differ only in a five-bit window [w0, w0 + 5) and does those butterflies in
// registers.
//   stage 0     32 contiguous elements (16-byte loads), window [0, 5);
//   stage s>0   window [min(5s, k - 5), +5) read from shared memory; only bits [5s, min(5s + 5, k)) are transformed
//               (the last window is shifted down so it stays inside the segment);
//   last stage  m = 1: scaled and stored to global memory (K = 6..9: back to shared memory, then coalesced 16-byte
//               stores, see staged_store); m > 1: back to shared memory, then the mix.
// Mix (m = 12, 20, 28; 40 * 2^k runs as 20 * 2^(k+1)): a thread owns the m values X[a][b] of one column b and forms
// y_c = sum_a H[a][c] X[a][b] with the signs as compile-time constants, four rows of H at a time: the 8 sign
// patterns (x0 +- x1 +- x2 +- x3) cost 12 adds and every column then takes one of them (+-), so a column costs
// m/4 adds instead of m (hadamard_device.cuh).
// Pipelined variant (2-byte dtypes, pipe_shape: p >= 1024, and m = 28 with p = 256, 512): a persistent grid (as many
// CTAs as fit); each CTA copies its next tile's raw rows into a second shared buffer with cp.async while it works
// on the current tile, so the loads overlap the butterflies, the mix and the stores instead of alternating with them.
// Shared memory is addressed through pad(i) = i + i / 32 (one spare word per 32): the write of stage 0 (lanes 32
// elements apart) and every later access (lanes on consecutive indices, or for k < 10 on consecutive items) are
// free of bank conflicts, and a thread's 32 addresses are one register plus compile-time offsets. Where the padding
// would cost a CTA per SM (28 * 1024) the XOR swizzle i ^ ((i / 32) % 32) is used instead (same conflict freedom).
// Small p (< 32: n = 1..16, 12..m*16) takes the general kernel of hadamard_small.cuh.
// x and out may be the same buffer (a tile is read completely, by the one CTA that owns it, before it is written).
#include "launch.h"

#include "hadamard_small.cuh"

#include <atomic>
#include <cstdlib>

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

// Shapes (per dtype) that take the pipelined kernel.
template <typename T, int M, int K>
constexpr bool pipe_shape() {
  return sizeof(T) == 2 && ((M == 1 && K >= 10) || (M == 28 && (K == 8 || K == 9)) || (M == 12 && K == 6));
}

// Rows per tile. m = 1: >= 256 items of 32 elements; m > 1: >= 512 columns (a mix thread's work), >= 256 when
// pipelined (smaller tiles: more CTAs per SM next to their second buffer).
template <int M, int K, bool kPipe>
constexpr int rows_per_tile() {
  constexpr int kPerRow = (M << K) >> kLogE;
  if constexpr (M > 1) return K >= (kPipe ? 8 : 9) ? 1 : (kPipe ? 256 : 512) >> K;
  return kPerRow < 256 ? (256 + kPerRow - 1) / kPerRow : 1;
}

// Padded layout unless the padding lowers the CTAs per SM below both three and the unpadded count.
template <int M, int K>
constexpr bool padded() {
  constexpr long kB = static_cast<long>(rows_per_tile<M, K, false>()) * (M << K) * 4, kSM = 228 * 1024, kRes = 1024;
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

// Floats of the work buffer for `elems` elements (a multiple of 32), rounded up to 16 bytes: the raw buffer follows.
template <bool P>
__host__ __device__ constexpr int work_floats(int elems) {
  return ((P ? elems + elems / 32 : elems) + 3) & ~3;
}

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

// Pipelined kernel: 16-byte chunk c of a tile (2-byte T) lands in slot c ^ ((c >> 3) & 3), a permutation inside each
// item's four chunks that keeps the copy (lanes on consecutive chunks) and load32_raw (lanes 64 bytes apart, 8 lanes
// per 128-byte phase) free of bank conflicts.
template <typename T>
__device__ __forceinline__ void prefetch(const T* src, uint4* raw, int elems) {
  const uint4* g = reinterpret_cast<const uint4*>(src);
  const int chunks = elems / 8;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) cp_async16(raw + (c ^ ((c >> 3) & 3)), g + c);
  cp_async_commit();
}

template <typename T>
__device__ __forceinline__ void load32_raw(const uint4* raw, int u, float (&v)[kE]) {
  const int k = (u >> 1) & 3;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 c = raw[4 * u + (q ^ k)];
    const T* e = reinterpret_cast<const T*>(&c);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[q * 8 + i] = to_f32<T>(e[i]);
  }
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
  if constexpr (S > 1) __syncthreads();  // stage 1 follows the barrier after stage 0
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

// See the top of the file. n = M << K with K >= 5; tiles of rpc rows, tile blockIdx.x + i * gridDim.x; threads
// loop over the items of a stage.
template <typename T, int M, int K, bool kPipe>
__global__ void __launch_bounds__(max_threads<M>(), min_ctas<M>())
    hadamard_reg_kernel(const T* x, T* out, int64_t rows, int rpc, bool vec, bool vec_out, float scale) {
  extern __shared__ __align__(16) float sm[];
  constexpr int kN = M << K, kStages = (K + kLogE - 1) / kLogE;
  constexpr bool kP = padded<M, K>();
  constexpr bool kDirect = M == 1 && kStages == 1;  // n = 32: stage 0 is the whole transform
  const int64_t tiles = (rows + rpc - 1) / rpc;
  auto rows_in = [&](int64_t tile) { return static_cast<int>(rows - tile * rpc < rpc ? rows - tile * rpc : rpc); };
  [[maybe_unused]] uint4* raw = reinterpret_cast<uint4*>(sm + work_floats<kP>(rpc * kN));
  if constexpr (kPipe) prefetch<T>(x + static_cast<int64_t>(blockIdx.x) * rpc * kN, raw, rows_in(blockIdx.x) * kN);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int rows_here = rows_in(tile);
    const int items = rows_here * (kN >> kLogE);
    const T* src = x + tile * rpc * kN;
    T* dst = out + tile * rpc * kN;
    if constexpr (kPipe) cp_async_wait_all();
    __syncthreads();  // the tile's raw rows are in; the previous tile is done with the work buffer
    for (int u = threadIdx.x; u < items; u += blockDim.x) {
      float v[kE];
      if constexpr (kPipe) load32_raw<T>(raw, u, v);
      else if (vec) load32<T>(src + u * kE, v);
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
    __syncthreads();
    if constexpr (kPipe) {  // the raw buffer is free: fetch the next tile while this one finishes
      if (tile + gridDim.x < tiles) prefetch<T>(x + (tile + gridDim.x) * rpc * kN, raw, rows_in(tile + gridDim.x) * kN);
    }
    reg_stages<T, M, K, kP>(sm, dst, items, scale, std::make_integer_sequence<int, kStages - 1>{});
    if constexpr (staged_store<M, K>()) {
      __syncthreads();
      constexpr int kPer = 16 / sizeof(T);  // elements per 16-byte store; a tile's rows are a multiple of 64 elements
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
      if constexpr (kStages > 1) __syncthreads();
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
}

// One-time setup per kernel and device, cached: the dynamic shared-memory limit and the resident CTAs per SM times
// the SM count (the grid of the pipelined kernel). 0: not done yet.
constexpr int kMaxDevices = 64;

template <typename Kernel>
cudaError_t setup_once(Kernel kernel, int threads, size_t smem, std::atomic<int>* cache, int* resident) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < kMaxDevices && (*resident = cache[dev].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  int per_sm = 0, sms = 0;
  if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem)) != cudaSuccess) return err;
  if ((err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess) return err;
  *resident = (per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  if (dev < kMaxDevices) cache[dev].store(*resident, std::memory_order_relaxed);
  return cudaSuccess;
}

template <typename T, int M, int K, bool kPipe>
cudaError_t launch_reg(const T* x, T* out, int64_t rows, bool vec, bool vec_out, cudaStream_t stream) {
  constexpr int kN = M << K, kPerRow = kN >> kLogE, kRpc = rows_per_tile<M, K, kPipe>();
  constexpr bool kDirect = M == 1 && K == kLogE;
  auto threads_for = [](int rpc) {
    int threads = M > 1 ? rpc << K : rpc * kPerRow;  // m > 1: columns >= items (m < 32)
    while (threads > max_threads<M>()) threads = (threads + 1) / 2;
    return (threads + 31) / 32 * 32;
  };
  auto smem_for = [](int rpc) -> size_t {
    if (kDirect) return 0;
    return work_floats<padded<M, K>()>(rpc * kN) * sizeof(float) + (kPipe ? size_t{1} * rpc * kN * sizeof(T) : 0);
  };
  const auto kernel = hadamard_reg_kernel<T, M, K, kPipe>;
  static std::atomic<int> cache[kMaxDevices];
  int resident = 0;
  cudaError_t err = setup_once(kernel, threads_for(kRpc), smem_for(kRpc), cache, &resident);
  if (err != cudaSuccess) return err;
  const int rpc = rows < kRpc ? static_cast<int>(rows) : kRpc;
  const int64_t tiles = (rows + rpc - 1) / rpc;
  const int64_t blocks = kPipe && tiles > resident ? resident : tiles;
  const float scale = static_cast<float>(1.0 / sqrt(static_cast<double>(kN)));
  kernel<<<static_cast<unsigned>(blocks), threads_for(rpc), smem_for(rpc), stream>>>(x, out, rows, rpc, vec, vec_out,
                                                                                   scale);
  return cudaGetLastError();
}

template <typename T, int M, int K>
cudaError_t launch_shape(const T* x, T* out, int64_t rows, cudaStream_t stream) {
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0;  // rows are 32 elements = 64 or 128 bytes apart
  const bool vec_out = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if constexpr (pipe_shape<T, M, K>()) {
    const char* env = std::getenv("MOEQUANT_HADAMARD_PIPE");  // TEMPORARY: A/B switch for the benchmark
    if (vec && !(env && env[0] == '0')) return launch_reg<T, M, K, true>(x, out, rows, vec, vec_out, stream);
  }
  return launch_reg<T, M, K, false>(x, out, rows, vec, vec_out, stream);
}

// K = log2 p in [5, KMax]: one instantiation per supported length.
template <typename T, int M, int K, int KMax>
cudaError_t launch_reg_k(const T* x, T* out, int64_t rows, int logp, cudaStream_t stream) {
  if constexpr (K < KMax) {
    if (logp != K) return launch_reg_k<T, M, K + 1, KMax>(x, out, rows, logp, stream);
  }
  return launch_shape<T, M, K>(x, out, rows, stream);
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
