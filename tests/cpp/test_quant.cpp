// Tests of moequant/quant.h: RTN round trips, scale rounding, zero groups, MSE search, errors.
#include <moequant/quant.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

// Error budgets. The RTN error of one value is at most half a step (symmetric) or one step (asymmetric: the
// rounded zero point moves the grid by up to half a step); the slack absorbs fp32 rounding of x / scale.
constexpr float kSymStepFraction = 0.5f;
constexpr float kAsymStepFraction = 1.0f;
constexpr float kStepSlack = 1e-4f;
// bf16 keeps 8 significant bits, fp16 11: relative distance of a rounded scale from the fp32 one.
constexpr float kBf16RelTol = 1.0f / 256.0f;
constexpr float kFp16RelTol = 1.0f / 2048.0f;

namespace {

struct RtnResult {
  std::vector<int8_t> codes;
  std::vector<float> scales, dq;
  std::vector<int32_t> zeros;
};

RtnResult run_rtn(const std::vector<float>& w, int64_t rows, int64_t cols, const mq::QuantSpec& s) {
  const int64_t ng = mq::num_groups(s, cols);
  RtnResult r;
  r.codes.resize(rows * cols);
  r.dq.resize(rows * cols);
  r.scales.resize(rows * ng);
  r.zeros.resize(rows * ng);
  const mq::Status st =
      mq::quantize_rtn({w.data(), rows, cols, cols}, s, {r.codes.data(), r.scales.data(), r.zeros.data(), r.dq.data()});
  REQUIRE(st.ok());
  return r;
}

}  // namespace

TEST_CASE("rtn round trip on awkward shapes, every width, sym and asym", "[quant]") {
  struct Shape {
    int64_t rows, cols, group;
  };
  const Shape shapes[] = {{5, 1, -1}, {3, 7, -1}, {4, 137, -1}, {6, 128, 32}, {2, 256, 128}, {3, 96, 32}};
  for (const Shape& sh : shapes)
    for (int bits = mq::kMinBits; bits <= mq::kMaxBits; ++bits)
      for (bool sym : {false, true}) {
        CAPTURE(sh.rows, sh.cols, sh.group, bits, sym);
        mq::QuantSpec s;
        s.bits = bits;
        s.symmetric = sym;
        s.group_size = sh.group;
        const auto w = mqtest::random_matrix(sh.rows, sh.cols, 17u + static_cast<uint32_t>(bits));
        const RtnResult r = run_rtn(w, sh.rows, sh.cols, s);
        const int64_t gs = mq::effective_group_size(s, sh.cols), ng = mq::num_groups(s, sh.cols);
        std::vector<float> again(sh.rows * sh.cols);
        REQUIRE(mq::dequantize(r.codes.data(), r.scales.data(), r.zeros.data(), sh.rows, sh.cols, s, again.data()).ok());
        for (int64_t i = 0; i < sh.rows * sh.cols; ++i) {
          const int64_t row = i / sh.cols, g = (i % sh.cols) / gs;
          const float scale = r.scales[row * ng + g];
          REQUIRE(r.codes[i] >= mq::qmin_for(bits));
          REQUIRE(r.codes[i] <= mq::qmax_for(bits));
          REQUIRE(again[i] == r.dq[i]);  // the loader's dequantization is the optimizer's, bit for bit
          const float frac = sym ? kSymStepFraction : kAsymStepFraction;
          REQUIRE(std::fabs(w[i] - r.dq[i]) <= scale * (frac + kStepSlack));
          if (sym) REQUIRE(r.zeros[row * ng + g] == 0);
        }
      }
}

TEST_CASE("rtn error shrinks with more bits", "[quant]") {
  const int64_t rows = 8, cols = 128;
  const auto w = mqtest::random_matrix(rows, cols, 5u);
  double prev = std::numeric_limits<double>::infinity();
  for (int bits = mq::kMinBits; bits <= mq::kMaxBits; ++bits) {
    mq::QuantSpec s;
    s.bits = bits;
    s.group_size = 32;
    const RtnResult r = run_rtn(w, rows, cols, s);
    double err = 0;
    for (size_t i = 0; i < w.size(); ++i) err += (w[i] - r.dq[i]) * (w[i] - r.dq[i]);
    CAPTURE(bits, err, prev);
    REQUIRE(err < prev);
    prev = err;
  }
}

TEST_CASE("scales rounded to bf16 / fp16 are what dequantization uses", "[quant]") {
  const int64_t rows = 4, cols = 64;
  const auto w = mqtest::random_matrix(rows, cols, 23u, 0.37f);
  for (mq::ScaleDtype d : {mq::ScaleDtype::kBFloat16, mq::ScaleDtype::kFloat16})
    for (bool sym : {false, true}) {
      CAPTURE(static_cast<int>(d), sym);
      mq::QuantSpec s;
      s.bits = 4;
      s.symmetric = sym;
      s.group_size = 16;
      s.scale_dtype = d;
      mq::QuantSpec s32 = s;
      s32.scale_dtype = mq::ScaleDtype::kFloat32;
      const RtnResult r = run_rtn(w, rows, cols, s), r32 = run_rtn(w, rows, cols, s32);
      const float tol = d == mq::ScaleDtype::kBFloat16 ? kBf16RelTol : kFp16RelTol;
      for (size_t k = 0; k < r.scales.size(); ++k) {
        REQUIRE(mq::round_scale(r.scales[k], d) == r.scales[k]);  // representable in the storage dtype
        REQUIRE(std::fabs(r.scales[k] - r32.scales[k]) <= tol * r32.scales[k]);
      }
      const int64_t ng = cols / 16;
      for (int64_t i = 0; i < rows * cols; ++i) {
        const int64_t k = (i / cols) * ng + (i % cols) / 16;
        const float expect = static_cast<float>(r.codes[i] - r.zeros[k]) * r.scales[k];
        REQUIRE(r.dq[i] == expect);
      }
    }
}

