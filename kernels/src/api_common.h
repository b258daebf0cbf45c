// kernels/src/api_common.h -- host helpers shared by api.cpp and gptq_api.cpp: CUDA / cuBLAS error mapping to
// Status, device lookup of pointer arguments, the current-device scope, blocking readback and the cuBLAS handle
// state guard. Host compiler only (status.h pulls in fmt, which stays out of nvcc).
#pragma once

#include <moequant/cuda/kernels.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include "launch.h"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

namespace moequant {
inline namespace v0 {
namespace api_detail {

inline Status cuda_error(const char* op, cudaError_t err) {
  return Status::cuda("{}: {} ({})", op, cudaGetErrorName(err), cudaGetErrorString(err));
}

}  // namespace api_detail
}  // namespace v0
}  // namespace moequant

#define MQ_CUDA_RETURN(op, expr)                                                            \
  do {                                                                                      \
    const cudaError_t _mq_err = (expr);                                                     \
    if (_mq_err != cudaSuccess) return ::moequant::api_detail::cuda_error((op), _mq_err); \
  } while (0)

#define MQ_CUBLAS_RETURN(op, expr)                                                                         \
  do {                                                                                                     \
    const cublasStatus_t _mq_st = (expr);                                                                  \
    if (_mq_st != CUBLAS_STATUS_SUCCESS)                                                                   \
      return ::moequant::Status::cuda("{}: {} ({})", (op), cublasGetStatusString(_mq_st),             \
                                      static_cast<int>(_mq_st));                                           \
  } while (0)

namespace moequant {
inline namespace v0 {
namespace api_detail {

/// How device_of describes host memory: kKind names it ("pinned host" / "unregistered host"; api.cpp),
/// kGeneric says "host" (gptq_api.cpp). Both wordings are kept as they were before the helpers were shared.
enum class HostMemoryText { kKind, kGeneric };

/// cudaPointerGetAttributes(p), with the error cleared (not sticky, so that a later launch check does not report it):
/// a pointer CUDA does not know (older drivers) is an invalid argument "<arg>: expected <expected>, got a pointer CUDA
/// does not know (<hint>)".
inline Status pointer_attributes(const void* p, const char* arg, const char* expected, const char* hint,
                                 cudaPointerAttributes* attr) {
  const cudaError_t err = cudaPointerGetAttributes(attr, p);
  if (err == cudaSuccess) return {};
  (void)cudaGetLastError();
  if (err == cudaErrorInvalidValue)
    return Status::invalid("{}: expected {}, got a pointer CUDA does not know ({})", arg, expected, hint);
  return cuda_error("cudaPointerGetAttributes", err);
}

/// The device that owns `p`; host or unknown memory is an invalid argument naming `arg`.
inline Status device_of(const void* p, const char* arg, int* device, HostMemoryText text = HostMemoryText::kKind) {
  if (p == nullptr) return Status::invalid("{}: expected a CUDA device pointer, got null", arg);
  cudaPointerAttributes attr{};
  MQ_RETURN_IF_ERROR(pointer_attributes(p, arg, "CUDA device memory", "host memory?", &attr));
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    if (text == HostMemoryText::kGeneric)
      return Status::invalid("{}: expected CUDA device memory, got host memory", arg);
    return Status::invalid("{}: expected CUDA device memory, got {} memory", arg,
                           attr.type == cudaMemoryTypeHost ? "pinned host" : "unregistered host");
  }
  *device = attr.device;
  return {};
}

/// Checks that `p` (when `nullable`, possibly null) lives on `device`.
inline Status check_on_device(const void* p, const char* arg, int device, bool nullable,
                              HostMemoryText text = HostMemoryText::kKind) {
  if (p == nullptr && nullable) return {};
  int d = -1;
  MQ_RETURN_IF_ERROR(device_of(p, arg, &d, text));
  if (d != device)
    return Status::invalid("{}: expected memory on CUDA device {} (that of the input), got device {}", arg, device, d);
  return {};
}

/// Checks that `p` is page-locked host memory mapped into `device`'s address space (cudaHostAlloc /
/// cudaMallocHost memory under unified addressing, or memory registered with cudaHostRegisterMapped) and returns the
/// pointer the device uses for it (the same address under unified addressing). Call with `device` current.
inline Status mapped_host_memory(void* p, const char* arg, int device, void** device_view) {
  cudaPointerAttributes attr{};
  MQ_RETURN_IF_ERROR(pointer_attributes(p, arg, "page-locked host memory", "pageable?", &attr));
  if (attr.type != cudaMemoryTypeHost)
    return Status::invalid("{}: expected page-locked host memory, got {} memory", arg,
                           attr.type == cudaMemoryTypeDevice    ? "device"
                           : attr.type == cudaMemoryTypeManaged ? "managed"
                                                                : "pageable (unregistered) host");
  if (attr.devicePointer == nullptr)
    return Status::invalid("{}: expected page-locked host memory mapped into CUDA device {}'s address space, got "
                           "memory that is not mapped there",
                           arg, device);
  *device_view = attr.devicePointer;
  return {};
}

/// Makes `device` current for the call and restores the caller's device on exit (never device 0 by default).
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (switched_) (void)cudaSetDevice(previous_);  // best effort: a destructor cannot report
  }
  Status enter(int device) {
    MQ_CUDA_RETURN("cudaGetDevice", cudaGetDevice(&previous_));
    if (previous_ != device) {
      MQ_CUDA_RETURN("cudaSetDevice", cudaSetDevice(device));
      switched_ = true;
    }
    return {};
  }

