// moequant/gptq.h -- the CPU GPTQ solver (Eigen), a pure function.
//
// Semantics follow the naive torch GPTQ of tools/ref_baseline.py (gptq()), with the formats of quant.h:
//   1. W is copied to float; dead columns (diag H == 0) get H_ii = 1 and W[:, i] = 0.
//   2. act_order: "static groups" -- each group's parameters come from the original (dead-zeroed) W's
//      column group, computed up front; columns are then processed in order of descending diag(H) (stable
//      sort, so ties keep column order) and the result is un-permuted. Without act_order a group's parameters
//      are computed when its first column is reached, from the fully error-updated columns: when the group runs
//      past the current block, the block's pending lazy updates are applied to those columns first, so the
//      result does not depend on block_size (ref_baseline.py, with group = block = 128, never hits this case;
//      it would read stale columns there).
//   3. H += lambda I with lambda = damp * mean(diag H). If H is not positive definite, the damp fraction is
//      multiplied by damp_escalation_factor up to max_damp_escalations times (reported).
//   4. U = upper Cholesky factor of H^{-1}, in double; the column loop and its updates run in float.
//   5. Lazy batch updates: within a block every column's error updates the rest of the block; after the
//      block, W[:, i2:] -= Err * U[i1:i2, i2:] (one GEMM).
// h is taken as symmetric: only its lower triangle (h[r * ldh + c], r >= c) is read, by the solve and by the
// loss (the whole matrix is still checked for NaN / Inf). report->loss is tr((W - Q) H (W - Q)^T) with the
// caller's undamped H; it is skipped when report is null, since it costs about as much as the solve.
// Steps 1, 3 and 4 (dead columns, order, U) are detail::gptq_factor, shared with gptq_format.h (every other format).
#pragma once

#include <moequant/quant.h>
#include <moequant/status.h>

#include <Eigen/Cholesky>
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <numeric>
#include <type_traits>
#include <vector>

