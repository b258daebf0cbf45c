// moequant/quant.h -- integer weight formats (2..8 bits, symmetric / asymmetric, group-wise / per-channel),
// their quantization parameters and scale search, with compressed-tensors semantics.
//
// Contract (restated in docs/formats.md; the Python twin is moequant.ref.quant):
//   W is row-major [rows = out_features, cols = in_features]. Group g of a row covers input columns
//   [g*group_size, (g+1)*group_size); group_size <= 0 means one group per row ("channel").
//   qmin = -2^(b-1), qmax = 2^(b-1) - 1.
//   The range [lo, hi] of a group is first widened to include 0 (lo <= 0 <= hi).
//   symmetric:  scale = max(|lo|, |hi|) / ((qmax - qmin) / 2),  zero = 0
//   asymmetric: scale = (hi - lo) / (qmax - qmin),  zero = clamp(round(qmin - lo / scale), qmin, qmax)
//   The scale is rounded to its storage dtype (fp32, bf16 or fp16, round-to-nearest-even) before the zero
//   point is derived from it, and a zero scale becomes that dtype's epsilon. The dequantized value that
//   the optimizers see is therefore exactly what a loader computes from the checkpoint.
//   quantize:   q = clamp(round(x / scale + zero), qmin, qmax)   (fp32 arithmetic, round half to even)
//   dequantize: x = (q - zero) * scale
//   MSE scale search: for shrink factors p_i = 1 - i / grid, i = 0..floor((1 - min_shrink) * grid), the
//   range [p*lo, p*hi] is tried and the one minimising sum |x - dequant(quant(x))|^norm (accumulated in
//   double) wins; ties keep the larger range.
#pragma once