 private:
  int previous_ = 0;
  bool switched_ = false;
};

/// Copies `bytes` from device to host and waits for them. The synchronization of the caller's stream is the
/// price of reporting a data-dependent error as a Status; it is the only host wait in these calls.
inline Status read_back(void* host, const void* device, size_t bytes, cudaStream_t stream, const char* what) {
  MQ_CUDA_RETURN(what, cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream));
  MQ_CUDA_RETURN("cudaStreamSynchronize", cudaStreamSynchronize(stream));
  return {};
}

/// Saves the parts of a cuBLAS handle's state this library changes (stream, pointer mode, math mode) and
/// restores them: explicitly with restore() (checked), otherwise from the destructor (best effort).
class CublasStateGuard {
 public:
  explicit CublasStateGuard(cublasHandle_t h) : h_(h) {}
  CublasStateGuard(const CublasStateGuard&) = delete;
  CublasStateGuard& operator=(const CublasStateGuard&) = delete;
  /// Paths that did not call restore() (error paths, or callers relying on the scope): every setting is put
  /// back, each attempted even when an earlier one fails (a destructor cannot report).
  ~CublasStateGuard() {
    if (saved_) {
      (void)cublasSetMathMode(h_, math_mode_);
      (void)cublasSetPointerMode(h_, pointer_mode_);
      (void)cublasSetStream(h_, stream_);
    }
  }
  /// Reads the handle's current stream, pointer mode and math mode.
  Status save() {
    MQ_CUBLAS_RETURN("cublasGetStream", cublasGetStream(h_, &stream_));
    MQ_CUBLAS_RETURN("cublasGetPointerMode", cublasGetPointerMode(h_, &pointer_mode_));
    MQ_CUBLAS_RETURN("cublasGetMathMode", cublasGetMathMode(h_, &math_mode_));
    saved_ = true;
    return {};
  }
  /// save(), then the settings of this library's calls: `stream`, host pointer mode, and CUBLAS_DEFAULT_MATH,
  /// which never uses TF32 for fp32 routines (only CUBLAS_TF32_TENSOR_OP_MATH does), so S* routines are
  /// fp32-accurate whatever torch.backends.cuda.matmul.allow_tf32 set on a shared handle.
  Status enter(cudaStream_t stream) {
    MQ_RETURN_IF_ERROR(save());
    MQ_CUBLAS_RETURN("cublasSetStream", cublasSetStream(h_, stream));
    MQ_CUBLAS_RETURN("cublasSetPointerMode", cublasSetPointerMode(h_, CUBLAS_POINTER_MODE_HOST));
    MQ_CUBLAS_RETURN("cublasSetMathMode", cublasSetMathMode(h_, CUBLAS_DEFAULT_MATH));
    return {};
  }
  /// Puts the saved settings back (math mode, pointer mode, stream; stops at the first failure and reports it).
  Status restore() {
    if (!saved_) return {};
    saved_ = false;
    MQ_CUBLAS_RETURN("cublasSetMathMode", cublasSetMathMode(h_, math_mode_));
    MQ_CUBLAS_RETURN("cublasSetPointerMode", cublasSetPointerMode(h_, pointer_mode_));
    MQ_CUBLAS_RETURN("cublasSetStream", cublasSetStream(h_, stream_));
    return {};
  }

