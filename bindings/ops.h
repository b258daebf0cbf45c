// bindings/ops.h -- the device-specific implementations behind moequant._C.
//
// module.cpp validates arguments (dtype, rank, contiguity, device) and dispatches here; these functions
// map tensors to pointers and call the torch-free core (CPU) or kernels (CUDA). No math lives here.
#pragma once

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

// ---- CUDA (ops_cuda.cpp; only when built with MOEQUANT_WITH_CUDA) --------------------------------------------
bool cuda_compiled();
QuantTensors quantize_rtn_cuda(const at::Tensor& w, const QuantSpec& spec);
at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                           const QuantSpec& spec);
at::Tensor pack_rows_cuda(const at::Tensor& q, int bits);
at::Tensor unpack_rows_cuda(const at::Tensor& packed, int bits, int64_t cols);
void accumulate_hessian_cuda(at::Tensor& H, at::Tensor& counts, at::Tensor& mass, const at::Tensor& x,
                             const at::Tensor& ids, const at::Tensor* weights);

}  // namespace bindings
}  // namespace moequant
