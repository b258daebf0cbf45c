// kernels/src/hessian.cu -- routed Hessian accumulation: validation, stable counting sort, gather, mirror.
//
// The pipeline (api.cpp drives it; see docs/kernels.md):
//   prepare (this file, all stream-ordered, H untouched):
//     1. count_kernel     one warp per chunk of kSortChunkRows rows: validates expert_ids and weights (device
//                         flags) and counts the chunk's rows per expert into table[chunk][e]
//     2. chunk_scan       one thread per expert: table[.][e] becomes the exclusive prefix over chunks, the total
//                         goes to offsets[e + 1]
//     3. expert_scan      one block: offsets becomes the exclusive scan over experts
//     4. scatter_kernel   one warp per chunk again: perm[offsets[e] + table[chunk][e] + rank] = row, with the
//                         rank of a row among the same-expert rows before it in the chunk (__match_any_sync)
//                         -- a *stable* counting sort, so the result is deterministic run to run
//     5. gather           x (fp32, bf16 or fp16) widened exactly on load; fp32: one block per sorted row,
//                         rows[p] = sqrt(c) * x[perm[p]] (validates x); tf32 / bf16 (hessian_gather_tc.cu, after the host read the offsets back and uploaded
//                         its padded offsets): the same products in the GEMM input type, zero-padded to the group
//                         length: bf16 (rounded to nearest even) sample-major, one block per padded row; fp32 (TF32
//                         math) transposed to feature-major per expert, 32 x 64 tiles through shared memory
//   host: reads flags + offsets back, returns invalid (H untouched) or runs the update
//   (api.cpp: one SSYRK per expert; hessian_update.cpp: batched tensor-core GEMMs over lower-triangle tiles)
//   finish (this file): mirror_kernel copies the updated triangle onto the other (optionally deferred to
//   cuda_hessian_symmetrize); stats_kernel adds counts / mass.
// The float operations of the gather (sqrtf, one __fmul_rn) are those of the CPU accumulate_hessian, so the
// fp32 rows are bit-identical to the CPU's; only the summation order differs.
#include "element_type.cuh"
#include "hessian_launch.h"

#include <cuda_runtime.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// The expert of row i, or -1 when the row is past the end or its id is out of range (those rows are neither
// counted nor scattered, so a bad id can never write out of bounds; the flag makes the host report it).
__device__ inline int row_key(const int32_t* ids, int64_t i, int64_t n, int64_t num_experts) {
  if (i >= n) return -1;
  const int32_t e = __ldg(ids + i);
  return (e >= 0 && e < num_experts) ? e : -1;
}

// Pass 1. The warp owns row `chunk` of the table, so its updates need no atomics; __syncwarp orders one step's
// update by the group leader before the next step's read by possibly another lane.
__global__ void __launch_bounds__(128) count_kernel(const int32_t* __restrict__ ids, const float* __restrict__ weights,
                                                    int64_t n, int64_t num_experts, int64_t num_chunks,
                                                    int32_t* __restrict__ table,
                                                    unsigned long long* __restrict__ flags) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t chunk = warp; chunk < num_chunks; chunk += num_warps) {
    int32_t* counts = table + chunk * num_experts;
    for (int64_t base = chunk * kSortChunkRows; base < (chunk + 1) * kSortChunkRows && base < n; base += kWarp) {
      const int64_t i = base + lane;
      if (i < n) {
        const int32_t e = __ldg(ids + i);
        if (e < 0 || e >= num_experts) atomicMin(flags + 0, static_cast<unsigned long long>(i));
        if (weights) {
          const float c = __ldg(weights + i);
          if (!(isfinite(c) && c >= 0.0f)) atomicMin(flags + 1, static_cast<unsigned long long>(i));
        }
      }
      const int key = row_key(ids, i, n, num_experts);
      const unsigned group = __match_any_sync(kFullMask, key);
      const int leader = 31 - __clz(group);  // the highest lane of the group
      if (key >= 0 && lane == leader) counts[key] += __popc(group);
      __syncwarp();
    }
  }
}

