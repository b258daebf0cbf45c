// Shared helpers of the Catch2 tests: seeded random matrices and small status matchers.
#pragma once

#include <moequant/status.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace mqtest {

/// [rows, cols] row-major standard normal values (mt19937 with a fixed seed: reproducible on one stdlib).
inline std::vector<float> random_matrix(int64_t rows, int64_t cols, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> m(static_cast<size_t>(rows * cols));
  for (float& v : m) v = scale * dist(gen);
  return m;
}

inline bool contains(const std::string& s, const std::string& sub) { return s.find(sub) != std::string::npos; }

/// True when st failed with `code` and its message mentions `word`.
inline bool fails_with(const moequant::Status& st, moequant::StatusCode code, const std::string& word) {
  return !st.ok() && st.code() == code && contains(st.message(), word);
}

}  // namespace mqtest
