// kernels/src/launch.h -- internal interface between api.cpp (host validation, Status) and the .cu launchers.
//
// Deliberately free of fmt / status.h / quant.h so that nvcc never parses fmt: the launchers take plain
// parameters and return cudaError_t (the error of the launch itself, from cudaGetLastError, or of a
// stream-ordered memset); api.cpp turns that into Status::cuda naming the operation.
#pragma once

#include <moequant/cuda/element_type.h>

#include "smem_plan.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// Grid size for a grid-stride loop over `work` items of `per_block` each, capped: beyond ~2^16 blocks of 256
/// threads the grid already covers every SM many times over, and the cap keeps the grid within hardware limits.
inline unsigned grid_for(int64_t work, int64_t per_block) {
  constexpr int64_t kMaxBlocks = int64_t{1} << 16;
  int64_t b = (work + per_block - 1) / per_block;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned>(b);
}

/// Raises a kernel's dynamic shared-memory limit when a launch needs more than the 48 KiB default (a driver call per
/// launch: the library keeps no process-wide record of kernels already raised). `smem` comes from a plan of
/// smem_plan.h made for the device's opt-in limit, so it never exceeds what the device allows.
template <typename Kernel>
inline cudaError_t raise_smem_limit(Kernel kernel, size_t smem) {
  if (smem <= kDefaultSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(smem));
}

/// Warp width and the full-warp mask of the __shfl_*_sync / __ballot_sync calls of the kernels.
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

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
// bad_index: as above, min(r * cols + i) of a code outside [qmin, qmax]. When bad_index is null, any_bad (a
// device-accessible word the caller cleared, e.g. mapped page-locked host memory; no memset is issued) is set to 1
// if any code is out of range.
cudaError_t launch_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out,
                             unsigned long long* bad_index, unsigned int* any_bad, cudaStream_t stream);
cudaError_t launch_unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q,
                               cudaStream_t stream);

// ---- hessian.cu: see hessian_launch.h ---------------------------------------------------------------------

/// Workspace regions start on 256-byte boundaries (cuBLAS likes aligned operands).
inline size_t align256(size_t v) { return (v + 255) & ~static_cast<size_t>(255); }

// ---- hadamard.cu ----------------------------------------------------------------------------------------------
/// out [rows, n] = x (H_m (x) H_{2^logp}) / sqrt(n), n = m << logp <= 32768 (validated by the caller).
/// x and out have the same dtype (validated by the caller); they may alias. `plan`: plan_hadamard(m, logp, rows,
/// limit) with plan.fits (smem_plan.h); the scratch kernel allocates its global memory stream-ordered
/// (cudaMallocAsync / cudaFreeAsync on `stream`).
cudaError_t launch_hadamard(const void* x, void* out, int64_t rows, int64_t n, int m, int logp, ElementType dtype,
                            const HadamardPlan& plan, cudaStream_t stream);

// ---- gptq_batched.cu (driven by gptq_api.cpp) -------------------------------------------------------------------
/// Byte layout of the batched GPTQ workspace (every region 256-byte aligned). E experts, W [E, rows, cols].
///   flags    4 x u64: min bad linear index of W (e, r, c), of H (e, r, c), of a negative diag (e, i); spare
///   fail     E x i32: 1 when the expert's last factorisation hit a non-positive / non-finite pivot
///   rbad     E x i32: 1 when the expert's scaled inverse factor has a non-finite entry
///   -- flags, fail, rbad are adjacent: one readback (readback_bytes) --
///   mean     E x f64: mean of the dead-fixed diagonal;  rtn_flag: u64 for launch_quantize_rtn
///   perm     E x cols i32 (processing order -> original column), inv E x cols i32 (its inverse), dead E x cols u8
///   dinv     E x 128 x 128 f32 (inverse diagonal blocks), panel E x cols x 128 f32
///   tinv     E x t x t f32, t = cols / 2 + 128: the product L21 X11 of the recursive triangular inverse
///   h0       E x cols x cols f32: the caller's H, symmetrised from its lower triangle
///   dw       E x rows x cols f32: without act-order the lazy updates; with act-order the dead-zeroed W (first in
///            the original order for the static parameters, then in processing order) plus the lazy updates, and
///            each processed block's dequantized values in its own columns; after the loop D = W - Q
///   dblk     E x rows x block f32: D of the current block
///   partial  E x loss_chunks f64: partial sums of the loss
struct GptqLayout {
  size_t flags = 0, fail = 0, rbad = 0, mean = 0, rtn_flag = 0, perm = 0, inv = 0, dead = 0, dinv = 0, panel = 0,
         tinv = 0, h0 = 0, dw = 0, dblk = 0, partial = 0;
  size_t readback_bytes = 0, total = 0;
  int64_t block = 0, loss_chunks = 0;
};
constexpr int64_t kLossRowsPerChunk = 16;

/// False when the sizes overflow (the API reports it).
inline bool gptq_layout(int64_t E, int64_t rows, int64_t cols, int64_t block, GptqLayout* out) {
  if (E <= 0 || rows <= 0 || cols <= 0 || block <= 0) return false;
  const int64_t kLimit = int64_t{1} << 58;
  if (cols > kLimit / cols || E > kLimit / (cols * cols) || rows > kLimit / cols || E > kLimit / (rows * cols))
    return false;
  GptqLayout l;
  l.block = block < cols ? block : cols;
  l.loss_chunks = (cols + kLossRowsPerChunk - 1) / kLossRowsPerChunk;
  const size_t e = static_cast<size_t>(E), r = static_cast<size_t>(rows), c = static_cast<size_t>(cols);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align256(off + bytes);
    return at;
  };
  l.flags = 0;
  l.fail = 32;
  l.rbad = 32 + e * 4;
  l.readback_bytes = 32 + e * 8;
  off = align256(l.readback_bytes);
  l.mean = take(e * 8);
  l.rtn_flag = take(8);
  l.perm = take(e * c * 4);
  l.inv = take(e * c * 4);
  l.dead = take(e * c);
  l.dinv = take(e * kCholBlock * kCholBlock * 4);
  l.panel = take(e * c * kCholBlock * 4);
  const size_t t = c / 2 + kCholBlock;
  l.tinv = take(e * t * t * 4);
  l.h0 = take(e * c * c * 4);
  l.dw = take(e * r * c * 4);
  l.dblk = take(e * r * static_cast<size_t>(l.block) * 4);
  l.partial = take(e * static_cast<size_t>(l.loss_chunks) * 8);
  l.total = off;
  *out = l;
  return true;
}

