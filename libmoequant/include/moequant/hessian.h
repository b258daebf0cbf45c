// moequant/hessian.h -- routing-weighted Hessian accumulation for many experts at once.
//
// For every expert e:  H_e += sum_i c_i x_i x_i^T  over the rows i routed to e (expert_ids[i] == e),
// counts[e] += number of such rows, mass[e] += sum_i c_i. c_i is the routing weight of the (token, expert)
// pair (the AGQ affinity) or 1 when `weights` is null. A token routed to k experts appears as k rows.
// H_e is stored row-major [dim, dim] and kept fully symmetric. The sum is not normalised: divide by counts
// (or mass) when handing it to GPTQ; GPTQ is invariant to a positive scale of H.
//
// Every input is validated before H is touched, so an error leaves the outputs exactly as they were.
// The result is deterministic: rows are grouped by expert with one stable counting sort and each expert's
// rows are reduced in a fixed chunk order.
#pragma once

#include <moequant/status.h>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

namespace moequant {
inline namespace v0 {

namespace detail {

template <typename Acc>
constexpr void static_check_acc() {
  static_assert(std::is_same<Acc, float>::value || std::is_same<Acc, double>::value,
                "moequant: Hessian accumulator type must be float or double");
}

/// Checks every argument of a Hessian accumulation (outputs excluded).
inline Status validate_hessian_inputs(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                                      const float* weights, int64_t num_experts) {
  if (dim <= 0) return Status::invalid("dim: expected > 0, got {}", dim);
  if (n < 0) return Status::invalid("n: expected >= 0, got {}", n);
  if (ldx < dim) return Status::invalid("ldx: expected >= dim={}, got {}", dim, ldx);
  if (num_experts <= 0) return Status::invalid("num_experts: expected > 0, got {}", num_experts);
  if (n == 0) return {};
  if (x == nullptr) return Status::invalid("x: expected a pointer to {} rows, got null", n);
  if (expert_ids == nullptr) return Status::invalid("expert_ids: expected a pointer to {} ids, got null", n);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t e = expert_ids[i];
    if (e < 0 || e >= num_experts)
      return Status::invalid("expert_ids: expected values in [0, {}), got {} at row {}", num_experts, e, i);
    if (weights != nullptr) {
      const float c = weights[i];
      if (!(std::isfinite(c) && c >= 0.0f))
        return Status::invalid("weights: expected finite values >= 0, got {} at row {}", c, i);
    }
    const float* xi = x + i * ldx;
    for (int64_t j = 0; j < dim; ++j)
      if (!std::isfinite(xi[j]))
        return Status::invalid("x: expected finite values, got {} at ({}, {})", std::isnan(xi[j]) ? "NaN" : "Inf", i,
                               j);
  }
  return {};
}

/// Copies the strict lower triangle of a column-major symmetric matrix onto its strict upper triangle.
template <typename Acc>
void mirror_lower(Acc* h, int64_t dim) {
  for (int64_t c = 0; c < dim; ++c)
    for (int64_t r = c + 1; r < dim; ++r) h[r * dim + c] = h[c * dim + r];
}

}  // namespace detail

/// Rows gathered per rank-k update: bounds the scratch buffer to kHessianChunkRows * dim accumulators.
constexpr int64_t kHessianChunkRows = 1024;

/// H[e] += sum c_i x_i x_i^T for the rows of x routed to e; see the top of this file.
///   x           [n, dim] row-major, leading dimension ldx >= dim
///   expert_ids  [n], values in [0, num_experts)
///   weights     [n], finite and >= 0, or null for all ones
///   H           [num_experts, dim, dim] row-major, symmetric on entry and on exit
///   counts      [num_experts] rows per expert (may be null to skip)
///   mass        [num_experts] sum of weights per expert (may be null to skip)
template <typename Acc>
Status accumulate_hessian(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids,
                          const float* weights, int64_t num_experts, Acc* H, int64_t* counts, double* mass) {
  detail::static_check_acc<Acc>();
  MQ_RETURN_IF_ERROR(detail::validate_hessian_inputs(x, n, dim, ldx, expert_ids, weights, num_experts));
  if (H == nullptr) return Status::invalid("H: expected a pointer to [{}, {}, {}] accumulators, got null", num_experts,
                                           dim, dim);
  if (n == 0) return {};
  using Mat = Eigen::Matrix<Acc, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
  try {
    // One stable counting sort groups the rows by expert (O(n + E), not one scan of all rows per expert).
    std::vector<int64_t> start(static_cast<size_t>(num_experts) + 1, 0);
    for (int64_t i = 0; i < n; ++i) ++start[static_cast<size_t>(expert_ids[i]) + 1];
    for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
    std::vector<int64_t> order(static_cast<size_t>(n));
    {
      std::vector<int64_t> fill(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < n; ++i) order[fill[expert_ids[i]]++] = i;
    }
    Mat xt;  // [dim, chunk]: column j is sqrt(c) * x of the j-th gathered row
    for (int64_t e = 0; e < num_experts; ++e) {
      const int64_t b = start[e], rows = start[e + 1] - b;
      if (rows == 0) continue;  // untouched, including its (possibly non-zero) H
      // H is symmetric, so its row-major storage is also a valid column-major view of the same matrix.
      Eigen::Map<Mat> he(H + e * dim * dim, dim, dim);
      double m = 0.0;
      for (int64_t c0 = 0; c0 < rows; c0 += kHessianChunkRows) {
        const int64_t k = std::min(kHessianChunkRows, rows - c0);
        xt.resize(dim, k);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t i = order[b + c0 + j];
          const float c = weights ? weights[i] : 1.0f;
          m += static_cast<double>(c);
          const Acc s = std::sqrt(static_cast<Acc>(c));
          const float* xi = x + i * ldx;
          Acc* col = xt.data() + j * dim;
          for (int64_t d = 0; d < dim; ++d) col[d] = s * static_cast<Acc>(xi[d]);
        }
        he.template selfadjointView<Eigen::Lower>().rankUpdate(xt);  // lower += xt xt^T (a SYRK)
      }
      detail::mirror_lower(H + e * dim * dim, dim);
      if (counts) counts[e] += rows;
      if (mass) mass[e] += m;
    }
  } catch (const std::bad_alloc&) {
    return Status::invalid("n: could not allocate the scratch buffers for {} rows of dim {}", n, dim);
  }
  return {};
}