#include <moequant/status.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace moequant {
inline namespace v0 {

/// Storage dtype of the scales (the checkpoint's weight dtype). Scales are rounded to it.
enum class ScaleDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

/// How the range of a group is chosen.
enum class ScaleSearch : int { kMinMax = 0, kMse = 1 };

inline const char* scale_search_name(ScaleSearch s) noexcept {
  return s == ScaleSearch::kMse ? "mse" : "minmax";
}

struct QuantSpec {
  int bits = 4;                  // 2..8
  bool symmetric = false;        // true: zero point 0
  int64_t group_size = 128;      // > 0: group-wise; <= 0: one group per row (per-channel)
  ScaleDtype scale_dtype = ScaleDtype::kFloat32;
  ScaleSearch search = ScaleSearch::kMinMax;
  int mse_grid = 100;            // grid steps of the shrink search
  double mse_min_shrink = 0.2;   // smallest shrink factor tried, in (0, 1]
  double mse_norm = 2.4;         // error exponent of the search
};

constexpr int kMinBits = 2;
constexpr int kMaxBits = 8;

constexpr int qmin_for(int bits) noexcept { return -(1 << (bits - 1)); }
constexpr int qmax_for(int bits) noexcept { return (1 << (bits - 1)) - 1; }

/// Checks the spec alone (bits, search parameters).
inline Status validate(const QuantSpec& s) {
  if (s.bits < kMinBits || s.bits > kMaxBits)
    return Status::invalid("bits: expected an integer in [{}, {}], got {}", kMinBits, kMaxBits, s.bits);
  if (s.search == ScaleSearch::kMse) {
    if (s.mse_grid < 1) return Status::invalid("mse_grid: expected >= 1, got {}", s.mse_grid);
    if (!(s.mse_min_shrink > 0.0 && s.mse_min_shrink <= 1.0))
      return Status::invalid("mse_min_shrink: expected a value in (0, 1], got {}", s.mse_min_shrink);
    if (!(s.mse_norm > 0.0 && std::isfinite(s.mse_norm)))
      return Status::invalid("mse_norm: expected a finite value > 0, got {}", s.mse_norm);
  }
  return {};
}

/// Checks the spec against a weight with `cols` input features.
inline Status validate(const QuantSpec& s, int64_t cols) {
  MQ_RETURN_IF_ERROR(validate(s));
  if (cols <= 0) return Status::invalid("in_features: expected > 0, got {}", cols);
  if (s.group_size > 0 && cols % s.group_size != 0)
    return Status::invalid("group_size: expected a divisor of in_features={} (or -1 for per-channel), got {}", cols,
                           s.group_size);
  return {};
}

/// Columns per group (the whole row for per-channel).
inline int64_t effective_group_size(const QuantSpec& s, int64_t cols) noexcept {
  return s.group_size > 0 ? s.group_size : cols;
}
inline int64_t num_groups(const QuantSpec& s, int64_t cols) noexcept { return cols / effective_group_size(s, cols); }

// ---- scale rounding -------------------------------------------------------------------------------------

namespace detail {
inline uint32_t float_bits(float f) noexcept {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace detail

/// Rounds a finite float to the nearest bfloat16 (ties to even) and returns it as float.
inline float round_to_bf16(float f) noexcept {
  uint32_t u = detail::float_bits(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return detail::bits_float(u & 0xFFFF0000u);
}

/// Rounds a finite float to the nearest IEEE half (ties to even, saturating to +-inf above 65504's range,
/// subnormals kept) and returns it as float.
inline float round_to_fp16(float f) noexcept {
  const float a = std::fabs(f);
  if (a >= 65520.0f) return std::copysign(std::numeric_limits<float>::infinity(), f);
  if (a < 6.103515625e-05f) {  // subnormal half: a multiple of 2^-24
    const float q = std::nearbyint(a * 16777216.0f) / 16777216.0f;
    return std::copysign(q, f);
  }
  // normal half: 10 mantissa bits; drop 13 bits of the float mantissa with round-to-nearest-even
  uint32_t u = detail::float_bits(f);
  u += 0x0FFFu + ((u >> 13) & 1u);
  return detail::bits_float(u & 0xFFFFE000u);
}

inline float round_scale(float s, ScaleDtype d) noexcept {
  switch (d) {
    case ScaleDtype::kBFloat16: return round_to_bf16(s);
    case ScaleDtype::kFloat16: return round_to_fp16(s);
    case ScaleDtype::kFloat32: break;
  }
  return s;
}

/// Machine epsilon of the scale's storage dtype: the scale of an all-zero group.
inline float scale_epsilon(ScaleDtype d) noexcept {
  switch (d) {
    case ScaleDtype::kBFloat16: return 0.0078125f;       // 2^-7
    case ScaleDtype::kFloat16: return 0.0009765625f;     // 2^-10
    case ScaleDtype::kFloat32: break;
  }
  return std::numeric_limits<float>::epsilon();
}

// ---- parameters, quantize, dequantize -------------------------------------------------------------------

struct QParams {
  float scale = 1.0f;
  int32_t zero = 0;
};

/// Parameters for the range [lo, hi] (widened to include 0 here).
inline QParams qparams_from_range(float lo, float hi, const QuantSpec& s) noexcept {
  const int qmin = qmin_for(s.bits), qmax = qmax_for(s.bits);
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  QParams p;
  if (s.symmetric) {
    const float amax = std::max(-lo, hi);
    p.scale = amax / (static_cast<float>(qmax - qmin) / 2.0f);
  } else {
    p.scale = (hi - lo) / static_cast<float>(qmax - qmin);
  }
  p.scale = round_scale(p.scale, s.scale_dtype);
  if (p.scale == 0.0f) p.scale = scale_epsilon(s.scale_dtype);
  if (!s.symmetric) {
    const float z = std::nearbyint(static_cast<float>(qmin) - lo / p.scale);
    p.zero = static_cast<int32_t>(std::min(std::max(z, static_cast<float>(qmin)), static_cast<float>(qmax)));
  }
  return p;
}

inline int32_t quantize_value(float x, const QParams& p, int bits) noexcept {
  const float v = std::nearbyint(x / p.scale + static_cast<float>(p.zero));
  const float c = std::min(std::max(v, static_cast<float>(qmin_for(bits))), static_cast<float>(qmax_for(bits)));
  return static_cast<int32_t>(c);
}

inline float dequantize_value(int32_t q, const QParams& p) noexcept {
  return static_cast<float>(q - p.zero) * p.scale;
}

/// Parameters of one group of `n` values x[0], x[stride], ... according to the spec's scale search.
template <typename T>
QParams compute_qparams(const T* x, int64_t n, int64_t stride, const QuantSpec& s) noexcept {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i * stride]);
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  QParams best = qparams_from_range(lo, hi, s);
  if (s.search != ScaleSearch::kMse) return best;
  auto err_of = [&](const QParams& p) {
    double e = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float v = static_cast<float>(x[i * stride]);
      const float d = dequantize_value(quantize_value(v, p, s.bits), p);
      e += std::pow(std::fabs(static_cast<double>(v) - static_cast<double>(d)), s.mse_norm);
    }
    return e;
  };
  double best_err = err_of(best);
  const int steps = static_cast<int>(std::floor((1.0 - s.mse_min_shrink) * s.mse_grid + 1e-9));
  for (int i = 1; i <= steps; ++i) {
    const float shrink = static_cast<float>(1.0 - static_cast<double>(i) / s.mse_grid);
    const QParams p = qparams_from_range(shrink * lo, shrink * hi, s);
    const double e = err_of(p);
    if (e < best_err) {
      best_err = e;
      best = p;
    }
  }
  return best;
}

/// A row-major view of a float matrix with a leading dimension (elements between rows).
struct MatrixView {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0, ld = 0;
  float at(int64_t r, int64_t c) const noexcept { return data[r * ld + c]; }
};

/// Checks that every element is finite; names `arg` and the first bad position.
inline Status check_finite(const MatrixView& m, const char* arg) {
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t c = 0; c < m.cols; ++c) {
      const float v = m.at(r, c);
      if (!std::isfinite(v))
        return Status::invalid("{}: expected finite values, got {} at ({}, {})", arg, std::isnan(v) ? "NaN" : "Inf",
                               r, c);
    }
  return {};
}

