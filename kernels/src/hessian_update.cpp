// kernels/src/hessian_update.cpp -- the cuBLAS update stage of the routed Hessian (see hessian_update.h).
//
// Layout: the rows of expert e are a row-major [m, ld] matrix G (m rows of dim features). cuBLAS is column-major,
// so the same memory read column-major with leading dimension ld is A = G^T, [dim, m], and A A^T = G^T G =
// sum_i c_i x_i x_i^T. H_e is symmetric, so its row-major storage is also its column-major storage; the updates add
// into the column-major lower triangle (memory c * dim + r, r >= c: the row-major upper triangle) and the mirror
// copies it onto the other triangle.
#include "hessian_update.h"

#include "api_common.h"

#include <algorithm>
#include <cstddef>

namespace moequant {
inline namespace v0 {
namespace hessian_detail {

Status update_fp32(cublasHandle_t handle, const float* rows, const std::vector<int32_t>& offsets, int64_t dim,
                   int64_t num_experts, float* H) {
  const float one = 1.0f;
  const int d = static_cast<int>(dim);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t b = offsets[static_cast<size_t>(e)], m = offsets[static_cast<size_t>(e) + 1] - b;
    if (m == 0) continue;
    const cublasStatus_t st = cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, d, m, &one,
                                          rows + static_cast<int64_t>(b) * dim, d, &one, H + e * dim * dim, d);
    if (st != CUBLAS_STATUS_SUCCESS)
      return Status::cuda("cublasSsyrk (expert {} of {}, {} rows, dim {}): {} ({})", e, num_experts, m, dim,
                          cublasGetStatusString(st), static_cast<int>(st));
  }
  return {};
}

std::vector<int32_t> plan_padded_offsets(const std::vector<int32_t>& offsets, int64_t num_experts) {
  const size_t E = static_cast<size_t>(num_experts);
  std::vector<int64_t> kp(E), seg(E, 0);
  std::vector<size_t> order;
  for (size_t e = 0; e < E; ++e) {
    kp[e] = cuda_detail::tc_padded_rows(offsets[e + 1] - offsets[e]);
    if (kp[e] > 0) order.push_back(e);
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return kp[a] > kp[b]; });
  for (size_t i = 0; i < order.size();) {
    const int64_t K = kp[order[i]];
    size_t j = i;
    for (; j < order.size() && kp[order[j]] >= K - K / cuda_detail::kTcGroupSlackDiv; ++j) seg[order[j]] = K;
    i = j;
  }
  std::vector<int32_t> poffsets(E + 1, 0);
  for (size_t e = 0; e < E; ++e) poffsets[e + 1] = static_cast<int32_t>(poffsets[e] + seg[e]);
  return poffsets;
}

namespace {

// gridDim.z-style limits of some batched kernels: keep each call well below 65535 problems.
constexpr int64_t kMaxBatch = 32768;

}  // namespace

