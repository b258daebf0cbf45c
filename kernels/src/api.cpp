// kernels/src/api.cpp -- the public functions of moequant/cuda/kernels.h: argument validation (with the CPU
// core's messages), device selection, device-flag readback and Status mapping around the launchers of
// quant_pack.cu and hessian.cu. Compiled by the host C++ compiler, so fmt (status.h) stays out of nvcc.
#include <moequant/cuda/kernels.h>
#include <moequant/pack.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include "api_common.h"
#include "hessian_launch.h"
#include "hessian_update.h"
#include "launch.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace moequant {
inline namespace v0 {
namespace {

using cuda_detail::kNoBadIndex;

using api_detail::check_element_type;
using api_detail::check_on_device;
using api_detail::CublasStateGuard;
using api_detail::device_of;
using api_detail::nan_or_inf;
using api_detail::read_back;
using api_detail::ScopedDevice;
using api_detail::to_params;

/// A small stream-ordered device buffer (the device-side error flag of calls without a workspace argument).
class StreamBuffer {
 public:
  explicit StreamBuffer(cudaStream_t stream) : stream_(stream) {}
  StreamBuffer(const StreamBuffer&) = delete;
  StreamBuffer& operator=(const StreamBuffer&) = delete;
  ~StreamBuffer() {
    if (ptr_) (void)cudaFreeAsync(ptr_, stream_);  // error paths only; release() reports on the normal path
  }
  Status allocate(size_t bytes) {
    MQ_CUDA_RETURN("cudaMallocAsync", cudaMallocAsync(&ptr_, bytes, stream_));
    return {};
  }
  /// Uses the caller's device memory `external` when given (never freed here), else allocates `bytes`.
  Status use_or_allocate(void* external, size_t bytes) {
    if (external == nullptr) return allocate(bytes);
    external_ = external;
    return {};
  }
  Status release() {
    void* p = ptr_;
    ptr_ = nullptr;
    if (p) MQ_CUDA_RETURN("cudaFreeAsync", cudaFreeAsync(p, stream_));
    return {};
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(external_ ? external_ : ptr_);
  }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
  void* external_ = nullptr;
};

/// The pack_rows entry points' first checks, in their order: bits, then a non-negative shape.
Status check_pack_args(int64_t rows, int64_t cols, int bits) {
  MQ_RETURN_IF_ERROR(detail::check_bits(bits));
  if (rows < 0 || cols < 0) return Status::invalid("q: expected a non-negative shape, got [{}, {}]", rows, cols);
  return {};
}

/// For a non-empty shape: q's device, made current by `guard` until the call returns, and out on it.
Status enter_pack_device(const int8_t* q, const int32_t* out, ScopedDevice* guard, int* device) {
  MQ_RETURN_IF_ERROR(device_of(q, "q", device));
  MQ_RETURN_IF_ERROR(guard->enter(*device));
  return check_on_device(out, "out", *device, false);
}

}  // namespace

// ---- quantize / dequantize / pack -------------------------------------------------------------------------

Status cuda_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const QuantSpec& spec, int8_t* codes,
                         float* scales, int32_t* zeros, float* dequantized, cudaStream_t stream) {
  return cuda_quantize_rtn(w, rows, cols, ld, spec, codes, scales, zeros, dequantized, stream, nullptr);
}

