// moequant/ref/gptq_ref.h -- scalar reference twins of hessian.h and gptq.h, for tests only.
//
// Written to be obviously right rather than fast: plain loops, a hand-written Cholesky in double, and no
// lazy batching (after each column, every remaining column is updated at once). They share the argument
// validation of the fast versions so both fail with the same Status, but nothing of their arithmetic.
//
// Deliberate equivalences with gptq.h (so the twins agree in exact arithmetic):
//   * U is computed the textbook way, chol(H) -> H^{-1} = L^{-T} L^{-1} -> upper chol(H^{-1}), as in the
//     reference torch code; gptq.h uses an equivalent reversal trick.
//   * Without act_order, group parameters are taken from the fully updated columns (this twin updates every
//     remaining column after each column, so that is simply W), as the lazy solver does.
// In floating point the twins still differ in summation order (the lazy GEMM vs sequential updates), so a
// code may flip where a value sits on a rounding boundary; tests allow for that.
#pragma once

#include <moequant/gptq.h>
#include <moequant/hessian.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace moequant {
inline namespace v0 {

/// Naive twin of accumulate_hessian: one rank-1 update per row, in Acc arithmetic.
template <typename Acc>
Status accumulate_hessian_ref(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                              const float* weights, int64_t num_experts, Acc* H, int64_t* counts, double* mass) {
  MQ_RETURN_IF_ERROR(detail::validate_hessian_inputs(x, n, dim, ldx, expert_ids, weights, num_experts));
  if (H == nullptr) return Status::invalid("H: expected a pointer, got null");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = expert_ids[i];
    const Acc c = weights ? static_cast<Acc>(weights[i]) : Acc(1);
    const float* xi = x + i * ldx;
    Acc* he = H + e * dim * dim;
    for (int64_t a = 0; a < dim; ++a)
      for (int64_t b = 0; b <= a; ++b) {
        const Acc v = c * static_cast<Acc>(xi[a]) * static_cast<Acc>(xi[b]);
        he[a * dim + b] += v;
        if (a != b) he[b * dim + a] += v;
      }
    if (counts) counts[e] += 1;
    if (mass) mass[e] += static_cast<double>(c);
  }
  return {};
}

/// Plain double loop: sum_r sum_ab d_ra H_ab d_rb with d = W - Q.
template <typename HT>
double quadratic_loss_ref(const MatrixView& w, const float* q, const HT* h, int64_t ldh) {
  double loss = 0.0;
  std::vector<double> d(static_cast<size_t>(w.cols));
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t c = 0; c < w.cols; ++c) d[c] = static_cast<double>(w.at(r, c)) - static_cast<double>(q[r * w.cols + c]);
    for (int64_t a = 0; a < w.cols; ++a)
      for (int64_t b = 0; b < w.cols; ++b) loss += d[a] * static_cast<double>(h[a * ldh + b]) * d[b];
  }
  return loss;
}