// Tiles: T = tc_tile(dim), nt tiles per side, the last one `rem` wide; tile (i, j), i >= j, of the column-major
// lower triangle is C = H_e + j*T*dim + i*T (ldc = dim), m = rows of tile i, n = columns of tile j, k = K (the
// expert's group length), C += op(A) op(B):
//   tf32, feature-major R_e [dim, K] (both operands K-major, "TN", which Hopper's TF32 tensor cores need):
//     A = R_e + i*T*K (OP_T), B = R_e + j*T*K (OP_N), lda = ldb = K;
//   bf16, sample-major rows G_e [K, ld] = column-major [ld, K] ("NT"):
//     A = G_e + i*T (OP_N), B = G_e + j*T (OP_T), lda = ldb = ld.
// The diagonal tiles also add into their strict upper part (the row-major lower triangle), which the mirror
// overwrites. Shapes: 0 = T x T, 1 = the last tile row below the diagonal (rem x T), 2 = the corner (rem x rem);
// when rem == T everything is shape 0. One call per (group, shape).
Status plan_tensor_cores(const cuda_detail::HessianLayout& layout, void* workspace,
                         const std::vector<int32_t>& poffsets, int64_t dim, int64_t num_experts, float* H,
                         cudaStream_t stream, TensorCorePlan* plan) {
  using cuda_detail::tc_tile;
  using cuda_detail::tc_tiles_per_side;
  const size_t elem = layout.precision == 2 ? 2 : 4;
  plan->calls.clear();
  const int64_t T = tc_tile(dim), nt = tc_tiles_per_side(dim), rem = dim - (nt - 1) * T;
  const char* rows = static_cast<const char*>(workspace) + layout.rows;

  std::vector<int64_t> experts;
  for (int64_t e = 0; e < num_experts; ++e)
    if (poffsets[static_cast<size_t>(e) + 1] > poffsets[static_cast<size_t>(e)]) experts.push_back(e);
  auto kp = [&](int64_t e) { return poffsets[static_cast<size_t>(e) + 1] - poffsets[static_cast<size_t>(e)]; };
  std::stable_sort(experts.begin(), experts.end(), [&](int64_t a, int64_t b) { return kp(a) < kp(b); });

  std::vector<const void*>& ptrs = plan->ptrs;
  ptrs.clear();
  ptrs.reserve(static_cast<size_t>(layout.ptr_count));
  std::vector<BatchedCall>& calls = plan->calls;
  for (size_t lo = 0; lo < experts.size();) {
    size_t hi = lo;
    while (hi < experts.size() && kp(experts[hi]) == kp(experts[lo])) ++hi;
    for (int shape = 0; shape < 3; ++shape) {
      if (rem == T && shape > 0) break;
      BatchedCall c;
      c.m = static_cast<int>(shape == 0 ? T : rem);
      c.n = static_cast<int>(shape == 2 ? rem : T);
      c.k = kp(experts[lo]);
      std::vector<const void*> a, b, cc;
      for (size_t q = lo; q < hi; ++q) {
        const int64_t e = experts[q];
        const int64_t K = kp(e);
        const int64_t row_elems = layout.feature_major ? dim : layout.ld;  // elements per padded row
        const char* base = rows + static_cast<size_t>(poffsets[static_cast<size_t>(e)]) *
                                      static_cast<size_t>(row_elems) * elem;
        const int64_t step = layout.feature_major ? T * K : T;  // elements from one tile's operand to the next
        float* he = H + e * dim * dim;
        for (int64_t j = 0; j < nt; ++j)
          for (int64_t i = j; i < nt; ++i) {
            const int s = rem == T ? 0 : (i < nt - 1 ? 0 : (j < nt - 1 ? 1 : 2));
            if (s != shape) continue;
            a.push_back(base + static_cast<size_t>(i * step) * elem);
            b.push_back(base + static_cast<size_t>(j * step) * elem);
            cc.push_back(he + j * T * dim + i * T);
          }
      }
      for (size_t s0 = 0; s0 < a.size(); s0 += kMaxBatch) {
        const size_t s1 = std::min(a.size(), s0 + static_cast<size_t>(kMaxBatch));
        c.count = static_cast<int64_t>(s1 - s0);
        c.first = ptrs.size();
        ptrs.insert(ptrs.end(), a.begin() + static_cast<std::ptrdiff_t>(s0), a.begin() + static_cast<std::ptrdiff_t>(s1));
        ptrs.insert(ptrs.end(), b.begin() + static_cast<std::ptrdiff_t>(s0), b.begin() + static_cast<std::ptrdiff_t>(s1));
        ptrs.insert(ptrs.end(), cc.begin() + static_cast<std::ptrdiff_t>(s0), cc.begin() + static_cast<std::ptrdiff_t>(s1));
        calls.push_back(c);
      }
    }
    lo = hi;
  }
  if (calls.empty()) return {};
  if (static_cast<int64_t>(ptrs.size()) > layout.ptr_count)
    return Status::internal("accumulate_hessian: {} GEMM pointers exceed the workspace's {}", ptrs.size(),
                            layout.ptr_count);
  auto* dptrs = reinterpret_cast<void**>(static_cast<char*>(workspace) + layout.ptrs);
  // Pageable source: the call returns once the bytes are staged (the plan keeps them anyway).
  MQ_CUDA_RETURN("accumulate_hessian pointer upload",
                 cudaMemcpyAsync(dptrs, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream));
  return {};
}

Status update_tensor_cores(cublasHandle_t handle, const cuda_detail::HessianLayout& layout, void* workspace,
                           const TensorCorePlan& plan, int64_t dim) {
  const bool bf16 = layout.precision == 2;
  const cudaDataType_t in_type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = bf16 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32;
  auto* dptrs = reinterpret_cast<void**>(static_cast<char*>(workspace) + layout.ptrs);
  const float one = 1.0f;
  const int ldc = static_cast<int>(dim);
  const bool fm = layout.feature_major;
  for (const BatchedCall& c : plan.calls) {
    void** p = dptrs + c.first;
    const int ld = fm ? c.k : static_cast<int>(layout.ld);
    const cublasStatus_t st = cublasGemmBatchedEx(
        handle, fm ? CUBLAS_OP_T : CUBLAS_OP_N, fm ? CUBLAS_OP_N : CUBLAS_OP_T, c.m, c.n, c.k, &one,
        const_cast<const void* const*>(p), in_type, ld, const_cast<const void* const*>(p + c.count), in_type, ld, &one,
        p + 2 * c.count, CUDA_R_32F, ldc, static_cast<int>(c.count), compute, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS)
      return Status::cuda("cublasGemmBatchedEx (precision {}, {} x {} x {} tiles, batch {}, dim {}): {} ({})",
                          layout.precision, c.m, c.n, c.k, c.count, dim, cublasGetStatusString(st),
                          static_cast<int>(st));
  }
  return {};
}

}  // namespace hessian_detail
}  // namespace v0
}  // namespace moequant
