// kernels/src/hessian_update.h -- the update stage of the routed Hessian (host code issuing cuBLAS work), between
// api.cpp's readback and the mirror: one SSYRK per expert (fp32) or batched tensor-core GEMMs over the tiles of the
// lower triangle (tf32 / bf16). Host compiler only (Status).
#pragma once

#include <moequant/status.h>

#include <cublas_v2.h>

#include "hessian_launch.h"

#include <cstdint>
#include <vector>

namespace moequant {
inline namespace v0 {
namespace hessian_detail {

/// fp32: H_e (column-major lower triangle) += G_e^T G_e by cublasSsyrk for every expert with rows
/// (G_e = the sorted fp32 rows offsets[e]..offsets[e + 1], ld = dim). TF32 stays off (CUBLAS_DEFAULT_MATH).
Status update_fp32(cublasHandle_t handle, const float* rows, const std::vector<int32_t>& offsets, int64_t dim,
                   int64_t num_experts, float* H);

/// Padded row layout of the tensor-core paths from the sorted offsets: experts (by padded count, largest first)
/// form groups sharing K = the group's largest tc_padded_rows(count); an expert joins while its padded count is
/// >= K - K / kTcGroupSlackDiv. Returns poffsets [E + 1]: expert e's rows start at poffsets[e], its segment is its
/// group's K long (0 for an expert without rows). The total is <= tc_row_capacity(n, E).
std::vector<int32_t> plan_padded_offsets(const std::vector<int32_t>& offsets, int64_t num_experts);

/// One cublasGemmBatchedEx: `count` problems of m x n x k whose A / B / C pointers start at `first` in the
/// uploaded array (A pointers, then B, then C, each `count` long).
struct BatchedCall {
  int m = 0, n = 0, k = 0;
  int64_t count = 0;
  size_t first = 0;
};

/// The batched GEMM calls of one tensor-core update and their host pointer array (uploaded by plan_tensor_cores).
struct TensorCorePlan {
  std::vector<BatchedCall> calls;
  std::vector<const void*> ptrs;
};

/// tf32 / bf16 (layout.precision 1 / 2), host part: the same triangle as square tiles (see tc_tile), every tile
/// pair i >= j of every expert with rows, grouped into cublasGemmBatchedEx calls by (padded row count, tile shape);
/// the device pointer arrays are uploaded (asynchronously on `stream`) into the workspace's ptrs region. Depends
/// only on the padded offsets, so api.cpp builds it while the row pass is still on the GPU, before the readback of
/// the validation flags. The upload is a pageable copy stream-ordered after the row pass; for a large plan the
/// driver may hold the host until it is staged.
Status plan_tensor_cores(const cuda_detail::HessianLayout& layout, void* workspace,
                         const std::vector<int32_t>& poffsets, int64_t dim, int64_t num_experts, float* H,
                         cudaStream_t stream, TensorCorePlan* plan);

/// Launches the planned calls on the handle's stream (C += A B^T with beta = 1). Only after the flags said that the
/// inputs are valid.
Status update_tensor_cores(cublasHandle_t handle, const cuda_detail::HessianLayout& layout, void* workspace,
                           const TensorCorePlan& plan, int64_t dim);

}  // namespace hessian_detail
}  // namespace v0
}  // namespace moequant
