// Tests of moequant/pack.h: compressed-tensors pack-quantized goldens and round trips.
#include <moequant/pack.h>

#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

namespace {

std::vector<int32_t> pack(const std::vector<int8_t>& q, int bits) {
  std::vector<int32_t> out(mq::packed_words(static_cast<int64_t>(q.size()), bits), 0x5A5A5A5A);  // poisoned
  REQUIRE(mq::pack_codes(q.data(), static_cast<int64_t>(q.size()), 1, bits, out.data(), 1).ok());
  return out;
}

std::vector<int8_t> random_codes(int64_t n, int bits, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(mq::qmin_for(bits), mq::qmax_for(bits));
  std::vector<int8_t> q(static_cast<size_t>(n));
  for (auto& v : q) v = static_cast<int8_t>(dist(gen));
  return q;
}

}  // namespace

TEST_CASE("4-bit goldens", "[pack]") {
  REQUIRE(pack({-8, -7, -6, -5, -4, -3, -2, -1}, 4) == std::vector<int32_t>{0x76543210});
  REQUIRE(pack({0, 1, 2, 3, 4, 5, 6, 7}, 4) == std::vector<int32_t>{static_cast<int32_t>(0xFEDCBA98u)});
  REQUIRE(pack({0, 0, 0, 0, 0, 0, 0, 0}, 4) == std::vector<int32_t>{static_cast<int32_t>(0x88888888u)});
  // a partial word: the tail bits are zero
  REQUIRE(pack({-8, 7, 0}, 4) == std::vector<int32_t>{0x000008F0});
}

TEST_CASE("8-bit and 2-bit goldens", "[pack]") {
  REQUIRE(pack({-128, -1, 0, 127}, 8) == std::vector<int32_t>{static_cast<int32_t>(0xFF807F00u)});
  REQUIRE(pack({1, 0, -1, -2, 1, 0, -1, -2}, 8) ==
          std::vector<int32_t>{static_cast<int32_t>(0x7E7F8081u), static_cast<int32_t>(0x7E7F8081u)});
  std::vector<int8_t> q2;
  for (int k = 0; k < 16; ++k) q2.push_back(static_cast<int8_t>(k % 4 - 2));  // u = 0,1,2,3,...
  REQUIRE(pack(q2, 2) == std::vector<int32_t>{static_cast<int32_t>(0xE4E4E4E4u)});
}

TEST_CASE("cross-word straddles of 3/5/6/7-bit codes", "[pack]") {
  // 3 bits: element 10 occupies stream bits 30..32, i.e. two bits of word 0 and one bit of word 1.
  std::vector<int8_t> q(37, static_cast<int8_t>(mq::qmin_for(3)));  // u = 0 everywhere
  q[10] = static_cast<int8_t>(mq::qmax_for(3));                      // u = 7
  const auto p = pack(q, 3);
  REQUIRE(p.size() == 4);  // ceil(37 * 3 / 32)
  REQUIRE(p == std::vector<int32_t>{static_cast<int32_t>(0xC0000000u), 1, 0, 0});
  // 5 bits: element 6 occupies bits 30..34.
  std::vector<int8_t> q5(7, static_cast<int8_t>(mq::qmin_for(5)));
  q5[6] = static_cast<int8_t>(mq::qmax_for(5));  // u = 31
  REQUIRE(pack(q5, 5) == std::vector<int32_t>{static_cast<int32_t>(0xC0000000u), 0x7});
}

TEST_CASE("3/5/6/7-bit round trips on odd lengths", "[pack]") {
  for (int bits : {2, 3, 4, 5, 6, 7, 8})
    for (int64_t n : {1, 5, 31, 37, 64, 101}) {
      CAPTURE(bits, n);
      const auto q = random_codes(n, bits, static_cast<uint32_t>(bits * 1000 + n));
      const auto p = pack(q, bits);
      REQUIRE(static_cast<int64_t>(p.size()) == (n * bits + 31) / 32);
      const int64_t used = n * bits - 32 * (static_cast<int64_t>(p.size()) - 1);  // bits used in the last word
      if (used < 32) REQUIRE((static_cast<uint32_t>(p.back()) >> used) == 0u);  // zero tail
      std::vector<int8_t> back(static_cast<size_t>(n), 99);
      REQUIRE(mq::unpack_codes(p.data(), n, 1, bits, back.data(), 1).ok());
      REQUIRE(back == q);
    }
}

