// Tests of kernels/src/smem_plan.h: the shared-memory configuration the CUDA launchers choose for a device limit
// (pure host arithmetic, run on the CPU). Limits: the opt-in shared memory per block of the architectures --
// 48 KiB (the default every kernel gets; the smallest max_shared_memory_bytes the API accepts), 99 KiB (sm_86, sm_89,
// sm_120), 163 KiB (sm_80, sm_87: 164 KiB per SM) and 227 KiB (sm_90, sm_100: 228 KiB per SM).
// Shapes: hidden size / expert width of DeepSeek-V3 (7168 / 2048), Qwen3-30B-A3B (2048 / 768), Mixtral-8x7B
// (4096 / 14336) and gpt-oss (2880 / 2880); GPTQ's in_features is the hidden size for gate / up and the expert
// width for down, the Hadamard rotations run over both.
#include <moequant/hadamard_tables.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "smem_plan.h"

namespace cd = moequant::cuda_detail;

namespace {

constexpr size_t k48 = 48 * 1024;    // 49152
constexpr size_t k99 = 99 * 1024;    // 101376
constexpr size_t k163 = 163 * 1024;  // 166912
constexpr size_t k227 = 227 * 1024;  // 232448
constexpr size_t kLimits[] = {k48, k99, k163, k227};

// in_features of the expert projections of the four model families
constexpr int64_t kModelCols[] = {7168, 2048, 2048, 768, 4096, 14336, 2880};

struct Length {
  int m, k;
};

Length decompose(int64_t n) {
  int m = 0;
  int64_t p = 0;
  REQUIRE(moequant::hadamard_tables::decompose(n, &m, &p));
  int k = 0;
  while ((int64_t{1} << k) < p) ++k;
  return {m, k};
}

}  // namespace

TEST_CASE("GPTQ plan: the 129 KiB diagonal-block kernels and the 64.5 KiB column kernel per limit", "[smem]") {
  CHECK(cd::chol_array_bytes(128) == 66048);
  CHECK(2 * cd::chol_array_bytes(128) == 132096);  // the "132 KB" that does not fit 99 KiB
  CHECK(cd::gptq_block_bytes(128) == 66048);
  for (int64_t cols : kModelCols) {
    INFO("in_features = " << cols);
    const auto p48 = cd::plan_gptq_smem(cols, 128, k48);
    CHECK(p48.chol_shared == 0);
    CHECK(p48.chol_bytes == 0);
    CHECK_FALSE(p48.block_shared);
    CHECK(p48.block_bytes == 0);
    const auto p99 = cd::plan_gptq_smem(cols, 128, k99);
    CHECK(p99.chol_shared == 1);
    CHECK(p99.chol_bytes == 66048);
    CHECK(p99.block_shared);
    CHECK(p99.block_bytes == 66048);
    for (size_t big : {k163, k227}) {
      const auto p = cd::plan_gptq_smem(cols, 128, big);
      CHECK(p.chol_shared == 2);
      CHECK(p.chol_bytes == 132096);
      CHECK(p.block_shared);
      CHECK(p.block_bytes == 66048);
    }
  }
}

TEST_CASE("GPTQ plan: every launch fits the limit, narrow matrices and small blocks stay in shared memory", "[smem]") {
  for (size_t limit : kLimits)
    for (int64_t cols : {1, 31, 64, 100, 127, 128, 129, 200, 768, 2048, 2880, 7168, 14336})
      for (int64_t block : {1, 32, 64, 100, 110, 111, 128}) {
        INFO("limit " << limit << ", cols " << cols << ", block " << block);
        const auto p = cd::plan_gptq_smem(cols, block, limit);
        CHECK(p.chol_bytes <= limit);
        CHECK(p.block_bytes <= limit);
        // the fastest configuration that fits: one more array in shared memory would not
        if (p.chol_shared < 2) CHECK((p.chol_shared + 1) * cd::chol_array_bytes(cols < 128 ? cols : 128) > limit);
        CHECK(p.block_shared == (cd::gptq_block_bytes(block < cols ? block : cols) <= limit));
      }
  // 64 columns: two 64 x 65 arrays (33,280 bytes) fit the default 48 KiB
  CHECK(cd::plan_gptq_smem(64, 64, k48).chol_shared == 2);
  CHECK(cd::plan_gptq_smem(64, 64, k48).block_shared);
  // blocks of <= 110 columns fit 48 KiB (110 x 111 x 4 = 48,840 bytes), 111 do not (49,728)
  CHECK(cd::plan_gptq_smem(7168, 110, k48).block_shared);
  CHECK_FALSE(cd::plan_gptq_smem(7168, 111, k48).block_shared);
  // the column kernel's 66,048-byte copy of U fits a limit of exactly that many bytes
  CHECK(cd::plan_gptq_smem(7168, 128, 66048).block_shared);
  CHECK_FALSE(cd::plan_gptq_smem(7168, 128, 66047).block_shared);
  // 99 KiB: one 128 x 129 array fits, two do not
  CHECK(cd::plan_gptq_smem(7168, 128, 2 * 66048 - 1).chol_shared == 1);
  CHECK(cd::plan_gptq_smem(7168, 128, 2 * 66048).chol_shared == 2);
}

