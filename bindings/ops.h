// bindings/ops.h -- the device-specific implementations behind moequant._C.
//
// module.cpp validates arguments (dtype, rank, contiguity, device) and dispatches here; these functions
// map tensors to pointers and call the torch-free core (CPU) or kernels (CUDA). No math lives here.
#pragma once

#include <moequant/format.h>
#include <moequant/quant.h>

#include <ATen/ATen.h>

#include <tuple>

namespace moequant {
namespace bindings {

/// codes int8, scales float32, zeros int32, dequantized float32.
using QuantTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct GptqOptions {
  bool act_order = false;
  double damp = 0.01;
  int64_t block_size = 128;
};

/// Per-solve numbers reported back to Python.
struct GptqInfo {
  double loss = 0;
  double damp_fraction = 0;
  double damp_value = 0;
  int escalations = 0;
  int64_t dead_columns = 0;
};

// ---- CPU (ops_cpu.cpp) --------------------------------------------------------------------------------------
QuantTensors quantize_rtn_cpu(const at::Tensor& w, const QuantSpec& spec);
at::Tensor dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                          const QuantSpec& spec);
at::Tensor pack_rows_cpu(const at::Tensor& q, int bits);
at::Tensor unpack_rows_cpu(const at::Tensor& packed, int bits, int64_t cols);
void accumulate_hessian_cpu(at::Tensor& H, at::Tensor& counts, at::Tensor& mass, const at::Tensor& x,
                            const at::Tensor& ids, const at::Tensor* weights);
std::tuple<QuantTensors, GptqInfo> gptq_cpu(const at::Tensor& w, const at::Tensor& h, const QuantSpec& spec,
                                            const GptqOptions& opt);
/// GPTQ in any format (moequant/gptq_format.h), CPU: w float32 [r, c] (unit-stride rows), h float32 / float64 [c, c],
/// global_scale null or a float32 tensor of one element -> format_quantize's six tensors (FormatTensors, below) + info.
std::tuple<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>, GptqInfo> gptq_format_cpu(
    const at::Tensor& w, const at::Tensor& h, const Format& f, const at::Tensor* global_scale, const GptqOptions& opt);
/// The solvers' inverse factor (gptq.h detail::gptq_factor) of h [c, c]: U float32 [c, c] row-major, U[i][j] =
/// U(i, j) in processing order; perm int64 [c] (processing position -> column); info (no loss).
std::tuple<at::Tensor, at::Tensor, GptqInfo> gptq_factor_cpu(const at::Tensor& h, bool act_order, double damp);
/// x (contiguous, float32 / bfloat16 / float16, last dim n supported) -> x H_n / sqrt(n), same dtype.
at::Tensor hadamard_cpu(const at::Tensor& x);
/// Greedy rounding correction (moequant/rounding.h): codes int8 [r, c] (copied), scales f32 / zeros int32 (or
/// null) [r, G] fixed -> (new codes, dequantized f32, {loss_before, loss_after, flips, excluded, rows_reverted}).
struct RoundingInfo {
  double loss_before = 0, loss_after = 0;
  int64_t flips = 0, excluded = 0, rows_reverted = 0;
};
std::tuple<at::Tensor, at::Tensor, RoundingInfo> greedy_rounding_cpu(const at::Tensor& w, const at::Tensor& h,
                                                                    const at::Tensor& codes, const at::Tensor& scales,
                                                                    const at::Tensor* zeros, const QuantSpec& spec,
                                                                    int passes, double outlier_quantile);

/// format_quantize's results: codes uint8 [r, c], scales f32 [sr, sc], scale_codes uint8 [sr, sc], zeros int32 [sr, sc],
/// global_scale f32 [1], dequantized f32 [r, c] (an empty [0] tensor when not requested).
using FormatTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
/// w: float32 / bfloat16 / float16 [r, c] with unit-stride rows (module.cpp checks); global_scale: null or a float32
/// tensor of one element on w's device.
FormatTensors format_quantize_cpu(const at::Tensor& w, const Format& f, const at::Tensor* global_scale,
                                  bool dequantized);
at::Tensor format_dequantize_cpu(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                                 const at::Tensor* global_scale, const Format& f, ScaleDtype out_dtype);
at::Tensor pack_fp_codes_cpu(const at::Tensor& codes, ElementKind k);
at::Tensor unpack_fp_codes_cpu(const at::Tensor& packed, ElementKind k, int64_t cols);
/// weight: uint8 view of the float8_e4m3fn [r, c] weight; scale_inv f32 [ceil(r / br), ceil(c / bc)].
at::Tensor decode_fp8_block_scaled_cpu(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                                       int64_t block_cols, ScaleDtype out_dtype);
/// blocks uint8 [rows, groups, 16], scales uint8 [rows, groups] (contiguous, flattened by module.cpp) -> [rows, groups * 32].
at::Tensor decode_mxfp4_blocks_cpu(const at::Tensor& blocks, const at::Tensor& scales, ScaleDtype out_dtype);
/// The element codecs of format.h, elementwise on contiguous CPU tensors: x float32 -> uint8 codes, and back.
at::Tensor encode_elements_cpu(const at::Tensor& x, ElementKind k);
at::Tensor decode_elements_cpu(const at::Tensor& codes, ElementKind k);

// ---- CUDA (ops_cuda.cpp; only when built with MOEQUANT_WITH_CUDA) --------------------------------------------
bool cuda_compiled();
QuantTensors quantize_rtn_cuda(const at::Tensor& w, const QuantSpec& spec);
at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                           const QuantSpec& spec);
/// host_flag: optional caller-owned page-locked CPU tensor of >= kCudaHostFlagBytes (null: torch's pinned cache).
at::Tensor pack_rows_cuda(const at::Tensor& q, int bits, const at::Tensor* host_flag);
at::Tensor unpack_rows_cuda(const at::Tensor& packed, int bits, int64_t cols);
/// x: float32, bfloat16 or float16 rows (widened exactly on the device).
/// precision: HessianPrecision of kernels.h (0 fp32 SSYRK, 1 TF32, 2 BF16 tensor-core GEMMs). symmetrize = false
/// defers the mirror of the updated triangle to hessian_symmetrize_cuda (kernels.h).
void accumulate_hessian_cuda(at::Tensor& H, at::Tensor& counts, at::Tensor& mass, const at::Tensor& x,
                             const at::Tensor& ids, const at::Tensor* weights, int precision = 0,
                             bool symmetrize = true);