TEST_CASE("pack_rows / unpack_rows round trip", "[pack]") {
  const int64_t rows = 5, cols = 37;
  for (int bits : {3, 4, 7}) {
    const auto q = random_codes(rows * cols, bits, 77u + bits);
    std::vector<int32_t> p(rows * mq::packed_words(cols, bits));
    REQUIRE(mq::pack_rows(q.data(), rows, cols, bits, p.data()).ok());
    for (int64_t r = 0; r < rows; ++r) {  // each row packs on its own
      const std::vector<int8_t> row(q.begin() + r * cols, q.begin() + (r + 1) * cols);
      const auto pr = pack(row, bits);
      REQUIRE(std::vector<int32_t>(p.begin() + r * pr.size(), p.begin() + (r + 1) * pr.size()) == pr);
    }
    std::vector<int8_t> back(rows * cols);
    REQUIRE(mq::unpack_rows(p.data(), rows, cols, bits, back.data()).ok());
    REQUIRE(back == q);
  }
}

TEST_CASE("zero points pack along the output dimension", "[pack]") {
  const int64_t out_rows = 37, groups = 3;
  for (int bits : {2, 4, 5, 8}) {
    CAPTURE(bits);
    const auto zp = random_codes(out_rows * groups, bits, 9u + bits);
    std::vector<int32_t> p(mq::packed_words(out_rows, bits) * groups);
    REQUIRE(mq::pack_columns(zp.data(), out_rows, groups, bits, p.data()).ok());
    std::vector<int8_t> back(out_rows * groups);
    REQUIRE(mq::unpack_columns(p.data(), out_rows, groups, bits, back.data()).ok());
    REQUIRE(back == zp);
  }
  // golden: column g holds -8..-1 in its first 8 rows -> word (0, g) = 0x76543210
  std::vector<int8_t> zp(8 * 2);
  for (int r = 0; r < 8; ++r) {
    zp[r * 2 + 0] = static_cast<int8_t>(r - 8);
    zp[r * 2 + 1] = 0;
  }
  std::vector<int32_t> p(2);
  REQUIRE(mq::pack_columns(zp.data(), 8, 2, 4, p.data()).ok());
  REQUIRE(p[0] == 0x76543210);
  REQUIRE(p[1] == static_cast<int32_t>(0x88888888u));
}

TEST_CASE("out-of-range codes and bad widths are errors", "[pack]") {
  std::vector<int32_t> out(4);
  const std::vector<int8_t> q = {0, 1, 8, 2};  // 8 is outside [-8, 7]
  const mq::Status st = mq::pack_codes(q.data(), 4, 1, 4, out.data(), 1);
  REQUIRE(fails_with(st, mq::StatusCode::kInvalidArgument, "q:"));
  REQUIRE(mqtest::contains(st.message(), "element 2"));
  const std::vector<int8_t> neg = {-3};  // below qmin of 2 bits
  REQUIRE(fails_with(mq::pack_codes(neg.data(), 1, 1, 2, out.data(), 1), mq::StatusCode::kInvalidArgument, "q:"));
  for (int bits : {1, 9})
    REQUIRE(fails_with(mq::pack_codes(q.data(), 2, 1, bits, out.data(), 1), mq::StatusCode::kInvalidArgument, "bits"));
  std::vector<int8_t> back(4);
  REQUIRE(fails_with(mq::unpack_rows(out.data(), 1, 4, 9, back.data()), mq::StatusCode::kInvalidArgument, "bits"));
}