// Pass 2: one thread per expert walks the chunks in order (coalesced across experts).
__global__ void __launch_bounds__(256) chunk_scan_kernel(int64_t num_experts, int64_t num_chunks,
                                                         int32_t* __restrict__ table, int32_t* __restrict__ offsets) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < num_experts; e += stride) {
    // kAhead independent loads in flight before the dependent stores: the walk is latency-bound otherwise
    // (num_chunks = n / 1024 serial L2 round trips, e.g. 512 for 524,288 rows).
    constexpr int kAhead = 8;
    int32_t running = 0;
    for (int64_t c0 = 0; c0 < num_chunks; c0 += kAhead) {
      int32_t t[kAhead];
#pragma unroll
      for (int k = 0; k < kAhead; ++k) t[k] = c0 + k < num_chunks ? table[(c0 + k) * num_experts + e] : 0;
#pragma unroll
      for (int k = 0; k < kAhead; ++k) {
        if (c0 + k < num_chunks) table[(c0 + k) * num_experts + e] = running;
        running += t[k];
      }
    }
    offsets[e + 1] = running;
  }
}

// Pass 3: in-place inclusive scan of offsets[1..E] by one block of kScanThreads (tiles with a carry), giving the
// exclusive scan over experts with offsets[0] = 0. E is small (tens to hundreds), one block is plenty.
constexpr int kScanThreads = 1024;
__global__ void __launch_bounds__(kScanThreads) expert_scan_kernel(int64_t num_experts, int32_t* __restrict__ offsets) {
  __shared__ int32_t warp_sums[kScanThreads / kWarp];
  const int tid = static_cast<int>(threadIdx.x), lane = tid % kWarp, wid = tid / kWarp;
  int32_t carry = 0;
  for (int64_t base = 0; base < num_experts; base += kScanThreads) {
    const int64_t idx = base + tid;
    int32_t v = idx < num_experts ? offsets[idx + 1] : 0;
#pragma unroll
    for (int o = 1; o < kWarp; o *= 2) {
      const int32_t t = __shfl_up_sync(kFullMask, v, o);
      if (lane >= o) v += t;
    }
    if (lane == kWarp - 1) warp_sums[wid] = v;
    __syncthreads();
    if (wid == 0) {
      int32_t s = warp_sums[lane];  // kScanThreads / kWarp == 32 == kWarp
#pragma unroll
      for (int o = 1; o < kWarp; o *= 2) {
        const int32_t t = __shfl_up_sync(kFullMask, s, o);
        if (lane >= o) s += t;
      }
      warp_sums[lane] = s;
    }
    __syncthreads();
    if (wid > 0) v += warp_sums[wid - 1];
    if (idx < num_experts) offsets[idx + 1] = carry + v;
    carry += warp_sums[kScanThreads / kWarp - 1];
    __syncthreads();  // warp_sums is rewritten by the next tile
  }
  if (tid == 0) offsets[0] = 0;
}
static_assert(kScanThreads / kWarp == kWarp, "expert_scan_kernel scans the warp sums with one warp");

// Pass 4: the same walk as count_kernel. Every lane of a group reads the cursor before the leader advances it.
__global__ void __launch_bounds__(128) scatter_kernel(const int32_t* __restrict__ ids, int64_t n, int64_t num_experts,
                                                      int64_t num_chunks, int32_t* __restrict__ table,
                                                      const int32_t* __restrict__ offsets,
                                                      int32_t* __restrict__ perm) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t chunk = warp; chunk < num_chunks; chunk += num_warps) {
    int32_t* cursor = table + chunk * num_experts;
    for (int64_t base = chunk * kSortChunkRows; base < (chunk + 1) * kSortChunkRows && base < n; base += kWarp) {
      const int64_t i = base + lane;
      const int key = row_key(ids, i, n, num_experts);
      const unsigned group = __match_any_sync(kFullMask, key);
      const int leader = 31 - __clz(group);
      int32_t start = 0;
      if (key >= 0) {
        start = cursor[key];
        perm[offsets[key] + start + __popc(group & lanes_below)] = static_cast<int32_t>(i);
      }
      __syncwarp();
      if (key >= 0 && lane == leader) cursor[key] = start + __popc(group);
      __syncwarp();
    }
  }
}

