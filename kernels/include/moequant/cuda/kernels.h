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

#include <moequant/cuda/element_type.h>  // ElementType, element_size
#include <moequant/format.h>
#include <moequant/gptq.h>
#include <moequant/gptq_format.h>
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

/// Bytes of the device scratch the error-flag overloads below take (one 64-bit flag).
constexpr size_t kCudaFlagBytes = 8;

/// As above with a caller-owned device scratch of kCudaFlagBytes on w's device (e.g. from a caching allocator),
/// used stream-ordered on `stream`; nullptr allocates it per call with cudaMallocAsync, which is much slower
/// than the kernel for small matrices when the memory pool trims at the synchronization.
Status cuda_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const QuantSpec& spec, int8_t* codes,
                         float* scales, int32_t* zeros, float* dequantized, cudaStream_t stream,
                         void* flag_workspace);

/// out [rows, cols] = (codes - zeros) * scales with per-group parameters [rows, groups] (zeros may be null = 0),
/// bit-exact with moequant::dequantize. Asynchronous.
Status cuda_dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows, int64_t cols,
                       const QuantSpec& spec, float* out, cudaStream_t stream);

/// Packs int8 codes [rows, cols] along the rows into out [rows, packed_words(cols, bits)] int32, the
/// compressed-tensors pack-quantized layout of pack.h (bit-exact with moequant::pack_rows). A code outside
/// [qmin, qmax] is kInvalidArgument naming `q` and the first offender. Synchronizes `stream` once.
Status cuda_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out, cudaStream_t stream);

/// As above with a caller-owned kCudaFlagBytes device scratch on q's device (nullptr: allocated per call).
Status cuda_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out, cudaStream_t stream,
                      void* flag_workspace);

/// Bytes of the page-locked host word cuda_pack_rows_host_flag takes (one 32-bit flag, 4-byte aligned).
constexpr size_t kCudaHostFlagBytes = 4;

/// As cuda_pack_rows, reporting through a caller-owned page-locked host word `host_flag` (kCudaHostFlagBytes,
/// mapped into q's device: cudaHostAlloc / cudaMallocHost memory, or a pinned torch tensor) instead of a device
/// flag: the call clears the word, the kernel sets it when any code is out of range, and the call reads it after
/// its one synchronisation of `stream` -- no memset launch and no device-to-host copy, which is most of the host
/// time of a call. Only when the word is set does a second pass (cuda_pack_rows with a per-call device flag) find
/// the first offender, so errors are reported exactly as by cuda_pack_rows. The word must not be shared with a
/// concurrent call.
Status cuda_pack_rows_host_flag(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out,
                                cudaStream_t stream, void* host_flag);

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

/// Precision of the Hessian update (the `precision` overloads below; the 14-argument call is kFp32):
///   kFp32  fp32 SIMT SSYRK, TF32 off -- the default, exactly the function above;
///   kTf32  fp32 rows, tensor-core GEMMs with CUBLAS_COMPUTE_32F_FAST_TF32 (10-bit mantissa products, fp32
///          accumulation): relative Frobenius error ~1e-3 of the exact H;
///   kBf16  rows sqrt(c_i) x_i rounded to bf16 (nearest even), bf16 GEMMs with fp32 accumulation (CUBLAS_COMPUTE_32F):
///          relative error ~1e-2 (each product carries the bf16 rounding of both rows).
/// The tensor-core paths read the per-expert counts back after the sort (a second synchronization), group experts
/// of similar counts, and write the scaled rows once, directly in the GEMM input type, each expert's rows padded
/// with zeros to its group's length (a multiple of 64, <= ~3% above its own count) and transposed (feature-major, so
/// both GEMM operands are K-major); then the lower triangle of every expert as square tiles (256 or 512 wide,
/// ~(1 + T/dim) of the SYRK work) by batched GEMMs (cublasGemmBatchedEx with beta = 1, one call per (group, tile
/// shape)), then the mirror like the fp32 path. Validation, errors, counts, mass and determinism are those of the
/// fp32 path. Workspace: cuda_hessian_workspace_bytes(n, dim, E, precision) (tf32: ~(n + 63 min(E, n)) * 32/31 x
/// dim floats of rows, bf16 half that, plus the GEMM pointer arrays).
enum HessianPrecision : int { kHessianFp32 = 0, kHessianTf32 = 1, kHessianBf16 = 2 };

/// Workspace for the `precision` overloads (precision 0: the 3-argument value). 0 when out of range.
size_t cuda_hessian_workspace_bytes(int64_t n, int64_t dim, int64_t num_experts, int precision);

/// cuda_accumulate_hessian with an explicit HessianPrecision (0, 1 or 2; anything else is kInvalidArgument naming
/// `precision`). precision 0 forwards to the 14-argument function unchanged.
Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                               int precision);

