// Tests of moequant/hessian.h against the naive per-row twin in moequant/ref/gptq_ref.h.
#include <moequant/hessian.h>
#include <moequant/ref/gptq_ref.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

// Error budgets, relative to the largest |entry| of the double reference. A float accumulation of a few
// hundred to a few thousand products has a relative error of ~n * 2^-24 in the worst case and far less in
// practice; double accumulations differ from the reference only by summation order.
constexpr double kFp32RelTol = 2e-5;
constexpr double kFp64RelTol = 1e-12;

namespace {

struct Batch {
  int64_t n, dim, ldx, experts;
  std::vector<float> x, w;
  std::vector<int32_t> ids;
};

/// n rows of dim features (row stride ldx > dim, padding poisoned with NaN to catch reads past dim), routed
/// to experts at random except `empty_expert`, which gets no rows.
Batch make_batch(int64_t n, int64_t dim, int64_t experts, int64_t empty_expert, uint32_t seed) {
  Batch b{n, dim, dim + 3, experts, {}, {}, {}};
  b.x = mqtest::random_matrix(n, b.ldx, seed);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = dim; j < b.ldx; ++j) b.x[i * b.ldx + j] = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 gen(seed + 1);
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(experts - 1));
  std::uniform_real_distribution<float> aff(0.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) {
    int32_t e = pick(gen);
    while (e == empty_expert) e = pick(gen);
    b.ids.push_back(e);
    b.w.push_back(aff(gen));
  }
  return b;
}

template <typename Acc>
struct Out {
  std::vector<Acc> H;
  std::vector<int64_t> counts;
  std::vector<double> mass;
  Out(int64_t E, int64_t dim) : H(E * dim * dim, Acc(0)), counts(E, 0), mass(E, 0.0) {}
};

template <typename Acc, bool kRef>
Out<Acc> accumulate(const Batch& b, bool weighted, int64_t r0 = 0, int64_t r1 = -1) {
  if (r1 < 0) r1 = b.n;
  Out<Acc> o(b.experts, b.dim);
  const float* w = weighted ? b.w.data() + r0 : nullptr;
  const auto fn = kRef ? &mq::accumulate_hessian_ref<Acc> : &mq::accumulate_hessian<Acc>;
  REQUIRE(fn(b.x.data() + r0 * b.ldx, r1 - r0, b.dim, b.ldx, b.ids.data() + r0, w, b.experts, o.H.data(),
             o.counts.data(), o.mass.data())
              .ok());
  return o;
}

template <typename A, typename B>
double max_rel_diff(const std::vector<A>& a, const std::vector<B>& ref) {
  double m = 0, d = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(ref[i])));
    d = std::max(d, std::fabs(static_cast<double>(a[i]) - static_cast<double>(ref[i])));
  }
  return m > 0 ? d / m : d;
}

}  // namespace

TEST_CASE("hessian matches the per-row reference (fp32 and fp64)", "[hessian]") {
  // 2600 rows over 2 experts: more than one 1024-row chunk per expert.
  for (auto shape : {std::vector<int64_t>{500, 24, 5}, std::vector<int64_t>{2600, 9, 2}})
    for (bool weighted : {true, false}) {
      CAPTURE(shape[0], shape[1], shape[2], weighted);
      const Batch b = make_batch(shape[0], shape[1], shape[2], shape[2] > 2 ? 3 : -1, 7u);
      const auto ref = accumulate<double, true>(b, weighted);
      const auto h64 = accumulate<double, false>(b, weighted);
      const auto h32 = accumulate<float, false>(b, weighted);
      const auto r32 = accumulate<float, true>(b, weighted);
      REQUIRE(max_rel_diff(h64.H, ref.H) <= kFp64RelTol);
      REQUIRE(max_rel_diff(h32.H, ref.H) <= kFp32RelTol);
      REQUIRE(max_rel_diff(r32.H, ref.H) <= kFp32RelTol);  // the float reference itself is within budget
      REQUIRE(h64.counts == ref.counts);
      REQUIRE(h32.counts == ref.counts);
      for (int64_t e = 0; e < b.experts; ++e) REQUIRE(h64.mass[e] == Approx(ref.mass[e]).epsilon(1e-12));
      int64_t total = 0;
      for (auto c : h64.counts) total += c;
      REQUIRE(total == b.n);
      for (int64_t e = 0; e < b.experts; ++e)  // exactly symmetric
        for (int64_t i = 0; i < b.dim; ++i)
          for (int64_t j = 0; j < i; ++j) {
            REQUIRE(h32.H[(e * b.dim + i) * b.dim + j] == h32.H[(e * b.dim + j) * b.dim + i]);
            REQUIRE(h64.H[(e * b.dim + i) * b.dim + j] == h64.H[(e * b.dim + j) * b.dim + i]);
          }
    }
}

