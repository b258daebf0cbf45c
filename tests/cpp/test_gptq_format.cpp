// Tests of moequant/gptq_format.h (GPTQ for every weight format) against its scalar twin
// moequant/ref/gptq_format_ref.h, against RTN (format_quantize) and against the int solver.
#include <moequant/format.h>
#include <moequant/gptq.h>
#include <moequant/gptq_format.h>
#include <moequant/ref/gptq_format_ref.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "test_util.h"

namespace mq = moequant;
using mqtest::fails_with;

// With the solver's factor (GptqRefFactor::kSolver) the twin computes everything after U on its own and must agree bit
// for bit; only the loss is summed in another order (quadratic_loss vs the plain triple loop).
constexpr double kLossSumRelTol = 1e-10;
// With its textbook factor U differs in the last bits: the int twins' policy (tests/cpp/test_gptq.cpp).
constexpr double kMinCodeAgreement = 0.99;
constexpr double kLossRelTol = 1e-3;

namespace {

/// H = X^T X / n for X with correlated, unevenly scaled columns (row-major [cols, cols], double).
std::vector<double> correlated_hessian(int64_t cols, int64_t n, uint32_t seed) {
  const int64_t k = std::max<int64_t>(2, cols / 4);
  const auto z = mqtest::random_matrix(n, k, seed), a = mqtest::random_matrix(k, cols, seed + 1),
             noise = mqtest::random_matrix(n, cols, seed + 2, 0.1f);
  std::vector<double> x(n * cols, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      double v = noise[i * cols + j];
      for (int64_t l = 0; l < k; ++l) v += z[i * k + l] * a[l * cols + j];
      x[i * cols + j] = v * (0.3 + 1.7 * ((j * 37) % cols) / static_cast<double>(cols));
    }
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t a1 = 0; a1 < cols; ++a1)
      for (int64_t b1 = 0; b1 <= a1; ++b1) h[a1 * cols + b1] += x[i * cols + a1] * x[i * cols + b1];
  for (int64_t a1 = 0; a1 < cols; ++a1)
    for (int64_t b1 = 0; b1 <= a1; ++b1) h[b1 * cols + a1] = h[a1 * cols + b1] /= static_cast<double>(n);
  return h;
}

struct Named {
  const char* name;
  mq::Format f;
};

mq::Format fp8_block(int64_t r, int64_t c, mq::ScaleDtype d = mq::ScaleDtype::kFloat32) {
  return mq::format_fp8_block(r, c, d);
}

/// Every float preset, odd block / group shapes, every scale kind and dtype, and the int layouts of the engine.
std::vector<Named> all_formats() {
  mq::Format int_tensor = mq::format_int(4, true, -1);
  int_tensor.group = mq::GroupKind::kTensor;
  mq::Format int_block = mq::format_int(3, false, -1, mq::ScaleDtype::kBFloat16);
  int_block.group = mq::GroupKind::kBlock;
  int_block.block_rows = 4;
  int_block.block_cols = 24;
  mq::Format int_ragged = mq::format_int(4, false, 48);  // 48 divides none of the test widths below
  mq::Format fp4_float = mq::format_mx(mq::ElementKind::kFp4E2M1);
  fp4_float.scale = mq::ScaleKind::kFloat;
  fp4_float.scale_dtype = mq::ScaleDtype::kBFloat16;
  fp4_float.group_size = 16;
  mq::Format e3m2_fp8 = mq::format_mx(mq::ElementKind::kFp6E3M2);
  e3m2_fp8.scale = mq::ScaleKind::kFp8E4M3;
  return {
      {"fp8_channel", mq::format_fp8_channel()},
      {"fp8_channel_bf16", mq::format_fp8_channel(mq::ScaleDtype::kBFloat16)},
      {"fp8_tensor", mq::format_fp8_tensor()},
      {"fp8_tensor_fp16", mq::format_fp8_tensor(mq::ScaleDtype::kFloat16)},
      {"fp8_block_128", fp8_block(128, 128)},
      {"fp8_block_5x24", fp8_block(5, 24)},
      {"nvfp4", mq::format_nvfp4()},
      {"mxfp4", mq::format_mxfp4()},
      {"mxfp6_e2m3", mq::format_mx(mq::ElementKind::kFp6E2M3)},
      {"mxfp6_e3m2", mq::format_mx(mq::ElementKind::kFp6E3M2)},
      {"mxfp8", mq::format_mx(mq::ElementKind::kFp8E4M3)},
      {"fp4_bf16_group16", fp4_float},
      {"e3m2_fp8_scales", e3m2_fp8},
      {"int4_tensor", int_tensor},
      {"int3_block_4x24", int_block},
      {"int4_group48_ragged", int_ragged},
  };
}

