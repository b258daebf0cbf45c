// bindings/checks.h -- argument checks and Status -> exception mapping at the Python boundary.
//
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into RuntimeError. Every
// message names the argument, the expected value and the actual value.
#pragma once

#include <moequant/status.h>

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moequant {
namespace bindings {

/// Throws the exception that matches a failed core Status.
inline void throw_if_error(const Status& s) {
  if (s.ok()) return;
  if (s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kNotSupported)
    throw std::invalid_argument(s.message());
  throw std::runtime_error(s.to_string());
}

inline std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + "]";
}

inline std::string dtype_str(at::ScalarType t) { return std::string(c10::toString(t)); }

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  if (t.scalar_type() != expected)
    throw std::invalid_argument(
        fmt::format("{}: expected dtype {}, got {}", name, dtype_str(expected), dtype_str(t.scalar_type())));
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  if (t.dim() != dim)
    throw std::invalid_argument(
        fmt::format("{}: expected a {}-D tensor, got {}-D with shape {}", name, dim, t.dim(), shape_str(t)));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  if (!t.is_contiguous())
    throw std::invalid_argument(fmt::format("{}: expected a contiguous tensor (call .contiguous()), got strides "
                                            "that are not row-major for shape {}",
                                            name, shape_str(t)));
}

inline void check_size(const at::Tensor& t, const char* name, int64_t dim, int64_t expected) {
  if (t.size(dim) != expected)
    throw std::invalid_argument(fmt::format("{}: expected size {} in dimension {}, got shape {}", name, expected, dim,
                                            shape_str(t)));
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  if (t.device() != ref.device())
    throw std::invalid_argument(fmt::format("{}: expected a tensor on {}'s device {}, got {}", name, ref_name,
                                            ref.device().str(), t.device().str()));
}

}  // namespace bindings
}  // namespace moequant
