// Tests of moequant/rounding.h (greedy rounding correction) against its scalar twin, RTN and GPTQ.
#include <moequant/gptq.h>
#include <moequant/quant.h>
#include <moequant/ref/rounding_ref.h>
#include <moequant/rounding.h>

#include <catch2/catch.hpp>

#include <cstdint>
#include <cstdio>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

namespace {

/// H = X^T X / n for X with correlated, unevenly scaled columns (row-major [cols, cols], double).
std::vector<double> correlated_h(int64_t cols, int64_t n, uint32_t seed) {
  const int64_t k = std::max<int64_t>(2, cols / 4);
  const auto z = mqtest::random_matrix(n, k, seed), a = mqtest::random_matrix(k, cols, seed + 1),
             noise = mqtest::random_matrix(n, cols, seed + 2, 0.2f);
  std::vector<double> x(n * cols), h(cols * cols, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double v = noise[i * cols + j];
      for (int64_t l = 0; l < k; ++l) v += z[i * k + l] * a[l * cols + j];
      x[i * cols + j] = v * (0.5 + (j % 5) * 0.3);
    }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < cols; ++p)
      for (int64_t q = 0; q < cols; ++q) h[p * cols + q] += x[i * cols + p] * x[i * cols + q] / static_cast<double>(n);
  return h;
}

struct Problem {
  int64_t rows, cols;
  std::vector<float> w;
  std::vector<double> h;
  mq::QuantSpec spec;
  std::vector<int8_t> codes;
  std::vector<float> scales, deq;
  std::vector<int32_t> zeros;
};

Problem make_problem(int64_t rows, int64_t cols, int64_t group, bool symmetric, uint32_t seed, bool gptq) {
  Problem p{rows, cols, mqtest::random_matrix(rows, cols, seed), correlated_h(cols, 4 * cols, seed + 10), {}, {}, {},
            {}, {}};
  p.spec.bits = 4;
  p.spec.group_size = group;
  p.spec.symmetric = symmetric;
  const int64_t ng = mq::num_groups(p.spec, cols);
  p.codes.resize(rows * cols);
  p.scales.resize(rows * ng);
  p.zeros.resize(rows * ng);
  p.deq.resize(rows * cols);
  const mq::MatrixView v{p.w.data(), rows, cols, cols};
  const mq::QuantizedOut out{p.codes.data(), p.scales.data(), p.zeros.data(), p.deq.data()};
  if (gptq) {
    mq::GptqArgs a;
    a.spec = p.spec;
    REQUIRE(mq::gptq_solve<double>(v, p.h.data(), cols, a, out, nullptr).ok());
  } else {
    REQUIRE(mq::quantize_rtn(v, p.spec, out).ok());
  }
  return p;
}

mq::RoundingReport run(Problem& p, int passes, double quantile, bool ref = false) {
  const mq::MatrixView v{p.w.data(), p.rows, p.cols, p.cols};
  mq::RoundingArgs a;
  a.passes = passes;
  a.outlier_quantile = quantile;
  mq::RoundingReport rep;
  const mq::Status st = ref ? mq::greedy_rounding_ref<double>(v, p.h.data(), p.cols, p.spec, p.scales.data(),
                                                              p.zeros.data(), p.codes.data(), p.deq.data(), a, &rep)
                            : mq::greedy_rounding<double>(v, p.h.data(), p.cols, p.spec, p.scales.data(),
                                                          p.zeros.data(), p.codes.data(), p.deq.data(), a, &rep);
  REQUIRE(st.ok());
  return rep;
}

}  // namespace

