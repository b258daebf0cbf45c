// kernels/src/gptq_api.cpp -- cuda_gptq_batched, cuda_gptq_batched_format and cuda_hadamard (kernels.h): validation
// with the CPU core's messages, the drivers of the batched GPTQ (kernel launches of gptq_batched.cu / gptq_format.cu +
// cuBLAS), Status mapping. Host compiler only (fmt stays out of nvcc).
// Over 400 lines on purpose: the int and the format drivers share the steps of one solve (factorize_all,
// trailing_update, finish_solve and their helpers) in this file's anonymous namespace; one translation unit keeps
// them internal instead of exporting a driver-step header for two callers.
#include <moequant/cuda/kernels.h>
#include <moequant/format.h>
#include <moequant/gptq.h>
#include <moequant/gptq_format.h>
#include <moequant/hadamard.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include "api_common.h"
#include "gptq_format_launch.h"
#include "launch.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace moequant {
inline namespace v0 {
namespace {

using cuda_detail::GptqLayout;
using cuda_detail::GptqSmemPlan;
using cuda_detail::kNoBadIndex;

using api_detail::CublasStateGuard;
using api_detail::HostMemoryText;
using api_detail::nan_or_inf;
using api_detail::read_back;
using api_detail::ScopedDevice;
using api_detail::to_params;

// This file's wording for host memory ("got host memory"), as before the helpers moved to api_common.h.
Status device_of(const void* p, const char* arg, int* device) {
  return api_detail::device_of(p, arg, device, HostMemoryText::kGeneric);
}

Status check_on_device(const void* p, const char* arg, int device) {
  return api_detail::check_on_device(p, arg, device, /*nullable=*/false, HostMemoryText::kGeneric);
}

/// X = L^-1 in place for the square [off, off + size) of experts (base a, stride sA; diagonal kCholBlock blocks are
/// already inverted): X = [[X11, 0], [X21, X22]] with X21 = -X22 (L21 X11), halves aligned to kCholBlock. Two full
/// GEMMs per split (the triangular operands are read as squares with zero upper parts): ~2 cols^3 / 3 flops.
Status tri_inverse(float* a, int64_t C, int64_t off, int64_t size, float* tmp, long long stmp, int nbat,
                   cublasHandle_t handle) {
  constexpr int64_t kB = cuda_detail::kCholBlock;
  if (size <= kB) return {};
  const int64_t nblk = (size + kB - 1) / kB, n1 = (nblk + 1) / 2 * kB, n2 = size - n1;
  MQ_RETURN_IF_ERROR(tri_inverse(a, C, off, n1, tmp, stmp, nbat, handle));
  MQ_RETURN_IF_ERROR(tri_inverse(a, C, off + n1, n2, tmp, stmp, nbat, handle));
  const long long sA = static_cast<long long>(C) * C;
  const int c = static_cast<int>(C), m1 = static_cast<int>(n1), m2 = static_cast<int>(n2);
  const float one = 1.0f, minus_one = -1.0f, zero = 0.0f;
  float* l21 = a + off * C + off + n1;
  MQ_CUBLAS_RETURN("cublasSgemmStridedBatched (inverse, L21 X11)",
                   cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, m2, m1, m1, &one, l21, c, sA,
                                             a + off * C + off, c, sA, &zero, tmp, m2, stmp, nbat));
  MQ_CUBLAS_RETURN("cublasSgemmStridedBatched (inverse, -X22 T)",
                   cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_N, m2, m1, m2, &minus_one,
                                             a + (off + n1) * C + off + n1, c, sA, tmp, m2, stmp, &zero, l21, c, sA,
                                             nbat));
  return {};
}

