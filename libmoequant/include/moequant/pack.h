// moequant/pack.h -- the compressed-tensors `pack-quantized` int32 layout, bit-exact.
//
// Contract (compressed-tensors >= 0.17 for every width; identical to all earlier versions for 2, 4 and 8 bits;
// docs/formats.md restates it):
//   * a signed code q in [-2^(b-1), 2^(b-1)-1] is stored as the unsigned value u = q + 2^(b-1) in b bits;
//   * packing runs along the last (input) dimension of a row: element i of the row occupies bits
//     [i*b, i*b + b) of the row's bit stream, least significant bits first; word c of the row holds stream
//     bits [32c, 32c + 32) (so for 4 bits word c holds elements 8c..8c+7, element 8c+j in bits 4j..4j+3);
//     for 3, 5, 6 and 7 bits a value may straddle two words ("dense cross-word packing");
//   * a row of n codes takes ceil(n*b/32) words; the tail is zero bits; words are reinterpreted as int32;
//   * zero points [out, groups] are packed with the same rule along the output dimension (column by column),
//     giving [ceil(out*b/32), groups].
// Golden values: [-8..-1] at 4 bits -> 0x76543210; [0..7] -> 0xFEDCBA98; eight zeros -> 0x88888888.
#pragma once

#include <moequant/quant.h>
#include <moequant/status.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {

/// int32 words per packed row of `n` codes.
constexpr int64_t packed_words(int64_t n, int bits) noexcept { return (n * bits + 31) / 32; }

namespace detail {
inline Status check_bits(int bits) {
  if (bits < kMinBits || bits > kMaxBits)
    return Status::invalid("bits: expected an integer in [{}, {}], got {}", kMinBits, kMaxBits, bits);
  return {};
}
}  // namespace detail

/// Packs `n` codes read with stride `in_stride` into `packed_words(n, bits)` words written with stride
/// `out_stride`. Codes outside [qmin, qmax] are an error naming the first one.
inline Status pack_codes(const int8_t* q, int64_t n, int64_t in_stride, int bits, int32_t* out, int64_t out_stride) {
  MQ_RETURN_IF_ERROR(detail::check_bits(bits));
  const int qmin = qmin_for(bits), qmax = qmax_for(bits);
  const uint32_t offset = 1u << (bits - 1), mask = (1u << bits) - 1u;
  const int64_t words = packed_words(n, bits);
  for (int64_t w = 0; w < words; ++w) out[w * out_stride] = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int v = q[i * in_stride];
    if (v < qmin || v > qmax)
      return Status::invalid("q: expected codes in [{}, {}] for {} bits, got {} at element {}", qmin, qmax, bits, v,
                             i);
    const uint64_t u = (static_cast<uint32_t>(v + static_cast<int>(offset)) & mask);
    const int64_t bit = i * bits, word = bit / 32;
    const int shift = static_cast<int>(bit % 32);
    const uint64_t placed = u << shift;  // up to 39 bits: the high part spills into the next word
    uint32_t lo = static_cast<uint32_t>(out[word * out_stride]);
    lo |= static_cast<uint32_t>(placed & 0xFFFFFFFFu);
    out[word * out_stride] = static_cast<int32_t>(lo);
    if (shift + bits > 32) {
      uint32_t hi = static_cast<uint32_t>(out[(word + 1) * out_stride]);
      hi |= static_cast<uint32_t>(placed >> 32);
      out[(word + 1) * out_stride] = static_cast<int32_t>(hi);
    }
  }
  return {};
}

/// Unpacks `n` codes from `packed_words(n, bits)` words (the inverse of pack_codes).
inline Status unpack_codes(const int32_t* packed, int64_t n, int64_t in_stride, int bits, int8_t* q,
                           int64_t out_stride) {
  MQ_RETURN_IF_ERROR(detail::check_bits(bits));
  const int offset = 1 << (bits - 1);
  const uint64_t mask = (1u << bits) - 1u;
  const int64_t words = packed_words(n, bits);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bit = i * bits, word = bit / 32;
    const int shift = static_cast<int>(bit % 32);
    uint64_t v = static_cast<uint32_t>(packed[word * in_stride]);
    if (word + 1 < words) v |= static_cast<uint64_t>(static_cast<uint32_t>(packed[(word + 1) * in_stride])) << 32;
    q[i * out_stride] = static_cast<int8_t>(static_cast<int>((v >> shift) & mask) - offset);
  }
  return {};
}

/// Packs a row-major [rows, cols] code matrix along its rows: out is [rows, packed_words(cols, bits)].
inline Status pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out) {
  if (rows < 0 || cols < 0) return Status::invalid("q: expected a non-negative shape, got [{}, {}]", rows, cols);
  const int64_t words = packed_words(cols, bits);
  for (int64_t r = 0; r < rows; ++r) MQ_RETURN_IF_ERROR(pack_codes(q + r * cols, cols, 1, bits, out + r * words, 1));
  return detail::check_bits(bits);
}

/// Unpacks [rows, packed_words(cols, bits)] words into a row-major [rows, cols] code matrix.
inline Status unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q) {
  if (rows < 0 || cols < 0) return Status::invalid("in_features: expected >= 0, got {}", cols);
  const int64_t words = packed_words(cols, bits);
  for (int64_t r = 0; r < rows; ++r)
    MQ_RETURN_IF_ERROR(unpack_codes(packed + r * words, cols, 1, bits, q + r * cols, 1));
  return detail::check_bits(bits);
}

/// Packs zero points [out, groups] (row-major) along the output dimension: result [packed_words(out), groups].
inline Status pack_columns(const int8_t* zp, int64_t out_rows, int64_t groups, int bits, int32_t* out) {
  for (int64_t g = 0; g < groups; ++g) MQ_RETURN_IF_ERROR(pack_codes(zp + g, out_rows, groups, bits, out + g, groups));
  return detail::check_bits(bits);
}

/// Inverse of pack_columns.
inline Status unpack_columns(const int32_t* packed, int64_t out_rows, int64_t groups, int bits, int8_t* zp) {
  for (int64_t g = 0; g < groups; ++g)
    MQ_RETURN_IF_ERROR(unpack_codes(packed + g, out_rows, groups, bits, zp + g, groups));
  return detail::check_bits(bits);
}

}  // namespace v0
}  // namespace moequant