// Pass 5: one block per sorted row (grid-stride), threads across the row: coalesced reads of x and writes of the
// gathered row. Rows with bad ids are not in perm; rows with bad weights produce garbage that is never used
// (the host reports the flag before any SYRK). InT: x's element type, widened exactly to fp32.
template <typename InT>
__global__ void __launch_bounds__(256) gather_kernel(const InT* __restrict__ x, int64_t dim, int64_t ldx,
                                                     const float* __restrict__ weights,
                                                     const int32_t* __restrict__ perm, int64_t num_experts,
                                                     const int32_t* __restrict__ offsets,
                                                     float* __restrict__ gathered,
                                                     unsigned long long* __restrict__ flags) {
  const int64_t rows = offsets[num_experts];
  for (int64_t p = blockIdx.x; p < rows; p += gridDim.x) {
    const int64_t row = perm[p];
    const float s = weights ? sqrtf(__ldg(weights + row)) : 1.0f;  // IEEE sqrt (-prec-sqrt=true default)
    const InT* src = x + row * ldx;
    float* dst = gathered + p * dim;
    for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) {
      const float v = load_f32(src + j);
      if (!isfinite(v)) atomicMin(flags + 2, static_cast<unsigned long long>(row * dim + j));
      dst[j] = __fmul_rn(s, v);
    }
  }
}

// Finish 1: H_e's SYRK result is the column-major lower triangle = the row-major upper triangle
// (element (a, b) with b >= a at memory a * dim + b). Copy it onto the row-major strict lower triangle:
// H[r][c] = H[c][r] for r > c. 32x32 tiles through shared memory (padded to 33 against bank conflicts) so both
// the read and the write are coalesced; blocks wholly above the diagonal exit at once.
constexpr int kTile = 32;
__global__ void __launch_bounds__(kTile * 8) mirror_kernel(float* __restrict__ H, int64_t dim, int64_t num_experts,
                                                           const int32_t* __restrict__ offsets) {
  __shared__ float tile[kTile][kTile + 1];
  const int64_t tr = blockIdx.y, tc = blockIdx.x;  // destination tile (row block, column block)
  if (tc > tr) return;
  for (int64_t e = blockIdx.z; e < num_experts; e += gridDim.z) {
    if (offsets && offsets[e + 1] == offsets[e]) continue;  // untouched expert: leave H exactly as it was
    float* h = H + e * dim * dim;
    // source tile: rows tc*32.., cols tr*32.. (the row-major upper part)
    for (int k = threadIdx.y; k < kTile; k += blockDim.y) {
      const int64_t sr = tc * kTile + k, sc = tr * kTile + threadIdx.x;
      if (sr < dim && sc < dim) tile[k][threadIdx.x] = h[sr * dim + sc];
    }
    __syncthreads();
    for (int k = threadIdx.y; k < kTile; k += blockDim.y) {
      const int64_t dr = tr * kTile + k, dc = tc * kTile + threadIdx.x;
      if (dr < dim && dc < dim && dr > dc) h[dr * dim + dc] = tile[threadIdx.x][k];
    }
    __syncthreads();  // the tile is reused for the next expert
  }
}

// Finish 2: one block per expert. counts[e] += rows; mass[e] += sum of the weights in sorted order, accumulated by
// one chain of double adds exactly like the CPU loop (m = 0; m += c_i; mass += m), so mass is bit-identical. The
// chain itself is serial; what made it slow was one dependent gather weights[perm[i]] per add. Here the whole block
// loads a tile of kStatsTile weights into shared memory (independent loads, all in flight at once) while thread 0
// adds up the previous tile from shared memory. Without weights every c_i is 1 and the chain is exactly `rows`.
constexpr int kStatsThreads = 256, kStatsTile = 2048;
__global__ void __launch_bounds__(kStatsThreads) stats_kernel(const float* __restrict__ weights, int64_t num_experts,
                                                              const int32_t* __restrict__ offsets,
                                                              const int32_t* __restrict__ perm,
                                                              int64_t* __restrict__ counts,
                                                              double* __restrict__ mass) {
  __shared__ float tile[2][kStatsTile];
  for (int64_t e = blockIdx.x; e < num_experts; e += gridDim.x) {
    const int64_t b = offsets[e], rows = offsets[e + 1] - b;
    if (rows == 0) continue;
    double m = static_cast<double>(rows);  // sum of rows ones: exact (rows < 2^31)
    if (mass && weights) {
      m = 0.0;
      const int64_t tiles = (rows + kStatsTile - 1) / kStatsTile;
      auto load = [&](int64_t t) {
        float* dst = tile[t & 1];
        for (int64_t k = threadIdx.x; k < kStatsTile; k += blockDim.x) {
          const int64_t i = t * kStatsTile + k;
          if (i < rows) dst[k] = __ldg(weights + perm[b + i]);
        }
      };
      load(0);
      __syncthreads();
      for (int64_t t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) load(t + 1);  // the other buffer: nobody reads it during this step
        if (threadIdx.x == 0) {
          const float* src = tile[t & 1];
          const int cnt = static_cast<int>(rows - t * kStatsTile < kStatsTile ? rows - t * kStatsTile : kStatsTile);
#pragma unroll 8
          for (int j = 0; j < cnt; ++j) m = __dadd_rn(m, static_cast<double>(src[j]));
        }
        __syncthreads();  // tile t is consumed and tile t + 1 is complete
      }
    }
    if (threadIdx.x == 0) {
      if (counts) counts[e] += rows;
      if (mass) mass[e] = __dadd_rn(mass[e], m);
    }
  }
}

