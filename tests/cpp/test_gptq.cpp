// Tests of moequant/gptq.h against the scalar twin in moequant/ref/gptq_ref.h and against RTN.
#include <moequant/gptq.h>
#include <moequant/quant.h>
#include <moequant/ref/gptq_ref.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

// Agreement policy with the scalar twin. Both follow the same algorithm, but the lazy solver applies the
// errors of a block through one GEMM while the twin applies them column by column, and U comes from two
// different (equivalent) factorisations. A value that sits within rounding of a quantization boundary may
// therefore land on the neighbouring code; that flip then propagates a slightly different error. We require
// identical codes for at least kMinCodeAgreement of the entries and losses within kLossRelTol.
constexpr double kMinCodeAgreement = 0.99;
constexpr double kLossRelTol = 1e-3;
// quadratic_loss vs the plain triple loop: both in double, only the summation order differs.
constexpr double kQuadLossRelTol = 1e-10;

namespace {

/// H = X^T X / n for X with strongly correlated, unevenly scaled columns (row-major [cols, cols], double).
std::vector<double> correlated_hessian(int64_t cols, int64_t n, uint32_t seed) {
  const int64_t k = std::max<int64_t>(2, cols / 4);
  const auto z = mqtest::random_matrix(n, k, seed), a = mqtest::random_matrix(k, cols, seed + 1),
             noise = mqtest::random_matrix(n, cols, seed + 2, 0.1f);
  std::vector<double> col_scale(cols);
  for (int64_t j = 0; j < cols; ++j) col_scale[j] = 0.3 + 1.7 * ((j * 37) % cols) / static_cast<double>(cols);
  std::vector<double> x(n * cols, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double v = noise[i * cols + j];
      for (int64_t l = 0; l < k; ++l) v += z[i * k + l] * a[l * cols + j];
      x[i * cols + j] = v * col_scale[j];
    }
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t a1 = 0; a1 < cols; ++a1)
      for (int64_t b1 = 0; b1 <= a1; ++b1) h[a1 * cols + b1] += x[i * cols + a1] * x[i * cols + b1];
  for (int64_t a1 = 0; a1 < cols; ++a1)
    for (int64_t b1 = 0; b1 <= a1; ++b1) h[b1 * cols + a1] = h[a1 * cols + b1] /= static_cast<double>(n);
  return h;
}

struct Result {
  mq::Status status;
  std::vector<int8_t> codes;
  std::vector<float> scales, dq;
  std::vector<int32_t> zeros;
  mq::GptqReport report;
};

template <bool kRef, typename HT>
Result solve(const std::vector<float>& w, int64_t rows, int64_t cols, const std::vector<HT>& h,
             const mq::GptqArgs& args) {
  const int64_t ng = args.spec.group_size > 0 ? cols / args.spec.group_size : 1;
  Result r;
  r.codes.assign(rows * cols, 0);
  r.dq.assign(rows * cols, 0.0f);
  r.scales.assign(rows * ng, 0.0f);
  r.zeros.assign(rows * ng, 0);
  const mq::QuantizedOut out{r.codes.data(), r.scales.data(), r.zeros.data(), r.dq.data()};
  const mq::MatrixView wv{w.data(), rows, cols, cols};
  r.status = kRef ? mq::gptq_solve_ref<HT>(wv, h.data(), cols, args, out, &r.report)
                  : mq::gptq_solve<HT>(wv, h.data(), cols, args, out, &r.report);
  return r;
}

double code_agreement(const Result& a, const Result& b) {
  int64_t same = 0;
  for (size_t i = 0; i < a.codes.size(); ++i) same += a.codes[i] == b.codes[i];
  return static_cast<double>(same) / static_cast<double>(a.codes.size());
}

double rtn_loss(const std::vector<float>& w, int64_t rows, int64_t cols, const std::vector<double>& h,
                const mq::QuantSpec& s) {
  std::vector<float> dq(rows * cols);
  REQUIRE(mq::quantize_rtn({w.data(), rows, cols, cols}, s, {nullptr, nullptr, nullptr, dq.data()}).ok());
  return mq::quadratic_loss<double>({w.data(), rows, cols, cols}, dq.data(), h.data(), cols);
}

