// Tests of moequant/format.h: codec goldens (ties, subnormals, saturation, NaN, signed zeros), scale derivations,
// quantize / dequantize round trips on every format, block edges, packing goldens, the source decoders, Status errors.
#include <moequant/format.h>
#include <moequant/quant.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

namespace {

float f_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t u_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float next_up(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float next_down(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }
const float kInf = std::numeric_limits<float>::infinity();
const float kNan = std::numeric_limits<float>::quiet_NaN();

bool same_bits(float a, float b) { return u_of(a) == u_of(b); }

struct Quantized {
  std::vector<uint8_t> codes, scale_codes;
  std::vector<float> scales, deq;
  std::vector<int32_t> zeros;
  float global = 0.0f;
};

Quantized run_quantize(const std::vector<float>& w, int64_t rows, int64_t cols, const mq::Format& f,
                       const float* global_in = nullptr) {
  const int64_t ns = mq::scale_rows(f, rows) * mq::scale_cols(f, cols);
  Quantized q;
  q.codes.assign(static_cast<size_t>(rows * cols), 0xCD);
  q.deq.assign(static_cast<size_t>(rows * cols), kNan);
  q.scales.assign(static_cast<size_t>(ns), kNan);
  q.scale_codes.assign(static_cast<size_t>(ns), 0xCD);
  q.zeros.assign(static_cast<size_t>(ns), -99);
  mq::FloatMatrix m{w.data(), mq::ScaleDtype::kFloat32, rows, cols, cols};
  mq::FormatQuantized out{q.codes.data(), q.scales.data(), q.scale_codes.data(), q.zeros.data(), &q.global,
                          q.deq.data()};
  const mq::Status st = mq::format_quantize(m, f, global_in, out);
  INFO(st.to_string());
  REQUIRE(st.ok());
  return q;
}

std::vector<mq::Format> all_formats() {
  std::vector<mq::Format> fs = {mq::format_fp8_channel(), mq::format_fp8_channel(mq::ScaleDtype::kBFloat16),
                                mq::format_fp8_tensor(), mq::format_fp8_block(), mq::format_fp8_block(16, 8),
                                mq::format_nvfp4(), mq::format_mxfp4(), mq::format_mx(mq::ElementKind::kFp6E2M3),
                                mq::format_mx(mq::ElementKind::kFp6E3M2), mq::format_mx(mq::ElementKind::kFp8E4M3),
                                mq::format_int(4, true, 32), mq::format_int(3, false, -1, mq::ScaleDtype::kFloat16)};
  mq::Format fp4_channel = mq::format_mxfp4();
  fp4_channel.group = mq::GroupKind::kChannel;
  fp4_channel.scale = mq::ScaleKind::kFloat;
  fs.push_back(fp4_channel);
  mq::Format int_block = mq::format_int(8, false, 0);
  int_block.group = mq::GroupKind::kBlock;
  int_block.block_rows = 4;
  int_block.block_cols = 24;
  fs.push_back(int_block);
  return fs;
}

}  // namespace

// ---- FP8 E4M3 (float8_e4m3fn) -----------------------------------------------------------------------------------------

TEST_CASE("e4m3 encode goldens: zeros, normals, ties, saturation, NaN", "[format][codec]") {
  REQUIRE(mq::e4m3_encode(0.0f) == 0x00);
  REQUIRE(mq::e4m3_encode(-0.0f) == 0x80);
  REQUIRE(mq::e4m3_encode(1.0f) == 0x38);
  REQUIRE(mq::e4m3_encode(-1.0f) == 0xB8);
  REQUIRE(mq::e4m3_encode(448.0f) == 0x7E);
  REQUIRE(mq::e4m3_encode(-448.0f) == 0xFE);
  // 1.0625 is the midpoint of 1.0 (0x38, even) and 1.125 (0x39): ties to even; one ulp either side decides
  REQUIRE(mq::e4m3_encode(1.0625f) == 0x38);
  REQUIRE(mq::e4m3_encode(next_up(1.0625f)) == 0x39);
  REQUIRE(mq::e4m3_encode(next_down(1.0625f)) == 0x38);
  REQUIRE(mq::e4m3_encode(1.1875f) == 0x3A);  // midpoint of 0x39 and 0x3A (even)
  REQUIRE(mq::e4m3_encode(next_down(1.1875f)) == 0x39);
  // a mantissa carry into the exponent: 1.9375 is the midpoint of 1.875 (0x3F) and 2.0 (0x40)
  REQUIRE(mq::e4m3_encode(1.9375f) == 0x40);
  // saturation: 464 is the midpoint of 448 and 480 (which would be the NaN code): ties to even = 448; above it, +-inf
  // and any larger value saturate (torch >= 2.x, compressed-tensors' clamp, OCP satfinite)
  REQUIRE(mq::e4m3_encode(464.0f) == 0x7E);
  REQUIRE(mq::e4m3_encode(next_up(464.0f)) == 0x7E);
  REQUIRE(mq::e4m3_encode(480.0f) == 0x7E);
  REQUIRE(mq::e4m3_encode(1e30f) == 0x7E);
  REQUIRE(mq::e4m3_encode(kInf) == 0x7E);
  REQUIRE(mq::e4m3_encode(-kInf) == 0xFE);
  REQUIRE(mq::e4m3_encode(kNan) == 0x7F);
  REQUIRE(mq::e4m3_encode(f_of(0xFFC00000u)) == 0xFF);  // -NaN keeps its sign
}

TEST_CASE("e4m3 subnormals: 2^-9 steps, ties to even, the smallest normal", "[format][codec]") {
  const float u = std::ldexp(1.0f, -9);  // the smallest subnormal
  REQUIRE(mq::e4m3_encode(u) == 0x01);
  REQUIRE(mq::e4m3_encode(0.5f * u) == 0x00);           // tie between 0 and 1: even
  REQUIRE(mq::e4m3_encode(next_up(0.5f * u)) == 0x01);  // just above the tie
  REQUIRE(mq::e4m3_encode(1.5f * u) == 0x02);           // tie between 1 and 2: even
  REQUIRE(mq::e4m3_encode(2.5f * u) == 0x02);           // tie between 2 and 3: even
  REQUIRE(mq::e4m3_encode(7.0f * u) == 0x07);           // largest subnormal
  REQUIRE(mq::e4m3_encode(7.5f * u) == 0x08);           // tie between 7 (odd) and the smallest normal 2^-6
  REQUIRE(mq::e4m3_encode(std::ldexp(1.0f, -6)) == 0x08);
  REQUIRE(mq::e4m3_encode(std::numeric_limits<float>::denorm_min()) == 0x00);
  REQUIRE(mq::e4m3_encode(-std::numeric_limits<float>::denorm_min()) == 0x80);
  REQUIRE(mq::e4m3_decode(0x01) == u);
  REQUIRE(mq::e4m3_decode(0x07) == 7.0f * u);
  REQUIRE(mq::e4m3_decode(0x08) == std::ldexp(1.0f, -6));
}

TEST_CASE("e4m3 decode: every code, NaN codes, round trip", "[format][codec]") {
  REQUIRE(std::isnan(mq::e4m3_decode(0x7F)));
  REQUIRE(std::isnan(mq::e4m3_decode(0xFF)));
  REQUIRE(same_bits(mq::e4m3_decode(0x80), -0.0f));
  REQUIRE(mq::e4m3_decode(0x7E) == 448.0f);
  REQUIRE(mq::e4m3_decode(0xFE) == -448.0f);
  REQUIRE(mq::e4m3_decode(0x38) == 1.0f);
  REQUIRE(mq::e4m3_decode(0x39) == 1.125f);
  float prev = -1.0f;
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;
    const float v = mq::e4m3_decode(static_cast<uint8_t>(c));
    CAPTURE(c, v);
    REQUIRE(mq::e4m3_encode(v) == c);
    if (c < 0x7F) {  // positive codes increase strictly
      REQUIRE(v > prev);
      prev = v;
    }
  }
}

