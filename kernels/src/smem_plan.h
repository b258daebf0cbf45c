// kernels/src/smem_plan.h -- how much shared memory each kernel that asks for more than the default 48 KiB takes,
// given the limit of the device it runs on (docs/kernels.md, "Shared memory per architecture").
//
// Pure host arithmetic, free of CUDA headers: the launchers (.cu), the API (api.cpp / gptq_api.cpp) and the Catch2
// tests (tests/cpp/test_smem_plan.cpp, CPU only) include it. The API reads the device's opt-in limit
// (cudaDevAttrMaxSharedMemoryPerBlockOptin) on every call, lowers it to the caller's max_shared_memory_bytes when
// that is smaller, and hands the plan below to the launchers; nothing is cached.
//
// Every kernel planned here has no static shared memory (everything is dynamic), so its dynamic size may use the
// whole opt-in limit. Every fallback does the same arithmetic in the same order as the configuration it replaces
// (only where the working arrays live, or how many rows a CTA takes, changes), so results are bit-identical.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {

/// Dynamic shared memory any kernel may use without opting in (every CUDA architecture).
constexpr size_t kDefaultSmemBytes = 48 * 1024;

/// Columns per diagonal block of the batched Cholesky and the largest GPTQ block the column kernel supports.
constexpr int kGptqMaxBlock = 128;
constexpr int kCholBlock = 128;

// ---- batched GPTQ ---------------------------------------------------------------------------------------------

/// Bytes of one bk x bk float work array of the diagonal-block kernels in shared memory (column-major, ld bk + 1).
constexpr size_t chol_array_bytes(int64_t bk) { return static_cast<size_t>(bk) * static_cast<size_t>(bk + 1) * 4; }

/// Bytes of the column kernel's copy of U's diagonal block (bw x bw, ld bw + 1).
constexpr size_t gptq_block_bytes(int64_t bw) { return static_cast<size_t>(bw) * static_cast<size_t>(bw + 1) * 4; }

/// Where the batched GPTQ kernels keep their working arrays.
///   chol_shared: how many of the two bk x bk arrays of chol_diag_kernel / diag_inverse_kernel (A: the block being
///     factorised or inverted; X: its inverse) live in shared memory -- 2: both (the fast path, 129 KiB at bk = 128);
///     1: A only, X in global memory (the workspace's dinv / panel regions); 0: both in global memory (A in place in
///     the factor). bk = min(cols, kCholBlock); the last, narrower block fits whatever the first one fits.
///   block_shared: gptq_block_kernel copies U's bw x bw diagonal block into shared memory (64.5 KiB at bw = 128)
///     or reads it from global memory where it is (bw = min(block_size, cols)).
struct GptqSmemPlan {
  int chol_shared = 2;
  size_t chol_bytes = 0;  // dynamic shared memory of the diagonal-block kernels
  bool block_shared = true;
  size_t block_bytes = 0;  // dynamic shared memory of the column kernel
};

/// The fastest configuration whose every launch fits `limit` bytes of shared memory per block. Always exists: the
/// all-global configuration needs none.
constexpr GptqSmemPlan plan_gptq_smem(int64_t cols, int64_t block_size, size_t limit) {
  GptqSmemPlan p;
  const int64_t bk = cols < kCholBlock ? cols : kCholBlock;
  p.chol_shared = 2;
  while (p.chol_shared > 0 && static_cast<size_t>(p.chol_shared) * chol_array_bytes(bk) > limit) --p.chol_shared;
  p.chol_bytes = static_cast<size_t>(p.chol_shared) * chol_array_bytes(bk);
  const int64_t bw = block_size < cols ? block_size : cols;
  p.block_shared = gptq_block_bytes(bw) <= limit;
  p.block_bytes = p.block_shared ? gptq_block_bytes(bw) : 0;
  return p;
}

// ---- Hadamard -------------------------------------------------------------------------------------------------
// Lengths n = m 2^k (m in {1, 12, 20, 28}; 40 * 2^k runs as 20 * 2^(k+1)). k >= 5: hadamard_reg_kernel<T, m, k>
// (hadamard.cu) holds `rpc` whole rows in shared memory as fp32; k < 5: the general hadamard_kernel<T>.

/// Rows per CTA of hadamard_reg_kernel (k >= 5). m = 1: >= 256 items of 32 elements; m > 1: >= 512 columns.
constexpr int hadamard_rows_per_cta(int m, int k) {
  const int per_row = (m << k) >> 5;
  if (m > 1) return k < 9 ? 512 >> k : 1;
  return per_row < 256 ? (256 + per_row - 1) / per_row : 1;
}