TEST_CASE("zero-token experts stay untouched with count 0", "[hessian]") {
  const Batch b = make_batch(300, 16, 6, 3, 11u);
  auto o = accumulate<float, false>(b, true);
  REQUIRE(o.counts[3] == 0);
  REQUIRE(o.mass[3] == 0.0);
  for (int64_t k = 0; k < 16 * 16; ++k) REQUIRE(o.H[3 * 256 + k] == 0.0f);
  // a non-zero H of an expert without rows is left as it was, not rewritten
  std::vector<double> H(6 * 256, 0.0);
  for (int64_t k = 0; k < 256; ++k) H[3 * 256 + k] = 1.5;
  REQUIRE(mq::accumulate_hessian<double>(b.x.data(), b.n, b.dim, b.ldx, b.ids.data(), nullptr, 6, H.data(), nullptr,
                                         nullptr)
              .ok());
  for (int64_t k = 0; k < 256; ++k) REQUIRE(H[3 * 256 + k] == 1.5);
  REQUIRE(H[0] > 0.0);
}

TEST_CASE("null weights equal all-ones weights", "[hessian]") {
  Batch b = make_batch(400, 12, 4, -1, 13u);
  std::fill(b.w.begin(), b.w.end(), 1.0f);
  const auto ones = accumulate<float, false>(b, true);
  const auto none = accumulate<float, false>(b, false);
  REQUIRE(ones.H == none.H);
  REQUIRE(ones.mass == none.mass);
  REQUIRE(none.mass[0] == static_cast<double>(none.counts[0]));
}

TEST_CASE("accumulator: merge of two halves equals one pass over all rows", "[hessian]") {
  const Batch b = make_batch(1500, 20, 4, 2, 17u);
  mq::HessianAccumulator<double> all, first, second;
  REQUIRE(mq::HessianAccumulator<double>::create(4, 20, &all).ok());
  REQUIRE(mq::HessianAccumulator<double>::create(4, 20, &first).ok());
  REQUIRE(mq::HessianAccumulator<double>::create(4, 20, &second).ok());
  REQUIRE(all.add(b.x.data(), b.n, b.ldx, b.ids.data(), b.w.data()).ok());
  const int64_t half = 700;
  REQUIRE(first.add(b.x.data(), half, b.ldx, b.ids.data(), b.w.data()).ok());
  REQUIRE(second.add(b.x.data() + half * b.ldx, b.n - half, 20, b.ldx, b.ids.data() + half, b.w.data() + half, 4).ok());
  REQUIRE(first.merge(second).ok());
  REQUIRE(first.num_experts() == 4);
  REQUIRE(first.dim() == 20);
  for (int64_t e = 0; e < 4; ++e) {
    REQUIRE(first.counts()[e] == all.counts()[e]);
    REQUIRE(first.mass()[e] == Approx(all.mass()[e]).epsilon(1e-12));
    const std::vector<double> a(all.hessian(e), all.hessian(e) + 400), m(first.hessian(e), first.hessian(e) + 400);
    REQUIRE(max_rel_diff(m, a) <= kFp64RelTol);
  }
  REQUIRE(all.counts()[2] == 0);
  REQUIRE(all.counts()[0] + all.counts()[1] + all.counts()[3] == b.n);
  // the accumulator agrees with the pure function
  const auto ref = accumulate<double, true>(b, true);
  REQUIRE(max_rel_diff(std::vector<double>(all.data(), all.data() + 4 * 400), ref.H) <= kFp64RelTol);
}

TEST_CASE("accumulator: invalid sizes and mismatched merges", "[hessian]") {
  mq::HessianAccumulator<float> a, b;
  REQUIRE(fails_with(mq::HessianAccumulator<float>::create(0, 8, &a), mq::StatusCode::kInvalidArgument, "num_experts"));
  REQUIRE(fails_with(mq::HessianAccumulator<float>::create(2, 0, &a), mq::StatusCode::kInvalidArgument, "dim"));
  REQUIRE(mq::HessianAccumulator<float>::create(2, 8, &a).ok());
  REQUIRE(mq::HessianAccumulator<float>::create(2, 9, &b).ok());
  const mq::Status st = a.merge(b);
  REQUIRE(fails_with(st, mq::StatusCode::kInvalidArgument, "other"));
  REQUIRE(mqtest::contains(st.message(), "dim 9"));
  const Batch bt = make_batch(10, 8, 2, -1, 3u);
  REQUIRE(fails_with(a.add(bt.x.data(), bt.n, 8, bt.ldx, bt.ids.data(), nullptr, 3), mq::StatusCode::kInvalidArgument,
                     "num_experts"));
  REQUIRE(a.counts()[0] == 0);
  mq::HessianAccumulator<float> empty;
  REQUIRE(!empty.add(bt.x.data(), bt.n, bt.ldx, bt.ids.data(), nullptr).ok());
}