struct Out {
  mq::Status status;
  std::vector<uint8_t> codes, scale_codes;
  std::vector<float> scales, dq;
  std::vector<int32_t> zeros;
  float global = -1.0f;
  mq::GptqReport report;
};

enum class Solver { kFast, kRefSolverFactor, kRefTextbook };

template <typename HT>
Out solve(Solver which, const std::vector<float>& w, int64_t rows, int64_t cols, const std::vector<HT>& h,
          const mq::GptqFormatArgs& a, const float* g = nullptr) {
  // (an invalid format has no scale shape: its tile sizes may be 0)
  const int64_t ns =
      mq::validate(a.format).ok() ? mq::scale_rows(a.format, rows) * mq::scale_cols(a.format, cols) : 1;
  Out o;
  o.codes.assign(rows * cols, 0xAB);
  o.dq.assign(rows * cols, -7.0f);
  o.scales.assign(ns, -7.0f);
  o.scale_codes.assign(ns, 0xAB);
  o.zeros.assign(ns, -99);
  mq::FormatQuantized out;
  out.codes = o.codes.data();
  out.scales = o.scales.data();
  out.scale_codes = o.scale_codes.data();
  out.zeros = o.zeros.data();
  out.global_scale = &o.global;
  out.dequantized = o.dq.data();
  const mq::MatrixView wv{w.data(), rows, cols, cols};
  switch (which) {
    case Solver::kFast: o.status = mq::gptq_solve_format<HT>(wv, h.data(), cols, a, g, out, &o.report); break;
    case Solver::kRefSolverFactor:
      o.status = mq::gptq_solve_format_ref<HT>(wv, h.data(), cols, a, g, out, &o.report, mq::GptqRefFactor::kSolver);
      break;
    case Solver::kRefTextbook:
      o.status = mq::gptq_solve_format_ref<HT>(wv, h.data(), cols, a, g, out, &o.report, mq::GptqRefFactor::kTextbook);
      break;
  }
  return o;
}

/// Everything but the loss bit for bit; the losses to their summation order.
void require_identical(const Out& a, const Out& b) {
  REQUIRE(a.codes == b.codes);
  REQUIRE(a.scales == b.scales);
  REQUIRE(a.scale_codes == b.scale_codes);
  REQUIRE(a.zeros == b.zeros);
  REQUIRE(a.global == b.global);
  REQUIRE(a.dq == b.dq);
  REQUIRE(a.report.escalations == b.report.escalations);
  REQUIRE(a.report.dead_columns == b.report.dead_columns);
  REQUIRE(a.report.damp_value == b.report.damp_value);
  REQUIRE(std::fabs(a.report.loss - b.report.loss) <= kLossSumRelTol * std::max(b.report.loss, 1e-300));
}

double agreement(const Out& a, const Out& b) {
  int64_t same = 0;
  for (size_t i = 0; i < a.codes.size(); ++i) same += a.codes[i] == b.codes[i];
  return static_cast<double>(same) / static_cast<double>(a.codes.size());
}