// ---- FP4 E2M1 ---------------------------------------------------------------------------------------------------------

TEST_CASE("e2m1 decode table and encode thresholds (compressed-tensors' cast_to_fp4)", "[format][codec]") {
  const float table[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  for (int c = 0; c < 16; ++c) {
    const float v = mq::e2m1_decode(static_cast<uint8_t>(c));
    REQUIRE(same_bits(v, c & 8 ? -table[c & 7] : table[c & 7]));
  }
  // ties to the even neighbour: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
  const float ties[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  const uint8_t tie_codes[7] = {0, 2, 2, 4, 4, 6, 6};
  const uint8_t above_codes[7] = {1, 2, 3, 4, 5, 6, 7};
  const uint8_t below_codes[7] = {0, 1, 2, 3, 4, 5, 6};
  for (int i = 0; i < 7; ++i) {
    CAPTURE(ties[i]);
    REQUIRE(mq::e2m1_encode(ties[i]) == tie_codes[i]);
    REQUIRE(mq::e2m1_encode(next_up(ties[i])) == above_codes[i]);
    REQUIRE(mq::e2m1_encode(next_down(ties[i])) == below_codes[i]);
    REQUIRE(mq::e2m1_encode(-ties[i]) == (tie_codes[i] | 8));
  }
  REQUIRE(mq::e2m1_encode(6.0f) == 7);
  REQUIRE(mq::e2m1_encode(6.5f) == 7);  // saturation
  REQUIRE(mq::e2m1_encode(kInf) == 7);
  REQUIRE(mq::e2m1_encode(-kInf) == 0xF);
  REQUIRE(mq::e2m1_encode(-100.0f) == 0xF);
  // signed zeros: a negative value rounding to zero keeps its sign; -0.0 itself encodes as +0 (compressed-tensors)
  REQUIRE(mq::e2m1_encode(-0.1f) == 0x8);
  REQUIRE(mq::e2m1_encode(-0.0f) == 0x0);
  REQUIRE(mq::e2m1_encode(std::numeric_limits<float>::denorm_min()) == 0x0);
}

// ---- FP6 E2M3 / E3M2 --------------------------------------------------------------------------------------------------

TEST_CASE("e2m3 goldens: subnormal steps of 1/8, max 7.5, saturation, signed zero", "[format][codec]") {
  REQUIRE(mq::e2m3_decode(0x01) == 0.125f);
  REQUIRE(mq::e2m3_decode(0x07) == 0.875f);
  REQUIRE(mq::e2m3_decode(0x08) == 1.0f);
  REQUIRE(mq::e2m3_decode(0x1F) == 7.5f);
  REQUIRE(mq::e2m3_decode(0x3F) == -7.5f);
  REQUIRE(same_bits(mq::e2m3_decode(0x20), -0.0f));
  REQUIRE(mq::e2m3_encode(0.0625f) == 0x00);  // tie 0 / 0.125
  REQUIRE(mq::e2m3_encode(0.1875f) == 0x02);  // tie 0.125 / 0.25
  REQUIRE(mq::e2m3_encode(7.25f) == 0x1E);    // tie 7.0 (0x1E, even) / 7.5
  REQUIRE(mq::e2m3_encode(next_up(7.25f)) == 0x1F);
  REQUIRE(mq::e2m3_encode(7.75f) == 0x1F);  // would round to 8: saturates
  REQUIRE(mq::e2m3_encode(-1e9f) == 0x3F);
  REQUIRE(mq::e2m3_encode(-0.0f) == 0x20);  // copysign keeps the sign (compressed-tensors' cast_to_fp6)
  REQUIRE(mq::e2m3_encode(-0.01f) == 0x20);
  for (int c = 0; c < 64; ++c) REQUIRE(mq::e2m3_encode(mq::e2m3_decode(static_cast<uint8_t>(c))) == c);
}

TEST_CASE("e3m2 goldens: subnormal steps of 1/16, max 28", "[format][codec]") {
  REQUIRE(mq::e3m2_decode(0x01) == 0.0625f);
  REQUIRE(mq::e3m2_decode(0x04) == 0.25f);  // smallest normal 2^(1-3)
  REQUIRE(mq::e3m2_decode(0x1F) == 28.0f);
  REQUIRE(mq::e3m2_encode(30.0f) == 0x1F);  // the midpoint of 28 and 32: saturates (32 does not exist)
  REQUIRE(mq::e3m2_encode(0.03125f) == 0x00);  // tie 0 / 1/16
  REQUIRE(mq::e3m2_encode(1.125f) == 0x0C);    // tie 1.0 (0x0C, even) / 1.25 (0x0D)
  REQUIRE(mq::e3m2_decode(0x0C) == 1.0f);
  for (int c = 0; c < 64; ++c) REQUIRE(mq::e3m2_encode(mq::e3m2_decode(static_cast<uint8_t>(c))) == c);
}

// ---- E8M0 -------------------------------------------------------------------------------------------------------------

TEST_CASE("e8m0: 2^(e-127), 0 is 2^-127, 0xFF NaN", "[format][codec]") {
  REQUIRE(mq::e8m0_decode(127) == 1.0f);
  REQUIRE(mq::e8m0_decode(128) == 2.0f);
  REQUIRE(mq::e8m0_decode(1) == std::ldexp(1.0f, -126));
  REQUIRE(mq::e8m0_decode(0) == std::ldexp(1.0f, -127));
  REQUIRE(mq::e8m0_decode(254) == std::ldexp(1.0f, 127));
  REQUIRE(std::isnan(mq::e8m0_decode(255)));
  for (int e = 0; e < 255; ++e) REQUIRE(mq::e8m0_encode(mq::e8m0_decode(static_cast<uint8_t>(e))) == e);
  REQUIRE(mq::e8m0_encode(3.0f) == 128);  // floor(log2 3) = 1
  REQUIRE(mq::e8m0_encode(0.0f) == 0);
  REQUIRE(mq::e8m0_encode(kNan) == 255);
}

TEST_CASE("e8m0_reciprocal: x * it is x / the scale, bit for bit", "[format][codec]") {
  std::mt19937 rng(7);
  std::vector<float> xs = {0.0f, -0.0f, kInf, -kInf, std::numeric_limits<float>::max(), f_of(1u), f_of(0x80000001u),
                           f_of(0x007FFFFFu), f_of(0x00800000u), 6.0f, -448.0f, 0.25f};
  for (int i = 0; i < 4000; ++i) xs.push_back(f_of(static_cast<uint32_t>(rng())));  // every exponent, both signs
  for (int e = 0; e < 255; ++e) {
    const float inv = mq::e8m0_reciprocal(static_cast<uint8_t>(e)), s = mq::e8m0_decode(static_cast<uint8_t>(e));
    REQUIRE(same_bits(inv, 1.0f / s));
    for (float x : xs) {
      if (std::isnan(x)) continue;
      INFO("e " << e << " x bits " << u_of(x));
      REQUIRE(same_bits(x * inv, x / s));
    }
  }
}

// Brute force: the code of the nearest representable magnitude, ties to the even code, saturating at max_mag.
uint32_t nearest_magnitude(float x, mq::MinifloatSpec s) {
  const double a = std::fabs(static_cast<double>(x));
  if (a >= mq::minifloat_decode_magnitude(s.max_mag, s)) return s.max_mag;  // saturation (and no double cancellation)
  uint32_t best = 0;
  double best_d = std::numeric_limits<double>::infinity();
  for (uint32_t m = 0; m <= s.max_mag; ++m) {
    const double d = std::fabs(a - static_cast<double>(mq::minifloat_decode_magnitude(m, s)));
    if (d < best_d || (d == best_d && (m & 1u) == 0)) best = m, best_d = d;
  }
  return best;
}

TEST_CASE("minifloat magnitudes: the nearest value, ties to even, against a brute-force search", "[format][codec]") {
  const mq::MinifloatSpec specs[] = {mq::spec_e4m3(), mq::spec_e2m1(), mq::spec_e2m3(), mq::spec_e3m2()};
  for (const auto& s : specs) {
    std::vector<float> xs = {0.0f, kInf, std::numeric_limits<float>::max(), f_of(1u)};
    // every magnitude code's value, the midpoints to the next, and their float neighbours
    for (uint32_t m = 0; m <= s.max_mag; ++m) {
      const float v = mq::minifloat_decode_magnitude(m, s);
      const float mid = m < s.max_mag ? 0.5f * (v + mq::minifloat_decode_magnitude(m + 1, s)) : 2.0f * v;
      for (float x : {v, mid}) xs.insert(xs.end(), {x, next_up(x), next_down(x)});
    }
    for (uint32_t u = 0; u < 0x7F800000u; u += 65521u) xs.push_back(f_of(u));  // a sweep of all exponents
    for (float x : xs) {
      if (!(x >= 0.0f)) continue;
      INFO("exp " << s.exp_bits << " man " << s.man_bits << " x bits " << u_of(x));
      REQUIRE(mq::minifloat_encode_magnitude(x, s) == nearest_magnitude(x, s));
      REQUIRE(mq::minifloat_encode_magnitude(-x, s) == nearest_magnitude(x, s));
    }
  }
}

TEST_CASE("MX scale exponent: compressed-tensors' round-to-power-of-two rule", "[format][scale]") {
  const int fp4 = static_cast<int>(mq::ElementKind::kFp4E2M1), fp6 = static_cast<int>(mq::ElementKind::kFp6E2M3);
  const int fp8 = static_cast<int>(mq::ElementKind::kFp8E4M3);
  REQUIRE(mq::mx_scale_exponent(fp4, 6.0f) == 127);             // 6 = 1.5 * 4 -> 4 -> 2^(2-2)
  REQUIRE(mq::mx_scale_exponent(fp4, next_down(7.0f)) == 127);  // fraction < 0.75 stays
  REQUIRE(mq::mx_scale_exponent(fp4, 7.0f) == 128);             // 1.75 * 4 rounds up to 8
  REQUIRE(mq::mx_scale_exponent(fp4, 1.0f) == 125);
  REQUIRE(mq::mx_scale_exponent(fp4, 0.0f) == 0);
  REQUIRE(mq::mx_scale_exponent(fp4, std::ldexp(1.0f, -130)) == 0);  // clamped at 0
  REQUIRE(mq::mx_scale_exponent(fp4, std::numeric_limits<float>::max()) == 253);  // 2^128's exponent (ct: 255)
  REQUIRE(mq::mx_scale_exponent(fp6, 7.5f) == 127);            // 1.875 * 4: fraction < 15/16 stays
  REQUIRE(mq::mx_scale_exponent(fp6, 7.75f) == 128);           // 1.9375 * 4 rounds up
  // 448 = 1.75 * 2^8 has fraction 0.75: compressed-tensors rounds it up to 2^9 for FP8 too (mantissa 1), e = 127 + 9 - 8
  REQUIRE(mq::mx_scale_exponent(fp8, 448.0f) == 128);
  REQUIRE(mq::mx_scale_exponent(fp8, 384.0f) == 127);  // 1.5 * 2^8 stays
}

// ---- scale derivations -------------------------------------------------------------------------------------------------

TEST_CASE("scale derivations per scale kind", "[format][scale]") {
  SECTION("NVFP4: global 2688 / amax, fp8 group scale amax / 6 * global, effective = fp8 / global") {
    const mq::FormatCore c = mq::format_nvfp4().core();
    REQUIRE(mq::global_scale_from_amax(c, 6.0f) == 448.0f);
    REQUIRE(mq::global_scale_from_amax(c, 0.0f) == 1.0f);  // 2688 / FLT_MIN overflows -> 1 (generate_gparam)
    const float g = mq::global_scale_from_amax(c, 12.0f);   // 224
    const mq::GroupParams p = mq::derive_group_params(c, -12.0f, 3.0f, g);
    REQUIRE(p.scale == 448.0f);
    REQUIRE(p.scale_code == 0x7E);
    REQUIRE(p.effective == 2.0f);
    const mq::GroupParams z = mq::derive_group_params(c, 0.0f, 0.0f, g);  // an all-zero group: FP8 eps 0.125
    REQUIRE(z.scale == 0.125f);
    REQUIRE(z.scale_code == 0x20);
    const mq::GroupParams tiny = mq::derive_group_params(c, 0.0f, 1e-3f, g);  // 1e-3 / 6 * 224 = 0.0373 -> e4m3
    REQUIRE(tiny.scale == mq::e4m3_decode(mq::e4m3_encode(1e-3f / 6.0f * g)));
    REQUIRE(tiny.effective == tiny.scale / g);
  }
  SECTION("FP8 float scales: amax / 448 rounded to the storage dtype, eps for a zero group") {
    mq::FormatCore c = mq::format_fp8_channel(mq::ScaleDtype::kBFloat16).core();
    const mq::GroupParams p = mq::derive_group_params(c, -1.0f, 0.5f, 1.0f);
    REQUIRE(p.scale == mq::round_to_bf16(1.0f / 448.0f));
    REQUIRE(mq::derive_group_params(c, 0.0f, 0.0f, 1.0f).scale == 0.0078125f);
    c.scale_dtype = 0;
    REQUIRE(mq::derive_group_params(c, 0.0f, 0.0f, 1.0f).scale == std::numeric_limits<float>::epsilon());
  }
  SECTION("int: identical to quant.h's qparams_from_range") {
    for (int bits : {2, 4, 8})
      for (bool sym : {false, true})
        for (auto sd : {mq::ScaleDtype::kFloat32, mq::ScaleDtype::kBFloat16, mq::ScaleDtype::kFloat16})
          for (auto [lo, hi] : {std::pair<float, float>{-1.3f, 0.7f}, {0.0f, 0.0f}, {0.2f, 5.0f}, {-3e-6f, -1e-7f}}) {
            mq::QuantSpec s;
            s.bits = bits;
            s.symmetric = sym;
            s.scale_dtype = sd;
            const mq::QParams want = mq::qparams_from_range(lo, hi, s);
            const mq::GroupParams got = mq::derive_group_params(mq::format_int(bits, sym, 8, sd).core(), lo, hi, 1.0f);
            REQUIRE(same_bits(got.scale, want.scale));
            REQUIRE(got.zero == want.zero);
          }
  }
}

// ---- quantize / dequantize ----------------------------------------------------------------------------------------------

TEST_CASE("int formats equal quant.h's quantize_rtn bit for bit", "[format][quantize]") {
  for (auto [rows, cols, gs] : {std::tuple<int64_t, int64_t, int64_t>{5, 64, 16}, {3, 96, 32}, {4, 37, -1}})
    for (int bits : {2, 4, 8})
      for (bool sym : {false, true}) {
        CAPTURE(rows, cols, gs, bits, sym);
        auto w = mqtest::random_matrix(rows, cols, 11u + static_cast<uint32_t>(bits));
        w[3] = 0.0f;
        mq::QuantSpec s;
        s.bits = bits;
        s.symmetric = sym;
        s.group_size = gs;
        const int64_t ng = mq::num_groups(s, cols);
        std::vector<int8_t> codes(rows * cols);
        std::vector<float> scales(rows * ng), dq(rows * cols);
        std::vector<int32_t> zeros(rows * ng);
        REQUIRE(mq::quantize_rtn({w.data(), rows, cols, cols}, s, {codes.data(), scales.data(), zeros.data(), dq.data()})
                    .ok());
        const Quantized q = run_quantize(w, rows, cols, mq::format_int(bits, sym, gs));
        for (int64_t i = 0; i < rows * cols; ++i) {
          REQUIRE(static_cast<int8_t>(q.codes[i]) == codes[i]);
          REQUIRE(same_bits(q.deq[i], dq[i]));
        }
        for (int64_t i = 0; i < rows * ng; ++i) {
          REQUIRE(same_bits(q.scales[i], scales[i]));
          REQUIRE(q.zeros[i] == zeros[i]);
        }
      }
}

TEST_CASE("every format: dequantize(quantize(w)) is the quantizer's dequantized output, within half a step",
          "[format][quantize]") {
  const int64_t rows = 37, cols = 72;  // not multiples of the 16 x 8 blocks, nor of 32 x 128
  auto w = mqtest::random_matrix(rows, cols, 5u);
  for (int64_t c = 0; c < cols; ++c) w[2 * cols + c] = 0.0f;            // an all-zero row
  for (int64_t c = 0; c < cols; ++c) w[5 * cols + c] *= 1e-30f;         // tiny values (FP8 / E8M0 underflow)
  for (int64_t c = 0; c < cols; ++c) w[6 * cols + c] *= 1e4f;           // large values
  w[7 * cols + 3] = -0.0f;
  for (const mq::Format& f : all_formats()) {
    CAPTURE(mq::element_kind_name(f.element), mq::group_kind_name(f.group), mq::scale_kind_name(f.scale));
    REQUIRE(mq::validate(f).ok());
    const Quantized q = run_quantize(w, rows, cols, f);
    const mq::FormatCore core = f.core();
    std::vector<float> back(rows * cols, kNan);
    const float* g = f.global_scale ? &q.global : nullptr;
    REQUIRE(mq::format_dequantize(q.codes.data(), rows, cols, q.scales.data(),
                                  f.element == mq::ElementKind::kInt ? q.zeros.data() : nullptr, g, f, back.data(),
                                  mq::ScaleDtype::kFloat32)
                .ok());
    const int64_t tr = mq::tile_rows(f, rows), tc = mq::tile_cols(f, cols), sc = mq::scale_cols(f, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const int64_t i = r * cols + c, s = (r / tr) * sc + c / tc;
        CAPTURE(r, c, w[i], q.deq[i], q.scales[s]);
        REQUIRE(same_bits(back[i], q.deq[i]));  // the loader's reconstruction is the quantizer's, bit for bit
        if (f.scale == mq::ScaleKind::kFp8E4M3) REQUIRE(mq::e4m3_decode(q.scale_codes[s]) == q.scales[s]);
        if (f.scale == mq::ScaleKind::kE8M0) REQUIRE(mq::e8m0_decode(q.scale_codes[s]) == q.scales[s]);
        if (f.scale == mq::ScaleKind::kE8M0 && r == 2) REQUIRE(q.scale_codes[s] == 0);  // all-zero row: 2^-127
        if (f.element == mq::ElementKind::kInt) continue;  // test_quant.cpp bounds the int error
        const float eff = f.global_scale ? q.scales[s] / q.global : q.scales[s];
        const float v = w[i] / eff;
        const float d = mq::decode_element(core.element, q.codes[i]);
        REQUIRE(same_bits(q.deq[i], d * eff));
        // half an ulp of the element at |v| (its binade, or the subnormal step), with saturation at the top
        const int man = f.element == mq::ElementKind::kFp4E2M1 ? 1 : (f.element == mq::ElementKind::kFp6E3M2 ? 2 : 3);
        const int bias = f.element == mq::ElementKind::kFp8E4M3 ? 7 : (f.element == mq::ElementKind::kFp6E3M2 ? 3 : 1);
        const float vmax = mq::element_max(core.element);
        const float a = std::min(std::fabs(v), vmax);
        const int e = std::max(a > 0 ? static_cast<int>(std::floor(std::log2(a))) : -1000, 1 - bias);
        const float half_ulp = std::ldexp(1.0f, e - man - 1);
        REQUIRE(std::fabs(std::fabs(d) - a) <= half_ulp * (1.0f + 1e-5f));
        if (std::fabs(v) > 0) REQUIRE((d == 0 || std::signbit(d) == std::signbit(v)));
      }
  }
}

TEST_CASE("FP8 blocks: partial edge blocks take the amax of their own elements", "[format][quantize]") {
  const int64_t rows = 300, cols = 200;  // blocks of 128: [3, 2] scales, edges of 44 rows and 72 columns
  auto w = mqtest::random_matrix(rows, cols, 9u);
  w[299 * cols + 199] = 1000.0f;  // only the bottom-right block sees it
  const mq::Format f = mq::format_fp8_block();
  const Quantized q = run_quantize(w, rows, cols, f);
  REQUIRE(q.scales.size() == 6);
  for (int64_t br = 0; br < 3; ++br)
    for (int64_t bc = 0; bc < 2; ++bc) {
      float amax = 0.0f;
      for (int64_t r = br * 128; r < std::min<int64_t>(rows, br * 128 + 128); ++r)
        for (int64_t c = bc * 128; c < std::min<int64_t>(cols, bc * 128 + 128); ++c)
          amax = std::max(amax, std::fabs(w[r * cols + c]));
      REQUIRE(q.scales[br * 2 + bc] == amax / 448.0f);
    }
  REQUIRE(q.codes[299 * cols + 199] == 0x7E);  // the block's absmax maps to 448 exactly
  // the DeepSeek decoder is format_dequantize of this format
  std::vector<float> out(rows * cols);
  REQUIRE(mq::decode_fp8_block_scaled(q.codes.data(), rows, cols, q.scales.data(), 128, 128, out.data(),
                                      mq::ScaleDtype::kFloat32)
              .ok());
  for (int64_t i = 0; i < rows * cols; ++i) REQUIRE(same_bits(out[i], q.deq[i]));
  std::vector<uint16_t> out16(rows * cols);
  REQUIRE(mq::decode_fp8_block_scaled(q.codes.data(), rows, cols, q.scales.data(), 128, 128, out16.data(),
                                      mq::ScaleDtype::kBFloat16)
              .ok());
  for (int64_t i = 0; i < rows * cols; ++i) REQUIRE(out16[i] == mq::bf16_bits_of(q.deq[i]));
}

TEST_CASE("NVFP4: a caller's global scale (fused gate/up) is used as given", "[format][quantize]") {
  const int64_t rows = 4, cols = 32;
  auto w = mqtest::random_matrix(rows, cols, 21u);
  const float g = 100.0f;
  const Quantized q = run_quantize(w, rows, cols, mq::format_nvfp4(), &g);
  REQUIRE(q.global == 100.0f);
  const Quantized own = run_quantize(w, rows, cols, mq::format_nvfp4());
  float amax = 0.0f;
  for (float v : w) amax = std::max(amax, std::fabs(v));
  const volatile float inv = 1.0f / amax;  // generate_gparam as torch computes it: amax.reciprocal() * 2688
  REQUIRE(own.global == inv * 2688.0f);
}

TEST_CASE("NVFP4: the global scale rounds like torch's 2688 / amax (reciprocal, then product)", "[format]") {
  const mq::FormatCore c = mq::format_nvfp4().core();
  // amax values where fl(2688 / a) != fl(fl(1 / a) * 2688): the global scale is the latter, compressed-tensors'
  int differ = 0;
  for (uint32_t bits = 0x3F800000u; bits < 0x3F800000u + 4096u; ++bits) {
    float a;
    std::memcpy(&a, &bits, sizeof a);
    const volatile float inv = 1.0f / a;
    const float want = inv * 2688.0f;
    REQUIRE(mq::global_scale_from_amax(c, a) == want);
    const volatile float one_division = 2688.0f / a;
    differ += one_division != want;
  }
  REQUIRE(differ > 0);  // the two roundings matter
}

TEST_CASE("bfloat16 input is widened exactly", "[format][quantize]") {
  const int64_t rows = 3, cols = 48;
  auto w = mqtest::random_matrix(rows, cols, 3u);
  std::vector<uint16_t> wb(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    wb[i] = mq::bf16_bits_of(w[i]);
    w[i] = mq::float_of_bf16_bits(wb[i]);
  }
  const mq::Format f = mq::format_mxfp4();
  const Quantized ref = run_quantize(w, rows, cols, f);
  std::vector<uint8_t> codes(rows * cols);
  std::vector<float> deq(rows * cols);
  mq::FormatQuantized out;
  out.codes = codes.data();
  out.dequantized = deq.data();
  REQUIRE(mq::format_quantize({wb.data(), mq::ScaleDtype::kBFloat16, rows, cols, cols}, f, nullptr, out).ok());
  REQUIRE(codes == ref.codes);
  for (size_t i = 0; i < deq.size(); ++i) REQUIRE(same_bits(deq[i], ref.deq[i]));
}

// ---- packing ----------------------------------------------------------------------------------------------------------

TEST_CASE("FP4 / FP6 / FP8 packing goldens and round trips", "[format][pack]") {
  // FP4: the low nibble is the even element (compressed-tensors pack_fp4_to_uint8, gpt-oss blocks)
  const std::vector<uint8_t> c4 = {0x1, 0x2, 0xF, 0x8, 0x7};
  std::vector<uint8_t> p4(3, 0xAA);
  REQUIRE(mq::pack_codes(c4.data(), 1, 5, mq::ElementKind::kFp4E2M1, p4.data()).ok());
  REQUIRE(p4 == std::vector<uint8_t>{0x21, 0x8F, 0x07});  // odd row: a zero high nibble
  std::vector<uint8_t> u4(5);
  REQUIRE(mq::unpack_codes(p4.data(), 1, 5, mq::ElementKind::kFp4E2M1, u4.data()).ok());
  REQUIRE(u4 == c4);
  // FP6: c0 | c1 << 6 | c2 << 12 | c3 << 18 as three little-endian bytes
  const std::vector<uint8_t> c6 = {0x3F, 0x00, 0x01, 0x20, 0x15};
  std::vector<uint8_t> p6(6, 0xAA);
  REQUIRE(mq::packed_row_bytes(mq::ElementKind::kFp6E2M3, 5) == 6);
  REQUIRE(mq::pack_codes(c6.data(), 1, 5, mq::ElementKind::kFp6E2M3, p6.data()).ok());
  const uint32_t word = 0x3Fu | (0x00u << 6) | (0x01u << 12) | (0x20u << 18);
  REQUIRE(p6 == std::vector<uint8_t>{static_cast<uint8_t>(word & 0xFF), static_cast<uint8_t>((word >> 8) & 0xFF),
                                     static_cast<uint8_t>(word >> 16), 0x15, 0x00, 0x00});
  std::vector<uint8_t> u6(5);
  REQUIRE(mq::unpack_codes(p6.data(), 1, 5, mq::ElementKind::kFp6E3M2, u6.data()).ok());
  REQUIRE(u6 == c6);
  // random round trips, several rows
  std::mt19937 gen(7);
  for (auto k : {mq::ElementKind::kFp4E2M1, mq::ElementKind::kFp6E2M3, mq::ElementKind::kFp8E4M3})
    for (int64_t cols : {1, 2, 3, 4, 7, 64, 65}) {
      const int64_t rows = 3;
      const int b = k == mq::ElementKind::kFp4E2M1 ? 4 : (k == mq::ElementKind::kFp8E4M3 ? 8 : 6);
      std::vector<uint8_t> codes(rows * cols);
      for (auto& c : codes) c = static_cast<uint8_t>(gen() & ((1u << b) - 1u));
      std::vector<uint8_t> packed(rows * mq::packed_row_bytes(k, cols)), back(rows * cols);
      REQUIRE(mq::pack_codes(codes.data(), rows, cols, k, packed.data()).ok());
      REQUIRE(mq::unpack_codes(packed.data(), rows, cols, k, back.data()).ok());
      REQUIRE(back == codes);
    }
}

// ---- source decoders ------------------------------------------------------------------------------------------------

TEST_CASE("gpt-oss MXFP4 blocks: low nibble first, 2^(e - 127), NaN scale", "[format][decode]") {
  std::vector<uint8_t> blocks(2 * 16, 0);
  blocks[0] = 0x21;   // elements 0, 1 = 0.5, 1.0
  blocks[15] = 0xF7;  // elements 30, 31 = 6, -6
  blocks[16] = 0x80;  // block 1: element 0 = +0, element 1 = -0
  const std::vector<uint8_t> scales = {128, 0};
  std::vector<float> out(64, kNan);
  REQUIRE(mq::decode_mxfp4_blocks(blocks.data(), scales.data(), 2, 1, out.data(), mq::ScaleDtype::kFloat32).ok());
  REQUIRE(out[0] == 1.0f);
  REQUIRE(out[1] == 2.0f);
  REQUIRE(out[30] == 12.0f);
  REQUIRE(out[31] == -12.0f);
  REQUIRE(same_bits(out[32], 0.0f));
  REQUIRE(same_bits(out[33], -0.0f));
  const std::vector<uint8_t> nan_scale = {255, 255};
  REQUIRE(mq::decode_mxfp4_blocks(blocks.data(), nan_scale.data(), 2, 1, out.data(), mq::ScaleDtype::kFloat32).ok());
  for (float v : out) REQUIRE(std::isnan(v));
}

// ---- errors ---------------------------------------------------------------------------------------------------------

TEST_CASE("validate names the field, the expected and the actual value", "[format][errors]") {
  mq::Format f = mq::format_int(9, true, 32);
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kInvalidArgument, "bits: expected an integer in [2, 8]"));
  f = mq::format_nvfp4();
  f.bits = 8;
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kInvalidArgument, "bits: expected 4 for fp4_e2m1"));
  f = mq::format_mxfp4();
  f.group_size = 0;
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kInvalidArgument, "group_size: expected > 0"));
  f = mq::format_fp8_block(128, 0);
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kInvalidArgument, "block_rows, block_cols: expected > 0"));
  f = mq::format_mxfp4();
  f.global_scale = true;
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kNotSupported, "global_scale: expected only with fp8_e4m3"));
  f = mq::format_int(4, true, 32);
  f.scale = mq::ScaleKind::kE8M0;
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kNotSupported, "scale: expected float (0) for int"));
  f = mq::format_fp8_channel();
  f.symmetric = false;
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kNotSupported, "symmetric: expected true"));
  f = mq::format_fp8_channel();
  f.element = static_cast<mq::ElementKind>(7);
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kInvalidArgument, "element: expected 0 (int)"));
  f = mq::format_fp8_channel();
  f.scale_dtype = static_cast<mq::ScaleDtype>(3);
  REQUIRE(fails_with(mq::validate(f), mq::StatusCode::kInvalidArgument, "scale_dtype: expected 0 (float32)"));
}