namespace moequant {
inline namespace v0 {

struct GptqArgs {
  QuantSpec spec;
  bool act_order = false;
  double damp = 0.01;                     // fraction of mean(diag H) added to the diagonal
  int64_t block_size = 128;               // columns per lazy batch, any value >= 1
  int max_damp_escalations = 8;           // retries with a larger damp when H is not positive definite
  double damp_escalation_factor = 10.0;   // damp fraction multiplier per retry (> 1)
};

struct GptqReport {
  double loss = 0;            // tr((W - Q) H (W - Q)^T) with the caller's H
  double damp_fraction = 0;   // the damp fraction that succeeded (args.damp * factor^escalations)
  double damp_value = 0;      // lambda actually added to the diagonal
  int escalations = 0;        // number of damp escalations needed
  int64_t dead_columns = 0;   // columns with diag H == 0 (quantized as zeros)
};

namespace detail {

using MatXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
using MatXf = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;

template <typename HT>
constexpr void static_check_ht() {
  static_assert(std::is_same<HT, float>::value || std::is_same<HT, double>::value,
                "moequant: the Hessian type must be float or double");
}

/// Checks every argument of gptq_solve (shared with the reference twin so both fail alike).
template <typename HT>
Status validate_gptq(const MatrixView& w, const HT* h, int64_t ldh, const GptqArgs& a) {
  MQ_RETURN_IF_ERROR(validate(a.spec, w.cols));
  if (w.rows < 1) return Status::invalid("out_features: expected >= 1, got {}", w.rows);
  if (w.data == nullptr) return Status::invalid("w: expected a pointer to [{}, {}] floats, got null", w.rows, w.cols);
  if (w.ld < w.cols) return Status::invalid("w.ld: expected >= in_features={}, got {}", w.cols, w.ld);
  if (h == nullptr) return Status::invalid("h: expected a pointer to [{}, {}] values, got null", w.cols, w.cols);
  if (ldh < w.cols) return Status::invalid("ldh: expected >= in_features={}, got {}", w.cols, ldh);
  if (!(a.damp > 0.0 && std::isfinite(a.damp))) return Status::invalid("damp: expected a finite value > 0, got {}", a.damp);
  if (a.block_size < 1) return Status::invalid("block_size: expected >= 1, got {}", a.block_size);
  if (a.max_damp_escalations < 0)
    return Status::invalid("max_damp_escalations: expected >= 0, got {}", a.max_damp_escalations);
  if (!(a.damp_escalation_factor > 1.0 && std::isfinite(a.damp_escalation_factor)))
    return Status::invalid("damp_escalation_factor: expected a finite value > 1, got {}", a.damp_escalation_factor);
  MQ_RETURN_IF_ERROR(check_finite(w, "w"));
  for (int64_t r = 0; r < w.cols; ++r)
    for (int64_t c = 0; c < w.cols; ++c) {
      const double v = static_cast<double>(h[r * ldh + c]);
      if (!std::isfinite(v))
        return Status::invalid("h: expected finite values, got {} at ({}, {})", std::isnan(v) ? "NaN" : "Inf", r, c);
    }
  for (int64_t i = 0; i < w.cols; ++i) {
    const double v = static_cast<double>(h[i * ldh + i]);
    if (v < 0.0) return Status::invalid("h: expected a non-negative diagonal, got {} at ({}, {})", v, i, i);
  }
  return {};
}

/// Processing order: columns by descending diagonal, ties in column order (stable).
inline std::vector<int64_t> act_order_permutation(const std::vector<double>& diag) {
  std::vector<int64_t> perm(diag.size());
  std::iota(perm.begin(), perm.end(), int64_t{0});
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return diag[a] > diag[b]; });
  return perm;
}

inline Status not_positive_definite(int escalations, double fraction) {
  return Status::numerical(
      "h: the damped Hessian is not positive definite after {} damp escalations (damp fraction up to {}); "
      "collect more calibration tokens for this module, or raise damp / max_damp_escalations",
      escalations, fraction);
}

/// X = L^{-1} for the lower triangle L of `l` (its strict upper part is ignored); X is lower triangular.
/// Recursive 2x2 blocking, [[L11, 0], [L21, L22]]^{-1} = [[X11, 0], [-X22 L21 X11, X22]], keeps the work in
/// triangular matrix products (~n^3/3 flops); a triangular solve against the identity costs several times more.
inline void lower_triangular_inverse(const Eigen::Ref<const MatXd>& l, Eigen::Ref<MatXd> x) {
  const Eigen::Index n = l.rows();
  if (n <= 128) {
    x.setIdentity();
    l.triangularView<Eigen::Lower>().solveInPlace(x);
    return;
  }
  const Eigen::Index n1 = n / 2, n2 = n - n1;
  lower_triangular_inverse(l.topLeftCorner(n1, n1), x.topLeftCorner(n1, n1));
  lower_triangular_inverse(l.bottomRightCorner(n2, n2), x.bottomRightCorner(n2, n2));
  const MatXd t = l.bottomLeftCorner(n2, n1) * x.topLeftCorner(n1, n1).triangularView<Eigen::Lower>();
  x.bottomLeftCorner(n2, n1).noalias() = -(x.bottomRightCorner(n2, n2).triangularView<Eigen::Lower>() * t);
  x.topRightCorner(n1, n2).setZero();
}

/// U = upper Cholesky factor of (H + lambda I)^{-1}, escalating lambda while the factorisation fails.
/// H (symmetric, double) is consumed: it is reused as scratch. Uses the reversal J (J_ij = [i + j = n - 1]):
/// if chol(J H J) = L then H^{-1} = (J L^{-T} J)(J L^{-1} J) and J L^{-1} J is upper with a positive
/// diagonal, hence the unique upper Cholesky factor -- one factorisation and one triangular inverse instead
/// of chol -> cholesky_inverse -> chol.
inline Status inverse_upper_factor(MatXd& H, const GptqArgs& args, MatXf* U, GptqReport* rep) {
  const int64_t n = H.rows();
  const double mean_diag = H.diagonal().mean();
  MatXd A(n, n);
  double frac = args.damp;
  for (int k = 0;; ++k) {
    const double lambda = frac * mean_diag;
    rep->escalations = k;
    rep->damp_fraction = frac;
    rep->damp_value = lambda;
    A = H.reverse();
    A.diagonal().array() += lambda;
    Eigen::LLT<Eigen::Ref<MatXd>, Eigen::Lower> llt(A);  // in place: the lower triangle of A becomes L
    bool ok = llt.info() == Eigen::Success;
    for (int64_t i = 0; ok && i < n; ++i) ok = std::isfinite(A(i, i)) && A(i, i) > 0.0;
    if (ok) {
      lower_triangular_inverse(A, H);  // H = L^{-1}
      *U = H.reverse().cast<float>();
      const auto d = U->diagonal();
      bool good = U->allFinite();
      for (int64_t i = 0; good && i < n; ++i) good = d(i) > 0.0f;
      if (!good)
        return Status::numerical(
            "h: the inverse Hessian factor does not fit in float (entries of H too large or too small); "
            "normalise H (e.g. divide by the token count)");
      return {};
    }
    if (k >= args.max_damp_escalations) return not_positive_definite(k, frac);
    frac *= args.damp_escalation_factor;
  }
}

/// Steps 1 and 3-4 of the top of this file, shared by every GPTQ solver of the core (gptq_solve, gptq_solve_format
/// and its reference twin): the dead columns, the processing order and U.
struct GptqFactor {
  std::vector<double> diag;   // [cols] diag(h), dead columns set to 1
  std::vector<char> dead;     // [cols] 1 where diag(h) == 0
  std::vector<int64_t> perm;  // [cols] processing position -> original column (identity without act_order)
  MatXf U;                    // [cols, cols] upper Cholesky factor of (P^T H P + lambda I)^{-1}, processing order
};

/// Fills `f` for the (validated) Hessian h [cols, cols]: dead columns get H_ii = 1, act_order sorts the columns by
/// descending diagonal (stable), then U with damping escalation (args.damp, max_damp_escalations,
/// damp_escalation_factor; args.spec is not read). rep gets dead_columns and the damping, also on failure.
template <typename HT>
Status gptq_factor(const HT* h, int64_t ldh, int64_t cols, bool act_order, const GptqArgs& args, GptqFactor* f,
                   GptqReport* rep) {
  f->diag.assign(static_cast<size_t>(cols), 0.0);
  f->dead.assign(static_cast<size_t>(cols), 0);
  std::vector<double>& diag = f->diag;
  for (int64_t i = 0; i < cols; ++i) {
    diag[i] = static_cast<double>(h[i * ldh + i]);
    if (diag[i] == 0.0) {
      f->dead[i] = 1;
      diag[i] = 1.0;
      ++rep->dead_columns;
    }
  }
  f->perm.resize(static_cast<size_t>(cols));
  if (act_order) f->perm = act_order_permutation(diag);
  else std::iota(f->perm.begin(), f->perm.end(), int64_t{0});
  const std::vector<int64_t>& perm = f->perm;

  // permuted, dead-fixed H in double, and the inverse factor
  MatXd H(cols, cols);
  for (int64_t j = 0; j < cols; ++j)
    for (int64_t i = j; i < cols; ++i) {
      const int64_t a = std::max(perm[i], perm[j]), b = std::min(perm[i], perm[j]);
      const double v = a == b ? diag[a] : static_cast<double>(h[a * ldh + b]);  // lower triangle of h
      H(i, j) = v;
      H(j, i) = v;
    }
  return inverse_upper_factor(H, args, &f->U, rep);
}

}  // namespace detail