mq::GptqArgs make_args(int bits, bool sym, int64_t group, int64_t block, bool act_order,
                       mq::ScaleSearch search = mq::ScaleSearch::kMinMax) {
  mq::GptqArgs a;
  a.spec.bits = bits;
  a.spec.symmetric = sym;
  a.spec.group_size = group;
  a.spec.search = search;
  a.block_size = block;
  a.act_order = act_order;
  return a;
}

/// The solver's outputs are self-consistent: codes in range, dequantize(codes, scales, zeros) == dequantized.
void check_outputs(const Result& r, int64_t rows, int64_t cols, const mq::QuantSpec& s) {
  std::vector<float> again(rows * cols);
  REQUIRE(mq::dequantize(r.codes.data(), r.scales.data(), r.zeros.data(), rows, cols, s, again.data()).ok());
  REQUIRE(again == r.dq);
  for (int8_t q : r.codes) {
    REQUIRE(q >= mq::qmin_for(s.bits));
    REQUIRE(q <= mq::qmax_for(s.bits));
  }
}

}  // namespace

TEST_CASE("gptq matches the scalar reference", "[gptq]") {
  struct Case {
    int64_t rows, cols;
    mq::GptqArgs args;
  };
  const Case cases[] = {
      {16, 128, make_args(4, false, 32, 128, false)},
      {16, 128, make_args(3, true, -1, 32, true)},
      {12, 200, make_args(4, false, 40, 64, false)},  // block 64 divides neither cols nor the group of 40
      {12, 200, make_args(4, false, 40, 64, true)},
      {8, 96, make_args(2, false, 32, 20, false, mq::ScaleSearch::kMse)},
      {8, 96, make_args(8, true, 32, 1, false)},     // block 1: lazy == eager
      {8, 96, make_args(5, false, 48, 1000, true)},  // block larger than the matrix
      {3, 1, make_args(4, false, -1, 128, false)},   // a single input column
      {5, 7, make_args(6, true, -1, 3, true)},       // odd, tiny, per-channel
  };
  int idx = 0;
  for (const Case& c : cases) {
    CAPTURE(idx++);
    const auto w = mqtest::random_matrix(c.rows, c.cols, 100u + idx);
    const auto h = correlated_hessian(c.cols, 3 * c.cols, 200u + idx);
    const Result fast = solve<false>(w, c.rows, c.cols, h, c.args), ref = solve<true>(w, c.rows, c.cols, h, c.args);
    INFO(fast.status.to_string() << " / " << ref.status.to_string());
    REQUIRE(fast.status.ok());
    REQUIRE(ref.status.ok());
    CAPTURE(fast.report.loss, ref.report.loss);
    REQUIRE(code_agreement(fast, ref) >= kMinCodeAgreement);
    REQUIRE(std::fabs(fast.report.loss - ref.report.loss) <= kLossRelTol * ref.report.loss);
    REQUIRE(fast.report.escalations == ref.report.escalations);
    REQUIRE(fast.report.damp_value == Approx(ref.report.damp_value).epsilon(1e-12));
    check_outputs(fast, c.rows, c.cols, c.args.spec);
    check_outputs(ref, c.rows, c.cols, c.args.spec);
    if (c.args.act_order) REQUIRE(fast.scales == ref.scales);  // static groups: from the original W
    // the reported loss is the quadratic loss of the dequantized result
    const double q = mq::quadratic_loss<double>({w.data(), c.rows, c.cols, c.cols}, fast.dq.data(), h.data(), c.cols);
    REQUIRE(fast.report.loss == q);
  }
}