TEST_CASE("matrix functions report bad inputs", "[format][errors]") {
  std::vector<float> w = {1.0f, 2.0f, kNan, 4.0f, kInf, 6.0f};
  mq::FormatQuantized out;
  const mq::FloatMatrix m{w.data(), mq::ScaleDtype::kFloat32, 2, 3, 3};
  REQUIRE(fails_with(mq::format_quantize(m, mq::format_fp8_channel(), nullptr, out), mq::StatusCode::kInvalidArgument,
                     "w: expected finite values, got NaN at (0, 2)"));
  w[2] = 3.0f;
  REQUIRE(fails_with(mq::format_quantize(m, mq::format_fp8_channel(), nullptr, out), mq::StatusCode::kInvalidArgument,
                     "w: expected finite values, got Inf at (1, 1)"));
  w[4] = 5.0f;
  const float bad_g = -1.0f;
  REQUIRE(fails_with(mq::format_quantize(m, mq::format_nvfp4(), &bad_g, out), mq::StatusCode::kInvalidArgument,
                     "global_scale: expected a finite value > 0, got -1"));
  REQUIRE(fails_with(mq::format_quantize({w.data(), mq::ScaleDtype::kFloat32, 2, 3, 2}, mq::format_fp8_channel(),
                                         nullptr, out),
                     mq::StatusCode::kInvalidArgument, "ld: expected >= cols=3, got 2"));
  std::vector<uint8_t> codes = {0x10, 0, 0, 0};
  std::vector<uint8_t> packed(2);
  REQUIRE(fails_with(mq::pack_codes(codes.data(), 1, 4, mq::ElementKind::kFp4E2M1, packed.data()),
                     mq::StatusCode::kInvalidArgument, "codes: expected fp4_e2m1 codes in [0, 15], got 16 at (0, 0)"));
  REQUIRE(fails_with(mq::pack_codes(codes.data(), 1, 4, mq::ElementKind::kInt, packed.data()),
                     mq::StatusCode::kNotSupported, "element: expected a float element"));
  std::vector<float> scales = {1.0f}, o(4);
  REQUIRE(fails_with(mq::format_dequantize(codes.data(), 1, 4, scales.data(), nullptr, nullptr, mq::format_nvfp4(),
                                           o.data(), mq::ScaleDtype::kFloat32),
                     mq::StatusCode::kInvalidArgument, "global_scale: expected the global scale"));
  REQUIRE(fails_with(mq::format_dequantize(codes.data(), 1, 4, scales.data(), nullptr, nullptr,
                                           mq::format_fp8_tensor(), o.data(), mq::ScaleDtype::kFloat16),
                     mq::StatusCode::kInvalidArgument, "out_dtype: expected 0 (float32) or 1 (bfloat16), got 2"));
  REQUIRE(fails_with(mq::decode_fp8_block_scaled(codes.data(), 1, 4, scales.data(), 0, 128, o.data(),
                                                 mq::ScaleDtype::kFloat32),
                     mq::StatusCode::kInvalidArgument, "block_size: expected two values > 0, got [0, 128]"));
}