/// The same with the mirror optional. symmetrize = false leaves the final copy of the updated triangle onto the
/// other one to a later cuda_hessian_symmetrize (once after many batches instead of once per batch: it moves
/// E * dim^2 * 4 bytes, comparable to the update's own traffic of H). In between only the row-major upper
/// triangle of H (element (a, b), b >= a) holds the sums; the other triangle is stale (entries inside the
/// diagonal tiles of the tensor-core paths hold partial sums too) and must not be read.
Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                               int precision, bool symmetrize);

/// The same with x of ElementType x_type (element_type.h): float32, bfloat16 or float16 (IEEE half), each element
/// widened exactly to fp32 on load, so the result (and every error) equals that of the float32 call on x converted to
/// float32: a layer running in bf16 hands its activations over as they are, and the row pass moves 2 instead of 4
/// bytes per element of x. The BF16 row pass uses 16-byte vector loads when ldx * element_size(x_type) is a
/// multiple of 16, x is 16-byte aligned and dim a multiple of 8 (else a scalar path; layout affects speed only). Any other x_type value is kInvalidArgument naming `x_type`.
Status cuda_accumulate_hessian(const void* x, ElementType x_type, int64_t n, int64_t dim, int64_t ldx,
                               const int32_t* expert_ids, const float* weights, int64_t num_experts, float* H,
                               int64_t* counts, double* mass, void* workspace, size_t workspace_bytes,
                               cublasHandle_t handle, cudaStream_t stream, int precision, bool symmetrize);

/// H[e] (row-major, [num_experts, dim, dim] float32) := its row-major upper triangle mirrored onto the strict lower
/// one, for every expert: completes accumulations made with symmetrize = false. Asynchronous on `stream`.
Status cuda_hessian_symmetrize(float* H, int64_t dim, int64_t num_experts, cudaStream_t stream);

/// Bytes of device scratch cuda_gptq_batched needs (0 when the sizes overflow). About
/// 4 * E * (2 * cols^2 + rows * (cols + block) + 130 * cols) bytes: a symmetrised copy of H (act-order source and the
/// loss), the lazy-update / difference buffer [E, rows, cols], the block's D, the Cholesky panel and small arrays.
size_t cuda_gptq_workspace_bytes(int64_t num_experts, int64_t rows, int64_t cols, const GptqArgs& args);

/// Batched GPTQ of E experts sharing one shape: W [E, rows, cols] float32 (row-major, contiguous) against
/// H [E, cols, cols] float32, the semantics of moequant::gptq_solve (gptq.h) per expert: dead columns, damping
/// args.damp * mean(diag H) escalated per expert (only the experts whose factorisation failed are refactored),
/// act-order with static groups, group parameters at the group's first column from the updated columns (minmax;
/// spec.search == kMse is kNotSupported without act_order -- with act_order the static parameters use the RTN MSE
/// search of cuda_quantize_rtn), lazy block updates of args.block_size <= 128 columns (kNotSupported above).
///   H is consumed: it is overwritten (factor, then the loss's D^T D); only its lower triangle is read (as the CPU).
///   Outputs (all required, contiguous, on W's device): codes [E, rows, cols] int8, scales / zeros [E, rows, groups]
///   float32 / int32, dequantized [E, rows, cols] float32; optional: losses [E] float64 = tr((W - Q) H (W - Q)^T)
///   with the caller's H (costs one SSYRK rows x cols^2 per expert; null skips it), escalations [E] int32.
/// Numerics: one fp32 Cholesky of J P^T H P J (no inverse; see gptq_batched.cu), fp32 SGEMMs with TF32 off, so the
/// result is GPTQ on the same inputs with different rounding: not bit-identical to the CPU, the proxy loss agrees to
/// well within 1% and almost all codes are identical (tests/python/test_gptq_batched.py).
/// Errors: the CPU's kInvalidArgument messages (non-finite W / H, negative diagonal, prefixed with the expert),
/// kNumericalError naming the first expert that stays indefinite after args.max_damp_escalations.
/// Synchronizes `stream` once after the factorisation (validation flags + per-expert pivot failures), plus once per
/// escalation round; everything after that is asynchronous. `handle`: the caller's cuBLAS handle, its stream /
/// pointer mode / math mode are set for the call and restored.
Status cuda_gptq_batched(const float* W, float* H, int64_t num_experts, int64_t rows, int64_t cols,
                         const GptqArgs& args, int8_t* codes, float* scales, int32_t* zeros, float* dequantized,
                         double* losses, int32_t* escalations, void* workspace, size_t workspace_bytes,
                         cublasHandle_t handle, cudaStream_t stream);