TEST_CASE("bad inputs are errors naming the argument and leave H untouched", "[hessian]") {
  const int64_t E = 3, dim = 8;
  Batch b = make_batch(50, dim, E, -1, 19u);
  const std::vector<float> sentinel_h(E * dim * dim, 0.25f);
  auto run = [&](const Batch& bb, const float* w, int64_t n, int64_t d, int64_t ldx, int64_t experts, const char* word,
                 const char* where) {
    CAPTURE(word, where);
    std::vector<float> H = sentinel_h;
    std::vector<int64_t> counts(E, 5);
    std::vector<double> mass(E, 2.0);
    const mq::Status st =
        mq::accumulate_hessian<float>(bb.x.data(), n, d, ldx, bb.ids.data(), w, experts, H.data(), counts.data(), mass.data());
    INFO(st.to_string());
    REQUIRE(fails_with(st, mq::StatusCode::kInvalidArgument, word));
    REQUIRE(mqtest::contains(st.message(), where));
    REQUIRE(H == sentinel_h);
    REQUIRE(counts == std::vector<int64_t>(E, 5));
    REQUIRE(mass == std::vector<double>(E, 2.0));
  };
  {
    Batch bad = b;
    bad.ids[49] = 3;  // the last row: every earlier row is valid, nothing may be applied
    run(bad, bad.w.data(), bad.n, dim, bad.ldx, E, "expert_ids", "row 49");
    bad.ids[49] = -1;
    run(bad, bad.w.data(), bad.n, dim, bad.ldx, E, "expert_ids", "got -1");
  }
  {
    Batch bad = b;
    bad.w[40] = -0.5f;
    run(bad, bad.w.data(), bad.n, dim, bad.ldx, E, "weights", "row 40");
    bad.w[40] = std::numeric_limits<float>::infinity();
    run(bad, bad.w.data(), bad.n, dim, bad.ldx, E, "weights", "row 40");
  }
  {
    Batch bad = b;
    bad.x[45 * bad.ldx + 6] = std::numeric_limits<float>::quiet_NaN();
    run(bad, bad.w.data(), bad.n, dim, bad.ldx, E, "x:", "(45, 6)");
  }
  run(b, b.w.data(), b.n, 0, b.ldx, E, "dim", "got 0");
  run(b, b.w.data(), -1, dim, b.ldx, E, "n:", "got -1");
  run(b, b.w.data(), b.n, dim, dim - 1, E, "ldx", "got 7");
  run(b, b.w.data(), b.n, dim, b.ldx, 0, "num_experts", "got 0");
}

TEST_CASE("hessian accumulation is deterministic", "[hessian]") {
  const Batch b = make_batch(3000, 33, 3, -1, 23u);
  const auto a = accumulate<float, false>(b, true), c = accumulate<float, false>(b, true);
  REQUIRE(a.H == c.H);
  REQUIRE(a.mass == c.mass);
}

TEST_CASE("accumulation adds to what is there; n = 0 is a no-op, n = 1 a rank-1 update", "[hessian]") {
  const Batch b = make_batch(200, 10, 3, -1, 29u);
  Out<double> o(3, 10);
  for (int pass = 0; pass < 2; ++pass)
    REQUIRE(mq::accumulate_hessian<double>(b.x.data(), b.n, b.dim, b.ldx, b.ids.data(), b.w.data(), 3, o.H.data(),
                                           o.counts.data(), o.mass.data())
                .ok());
  const auto once = accumulate<double, true>(b, true);
  for (int64_t e = 0; e < 3; ++e) {
    REQUIRE(o.counts[e] == 2 * once.counts[e]);
    REQUIRE(o.mass[e] == Approx(2 * once.mass[e]).epsilon(1e-12));
  }
  std::vector<double> twice(once.H.size());
  for (size_t i = 0; i < twice.size(); ++i) twice[i] = 2 * once.H[i];
  REQUIRE(max_rel_diff(o.H, twice) <= kFp64RelTol);

  const auto before = o.H;
  REQUIRE(mq::accumulate_hessian<double>(nullptr, 0, 10, 10, nullptr, nullptr, 3, o.H.data(), o.counts.data(),
                                         o.mass.data())
              .ok());
  REQUIRE(o.H == before);

  Out<float> one(3, 10);
  REQUIRE(mq::accumulate_hessian<float>(b.x.data(), 1, b.dim, b.ldx, b.ids.data(), b.w.data(), 3, one.H.data(),
                                        one.counts.data(), one.mass.data())
              .ok());
  const int64_t e = b.ids[0];
  REQUIRE(one.counts[e] == 1);
  for (int64_t i = 0; i < 10; ++i)
    for (int64_t j = 0; j < 10; ++j)
      REQUIRE(one.H[(e * 10 + i) * 10 + j] ==
              Approx(static_cast<double>(b.w[0]) * b.x[i] * b.x[j]).epsilon(1e-6).margin(1e-12));
}
