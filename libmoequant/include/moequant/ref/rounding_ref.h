// moequant/ref/rounding_ref.h -- scalar reference twin of rounding.h, for tests only.
//
// Obviously right rather than fast: every candidate flip is scored by recomputing the row's loss d^T H d from
// scratch with plain loops (O(cols^2) per candidate), the outliers are found by counting ranks, and nothing of
// the fast version's arithmetic (the incremental gradient g = H d, the Delta formula) is shared. It shares the
// argument validation (so both fail alike), the tie-breaking (lowest column, then -1 before +1), the stopping
// threshold and the per-row revert rule, so the twins agree up to floating-point near-ties.
#pragma once

#include <moequant/quant.h>
#include <moequant/rounding.h>
#include <moequant/status.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moequant {
inline namespace v0 {

template <typename HT>
Status greedy_rounding_ref(const MatrixView& w, const HT* h, int64_t ldh, const QuantSpec& s, const float* scales,
                           const int32_t* zeros, int8_t* codes, float* dequantized, const RoundingArgs& args,
                           RoundingReport* report) {
  MQ_RETURN_IF_ERROR(detail::validate_rounding(w, h, ldh, s, scales, zeros, codes, args));
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t gs = effective_group_size(s, cols), ng = num_groups(s, cols);
  const int qmin = qmin_for(s.bits), qmax = qmax_for(s.bits);
  auto hv = [&](int64_t i, int64_t j) {
    return static_cast<double>(i >= j ? h[i * ldh + j] : h[j * ldh + i]);
  };
  RoundingReport rep;
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w.data + r * w.ld;
    std::vector<int32_t> q(cols), q0(cols);
    for (int64_t j = 0; j < cols; ++j) q[j] = q0[j] = codes[r * cols + j];
    auto qp = [&](int64_t j) {
      return QParams{scales[r * ng + j / gs], zeros ? zeros[r * ng + j / gs] : 0};
    };
    auto row_loss = [&](const std::vector<int32_t>& qq) {
      std::vector<double> d(cols);
      for (int64_t j = 0; j < cols; ++j)
        d[j] = static_cast<double>(wr[j]) - static_cast<double>(dequantize_value(qq[j], qp(j)));
      double l = 0.0;
      for (int64_t i = 0; i < cols; ++i)
        for (int64_t j = 0; j < cols; ++j) l += d[i] * hv(i, j) * d[j];
      return l;
    };
    // outliers: rank within the group by |w| descending, ties by lower column
    const int64_t m = static_cast<int64_t>(std::floor((1.0 - args.outlier_quantile) * static_cast<double>(gs) + 1e-9));
    std::vector<char> frozen(cols, 0);
    int64_t excl = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g0 = (c / gs) * gs;
      int64_t rank = 0;
      for (int64_t o = g0; o < g0 + gs; ++o) {
        const float a = std::fabs(wr[o]), b = std::fabs(wr[c]);
        if (a > b || (a == b && o < c)) ++rank;
      }
      if (rank < m) {
        frozen[c] = 1;
        ++excl;
      }
    }
    rep.excluded += excl;
    const double before = row_loss(q);
    double loss = before;
    const int64_t budget = static_cast<int64_t>(args.passes) * (cols - excl);
    for (int64_t f = 0; f < budget; ++f) {
      double best = 0.0;
      int64_t bj = -1;
      int bd = 0;
      for (int64_t j = 0; j < cols; ++j) {
        if (frozen[j]) continue;
        for (int delta : {-1, +1}) {
          if (q[j] + delta < qmin || q[j] + delta > qmax) continue;
          std::vector<int32_t> t = q;
          t[j] += delta;
          const double dl = row_loss(t) - loss;
          if (dl < best) {
            best = dl;
            bj = j;
            bd = delta;
          }
        }
      }
      if (bj < 0 || !(best < -1e-12 * std::max(loss, 1e-300))) break;
      q[bj] += bd;
      loss = row_loss(q);
    }
    const double after = row_loss(q);
    if (!(after < before)) {
      if (after != before) ++rep.rows_reverted;
      q = q0;
      rep.loss_after += before;
    } else {
      rep.loss_after += after;
      for (int64_t j = 0; j < cols; ++j) rep.flips += q[j] != q0[j];
    }
    rep.loss_before += before;
    for (int64_t j = 0; j < cols; ++j) {
      codes[r * cols + j] = static_cast<int8_t>(q[j]);
      if (dequantized) dequantized[r * cols + j] = dequantize_value(q[j], qp(j));
    }
  }
  if (report) *report = rep;
  return {};
}

}  // namespace v0
}  // namespace moequant
