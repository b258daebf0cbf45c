// Tests of moequant/hadamard.h and hadamard_tables.h: the sign tables are Hadamard matrices (H H^T = m I), their
// Kronecker products with Sylvester matrices too, and hadamard_transform equals x (H_m (x) H_p) / sqrt(n) computed
// with the explicit matrix (in double).
#include <moequant/hadamard.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

namespace {

int sylvester(int64_t i, int64_t j) {
  int64_t v = i & j, par = 0;
  while (v) {
    par ^= v & 1;
    v >>= 1;
  }
  return par ? -1 : 1;
}

/// Entry (r, c) of the full +-1 matrix H_m (x) H_p of order n.
int full_entry(int m, int64_t p, int64_t r, int64_t c) {
  const int a = static_cast<int>(r / p), a2 = static_cast<int>(c / p);
  return static_cast<int>(mq::hadamard_sign(m, a, a2)) * sylvester(r % p, c % p);
}

/// max |(H H^T)_ij - n delta_ij| over the order-n matrix (exact integers).
int64_t gram_error(int m, int64_t p) {
  const int64_t n = m * p;
  int64_t worst = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t dot = 0;
      for (int64_t k = 0; k < n; ++k) dot += full_entry(m, p, i, k) * full_entry(m, p, j, k);
      const int64_t d = std::llabs(dot - (i == j ? n : 0));
      if (d > worst) worst = d;
    }
  return worst;
}

}  // namespace

TEST_CASE("the sign tables are Hadamard matrices of order 12, 20, 28, 40", "[hadamard]") {
  for (int m : {12, 20, 28, 40}) {
    INFO("m = " << m);
    const char* t = mq::hadamard_tables::table(m);
    REQUIRE(t != nullptr);
    REQUIRE(std::string(t).size() == static_cast<size_t>(m * m));
    REQUIRE(gram_error(m, 1) == 0);
  }
}

TEST_CASE("Kronecker products with Sylvester matrices are Hadamard matrices", "[hadamard]") {
  for (int m : {1, 12, 20, 28, 40})
    for (int64_t p : {1, 2, 4, 8}) {
      INFO("m = " << m << ", p = " << p);
      REQUIRE(gram_error(m, p) == 0);
    }
}

TEST_CASE("decompose: supported lengths", "[hadamard]") {
  int m = 0;
  int64_t p = 0;
  REQUIRE(mq::hadamard_tables::decompose(7168, &m, &p));
  CHECK(m == 28);
  CHECK(p == 256);
  REQUIRE(mq::hadamard_tables::decompose(32768, &m, &p));
  CHECK(m == 1);
  REQUIRE(mq::hadamard_tables::decompose(40 * 64, &m, &p));
  CHECK(m == 20);  // 40 * 2^k runs as 20 * 2^(k+1)
  CHECK(p == 128);
  REQUIRE(mq::hadamard_tables::decompose(12, &m, &p));
  CHECK(p == 1);
  for (int64_t bad : {0, -4, 3, 24 * 3, 36, 65536, 28 * 2048})
    CHECK_FALSE(mq::hadamard_supported(bad));
}

TEST_CASE("hadamard_transform equals x H / sqrt(n) with the explicit matrix", "[hadamard]") {
  for (int64_t n : {1, 2, 8, 64, 12, 24, 20, 80, 28, 224, 40, 160, 1024}) {
    INFO("n = " << n);
    int m = 0;
    int64_t p = 0;
    REQUIRE(mq::hadamard_tables::decompose(n, &m, &p));
    const int64_t rows = 3;
    const std::vector<float> x = mqtest::random_matrix(rows, n, 7u + static_cast<uint32_t>(n));
    std::vector<float> out(x.size());
    REQUIRE(mq::hadamard_transform(x.data(), out.data(), rows, n).ok());
    const double inv = 1.0 / std::sqrt(static_cast<double>(n));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; ++c) {
        double ref = 0.0, mag = 0.0;
        for (int64_t k = 0; k < n; ++k) {
          ref += static_cast<double>(x[r * n + k]) * full_entry(m, p, k, c);
          mag += std::fabs(x[r * n + k]);
        }
        ref *= inv;
        REQUIRE(std::fabs(out[r * n + c] - ref) <= 1e-6 * mag * inv * std::log2(2.0 * n) + 1e-30);
      }
    // in place gives the same result, and the transform preserves the norm (orthonormal)
    std::vector<float> y = x;
    REQUIRE(mq::hadamard_transform(y.data(), y.data(), rows, n).ok());
    REQUIRE(y == out);
    double nx = 0.0, ny = 0.0;
    for (size_t i = 0; i < x.size(); ++i) {
      nx += double(x[i]) * x[i];
      ny += double(out[i]) * out[i];
    }
    REQUIRE(std::fabs(nx - ny) <= 1e-5 * nx);
  }
}

TEST_CASE("hadamard_transform rejects unsupported lengths", "[hadamard]") {
  std::vector<float> x(36, 1.0f), out(36);
  CHECK(fails_with(mq::hadamard_transform(x.data(), out.data(), 1, 36), mq::StatusCode::kInvalidArgument, "x"));
  CHECK(fails_with(mq::hadamard_transform(x.data(), out.data(), 1, 36), mq::StatusCode::kInvalidArgument, "12, 20, 28"));
  CHECK(fails_with(mq::hadamard_transform(nullptr, out.data(), 1, 12), mq::StatusCode::kInvalidArgument, "x"));
  CHECK(mq::hadamard_transform(x.data(), out.data(), 0, 12).ok());
}