inline unsigned capped_blocks(int64_t work, int64_t per_block, int64_t cap) {
  int64_t b = (work + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > cap) b = cap;
  return static_cast<unsigned>(b);
}

}  // namespace

cudaError_t launch_hessian_prepare(const void* x, ElementType x_type, int64_t n, int64_t dim, int64_t ldx,
                                   const int32_t* expert_ids, const float* weights, int64_t num_experts,
                                   void* workspace, const HessianLayout& layout, cudaStream_t stream) {
  const HessianWorkspace ws = carve_hessian(workspace, layout);
  cudaError_t err = cudaMemsetAsync(ws.flags, 0xFF, 3 * sizeof(unsigned long long), stream);  // kNoBadIndex
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(ws.offsets, 0, static_cast<size_t>(num_experts + 1) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (n == 0) return cudaSuccess;
  const int64_t chunks = layout.num_chunks;
  err = cudaMemsetAsync(ws.table, 0, static_cast<size_t>(chunks * num_experts) * sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;

  constexpr int kWarpThreads = 128;  // 4 chunks per block
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  count_kernel<<<capped_blocks(chunks, kWarpThreads / kWarp, kMaxBlocks), kWarpThreads, 0, stream>>>(
      expert_ids, weights, n, num_experts, chunks, ws.table, ws.flags);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  chunk_scan_kernel<<<capped_blocks(num_experts, 256, kMaxBlocks), 256, 0, stream>>>(num_experts, chunks, ws.table,
                                                                                     ws.offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  expert_scan_kernel<<<1, kScanThreads, 0, stream>>>(num_experts, ws.offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  scatter_kernel<<<capped_blocks(chunks, kWarpThreads / kWarp, kMaxBlocks), kWarpThreads, 0, stream>>>(
      expert_ids, n, num_experts, chunks, ws.table, ws.offsets, ws.perm);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (layout.precision != 0) return cudaSuccess;  // the tensor-core gather follows the host's padding plan
  // n bounds the number of routed rows (the exact count is only on the device).
  dispatch_element(x_type, [&](auto tag) {
    using InT = typename decltype(tag)::type;
    gather_kernel<<<capped_blocks(n, 1, kMaxBlocks), 256, 0, stream>>>(static_cast<const InT*>(x), dim, ldx, weights,
                                                                       ws.perm, num_experts, ws.offsets,
                                                                       static_cast<float*>(ws.rows), ws.flags);
  });
  return cudaGetLastError();
}

cudaError_t launch_hessian_mirror(float* H, int64_t dim, int64_t num_experts, const int32_t* offsets,
                                  cudaStream_t stream) {
  if (dim <= 1 || num_experts <= 0) return cudaSuccess;
  const int64_t tiles = (dim + kTile - 1) / kTile;  // <= 2^26 since dim <= INT32_MAX
  if (tiles > 65535) return cudaErrorInvalidConfiguration;  // gridDim.y limit: dim > 2M is far out of scope
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles),
                  static_cast<unsigned>(num_experts < 64 ? num_experts : 64));
  mirror_kernel<<<grid, dim3(kTile, 8), 0, stream>>>(H, dim, num_experts, offsets);
  return cudaGetLastError();
}

cudaError_t launch_hessian_stats(int64_t num_experts, const float* weights, int64_t* counts, double* mass,
                                 const void* workspace, const HessianLayout& layout, cudaStream_t stream) {
  if (!counts && !mass) return cudaSuccess;
  const HessianWorkspace ws = carve_hessian(const_cast<void*>(workspace), layout);
  stats_kernel<<<capped_blocks(num_experts, 1, int64_t{1} << 16), kStatsThreads, 0, stream>>>(
      weights, num_experts, ws.offsets, ws.perm, counts, mass);
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