TEST_CASE("gptq beats rtn on a correlated Hessian", "[gptq]") {
  const int64_t rows = 32, cols = 128;
  const auto w = mqtest::random_matrix(rows, cols, 7u);
  const auto h = correlated_hessian(cols, 400, 8u);
  for (int bits : {2, 3, 4, 6})
    for (bool act : {false, true})
      for (auto search : {mq::ScaleSearch::kMinMax, mq::ScaleSearch::kMse}) {
        CAPTURE(bits, act, mq::scale_search_name(search));
        const mq::GptqArgs a = make_args(bits, false, 32, 64, act, search);
        const Result r = solve<false>(w, rows, cols, h, a);
        REQUIRE(r.status.ok());
        const double rtn = rtn_loss(w, rows, cols, h, a.spec);
        CAPTURE(r.report.loss, rtn);
        REQUIRE(r.report.loss < rtn);
      }
}

TEST_CASE("a diagonal Hessian reduces gptq to rtn exactly", "[gptq]") {
  const int64_t rows = 6, cols = 64;
  const auto w = mqtest::random_matrix(rows, cols, 9u);
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0 + (i * 29 % cols);  // distinct: a real permutation
  for (bool act : {false, true}) {
    CAPTURE(act);
    const mq::GptqArgs a = make_args(3, false, 16, 24, act);
    const Result r = solve<false>(w, rows, cols, h, a);
    REQUIRE(r.status.ok());
    std::vector<int8_t> codes(rows * cols);
    std::vector<float> scales(rows * 4);
    REQUIRE(mq::quantize_rtn({w.data(), rows, cols, cols}, a.spec, {codes.data(), scales.data()}).ok());
    REQUIRE(r.codes == codes);
    REQUIRE(r.scales == scales);
  }
}

TEST_CASE("dead columns are zeroed, counted and do not break the solve", "[gptq]") {
  const int64_t rows = 10, cols = 96;
  const auto w = mqtest::random_matrix(rows, cols, 11u);
  auto h = correlated_hessian(cols, 300, 12u);
  for (int64_t dead : {5, 77})
    for (int64_t j = 0; j < cols; ++j) h[dead * cols + j] = h[j * cols + dead] = 0.0;
  for (bool act : {false, true}) {
    CAPTURE(act);
    const mq::GptqArgs a = make_args(4, false, 32, 32, act);
    const Result fast = solve<false>(w, rows, cols, h, a), ref = solve<true>(w, rows, cols, h, a);
    REQUIRE(fast.status.ok());
    REQUIRE(fast.report.dead_columns == 2);
    REQUIRE(ref.report.dead_columns == 2);
    for (int64_t r = 0; r < rows; ++r) {
      REQUIRE(fast.dq[r * cols + 5] == 0.0f);
      REQUIRE(fast.dq[r * cols + 77] == 0.0f);
    }
    REQUIRE(code_agreement(fast, ref) >= kMinCodeAgreement);
    REQUIRE(std::isfinite(fast.report.loss));
    REQUIRE(std::fabs(fast.report.loss - ref.report.loss) <= kLossRelTol * ref.report.loss);
  }
  // an all-dead Hessian (an expert that saw no tokens) quantizes W to zeros without failing
  const std::vector<double> zero(cols * cols, 0.0);
  const Result z = solve<false>(w, rows, cols, zero, make_args(4, true, 32, 32, false));
  REQUIRE(z.status.ok());
  REQUIRE(z.report.dead_columns == cols);
  for (float v : z.dq) REQUIRE(v == 0.0f);
}