/// Left-looking blocked Cholesky (column-major lower) of experts [e0, e0 + n) of A (stride cols^2), kCholBlock
/// columns per step: GEMM update of the block column, diagonal block kernel, panel = A21 * inv(L11)^T (GEMM into the
/// panel buffer, copied back). ~cols^3/3 flops, all batched over the experts.
Status factorize(float* A, int64_t C, int64_t e0, int64_t n, void* ws, const GptqLayout& l, const GptqSmemPlan& sp,
                 cublasHandle_t handle, cudaStream_t stream) {
  const int c = static_cast<int>(C), nbat = static_cast<int>(n);
  const long long sA = static_cast<long long>(C) * C;
  float* a = A + e0 * C * C;
  float* panel = reinterpret_cast<float*>(static_cast<char*>(ws) + l.panel) + e0 * C * cuda_detail::kCholBlock;
  const float* dinv = reinterpret_cast<const float*>(static_cast<char*>(ws) + l.dinv) +
                      e0 * cuda_detail::kCholBlock * cuda_detail::kCholBlock;
  const float one = 1.0f, minus_one = -1.0f, zero = 0.0f;
  for (int64_t k0 = 0; k0 < C; k0 += cuda_detail::kCholBlock) {
    const int64_t k1 = std::min<int64_t>(k0 + cuda_detail::kCholBlock, C);
    const int bk = static_cast<int>(k1 - k0);
    if (k0 > 0)  // A[k0:, k0:k1] -= L[k0:, :k0] L[k0:k1, :k0]^T
      MQ_CUBLAS_RETURN("cublasSgemmStridedBatched (cholesky update)",
                       cublasSgemmStridedBatched(handle, CUBLAS_OP_N, CUBLAS_OP_T, c - static_cast<int>(k0), bk,
                                                 static_cast<int>(k0), &minus_one, a + k0, c, sA, a + k0, c, sA, &one,
                                                 a + k0 * C + k0, c, sA, nbat));
    MQ_CUDA_RETURN("gptq chol_diag kernel", cuda_detail::launch_chol_diag(A, C, k0, bk, e0, n, ws, l, sp, stream));
    if (k1 < C) {
      MQ_CUBLAS_RETURN("cublasSgemmStridedBatched (cholesky panel)",
                       cublasSgemmStridedBatched(
                           handle, CUBLAS_OP_N, CUBLAS_OP_T, c - static_cast<int>(k1), bk, bk, &one, a + k0 * C + k1, c,
                           sA, dinv, cuda_detail::kCholBlock,
                           static_cast<long long>(cuda_detail::kCholBlock) * cuda_detail::kCholBlock, &zero, panel + k1,
                           c, static_cast<long long>(C) * cuda_detail::kCholBlock, nbat));
      MQ_CUDA_RETURN("gptq panel copy kernel",
                     cuda_detail::launch_chol_panel_copy(A, C, k0, k1, bk, e0, n, ws, l, stream));
    }
  }
  // U = J L^-1 J: blocked triangular inverse, then the reversal
  MQ_CUDA_RETURN("gptq inverse prepare", cuda_detail::launch_gptq_invert_prepare(A, C, e0, n, ws, l, sp, stream));
  const int64_t t = C / 2 + cuda_detail::kCholBlock;
  float* tmp = reinterpret_cast<float*>(static_cast<char*>(ws) + l.tinv) + e0 * t * t;
  MQ_RETURN_IF_ERROR(tri_inverse(a, C, 0, C, tmp, static_cast<long long>(t) * t, nbat, handle));
  MQ_CUDA_RETURN("gptq finish kernel", cuda_detail::launch_gptq_finish_factor(A, C, e0, n, ws, l, stream));
  return {};
}

