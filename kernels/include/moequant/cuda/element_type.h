// moequant/cuda/element_type.h -- the element type of the floating-point arrays that kernels.h's functions take as
// `const void*` (cuda_accumulate_hessian's x, cuda_hadamard's x and out). Included by kernels.h; kept apart and free
// of fmt / status.h so that the CUDA sources (nvcc) share the same definition.
#pragma once

#include <cstddef>

namespace moequant {
inline namespace v0 {

/// float32, bfloat16 or IEEE float16 (half). The integer values are part of the API (error messages name them).
enum class ElementType : int { kF32 = 0, kBf16 = 1, kF16 = 2 };

/// Bytes of one element of type t (4 for kF32, 2 for the 16-bit types).
constexpr size_t element_size(ElementType t) { return t == ElementType::kF32 ? 4 : 2; }

}  // namespace v0
}  // namespace moequant