/// RTN (format_quantize) of w: its dequantized weight and outputs.
Out rtn(const std::vector<float>& w, int64_t rows, int64_t cols, const mq::Format& f, const float* g = nullptr) {
  Out o;
  const int64_t ns = mq::scale_rows(f, rows) * mq::scale_cols(f, cols);
  o.codes.assign(rows * cols, 0);
  o.dq.assign(rows * cols, 0.0f);
  o.scales.assign(ns, 0.0f);
  o.scale_codes.assign(ns, 0);
  o.zeros.assign(ns, 0);
  mq::FormatQuantized out;
  out.codes = o.codes.data();
  out.scales = o.scales.data();
  out.scale_codes = o.scale_codes.data();
  out.zeros = o.zeros.data();
  out.global_scale = &o.global;
  out.dequantized = o.dq.data();
  o.status = mq::format_quantize(mq::FloatMatrix{w.data(), mq::ScaleDtype::kFloat32, rows, cols, cols}, f, g, out);
  return o;
}

mq::GptqFormatArgs args_of(const mq::Format& f, bool act, int64_t block) {
  mq::GptqFormatArgs a;
  a.format = f;
  a.act_order = act;
  a.block_size = block;
  return a;
}

/// A weight with the awkward values: exact ties of the FP4 / int grids relative to a power-of-two group absmax, zeros,
/// -0.0, tiny (subnormal-scale) groups, one huge outlier per row and ordinary normal values.
std::vector<float> adversarial_matrix(int64_t rows, int64_t cols, uint32_t seed) {
  auto w = mqtest::random_matrix(rows, cols, seed);
  const float ties[] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f, 6.0f, -0.25f, -2.5f, -5.0f, 0.0f, -0.0f};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t k = (r * 131 + c * 7) % 17;
      if (k < 13) w[r * cols + c] = ties[k];
      if (r % 5 == 3) w[r * cols + c] *= 1e-30f;  // subnormal-range scales
      if (r % 7 == 2 && c == (r * 3) % cols) w[r * cols + c] = 3e4f;
      if (r % 11 == 4) w[r * cols + c] = 0.0f;
    }
  return w;
}

}  // namespace

TEST_CASE("gptq_solve_format equals its scalar twin bit for bit on every format", "[gptq_format]") {
  struct Shape {
    int64_t rows, cols, block;
  };
  // awkward: a single row / column, widths that are no multiple of 16 / 32 / 128, blocks larger than the matrix
  const Shape shapes[] = {{13, 200, 64}, {1, 97, 1000}, {9, 1, 128}, {140, 150, 37}};
  int idx = 0;
  for (const Named& nf : all_formats())
    for (const Shape& sh : shapes)
      for (bool act : {false, true})
        for (int kind = 0; kind < 3; ++kind) {  // random, adversarial, dead columns + adversarial
          ++idx;
          CAPTURE(nf.name, sh.rows, sh.cols, sh.block, act, kind);
          const auto w = kind == 0 ? mqtest::random_matrix(sh.rows, sh.cols, 300u + idx)
                                   : adversarial_matrix(sh.rows, sh.cols, 300u + idx);
          auto h = correlated_hessian(sh.cols, 2 * sh.cols + 3, 500u + idx);
          if (kind == 2)
            for (int64_t d : {int64_t{0}, sh.cols / 2, sh.cols - 1})
              for (int64_t j = 0; j < sh.cols; ++j) h[d * sh.cols + j] = h[j * sh.cols + d] = 0.0;
          const auto a = args_of(nf.f, act, sh.block);
          const Out fast = solve(Solver::kFast, w, sh.rows, sh.cols, h, a);
          const Out ref = solve(Solver::kRefSolverFactor, w, sh.rows, sh.cols, h, a);
          INFO(fast.status.to_string() << " / " << ref.status.to_string());
          REQUIRE(fast.status.ok());
          REQUIRE(ref.status.ok());
          require_identical(fast, ref);
          if (kind == 2) {
            REQUIRE(fast.report.dead_columns == (sh.cols == 1 ? 1 : 3));
            for (int64_t r = 0; r < sh.rows; ++r) REQUIRE(fast.dq[r * sh.cols + sh.cols / 2] == 0.0f);
          }
          REQUIRE(fast.report.loss == mq::quadratic_loss<double>({w.data(), sh.rows, sh.cols, sh.cols}, fast.dq.data(),
                                                                 h.data(), sh.cols));
        }
}

