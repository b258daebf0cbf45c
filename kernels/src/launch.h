// kernels/src/launch.h -- internal interface between api.cpp (host validation, Status) and the .cu launchers.
//
// Deliberately free of fmt / status.h / quant.h so that nvcc never parses fmt: the launchers take plain
// parameters and return cudaError_t (the error of the launch itself, from cudaGetLastError, or of a
// stream-ordered memset); api.cpp turns that into Status::cuda naming the operation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// "No bad element seen": the initial value of the device-side error flags. The flags hold the smallest
/// bad linear index (atomicMin), so the host reports the same first offender as the sequential CPU code.
constexpr unsigned long long kNoBadIndex = ~0ull;

/// The QuantSpec, flattened for the kernels (validated by api.cpp).
struct RtnParams {
  int bits = 4;
  bool symmetric = false;
  int64_t group_size = 128;  // effective (> 0, divides cols)
  int scale_dtype = 0;       // ScaleDtype: 0 fp32, 1 bf16, 2 fp16
  bool mse = false;          // ScaleSearch::kMse
  int mse_grid = 100;
  int mse_steps = 0;         // floor((1 - min_shrink) * grid + 1e-9), computed on the host exactly like quant.h
  double mse_norm = 2.4;
};

// ---- quant_pack.cu ----------------------------------------------------------------------------------------
// bad_index: one device word, pre-set to kNoBadIndex by the launcher; receives min(r * cols + c) of non-finite w.
cudaError_t launch_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const RtnParams& p,
                                int8_t* codes, float* scales, int32_t* zeros, float* dequantized,
                                unsigned long long* bad_index, cudaStream_t stream);
cudaError_t launch_dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows,
                              int64_t cols, int64_t group_size, float* out, cudaStream_t stream);
// bad_index: as above, min(r * cols + i) of a code outside [qmin, qmax].
cudaError_t launch_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out,
                             unsigned long long* bad_index, cudaStream_t stream);
cudaError_t launch_unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q,
                               cudaStream_t stream);

// ---- hessian.cu ---------------------------------------------------------------------------------------------
/// Rows per chunk of the stable counting sort: one warp ranks one chunk, 32 rows at a time.
constexpr int64_t kSortChunkRows = 1024;

/// Byte layout of the Hessian workspace. Every region starts on a 256-byte boundary (cuBLAS likes aligned A).
///   flags     3 x u64: min bad row of expert_ids, min bad row of weights, min bad (row * dim + col) of x
///   offsets   (E + 1) x i32: exclusive scan of the per-expert row counts (offsets[E] = rows routed)
///   -- flags and offsets are adjacent: the host reads both back with one copy (readback_bytes) --
///   table     num_chunks x E x i32: per-chunk counts, then per-chunk start within the expert, then cursors
///   perm      n x i32: row indices sorted by expert, stable
///   gathered  n x dim x f32: sqrt(c_i) * x_i in sorted order, row-major
struct HessianLayout {
  size_t flags = 0, offsets = 0, table = 0, perm = 0, gathered = 0;
  size_t readback_bytes = 0;  // flags + offsets
  size_t total = 0;
  int64_t num_chunks = 0;
};

inline size_t align256(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

/// False when an argument is out of range or the size overflows (api.cpp reports which).
inline bool hessian_layout(int64_t n, int64_t dim, int64_t num_experts, HessianLayout* out) {
  constexpr int64_t kI32Max = 2147483647;
  if (n < 0 || dim <= 0 || num_experts <= 0 || n > kI32Max || dim > kI32Max || num_experts > kI32Max - 1) return false;
  const int64_t kLimit = int64_t{1} << 60;  // far below size_t overflow once multiplied by 4
  const int64_t chunks = (n + kSortChunkRows - 1) / kSortChunkRows;
  if (chunks > 0 && num_experts > kLimit / chunks) return false;
  if (n > 0 && dim > kLimit / n) return false;
  HessianLayout l;
  l.num_chunks = chunks;
  l.flags = 0;
  l.offsets = 32;  // 3 x u64 = 24 bytes, padded to 32 so offsets stay 16-byte aligned
  l.readback_bytes = 32 + static_cast<size_t>(num_experts + 1) * 4;
  l.table = align256(l.readback_bytes);
  l.perm = align256(l.table + static_cast<size_t>(chunks * num_experts) * 4);
  l.gathered = align256(l.perm + static_cast<size_t>(n) * 4);
  l.total = align256(l.gathered + static_cast<size_t>(n * dim) * 4);
  *out = l;
  return true;
}

/// Stage 1 (never touches H/counts/mass): resets the flags, validates ids and weights, stable counting sort of
/// the rows by expert, gathers sqrt(c) * x into `gathered` and validates x. Afterwards the host reads back
/// flags + offsets (readback_bytes from the workspace start).
cudaError_t launch_hessian_prepare(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                                   const float* weights, int64_t num_experts, void* workspace,
                                   const HessianLayout& layout, cudaStream_t stream);

/// Stage 3 (after the host ran one SYRK per non-empty expert into the column-major lower triangle): mirrors
/// that triangle of every non-empty expert's H and adds the expert's row count and weight mass.
cudaError_t launch_hessian_finish(float* H, int64_t dim, int64_t num_experts, const float* weights, int64_t* counts,
                                  double* mass, const void* workspace, const HessianLayout& layout,
                                  cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
