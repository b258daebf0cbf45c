// kernels/src/api_format.cpp -- the weight-format functions of moequant/cuda/kernels.h: the CPU core's argument checks
// (format.h's validate and messages), device checks, the error-flag readback, around the launchers of format.cu.
// Host compiler only (fmt stays out of nvcc).
#include <moequant/cuda/kernels.h>
#include <moequant/format.h>
#include <moequant/status.h>

#include "api_common.h"
#include "format_launch.h"
#include "launch.h"

#include <cstring>

namespace moequant {
inline namespace v0 {
namespace {

using api_detail::check_on_device;
using api_detail::device_of;
using api_detail::nan_or_inf;
using api_detail::read_back;
using api_detail::ScopedDevice;

static_assert(sizeof(cuda_detail::FormatWorkspace) <= kCudaFormatWorkspaceBytes, "FormatWorkspace too large");

/// The caller's device scratch, or one allocated stream-ordered for the call (freed on every path).
class Scratch {
 public:
  explicit Scratch(cudaStream_t stream) : stream_(stream) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (own_) (void)cudaFreeAsync(own_, stream_);
  }
  Status get(void* external, size_t bytes, void** out) {
    if (external != nullptr) {
      *out = external;
      return {};
    }
    MQ_CUDA_RETURN("cudaMallocAsync", cudaMallocAsync(&own_, bytes, stream_));
    *out = own_;
    return {};
  }

 private:
  cudaStream_t stream_;
  void* own_ = nullptr;
};

Status check_out_type(ElementType t) {
  if (t != ElementType::kF32 && t != ElementType::kBf16)
    return Status::invalid("out_dtype: expected 0 (float32) or 1 (bfloat16), got {}", static_cast<int>(t));
  return {};
}

/// The Format flattened for the kernels: work tiles are the scale groups, except per-tensor scales (rows of at most 4096
/// columns whose parameters come from the tensor range).
cuda_detail::FormatLaunch make_launch(const Format& f, int64_t rows, int64_t cols) {
  cuda_detail::FormatLaunch p;
  p.core = f.core();
  p.group = static_cast<int>(f.group);
  p.tile_rows = tile_rows(f, rows);
  p.tile_cols = tile_cols(f, cols);
  p.scale_cols = scale_cols(f, cols);
  if (f.group == GroupKind::kTensor) {
    p.from_range = true;
    p.work_rows = 1;
    p.work_cols = cols > 4096 ? 4096 : (cols > 0 ? cols : 1);
  } else {
    p.work_rows = p.tile_rows;
    p.work_cols = p.tile_cols;
  }
  return p;
}

Status check_fp_element(ElementKind k) {
  const int v = static_cast<int>(k);
  if (v < 1 || v > 4) {
    if (k == ElementKind::kInt)
      return Status::not_supported("element: expected a float element (fp8_e4m3, fp4_e2m1, fp6_e2m3, fp6_e3m2); int "
                                   "codes use the int32 pack-quantized layout of pack.h");
    return Status::invalid("element: expected 1 (fp8_e4m3), 2 (fp4_e2m1), 3 (fp6_e2m3) or 4 (fp6_e3m2), got {}", v);
  }
  return {};
}

}  // namespace

Status cuda_format_quantize(const void* w, ElementType w_type, int64_t rows, int64_t cols, int64_t ld, const Format& f,
                            const float* global_scale_in, uint8_t* codes, float* scales, uint8_t* scale_codes,
                            int32_t* zeros, float* global_scale_out, float* dequantized, cudaStream_t stream,
                            void* workspace) {
  MQ_RETURN_IF_ERROR(validate(f, rows, cols));
  MQ_RETURN_IF_ERROR(api_detail::check_element_type(w_type, "w_type"));
  if (rows > 0 && ld < cols) return Status::invalid("ld: expected >= cols={}, got {}", cols, ld);
  const bool empty = rows == 0 || cols == 0;
  const bool has_scales = scale_rows(f, rows) * scale_cols(f, cols) > 0;
  if (empty && !has_scales && !f.global_scale) return {};
  // The device of the call: w's, or (an empty w) that of the first output given.
  const void* anchor = !empty ? w : (scales ? static_cast<const void*>(scales)
                                            : (scale_codes ? static_cast<const void*>(scale_codes)
                                                           : (zeros ? static_cast<const void*>(zeros)
                                                                    : static_cast<const void*>(global_scale_out))));
  if (anchor == nullptr) return {};  // nothing to compute, nothing to write
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(anchor, empty ? "scales" : "w", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  for (auto [p, name] : {std::pair<const void*, const char*>{codes, "codes"}, {scales, "scales"},
                         {scale_codes, "scale_codes"}, {zeros, "zeros"}, {global_scale_out, "global_scale_out"},
                         {dequantized, "dequantized"}, {workspace, "workspace"}})
    MQ_RETURN_IF_ERROR(check_on_device(p, name, device, true));
  const float* gin = f.global_scale ? global_scale_in : nullptr;
  MQ_RETURN_IF_ERROR(check_on_device(gin, "global_scale", device, true));

  Scratch scratch(stream);
  void* ws_ptr = nullptr;
  MQ_RETURN_IF_ERROR(scratch.get(workspace, kCudaFormatWorkspaceBytes, &ws_ptr));
  auto* ws = static_cast<cuda_detail::FormatWorkspace*>(ws_ptr);
  MQ_CUDA_RETURN("format_quantize kernels",
                 cuda_detail::launch_format_quantize(w, w_type, rows, cols, ld, make_launch(f, rows, cols), gin, ws,
                                                     codes, scales, scale_codes, zeros, global_scale_out, dequantized,
                                                     stream));
  cuda_detail::FormatWorkspace host{};
  MQ_RETURN_IF_ERROR(read_back(&host, ws, sizeof(host), stream, "format_quantize flag readback"));
  if (host.bad_index != cuda_detail::kNoBadIndex) {
    const int64_t r = static_cast<int64_t>(host.bad_index) / cols, c = static_cast<int64_t>(host.bad_index) % cols;
    const size_t es = element_size(w_type);
    unsigned char raw[4] = {};
    MQ_RETURN_IF_ERROR(read_back(raw, static_cast<const char*>(w) + (r * ld + c) * static_cast<int64_t>(es), es, stream,
                                 "format_quantize value readback"));
    return Status::invalid("w: expected finite values, got {} at ({}, {})",
                           nan_or_inf(api_detail::element_to_float(w_type, raw)), r, c);
  }
  if (host.bad_global != 0) {
    float g = 0.0f;
    MQ_RETURN_IF_ERROR(read_back(&g, gin, sizeof(g), stream, "global_scale readback"));
    return Status::invalid("global_scale: expected a finite value > 0, got {}", g);
  }
  return {};
}

Status cuda_format_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const float* scales,
                              const int32_t* zeros, const float* global_scale, const Format& f, void* out,
                              ElementType out_type, cudaStream_t stream) {
  MQ_RETURN_IF_ERROR(validate(f, rows, cols));
  MQ_RETURN_IF_ERROR(check_out_type(out_type));
  if (f.global_scale && global_scale == nullptr)
    return Status::invalid("global_scale: expected the global scale of a {} format, got null",
                           element_kind_name(f.element));
  if (rows == 0 || cols == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(codes, "codes", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(scales, "scales", device, false));
  MQ_RETURN_IF_ERROR(check_on_device(zeros, "zeros", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(f.global_scale ? global_scale : nullptr, "global_scale", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(out, "out", device, false));
  MQ_CUDA_RETURN("format_dequantize kernel",
                 cuda_detail::launch_format_dequantize(codes, rows, cols, scales, zeros,
                                                       f.global_scale ? global_scale : nullptr,
                                                       make_launch(f, rows, cols), out, out_type, stream));
  return {};
}

Status cuda_pack_fp_codes(const uint8_t* codes, int64_t rows, int64_t cols, ElementKind element, uint8_t* out,
                          cudaStream_t stream, void* flag_workspace) {
  MQ_RETURN_IF_ERROR(check_fp_element(element));
  if (rows < 0 || cols < 0) return Status::invalid("codes: expected a non-negative shape, got [{}, {}]", rows, cols);
  if (rows == 0 || cols == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(codes, "codes", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(out, "out", device, false));
  MQ_RETURN_IF_ERROR(check_on_device(flag_workspace, "flag_workspace", device, true));
  if (element == ElementKind::kFp8E4M3) {
    MQ_CUDA_RETURN("pack_fp_codes copy", cudaMemcpyAsync(out, codes, static_cast<size_t>(rows * cols),
                                                         cudaMemcpyDeviceToDevice, stream));
    return {};
  }
  const int b = element == ElementKind::kFp4E2M1 ? 4 : 6;
  Scratch scratch(stream);
  void* flag = nullptr;
  MQ_RETURN_IF_ERROR(scratch.get(flag_workspace, kCudaFlagBytes, &flag));
  auto* bad = static_cast<unsigned long long*>(flag);
  MQ_CUDA_RETURN("pack_fp_codes kernel", cuda_detail::launch_pack_fp(codes, rows, cols, b, out, bad, stream));
  unsigned long long at = cuda_detail::kNoBadIndex;
  MQ_RETURN_IF_ERROR(read_back(&at, bad, sizeof(at), stream, "pack_fp_codes flag readback"));
  if (at != cuda_detail::kNoBadIndex) {
    uint8_t v = 0;
    MQ_RETURN_IF_ERROR(read_back(&v, codes + at, 1, stream, "pack_fp_codes value readback"));
    return Status::invalid("codes: expected {} codes in [0, {}], got {} at ({}, {})", element_kind_name(element),
                           (1 << b) - 1, static_cast<int>(v), static_cast<int64_t>(at) / cols,
                           static_cast<int64_t>(at) % cols);
  }
  return {};
}

Status cuda_unpack_fp_codes(const uint8_t* packed, int64_t rows, int64_t cols, ElementKind element, uint8_t* codes,
                            cudaStream_t stream) {
  MQ_RETURN_IF_ERROR(check_fp_element(element));
  if (rows < 0 || cols < 0) return Status::invalid("codes: expected a non-negative shape, got [{}, {}]", rows, cols);
  if (rows == 0 || cols == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(packed, "packed", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(codes, "codes", device, false));
  if (element == ElementKind::kFp8E4M3) {
    MQ_CUDA_RETURN("unpack_fp_codes copy", cudaMemcpyAsync(codes, packed, static_cast<size_t>(rows * cols),
                                                           cudaMemcpyDeviceToDevice, stream));
    return {};
  }
  MQ_CUDA_RETURN("unpack_fp_codes kernel",
                 cuda_detail::launch_unpack_fp(packed, rows, cols, element == ElementKind::kFp4E2M1 ? 4 : 6, codes,
                                               stream));
  return {};
}

Status cuda_decode_fp8_block_scaled(const uint8_t* weight, int64_t rows, int64_t cols, const float* scale_inv,
                                    int64_t block_rows, int64_t block_cols, void* out, ElementType out_type,
                                    cudaStream_t stream) {
  if (block_rows <= 0 || block_cols <= 0)
    return Status::invalid("block_size: expected two values > 0, got [{}, {}]", block_rows, block_cols);
  return cuda_format_dequantize(weight, rows, cols, scale_inv, nullptr, nullptr,
                                format_fp8_block(block_rows, block_cols), out, out_type, stream);
}

Status cuda_decode_mxfp4_blocks(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups, void* out,
                                ElementType out_type, cudaStream_t stream) {
  if (rows < 0 || groups < 0)
    return Status::invalid("blocks: expected a non-negative shape, got [{}, {}, 16]", rows, groups);
  MQ_RETURN_IF_ERROR(check_out_type(out_type));
  if (rows == 0 || groups == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(blocks, "blocks", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(scales, "scales", device, false));
  MQ_RETURN_IF_ERROR(check_on_device(out, "out", device, false));
  MQ_CUDA_RETURN("decode_mxfp4_blocks kernel",
                 cuda_detail::launch_decode_mxfp4_blocks(blocks, scales, rows, groups, out, out_type, stream));
  return {};
}

}  // namespace v0
}  // namespace moequant