/// tr((W - Q) H (W - Q)^T) in double. q is [rows, cols] contiguous; h is [cols, cols] with leading dimension
/// ldh and, like in gptq_solve, only its lower triangle (r >= c) is read (h is taken as symmetric), which
/// halves the rows * cols^2 work. No validation: a building block for reports and tests.
template <typename HT>
double quadratic_loss(const MatrixView& w, const float* q, const HT* h, int64_t ldh) {
  detail::static_check_ht<HT>();
  const int64_t rows = w.rows, cols = w.cols;
  if (rows <= 0 || cols <= 0) return 0.0;
  detail::MatXd D(rows, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      D(r, c) = static_cast<double>(w.at(r, c)) - static_cast<double>(q[r * cols + c]);
  using HMap = Eigen::Map<const Eigen::Matrix<HT, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                          Eigen::OuterStride<>>;
  constexpr int64_t kPanel = 256;  // H is converted to double one panel of columns at a time
  double loss = 0.0;
  detail::MatXd diag_block, below, prod;
  for (int64_t c0 = 0; c0 < cols; c0 += kPanel) {
    const int64_t bw = std::min(kPanel, cols - c0), c1 = c0 + bw;
    const auto dc = D.middleCols(c0, bw);
    // diagonal block, symmetrised from its lower triangle
    diag_block.resize(bw, bw);
    for (int64_t j = 0; j < bw; ++j)
      for (int64_t i = j; i < bw; ++i)
        diag_block(i, j) = diag_block(j, i) = static_cast<double>(h[(c0 + i) * ldh + c0 + j]);
    prod.noalias() = dc * diag_block;
    loss += (prod.array() * dc.array()).sum();
    // the block below the diagonal stands for itself and its mirror above
    if (c1 < cols) {
      below = HMap(h + c1 * ldh + c0, cols - c1, bw, Eigen::OuterStride<>(ldh)).template cast<double>();
      prod.noalias() = D.rightCols(cols - c1) * below;
      loss += 2.0 * (prod.array() * dc.array()).sum();
    }
  }
  return loss;
}

/// GPTQ of one weight w [rows, cols] against the Hessian h [cols, cols] (HT = float or double); see the top
/// of this file. Outputs (any pointer may be null): codes [rows, cols] in [qmin, qmax], scales and zeros
/// [rows, groups], dequantized [rows, cols]. report may be null (then the loss is not computed).
template <typename HT>
Status gptq_solve(const MatrixView& w, const HT* h, int64_t ldh, const GptqArgs& args, const QuantizedOut& out,
                  GptqReport* report) {
  detail::static_check_ht<HT>();
  MQ_RETURN_IF_ERROR(detail::validate_gptq(w, h, ldh, args));
  const QuantSpec& s = args.spec;
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t gs = effective_group_size(s, cols), ng = num_groups(s, cols);
  GptqReport rep;
  try {
    // ---- dead columns, processing order, inverse factor (gptq_factor), static group parameters ----
    detail::GptqFactor fac;
    const Status fs = detail::gptq_factor(h, ldh, cols, args.act_order, args, &fac, &rep);
    if (report) *report = rep;
    MQ_RETURN_IF_ERROR(fs);
    const std::vector<char>& dead = fac.dead;
    const std::vector<int64_t>& perm = fac.perm;
    detail::MatXf& U = fac.U;

    std::vector<QParams> params(static_cast<size_t>(rows * ng));  // [rows, groups], original group order
    if (args.act_order) {
      std::vector<float> tmp(static_cast<size_t>(gs));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < ng; ++g) {
          for (int64_t i = 0; i < gs; ++i) tmp[i] = dead[g * gs + i] ? 0.0f : w.at(r, g * gs + i);
          params[r * ng + g] = compute_qparams(tmp.data(), gs, 1, s);
        }
    }

    // ---- the column loop (W column-major in processing order, float) ----
    detail::MatXf W(rows, cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) W(r, j) = dead[perm[j]] ? 0.0f : w.at(r, perm[j]);
    std::vector<int8_t> codes(static_cast<size_t>(rows * cols));  // column-major, processing order
    const int64_t B = std::min(args.block_size, cols);
    detail::MatXf err(rows, B);
    for (int64_t i1 = 0; i1 < cols; i1 += B) {
      const int64_t i2 = std::min(i1 + B, cols), nb = i2 - i1;
      for (int64_t j = i1; j < i2; ++j) {
        if (!args.act_order && j % gs == 0) {
          if (j + gs <= i2 || j == i1) {  // every column of the group carries all updates so far
            for (int64_t r = 0; r < rows; ++r) params[r * ng + j / gs] = compute_qparams(&W(r, j), gs, rows, s);
          } else {
            // The group runs past the block: apply the block's pending (lazy) updates to those columns first,
            // so the parameters do not depend on block_size.
            const int64_t past = j + gs - i2;
            detail::MatXf grp = W.middleCols(j, gs);
            grp.rightCols(past).noalias() -= err.leftCols(j - i1) * U.block(i1, i2, j - i1, past);
            for (int64_t r = 0; r < rows; ++r)
              params[r * ng + j / gs] = compute_qparams(&grp(r, 0), gs, rows, s);
          }
        }
        const int64_t g = perm[j] / gs;  // static groups: the column's original group
        const float d = U(j, j);
        float* wc = &W(0, j);
        float* ec = &err(0, j - i1);
        int8_t* cc = codes.data() + j * rows;
        for (int64_t r = 0; r < rows; ++r) {
          const QParams& p = params[r * ng + g];
          const int32_t q = quantize_value(wc[r], p, s.bits);
          cc[r] = static_cast<int8_t>(q);
          ec[r] = (wc[r] - dequantize_value(q, p)) / d;
        }
        if (j + 1 < i2)
          W.middleCols(j + 1, i2 - j - 1).noalias() -= err.col(j - i1) * U.row(j).segment(j + 1, i2 - j - 1);
      }
      if (i2 < cols) W.rightCols(cols - i2).noalias() -= err.leftCols(nb) * U.block(i1, i2, nb, cols - i2);
    }
    W.resize(0, 0);
    U.resize(0, 0);

    // ---- outputs in the original column order ----
    std::vector<float> dq_tmp;
    float* dq = out.dequantized;
    if (dq == nullptr && report != nullptr) {
      dq_tmp.resize(static_cast<size_t>(rows * cols));
      dq = dq_tmp.data();
    }
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t c = perm[j], g = c / gs;
      for (int64_t r = 0; r < rows; ++r) {
        const int8_t q = codes[j * rows + r];
        if (out.codes) out.codes[r * cols + c] = q;
        if (dq) dq[r * cols + c] = dequantize_value(q, params[r * ng + g]);
      }
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < ng; ++g) {
        if (out.scales) out.scales[r * ng + g] = params[r * ng + g].scale;
        if (out.zeros) out.zeros[r * ng + g] = params[r * ng + g].zero;
      }
    if (report) {
      rep.loss = quadratic_loss(w, dq, h, ldh);
      *report = rep;
    }
  } catch (const std::bad_alloc&) {
    return Status::invalid("w: could not allocate the GPTQ working memory for a [{}, {}] weight", rows, cols);
  }
  return {};
}

}  // namespace v0
}  // namespace moequant
