// kernels/src/api.cpp -- the public functions of moequant/cuda/kernels.h: argument validation (with the CPU
// core's messages), device selection, device-flag readback and Status mapping around the launchers of
// quant_pack.cu and hessian.cu. Compiled by the host C++ compiler, so fmt (status.h) stays out of nvcc.
#include <moequant/cuda/kernels.h>
#include <moequant/pack.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include "api_common.h"
#include "launch.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace moequant {
inline namespace v0 {
namespace {

using cuda_detail::kNoBadIndex;

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
  Status release() {
    void* p = ptr_;
    ptr_ = nullptr;
    if (p) MQ_CUDA_RETURN("cudaFreeAsync", cudaFreeAsync(p, stream_));
    return {};
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

}  // namespace

// ---- quantize / dequantize / pack -------------------------------------------------------------------------

Status cuda_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const QuantSpec& spec, int8_t* codes,
                         float* scales, int32_t* zeros, float* dequantized, cudaStream_t stream) {
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

  StreamBuffer flag(stream);
  MQ_RETURN_IF_ERROR(flag.allocate(sizeof(unsigned long long)));
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
  MQ_RETURN_IF_ERROR(detail::check_bits(bits));
  if (rows < 0 || cols < 0) return Status::invalid("q: expected a non-negative shape, got [{}, {}]", rows, cols);
  if (rows == 0 || cols == 0) return {};
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(q, "q", &device));
  ScopedDevice guard;
  MQ_RETURN_IF_ERROR(guard.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(out, "out", device, false));

  StreamBuffer flag(stream);
  MQ_RETURN_IF_ERROR(flag.allocate(sizeof(unsigned long long)));
  MQ_CUDA_RETURN("pack_rows kernel",
                 cuda_detail::launch_pack_rows(q, rows, cols, bits, out, flag.as<unsigned long long>(), stream));
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
  if (precision < kHessianFp32 || precision > kHessianBf16 || !cuda_detail::hessian_layout(n, dim, num_experts, &layout))
    return 0;
  if (precision != kHessianBf16) return layout.total;
  // bf16 adds a copy of the gathered rows in bf16 after the fp32 layout.
  return layout.total + cuda_detail::align256(static_cast<size_t>(n) * static_cast<size_t>(dim) * 2);
}

size_t cuda_hessian_workspace_bytes(int64_t n, int64_t dim, int64_t num_experts) {
  return cuda_hessian_workspace_bytes(n, dim, num_experts, kHessianFp32);
}

namespace {

/// Width of the block columns of the tensor-core update: large enough for efficient GEMMs, small enough that the
/// wasted upper part of the diagonal blocks stays small (T / d of the full GEMM).
int64_t block_cols(int64_t dim) {
  if (dim <= 1024) return dim;
  return dim <= 4096 ? 512 : 1024;
}

/// Stage 3 of the fp32 path: one SYRK per non-empty expert.
/// Layout: the gathered rows of expert e are a row-major [m, dim] matrix G (ld = dim). cuBLAS is column-major,
/// so the same memory read column-major with lda = dim is A = G^T, [dim, m]. Then A * A^T = G^T G =
/// sum_k g_k g_k^T = sum_i c_i x_i x_i^T, the [dim, dim] update we want: SYRK with OP_N, n = dim, k = m.
/// H_e is symmetric, so its row-major storage is also its column-major storage; SYRK with beta = 1 adds into
/// the column-major lower triangle only (memory j * dim + i, i >= j: the row-major upper triangle) and the
/// finish stage copies that triangle onto the other (whose entries still hold the old values until then).
/// Math mode: CUBLAS_DEFAULT_MATH never uses TF32 for fp32 routines, so the sums are fp32-accurate whatever
/// torch.backends.cuda.matmul.allow_tf32 set on a shared handle.
Status update_fp32(cublasHandle_t handle, const float* gathered, const std::vector<int32_t>& offsets, int64_t dim,
                   int64_t num_experts, float* H) {
  const float one = 1.0f;
  const int d = static_cast<int>(dim);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t b = offsets[static_cast<size_t>(e)], m = offsets[static_cast<size_t>(e) + 1] - b;
    if (m == 0) continue;
    const cublasStatus_t st = cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, d, m, &one,
                                          gathered + static_cast<int64_t>(b) * dim, d, &one, H + e * dim * dim, d);
    if (st != CUBLAS_STATUS_SUCCESS)
      return Status::cuda("cublasSsyrk (expert {} of {}, {} rows, dim {}): {} ({})", e, num_experts, m, dim,
                          cublasGetStatusString(st), static_cast<int>(st));
  }
  return {};
}

