// kernels/src/gptq_format_launch.h -- internal interface between gptq_api.cpp (cuda_gptq_batched_format) and the
// launchers of gptq_format.cu: the batched GPTQ of gptq_batched.cu with the weight formats of moequant/format.h.
//
// Free of fmt / status.h (nvcc sees only format.h's scalar part). The format solve uses the int solve's workspace
// (GptqLayout, launch.h) plus the region below, and its factorisation, trailing SGEMMs and loss kernels unchanged; what
// is new is the static tile parameters (computed before the column loop, as gptq_format.h does) and the column kernel.
#pragma once

#include "format_launch.h"
#include "launch.h"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// The format solve's region after GptqLayout::total (256-byte aligned):
///   range  E x 2 u32: bits of max(-w, 0) and max(w, 0) of each expert's dead-zeroed W (range pass: per-tensor scales
///          and computed global scales)
///   gscale E f32: the global scale of each expert (1 without one)
///   fflags 2 u64: [0] smallest expert whose caller global scale is not finite or <= 0, [1] smallest linear tile index
///          e * sr * sc + t whose effective scale is not finite (an fp16 scale that overflowed); ~0 = none
struct GptqFormatLayout {
  size_t range = 0, gscale = 0, fflags = 0, total = 0;
};
inline GptqFormatLayout gptq_format_layout(const GptqLayout& l, int64_t E) {
  GptqFormatLayout x;
  const size_t e = static_cast<size_t>(E);
  x.range = l.total;
  x.gscale = align256(x.range + e * 8);
  x.fflags = align256(x.gscale + e * 4);
  x.total = align256(x.fflags + 16);
  return x;
}

/// Static tile parameters of every expert, from its original W with the dead columns zeroed (the dead flags of
/// launch_gptq_prepare, which must have run): resets fflags, the range pass when p.from_range or a global scale is
/// computed, the global scales (global_in: the callers' [E] device floats, or null), then scales / scale_codes /
/// zeros [E, sr, sc] exactly as format_quantize derives them.
cudaError_t launch_gptq_format_params(const float* W, int64_t E, int64_t rows, int64_t cols, const FormatLaunch& p,
                                      const float* global_in, float* scales, uint8_t* scale_codes, int32_t* zeros,
                                      void* workspace, const GptqLayout& l, const GptqFormatLayout& x,
                                      cudaStream_t stream);

/// The column loop of block [i1, i1 + bw) for all experts with the static tile parameters (gptq_format.cu); U's
/// diagonal block in shared memory when sp.block_shared, else read from H.
cudaError_t launch_gptq_format_block(const float* W, const float* H, int64_t E, int64_t rows, int64_t cols, int64_t i1,
                                     int bw, const FormatLaunch& p, bool act_order, uint8_t* codes, const float* scales,
                                     const int32_t* zeros, float* dequantized, void* workspace, const GptqLayout& l,
                                     const GptqFormatLayout& x, const GptqSmemPlan& sp, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