TEST_CASE("round_to_bf16 / round_to_fp16 goldens", "[quant]") {
  REQUIRE(mq::round_to_bf16(1.0f + 1.0f / 256.0f) == 1.0f);                    // tie -> even
  REQUIRE(mq::round_to_bf16(1.0f + 3.0f / 256.0f) == 1.0f + 4.0f / 256.0f);     // tie -> even (up)
  REQUIRE(mq::round_to_fp16(1.0f + 1.0f / 2048.0f) == 1.0f);                    // tie -> even
  REQUIRE(mq::round_to_fp16(65504.0f) == 65504.0f);
  REQUIRE(std::isinf(mq::round_to_fp16(70000.0f)));
  REQUIRE(mq::round_to_fp16(1e-7f) == std::ldexp(2.0f, -24));                   // subnormal half
}

TEST_CASE("all-zero groups get the dtype epsilon and dequantize to exactly 0", "[quant]") {
  const int64_t rows = 3, cols = 64;
  auto w = mqtest::random_matrix(rows, cols, 31u);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 16; c < 32; ++c) w[r * cols + c] = 0.0f;  // group 1 of every row
  for (mq::ScaleDtype d : {mq::ScaleDtype::kFloat32, mq::ScaleDtype::kBFloat16, mq::ScaleDtype::kFloat16})
    for (bool sym : {false, true})
      for (int bits : {2, 4, 8}) {
        CAPTURE(static_cast<int>(d), sym, bits);
        mq::QuantSpec s;
        s.bits = bits;
        s.symmetric = sym;
        s.group_size = 16;
        s.scale_dtype = d;
        const RtnResult r = run_rtn(w, rows, cols, s);
        for (int64_t row = 0; row < rows; ++row) {
          REQUIRE(r.scales[row * 4 + 1] == mq::scale_epsilon(d));
          for (int64_t c = 16; c < 32; ++c) REQUIRE(r.dq[row * cols + c] == 0.0f);
        }
      }
}

TEST_CASE("mse scale search never does worse than min-max on its own objective", "[quant]") {
  const int64_t rows = 6, cols = 128, gs = 32;
  auto w = mqtest::random_matrix(rows, cols, 41u);
  for (int64_t r = 0; r < rows; ++r) w[r * cols + 3] *= 8.0f;  // an outlier: shrinking the range pays off
  for (bool sym : {false, true}) {
    mq::QuantSpec mm;
    mm.bits = 3;
    mm.symmetric = sym;
    mm.group_size = gs;
    mq::QuantSpec mse = mm;
    mse.search = mq::ScaleSearch::kMse;
    const RtnResult a = run_rtn(w, rows, cols, mm), b = run_rtn(w, rows, cols, mse);
    int strictly_better = 0;
    for (int64_t g = 0; g < rows * cols / gs; ++g) {
      double ea = 0, eb = 0;
      for (int64_t i = g * gs; i < (g + 1) * gs; ++i) {
        ea += std::pow(std::fabs(static_cast<double>(w[i]) - a.dq[i]), mse.mse_norm);
        eb += std::pow(std::fabs(static_cast<double>(w[i]) - b.dq[i]), mse.mse_norm);
      }
      REQUIRE(eb <= ea);
      strictly_better += eb < ea;
    }
    REQUIRE(strictly_better > 0);
  }
}

TEST_CASE("invalid specs are kInvalidArgument naming the field", "[quant]") {
  const auto w = mqtest::random_matrix(2, 64, 1u);
  std::vector<int8_t> codes(128);
  mq::QuantSpec s;
  for (int bits : {0, 1, 9, 16}) {
    s.bits = bits;
    CAPTURE(bits);
    REQUIRE(fails_with(mq::validate(s), mq::StatusCode::kInvalidArgument, "bits"));
    REQUIRE(fails_with(mq::quantize_rtn({w.data(), 2, 64, 64}, s, {codes.data()}), mq::StatusCode::kInvalidArgument,
                       "bits"));
  }
  s.bits = 4;
  s.group_size = 48;  // does not divide 64
  REQUIRE(fails_with(mq::quantize_rtn({w.data(), 2, 64, 64}, s, {codes.data()}), mq::StatusCode::kInvalidArgument,
                     "group_size"));
  s.group_size = 32;
  s.search = mq::ScaleSearch::kMse;
  s.mse_min_shrink = 0.0;
  REQUIRE(fails_with(mq::validate(s, 64), mq::StatusCode::kInvalidArgument, "mse_min_shrink"));
}

TEST_CASE("NaN / Inf in w is an error naming w", "[quant]") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto w = mqtest::random_matrix(3, 32, 2u);
    w[2 * 32 + 5] = bad;
    std::vector<int8_t> codes(96);
    mq::QuantSpec s;
    s.group_size = 16;
    const mq::Status st = mq::quantize_rtn({w.data(), 3, 32, 32}, s, {codes.data()});
    REQUIRE(fails_with(st, mq::StatusCode::kInvalidArgument, "w:"));
    REQUIRE(mqtest::contains(st.message(), "(2, 5)"));
  }
}