/// cuda_gptq_batched with the shared memory per block its kernels may use capped at max_shared_memory_bytes (0: the
/// device's opt-in limit, which the call above uses; otherwise >= 49152 (48 KiB), else kInvalidArgument naming
/// `max_shared_memory_bytes`; values above the device's limit are lowered to it). The diagonal-block Cholesky kernels
/// need 129 KiB for their two work arrays in shared memory, the column kernel 64.5 KiB (block_size 128): below that
/// they keep one or both arrays in global memory (docs/kernels.md, "Shared memory per architecture"), with the same
/// arithmetic, so the result is bit-identical to that of the call above. A lower cap than the device's exists for
/// tests of those paths on large-memory GPUs.
Status cuda_gptq_batched(const float* W, float* H, int64_t num_experts, int64_t rows, int64_t cols,
                         const GptqArgs& args, int8_t* codes, float* scales, int32_t* zeros, float* dequantized,
                         double* losses, int32_t* escalations, void* workspace, size_t workspace_bytes,
                         cublasHandle_t handle, cudaStream_t stream, size_t max_shared_memory_bytes);

/// Bytes of device scratch cuda_gptq_batched_format needs (0 when the sizes overflow): cuda_gptq_workspace_bytes plus
/// 12 bytes per expert and a few flags.
size_t cuda_gptq_format_workspace_bytes(int64_t num_experts, int64_t rows, int64_t cols, const GptqFormatArgs& args);

/// Batched GPTQ of E experts in any format of format.h (moequant::gptq_solve_format per expert, gptq_format.h): the
/// solve of cuda_gptq_batched (dead columns, per-expert damping escalation, act-order, lazy blocks of block_size <= 128,
/// fp32 factorisation and trailing SGEMMs, H consumed) with the format's static tile parameters -- every expert's scales
/// (and NVFP4 global scale: global_scales_in [E] device floats, the callers' (finite, > 0), or null to compute each from
/// its expert's dead-zeroed W) derived from its original W with the dead columns zeroed, bit-identical to
/// format_quantize of that matrix -- and format.h's element rounding in the column loop. Int formats that quant.h can
/// express (per channel, groups dividing cols) run cuda_gptq_batched itself (its workspace size is smaller).
///   Outputs (contiguous, on W's device): codes [E, rows, cols] uint8 (as format_quantize: element bits, int two's
///   complement), scales [E, scale_rows, scale_cols] float32 values, dequantized [E, rows, cols] float32 (required);
///   scale_codes uint8 (FP8 / E8M0 bytes, 0 for float scales), zeros int32 (required for int elements), global_scales
///   [E] float32 (1 without one), losses [E] float64, escalations [E] int32 (nullable).
/// Numerics: the scales, scale codes, zero points and global scales are the CPU's bit for bit; the codes are GPTQ's on
/// the same inputs with the int solve's rounding differences (not bit-identical to the CPU; identical where U is
/// diagonal). Errors: the CPU's messages (format fields, a caller global scale that is not finite or > 0 naming its
/// expert, non-finite W / H, negative diagonal, an fp16 scale that overflows, prefixed with the expert), kNumericalError
/// for an expert that stays indefinite. Synchronizes `stream` once after the tile parameters (global-scale flag), once
/// after the factorisation and once per escalation round.
Status cuda_gptq_batched_format(const float* W, float* H, int64_t num_experts, int64_t rows, int64_t cols,
                                const GptqFormatArgs& args, const float* global_scales_in, uint8_t* codes,
                                float* scales, uint8_t* scale_codes, int32_t* zeros, float* global_scales,
                                float* dequantized, double* losses, int32_t* escalations, void* workspace,
                                size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                                size_t max_shared_memory_bytes = 0);

/// Orthonormal Hadamard transform of `rows` contiguous rows of length n (hadamard.h's contract:
/// out = x (H_m (x) H_{2^k}) / sqrt(n), n = m 2^k <= 32768, m in {1, 12, 20, 28, 40}); dtype (element_type.h:
/// float32, bfloat16 or float16) for both x and out (computed in fp32, rounded once to the dtype); any other dtype
/// value is kInvalidArgument naming `dtype`. x and out may be the same buffer. Matches hadamard_transform to fp32
/// rounding (different butterfly order). Asynchronous.
Status cuda_hadamard(const void* x, void* out, int64_t rows, int64_t n, ElementType dtype, cudaStream_t stream);