TEST_CASE("an indefinite Hessian escalates the damping or fails with a numerical error", "[gptq]") {
  // 2x2 blocks [[1, 3], [3, 1]] (eigenvalues 4 and -2): lambda = frac * mean(diag) = frac must exceed 2,
  // so 0.01 -> 0.1 -> 1 -> 10 takes three escalations.
  const int64_t rows = 4, cols = 8;
  const auto w = mqtest::random_matrix(rows, cols, 13u);
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0;
  for (int64_t k = 0; k < cols; k += 2) h[k * cols + k + 1] = h[(k + 1) * cols + k] = 3.0;
  const mq::GptqArgs a = make_args(4, true, -1, 128, false);
  for (bool use_ref : {false, true}) {
    CAPTURE(use_ref);
    const Result r = use_ref ? solve<true>(w, rows, cols, h, a) : solve<false>(w, rows, cols, h, a);
    REQUIRE(r.status.ok());
    REQUIRE(r.report.escalations == 3);
    REQUIRE(r.report.damp_fraction == Approx(10.0));
    REQUIRE(r.report.damp_value == Approx(10.0));
  }
  mq::GptqArgs few = a;
  few.max_damp_escalations = 2;
  for (bool use_ref : {false, true}) {
    const Result r = use_ref ? solve<true>(w, rows, cols, h, few) : solve<false>(w, rows, cols, h, few);
    REQUIRE(fails_with(r.status, mq::StatusCode::kNumericalError, "damp"));
    REQUIRE(r.report.escalations == 2);
  }
}

TEST_CASE("gptq is deterministic and the Hessian type only rounds", "[gptq]") {
  const int64_t rows = 24, cols = 200;
  const auto w = mqtest::random_matrix(rows, cols, 15u);
  const auto h = correlated_hessian(cols, 600, 16u);
  const mq::GptqArgs a = make_args(3, false, 40, 64, true, mq::ScaleSearch::kMse);
  const Result r1 = solve<false>(w, rows, cols, h, a), r2 = solve<false>(w, rows, cols, h, a);
  REQUIRE(r1.status.ok());
  REQUIRE(r1.codes == r2.codes);
  REQUIRE(r1.dq == r2.dq);
  REQUIRE(r1.scales == r2.scales);
  REQUIRE(r1.zeros == r2.zeros);
  REQUIRE(r1.report.loss == r2.report.loss);
  const std::vector<float> hf(h.begin(), h.end());
  const Result rf = solve<false>(w, rows, cols, hf, a);
  REQUIRE(rf.status.ok());
  REQUIRE(code_agreement(rf, r1) >= kMinCodeAgreement);
  REQUIRE(std::fabs(rf.report.loss - r1.report.loss) <= kLossRelTol * r1.report.loss);
  // null outputs and a null report are allowed
  std::vector<int8_t> codes(rows * cols);
  REQUIRE(mq::gptq_solve<double>({w.data(), rows, cols, cols}, h.data(), cols, a, {codes.data()}, nullptr).ok());
  REQUIRE(codes == r1.codes);
}

TEST_CASE("act_order ties keep column order and only the lower triangle of h is read", "[gptq]") {
  const int64_t rows = 12, cols = 96;
  const auto w = mqtest::random_matrix(rows, cols, 25u);
  auto h = correlated_hessian(cols, 300, 26u);
  // rescale to a correlation matrix: every diagonal entry is 1, so act_order's sort is all ties
  std::vector<double> d(cols);
  for (int64_t i = 0; i < cols; ++i) d[i] = std::sqrt(h[i * cols + i]);
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = 0; j < cols; ++j) h[i * cols + j] /= d[i] * d[j];
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0;
  const mq::GptqArgs a = make_args(4, false, 32, 32, true);
  const Result fast = solve<false>(w, rows, cols, h, a), ref = solve<true>(w, rows, cols, h, a);
  REQUIRE(fast.status.ok());
  REQUIRE(code_agreement(fast, ref) >= kMinCodeAgreement);
  // junk in the strict upper triangle changes nothing (the loss reads the lower triangle too)
  auto junk = h;
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t j = i + 1; j < cols; ++j) junk[i * cols + j] = 5.0 * std::sin(static_cast<double>(i * cols + j));
  const Result j = solve<false>(w, rows, cols, junk, a);
  REQUIRE(j.status.ok());
  REQUIRE(j.codes == fast.codes);
  REQUIRE(j.report.loss == fast.report.loss);
}