/// Step 2 of the batched solve (shared by the int and the format solves; launch_gptq_prepare has run): builds and
/// factorises every expert, reads the validation flags and the pivot failures back (one synchronisation) and reports
/// them with the CPU's messages, then refactors the failed experts with escalated damping (one readback per round).
/// esc_out: the escalations of each expert.
Status factorize_all(const float* W, float* H, int64_t E, int64_t rows, int64_t cols, const GptqArgs& args, bool act,
                     void* workspace, const GptqLayout& l, const GptqSmemPlan& sp, cublasHandle_t handle,
                     cudaStream_t stream, std::vector<int>* esc_out) {
  char* ws = static_cast<char*>(workspace);
  std::vector<int>& esc = *esc_out;
  esc.assign(static_cast<size_t>(E), 0);
  std::vector<double> frac(static_cast<size_t>(E), args.damp);  // escalated by repeated multiplication, as the CPU
  MQ_CUDA_RETURN("gptq build", cuda_detail::launch_gptq_build(H, cols, 0, E, args.damp, act, workspace, l, stream));
  MQ_RETURN_IF_ERROR(factorize(H, cols, 0, E, workspace, l, sp, handle, stream));
  std::vector<unsigned char> rb(l.readback_bytes);
  MQ_RETURN_IF_ERROR(read_back(rb.data(), ws, rb.size(), stream, "gptq readback"));
  unsigned long long flags[4];
  std::memcpy(flags, rb.data(), sizeof(flags));
  if (flags[0] != kNoBadIndex) {
    const uint64_t i = flags[0], per = static_cast<uint64_t>(rows * cols);
    float v = 0.0f;
    MQ_RETURN_IF_ERROR(read_back(&v, W + i, sizeof(v), stream, "w value readback"));
    return Status::invalid("w: expected finite values, got {} at expert {} ({}, {})", nan_or_inf(v),
                           i / per, (i % per) / cols, i % cols);
  }
  if (flags[1] != kNoBadIndex) {
    const uint64_t i = flags[1], per = static_cast<uint64_t>(cols * cols);
    return Status::invalid("h: expected finite values, got NaN or Inf at expert {} ({}, {})", i / per,
                           (i % per) / cols, i % cols);
  }
  if (flags[2] != kNoBadIndex) {
    const uint64_t i = flags[2];
    return Status::invalid("h: expected a non-negative diagonal, got a negative value at expert {} ({}, {})",
                           i / cols, i % cols, i % cols);
  }
  for (;;) {
    std::vector<int64_t> failed;
    for (int64_t e = 0; e < E; ++e) {
      int32_t f = 0, r = 0;
      std::memcpy(&f, rb.data() + l.fail + 4 * e, 4);
      std::memcpy(&r, rb.data() + l.rbad + 4 * e, 4);
      if (r && !f)
        return Status::numerical(
            "h: the inverse Hessian factor of expert {} does not fit in float (entries of H too large or too "
            "small); normalise H (e.g. divide by the token count)",
            e);
      if (f) failed.push_back(e);
    }
    if (failed.empty()) break;
    for (int64_t e : failed) {
      int& k = esc[static_cast<size_t>(e)];
      double& f = frac[static_cast<size_t>(e)];
      if (k >= args.max_damp_escalations) {
        const Status st = detail::not_positive_definite(k, f);
        return Status::numerical("expert {}: {}", e, st.message());
      }
      ++k;
      f *= args.damp_escalation_factor;
      MQ_CUDA_RETURN("gptq build (retry)", cuda_detail::launch_gptq_build(H, cols, e, 1, f, act, workspace, l, stream));
      MQ_RETURN_IF_ERROR(factorize(H, cols, e, 1, workspace, l, sp, handle, stream));
    }
    MQ_RETURN_IF_ERROR(read_back(rb.data(), ws, rb.size(), stream, "gptq readback"));
  }

  return {};
}

/// The lazy trailing update of the column loop after block [i1, i2) (shared by the int and the format solves):
/// dW[:, i2:] (-)= E_blk U[i1:i2, i2:] as one batched SGEMM (column-major view: dW^T -= U[i1:i2, i2:]^T E_blk^T);
/// the first block overwrites dW (beta = 0) unless onto_w (the act-order solves, whose dW starts as W0).
Status trailing_update(float* H, int64_t E, int64_t rows, int64_t cols, int64_t i1, int64_t i2, char* ws,
                       const GptqLayout& l, cublasHandle_t handle, bool onto_w = false) {
  const int c = static_cast<int>(cols), r = static_cast<int>(rows), ldd = static_cast<int>(l.block);
  const int bw = static_cast<int>(i2 - i1);
  float* dw = reinterpret_cast<float*>(ws + l.dw);
  const float* dblk = reinterpret_cast<const float*>(ws + l.dblk);
  const float one = 1.0f, minus_one = -1.0f, zero = 0.0f;
  MQ_CUBLAS_RETURN("cublasSgemmStridedBatched (trailing update)",
                   cublasSgemmStridedBatched(handle, CUBLAS_OP_T, CUBLAS_OP_N, c - static_cast<int>(i2), r, bw,
                                             &minus_one, H + i2 * cols + i1, c, static_cast<long long>(cols) * cols,
                                             dblk, ldd, static_cast<long long>(rows) * ldd,
                                             i1 == 0 && !onto_w ? &zero : &one, dw + i2, c,
                                             static_cast<long long>(rows) * cols, static_cast<int>(E)));
  return {};
}

