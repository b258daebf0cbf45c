// moequant/hadamard.h -- the orthonormal Hadamard transform along the last dimension (CPU).
//
// Contract (the Python twin is moequant.ref.hadamard_ref; the CUDA twin is cuda_hadamard in kernels.h):
//   n = m * p with p = 2^k and m in {1, 12, 20, 28, 40}, n <= 32768 (hadamard_tables::decompose picks m = 1 when
//   n is a power of two, else the smallest m that works, so 40 * 2^k runs as 20 * 2^(k+1));
//   out[row] = x[row] (H_m (x) H_p) / sqrt(n), where H_p is the Sylvester matrix (H_p[i][j] = (-1)^popcount(i & j))
//   and H_m the sign table of hadamard_tables.h. Index a * p + b of a row is the (a, b) entry of the [m, p] view,
//   so out = H_m^T X H_p with X the row as an [m, p] matrix: a fast Walsh-Hadamard transform of each of the m
//   segments, then a dense +-1 mix across segments.
// Arithmetic is float32 (butterflies in natural order, then the mix summed over a in order, then one multiply by
// 1/sqrt(n)); the GPU uses a different butterfly order, so the two agree to float rounding, not bit for bit.
#pragma once

#include <moequant/hadamard_tables.h>
#include <moequant/status.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

namespace moequant {
inline namespace v0 {

/// True when n is a supported transform length.
inline bool hadamard_supported(int64_t n) noexcept {
  int m = 0;
  int64_t p = 0;
  return hadamard_tables::decompose(n, &m, &p);
}

/// The supported lengths, in words (for error messages).
inline const char* hadamard_supported_text() noexcept {
  return "a power of two up to 32768, or 12, 20, 28 or 40 times a power of two, with n <= 32768 "
         "(e.g. 7168 = 28 * 256)";
}

/// Sign of entry (r, c) of the order-m table (m = 1: +1).
inline float hadamard_sign(int m, int r, int c) noexcept {
  const char* t = hadamard_tables::table(m);
  return (t == nullptr || t[r * m + c] == '+') ? 1.0f : -1.0f;
}

/// In-place unnormalized fast Walsh-Hadamard transform of v[0..p) (p a power of two), natural (Sylvester) order.
inline void fwht_inplace(float* v, int64_t p) noexcept {
  for (int64_t h = 1; h < p; h *= 2)
    for (int64_t i = 0; i < p; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

/// out [rows, n] = x [rows, n] (H_m (x) H_p) / sqrt(n), both row-major and contiguous; out may equal x.
inline Status hadamard_transform(const float* x, float* out, int64_t rows, int64_t n) {
  int m = 0;
  int64_t p = 0;
  if (!hadamard_tables::decompose(n, &m, &p))
    return Status::invalid("x: expected a last dimension of {}, got {}", hadamard_supported_text(), n);
  if (rows < 0) return Status::invalid("rows: expected >= 0, got {}", rows);
  if (rows > 0 && (x == nullptr || out == nullptr))
    return Status::invalid("{}: expected a pointer to [{}, {}] floats, got null", x == nullptr ? "x" : "out", rows, n);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  std::vector<float> seg;
  try {
    if (m > 1) seg.resize(static_cast<size_t>(m));
  } catch (const std::bad_alloc&) {
    return Status::invalid("x: could not allocate {} floats of scratch", m);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* o = out + r * n;
    if (o != x + r * n) std::memcpy(o, x + r * n, static_cast<size_t>(n) * sizeof(float));
    for (int a = 0; a < m; ++a) fwht_inplace(o + a * p, p);
    if (m > 1) {
      for (int64_t b = 0; b < p; ++b) {
        for (int a = 0; a < m; ++a) seg[a] = o[a * p + b];
        for (int c = 0; c < m; ++c) {
          float acc = 0.0f;
          for (int a = 0; a < m; ++a) acc += hadamard_sign(m, a, c) * seg[a];  // (H_m^T X)[c][b]
          o[c * p + b] = acc;
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) o[i] *= scale;
  }
  return {};
}

}  // namespace v0
}  // namespace moequant