/// Stage 3 of the tensor-core paths: the same lower triangle (column-major view as above) by one GEMM per block
/// column, H[j0:d, j0:j0+T] += A[j0:d, :] A[j0:j0+T, :]^T, which does (1 + T/d) / 2 of a full GEMM's work
/// (0.57 at d = 7168, T = 1024). A is the fp32 rows with TF32 compute, or their bf16 copy with fp32 accumulation.
Status update_tensor_cores(cublasHandle_t handle, const void* a, cudaDataType_t a_type, size_t elem,
                           cublasComputeType_t compute, int precision, const std::vector<int32_t>& offsets,
                           int64_t dim, int64_t num_experts, float* H) {
  const float one = 1.0f;
  const int64_t T = block_cols(dim);
  const int d = static_cast<int>(dim);
  for (int64_t e = 0; e < num_experts; ++e) {
    const int32_t b = offsets[static_cast<size_t>(e)], m = offsets[static_cast<size_t>(e) + 1] - b;
    if (m == 0) continue;
    const char* ae = static_cast<const char*>(a) + static_cast<size_t>(b) * static_cast<size_t>(dim) * elem;
    float* he = H + e * dim * dim;
    for (int64_t j0 = 0; j0 < dim; j0 += T) {
      const int w = static_cast<int>(dim - j0 < T ? dim - j0 : T);
      const int rows_c = static_cast<int>(dim - j0);
      const void* aj = ae + static_cast<size_t>(j0) * elem;
      const cublasStatus_t st = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, rows_c, w, m, &one, aj, a_type, d, aj,
                                             a_type, d, &one, he + j0 * dim + j0, CUDA_R_32F, d, compute,
                                             CUBLAS_GEMM_DEFAULT);
      if (st != CUBLAS_STATUS_SUCCESS)
        return Status::cuda("cublasGemmEx (precision {}, expert {} of {}, {} rows, dim {}, block column {}): {} ({})",
                            precision, e, num_experts, m, dim, j0, cublasGetStatusString(st), static_cast<int>(st));
    }
  }
  return {};
}

}  // namespace

Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream) {
  return cuda_accumulate_hessian(x, n, dim, ldx, expert_ids, weights, num_experts, H, counts, mass, workspace,
                                 workspace_bytes, handle, stream, kHessianFp32);
}

Status cuda_accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                               const float* weights, int64_t num_experts, float* H, int64_t* counts, double* mass,
                               void* workspace, size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                               int precision) {
  // The CPU's checks and messages first (accumulate_hessian / validate_hessian_inputs), then the CUDA limits.
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

  // Stage 1: validate + sort + gather on the device. H, counts and mass are not touched yet.
  MQ_CUDA_RETURN("accumulate_hessian prepare",
                 cuda_detail::launch_hessian_prepare(x, n, dim, ldx, expert_ids, weights, num_experts, workspace,
                                                     layout, stream));

  // Stage 2: one readback of the flags and the per-expert offsets. The host needs the offsets anyway to give
  // each update its row range and to skip empty experts, and the flags decide whether H may be touched at all.
  std::vector<unsigned char> rb(layout.readback_bytes);
  MQ_RETURN_IF_ERROR(
      read_back(rb.data(), static_cast<const char*>(workspace) + layout.flags, rb.size(), stream, "hessian readback"));
  unsigned long long flags[3];
  std::memcpy(flags, rb.data() + layout.flags, sizeof(flags));
  std::vector<int32_t> offsets(static_cast<size_t>(num_experts) + 1);
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
    MQ_RETURN_IF_ERROR(read_back(&v, x + i * ldx + j, sizeof(v), stream, "x value readback"));
    return Status::invalid("x: expected finite values, got {} at ({}, {})", nan_or_inf(v), i, j);
  }
  if (offsets[0] != 0 || offsets[static_cast<size_t>(num_experts)] != n)
    return Status::internal("accumulate_hessian: the device sort routed {} of {} rows", offsets.back() - offsets[0], n);

  // Stage 3: the update of each non-empty expert's lower triangle, in the requested precision.
  const float* gathered = reinterpret_cast<const float*>(static_cast<const char*>(workspace) + layout.gathered);
  const void* rows16 = nullptr;
  if (precision == kHessianBf16) {
    void* dst = static_cast<char*>(workspace) + layout.total;
    MQ_CUDA_RETURN("accumulate_hessian bf16 rows", cuda_detail::launch_f32_to_bf16(gathered, dst, n * dim, stream));
    rows16 = dst;
  }
  {
    CublasStateGuard state(handle);
    MQ_RETURN_IF_ERROR(state.enter(stream));  // save, then stream, host pointer mode, CUBLAS_DEFAULT_MATH
    if (precision == kHessianFp32)
      MQ_RETURN_IF_ERROR(update_fp32(handle, gathered, offsets, dim, num_experts, H));
    else if (precision == kHessianTf32)
      MQ_RETURN_IF_ERROR(update_tensor_cores(handle, gathered, CUDA_R_32F, 4, CUBLAS_COMPUTE_32F_FAST_TF32, precision,
                                             offsets, dim, num_experts, H));
    else
      MQ_RETURN_IF_ERROR(update_tensor_cores(handle, rows16, CUDA_R_16BF, 2, CUBLAS_COMPUTE_32F, precision, offsets,
                                             dim, num_experts, H));
    MQ_RETURN_IF_ERROR(state.restore());
  }

  // Stage 4: mirror the triangle, add counts and mass (all stream-ordered after the updates).
  MQ_CUDA_RETURN("accumulate_hessian finish", cuda_detail::launch_hessian_finish(H, dim, num_experts, weights, counts,
                                                                                 mass, workspace, layout, stream));
  return {};
}

}  // namespace v0
}  // namespace moequant
