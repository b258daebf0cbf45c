// kernels/src/hessian_launch.h -- internal interface of the routed Hessian: workspace layout, tile geometry of the
// tensor-core update, and the launchers of hessian.cu (driven by api.cpp and hessian_update.cpp).
//
// Like launch.h, free of fmt / status.h so that nvcc never parses fmt; the launchers return cudaError_t.
#pragma once

#include <moequant/cuda/element_type.h>

#include <cuda_runtime_api.h>

#include "launch.h"  // align256, kNoBadIndex

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// Rows per chunk of the stable counting sort: one warp ranks one chunk, 32 rows at a time.
constexpr int64_t kSortChunkRows = 1024;

/// Tensor-core paths (precision 1 / 2): every expert's rows are padded with zero rows (zero rows add exactly
/// nothing) to a length K shared by a group of experts, so that the group's tiles go into one batched GEMM call.
/// K is a multiple of kTcPadRows; the host plans the groups after the sort (hessian_update.cpp): an expert joins a
/// group when its row count rounded up to kTcPadRows is at least K - K / kTcGroupSlackDiv (<= ~1.6% zero rows).
constexpr int64_t kTcPadRows = 32;
constexpr int64_t kTcGroupSlackDiv = 64;
/// Row stride (elements) of the sample-major bf16 rows: dim rounded up to 8, so every row and tile start is 16-byte
/// aligned (the columns past dim are never read: every tile lies inside [0, dim)).
inline int64_t tc_ld(int64_t dim) { return (dim + 7) / 8 * 8; }
inline int64_t tc_padded_rows(int64_t rows) { return (rows + kTcPadRows - 1) / kTcPadRows * kTcPadRows; }
/// Bound on the planned padded rows: P = sum of tc_padded_rows(count) <= n + (kTcPadRows - 1) min(E, n); a group's
/// K exceeds a member's padded count by at most K / D (D = kTcGroupSlackDiv), so K <= padded * D / (D - 1) and the
/// total is <= P + P / (D - 1) (+1 per expert for the integer division).
inline int64_t tc_row_capacity(int64_t n, int64_t num_experts) {
  const int64_t p = n + (kTcPadRows - 1) * (num_experts < n ? num_experts : n);
  return p + p / (kTcGroupSlackDiv - 1) + (num_experts < n ? num_experts : n);
}

/// Side of the square tiles that cover the lower triangle of a tensor-core update (tile pairs i >= j). The work
/// done is nt (nt + 1) / 2 tiles of T^2 versus dim (dim + 1) / 2 useful entries: ~(1 + 1/nt) of the SYRK count;
/// larger tiles run the batched GEMMs faster but waste more on the diagonal. Measured on an H100
/// (benchmarks/probe_hessian_gemm.cu, docs/kernels.md): 512 wins once there are >= 6 tiles per side
/// (dim >= 2561), 256 below; dims <= 256 are one tile (the whole square: at most 2x of a tiny amount of work).
inline int64_t tc_tile(int64_t dim) {
  if (dim <= 256) return dim;
  return dim > 5 * 512 ? 512 : 256;
}
inline int64_t tc_tiles_per_side(int64_t dim) {
  const int64_t t = tc_tile(dim);
  return (dim + t - 1) / t;
}
inline int64_t tc_num_tiles(int64_t dim) {
  const int64_t nt = tc_tiles_per_side(dim);
  return nt * (nt + 1) / 2;
}

/// Byte layout of the Hessian workspace. Every region starts on a 256-byte boundary (cuBLAS likes aligned A).
///   flags     3 x u64: min bad row of expert_ids, min bad row of weights, min bad (row * dim + col) of x
///   offsets   (E + 1) x i32: exclusive scan of the per-expert row counts (offsets[E] = rows routed)
///   -- flags and offsets are adjacent: the host reads them back with one copy (readback_bytes) --
///   poffsets  (E + 1) x i32: tensor-core paths: start of each expert's padded rows (planned and uploaded by the host)
///   table     num_chunks x E x i32: per-chunk counts, then per-chunk start within the expert, then cursors
///   perm      n x i32: row indices sorted by expert, stable
///   rows      fp32: n x dim f32, sqrt(c_i) * x_i in sorted order, row-major;
///             tf32 (feature_major): row_capacity x dim f32: expert e's rows transposed, a [dim, K_e] row-major block
///             at element poffsets[e] * dim (K_e = poffsets[e + 1] - poffsets[e], zero columns past its count);
///             bf16: row_capacity x ld bf16, sample-major: expert e's rows at rows poffsets[e].., zero rows up to
///             poffsets[e + 1] (ld = tc_ld(dim)).
///             (Measured on an H100: TF32 GEMMs need K-major operands, ~1.2x faster; BF16 ran faster sample-major.)
///   ptrs      tensor-core paths: 3 x E x tc_num_tiles(dim) device pointers (A, B, C of the batched GEMMs)
struct HessianLayout {
  size_t flags = 0, offsets = 0, poffsets = 0, table = 0, perm = 0, rows = 0, ptrs = 0;
  size_t readback_bytes = 0;  // flags + offsets
  size_t total = 0;
  int64_t num_chunks = 0;
  int precision = 0;
  int64_t row_capacity = 0;  // rows of `rows`: n, or when padded tc_row_capacity(n, E)
  int64_t ld = 0;            // sample-major rows: row stride in elements (fp32: dim; bf16: tc_ld(dim))
  bool feature_major = false;  // tf32: rows transposed per expert (see above)
  int64_t ptr_count = 0;     // device pointers in `ptrs`
};