TEST_CASE("gptq_solve_format: scales are RTN's of the dead-zeroed weight, and dequantized == format_dequantize",
          "[gptq_format]") {
  const int64_t rows = 24, cols = 160;
  const auto w = mqtest::random_matrix(rows, cols, 41u);
  auto h = correlated_hessian(cols, 400, 42u);
  for (int64_t j = 0; j < cols; ++j) h[9 * cols + j] = h[j * cols + 9] = 0.0;
  auto w0 = w;
  for (int64_t r = 0; r < rows; ++r) w0[r * cols + 9] = 0.0f;
  for (const Named& nf : all_formats()) {
    if (mq::gptq_format_uses_int_solver(nf.f, cols)) continue;
    for (bool act : {false, true}) {
      CAPTURE(nf.name, act);
      const Out g = solve(Solver::kFast, w, rows, cols, h, args_of(nf.f, act, 128));
      REQUIRE(g.status.ok());
      const Out r = rtn(w0, rows, cols, nf.f);
      REQUIRE(r.status.ok());
      REQUIRE(g.scales == r.scales);
      REQUIRE(g.scale_codes == r.scale_codes);
      REQUIRE(g.zeros == r.zeros);
      if (nf.f.global_scale) REQUIRE(g.global == r.global);
      std::vector<float> again(rows * cols);
      REQUIRE(mq::format_dequantize(g.codes.data(), rows, cols, g.scales.data(), g.zeros.data(), &g.global, nf.f,
                                    again.data(), mq::ScaleDtype::kFloat32)
                  .ok());
      REQUIRE(again == g.dq);
    }
  }
}

TEST_CASE("gptq_solve_format does not depend on block_size, bit for bit", "[gptq_format]") {
  const int64_t rows = 20, cols = 256;
  const auto w = mqtest::random_matrix(rows, cols, 51u);
  const auto h = correlated_hessian(cols, 600, 52u);
  for (const Named& nf : all_formats()) {
    if (mq::gptq_format_uses_int_solver(nf.f, cols)) continue;
    CAPTURE(nf.name);
    const Out one = solve(Solver::kFast, w, rows, cols, h, args_of(nf.f, true, 1));
    REQUIRE(one.status.ok());
    for (int64_t block : {7, 48, 128, 4096}) {
      CAPTURE(block);
      const Out b = solve(Solver::kFast, w, rows, cols, h, args_of(nf.f, true, block));
      REQUIRE(b.status.ok());
      require_identical(b, one);
      REQUIRE(b.report.loss == one.report.loss);
    }
  }
}

TEST_CASE("gptq_solve_format agrees with the twin's own textbook factor", "[gptq_format]") {
  const int64_t rows = 16, cols = 192;
  const auto w = mqtest::random_matrix(rows, cols, 61u);
  const auto h = correlated_hessian(cols, 500, 62u);
  for (const Named& nf : all_formats())
    for (bool act : {false, true}) {
      CAPTURE(nf.name, act);
      const auto a = args_of(nf.f, act, 64);
      const Out fast = solve(Solver::kFast, w, rows, cols, h, a);
      const Out ref = solve(Solver::kRefTextbook, w, rows, cols, h, a);
      REQUIRE(fast.status.ok());
      REQUIRE(ref.status.ok());
      CAPTURE(fast.report.loss, ref.report.loss);
      REQUIRE(agreement(fast, ref) >= kMinCodeAgreement);
      REQUIRE(std::fabs(fast.report.loss - ref.report.loss) <= kLossRelTol * ref.report.loss);
      REQUIRE(fast.report.damp_value == Approx(ref.report.damp_value).epsilon(1e-12));
      if (!mq::gptq_format_uses_int_solver(nf.f, cols) || act) REQUIRE(fast.scales == ref.scales);
    }
}