TEST_CASE("Hadamard plan: the model lengths", "[smem]") {
  // 7168 = 28 x 256: two rows per CTA (59,136 bytes); at 48 KiB one row (29,568)
  {
    const Length l = decompose(7168);
    CHECK(l.m == 28);
    CHECK(l.k == 8);
    const auto p48 = cd::plan_hadamard(l.m, l.k, 1000, k48);
    CHECK(p48.kernel == cd::HadamardKernel::kShared);
    CHECK(p48.rpc == 1);
    CHECK(p48.smem_bytes == 29568);
    for (size_t limit : {k99, k163, k227}) {
      const auto p = cd::plan_hadamard(l.m, l.k, 1000, limit);
      CHECK(p.kernel == cd::HadamardKernel::kShared);
      CHECK(p.rpc == 2);
      CHECK(p.smem_bytes == 59136);
    }
  }
  // 14336 = 28 x 512 (Mixtral's expert width): one row of 59,136 bytes; at 48 KiB the scratch kernel
  {
    const Length l = decompose(14336);
    const auto p48 = cd::plan_hadamard(l.m, l.k, 1000, k48);
    CHECK(p48.kernel == cd::HadamardKernel::kScratch);
    CHECK(p48.rpc == 1);
    CHECK(p48.smem_bytes == 0);
    CHECK(p48.scratch_bytes == 14336 * 4);  // one row of fp32, unpadded
    for (size_t limit : {k99, k163, k227}) {
      const auto p = cd::plan_hadamard(l.m, l.k, 1000, limit);
      CHECK(p.kernel == cd::HadamardKernel::kShared);
      CHECK(p.rpc == 1);
      CHECK(p.smem_bytes == 59136);
    }
  }
  // 2048, 768, 4096: <= 33,792 bytes, the default configuration at every limit
  for (int64_t n : {2048, 768, 4096}) {
    const Length l = decompose(n);
    for (size_t limit : kLimits) {
      INFO("n = " << n << ", limit " << limit);
      const auto p = cd::plan_hadamard(l.m, l.k, 1000, limit);
      CHECK(p.kernel == cd::HadamardKernel::kShared);
      CHECK(p.rpc == cd::hadamard_rows_per_cta(l.m, l.k));
      CHECK(p.smem_bytes <= 33792);
    }
  }
  // gpt-oss's 2880 = 45 x 64 is not a supported length (m must be 1, 12, 20, 28 or 40)
  int m = 0;
  int64_t pw = 0;
  CHECK_FALSE(moequant::hadamard_tables::decompose(2880, &m, &pw));
}

