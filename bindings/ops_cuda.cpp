// bindings/ops_cuda.cpp -- CUDA implementations: run on the tensors' device and the caller's current stream.
#include "checks.h"
#include "ops.h"

#include <moequant/cuda/kernels.h>
#include <moequant/pack.h>

#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace moequant {
namespace bindings {
namespace {

/// The kernels' ElementType of a float32, bfloat16 or float16 tensor; any other dtype is std::invalid_argument naming
/// `arg` (module.cpp rejects those before a CUDA op is reached).
ElementType element_type_of(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kF32;
    case at::kBFloat16: return ElementType::kBf16;
    case at::kHalf: return ElementType::kF16;
    default:
      throw std::invalid_argument(fmt::format("{}: expected dtype float32, bfloat16 or float16, got {}", arg,
                                              dtype_str(t.scalar_type())));
  }
}

}  // namespace

bool cuda_compiled() { return true; }

QuantTensors quantize_rtn_cuda(const at::Tensor& w, const QuantSpec& spec) {
  throw_if_error(validate(spec, w.size(1)));
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t rows = w.size(0), cols = w.size(1), groups = num_groups(spec, cols);
  auto opts = w.options();
  at::Tensor codes = at::empty({rows, cols}, opts.dtype(at::kChar));
  at::Tensor scales = at::empty({rows, groups}, opts.dtype(at::kFloat));
  at::Tensor zeros = at::empty({rows, groups}, opts.dtype(at::kInt));
  at::Tensor deq = at::empty({rows, cols}, opts.dtype(at::kFloat));
  at::Tensor flag = at::empty({static_cast<int64_t>(kCudaFlagBytes)}, opts.dtype(at::kByte));  // caching allocator
  throw_if_error(cuda_quantize_rtn(w.data_ptr<float>(), rows, cols, w.stride(0), spec, codes.data_ptr<int8_t>(),
                                   scales.data_ptr<float>(), zeros.data_ptr<int32_t>(), deq.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream(w.device().index()).stream(), flag.data_ptr()));
  return {codes, scales, zeros, deq};
}

at::Tensor dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                           const QuantSpec& spec) {
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  throw_if_error(cuda_dequantize(codes.data_ptr<int8_t>(), scales.data_ptr<float>(),
                                 zeros ? zeros->data_ptr<int32_t>() : nullptr, codes.size(0), codes.size(1), spec,
                                 out.data_ptr<float>(), at::cuda::getCurrentCUDAStream(codes.device().index()).stream()));
  return out;
}

at::Tensor pack_rows_cuda(const at::Tensor& q, int bits, const at::Tensor* host_flag) {
  if (host_flag != nullptr && host_flag->nbytes() < kCudaHostFlagBytes)
    throw std::invalid_argument(fmt::format("host_flag: expected a tensor of at least {} bytes, got {} bytes",
                                            kCudaHostFlagBytes, host_flag->nbytes()));
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), packed_words(q.size(1), bits)}, q.options().dtype(at::kInt));
  // The error word: page-locked host memory from torch's caching host allocator (mapped into every device under
  // unified addressing), so the kernel writes it directly -- no memset launch, no device-to-host copy. The call
  // synchronises the stream before returning, so the block is idle when it goes back to the cache.
  at::DataPtr own;
  void* flag = host_flag != nullptr ? host_flag->data_ptr() : nullptr;
  if (flag == nullptr) {
    own = at::getHostAllocator(at::kCUDA)->allocate(kCudaHostFlagBytes);
    flag = own.get();
  }
  throw_if_error(cuda_pack_rows_host_flag(q.data_ptr<int8_t>(), q.size(0), q.size(1), bits, out.data_ptr<int32_t>(),
                                          at::cuda::getCurrentCUDAStream(q.device().index()).stream(), flag));
  return out;
}

at::Tensor unpack_rows_cuda(const at::Tensor& packed, int bits, int64_t cols) {
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({packed.size(0), cols}, packed.options().dtype(at::kChar));
  throw_if_error(cuda_unpack_rows(packed.data_ptr<int32_t>(), packed.size(0), cols, bits, out.data_ptr<int8_t>(),
                                  at::cuda::getCurrentCUDAStream(packed.device().index()).stream()));
  return out;
}

