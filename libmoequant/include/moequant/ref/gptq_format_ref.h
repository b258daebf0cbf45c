// moequant/ref/gptq_format_ref.h -- scalar reference twin of gptq_format.h, for tests only.
//
// Written to be obviously right rather than fast: plain loops, row-major W, no lazy batching (after each column every
// later column is updated at once). It shares with the solver only the argument validation (so both fail alike), the
// definitions of the format (format.h: format_quantize gives the scales -- "exactly as the RTN quantizer derives
// them" is true by construction here; quantize_element / dequantize_element are the element grid) and, on request,
// the inverse factor U:
//   * GptqRefFactor::kTextbook (default): U the textbook way in double (chol(H) -> H^{-1} -> upper chol(H^{-1}), the
//     int twin's detail::inverse_upper_factor_ref), rounded to float. The twins then agree as gptq_solve and
//     gptq_solve_ref do: codes up to rounding-boundary flips, losses to ~1e-3 (U differs in the last bits);
//   * GptqRefFactor::kSolver: U from the solver's own detail::gptq_factor. Everything after U -- static scales, the
//     processing order, dead columns, the element rounding, the error feedback -- is then computed independently here,
//     and the twins agree bit for bit (codes, scales, dequantized weight, loss up to its summation order).
// Int formats that gptq_solve_format hands to gptq_solve are handed to gptq_solve_ref here (the int twin).
#pragma once