TEST_CASE("gptq_solve_format beats RTN on a correlated Hessian for every format", "[gptq_format]") {
  const int64_t rows = 32, cols = 256;
  const auto w = mqtest::random_matrix(rows, cols, 71u);
  const auto h = correlated_hessian(cols, 700, 72u);
  for (const Named& nf : all_formats())
    for (bool act : {false, true}) {
      CAPTURE(nf.name, act);
      const Out g = solve(Solver::kFast, w, rows, cols, h, args_of(nf.f, act, 128));
      REQUIRE(g.status.ok());
      const Out r = rtn(w, rows, cols, nf.f);
      REQUIRE(r.status.ok());
      const double rtn_loss = mq::quadratic_loss<double>({w.data(), rows, cols, cols}, r.dq.data(), h.data(), cols);
      CAPTURE(g.report.loss, rtn_loss, g.report.loss / rtn_loss);
      REQUIRE(g.report.loss < rtn_loss);
    }
}

TEST_CASE("a diagonal Hessian reduces gptq_solve_format to RTN exactly", "[gptq_format]") {
  const int64_t rows = 10, cols = 96;
  auto w = adversarial_matrix(rows, cols, 81u);
  // (-0.0 aside: subtracting e_j * 0 = -0.0 of an earlier column with e_j < 0 turns it into +0.0, whose FP6 / FP8 code
  // is the +0 code where RTN keeps the -0 code; both decode to zero.)
  for (float& v : w)
    if (v == 0.0f) v = 0.0f;
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0 + (i * 29 % cols);  // distinct: a real permutation
  for (const Named& nf : all_formats())
    for (bool act : {false, true}) {
      CAPTURE(nf.name, act);
      const Out g = solve(Solver::kFast, w, rows, cols, h, args_of(nf.f, act, 40));
      const Out r = rtn(w, rows, cols, nf.f);
      REQUIRE(g.status.ok());
      REQUIRE(g.codes == r.codes);
      REQUIRE(g.scales == r.scales);
      REQUIRE(g.dq == r.dq);
    }
}

TEST_CASE("NVFP4: partners solved with the caller's global scale equal the fused solve", "[gptq_format]") {
  // gate and up [I, H] share the Hessian of their input; solved as one [2I, H] matrix they share its global scale.
  const int64_t inter = 24, cols = 128;
  auto gate = mqtest::random_matrix(inter, cols, 91u);
  const auto up = mqtest::random_matrix(inter, cols, 92u, 3.0f);  // the larger absmax: it sets the fused global scale
  std::vector<float> fused(gate);
  fused.insert(fused.end(), up.begin(), up.end());
  const auto h = correlated_hessian(cols, 400, 93u);
  for (bool act : {false, true}) {
    CAPTURE(act);
    const auto a = args_of(mq::format_nvfp4(), act, 128);
    const Out both = solve(Solver::kFast, fused, 2 * inter, cols, h, a);
    REQUIRE(both.status.ok());
    const Out own_gate = solve(Solver::kFast, gate, inter, cols, h, a);
    REQUIRE(own_gate.global != both.global);  // the gate alone has another absmax
    const float g = both.global;
    const Out sg = solve(Solver::kFast, gate, inter, cols, h, a, &g);
    const Out su = solve(Solver::kFast, up, inter, cols, h, a, &g);
    REQUIRE(sg.status.ok());
    REQUIRE(su.status.ok());
    REQUIRE(sg.global == g);
    REQUIRE(su.global == g);
    const size_t half_codes = inter * cols, half_scales = inter * (cols / 16);
    auto first = [](const auto& v, size_t n) { return std::vector<typename std::decay_t<decltype(v)>::value_type>(v.begin(), v.begin() + n); };
    auto second = [](const auto& v, size_t n) { return std::vector<typename std::decay_t<decltype(v)>::value_type>(v.begin() + n, v.end()); };
    REQUIRE(sg.codes == first(both.codes, half_codes));
    REQUIRE(su.codes == second(both.codes, half_codes));
    REQUIRE(sg.scale_codes == first(both.scale_codes, half_scales));
    REQUIRE(su.scale_codes == second(both.scale_codes, half_scales));
    REQUIRE(sg.dq == first(both.dq, half_codes));
    REQUIRE(su.dq == second(both.dq, half_codes));
    REQUIRE(sg.report.loss + su.report.loss == Approx(both.report.loss).epsilon(1e-9));
    // the twin agrees on the separate solve too
    require_identical(sg, solve(Solver::kRefSolverFactor, gate, inter, cols, h, a, &g));
  }
}