void accumulate_hessian_cuda(at::Tensor& H, at::Tensor& counts, at::Tensor& mass, const at::Tensor& x,
                             const at::Tensor& ids, const at::Tensor* weights, int precision, bool symmetrize) {
  if (H.scalar_type() != at::kFloat)
    throw std::invalid_argument(fmt::format(
        "dtype: expected float32 accumulators on CUDA (float64 accumulation runs on the CPU), got {}",
        dtype_str(H.scalar_type())));
  const ElementType x_type = element_type_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), dim = x.size(1), experts = H.size(0);
  const size_t ws_bytes = cuda_hessian_workspace_bytes(n, dim, experts, precision);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  throw_if_error(cuda_accumulate_hessian(x.data_ptr(), x_type, n, dim, x.stride(0), ids.data_ptr<int32_t>(),
                                         weights ? weights->data_ptr<float>() : nullptr, experts, H.data_ptr<float>(),
                                         counts.data_ptr<int64_t>(), mass.data_ptr<double>(), ws.data_ptr(), ws_bytes,
                                         handle, at::cuda::getCurrentCUDAStream(x.device().index()).stream(),
                                         precision, symmetrize));
}

void hessian_symmetrize_cuda(at::Tensor& H) {
  if (H.scalar_type() != at::kFloat)
    throw std::invalid_argument(fmt::format("hessians: expected float32 on CUDA, got {}", dtype_str(H.scalar_type())));
  const c10::cuda::CUDAGuard guard(H.device());
  throw_if_error(cuda_hessian_symmetrize(H.data_ptr<float>(), H.size(1), H.size(0),
                                         at::cuda::getCurrentCUDAStream(H.device().index()).stream()));
}

GptqBatchedTensors gptq_batched_cuda(const at::Tensor& w, const at::Tensor& h, const QuantSpec& spec,
                                     const GptqOptions& opt, bool compute_loss, bool overwrite_h,
                                     size_t max_shared_memory_bytes) {
  throw_if_error(validate(spec, w.size(2)));
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t E = w.size(0), rows = w.size(1), cols = w.size(2), groups = num_groups(spec, cols);
  GptqArgs args;
  args.spec = spec;
  args.act_order = opt.act_order;
  args.damp = opt.damp;
  args.block_size = opt.block_size;
  auto o = w.options();
  at::Tensor codes = at::empty({E, rows, cols}, o.dtype(at::kChar));
  at::Tensor scales = at::empty({E, rows, groups}, o.dtype(at::kFloat));
  at::Tensor zeros = at::empty({E, rows, groups}, o.dtype(at::kInt));
  at::Tensor deq = at::empty({E, rows, cols}, o.dtype(at::kFloat));
  at::Tensor losses = at::zeros({E}, o.dtype(at::kDouble));
  at::Tensor esc = at::zeros({E}, o.dtype(at::kInt));
  at::Tensor hw = overwrite_h ? h : h.clone();
  const size_t ws_bytes = cuda_gptq_workspace_bytes(E, rows, cols, args);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, o.dtype(at::kByte));
  throw_if_error(cuda_gptq_batched(w.data_ptr<float>(), hw.data_ptr<float>(), E, rows, cols, args,
                                   codes.data_ptr<int8_t>(), scales.data_ptr<float>(), zeros.data_ptr<int32_t>(),
                                   deq.data_ptr<float>(), compute_loss ? losses.data_ptr<double>() : nullptr,
                                   esc.data_ptr<int32_t>(), ws.data_ptr(), ws_bytes,
                                   at::cuda::getCurrentCUDABlasHandle(),
                                   at::cuda::getCurrentCUDAStream(w.device().index()).stream(),
                                   max_shared_memory_bytes));
  return {codes, scales, zeros, deq, losses, esc};
}