TEST_CASE("greedy rounding strictly lowers the proxy loss of RTN and GPTQ and never raises it", "[rounding]") {
  for (bool gptq : {false, true})
    for (bool sym : {false, true}) {
      Problem p = make_problem(32, 128, 32, sym, 7, gptq);
      const mq::MatrixView v{p.w.data(), p.rows, p.cols, p.cols};
      const double l0 = mq::quadratic_loss(v, p.deq.data(), p.h.data(), p.cols);
      const auto before_codes = p.codes;
      const auto rep = run(p, 2, 0.95);
      const double l1 = mq::quadratic_loss(v, p.deq.data(), p.h.data(), p.cols);
      std::printf("[rounding] %s %s: loss %.6g -> %.6g (%.1f%% lower), %lld flips, %lld outliers frozen\n",
                  gptq ? "gptq" : "rtn", sym ? "sym" : "asym", l0, l1, 100.0 * (1.0 - l1 / l0),
                  static_cast<long long>(rep.flips), static_cast<long long>(rep.excluded));
      CHECK(rep.loss_before == Approx(l0).epsilon(1e-9));
      CHECK(rep.loss_after == Approx(l1).epsilon(1e-9));
      CHECK(l1 < l0);
      CHECK(rep.flips > 0);
      CHECK(rep.excluded == 32 * 4);  // floor(0.05 * 32) = 1 frozen entry per group, 4 groups per row
      int64_t changed = 0;
      for (size_t i = 0; i < p.codes.size(); ++i) {
        CHECK(p.codes[i] >= -8);
        CHECK(p.codes[i] <= 7);
        changed += p.codes[i] != before_codes[i];
      }
      CHECK(changed == rep.flips);
    }
}

TEST_CASE("greedy rounding is deterministic, freezes outliers and is a no-op with passes=0", "[rounding]") {
  Problem a = make_problem(16, 64, 64, false, 3, false), b = a, c = a;
  const auto orig = a.codes;
  run(a, 1, 0.9);
  run(b, 1, 0.9);
  CHECK(a.codes == b.codes);
  CHECK(a.deq == b.deq);
  // the floor(0.1 * 64) = 6 largest |w| of every row keep their codes
  for (int64_t r = 0; r < 16; ++r) {
    std::vector<char> frozen;
    mq::detail::mark_outliers(a.w.data() + r * 64, 64, 64, 0.9, &frozen);
    int64_t n = 0;
    for (int64_t j = 0; j < 64; ++j)
      if (frozen[j]) {
        ++n;
        CHECK(a.codes[r * 64 + j] == orig[r * 64 + j]);
      }
    CHECK(n == 6);
  }
  const auto rep = run(c, 0, 0.99);
  CHECK(c.codes == orig);
  CHECK(rep.flips == 0);
  CHECK(rep.loss_after == rep.loss_before);
}

TEST_CASE("greedy rounding agrees with its scalar twin", "[rounding]") {
  for (uint32_t seed : {1u, 2u}) {
    Problem f = make_problem(6, 32, 16, seed == 2, seed, seed == 2), r = f;
    const auto rf = run(f, 2, 0.95), rr = run(r, 2, 0.95, true);
    int64_t same = 0;
    for (size_t i = 0; i < f.codes.size(); ++i) same += f.codes[i] == r.codes[i];
    CHECK(static_cast<double>(same) / static_cast<double>(f.codes.size()) >= 0.99);
    CHECK(rf.loss_before == Approx(rr.loss_before).epsilon(1e-9));
    CHECK(rf.loss_after == Approx(rr.loss_after).epsilon(1e-6));
    CHECK(rf.excluded == rr.excluded);
  }
}

TEST_CASE("greedy rounding validates its arguments", "[rounding]") {
  Problem p = make_problem(4, 32, 16, false, 5, false);
  const mq::MatrixView v{p.w.data(), p.rows, p.cols, p.cols};
  mq::RoundingArgs a;
  a.outlier_quantile = 0.0;
  CHECK(fails_with(mq::greedy_rounding<double>(v, p.h.data(), p.cols, p.spec, p.scales.data(), p.zeros.data(),
                                               p.codes.data(), nullptr, a, nullptr),
                   mq::StatusCode::kInvalidArgument, "outlier_quantile"));
  a = mq::RoundingArgs{};
  a.passes = -1;
  CHECK(fails_with(mq::greedy_rounding<double>(v, p.h.data(), p.cols, p.spec, p.scales.data(), p.zeros.data(),
                                               p.codes.data(), nullptr, a, nullptr),
                   mq::StatusCode::kInvalidArgument, "passes"));
  a = mq::RoundingArgs{};
  p.codes[3] = 9;  // out of range for 4 bits
  CHECK(fails_with(mq::greedy_rounding<double>(v, p.h.data(), p.cols, p.spec, p.scales.data(), p.zeros.data(),
                                               p.codes.data(), nullptr, a, nullptr),
                   mq::StatusCode::kInvalidArgument, "codes"));
}