#include <moequant/format.h>
#include <moequant/gptq.h>
#include <moequant/gptq_format.h>
#include <moequant/quant.h>
#include <moequant/ref/gptq_ref.h>
#include <moequant/status.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace moequant {
inline namespace v0 {

/// Where gptq_solve_format_ref takes the inverse factor U from (see the top of this file).
enum class GptqRefFactor { kTextbook, kSolver };

/// Scalar twin of gptq_solve_format (same signature, semantics and statuses) plus the factor choice.
template <typename HT>
Status gptq_solve_format_ref(const MatrixView& w, const HT* h, int64_t ldh, const GptqFormatArgs& args,
                             const float* global_scale_in, const FormatQuantized& out, GptqReport* report,
                             GptqRefFactor factor = GptqRefFactor::kTextbook) {
  MQ_RETURN_IF_ERROR(detail::validate_gptq_format(w, h, ldh, args, global_scale_in));
  const Format& f = args.format;
  const int64_t rows = w.rows, n = w.cols;

  if (gptq_format_uses_int_solver(f, n)) {  // the int twin, outputs in format_quantize's layout
    GptqArgs ga = args.gptq_args();
    ga.spec = gptq_format_int_spec(f);
    std::vector<int8_t> codes(static_cast<size_t>(rows * n));
    MQ_RETURN_IF_ERROR(
        gptq_solve_ref(w, h, ldh, ga, QuantizedOut{codes.data(), out.scales, out.zeros, out.dequantized}, report));
    for (size_t i = 0; i < codes.size(); ++i)
      if (out.codes) out.codes[i] = static_cast<uint8_t>(codes[i]);
    const int64_t ns = scale_rows(f, rows) * scale_cols(f, n);
    for (int64_t i = 0; i < ns; ++i)
      if (out.scale_codes) out.scale_codes[i] = 0;
    return {};
  }

  GptqReport rep;
  // Dead columns; processing order: descending diagonal, ties by column index (sorting (-diag, index) pairs).
  std::vector<double> diag(static_cast<size_t>(n));
  std::vector<char> dead(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < n; ++i) {
    diag[i] = static_cast<double>(h[i * ldh + i]);
    if (diag[i] == 0.0) {
      dead[i] = 1;
      diag[i] = 1.0;
      ++rep.dead_columns;
    }
  }
  std::vector<std::pair<double, int64_t>> keyed;
  for (int64_t i = 0; i < n; ++i) keyed.emplace_back(args.act_order ? -diag[i] : 0.0, i);
  std::sort(keyed.begin(), keyed.end());
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[i] = keyed[i].second;

  // The inverse factor U (row-major, processing order).
  std::vector<float> U(static_cast<size_t>(n * n));
  if (factor == GptqRefFactor::kSolver) {
    detail::GptqFactor fac;
    GptqReport frep;
    const Status fs = detail::gptq_factor(h, ldh, n, args.act_order, args.gptq_args(), &fac, &frep);
    rep.escalations = frep.escalations;
    rep.damp_fraction = frep.damp_fraction;
    rep.damp_value = frep.damp_value;
    if (!fs.ok()) {
      if (report) *report = rep;
      return fs;
    }
    if (fac.perm != perm) return Status::internal("gptq_factor: its processing order differs from the twin's");
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) U[i * n + j] = fac.U(i, j);
  } else {
    std::vector<double> Hp(static_cast<size_t>(n * n)), A, Ud;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const int64_t a = std::max(perm[i], perm[j]), b = std::min(perm[i], perm[j]);
        Hp[i * n + j] = a == b ? diag[a] : static_cast<double>(h[a * ldh + b]);
      }
    double mean = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += Hp[i * n + i];
    mean /= static_cast<double>(n);
    double frac = args.damp;
    for (int k = 0;; ++k) {
      rep.escalations = k;
      rep.damp_fraction = frac;
      rep.damp_value = frac * mean;
      A = Hp;
      for (int64_t i = 0; i < n; ++i) A[i * n + i] += rep.damp_value;
      if (detail::inverse_upper_factor_ref(A, n, &Ud)) break;
      if (k >= args.max_damp_escalations) {
        if (report) *report = rep;
        return detail::not_positive_definite(k, frac);
      }
      frac *= args.damp_escalation_factor;
    }
    for (size_t i = 0; i < Ud.size(); ++i) U[i] = static_cast<float>(Ud[i]);
  }

  // Static scales: RTN (format_quantize) of the original W with its dead columns zeroed.
  std::vector<float> w0(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) w0[r * n + c] = dead[c] ? 0.0f : w.at(r, c);
  const int64_t sr = scale_rows(f, rows), sc = scale_cols(f, n), tr = tile_rows(f, rows), tc = tile_cols(f, n);
  std::vector<float> scales(static_cast<size_t>(sr * sc));
  std::vector<uint8_t> scale_codes(static_cast<size_t>(sr * sc));
  std::vector<int32_t> zeros(static_cast<size_t>(sr * sc));
  float g = 1.0f;
  FormatQuantized rtn;
  rtn.scales = scales.data();
  rtn.scale_codes = scale_codes.data();
  rtn.zeros = zeros.data();
  rtn.global_scale = &g;
  MQ_RETURN_IF_ERROR(format_quantize(FloatMatrix{w0.data(), ScaleDtype::kFloat32, rows, n, n}, f, global_scale_in, rtn));
  std::vector<GroupParams> params(static_cast<size_t>(sr * sc));
  for (int64_t br = 0; br < sr; ++br)
    for (int64_t bc = 0; bc < sc; ++bc) {
      GroupParams& p = params[br * sc + bc];
      p.scale = scales[br * sc + bc];
      p.scale_code = scale_codes[br * sc + bc];
      p.zero = zeros[br * sc + bc];
      p.effective = f.global_scale ? fmt_detail::mq_fdiv(p.scale, g) : p.scale;
      if (!std::isfinite(p.effective))
        return Status::invalid("scale_dtype: float16 cannot hold the scale of tile ({}, {}) (rows [{}, {}), columns "
                               "[{}, {})); use bfloat16 or float32 scales",
                               br, bc, br * tr, std::min(rows, (br + 1) * tr), bc * tc, std::min(n, (bc + 1) * tc));
    }
  const FormatCore core = f.core();
  auto param_of = [&](int64_t r, int64_t c) -> const GroupParams& { return params[(r / tr) * sc + c / tc]; };

  // Column loop without lazy batching (W row-major, processing order).
  std::vector<float> W(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) W[r * n + j] = w0[r * n + perm[j]];
  std::vector<uint8_t> codes(static_cast<size_t>(rows * n));  // row-major, original order
  std::vector<float> dq(static_cast<size_t>(rows * n));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = perm[j];
    const float d = U[j * n + j];
    for (int64_t r = 0; r < rows; ++r) {
      const GroupParams& p = param_of(r, c);
      const float x = W[r * n + j];
      const uint8_t q = quantize_element(core, x, p);
      const float v = dequantize_element(core, q, p.effective, p.zero);
      codes[r * n + c] = q;
      dq[r * n + c] = v;
      const float e = (x - v) / d;
      for (int64_t k = j + 1; k < n; ++k) W[r * n + k] = W[r * n + k] - e * U[j * n + k];
    }
  }

  for (size_t i = 0; i < codes.size(); ++i) {
    if (out.codes) out.codes[i] = codes[i];
    if (out.dequantized) out.dequantized[i] = dq[i];
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (out.scales) out.scales[i] = scales[i];
    if (out.scale_codes) out.scale_codes[i] = scale_codes[i];
    if (out.zeros) out.zeros[i] = zeros[i];
  }
  if (out.global_scale && f.global_scale) *out.global_scale = g;
  rep.loss = quadratic_loss_ref(w, dq.data(), h, ldh);
  if (report) *report = rep;
  return {};
}

}  // namespace v0
}  // namespace moequant