/// H [E, d, d] float32 contiguous CUDA: copies the row-major upper triangle onto the lower one (in place).
void hessian_symmetrize_cuda(at::Tensor& H);
/// codes [E, r, c] int8, scales [E, r, G] f32, zeros [E, r, G] int32, dequantized [E, r, c] f32,
/// losses [E] f64 (zeros when !compute_loss), escalations [E] int32.
using GptqBatchedTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
/// w [E, r, c] and h [E, c, c] float32 contiguous CUDA tensors; h is overwritten when overwrite_h (else copied).
/// max_shared_memory_bytes: kernels.h's cap on the shared memory per block (0: the device's limit; tests force the
/// small-memory paths with it).
GptqBatchedTensors gptq_batched_cuda(const at::Tensor& w, const at::Tensor& h, const QuantSpec& spec,
                                     const GptqOptions& opt, bool compute_loss, bool overwrite_h,
                                     size_t max_shared_memory_bytes = 0);
at::Tensor hadamard_cuda(const at::Tensor& x, size_t max_shared_memory_bytes = 0);
/// Batched GPTQ in any format (kernels.h cuda_gptq_batched_format): codes uint8 [E, r, c], scales f32 [E, sr, sc],
/// scale_codes uint8 [E, sr, sc], zeros int32 [E, sr, sc], global scales f32 [E] (1 without one), dequantized f32
/// [E, r, c], losses f64 [E] (zeros when !compute_loss), escalations int32 [E].
using GptqFormatBatchedTensors =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
/// w [E, r, c] / h [E, c, c] float32 contiguous CUDA tensors (h overwritten when overwrite_h, else copied);
/// global_scales: null or float32 [E] on w's device (the callers' global scales, formats with one).
GptqFormatBatchedTensors gptq_format_batched_cuda(const at::Tensor& w, const at::Tensor& h, const Format& f,
                                                  const at::Tensor* global_scales, const GptqOptions& opt,
                                                  bool compute_loss, bool overwrite_h,
                                                  size_t max_shared_memory_bytes = 0);
FormatTensors format_quantize_cuda(const at::Tensor& w, const Format& f, const at::Tensor* global_scale,
                                   bool dequantized);
at::Tensor format_dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                                  const at::Tensor* global_scale, const Format& f, ScaleDtype out_dtype);
at::Tensor pack_fp_codes_cuda(const at::Tensor& codes, ElementKind k);
at::Tensor unpack_fp_codes_cuda(const at::Tensor& packed, ElementKind k, int64_t cols);
at::Tensor decode_fp8_block_scaled_cuda(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                                        int64_t block_cols, ScaleDtype out_dtype);
at::Tensor decode_mxfp4_blocks_cuda(const at::Tensor& blocks, const at::Tensor& scales, ScaleDtype out_dtype);

}  // namespace bindings
}  // namespace moequant
