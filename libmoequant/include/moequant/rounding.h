// moequant/rounding.h -- greedy rounding correction of already-quantized codes (a post-pass after RTN or GPTQ).
//
// Given W [rows, cols], its codes Q with *fixed* group parameters (scale, zero) and a Hessian H [cols, cols],
// every row r is improved independently on the proxy loss
//     L_r(q) = d^T H d,   d = w_r - dequant(q)      (= sum over calibration x of (x . (w_r - q_hat))^2 / n)
// by flipping single codes q_j -> q_j +- 1 (kept in [qmin, qmax]), best first:
//     with g = H d, moving code j by delta in {-1, +1} changes dequant by delta * s_j and the loss by
//         Delta(j, delta) = s_j^2 H_jj - 2 delta s_j g_j .
//     The flip with the most negative Delta over all eligible (j, delta) is applied (ties: lowest j, then
//     delta = -1), g is updated with the exact change of d_j (g -= dd_j H[:, j]), and so on until no flip
//     lowers the loss by more than a relative 1e-12 or the budget of `passes * eligible columns` flips is spent.
// Outliers are excluded: in each group of a row, the floor((1 - outlier_quantile) * group_size) entries of
// largest |w| (ties: lower column first) keep their codes. Finally each row's loss is recomputed from scratch
// and a row whose loss did not decrease keeps its original codes, so the loss never increases.
// Deterministic (no threads, fixed tie-breaking). h is taken as symmetric: only its lower triangle
// (h[r * ldh + c], r >= c) is read, as in gptq.h. Cost per row: O(cols^2) plus O(cols) per flip.
// The scalar reference twin is moequant/ref/rounding_ref.h.
#pragma once

#include <moequant/gptq.h>
#include <moequant/quant.h>
#include <moequant/status.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <numeric>
#include <vector>