/// Owns the Hessians, counts and masses of `num_experts` experts of input dimension `dim`.
/// Create with HessianAccumulator<Acc>::create (never throws); a default-constructed one is empty (E = 0).
template <typename Acc>
class HessianAccumulator {
 public:
  HessianAccumulator() { detail::static_check_acc<Acc>(); }

  static Status create(int64_t num_experts, int64_t dim, HessianAccumulator* out) {
    if (out == nullptr) return Status::invalid("out: expected a HessianAccumulator pointer, got null");
    if (num_experts <= 0) return Status::invalid("num_experts: expected > 0, got {}", num_experts);
    if (dim <= 0) return Status::invalid("dim: expected > 0, got {}", dim);
    const int64_t max_elems = std::numeric_limits<int64_t>::max() / static_cast<int64_t>(sizeof(Acc));
    if (dim > max_elems / dim || num_experts > max_elems / (dim * dim))
      return Status::invalid("num_experts, dim: [{}, {}, {}] accumulators overflow the address space", num_experts,
                             dim, dim);
    HessianAccumulator a;
    try {
      a.h_.assign(static_cast<size_t>(num_experts * dim * dim), Acc(0));
      a.counts_.assign(static_cast<size_t>(num_experts), 0);
      a.mass_.assign(static_cast<size_t>(num_experts), 0.0);
    } catch (const std::bad_alloc&) {
      return Status::invalid("num_experts, dim: could not allocate [{}, {}, {}] accumulators ({} bytes)", num_experts,
                             dim, dim, num_experts * dim * dim * static_cast<int64_t>(sizeof(Acc)));
    }
    a.num_experts_ = num_experts;
    a.dim_ = dim;
    *out = std::move(a);
    return {};
  }

  /// Adds n rows (x is [n, dim] with leading dimension ldx); weights may be null (all ones).
  Status add(const float* x, int64_t n, int64_t ldx, const int32_t* expert_ids, const float* weights) {
    if (num_experts_ == 0) return Status::invalid("this: expected a HessianAccumulator made by create(), got an empty one");
    return accumulate_hessian<Acc>(x, n, dim_, ldx, expert_ids, weights, num_experts_, h_.data(), counts_.data(),
                                   mass_.data());
  }

  /// The same arguments as accumulate_hessian minus the outputs; dim and num_experts must match this one's.
  Status add(const float* x, int64_t n, int64_t dim, int64_t ldx, const int32_t* expert_ids, const float* weights,
             int64_t num_experts) {
    if (dim != dim_) return Status::invalid("dim: expected {} (the accumulator's), got {}", dim_, dim);
    if (num_experts != num_experts_)
      return Status::invalid("num_experts: expected {} (the accumulator's), got {}", num_experts_, num_experts);
    return add(x, n, ldx, expert_ids, weights);
  }

  /// Adds another accumulator's sums (e.g. one filled by another thread or process).
  Status merge(const HessianAccumulator& other) {
    if (other.num_experts_ != num_experts_ || other.dim_ != dim_)
      return Status::invalid("other: expected an accumulator of {} experts and dim {}, got {} experts and dim {}",
                             num_experts_, dim_, other.num_experts_, other.dim_);
    for (size_t i = 0; i < h_.size(); ++i) h_[i] += other.h_[i];
    for (size_t e = 0; e < counts_.size(); ++e) {
      counts_[e] += other.counts_[e];
      mass_[e] += other.mass_[e];
    }
    return {};
  }

  /// Zeroes every sum, keeping the sizes.
  void reset() {
    std::fill(h_.begin(), h_.end(), Acc(0));
    std::fill(counts_.begin(), counts_.end(), 0);
    std::fill(mass_.begin(), mass_.end(), 0.0);
  }

  int64_t num_experts() const noexcept { return num_experts_; }
  int64_t dim() const noexcept { return dim_; }
  /// Expert e's [dim, dim] row-major symmetric sum (e must be in [0, num_experts)).
  const Acc* hessian(int64_t e) const noexcept { return h_.data() + e * dim_ * dim_; }
  Acc* hessian(int64_t e) noexcept { return h_.data() + e * dim_ * dim_; }
  /// All Hessians, [num_experts, dim, dim].
  const Acc* data() const noexcept { return h_.data(); }
  const int64_t* counts() const noexcept { return counts_.data(); }
  const double* mass() const noexcept { return mass_.data(); }

 private:
  int64_t num_experts_ = 0, dim_ = 0;
  std::vector<Acc> h_;
  std::vector<int64_t> counts_;
  std::vector<double> mass_;
};

}  // namespace v0
}  // namespace moequant