/// cuda_hadamard with the shared memory per block capped at max_shared_memory_bytes (0: the device's opt-in limit;
/// otherwise >= 49152, else kInvalidArgument; lowered to the device's limit). Rows that need more than the cap
/// (one row of 32768 takes 132 KiB, of 28 x 1024 112 KiB) are transformed with fewer rows per CTA or, when a single row
/// does not fit, by a kernel that keeps the row in global memory (allocated stream-ordered with cudaMallocAsync,
/// at most two rows per SM at a time). Bit-identical to the call above.
Status cuda_hadamard(const void* x, void* out, int64_t rows, int64_t n, ElementType dtype, cudaStream_t stream,
                     size_t max_shared_memory_bytes);

// ---- weight formats (moequant/format.h) -----------------------------------------------------------------------------
// The CPU core's functions of format.h on the GPU, bit-identical to them (the kernels run format.h's own scalar code):
// codes, scales, scale bytes, zero points, global scales and dequantized values compare with torch.equal. Matrices are
// row-major; outputs contiguous; every output pointer may be null to skip it.

/// Bytes of the device scratch of cuda_format_quantize (flags, the tensor range, the global scale).
constexpr size_t kCudaFormatWorkspaceBytes = 64;

/// format_quantize on the GPU: w [rows, cols] of ElementType w_type (float32, bfloat16 or float16, widened exactly) with
/// row stride ld >= cols; codes [rows, cols] uint8, scales [scale_rows, scale_cols] float32 (values), scale_codes
/// (FP8 / E8M0 bytes), zeros int32 (asymmetric int), global_scale_out [1], dequantized [rows, cols] float32.
/// global_scale_in: a device float (the caller's global scale, e.g. shared by fused gate / up) or null (computed from
/// w's absmax); ignored by formats without a global scale. Errors are the CPU's: a non-finite w names the first (row,
/// col); a caller's global scale that is not finite or <= 0 names its value. Per-tensor scales and computed global scales
/// read w twice (a range pass first). Synchronizes `stream` once (the error flags). workspace: kCudaFormatWorkspaceBytes
/// of device memory on w's device used stream-ordered, or null (allocated per call with cudaMallocAsync).
Status cuda_format_quantize(const void* w, ElementType w_type, int64_t rows, int64_t cols, int64_t ld, const Format& f,
                            const float* global_scale_in, uint8_t* codes, float* scales, uint8_t* scale_codes,
                            int32_t* zeros, float* global_scale_out, float* dequantized, cudaStream_t stream,
                            void* workspace);

/// format_dequantize on the GPU: codes [rows, cols] uint8, scales [scale_rows, scale_cols] float32 values, zeros int32
/// (nullable), global_scale a device float (required by formats with a global scale; its value is not checked on the
/// device: a value that is not finite or <= 0 gives inf / NaN outputs instead of the CPU's error) -> out [rows, cols]
/// of out_type (float32 or bfloat16, rounded to nearest even). Asynchronous.
Status cuda_format_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const float* scales,
                              const int32_t* zeros, const float* global_scale, const Format& f, void* out,
                              ElementType out_type, cudaStream_t stream);

/// pack_codes on the GPU: codes [rows, cols] -> out [rows, packed_row_bytes(element, cols)] (FP4 two codes per byte, low
/// nibble first; FP6 four codes per three bytes; FP8 a copy). A code too wide for the element is the CPU's error naming
/// the first one; FP4 / FP6 synchronize `stream` once for it. flag_workspace: kCudaFlagBytes of device memory or null.
Status cuda_pack_fp_codes(const uint8_t* codes, int64_t rows, int64_t cols, ElementKind element, uint8_t* out,
                          cudaStream_t stream, void* flag_workspace);

/// unpack_codes on the GPU (the inverse of cuda_pack_fp_codes). Asynchronous.
Status cuda_unpack_fp_codes(const uint8_t* packed, int64_t rows, int64_t cols, ElementKind element, uint8_t* codes,
                            cudaStream_t stream);

/// decode_fp8_block_scaled on the GPU (DeepSeek-V3 / Kimi-K2 weights): weight float8_e4m3fn bytes [rows, cols],
/// scale_inv float32 [ceil(rows / block_rows), ceil(cols / block_cols)] -> out (float32 or bfloat16). Asynchronous.
Status cuda_decode_fp8_block_scaled(const uint8_t* weight, int64_t rows, int64_t cols, const float* scale_inv,
                                    int64_t block_rows, int64_t block_cols, void* out, ElementType out_type,
                                    cudaStream_t stream);

/// decode_mxfp4_blocks on the GPU (gpt-oss weights): blocks [rows, groups, 16] bytes, scales [rows, groups] E8M0 bytes ->
/// out [rows, groups * 32] (float32 or bfloat16). Asynchronous.
Status cuda_decode_mxfp4_blocks(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups, void* out,
                                ElementType out_type, cudaStream_t stream);

}  // namespace v0
}  // namespace moequant
