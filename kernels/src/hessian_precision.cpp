// kernels/src/hessian_precision.cpp -- the tensor-core (TF32 / BF16) variants of cuda_accumulate_hessian.
//
// Same pipeline as the fp32 path of api.cpp (prepare: validate + stable sort + gather; one readback; update;
// finish: mirror + stats) with a different update: instead of one fp32 SIMT SSYRK per expert, the lower block
// triangle of H_e (column-major) is computed by one tensor-core GEMM per block column,
//   H[j0:d, j0:j0+T] += G^T[j0:d, :] * G[:, j0:j0+T]      (G = the expert's gathered rows, [m, d] row-major),
// which does (1 + T/d) / 2 of the full GEMM's work, e.g. 0.57 of it at d = 7168, T = 1024. The mirror stage then
// copies the computed triangle onto the other exactly as for the SYRK.
// Kept separate from api.cpp on purpose (precision 0 forwards to the untouched fp32 function); the small helpers
// below duplicate api.cpp's and can be shared once that file's helpers move to a common header.
#include <moequant/cuda/kernels.h>
#include <moequant/status.h>

#include "launch.h"

#include <cstring>
#include <limits>
#include <vector>

namespace moequant {
inline namespace v0 {
namespace {

using cuda_detail::kNoBadIndex;

#define MQH_CUDA_RETURN(op, expr)                                                                             \
  do {                                                                                                        \
    const cudaError_t _mq_err = (expr);                                                                       \
    if (_mq_err != cudaSuccess)                                                                               \
      return Status::cuda("{}: {} ({})", (op), cudaGetErrorName(_mq_err), cudaGetErrorString(_mq_err));      \
  } while (0)

#define MQH_CUBLAS_RETURN(op, expr)                                                                        \
  do {                                                                                                     \
    const cublasStatus_t _mq_st = (expr);                                                                  \
    if (_mq_st != CUBLAS_STATUS_SUCCESS)                                                                   \
      return Status::cuda("{}: {} ({})", (op), cublasGetStatusString(_mq_st), static_cast<int>(_mq_st)); \
  } while (0)

Status device_of(const void* p, const char* arg, int* device) {
  if (p == nullptr) return Status::invalid("{}: expected a CUDA device pointer, got null", arg);
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (err == cudaErrorInvalidValue)
      return Status::invalid("{}: expected CUDA device memory, got a pointer CUDA does not know (host memory?)", arg);
    return Status::cuda("cudaPointerGetAttributes: {} ({})", cudaGetErrorName(err), cudaGetErrorString(err));
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    return Status::invalid("{}: expected CUDA device memory, got {} memory", arg,
                           attr.type == cudaMemoryTypeHost ? "pinned host" : "unregistered host");
  *device = attr.device;
  return {};
}

Status check_on_device(const void* p, const char* arg, int device, bool nullable) {
  if (p == nullptr && nullable) return {};
  int d = -1;
  MQ_RETURN_IF_ERROR(device_of(p, arg, &d));
  if (d != device)
    return Status::invalid("{}: expected memory on CUDA device {} (that of the input), got device {}", arg, device, d);
  return {};
}

class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  Status enter(int device) {
    MQH_CUDA_RETURN("cudaGetDevice", cudaGetDevice(&previous_));
    if (previous_ != device) {
      MQH_CUDA_RETURN("cudaSetDevice", cudaSetDevice(device));
      switched_ = true;
    }
    return {};
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

Status read_back(void* host, const void* device, size_t bytes, cudaStream_t stream, const char* what) {
  MQH_CUDA_RETURN(what, cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream));
  MQH_CUDA_RETURN("cudaStreamSynchronize", cudaStreamSynchronize(stream));
  return {};
}

class CublasStateGuard {
 public:
  explicit CublasStateGuard(cublasHandle_t h) : h_(h) {}
  CublasStateGuard(const CublasStateGuard&) = delete;
  CublasStateGuard& operator=(const CublasStateGuard&) = delete;
  ~CublasStateGuard() {
    if (saved_) (void)restore();
  }
  Status save() {
    MQH_CUBLAS_RETURN("cublasGetStream", cublasGetStream(h_, &stream_));
    MQH_CUBLAS_RETURN("cublasGetPointerMode", cublasGetPointerMode(h_, &pointer_mode_));
    MQH_CUBLAS_RETURN("cublasGetMathMode", cublasGetMathMode(h_, &math_mode_));
    saved_ = true;
    return {};
  }
  Status restore() {
    if (!saved_) return {};
    saved_ = false;
    MQH_CUBLAS_RETURN("cublasSetMathMode", cublasSetMathMode(h_, math_mode_));
    MQH_CUBLAS_RETURN("cublasSetPointerMode", cublasSetPointerMode(h_, pointer_mode_));
    MQH_CUBLAS_RETURN("cublasSetStream", cublasSetStream(h_, stream_));
    return {};
  }

 private:
  cublasHandle_t h_;
  cudaStream_t stream_ = nullptr;
  cublasPointerMode_t pointer_mode_ = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t math_mode_ = CUBLAS_DEFAULT_MATH;
  bool saved_ = false;
};

const char* nan_or_inf(float v) { return v != v ? "nan" : (v > 0 ? "inf" : "-inf"); }

/// Width of the block columns of the low-precision update: large enough for efficient GEMMs, small enough that
/// the wasted upper part of the diagonal blocks stays small (T / d of the full GEMM).
int64_t block_cols(int64_t dim) {
  if (dim <= 1024) return dim;
  return dim <= 4096 ? 512 : 1024;
}

}  // namespace

size_t cuda_hessian_workspace_bytes(int64_t n, int64_t dim, int64_t num_experts, int precision) {
  cuda_detail::HessianLayout layout;
  if (precision < 0 || precision > 2 || !cuda_detail::hessian_layout(n, dim, num_experts, &layout)) return 0;
  if (precision != kHessianBf16) return layout.total;
  return layout.total + cuda_detail::align256(static_cast<size_t>(n) * static_cast<size_t>(dim) * 2);
}

Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                               int precision) {
  if (precision != kHessianFp32 && precision != kHessianTf32 && precision != kHessianBf16)
    return Status::invalid("precision: expected 0 (fp32), 1 (tf32) or 2 (bf16), got {}", precision);
  if (precision == kHessianFp32)
    return cuda_accumulate_hessian(x, n, dim, ldx, expert_ids, weights, num_experts, H, counts, mass, workspace,
                                   workspace_bytes, handle, stream);

  // The checks and messages of the fp32 path (api.cpp), with this precision's workspace size.
  if (dim <= 0) return Status::invalid("dim: expected > 0, got {}", dim);
  if (n < 0) return Status::invalid("n: expected >= 0, got {}", n);
  if (ldx < dim) return Status::invalid("ldx: expected >= dim={}, got {}", dim, ldx);
  if (num_experts <= 0) return Status::invalid("num_experts: expected > 0, got {}", num_experts);
  if (n > 0 && x == nullptr) return Status::invalid("x: expected a pointer to {} rows, got null", n);
  if (n > 0 && expert_ids == nullptr) return Status::invalid("expert_ids: expected a pointer to {} ids, got null", n);
  if (H == nullptr)
    return Status::invalid("H: expected a pointer to [{}, {}, {}] accumulators, got null", num_experts, dim, dim);
  if (n == 0) return {};
  constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();
  if (n > kI32Max) return Status::invalid("n: expected at most {} rows per call on CUDA (split the batch), got {}", kI32Max, n);
  if (dim > kI32Max) return Status::invalid("dim: expected at most {} on CUDA, got {}", kI32Max, dim);
  if (num_experts > kI32Max - 1)
    return Status::invalid("num_experts: expected at most {} on CUDA, got {}", kI32Max - 1, num_experts);
  cuda_detail::HessianLayout layout;
  if (!cuda_detail::hessian_layout(n, dim, num_experts, &layout))
    return Status::invalid("n, dim: the workspace for {} rows of dim {} and {} experts overflows the address space", n,
                           dim, num_experts);
  const size_t need = cuda_hessian_workspace_bytes(n, dim, num_experts, precision);
  if (workspace == nullptr || workspace_bytes < need)
    return Status::invalid("workspace_bytes: expected >= {} (cuda_hessian_workspace_bytes({}, {}, {}, {})), got {}{}",
                           need, n, dim, num_experts, precision, workspace_bytes,
                           workspace == nullptr ? " with a null workspace" : "");
  if (handle == nullptr) return Status::invalid("handle: expected a cuBLAS handle, got null");

  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(x, "x", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(expert_ids, "expert_ids", device, false));
  MQ_RETURN_IF_ERROR(check_on_device(weights, "weights", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(H, "H", device, false));
  MQ_RETURN_IF_ERROR(check_on_device(counts, "counts", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(mass, "mass", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(workspace, "workspace", device, false));

  MQH_CUDA_RETURN("accumulate_hessian prepare",
                  cuda_detail::launch_hessian_prepare(x, n, dim, ldx, expert_ids, weights, num_experts, workspace,
                                                      layout, stream));
  std::vector<unsigned char> rb(layout.readback_bytes);
  MQ_RETURN_IF_ERROR(
      read_back(rb.data(), static_cast<const char*>(workspace) + layout.flags, rb.size(), stream, "hessian readback"));
  unsigned long long flags[3];
  std::memcpy(flags, rb.data() + layout.flags, sizeof(flags));
  std::vector<int32_t> offsets(static_cast<size_t>(num_experts) + 1);
  std::memcpy(offsets.data(), rb.data() + layout.offsets, offsets.size() * sizeof(int32_t));

  const unsigned long long x_row = flags[2] == kNoBadIndex ? kNoBadIndex : flags[2] / static_cast<uint64_t>(dim);
  if (flags[0] != kNoBadIndex && flags[0] <= flags[1] && flags[0] <= x_row) {
    const int64_t i = static_cast<int64_t>(flags[0]);
    int32_t e = 0;
    MQ_RETURN_IF_ERROR(read_back(&e, expert_ids + i, sizeof(e), stream, "expert_ids value readback"));
    return Status::invalid("expert_ids: expected values in [0, {}), got {} at row {}", num_experts, e, i);
  }
  if (flags[1] != kNoBadIndex && flags[1] <= x_row) {
    const int64_t i = static_cast<int64_t>(flags[1]);
    float c = 0.0f;
    MQ_RETURN_IF_ERROR(read_back(&c, weights + i, sizeof(c), stream, "weights value readback"));
    return Status::invalid("weights: expected finite values >= 0, got {} at row {}", c, i);
  }
  if (flags[2] != kNoBadIndex) {
    const int64_t i = static_cast<int64_t>(flags[2] / static_cast<uint64_t>(dim));
    const int64_t j = static_cast<int64_t>(flags[2] % static_cast<uint64_t>(dim));
    float v = 0.0f;
    MQ_RETURN_IF_ERROR(read_back(&v, x + i * ldx + j, sizeof(v), stream, "x value readback"));
    return Status::invalid("x: expected finite values, got {} at ({}, {})", nan_or_inf(v), i, j);
  }
  if (offsets[0] != 0 || offsets[static_cast<size_t>(num_experts)] != n)
    return Status::internal("accumulate_hessian: the device sort routed {} of {} rows", offsets.back() - offsets[0], n);

  // The GEMM operand: the gathered rows (fp32, TF32 compute) or their bf16 copy (bf16 compute).
  const float* gathered = reinterpret_cast<const float*>(static_cast<const char*>(workspace) + layout.gathered);
  const void* a = gathered;
  cudaDataType_t a_type = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  size_t elem = 4;
  if (precision == kHessianBf16) {
    void* rows16 = static_cast<char*>(workspace) + layout.total;
    MQH_CUDA_RETURN("accumulate_hessian bf16 rows", cuda_detail::launch_f32_to_bf16(gathered, rows16, n * dim, stream));
    a = rows16;
    a_type = CUDA_R_16BF;
    compute = CUBLAS_COMPUTE_32F;
    elem = 2;
  }
  {
    CublasStateGuard state(handle);
    MQ_RETURN_IF_ERROR(state.save());
    MQH_CUBLAS_RETURN("cublasSetStream", cublasSetStream(handle, stream));
    MQH_CUBLAS_RETURN("cublasSetPointerMode", cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST));
    MQH_CUBLAS_RETURN("cublasSetMathMode", cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
    const float one = 1.0f;
    const int64_t T = block_cols(dim);
    const int d = static_cast<int>(dim);
    for (int64_t e = 0; e < num_experts; ++e) {
      const int32_t b = offsets[static_cast<size_t>(e)], m = offsets[static_cast<size_t>(e) + 1] - b;
      if (m == 0) continue;
      // Column-major view: A = G^T is [d, m] with lda = d. Block column j0: C[j0:d, j0:j0+w] += A[j0:d,:] A[j0:j0+w,:]^T.
      const char* ae = static_cast<const char*>(a) + static_cast<size_t>(b) * static_cast<size_t>(dim) * elem;
      float* he = H + e * dim * dim;
      for (int64_t j0 = 0; j0 < dim; j0 += T) {
        const int w = static_cast<int>(dim - j0 < T ? dim - j0 : T);
        const int rows_c = static_cast<int>(dim - j0);
        const void* aj = ae + static_cast<size_t>(j0) * elem;
        const cublasStatus_t st =
            cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, rows_c, w, m, &one, aj, a_type, d, aj, a_type, d, &one,
                         he + j0 * dim + j0, CUDA_R_32F, d, compute, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS)
          return Status::cuda("cublasGemmEx (precision {}, expert {} of {}, {} rows, dim {}, block column {}): {} ({})",
                              precision, e, num_experts, m, dim, j0, cublasGetStatusString(st), static_cast<int>(st));
      }
    }
    MQ_RETURN_IF_ERROR(state.restore());
  }
  MQH_CUDA_RETURN("accumulate_hessian finish", cuda_detail::launch_hessian_finish(H, dim, num_experts, weights, counts,
                                                                                  mass, workspace, layout, stream));
  return {};
}

}  // namespace v0
}  // namespace moequant
