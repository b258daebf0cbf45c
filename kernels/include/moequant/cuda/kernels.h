// moequant/cuda/kernels.h -- the CUDA kernels of moequant behind a torch-free C++ API (target moequant::cuda).
//
// Conventions shared by every function here:
//   * pointers are raw device pointers (cudaMalloc, cudaMallocAsync or managed memory; host memory is rejected
//     with Status::invalid naming the argument); all matrices are row-major, sizes and strides in elements;
//   * the work runs on the device that owns the first input pointer (the current device is switched for the
//     call and restored) and is ordered on `stream`, which must belong to that device;
//   * the result is a moequant::Status (status.h): kInvalidArgument names the argument with the expected and
//     actual values, exactly as the CPU core does for the same input; kCudaError names the failing CUDA /
//     cuBLAS call. Nothing throws, aborts or prints;
//   * functions that must report a data-dependent error (a NaN in w, a code out of range, a bad expert id)
//     read a device-side flag back and therefore synchronize `stream` once (documented per function); the
//     others are fully asynchronous;
//   * results are bit-identical to the CPU core (quant.h, pack.h) except where noted.
#pragma once

#include <moequant/quant.h>
#include <moequant/status.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {

/// Round-to-nearest quantization of a row-major [rows, cols] float32 matrix `w` (leading dimension ld >= cols)
/// with per-group parameters from spec.search (kMinMax or kMse), bit-exact with moequant::quantize_rtn:
///   codes [rows, cols] int8, scales [rows, groups] float32, zeros [rows, groups] int32 (0 when symmetric),
///   dequantized [rows, cols] float32; every output may be null to skip it (outputs are contiguous).
/// Non-finite w is kInvalidArgument naming `w` and the first (row, col), like the CPU. Synchronizes `stream`
/// once to read that flag back (the outputs are written regardless and are meaningless on error).
/// kMse caveat: the MSE error of a candidate uses CUDA's pow (<= 2 ulp) where the CPU uses glibc's, so two
/// *different* candidates whose errors agree to the last few bits could be ranked differently.
Status cuda_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const QuantSpec& spec, int8_t* codes,
                         float* scales, int32_t* zeros, float* dequantized, cudaStream_t stream);

/// out [rows, cols] = (codes - zeros) * scales with per-group parameters [rows, groups] (zeros may be null = 0),
/// bit-exact with moequant::dequantize. Asynchronous.
Status cuda_dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows, int64_t cols,
                       const QuantSpec& spec, float* out, cudaStream_t stream);

/// Packs int8 codes [rows, cols] along the rows into out [rows, packed_words(cols, bits)] int32, the
/// compressed-tensors pack-quantized layout of pack.h (bit-exact with moequant::pack_rows). A code outside
/// [qmin, qmax] is kInvalidArgument naming `q` and the first offender. Synchronizes `stream` once.
Status cuda_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out, cudaStream_t stream);

/// Inverse of cuda_pack_rows: packed [rows, packed_words(cols, bits)] -> q [rows, cols]. Asynchronous.
Status cuda_unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q, cudaStream_t stream);

/// Bytes of device scratch cuda_accumulate_hessian needs for (n, dim, num_experts); about n * dim * 4 (the
/// gathered rows) plus O(n + n / 1024 * num_experts). Returns 0 when the arguments are out of range (the
/// accumulate call then reports which).
size_t cuda_hessian_workspace_bytes(int64_t n, int64_t dim, int64_t num_experts);

/// Routed Hessian accumulation for all experts of a layer, the contract of moequant::accumulate_hessian:
///   H[e] += sum_i c_i x_i x_i^T over the rows i with expert_ids[i] == e,
///   counts[e] += number of such rows, mass[e] += sum_i c_i (c_i = weights[i], or 1 when weights is null).
///   x [n, dim] float32 (leading dimension ldx >= dim), expert_ids int32 [n] in [0, num_experts), weights float32
///   [n] finite and >= 0 or null; H [num_experts, dim, dim] float32 row-major, fully symmetric on entry and on
///   exit; counts int64 [E] and mass float64 [E] may be null to skip them.
/// Every input is validated on the device before H, counts or mass are modified: a bad expert id, weight or a
/// non-finite x is kInvalidArgument naming `expert_ids` / `weights` / `x` at the first offending row (the CPU's
/// message), and the outputs are untouched. That needs one readback, so the call synchronizes `stream` once
/// (after the sort, before the cuBLAS work; the update itself is left asynchronous).
/// The accumulation is fp32 through cuBLAS SSYRK with TF32 disabled (relative error ~1e-6 of the CPU's);
/// rows are grouped by a stable counting sort, so the result is deterministic run to run. mass is
/// bit-identical to the CPU's. Experts with no rows are not touched at all.
/// `workspace`: device scratch of at least cuda_hessian_workspace_bytes(n, dim, num_experts) bytes, on the
/// same device, not used by other work until this call's work on `stream` completes.
/// `handle`: the caller's cuBLAS handle (created on the device of x). Its stream, pointer mode and math mode are
/// set for the call and restored before returning.
Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream);

}  // namespace v0
}  // namespace moequant