/// Step 4 of the batched solve (shared): losses (when non-null) = <h0, D^T D> with D = W - Q, one SSYRK per expert
/// into the factor's buffer; escalations (when non-null) from esc.
Status finish_solve(const float* W, float* H, int64_t E, int64_t rows, int64_t cols, const float* dequantized,
                    double* losses, int32_t* escalations, const std::vector<int>& esc, void* workspace,
                    const GptqLayout& l, cublasHandle_t handle, cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  const int c = static_cast<int>(cols), r = static_cast<int>(rows);
  float* dw = reinterpret_cast<float*>(ws + l.dw);
  const float one = 1.0f, zero = 0.0f;
  if (losses) {
    MQ_CUDA_RETURN("gptq loss diff",
                   cuda_detail::launch_gptq_loss_diff(W, dequantized, E, rows, cols, workspace, l, stream));
    for (int64_t e = 0; e < E; ++e)
      MQ_CUBLAS_RETURN("cublasSsyrk (loss)", cublasSsyrk(handle, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, c, r, &one,
                                                         dw + e * rows * cols, c, &zero, H + e * cols * cols, c));
    MQ_CUDA_RETURN("gptq loss reduce", cuda_detail::launch_gptq_loss_reduce(H, E, cols, losses, workspace, l, stream));
  }
  if (escalations) {
    std::vector<int32_t> e32(esc.begin(), esc.end());
    // pageable source: the call returns once the data is staged, so e32 may die afterwards
    MQ_CUDA_RETURN("escalations copy", cudaMemcpyAsync(escalations, e32.data(), e32.size() * sizeof(int32_t),
                                                       cudaMemcpyHostToDevice, stream));
  }
  return {};
}

}  // namespace

size_t cuda_gptq_workspace_bytes(int64_t num_experts, int64_t rows, int64_t cols, const GptqArgs& args) {
  GptqLayout l;
  return cuda_detail::gptq_layout(num_experts, rows, cols, args.block_size, &l) ? l.total : 0;
}

Status cuda_gptq_batched(const float* W, float* H, int64_t E, int64_t rows, int64_t cols, const GptqArgs& args,
                         int8_t* codes, float* scales, int32_t* zeros, float* dequantized, double* losses,
                         int32_t* escalations, void* workspace, size_t workspace_bytes, cublasHandle_t handle,
                         cudaStream_t stream) {
  return cuda_gptq_batched(W, H, E, rows, cols, args, codes, scales, zeros, dequantized, losses, escalations, workspace,
                           workspace_bytes, handle, stream, 0);
}