TEST_CASE("quadratic_loss matches the plain triple loop", "[gptq]") {
  const int64_t rows = 7, cols = 300;  // more than one 256-column panel
  const auto w = mqtest::random_matrix(rows, cols, 17u), q = mqtest::random_matrix(rows, cols, 18u);
  const auto h = correlated_hessian(cols, 100, 19u);
  const mq::MatrixView wv{w.data(), rows, cols, cols};
  const double fast = mq::quadratic_loss<double>(wv, q.data(), h.data(), cols);
  const double ref = mq::quadratic_loss_ref<double>(wv, q.data(), h.data(), cols);
  REQUIRE(fast > 0.0);
  REQUIRE(std::fabs(fast - ref) <= kQuadLossRelTol * ref);
}

TEST_CASE("gptq rejects bad arguments with statuses naming them", "[gptq]") {
  const int64_t rows = 4, cols = 32;
  const auto w = mqtest::random_matrix(rows, cols, 21u);
  const auto h = correlated_hessian(cols, 64, 22u);
  const mq::GptqArgs good = make_args(4, false, 16, 8, false);
  REQUIRE(solve<false>(w, rows, cols, h, good).status.ok());
  auto expect = [&](const std::vector<float>& ww, int64_t r, const std::vector<double>& hh, const mq::GptqArgs& a,
                    const char* word) {
    CAPTURE(word);
    for (bool use_ref : {false, true}) {
      const Result res = use_ref ? solve<true>(ww, r, cols, hh, a) : solve<false>(ww, r, cols, hh, a);
      INFO(res.status.to_string());
      REQUIRE(fails_with(res.status, mq::StatusCode::kInvalidArgument, word));
    }
  };
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  {
    auto hb = h;
    hb[3 * cols + 9] = nan;
    expect(w, rows, hb, good, "h:");
    hb[3 * cols + 9] = inf;
    expect(w, rows, hb, good, "h:");
    hb = h;
    hb[6 * cols + 6] = -1.0;
    expect(w, rows, hb, good, "diagonal");
  }
  {
    auto wb = w;
    wb[5] = std::numeric_limits<float>::quiet_NaN();
    expect(wb, rows, h, good, "w:");
  }
  mq::GptqArgs a = good;
  for (int64_t b : {0, -3}) {
    a.block_size = b;
    expect(w, rows, h, a, "block_size");
  }
  a = good;
  for (double d : {0.0, -0.01, nan, inf}) {
    a.damp = d;
    expect(w, rows, h, a, "damp");
  }
  a = good;
  a.damp_escalation_factor = 1.0;
  expect(w, rows, h, a, "damp_escalation_factor");
  a = good;
  a.spec.bits = 9;
  expect(w, rows, h, a, "bits");
  a = good;
  a.spec.group_size = 12;
  expect(w, rows, h, a, "group_size");
  expect(std::vector<float>{}, 0, h, good, "out_features");
  // ldh smaller than cols
  std::vector<int8_t> codes(rows * cols);
  REQUIRE(fails_with(mq::gptq_solve<double>({w.data(), rows, cols, cols}, h.data(), cols - 1, good, {codes.data()},
                                            nullptr),
                     mq::StatusCode::kInvalidArgument, "ldh"));
}

TEST_CASE("gptq group parameters do not depend on the block size", "[gptq]") {
  // A group of 32 that starts inside a block of 48 runs past it: its parameters must see the block's
  // pending updates, so every block size gives the same solve up to rounding-order flips.
  const int64_t rows = 32, cols = 256;
  const auto w = mqtest::random_matrix(rows, cols, 91);
  const auto h = correlated_hessian(cols, 512, 92);
  const Result one = solve<false, double>(w, rows, cols, h, make_args(4, false, 32, 1, false));
  for (const int64_t block : {48, 128, 100}) {
    const Result r = solve<false, double>(w, rows, cols, h, make_args(4, false, 32, block, false));
    REQUIRE(r.status.ok());
    CHECK(code_agreement(r, one) >= kMinCodeAgreement);
    CHECK(std::fabs(r.report.loss - one.report.loss) <= kLossRelTol * one.report.loss);
  }
}