TEST_CASE("int formats of quant.h go through gptq_solve unchanged", "[gptq_format]") {
  const int64_t rows = 12, cols = 128;
  const auto w = mqtest::random_matrix(rows, cols, 101u);
  const auto h = correlated_hessian(cols, 300, 102u);
  for (int64_t gs : {int64_t{-1}, int64_t{32}})
    for (bool sym : {false, true})
      for (bool act : {false, true}) {
        CAPTURE(gs, sym, act);
        const mq::Format f = mq::format_int(4, sym, gs, mq::ScaleDtype::kBFloat16);
        REQUIRE(mq::gptq_format_uses_int_solver(f, cols));
        const Out g = solve(Solver::kFast, w, rows, cols, h, args_of(f, act, 48));
        REQUIRE(g.status.ok());
        mq::GptqArgs ia;
        ia.spec = mq::gptq_format_int_spec(f);
        ia.act_order = act;
        ia.block_size = 48;
        const int64_t ng = gs > 0 ? cols / gs : 1;
        std::vector<int8_t> codes(rows * cols);
        std::vector<float> scales(rows * ng), dq(rows * cols);
        std::vector<int32_t> zeros(rows * ng);
        mq::GptqReport rep;
        REQUIRE(mq::gptq_solve<double>({w.data(), rows, cols, cols}, h.data(), cols, ia,
                                       {codes.data(), scales.data(), zeros.data(), dq.data()}, &rep)
                    .ok());
        for (size_t i = 0; i < codes.size(); ++i) REQUIRE(g.codes[i] == static_cast<uint8_t>(codes[i]));
        REQUIRE(g.scales == scales);
        REQUIRE(g.zeros == zeros);
        REQUIRE(g.dq == dq);
        REQUIRE(g.report.loss == rep.loss);
        for (uint8_t sc : g.scale_codes) REQUIRE(sc == 0);
        const Out ref = solve(Solver::kRefTextbook, w, rows, cols, h, args_of(f, act, 48));
        REQUIRE(ref.status.ok());
        REQUIRE(agreement(g, ref) >= kMinCodeAgreement);
      }
}

TEST_CASE("gptq_solve_format: dead columns, an all-dead Hessian, escalation, determinism", "[gptq_format]") {
  const int64_t rows = 8, cols = 64;
  const auto w = mqtest::random_matrix(rows, cols, 111u);
  const std::vector<double> zero(cols * cols, 0.0);
  for (const Named& nf : all_formats()) {
    CAPTURE(nf.name);
    const Out z = solve(Solver::kFast, w, rows, cols, zero, args_of(nf.f, false, 32));
    REQUIRE(z.status.ok());
    REQUIRE(z.report.dead_columns == cols);
    for (float v : z.dq) REQUIRE(v == 0.0f);
    REQUIRE(z.report.loss == 0.0);
  }
  // 2x2 blocks [[1, 3], [3, 1]]: three escalations (as tests/cpp/test_gptq.cpp), the same for both twins
  std::vector<double> h(cols * cols, 0.0);
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] = 1.0;
  for (int64_t k = 0; k < cols; k += 2) h[k * cols + k + 1] = h[(k + 1) * cols + k] = 3.0;
  for (Solver s : {Solver::kFast, Solver::kRefSolverFactor, Solver::kRefTextbook}) {
    const Out r = solve(s, w, rows, cols, h, args_of(mq::format_nvfp4(), false, 128));
    REQUIRE(r.status.ok());
    REQUIRE(r.report.escalations == 3);
    auto few = args_of(mq::format_nvfp4(), false, 128);
    few.max_damp_escalations = 2;
    const Out bad = solve(s, w, rows, cols, h, few);
    REQUIRE(fails_with(bad.status, mq::StatusCode::kNumericalError, "damp"));
    REQUIRE(bad.report.escalations == 2);
  }
  // deterministic; a float Hessian only rounds
  const auto hc = correlated_hessian(cols, 200, 112u);
  const auto a = args_of(mq::format_mxfp4(), true, 16);
  const Out r1 = solve(Solver::kFast, w, rows, cols, hc, a), r2 = solve(Solver::kFast, w, rows, cols, hc, a);
  require_identical(r1, r2);
  REQUIRE(r1.report.loss == r2.report.loss);
  const std::vector<float> hf(hc.begin(), hc.end());
  const Out rf = solve(Solver::kFast, w, rows, cols, hf, a);
  REQUIRE(rf.status.ok());
  REQUIRE(agreement(rf, r1) >= kMinCodeAgreement);
  REQUIRE(std::fabs(rf.report.loss - r1.report.loss) <= kLossRelTol * r1.report.loss);
  require_identical(rf, solve(Solver::kRefSolverFactor, w, rows, cols, hf, a));
  // null outputs and a null report are allowed
  std::vector<uint8_t> codes(rows * cols);
  mq::FormatQuantized only_codes;
  only_codes.codes = codes.data();
  REQUIRE(mq::gptq_solve_format<double>({w.data(), rows, cols, cols}, hc.data(), cols, a, nullptr, only_codes, nullptr)
              .ok());
  REQUIRE(codes == r1.codes);
}