Status cuda_gptq_batched(const float* W, float* H, int64_t E, int64_t rows, int64_t cols, const GptqArgs& args,
                         int8_t* codes, float* scales, int32_t* zeros, float* dequantized, double* losses,
                         int32_t* escalations, void* workspace, size_t workspace_bytes, cublasHandle_t handle,
                         cudaStream_t stream, size_t max_shared_memory_bytes) {
  // ---- the CPU's argument checks (validate_gptq), then the CUDA limits ----
  const QuantSpec& s = args.spec;
  MQ_RETURN_IF_ERROR(validate(s, cols));
  if (E < 1) return Status::invalid("num_experts: expected >= 1, got {}", E);
  if (rows < 1) return Status::invalid("out_features: expected >= 1, got {}", rows);
  if (!(args.damp > 0.0 && std::isfinite(args.damp)))
    return Status::invalid("damp: expected a finite value > 0, got {}", args.damp);
  if (args.block_size < 1) return Status::invalid("block_size: expected >= 1, got {}", args.block_size);
  if (args.max_damp_escalations < 0)
    return Status::invalid("max_damp_escalations: expected >= 0, got {}", args.max_damp_escalations);
  if (!(args.damp_escalation_factor > 1.0 && std::isfinite(args.damp_escalation_factor)))
    return Status::invalid("damp_escalation_factor: expected a finite value > 1, got {}", args.damp_escalation_factor);
  if (args.block_size > cuda_detail::kGptqMaxBlock)
    return Status::not_supported("block_size: expected at most {} on CUDA, got {}", cuda_detail::kGptqMaxBlock,
                                 args.block_size);
  if (s.search == ScaleSearch::kMse && !args.act_order)
    return Status::not_supported(
        "scale_search: 'mse' is supported by the CUDA GPTQ only with act_order (static groups); without act_order "
        "the group parameters are searched inside the column loop, which runs minmax only on CUDA");
  if (cols > 65535) return Status::invalid("in_features: expected at most 65535 on CUDA, got {}", cols);
  if (E > 65535) return Status::invalid("num_experts: expected at most 65535 per call on CUDA, got {}", E);
  if (rows > std::numeric_limits<int32_t>::max() / 2)
    return Status::invalid("out_features: expected at most {} on CUDA, got {}", std::numeric_limits<int32_t>::max() / 2,
                           rows);
  GptqLayout l;
  if (!cuda_detail::gptq_layout(E, rows, cols, args.block_size, &l))
    return Status::invalid("num_experts, out_features, in_features: the workspace for [{}, {}, {}] overflows", E, rows,
                           cols);
  if (workspace == nullptr || workspace_bytes < l.total)
    return Status::invalid("workspace_bytes: expected >= {} (cuda_gptq_workspace_bytes), got {}{}", l.total,
                           workspace_bytes, workspace == nullptr ? " with a null workspace" : "");
  if (handle == nullptr) return Status::invalid("handle: expected a cuBLAS handle, got null");
  MQ_RETURN_IF_ERROR(api_detail::check_shared_memory_request(max_shared_memory_bytes));

  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(W, "w", &device));
  ScopedDevice dev;
  MQ_RETURN_IF_ERROR(dev.enter(device));
  size_t smem_limit = 0;
  MQ_RETURN_IF_ERROR(api_detail::shared_memory_limit(device, max_shared_memory_bytes, &smem_limit));
  // Never fails: every kernel has a configuration without shared memory (smem_plan.h).
  const GptqSmemPlan sp = cuda_detail::plan_gptq_smem(cols, l.block, smem_limit);
  MQ_RETURN_IF_ERROR(check_on_device(H, "h", device));
  MQ_RETURN_IF_ERROR(check_on_device(codes, "codes", device));
  MQ_RETURN_IF_ERROR(check_on_device(scales, "scales", device));
  MQ_RETURN_IF_ERROR(check_on_device(zeros, "zeros", device));
  MQ_RETURN_IF_ERROR(check_on_device(dequantized, "dequantized", device));
  MQ_RETURN_IF_ERROR(check_on_device(workspace, "workspace", device));
  if (losses) MQ_RETURN_IF_ERROR(check_on_device(losses, "losses", device));
  if (escalations) MQ_RETURN_IF_ERROR(check_on_device(escalations, "escalations", device));

  CublasStateGuard blas(handle);  // restored by its destructor on every path
  MQ_RETURN_IF_ERROR(blas.enter(stream));
  const cuda_detail::RtnParams p = to_params(s, cols);
  const bool act = args.act_order;
  char* ws = static_cast<char*>(workspace);

  // ---- 1. prepare: h0, validation, dead columns, mean diagonal, act-order permutation and static parameters ----
  MQ_CUDA_RETURN("gptq prepare", cuda_detail::launch_gptq_prepare(W, H, E, rows, cols, act, workspace, l, stream));
  if (act) {
    // static groups from the dead-zeroed original W (in dw), all experts as one [E * rows, cols] matrix
    MQ_CUDA_RETURN("gptq static group parameters",
                   cuda_detail::launch_quantize_rtn(reinterpret_cast<const float*>(ws + l.dw), E * rows, cols, cols, p,
                                                    nullptr, scales, zeros, nullptr,
                                                    reinterpret_cast<unsigned long long*>(ws + l.rtn_flag), stream));
    // then dw = the dead-zeroed W in processing order: the column loop's reads and writes become contiguous
    MQ_CUDA_RETURN("gptq permute w", cuda_detail::launch_gptq_permute_w(W, E, rows, cols, workspace, l, stream));
  }

  // ---- 2. factorise all experts, then retry the failed ones with escalated damping (one readback per round) ----
  std::vector<int> esc;
  MQ_RETURN_IF_ERROR(factorize_all(W, H, E, rows, cols, args, act, workspace, l, sp, handle, stream, &esc));

  // ---- 3. the column loop: one kernel per block, then the lazy trailing update as one batched SGEMM ----
  for (int64_t i1 = 0; i1 < cols; i1 += l.block) {
    const int64_t i2 = std::min<int64_t>(i1 + l.block, cols);
    const int bw = static_cast<int>(i2 - i1);
    MQ_CUDA_RETURN("gptq block kernel", cuda_detail::launch_gptq_block(W, H, E, rows, cols, i1, bw, p, act, codes,
                                                                       scales, zeros, dequantized, workspace, l,
                                                                       sp, stream));
    if (i2 < cols) MQ_RETURN_IF_ERROR(trailing_update(H, E, rows, cols, i1, i2, ws, l, handle, act));
  }
  if (act)
    MQ_CUDA_RETURN("gptq unpermute",
                   cuda_detail::launch_gptq_unpermute(E, rows, cols, codes, dequantized, workspace, l, stream));

  // ---- 4. loss = <h0, D^T D> with D = W - Q (one SSYRK per expert into the factor's buffer), escalations ----
  return finish_solve(W, H, E, rows, cols, dequantized, losses, escalations, esc, workspace, l, handle, stream);
}