namespace moequant {
inline namespace v0 {

struct RoundingArgs {
  int passes = 1;                  // flip budget per row, in units of the row's eligible columns (>= 0)
  double outlier_quantile = 0.99;  // |w| quantile of a group above which codes are frozen, in (0, 1]
};

struct RoundingReport {
  double loss_before = 0;   // tr((W - Q) H (W - Q)^T) before, with the caller's H
  double loss_after = 0;    // ... after
  int64_t flips = 0;        // codes changed (net, in rows that were kept)
  int64_t excluded = 0;     // entries frozen as outliers
  int64_t rows_reverted = 0;  // rows whose greedy result did not lower the loss (original codes kept)
};

namespace detail {

template <typename HT>
Status validate_rounding(const MatrixView& w, const HT* h, int64_t ldh, const QuantSpec& s, const float* scales,
                         const int32_t* zeros, const int8_t* codes, const RoundingArgs& a) {
  MQ_RETURN_IF_ERROR(validate(s, w.cols));
  if (w.rows < 0) return Status::invalid("out_features: expected >= 0, got {}", w.rows);
  if (w.data == nullptr && w.rows > 0) return Status::invalid("w: expected a pointer, got null");
  if (w.ld < w.cols) return Status::invalid("w.ld: expected >= in_features={}, got {}", w.cols, w.ld);
  if (h == nullptr) return Status::invalid("h: expected a pointer to [{}, {}] values, got null", w.cols, w.cols);
  if (ldh < w.cols) return Status::invalid("ldh: expected >= in_features={}, got {}", w.cols, ldh);
  if (scales == nullptr || codes == nullptr) return Status::invalid("codes/scales: expected pointers, got null");
  if (a.passes < 0) return Status::invalid("passes: expected >= 0, got {}", a.passes);
  if (!(a.outlier_quantile > 0.0 && a.outlier_quantile <= 1.0))
    return Status::invalid("outlier_quantile: expected a value in (0, 1], got {}", a.outlier_quantile);
  MQ_RETURN_IF_ERROR(check_finite(w, "w"));
  for (int64_t r = 0; r < w.cols; ++r)
    for (int64_t c = 0; c <= r; ++c)
      if (!std::isfinite(static_cast<double>(h[r * ldh + c]))) return Status::invalid("h: expected finite values");
  const int qmin = qmin_for(s.bits), qmax = qmax_for(s.bits);
  const int64_t ng = num_groups(s, w.cols);
  for (int64_t i = 0; i < w.rows * w.cols; ++i)
    if (codes[i] < qmin || codes[i] > qmax)
      return Status::invalid("codes: expected values in [{}, {}] for {} bits, got {} at flat index {}", qmin, qmax,
                             s.bits, static_cast<int>(codes[i]), i);
  for (int64_t i = 0; i < w.rows * ng; ++i) {
    if (!(std::isfinite(scales[i]) && scales[i] > 0.0f))
      return Status::invalid("scales: expected finite values > 0, got {} at flat index {}", scales[i], i);
    if (zeros && (zeros[i] < qmin || zeros[i] > qmax))
      return Status::invalid("zeros: expected values in [{}, {}], got {}", qmin, qmax, zeros[i]);
  }
  return {};
}

/// frozen[c] = 1 for the floor((1 - quantile) * gs) largest |w| of each group of row `wr` (ties: lower column).
inline int64_t mark_outliers(const float* wr, int64_t cols, int64_t gs, double quantile, std::vector<char>* frozen) {
  frozen->assign(static_cast<size_t>(cols), 0);
  const int64_t m = static_cast<int64_t>(std::floor((1.0 - quantile) * static_cast<double>(gs) + 1e-9));
  if (m <= 0) return 0;
  std::vector<int64_t> idx(static_cast<size_t>(gs));
  for (int64_t g0 = 0; g0 < cols; g0 += gs) {
    std::iota(idx.begin(), idx.end(), g0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return std::fabs(wr[a]) > std::fabs(wr[b]); });
    for (int64_t i = 0; i < m; ++i) (*frozen)[idx[i]] = 1;
  }
  return m * (cols / gs);
}

}  // namespace detail

/// Greedy rounding correction (see the top of this file). `codes` [rows, cols] is updated in place;
/// `dequantized` [rows, cols] (may be null) receives the dequantized result; scales / zeros [rows, groups]
/// (zeros may be null: symmetric) are not changed. report may be null.
template <typename HT>
Status greedy_rounding(const MatrixView& w, const HT* h, int64_t ldh, const QuantSpec& s, const float* scales,
                       const int32_t* zeros, int8_t* codes, float* dequantized, const RoundingArgs& args,
                       RoundingReport* report) {
  detail::static_check_ht<HT>();
  MQ_RETURN_IF_ERROR(detail::validate_rounding(w, h, ldh, s, scales, zeros, codes, args));
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t gs = effective_group_size(s, cols), ng = num_groups(s, cols);
  const int qmin = qmin_for(s.bits), qmax = qmax_for(s.bits);
  RoundingReport rep;
  try {
    detail::MatXd H(cols, cols);  // symmetric copy in double (column j contiguous)
    for (int64_t j = 0; j < cols; ++j)
      for (int64_t i = j; i < cols; ++i) H(i, j) = H(j, i) = static_cast<double>(h[i * ldh + j]);
    Eigen::VectorXd d(cols), g(cols), d0(cols);
    std::vector<double> sc(static_cast<size_t>(cols));
    std::vector<int32_t> zc(static_cast<size_t>(cols));
    std::vector<char> frozen;
    std::vector<int8_t> q0(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      const float* wr = w.data + r * w.ld;
      int8_t* qr = codes + r * cols;
      auto deq = [&](int64_t j, int32_t q) {
        return static_cast<double>(dequantize_value(q, QParams{static_cast<float>(sc[j]), zc[j]}));
      };
      for (int64_t j = 0; j < cols; ++j) {
        sc[j] = scales[r * ng + j / gs];
        zc[j] = zeros ? zeros[r * ng + j / gs] : 0;
        d(j) = static_cast<double>(wr[j]) - deq(j, qr[j]);
        q0[j] = qr[j];
      }
      const int64_t excl = detail::mark_outliers(wr, cols, gs, args.outlier_quantile, &frozen);
      rep.excluded += excl;
      g.noalias() = H * d;
      const double before = d.dot(g);
      d0 = d;
      const int64_t budget = static_cast<int64_t>(args.passes) * (cols - excl);
      double loss = before;
      for (int64_t f = 0; f < budget; ++f) {
        double best = 0.0;
        int64_t bj = -1;
        int bdelta = 0;
        for (int64_t j = 0; j < cols; ++j) {
          if (frozen[j]) continue;
          const double a = sc[j] * sc[j] * H(j, j), b = 2.0 * sc[j] * g(j);
          if (qr[j] > qmin && a + b < best) { best = a + b; bj = j; bdelta = -1; }
          if (qr[j] < qmax && a - b < best) { best = a - b; bj = j; bdelta = +1; }
        }
        if (bj < 0 || !(best < -1e-12 * std::max(loss, 1e-300))) break;
        const int32_t nq = qr[bj] + bdelta;
        const double nd = static_cast<double>(wr[bj]) - deq(bj, nq);
        g.noalias() += (nd - d(bj)) * H.col(bj);
        d(bj) = nd;
        qr[bj] = static_cast<int8_t>(nq);
        loss += best;
      }
      g.noalias() = H * d;  // exact loss of the new codes
      const double after = d.dot(g);
      if (!(after < before)) {
        for (int64_t j = 0; j < cols; ++j) qr[j] = q0[j];
        if (after != before) ++rep.rows_reverted;
        d = d0;
        rep.loss_after += before;
      } else {
        rep.loss_after += after;
        for (int64_t j = 0; j < cols; ++j) rep.flips += qr[j] != q0[j];
      }
      rep.loss_before += before;
      if (dequantized)
        for (int64_t j = 0; j < cols; ++j) dequantized[r * cols + j] = dequantize_value(qr[j], QParams{
                                                                           static_cast<float>(sc[j]), zc[j]});
    }
  } catch (const std::bad_alloc&) {
    return Status::invalid("w: could not allocate the rounding working memory for in_features={}", cols);
  }
  if (report) *report = rep;
  return {};
}

}  // namespace v0
}  // namespace moequant