GptqFormatBatchedTensors gptq_format_batched_cuda(const at::Tensor& w, const at::Tensor& h, const Format& f,
                                                  const at::Tensor* global_scales, const GptqOptions& opt,
                                                  bool compute_loss, bool overwrite_h,
                                                  size_t max_shared_memory_bytes) {
  const int64_t E = w.size(0), rows = w.size(1), cols = w.size(2);
  throw_if_error(validate(f, rows, cols));
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, cols);
  GptqFormatArgs args;
  args.format = f;
  args.act_order = opt.act_order;
  args.damp = opt.damp;
  args.block_size = opt.block_size;
  auto o = w.options();
  at::Tensor codes = at::empty({E, rows, cols}, o.dtype(at::kByte));
  at::Tensor scales = at::empty({E, sr, sc}, o.dtype(at::kFloat));
  at::Tensor scale_codes = at::zeros({E, sr, sc}, o.dtype(at::kByte));
  at::Tensor zeros = at::zeros({E, sr, sc}, o.dtype(at::kInt));
  at::Tensor g = at::ones({E}, o.dtype(at::kFloat));
  at::Tensor deq = at::empty({E, rows, cols}, o.dtype(at::kFloat));
  at::Tensor losses = at::zeros({E}, o.dtype(at::kDouble));
  at::Tensor esc = at::zeros({E}, o.dtype(at::kInt));
  at::Tensor hw = overwrite_h ? h : h.clone();
  const size_t ws_bytes = cuda_gptq_format_workspace_bytes(E, rows, cols, args);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes > 0 ? ws_bytes : 1)}, o.dtype(at::kByte));
  throw_if_error(cuda_gptq_batched_format(
      w.data_ptr<float>(), hw.data_ptr<float>(), E, rows, cols, args,
      global_scales ? global_scales->data_ptr<float>() : nullptr, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
      scale_codes.data_ptr<uint8_t>(), zeros.data_ptr<int32_t>(), g.data_ptr<float>(), deq.data_ptr<float>(),
      compute_loss ? losses.data_ptr<double>() : nullptr, esc.data_ptr<int32_t>(), ws.data_ptr(), ws_bytes,
      at::cuda::getCurrentCUDABlasHandle(), at::cuda::getCurrentCUDAStream(w.device().index()).stream(),
      max_shared_memory_bytes));
  return {codes, scales, scale_codes, zeros, g, deq, losses, esc};
}

at::Tensor hadamard_cuda(const at::Tensor& x, size_t max_shared_memory_bytes) {
  const ElementType dtype = element_type_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1), rows = n > 0 ? x.numel() / n : 0;
  at::Tensor out = at::empty_like(x);
  throw_if_error(cuda_hadamard(x.data_ptr(), out.data_ptr(), rows, n, dtype,
                               at::cuda::getCurrentCUDAStream(x.device().index()).stream(), max_shared_memory_bytes));
  return out;
}

// ---- formats (moequant/format.h) --------------------------------------------------------------------------------

namespace {
ElementType out_element_type(ScaleDtype d) { return d == ScaleDtype::kBFloat16 ? ElementType::kBf16 : ElementType::kF32; }
at::ScalarType out_scalar(ScaleDtype d) { return d == ScaleDtype::kBFloat16 ? at::kBFloat16 : at::kFloat; }
cudaStream_t stream_of(const at::Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()).stream(); }
}  // namespace