/// False when an argument is out of range or the size overflows (api.cpp reports which).
inline bool hessian_layout(int64_t n, int64_t dim, int64_t num_experts, int precision, HessianLayout* out) {
  constexpr int64_t kI32Max = 2147483647;
  if (n < 0 || dim <= 0 || num_experts <= 0 || n > kI32Max || dim > kI32Max || num_experts > kI32Max - 1 ||
      precision < 0 || precision > 2)
    return false;
  const int64_t kLimit = int64_t{1} << 58;  // far below size_t overflow once multiplied by 8
  const int64_t chunks = (n + kSortChunkRows - 1) / kSortChunkRows;
  if (chunks > 0 && num_experts > kLimit / chunks) return false;
  HessianLayout l;
  l.precision = precision;
  l.num_chunks = chunks;
  const bool tc = precision != 0;
  l.row_capacity = tc ? tc_row_capacity(n, num_experts) : n;
  l.feature_major = precision == 1;
  l.ld = precision == 2 ? tc_ld(dim) : dim;
  if (l.row_capacity > kI32Max) return false;  // padded offsets are int32 like the others
  if (l.row_capacity > 0 && l.ld > kLimit / l.row_capacity) return false;
  const int64_t tiles = tc ? tc_num_tiles(dim) : 0;
  if (tiles > 0 && num_experts > kLimit / (3 * tiles)) return false;
  l.ptr_count = 3 * num_experts * tiles;
  const size_t elem = precision == 2 ? 2 : 4;
  l.flags = 0;
  l.offsets = 32;  // 3 x u64 = 24 bytes, padded to 32 so offsets stay 16-byte aligned
  l.readback_bytes = l.offsets + static_cast<size_t>(num_experts + 1) * 4;
  l.poffsets = align256(l.readback_bytes);
  l.table = align256(l.poffsets + static_cast<size_t>(num_experts + 1) * 4);
  l.perm = align256(l.table + static_cast<size_t>(chunks * num_experts) * 4);
  l.rows = align256(l.perm + static_cast<size_t>(n) * 4);
  l.ptrs = align256(l.rows + static_cast<size_t>(l.row_capacity) * static_cast<size_t>(l.ld) * elem);
  l.total = align256(l.ptrs + static_cast<size_t>(l.ptr_count) * sizeof(void*));
  *out = l;
  return true;
}

/// Typed views of the workspace regions (hessian.cu, hessian_gather_tc.cu).
struct HessianWorkspace {
  unsigned long long* flags;  // [0] expert_ids row, [1] weights row, [2] x (row * dim + col)
  int32_t* offsets;           // [E + 1]
  int32_t* poffsets;          // [E + 1] (tensor-core paths)
  int32_t* table;             // [num_chunks, E]
  int32_t* perm;              // [n]
  void* rows;                 // [row_capacity, ld] f32 or bf16
};

inline HessianWorkspace carve_hessian(void* base, const HessianLayout& l) {
  char* b = static_cast<char*>(base);
  return {reinterpret_cast<unsigned long long*>(b + l.flags), reinterpret_cast<int32_t*>(b + l.offsets),
          reinterpret_cast<int32_t*>(b + l.poffsets), reinterpret_cast<int32_t*>(b + l.table),
          reinterpret_cast<int32_t*>(b + l.perm), b + l.rows};
}

/// Stage 1 (never touches H/counts/mass): resets the flags, validates ids and weights, stable counting sort of
/// the rows by expert; fp32 (layout.precision 0) also writes sqrt(c) * x into `rows` and validates x. Afterwards
/// the host reads back flags + offsets (readback_bytes from the workspace start).
/// x: [n, ldx] elements of type x_type, widened exactly to fp32 on load (element_type.cuh), so every path computes
/// exactly what it computes for x converted to fp32.
cudaError_t launch_hessian_prepare(const void* x, ElementType x_type, int64_t n, int64_t dim, int64_t ldx,
                                   const int32_t* expert_ids, const float* weights, int64_t num_experts,
                                   void* workspace, const HessianLayout& layout, cudaStream_t stream);

/// Stage 1b of the tensor-core paths, after the host uploaded its planned poffsets (non-decreasing, poffsets[0] = 0,
/// poffsets[e + 1] - poffsets[e] >= the expert's rows, multiples of kTcPadRows, poffsets[E] <= row_capacity): writes
/// sqrt(c) * x of expert e's r-th sorted row in the layout of `rows` above (tf32: fp32, feature-major; bf16: rounded
/// to nearest even from the fp32 product, sample-major), zeros up to its group length, and validates x (flag 2).
cudaError_t launch_hessian_gather_tc(const void* x, ElementType x_type, int64_t dim, int64_t ldx, const float* weights,
                                     int64_t num_experts, void* workspace, const HessianLayout& layout,
                                     cudaStream_t stream);

/// Copies the triangle the updates write (row-major upper: element (a, b), b >= a, at a * dim + b) onto the
/// row-major strict lower triangle of every expert whose offsets say it received rows (offsets = null: of every
/// expert), making H exactly symmetric. Asynchronous.
cudaError_t launch_hessian_mirror(float* H, int64_t dim, int64_t num_experts, const int32_t* offsets,
                                  cudaStream_t stream);

/// Stage 4: counts[e] += rows, mass[e] += the weights in sorted order (either may be null). Asynchronous.
cudaError_t launch_hessian_stats(int64_t num_experts, const float* weights, int64_t* counts, double* mass,
                                 const void* workspace, const HessianLayout& layout, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