size_t cuda_gptq_format_workspace_bytes(int64_t num_experts, int64_t rows, int64_t cols, const GptqFormatArgs& args) {
  GptqLayout l;
  if (!cuda_detail::gptq_layout(num_experts, rows, cols, args.block_size, &l)) return 0;
  return cuda_detail::gptq_format_layout(l, num_experts).total;
}

Status cuda_gptq_batched_format(const float* W, float* H, int64_t E, int64_t rows, int64_t cols,
                                const GptqFormatArgs& args, const float* global_scales_in, uint8_t* codes,
                                float* scales, uint8_t* scale_codes, int32_t* zeros, float* global_scales,
                                float* dequantized, double* losses, int32_t* escalations, void* workspace,
                                size_t workspace_bytes, cublasHandle_t handle, cudaStream_t stream,
                                size_t max_shared_memory_bytes) {
  // ---- the CPU's argument checks (validate_gptq_format), then the CUDA limits ----
  const Format& f = args.format;
  MQ_RETURN_IF_ERROR(validate(f));
  if (global_scales_in != nullptr && !f.global_scale)
    return Status::invalid("global_scale: expected none for a format without a global scale ({} elements, {} scales), "
                           "got a pointer",
                           element_kind_name(f.element), scale_kind_name(f.scale));
  if (gptq_format_uses_int_solver(f, cols)) {  // quant.h's ints: the int solve (as gptq_solve_format does on the CPU)
    GptqArgs ia = args.gptq_args();
    ia.spec = gptq_format_int_spec(f);
    MQ_RETURN_IF_ERROR(cuda_gptq_batched(W, H, E, rows, cols, ia, reinterpret_cast<int8_t*>(codes), scales, zeros,
                                         dequantized, losses, escalations, workspace, workspace_bytes, handle, stream,
                                         max_shared_memory_bytes));
    if (scale_codes)
      MQ_CUDA_RETURN("scale_codes clear",
                     cudaMemsetAsync(scale_codes, 0, static_cast<size_t>(E * scale_rows(f, rows) * scale_cols(f, cols)),
                                     stream));
    if (global_scales) {
      const std::vector<float> ones(static_cast<size_t>(E), 1.0f);
      MQ_CUDA_RETURN("global scales copy", cudaMemcpyAsync(global_scales, ones.data(), ones.size() * sizeof(float),
                                                           cudaMemcpyHostToDevice, stream));
    }
    return {};
  }
  if (E < 1) return Status::invalid("num_experts: expected >= 1, got {}", E);
  MQ_RETURN_IF_ERROR(validate(args.gptq_args().spec, cols));  // in_features >= 1, with the CPU's message
  if (rows < 1) return Status::invalid("out_features: expected >= 1, got {}", rows);
  if (!(args.damp > 0.0 && std::isfinite(args.damp)))
    return Status::invalid("damp: expected a finite value > 0, got {}", args.damp);
  if (args.block_size < 1) return Status::invalid("block_size: expected >= 1, got {}", args.block_size);
  if (args.max_damp_escalations < 0)
    return Status::invalid("max_damp_escalations: expected >= 0, got {}", args.max_damp_escalations);
  if (!(args.damp_escalation_factor > 1.0 && std::isfinite(args.damp_escalation_factor)))
    return Status::invalid("damp_escalation_factor: expected a finite value > 1, got {}", args.damp_escalation_factor);
  if (args.block_size > cuda_detail::kGptqMaxBlock)
    return Status::not_supported("block_size: expected at most {} on CUDA, got {}", cuda_detail::kGptqMaxBlock,
                                 args.block_size);
  if (cols > 65535) return Status::invalid("in_features: expected at most 65535 on CUDA, got {}", cols);
  if (E > 65535) return Status::invalid("num_experts: expected at most 65535 per call on CUDA, got {}", E);
  if (rows > std::numeric_limits<int32_t>::max() / 2)
    return Status::invalid("out_features: expected at most {} on CUDA, got {}", std::numeric_limits<int32_t>::max() / 2,
                           rows);
  GptqLayout l;
  if (!cuda_detail::gptq_layout(E, rows, cols, args.block_size, &l))
    return Status::invalid("num_experts, out_features, in_features: the workspace for [{}, {}, {}] overflows", E, rows,
                           cols);
  const cuda_detail::GptqFormatLayout x = cuda_detail::gptq_format_layout(l, E);
  if (workspace == nullptr || workspace_bytes < x.total)
    return Status::invalid("workspace_bytes: expected >= {} (cuda_gptq_format_workspace_bytes), got {}{}", x.total,
                           workspace_bytes, workspace == nullptr ? " with a null workspace" : "");
  if (handle == nullptr) return Status::invalid("handle: expected a cuBLAS handle, got null");
  if (f.element == ElementKind::kInt && zeros == nullptr)
    return Status::invalid("zeros: expected a device pointer for an int format (the column kernel reads them), got null");
  MQ_RETURN_IF_ERROR(api_detail::check_shared_memory_request(max_shared_memory_bytes));

  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(W, "w", &device));
  ScopedDevice dev;
  MQ_RETURN_IF_ERROR(dev.enter(device));
  size_t smem_limit = 0;
  MQ_RETURN_IF_ERROR(api_detail::shared_memory_limit(device, max_shared_memory_bytes, &smem_limit));
  const GptqSmemPlan sp = cuda_detail::plan_gptq_smem(cols, l.block, smem_limit);
  MQ_RETURN_IF_ERROR(check_on_device(H, "h", device));
  MQ_RETURN_IF_ERROR(check_on_device(codes, "codes", device));
  MQ_RETURN_IF_ERROR(check_on_device(scales, "scales", device));
  MQ_RETURN_IF_ERROR(check_on_device(dequantized, "dequantized", device));
  MQ_RETURN_IF_ERROR(check_on_device(workspace, "workspace", device));
  for (auto [ptr, name] : {std::pair<const void*, const char*>{scale_codes, "scale_codes"}, {zeros, "zeros"},
                           {global_scales, "global_scales"}, {global_scales_in, "global_scale"},
                           {losses, "losses"}, {escalations, "escalations"}})
    if (ptr) MQ_RETURN_IF_ERROR(check_on_device(ptr, name, device));

  CublasStateGuard blas(handle);  // restored by its destructor on every path
  MQ_RETURN_IF_ERROR(blas.enter(stream));
  cuda_detail::FormatLaunch p;
  p.core = f.core();
  p.group = static_cast<int>(f.group);
  p.tile_rows = tile_rows(f, rows);
  p.tile_cols = tile_cols(f, cols);
  p.scale_cols = scale_cols(f, cols);
  p.from_range = f.group == GroupKind::kTensor;
  const bool act = args.act_order;
  char* ws = static_cast<char*>(workspace);
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, cols);

  // ---- 1. prepare (the int solve's), then the static tile parameters of the dead-zeroed W (global scale first) ----
  MQ_CUDA_RETURN("gptq prepare", cuda_detail::launch_gptq_prepare(W, H, E, rows, cols, act, workspace, l, stream));
  MQ_CUDA_RETURN("gptq format parameters",
                 cuda_detail::launch_gptq_format_params(W, E, rows, cols, p, f.global_scale ? global_scales_in : nullptr,
                                                        scales, scale_codes, zeros, workspace, l, x, stream));
  if (act)  // dw = the dead-zeroed W in processing order, as in the int solve
    MQ_CUDA_RETURN("gptq permute w", cuda_detail::launch_gptq_permute_w(W, E, rows, cols, workspace, l, stream));
  unsigned long long fflags[2];
  MQ_RETURN_IF_ERROR(read_back(fflags, ws + x.fflags, sizeof(fflags), stream, "gptq format flags readback"));
  if (fflags[0] != kNoBadIndex) {  // the CPU checks the caller's global scale before w and h
    float v = 0.0f;
    MQ_RETURN_IF_ERROR(read_back(&v, global_scales_in + fflags[0], sizeof(v), stream, "global scale readback"));
    return Status::invalid("global_scale: expected a finite value > 0, got {} at expert {}", v, fflags[0]);
  }

  // ---- 2. factorise all experts with escalation (validation of w and h first, as the int solve) ----
  std::vector<int> esc;
  MQ_RETURN_IF_ERROR(factorize_all(W, H, E, rows, cols, args.gptq_args(), act, workspace, l, sp, handle, stream, &esc));
  if (fflags[1] != kNoBadIndex) {  // after the factor, as on the CPU
    const uint64_t t = fflags[1], per = static_cast<uint64_t>(sr * sc), s = t % per;
    const int64_t br = static_cast<int64_t>(s) / sc, bc = static_cast<int64_t>(s) % sc;
    return Status::invalid("scale_dtype: float16 cannot hold the scale of tile ({}, {}) (rows [{}, {}), columns [{}, "
                           "{})) of expert {}; use bfloat16 or float32 scales",
                           br, bc, br * p.tile_rows, std::min(rows, (br + 1) * p.tile_rows), bc * p.tile_cols,
                           std::min(cols, (bc + 1) * p.tile_cols), t / per);
  }

  // ---- 3. the column loop: one kernel per block, then the lazy trailing update as one batched SGEMM ----
  for (int64_t i1 = 0; i1 < cols; i1 += l.block) {
    const int64_t i2 = std::min<int64_t>(i1 + l.block, cols);
    const int bw = static_cast<int>(i2 - i1);
    MQ_CUDA_RETURN("gptq format block kernel",
                   cuda_detail::launch_gptq_format_block(W, H, E, rows, cols, i1, bw, p, act, codes, scales, zeros,
                                                         dequantized, workspace, l, x, sp, stream));
    if (i2 < cols) MQ_RETURN_IF_ERROR(trailing_update(H, E, rows, cols, i1, i2, ws, l, handle, act));
  }
  if (act)
    MQ_CUDA_RETURN("gptq unpermute", cuda_detail::launch_gptq_unpermute(E, rows, cols, reinterpret_cast<int8_t*>(codes),
                                                                        dequantized, workspace, l, stream));
  if (global_scales)
    MQ_CUDA_RETURN("global scales copy", cudaMemcpyAsync(global_scales, ws + x.gscale, static_cast<size_t>(E) * 4,
                                                         cudaMemcpyDeviceToDevice, stream));

  // ---- 4. loss and escalations ----
  return finish_solve(W, H, E, rows, cols, dequantized, losses, escalations, esc, workspace, l, handle, stream);
}