namespace detail {

/// Lower Cholesky factor of the n x n row-major symmetric a; false on a non-positive or non-finite pivot.
inline bool cholesky_lower_ref(const std::vector<double>& a, int64_t n, std::vector<double>* l) {
  l->assign(static_cast<size_t>(n * n), 0.0);
  std::vector<double>& L = *l;
  for (int64_t j = 0; j < n; ++j) {
    double s = a[j * n + j];
    for (int64_t k = 0; k < j; ++k) s -= L[j * n + k] * L[j * n + k];
    if (!(s > 0.0) || !std::isfinite(s)) return false;
    const double d = std::sqrt(s);
    L[j * n + j] = d;
    for (int64_t i = j + 1; i < n; ++i) {
      double t = a[i * n + j];
      for (int64_t k = 0; k < j; ++k) t -= L[i * n + k] * L[j * n + k];
      L[i * n + j] = t / d;
    }
  }
  return true;
}

/// Upper Cholesky factor of a^{-1} (row-major); false when a is not (numerically) positive definite.
inline bool inverse_upper_factor_ref(const std::vector<double>& a, int64_t n, std::vector<double>* u) {
  std::vector<double> L, Linv(static_cast<size_t>(n * n), 0.0), Hinv(static_cast<size_t>(n * n), 0.0), L2;
  if (!cholesky_lower_ref(a, n, &L)) return false;
  for (int64_t c = 0; c < n; ++c)  // forward substitution: L Linv[:, c] = e_c
    for (int64_t i = c; i < n; ++i) {
      double t = i == c ? 1.0 : 0.0;
      for (int64_t k = c; k < i; ++k) t -= L[i * n + k] * Linv[k * n + c];
      Linv[i * n + c] = t / L[i * n + i];
    }
  for (int64_t i = 0; i < n; ++i)  // Hinv = Linv^T Linv
    for (int64_t j = 0; j < n; ++j) {
      double t = 0.0;
      for (int64_t k = std::max(i, j); k < n; ++k) t += Linv[k * n + i] * Linv[k * n + j];
      Hinv[i * n + j] = t;
    }
  if (!cholesky_lower_ref(Hinv, n, &L2)) return false;
  u->assign(static_cast<size_t>(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) (*u)[i * n + j] = L2[j * n + i];
  return true;
}

}  // namespace detail

/// Scalar twin of gptq_solve (same signature, semantics and statuses; see the top of this file).
template <typename HT>
Status gptq_solve_ref(const MatrixView& w, const HT* h, int64_t ldh, const GptqArgs& args, const QuantizedOut& out,
                      GptqReport* report) {
  MQ_RETURN_IF_ERROR(detail::validate_gptq(w, h, ldh, args));
  const QuantSpec& s = args.spec;
  const int64_t rows = w.rows, n = w.cols;
  const int64_t gs = effective_group_size(s, n), ng = num_groups(s, n);
  GptqReport rep;

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
  // Processing order: descending diagonal, ties by column index (sorting (-diag, index) pairs).
  std::vector<std::pair<double, int64_t>> keyed;
  for (int64_t i = 0; i < n; ++i) keyed.emplace_back(args.act_order ? -diag[i] : 0.0, i);
  std::sort(keyed.begin(), keyed.end());
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[i] = keyed[i].second;

  // W in processing order (row-major), dead columns zeroed; static group parameters from the original W.
  std::vector<float> W(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) W[r * n + j] = dead[perm[j]] ? 0.0f : w.at(r, perm[j]);
  std::vector<QParams> params(static_cast<size_t>(rows * ng));
  std::vector<float> tmp(static_cast<size_t>(gs));
  if (args.act_order)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t i = 0; i < gs; ++i) tmp[i] = dead[g * gs + i] ? 0.0f : w.at(r, g * gs + i);
        params[r * ng + g] = compute_qparams(tmp.data(), gs, 1, s);
      }

  // Permuted H from the lower triangle of h, dead diagonal = 1, then damping with escalation.
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
  std::vector<float> U(Ud.begin(), Ud.end());

  // Column loop without lazy batching.
  std::vector<int8_t> codes(static_cast<size_t>(rows * n));  // row-major, processing order
  for (int64_t j = 0; j < n; ++j) {
    if (!args.act_order && j % gs == 0)
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t i = 0; i < gs; ++i) tmp[i] = W[r * n + j + i];
        params[r * ng + j / gs] = compute_qparams(tmp.data(), gs, 1, s);
      }
    const float d = U[j * n + j];
    for (int64_t r = 0; r < rows; ++r) {
      const QParams& p = params[r * ng + perm[j] / gs];
      const float x = W[r * n + j];
      const int32_t q = quantize_value(x, p, s.bits);
      codes[r * n + j] = static_cast<int8_t>(q);
      const float e = (x - dequantize_value(q, p)) / d;
      for (int64_t c = j + 1; c < n; ++c) W[r * n + c] -= e * U[j * n + c];
    }
  }

  std::vector<float> dq(static_cast<size_t>(rows * n));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = perm[j];
      const QParams& p = params[r * ng + c / gs];
      if (out.codes) out.codes[r * n + c] = codes[r * n + j];
      dq[r * n + c] = dequantize_value(codes[r * n + j], p);
    }
  if (out.dequantized)
    for (size_t i = 0; i < dq.size(); ++i) out.dequantized[i] = dq[i];
  for (int64_t i = 0; i < rows * ng; ++i) {
    if (out.scales) out.scales[i] = params[i].scale;
    if (out.zeros) out.zeros[i] = params[i].zero;
  }
  rep.loss = quadratic_loss_ref(w, dq.data(), h, ldh);
  if (report) *report = rep;
  return {};
}

}  // namespace v0
}  // namespace moequant