/// Padded shared-memory layout (pad(i) = i + i / 32) unless the padding lowers the CTAs per SM below both three and
/// the unpadded count; the count uses sm_90's 228 KiB per SM (H100 / H200, where the kernels are tuned).
constexpr bool hadamard_padded(int m, int k) {
  const long b = static_cast<long>(hadamard_rows_per_cta(m, k)) * (m << k) * 4, sm = 228 * 1024, res = 1024;
  return sm / (b + b / 32 + res) >= 3 || sm / (b + b / 32 + res) == sm / (b + res);
}

/// n = 32: stage 0 is the whole transform, no shared memory.
constexpr bool hadamard_direct(int m, int k) { return m == 1 && k == 5; }

/// Bytes of shared memory hadamard_reg_kernel<T, m, k> takes for `rows` rows per CTA.
constexpr size_t hadamard_reg_bytes(int m, int k, int64_t rows) {
  if (hadamard_direct(m, k)) return 0;
  const int64_t elems = rows * (static_cast<int64_t>(m) << k);
  return static_cast<size_t>(hadamard_padded(m, k) ? elems + elems / 32 : elems) * sizeof(float);
}

/// Whether hadamard_scratch_kernel<T, m, k> (the rows in global memory) is compiled: only for the lengths whose
/// single row needs more than the default 48 KiB (others always fit, the API accepts no lower limit).
constexpr bool hadamard_has_scratch(int m, int k) { return hadamard_reg_bytes(m, k, 1) > kDefaultSmemBytes; }

/// Bytes of global scratch hadamard_scratch_kernel<T, m, k> takes per CTA: one row of fp32 in a linear layout.
constexpr size_t hadamard_scratch_bytes(int m, int k) { return (static_cast<size_t>(m) << k) * sizeof(float); }

/// Bytes of shared memory hadamard_kernel<T> (k < 5) takes for `rows` rows of n per CTA.
constexpr size_t hadamard_small_bytes(int64_t n, int64_t rows) { return static_cast<size_t>(rows * n) * sizeof(float); }

/// Rows per CTA of the general kernel (k < 5): >= 2048 elements per CTA.
constexpr int hadamard_small_rows_per_cta(int64_t n) { return n >= 2048 ? 1 : static_cast<int>(2048 / n); }

enum class HadamardKernel : int {
  kSmall = 0,    // hadamard_kernel<T> (k < 5)
  kShared = 1,   // hadamard_reg_kernel<T, m, k>: rpc rows in shared memory
  kScratch = 2,  // hadamard_scratch_kernel<T, m, k>: one row per CTA, its fp32 copy in global memory (linear)
};

struct HadamardPlan {
  HadamardKernel kernel = HadamardKernel::kShared;
  int rpc = 1;                // rows per CTA
  size_t smem_bytes = 0;      // dynamic shared memory per CTA
  size_t scratch_bytes = 0;   // global memory per CTA (kScratch)
  bool fits = true;           // false: no configuration fits `limit`
  size_t needed_bytes = 0;    // when !fits: the least shared memory per block a launch of this length needs
};

/// The configuration of a transform of `rows` (>= 1) rows of n = m 2^k within `limit` bytes of shared memory per
/// block: the default rows per CTA when they fit, else as many rows per CTA as fit (same kernel, same arithmetic),
/// else (one row does not fit) the scratch kernel where it is compiled.
constexpr HadamardPlan plan_hadamard(int m, int k, int64_t rows, size_t limit) {
  HadamardPlan p;
  const int64_t n = static_cast<int64_t>(m) << k;
  if (k < 5) {
    p.kernel = HadamardKernel::kSmall;
    const int64_t want = hadamard_small_rows_per_cta(n) < rows ? hadamard_small_rows_per_cta(n) : rows;
    const int64_t fit = static_cast<int64_t>(limit / hadamard_small_bytes(n, 1));
    p.rpc = static_cast<int>(want < fit ? want : fit);
    if (p.rpc < 1) {
      p.fits = false;
      p.rpc = 1;
      p.needed_bytes = hadamard_small_bytes(n, 1);
      return p;
    }
    p.smem_bytes = hadamard_small_bytes(n, p.rpc);
    return p;
  }
  p.kernel = HadamardKernel::kShared;
  const int64_t want = hadamard_rows_per_cta(m, k) < rows ? hadamard_rows_per_cta(m, k) : rows;
  const size_t per_row = hadamard_reg_bytes(m, k, 1);
  const int64_t fit = per_row == 0 ? want : static_cast<int64_t>(limit / per_row);
  p.rpc = static_cast<int>(want < fit ? want : fit);
  if (p.rpc >= 1) {
    p.smem_bytes = hadamard_reg_bytes(m, k, p.rpc);
    return p;
  }
  p.rpc = 1;
  if (!hadamard_has_scratch(m, k)) {
    p.fits = false;
    p.needed_bytes = per_row;
    return p;
  }
  p.kernel = HadamardKernel::kScratch;
  p.scratch_bytes = hadamard_scratch_bytes(m, k);
  return p;
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