/// Output buffers of a quantized matrix (all row-major, contiguous). Any pointer may be null to skip it.
struct QuantizedOut {
  int8_t* codes = nullptr;       // [rows, cols], values in [qmin, qmax]
  float* scales = nullptr;       // [rows, groups]
  int32_t* zeros = nullptr;      // [rows, groups], 0 when symmetric
  float* dequantized = nullptr;  // [rows, cols]
};

/// Round-to-nearest quantization of W with per-group parameters from the spec's scale search.
inline Status quantize_rtn(const MatrixView& w, const QuantSpec& s, const QuantizedOut& out) {
  MQ_RETURN_IF_ERROR(validate(s, w.cols));
  if (w.rows < 0) return Status::invalid("out_features: expected >= 0, got {}", w.rows);
  MQ_RETURN_IF_ERROR(check_finite(w, "w"));
  const int64_t gs = effective_group_size(s, w.cols), ng = num_groups(s, w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t g = 0; g < ng; ++g) {
      const float* x = w.data + r * w.ld + g * gs;
      const QParams p = compute_qparams(x, gs, 1, s);
      if (out.scales) out.scales[r * ng + g] = p.scale;
      if (out.zeros) out.zeros[r * ng + g] = p.zero;
      for (int64_t i = 0; i < gs; ++i) {
        const int32_t q = quantize_value(x[i], p, s.bits);
        const int64_t o = r * w.cols + g * gs + i;
        if (out.codes) out.codes[o] = static_cast<int8_t>(q);
        if (out.dequantized) out.dequantized[o] = dequantize_value(q, p);
      }
    }
  }
  return {};
}

/// Dequantizes codes with per-group parameters: out = (codes - zero) * scale.
inline Status dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows, int64_t cols,
                         const QuantSpec& s, float* out) {
  MQ_RETURN_IF_ERROR(validate(s, cols));
  const int64_t gs = effective_group_size(s, cols), ng = num_groups(s, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t g = c / gs;
      const QParams p{scales[r * ng + g], zeros ? zeros[r * ng + g] : 0};
      out[r * cols + c] = dequantize_value(codes[r * cols + c], p);
    }
  return {};
}

}  // namespace v0
}  // namespace moequant