Status cuda_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const QuantSpec& spec, int8_t* codes,
                         float* scales, int32_t* zeros, float* dequantized, cudaStream_t stream,
                         void* flag_workspace) {
  MQ_RETURN_IF_ERROR(validate(spec, cols));
  if (rows < 0) return Status::invalid("out_features: expected >= 0, got {}", rows);
  if (ld < cols) return Status::invalid("ld: expected >= in_features={}, got {}", cols, ld);
  if (cols > std::numeric_limits<int32_t>::max())  // the kernel indexes within a group with 32-bit ints
    return Status::invalid("in_features: expected at most {} on CUDA, got {}", std::numeric_limits<int32_t>::max(),
                           cols);
  if (rows == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(w, "w", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(codes, "codes", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(scales, "scales", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(zeros, "zeros", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(dequantized, "dequantized", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(flag_workspace, "flag_workspace", device, true));

  StreamBuffer flag(stream);
  MQ_RETURN_IF_ERROR(flag.use_or_allocate(flag_workspace, sizeof(unsigned long long)));
  MQ_CUDA_RETURN("quantize_rtn kernel",
                 cuda_detail::launch_quantize_rtn(w, rows, cols, ld, to_params(spec, cols), codes, scales, zeros,
                                                  dequantized, flag.as<unsigned long long>(), stream));
  unsigned long long bad = kNoBadIndex;
  MQ_RETURN_IF_ERROR(read_back(&bad, flag.as<unsigned long long>(), sizeof(bad), stream, "quantize_rtn flag readback"));
  MQ_RETURN_IF_ERROR(flag.release());
  if (bad != kNoBadIndex) {
    const int64_t r = static_cast<int64_t>(bad) / cols, c = static_cast<int64_t>(bad) % cols;
    float v = 0.0f;
    MQ_RETURN_IF_ERROR(read_back(&v, w + r * ld + c, sizeof(v), stream, "quantize_rtn value readback"));
    return Status::invalid("w: expected finite values, got {} at ({}, {})", nan_or_inf(v), r, c);
  }
  return {};
}

Status cuda_dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows, int64_t cols,
                       const QuantSpec& spec, float* out, cudaStream_t stream) {
  MQ_RETURN_IF_ERROR(validate(spec, cols));
  if (rows < 0) return Status::invalid("out_features: expected >= 0, got {}", rows);
  if (rows == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(codes, "codes", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(scales, "scales", device, false));
  MQ_RETURN_IF_ERROR(check_on_device(zeros, "zeros", device, true));
  MQ_RETURN_IF_ERROR(check_on_device(out, "out", device, false));
  MQ_CUDA_RETURN("dequantize kernel", cuda_detail::launch_dequantize(codes, scales, zeros, rows, cols,
                                                                     effective_group_size(spec, cols), out, stream));
  return {};
}

Status cuda_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out, cudaStream_t stream) {
  return cuda_pack_rows(q, rows, cols, bits, out, stream, nullptr);
}

Status cuda_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out, cudaStream_t stream,
                      void* flag_workspace) {
  MQ_RETURN_IF_ERROR(check_pack_args(rows, cols, bits));
  if (rows == 0 || cols == 0) return {};
  ScopedDevice guard;
  int device = -1;
  MQ_RETURN_IF_ERROR(enter_pack_device(q, out, &guard, &device));
  MQ_RETURN_IF_ERROR(check_on_device(flag_workspace, "flag_workspace", device, true));

  StreamBuffer flag(stream);
  MQ_RETURN_IF_ERROR(flag.use_or_allocate(flag_workspace, sizeof(unsigned long long)));
  MQ_CUDA_RETURN("pack_rows kernel", cuda_detail::launch_pack_rows(q, rows, cols, bits, out,
                                                                   flag.as<unsigned long long>(), nullptr, stream));
  unsigned long long bad = kNoBadIndex;
  MQ_RETURN_IF_ERROR(read_back(&bad, flag.as<unsigned long long>(), sizeof(bad), stream, "pack_rows flag readback"));
  MQ_RETURN_IF_ERROR(flag.release());
  if (bad != kNoBadIndex) {
    const int64_t r = static_cast<int64_t>(bad) / cols, i = static_cast<int64_t>(bad) % cols;
    int8_t v = 0;
    MQ_RETURN_IF_ERROR(read_back(&v, q + r * cols + i, sizeof(v), stream, "pack_rows value readback"));
    return Status::invalid("q: expected codes in [{}, {}] for {} bits, got {} at element {} of row {}",
                           qmin_for(bits), qmax_for(bits), bits, static_cast<int>(v), i, r);
  }
  return {};
}

Status cuda_pack_rows_host_flag(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out,
                                cudaStream_t stream, void* host_flag) {
  MQ_RETURN_IF_ERROR(check_pack_args(rows, cols, bits));
  if (host_flag == nullptr)
    return Status::invalid("host_flag: expected {} bytes of page-locked host memory, got null", kCudaHostFlagBytes);
  if (reinterpret_cast<uintptr_t>(host_flag) % alignof(unsigned int) != 0)
    return Status::invalid("host_flag: expected a {}-byte aligned address, got {}", alignof(unsigned int), host_flag);
  if (rows == 0 || cols == 0) return {};
  ScopedDevice guard;
  int device = -1;
  MQ_RETURN_IF_ERROR(enter_pack_device(q, out, &guard, &device));
  void* device_view = nullptr;
  MQ_RETURN_IF_ERROR(api_detail::mapped_host_memory(host_flag, "host_flag", device, &device_view));

  // The host clears the word before the launch (program order: the kernel cannot run before this store); the
  // kernel only ever stores 1 into it; the synchronisation makes its store visible here.
  volatile unsigned int* word = static_cast<volatile unsigned int*>(host_flag);
  *word = 0u;
  MQ_CUDA_RETURN("pack_rows kernel", cuda_detail::launch_pack_rows(q, rows, cols, bits, out, nullptr,
                                                                   static_cast<unsigned int*>(device_view), stream));
  MQ_CUDA_RETURN("cudaStreamSynchronize", cudaStreamSynchronize(stream));
  if (*word == 0u) return {};
  // Rare (an error): the first-offender pass of cuda_pack_rows (device flag + atomicMin) names the offender.
  MQ_RETURN_IF_ERROR(cuda_pack_rows(q, rows, cols, bits, out, stream, nullptr));
  return Status::internal("pack_rows: the kernel flagged an out-of-range code that the first-offender pass did not "
                          "find (was q modified during the call?)");
}

Status cuda_unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q, cudaStream_t stream) {
  MQ_RETURN_IF_ERROR(detail::check_bits(bits));
  if (cols < 0) return Status::invalid("in_features: expected >= 0, got {}", cols);
  if (rows < 0) return Status::invalid("packed: expected >= 0 rows, got {}", rows);
  if (rows == 0 || cols == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(packed, "packed", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(q, "q", device, false));
  MQ_CUDA_RETURN("unpack_rows kernel", cuda_detail::launch_unpack_rows(packed, rows, cols, bits, q, stream));
  return {};
}

// ---- Hessian ------------------------------------------------------------------------------------------------

size_t cuda_hessian_workspace_bytes(int64_t n, int64_t dim, int64_t num_experts, int precision) {
  cuda_detail::HessianLayout layout;
  if (!cuda_detail::hessian_layout(n, dim, num_experts, precision, &layout)) return 0;
  return layout.total;
}

size_t cuda_hessian_workspace_bytes(int64_t n, int64_t dim, int64_t num_experts) {
  return cuda_hessian_workspace_bytes(n, dim, num_experts, kHessianFp32);
}

Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream) {
  return cuda_accumulate_hessian(x, n, dim, ldx, expert_ids, weights, num_experts, H, counts, mass, workspace,
                                 workspace_bytes, handle, stream, kHessianFp32, true);
}

Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                               int precision) {
  return cuda_accumulate_hessian(x, n, dim, ldx, expert_ids, weights, num_experts, H, counts, mass, workspace,
                                 workspace_bytes, handle, stream, precision, true);
}

Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                               int precision, bool symmetrize) {
  return cuda_accumulate_hessian(static_cast<const void*>(x), ElementType::kF32, n, dim, ldx, expert_ids, weights,
                                 num_experts, H, counts, mass, workspace, workspace_bytes, handle, stream, precision,
                                 symmetrize);
}