TEST_CASE("gptq_solve_format rejects bad arguments with statuses naming them", "[gptq_format]") {
  const int64_t rows = 4, cols = 32;
  const auto w = mqtest::random_matrix(rows, cols, 121u);
  const auto h = correlated_hessian(cols, 64, 122u);
  const auto good = args_of(mq::format_nvfp4(), false, 8);
  REQUIRE(solve(Solver::kFast, w, rows, cols, h, good).status.ok());
  auto expect = [&](const std::vector<float>& ww, int64_t r, const std::vector<double>& hh, const mq::GptqFormatArgs& a,
                    const float* g, mq::StatusCode code, const char* word) {
    CAPTURE(word);
    for (Solver s : {Solver::kFast, Solver::kRefSolverFactor, Solver::kRefTextbook}) {
      const Out res = solve(s, ww, r, cols, hh, a, g);
      INFO(res.status.to_string());
      REQUIRE(fails_with(res.status, code, word));
    }
  };
  const auto inv = mq::StatusCode::kInvalidArgument;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  {
    auto hb = h;
    hb[3 * cols + 9] = nan;
    expect(w, rows, hb, good, nullptr, inv, "h:");
    hb = h;
    hb[6 * cols + 6] = -1.0;
    expect(w, rows, hb, good, nullptr, inv, "diagonal");
    auto wb = w;
    wb[5] = std::numeric_limits<float>::infinity();
    expect(wb, rows, h, good, nullptr, inv, "w:");
  }
  auto a = good;
  a.block_size = 0;
  expect(w, rows, h, a, nullptr, inv, "block_size");
  a = good;
  a.damp = -1.0;
  expect(w, rows, h, a, nullptr, inv, "damp");
  a = good;
  a.format.group_size = 0;
  expect(w, rows, h, a, nullptr, inv, "group_size");
  a = good;
  a.format.symmetric = false;
  expect(w, rows, h, a, nullptr, mq::StatusCode::kNotSupported, "symmetric");
  for (float bad : {0.0f, -1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
    expect(w, rows, h, good, &bad, inv, "global_scale");
  const float one = 1.0f;
  expect(w, rows, h, args_of(mq::format_mxfp4(), false, 8), &one, inv, "global_scale");
  expect(std::vector<float>{}, 0, h, good, nullptr, inv, "out_features");
  // an fp16 scale that overflows (amax / 448 > 65504) is refused before the column loop
  auto huge = w;
  huge[2 * cols + 17] = 3.5e7f;
  expect(huge, rows, h, args_of(mq::format_fp8_channel(mq::ScaleDtype::kFloat16), false, 8), nullptr, inv,
         "scale_dtype");
  std::vector<uint8_t> codes(rows * cols);
  mq::FormatQuantized out;
  out.codes = codes.data();
  REQUIRE(fails_with(mq::gptq_solve_format<double>({w.data(), rows, cols, cols}, h.data(), cols - 1, good, nullptr, out,
                                                   nullptr),
                     inv, "ldh"));
}
