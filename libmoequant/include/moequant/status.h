// moequant/status.h -- the error model of the core.
//
// Every fallible core function returns a `Status`. The core never throws, never calls abort()/exit(),
// and never prints: a failure is a code plus a message that names the argument, the expected value and
// the actual value ("w: expected a finite value, got NaN at (3, 17)"). The Python binding turns
// kInvalidArgument / kNotSupported into ValueError and everything else into RuntimeError.
#pragma once

#include <fmt/format.h>

#include <string>
#include <utility>

namespace moequant {
inline namespace v0 {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument = 1,  // a precondition on an argument failed (shape, dtype, range, NaN)
  kNotSupported = 2,     // a valid request this build or format cannot serve
  kNumericalError = 3,   // e.g. a Hessian that stays indefinite after every damping escalation
  kCudaError = 4,        // a CUDA / cuBLAS / cuSOLVER call failed
  kInternal = 5,         // a bug: an invariant of the library itself failed
};

inline const char* status_code_name(StatusCode c) noexcept {
  switch (c) {
    case StatusCode::kOk: return "ok";
    case StatusCode::kInvalidArgument: return "invalid argument";
    case StatusCode::kNotSupported: return "not supported";
    case StatusCode::kNumericalError: return "numerical error";
    case StatusCode::kCudaError: return "CUDA error";
    case StatusCode::kInternal: return "internal error";
  }
  return "unknown";
}

class [[nodiscard]] Status {
 public:
  Status() = default;  // ok
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok_status() { return {}; }
  template <typename... Args>
  static Status invalid(fmt::format_string<Args...> f, Args&&... args) {
    return {StatusCode::kInvalidArgument, fmt::format(f, std::forward<Args>(args)...)};
  }
  template <typename... Args>
  static Status not_supported(fmt::format_string<Args...> f, Args&&... args) {
    return {StatusCode::kNotSupported, fmt::format(f, std::forward<Args>(args)...)};
  }
  template <typename... Args>
  static Status numerical(fmt::format_string<Args...> f, Args&&... args) {
    return {StatusCode::kNumericalError, fmt::format(f, std::forward<Args>(args)...)};
  }
  template <typename... Args>
  static Status cuda(fmt::format_string<Args...> f, Args&&... args) {
    return {StatusCode::kCudaError, fmt::format(f, std::forward<Args>(args)...)};
  }
  template <typename... Args>
  static Status internal(fmt::format_string<Args...> f, Args&&... args) {
    return {StatusCode::kInternal, fmt::format(f, std::forward<Args>(args)...)};
  }

  bool ok() const noexcept { return code_ == StatusCode::kOk; }
  StatusCode code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  std::string to_string() const {
    return ok() ? std::string("ok") : fmt::format("{}: {}", status_code_name(code_), message_);
  }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

// Propagate a failed Status from the current function.
#define MQ_RETURN_IF_ERROR(expr)              \
  do {                                        \
    ::moequant::Status _mq_status = (expr);   \
    if (!_mq_status.ok()) return _mq_status;  \
  } while (0)

}  // namespace v0
}  // namespace moequant