 private:
  cublasHandle_t h_;
  cudaStream_t stream_ = nullptr;
  cublasPointerMode_t pointer_mode_ = CUBLAS_POINTER_MODE_HOST;
  cublasMath_t math_mode_ = CUBLAS_DEFAULT_MATH;
  bool saved_ = false;
};

/// The QuantSpec, flattened for the kernels (after validate()).
inline cuda_detail::RtnParams to_params(const QuantSpec& s, int64_t cols) {
  cuda_detail::RtnParams p;
  p.bits = s.bits;
  p.symmetric = s.symmetric;
  p.group_size = effective_group_size(s, cols);
  p.scale_dtype = static_cast<int>(s.scale_dtype);
  p.mse = s.search == ScaleSearch::kMse;
  p.mse_grid = s.mse_grid;
  // The same expression as compute_qparams in quant.h, evaluated on the host in double.
  p.mse_steps = p.mse ? static_cast<int>(std::floor((1.0 - s.mse_min_shrink) * s.mse_grid + 1e-9)) : 0;
  p.mse_norm = s.mse_norm;
  return p;
}

// The kernels' element type and the core's scale dtype share one encoding (quant.h cannot be included by nvcc, so the
// enums stay apart; bindings map both from the same torch dtypes).
static_assert(static_cast<int>(ElementType::kF32) == static_cast<int>(ScaleDtype::kFloat32) &&
                  static_cast<int>(ElementType::kBf16) == static_cast<int>(ScaleDtype::kBFloat16) &&
                  static_cast<int>(ElementType::kF16) == static_cast<int>(ScaleDtype::kFloat16),
              "ElementType and ScaleDtype must use the same codes");

/// Invalid argument unless t is one of the three element types ("<arg>: expected 0 (float32), ...").
inline Status check_element_type(ElementType t, const char* arg) {
  if (t == ElementType::kF32 || t == ElementType::kBf16 || t == ElementType::kF16) return {};
  return Status::invalid("{}: expected 0 (float32), 1 (bfloat16) or 2 (float16), got {}", arg, static_cast<int>(t));
}

/// max_shared_memory_bytes of the kernels.h calls that take it: 0 (the device's limit) or at least the 48 KiB every
/// kernel may use without opting in.
inline Status check_shared_memory_request(size_t requested) {
  if (requested == 0 || requested >= cuda_detail::kDefaultSmemBytes) return {};
  return Status::invalid(
      "max_shared_memory_bytes: expected 0 (the device's limit) or at least {} (48 KiB, what every CUDA device "
      "provides), got {}",
      cuda_detail::kDefaultSmemBytes, requested);
}

/// The shared memory per block the launches on `device` may plan with (smem_plan.h): the device's opt-in limit
/// (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB on sm_90 / sm_100, 163 KiB on sm_80, 99 KiB on sm_86 / sm_89 /
/// sm_120), lowered to `requested` when that is non-zero and smaller. Read on every call (a host-side attribute
/// lookup; the library keeps no per-device cache).
inline Status shared_memory_limit(int device, size_t requested, size_t* limit) {
  MQ_RETURN_IF_ERROR(check_shared_memory_request(requested));
  int optin = 0;
  MQ_CUDA_RETURN("cudaDeviceGetAttribute (cudaDevAttrMaxSharedMemoryPerBlockOptin)",
                 cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t device_limit = optin > 0 ? static_cast<size_t>(optin) : 0;
  *limit = requested != 0 && requested < device_limit ? requested : device_limit;
  return {};
}

inline const char* nan_or_inf(float v) { return std::isnan(v) ? "NaN" : "Inf"; }

/// The element of type t (float32, bfloat16 or IEEE half) at the host copy `bytes`, widened exactly to float (host
/// side, for error messages; the kernels widen with element_type.cuh).
inline float element_to_float(ElementType t, const void* bytes) {
  if (t == ElementType::kF32) {
    float f;
    std::memcpy(&f, bytes, sizeof(f));
    return f;
  }
  uint16_t h;
  std::memcpy(&h, bytes, sizeof(h));
  if (t == ElementType::kBf16) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  if (exp == 0x1f) return man ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -24);
  return sign * std::ldexp(static_cast<float>(man + 1024), exp - 25);
}

}  // namespace api_detail
}  // namespace v0
}  // namespace moequant