FormatTensors format_quantize_cuda(const at::Tensor& w, const Format& f, const at::Tensor* global_scale,
                                   bool dequantized) {
  const int64_t rows = w.size(0), cols = w.size(1);
  throw_if_error(validate(f, rows, cols));
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, cols);
  auto opts = w.options();
  at::Tensor codes = at::empty({rows, cols}, opts.dtype(at::kByte));
  at::Tensor scales = at::empty({sr, sc}, opts.dtype(at::kFloat));
  at::Tensor scale_codes = at::zeros({sr, sc}, opts.dtype(at::kByte));
  at::Tensor zeros = at::zeros({sr, sc}, opts.dtype(at::kInt));
  at::Tensor g = at::ones({1}, opts.dtype(at::kFloat));
  at::Tensor deq = at::empty({dequantized ? rows : 0, dequantized ? cols : 0}, opts.dtype(at::kFloat));
  at::Tensor ws = at::empty({static_cast<int64_t>(kCudaFormatWorkspaceBytes)}, opts.dtype(at::kByte));
  throw_if_error(cuda_format_quantize(
      w.data_ptr(), element_type_of(w, "w"), rows, cols, rows > 0 ? w.stride(0) : cols, f,
      global_scale ? global_scale->data_ptr<float>() : nullptr, codes.data_ptr<uint8_t>(), scales.data_ptr<float>(),
      f.scale == ScaleKind::kFloat ? nullptr : scale_codes.data_ptr<uint8_t>(),
      f.element == ElementKind::kInt && !f.symmetric ? zeros.data_ptr<int32_t>() : nullptr,
      f.global_scale ? g.data_ptr<float>() : nullptr, dequantized ? deq.data_ptr<float>() : nullptr, stream_of(w),
      ws.data_ptr()));
  return {codes, scales, scale_codes, zeros, g, deq};
}

at::Tensor format_dequantize_cuda(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* zeros,
                                  const at::Tensor* global_scale, const Format& f, ScaleDtype out_dtype) {
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(out_scalar(out_dtype)));
  throw_if_error(cuda_format_dequantize(codes.data_ptr<uint8_t>(), codes.size(0), codes.size(1),
                                        scales.data_ptr<float>(), zeros ? zeros->data_ptr<int32_t>() : nullptr,
                                        global_scale ? global_scale->data_ptr<float>() : nullptr, f, out.data_ptr(),
                                        out_element_type(out_dtype), stream_of(codes)));
  return out;
}

at::Tensor pack_fp_codes_cuda(const at::Tensor& codes, ElementKind k) {
  const c10::cuda::CUDAGuard guard(codes.device());
  at::Tensor out =
      at::empty({codes.size(0), packed_row_bytes(k, codes.size(1))}, codes.options().dtype(at::kByte));
  at::Tensor flag = at::empty({static_cast<int64_t>(kCudaFlagBytes)}, codes.options().dtype(at::kByte));
  throw_if_error(cuda_pack_fp_codes(codes.data_ptr<uint8_t>(), codes.size(0), codes.size(1), k,
                                    out.data_ptr<uint8_t>(), stream_of(codes), flag.data_ptr()));
  return out;
}

at::Tensor unpack_fp_codes_cuda(const at::Tensor& packed, ElementKind k, int64_t cols) {
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({packed.size(0), cols}, packed.options().dtype(at::kByte));
  throw_if_error(cuda_unpack_fp_codes(packed.data_ptr<uint8_t>(), packed.size(0), cols, k, out.data_ptr<uint8_t>(),
                                      stream_of(packed)));
  return out;
}

at::Tensor decode_fp8_block_scaled_cuda(const at::Tensor& weight, const at::Tensor& scale_inv, int64_t block_rows,
                                        int64_t block_cols, ScaleDtype out_dtype) {
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(out_scalar(out_dtype)));
  throw_if_error(cuda_decode_fp8_block_scaled(weight.data_ptr<uint8_t>(), weight.size(0), weight.size(1),
                                              scale_inv.data_ptr<float>(), block_rows, block_cols, out.data_ptr(),
                                              out_element_type(out_dtype), stream_of(weight)));
  return out;
}

at::Tensor decode_mxfp4_blocks_cuda(const at::Tensor& blocks, const at::Tensor& scales, ScaleDtype out_dtype) {
  const c10::cuda::CUDAGuard guard(blocks.device());
  const int64_t rows = blocks.size(0), groups = blocks.size(1);
  at::Tensor out = at::empty({rows, groups * 32}, blocks.options().dtype(out_scalar(out_dtype)));
  throw_if_error(cuda_decode_mxfp4_blocks(blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), rows, groups,
                                          out.data_ptr(), out_element_type(out_dtype), stream_of(blocks)));
  return out;
}

}  // namespace bindings
}  // namespace moequant
