// kernels/src/gptq_workspace.cuh -- typed views of the batched GPTQ workspace (GptqLayout in launch.h), shared by
// gptq_batched.cu and gptq_factor.cu.
#pragma once

#include "launch.h"

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

struct Ws {
  unsigned long long* flags;
  int32_t *fail, *rbad;
  double* mean;
  int32_t *perm, *inv;
  uint8_t* dead;
  float *dinv, *panel, *h0, *dw, *dblk;
  double* partial;
};
inline Ws carve(void* base, const GptqLayout& l) {
  char* b = static_cast<char*>(base);
  return {reinterpret_cast<unsigned long long*>(b + l.flags), reinterpret_cast<int32_t*>(b + l.fail),
          reinterpret_cast<int32_t*>(b + l.rbad), reinterpret_cast<double*>(b + l.mean),
          reinterpret_cast<int32_t*>(b + l.perm), reinterpret_cast<int32_t*>(b + l.inv),
          reinterpret_cast<uint8_t*>(b + l.dead),
          reinterpret_cast<float*>(b + l.dinv),
          reinterpret_cast<float*>(b + l.panel), reinterpret_cast<float*>(b + l.h0),
          reinterpret_cast<float*>(b + l.dw), reinterpret_cast<float*>(b + l.dblk),
          reinterpret_cast<double*>(b + l.partial)};
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