namespace {
/// Element (i, j) of x (type x_type) read back and widened to float, for the error message.
Status read_x_value(const void* x, ElementType x_type, int64_t i, int64_t ldx, int64_t j, cudaStream_t stream,
                    float* v) {
  const int64_t bytes = static_cast<int64_t>(element_size(x_type));
  unsigned char raw[sizeof(float)] = {};
  MQ_RETURN_IF_ERROR(read_back(raw, static_cast<const char*>(x) + (i * ldx + j) * bytes, static_cast<size_t>(bytes),
                               stream, "x value readback"));
  *v = api_detail::element_to_float(x_type, raw);
  return {};
}
}  // namespace

Status cuda_accumulate_hessian(const void* x, ElementType x_type, int64_t n, int64_t dim, int64_t ldx,
                               const int32_t* expert_ids, const float* weights, int64_t num_experts, float* H,
                               int64_t* counts, double* mass, void* workspace, size_t workspace_bytes,
                               cublasHandle_t handle, cudaStream_t stream, int precision, bool symmetrize) {
  // The CPU's checks and messages first (accumulate_hessian / validate_hessian_inputs), then the CUDA limits.
  MQ_RETURN_IF_ERROR(check_element_type(x_type, "x_type"));
  if (precision != kHessianFp32 && precision != kHessianTf32 && precision != kHessianBf16)
    return Status::invalid("precision: expected 0 (fp32), 1 (tf32) or 2 (bf16), got {}", precision);
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
  if (!cuda_detail::hessian_layout(n, dim, num_experts, precision, &layout))
    return Status::invalid("n, dim: the workspace for {} rows of dim {} and {} experts overflows the address space "
                           "(or the padded row count exceeds {}; split the batch)", n, dim, num_experts, kI32Max);
  const size_t need = layout.total;
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

  // Stage 1: validate + sort (+ the fp32 gather) on the device. H, counts, mass untouched.
  MQ_CUDA_RETURN("accumulate_hessian prepare",
                 cuda_detail::launch_hessian_prepare(x, x_type, n, dim, ldx, expert_ids, weights, num_experts,
                                                     workspace, layout, stream));
  char* ws = static_cast<char*>(workspace);
  std::vector<int32_t> offsets(static_cast<size_t>(num_experts) + 1), poffsets;
  hessian_detail::TensorCorePlan tc_plan;
  if (precision != kHessianFp32) {
    // Stage 1b: the padded layout needs the per-expert counts (one extra readback), then the gather writes the
    // scaled rows once, directly in the GEMM input type.
    MQ_RETURN_IF_ERROR(read_back(offsets.data(), ws + layout.offsets, offsets.size() * sizeof(int32_t), stream,
                                 "hessian offsets readback"));
    poffsets = hessian_detail::plan_padded_offsets(offsets, num_experts);
    if (poffsets.back() > layout.row_capacity)
      return Status::internal("accumulate_hessian: {} padded rows exceed the workspace's {}", poffsets.back(),
                              layout.row_capacity);
    // Pageable source: returns once staged, so `poffsets` stays usable on the host.
    MQ_CUDA_RETURN("accumulate_hessian padded offsets upload",
                   cudaMemcpyAsync(ws + layout.poffsets, poffsets.data(), poffsets.size() * sizeof(int32_t),
                                   cudaMemcpyHostToDevice, stream));
    MQ_CUDA_RETURN("accumulate_hessian gather", cuda_detail::launch_hessian_gather_tc(x, x_type, dim, ldx, weights,
                                                                                     num_experts, workspace, layout,
                                                                                     stream));
    // The GEMM plan and its pointer upload need only the padded offsets: planned on the host while the gather runs.
    MQ_RETURN_IF_ERROR(hessian_detail::plan_tensor_cores(layout, workspace, poffsets, dim, num_experts, H, stream,
                                                         &tc_plan));
  }

  // Stage 2: one readback of the flags and the per-expert offsets. The host needs the offsets anyway to give each
  // update its row range and to skip empty experts, and the flags decide whether H may be touched at all.
  std::vector<unsigned char> rb(layout.readback_bytes);
  MQ_RETURN_IF_ERROR(read_back(rb.data(), ws + layout.flags, rb.size(), stream, "hessian readback"));
  unsigned long long flags[3];
  std::memcpy(flags, rb.data() + layout.flags, sizeof(flags));
  std::memcpy(offsets.data(), rb.data() + layout.offsets, offsets.size() * sizeof(int32_t));

  // Report the first offending row, with the CPU's precedence inside a row: id, then weight, then x.
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
    MQ_RETURN_IF_ERROR(read_x_value(x, x_type, i, ldx, j, stream, &v));
    return Status::invalid("x: expected finite values, got {} at ({}, {})", nan_or_inf(v), i, j);
  }
  if (offsets[0] != 0 || offsets[static_cast<size_t>(num_experts)] != n)
    return Status::internal("accumulate_hessian: the device sort routed {} of {} rows", offsets.back() - offsets[0], n);

  // Stage 3: the update of each non-empty expert's lower triangle, in the requested precision.
  {
    CublasStateGuard state(handle);
    MQ_RETURN_IF_ERROR(state.enter(stream));  // save, then stream, host pointer mode, CUBLAS_DEFAULT_MATH
    if (precision == kHessianFp32) {
      const auto* rows = reinterpret_cast<const float*>(ws + layout.rows);
      MQ_RETURN_IF_ERROR(hessian_detail::update_fp32(handle, rows, offsets, dim, num_experts, H));
    } else {
      MQ_RETURN_IF_ERROR(hessian_detail::update_tensor_cores(handle, layout, workspace, tc_plan, dim));
    }
    MQ_RETURN_IF_ERROR(state.restore());
  }

  // Stage 4: mirror the triangle (unless deferred), add counts and mass (all stream-ordered after the updates).
  if (symmetrize) {
    const auto* dev_offsets = reinterpret_cast<const int32_t*>(ws + layout.offsets);
    MQ_CUDA_RETURN("accumulate_hessian mirror",
                   cuda_detail::launch_hessian_mirror(H, dim, num_experts, dev_offsets, stream));
  }
  MQ_CUDA_RETURN("accumulate_hessian stats",
                 cuda_detail::launch_hessian_stats(num_experts, weights, counts, mass, workspace, layout, stream));
  return {};
}

Status cuda_hessian_symmetrize(float* H, int64_t dim, int64_t num_experts, cudaStream_t stream) {
  if (dim <= 0) return Status::invalid("dim: expected > 0, got {}", dim);
  if (num_experts <= 0) return Status::invalid("num_experts: expected > 0, got {}", num_experts);
  if (dim > std::numeric_limits<int32_t>::max())
    return Status::invalid("dim: expected at most {} on CUDA, got {}", std::numeric_limits<int32_t>::max(), dim);
  if (H == nullptr)
    return Status::invalid("H: expected a pointer to [{}, {}, {}] accumulators, got null", num_experts, dim, dim);
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(H, "H", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_CUDA_RETURN("hessian_symmetrize mirror", cuda_detail::launch_hessian_mirror(H, dim, num_experts, nullptr, stream));
  return {};
}

}  // namespace v0
}  // namespace moequant
