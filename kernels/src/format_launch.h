// kernels/src/format_launch.h -- internal interface between api_format.cpp (host validation, Status) and the launchers
// of format.cu (the weight formats of moequant/format.h on the GPU).
//
// Free of fmt / status.h: nvcc sees only the scalar part of moequant/format.h (guarded by __CUDACC__), which is exactly
// the code the CPU core runs, so every code, scale and dequantized value is the CPU's bit for bit.
#pragma once

#include <moequant/cuda/element_type.h>
#include <moequant/format.h>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// A Format and a [rows, cols] shape, flattened for the kernels (validated by the host).
///   A *work tile* is what one team of threads reduces and quantizes: the scale group itself for channel / group / block
///   scales, one row for a per-tensor scale (whose parameters come from the tensor range in FormatWorkspace).
struct FormatLaunch {
  FormatCore core;
  int group = 0;                     // GroupKind
  int64_t tile_rows = 1, tile_cols = 1;  // of a scale group (tensor: rows x cols)
  int64_t scale_cols = 1;            // scale groups per row of groups
  int64_t work_rows = 1, work_cols = 1;  // of a work tile
  bool from_range = false;           // parameters from the tensor range (per-tensor scale)
};

/// Device scratch of one format_quantize call (kCudaFormatWorkspaceBytes). Reset by launch_format_quantize.
struct FormatWorkspace {
  unsigned long long bad_index;  // smallest r * cols + c of a non-finite w; ~0 when none
  unsigned int neg_lo_bits;      // bits of max(-w, 0) over w (non-negative floats order like their bits)
  unsigned int hi_bits;          // bits of max(w, 0)
  unsigned int bad_global;       // 1 when the caller's global scale is not finite or <= 0
  float global_scale;            // the global scale used (1 without one)
};

/// True when launch_format_quantize needs the tensor range pass (per-tensor scale, or a global scale to compute).
inline bool format_needs_range(const FormatLaunch& p, bool have_global_in) {
  return p.from_range || (p.core.global_scale && !have_global_in);
}

/// Quantizes w [rows, cols] (row stride ld, ElementType w_type) into the outputs (each nullable, contiguous): resets
/// `ws`, runs the range pass when needed, derives the global scale (from `global_in`, a device float, or the range),
/// then one pass over w. Errors are left in `ws` for the host to read back.
cudaError_t launch_format_quantize(const void* w, ElementType w_type, int64_t rows, int64_t cols, int64_t ld,
                                   const FormatLaunch& p, const float* global_in, FormatWorkspace* ws, uint8_t* codes,
                                   float* scales, uint8_t* scale_codes, int32_t* zeros, float* global_out,
                                   float* dequantized, cudaStream_t stream);

/// out [rows, cols] (float32 or bfloat16) = dequantized codes; scales [scale_rows, scale_cols] values, zeros (nullable),
/// global (device float, only when p.core.global_scale).
cudaError_t launch_format_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const float* scales,
                                     const int32_t* zeros, const float* global, const FormatLaunch& p, void* out,
                                     ElementType out_type, cudaStream_t stream);

/// Packs codes [rows, cols] into [rows, packed_row_bytes] bytes (code_bits 4 or 6; 8 is a copy done by the host).
/// bad_index (device, pre-set to ~0 by this call) receives the smallest r * cols + c of a code >= 2^code_bits.
cudaError_t launch_pack_fp(const uint8_t* codes, int64_t rows, int64_t cols, int code_bits, uint8_t* out,
                           unsigned long long* bad_index, cudaStream_t stream);
cudaError_t launch_unpack_fp(const uint8_t* packed, int64_t rows, int64_t cols, int code_bits, uint8_t* codes,
                             cudaStream_t stream);

/// gpt-oss MXFP4: blocks [rows * groups, 16] bytes + scales [rows * groups] -> out [rows * groups * 32].
cudaError_t launch_decode_mxfp4_blocks(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                                       void* out, ElementType out_type, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