/// Stage 1 (all experts): resets flags; h0 = H symmetrised from its lower triangle, validates H (finite, diag >= 0),
/// dead flags; validates W; act_order: dw = dead-zeroed W; mean of the fixed diagonal; act_order: perm (descending
/// diagonal, ties by column) and inv. Without act_order perm is not written (the kernels use the identity).
cudaError_t launch_gptq_prepare(const float* W, const float* H, int64_t E, int64_t rows, int64_t cols, bool act_order,
                                void* workspace, const GptqLayout& l, cudaStream_t stream);

/// Act-order, after the static parameters: dw = the dead-zeroed W in processing order (dw[:, k] = W[:, perm[k]]), so
/// the column loop reads and writes its block's columns contiguously; the lazy updates then accumulate onto it.
cudaError_t launch_gptq_permute_w(const float* W, int64_t E, int64_t rows, int64_t cols, void* workspace,
                                  const GptqLayout& l, cudaStream_t stream);

/// Act-order, after the column loop: codes and dequantized values from processing order (codes in place, the
/// dequantized values from dw) to the original column order.
cudaError_t launch_gptq_unpermute(int64_t E, int64_t rows, int64_t cols, int8_t* codes, float* dequantized,
                                  void* workspace, const GptqLayout& l, cudaStream_t stream);

/// A = J P^T (H0 with dead diag = 1) P J + lambda_e I (column-major, into H + e * cols^2) for experts [e0, e0 + n),
/// lambda_e = frac * mean_e; clears their fail / rbad flags.
cudaError_t launch_gptq_build(float* H, int64_t cols, int64_t e0, int64_t n, double frac, bool act_order,
                              void* workspace, const GptqLayout& l, cudaStream_t stream);

/// Factorises the diagonal block [k0, k0 + bk) of A (experts [e0, e0 + n)) in place and writes its inverse to dinv;
/// a non-positive or non-finite pivot sets fail[e] (the block becomes the identity so the rest stays finite).
/// `sp` (plan_gptq_smem for the device) says how many of its two work arrays live in shared memory.
cudaError_t launch_chol_diag(float* H, int64_t cols, int64_t k0, int bk, int64_t e0, int64_t n, void* workspace,
                             const GptqLayout& l, const GptqSmemPlan& sp, cudaStream_t stream);

/// Copies panel rows [k1, cols) of columns [k0, k0 + bk) back into A (experts [e0, e0 + n)).
cudaError_t launch_chol_panel_copy(float* H, int64_t cols, int64_t k0, int64_t k1, int bk, int64_t e0, int64_t n,
                                   void* workspace, const GptqLayout& l, cudaStream_t stream);

/// Before the blocked inverse of L (experts [e0, e0 + n)): zero the strict upper part, invert the diagonal blocks
/// (work arrays as `sp` says; with fewer than two in shared memory the inverses are built in the panel region of
/// the workspace, free once the factorisation is done).
cudaError_t launch_gptq_invert_prepare(float* H, int64_t cols, int64_t e0, int64_t n, void* workspace,
                                       const GptqLayout& l, const GptqSmemPlan& sp, cudaStream_t stream);

/// X = L^-1 (lower, column-major) -> U = J X J with U(k, j) at j * cols + k (the upper factor of Hp^-1). Sets
/// rbad[e] for a non-finite upper entry or a diagonal entry <= 0. Experts [e0, e0 + n).
cudaError_t launch_gptq_finish_factor(float* H, int64_t cols, int64_t e0, int64_t n, void* workspace,
                                      const GptqLayout& l, cudaStream_t stream);

/// The column loop of block [i1, i1 + bw) for all experts (see gptq_batched.cu); U's diagonal block in shared
/// memory when sp.block_shared, else read from H. Act-order: w, codes and dequantized values in processing order in
/// dw / codes (launch_gptq_permute_w before, launch_gptq_unpermute after the loop).
cudaError_t launch_gptq_block(const float* W, const float* H, int64_t E, int64_t rows, int64_t cols, int64_t i1, int bw,
                              const RtnParams& p, bool act_order, int8_t* codes, float* scales, int32_t* zeros,
                              float* dequantized, void* workspace, const GptqLayout& l, const GptqSmemPlan& sp,
                              cudaStream_t stream);

/// dw = W - dequantized (all experts), the operand of the loss SYRK.
cudaError_t launch_gptq_loss_diff(const float* W, const float* dequantized, int64_t E, int64_t rows, int64_t cols,
                                  void* workspace, const GptqLayout& l, cudaStream_t stream);

/// losses[e] = sum over the column-major upper triangle of S_e = D_e^T D_e (stored in H) of w * h0 * S (w = 2 off the
/// diagonal), in double, deterministic.
cudaError_t launch_gptq_loss_reduce(const float* H, int64_t E, int64_t cols, double* losses, void* workspace,
                                    const GptqLayout& l, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