Status cuda_hadamard(const void* x, void* out, int64_t rows, int64_t n, ElementType dtype, cudaStream_t stream) {
  return cuda_hadamard(x, out, rows, n, dtype, stream, 0);
}

Status cuda_hadamard(const void* x, void* out, int64_t rows, int64_t n, ElementType dtype, cudaStream_t stream,
                     size_t max_shared_memory_bytes) {
  int m = 0;
  int64_t pw = 0;
  if (!hadamard_tables::decompose(n, &m, &pw))
    return Status::invalid("x: expected a last dimension of {}, got {}", hadamard_supported_text(), n);
  if (rows < 0) return Status::invalid("rows: expected >= 0, got {}", rows);
  MQ_RETURN_IF_ERROR(api_detail::check_element_type(dtype, "dtype"));
  MQ_RETURN_IF_ERROR(api_detail::check_shared_memory_request(max_shared_memory_bytes));
  if (rows == 0) return {};
  if (rows > std::numeric_limits<int32_t>::max())
    return Status::invalid("rows: expected at most {} rows per call on CUDA, got {}", std::numeric_limits<int32_t>::max(),
                           rows);
  int device = -1;
  MQ_RETURN_IF_ERROR(device_of(x, "x", &device));
  ScopedDevice dev;
  MQ_RETURN_IF_ERROR(dev.enter(device));
  MQ_RETURN_IF_ERROR(check_on_device(out, "out", device));
  int logp = 0;
  while ((int64_t{1} << logp) < pw) ++logp;
  size_t smem_limit = 0;
  MQ_RETURN_IF_ERROR(api_detail::shared_memory_limit(device, max_shared_memory_bytes, &smem_limit));
  const cuda_detail::HadamardPlan plan = cuda_detail::plan_hadamard(m, logp, rows, smem_limit);
  if (!plan.fits)
    return Status::not_supported(
        "{}: a row of {} needs {} bytes of shared memory per block, CUDA device {} allows {} (max_shared_memory_bytes "
        "{}, 0 = the device's limit)",
        logp < 5 ? "hadamard_kernel" : "hadamard_reg_kernel", n, plan.needed_bytes, device, smem_limit,
        max_shared_memory_bytes);
  MQ_CUDA_RETURN("hadamard kernel", cuda_detail::launch_hadamard(x, out, rows, n, m, logp, dtype, plan, stream));
  return {};
}

}  // namespace v0
}  // namespace moequant