TEST_CASE("Hadamard plan: the long rows per limit", "[smem]") {
  struct Case {
    int64_t n;
    size_t row_bytes;  // one row in shared memory (padded layout, or the XOR swizzle for 28 x 1024)
  };
  const Case cases[] = {{16384, 67584}, {32768, 135168}, {12288, 50688}, {24576, 101376},
                        {20480, 84480}, {28672, 114688}, {14336, 59136}};
  for (const Case& c : cases) {
    const Length l = decompose(c.n);
    REQUIRE(cd::hadamard_rows_per_cta(l.m, l.k) == 1);
    CHECK(cd::hadamard_reg_bytes(l.m, l.k, 1) == c.row_bytes);
    CHECK(cd::hadamard_has_scratch(l.m, l.k));
    for (size_t limit : kLimits) {
      INFO("n = " << c.n << ", limit " << limit);
      const auto p = cd::plan_hadamard(l.m, l.k, 5, limit);
      CHECK(p.fits);
      CHECK(p.rpc == 1);
      if (c.row_bytes <= limit) {
        CHECK(p.kernel == cd::HadamardKernel::kShared);
        CHECK(p.smem_bytes == c.row_bytes);
        CHECK(p.scratch_bytes == 0);
      } else {
        CHECK(p.kernel == cd::HadamardKernel::kScratch);
        CHECK(p.smem_bytes == 0);
        CHECK(p.scratch_bytes == static_cast<size_t>(c.n) * 4);
      }
    }
  }
  // what failed on 99 KiB before: 32768 and 28 x 1024; 12 x 2048 fits it exactly
  CHECK(cd::plan_hadamard(1, 15, 1, k99).kernel == cd::HadamardKernel::kScratch);
  CHECK(cd::plan_hadamard(28, 10, 1, k99).kernel == cd::HadamardKernel::kScratch);
  CHECK(cd::plan_hadamard(12, 11, 1, k99).kernel == cd::HadamardKernel::kShared);
  CHECK_FALSE(cd::hadamard_padded(28, 10));
}

TEST_CASE("Hadamard plan: every supported length fits every limit, with the most rows per CTA that fit", "[smem]") {
  for (size_t limit : kLimits)
    for (int m : {1, 12, 20, 28})
      for (int k = 0; (static_cast<int64_t>(m) << k) <= 32768; ++k)
        for (int64_t rows : {1, 2, 3, 7, 100000}) {
          const int64_t n = static_cast<int64_t>(m) << k;
          INFO("n = " << n << " (" << m << " x 2^" << k << "), rows " << rows << ", limit " << limit);
          const auto p = cd::plan_hadamard(m, k, rows, limit);
          REQUIRE(p.fits);
          CHECK(p.smem_bytes <= limit);
          CHECK(p.rpc >= 1);
          if (k < 5) {
            CHECK(p.kernel == cd::HadamardKernel::kSmall);
            CHECK(p.rpc == std::min<int64_t>(rows, cd::hadamard_small_rows_per_cta(n)));
            CHECK(p.smem_bytes == cd::hadamard_small_bytes(n, p.rpc));
            continue;
          }
          const int64_t want = std::min<int64_t>(rows, cd::hadamard_rows_per_cta(m, k));
          if (p.kernel == cd::HadamardKernel::kScratch) {
            CHECK(cd::hadamard_reg_bytes(m, k, 1) > limit);
            CHECK(p.scratch_bytes == cd::hadamard_scratch_bytes(m, k));
            CHECK(p.scratch_bytes == static_cast<size_t>(n) * 4);
          } else {
            REQUIRE(p.kernel == cd::HadamardKernel::kShared);
            CHECK(p.rpc <= want);
            CHECK(p.smem_bytes == cd::hadamard_reg_bytes(m, k, p.rpc));
            if (p.rpc < want) CHECK(cd::hadamard_reg_bytes(m, k, p.rpc + 1) > limit);
          }
        }
  // 28 x 32 .. 28 x 256 batch 16 .. 2 rows (59,136 bytes): at 48 KiB fewer rows per CTA
  CHECK(cd::plan_hadamard(28, 5, 1000, k48).rpc == 13);
  CHECK(cd::plan_hadamard(28, 5, 1000, k99).rpc == 16);
  // below the default, a length without a scratch kernel reports what it needs
  const auto tiny = cd::plan_hadamard(1, 13, 4, 16 * 1024);
  CHECK_FALSE(tiny.fits);
  CHECK(tiny.needed_bytes == cd::hadamard_reg_bytes(1, 13, 1));
  const auto tiny_small = cd::plan_hadamard(28, 4, 4, 1024);
  CHECK_FALSE(tiny_small.fits);
  CHECK(tiny_small.needed_bytes == 28 * 16 * 4);
}
