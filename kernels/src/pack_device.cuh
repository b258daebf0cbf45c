// kernels/src/pack_device.cuh -- one 32-element chunk of compressed-tensors int32 packing / unpacking
// (libmoequant/include/moequant/pack.h, bit for bit), for the chunk kernels of quant_pack.cu.
// __host__ __device__: the host build of the same code can be checked against pack.h without a GPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace pack_detail {

// ---- pack / unpack: one chunk of 32 elements (= exactly B words) per thread ---------------------------------------
// Element j of a chunk sits at chunk bit j*B, i.e. word (j*B)/32, shift (j*B)%32 (compile-time constants); an element
// that crosses a word boundary puts its high bits into the next word -- pack.h's `placed` and `placed >> 32`. A row of
// cols elements is ceil(cols / 32) chunks; the last may be partial (its tail bits stay zero, its words end at the
// row's word count). `vec` (cols % 32 == 0, 16-byte aligned buffers): the chunks of all rows are contiguous in both
// q and the words, so chunk g is simply bytes [32g, 32g + 32) and words [Bg, Bg + B), moved with vector accesses.

// Read-only loads through the texture path on the device; plain loads in the host build (used to check the chunk
// code against pack.h without a GPU).
template <class T>
__host__ __device__ inline T ld(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// How a chunk reports an out-of-range code: `first` (a device word pre-set to kNoBadIndex) receives the smallest bad
// linear index by atomicMin; without it, `any` (a word the host cleared, typically page-locked host memory mapped
// into the device's address space) is set to 1 by a plain store -- every writer stores the same value, so no atomic
// is needed, and the host finds the first offender in a second pass only when the word is set.
struct BadReport {
  unsigned long long* first = nullptr;
  unsigned int* any = nullptr;
};

__host__ __device__ inline void report_bad(const BadReport& bad, int64_t at) {
  if (bad.first == nullptr) {
    *bad.any = 1u;
    return;
  }
#ifdef __CUDA_ARCH__
  atomicMin(bad.first, static_cast<unsigned long long>(at));
#else
  if (static_cast<unsigned long long>(at) < *bad.first) *bad.first = static_cast<unsigned long long>(at);
#endif
}

// Vector width (in 32-bit words) of a chunk's B words: chunk g starts at byte 4Bg.
template <int B>
constexpr int chunk_vec_words() {
  return B % 4 == 0 ? 4 : (B % 2 == 0 ? 2 : 1);
}

// Packs the 32 bytes of raw (4 codes per word, element j in byte j % 4 of raw[j / 4]) into B words. The offset
// code is (v + 2^(B-1)) mod 2^B = the low B bits of the byte with bit B-1 flipped, computed four bytes at a time.
template <int B>
__host__ __device__ inline void pack_chunk(const uint32_t (&raw)[8], uint32_t (&o)[B]) {
  constexpr uint32_t kRep = 0x01010101u;
  constexpr uint32_t kFlip = (1u << (B - 1)) * kRep, kMask = ((1u << B) - 1u) * kRep;
#pragma unroll
  for (int k = 0; k < B; ++k) o[k] = 0;
#pragma unroll
  for (int wd = 0; wd < 8; ++wd) {
    const uint32_t u4 = (raw[wd] ^ kFlip) & kMask;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int j = 4 * wd + b, bit = j * B, word = bit / 32, sh = bit % 32;
      const uint32_t u = (u4 >> (8 * b)) & 0xFFu;
      o[word] |= u << sh;
      if (sh + B > 32) o[word + 1] |= u >> (32 - sh);
    }
  }
}

// Nonzero when a byte of raw holds an int8 outside [-2^(B-1), 2^(B-1)): bits B-1..7 of the byte are not all equal,
// i.e. byte ^ (byte << 1) has a set bit in B..7 (bit 0 of each byte, polluted by the neighbour's bit 7, is not tested).
template <int B>
__host__ __device__ inline uint32_t out_of_range_bits(const uint32_t (&raw)[8]) {
  constexpr uint32_t kTest = ((0xFFu << B) & 0xFFu) * 0x01010101u;
  uint32_t any = 0;
#pragma unroll
  for (int wd = 0; wd < 8; ++wd) any |= (raw[wd] ^ (raw[wd] << 1)) & kTest;
  return any;
}

// Chunk g of pack_rows (cpr = chunks per row).
template <int B>
__host__ __device__ inline void pack_one_chunk(const int8_t* q, int64_t cols, int64_t words, int64_t cpr, bool vec,
                                               int64_t g, uint32_t* out, const BadReport& bad) {
  uint32_t raw[8];
  int64_t e0, w0;  // first element (linear, r * cols + 32k) and first word of the chunk
  int valid = 32, nwords = B;
  if (vec) {
    e0 = 32 * g;
    w0 = B * g;
    const uint4* src = reinterpret_cast<const uint4*>(q + e0);
    const uint4 a = ld(src), b = ld(src + 1);
    raw[0] = a.x, raw[1] = a.y, raw[2] = a.z, raw[3] = a.w, raw[4] = b.x, raw[5] = b.y, raw[6] = b.z, raw[7] = b.w;
  } else {
    const int64_t r = g / cpr, k = g - r * cpr;
    e0 = r * cols + 32 * k;
    w0 = r * words + B * k;
    valid = static_cast<int>(cols - 32 * k < 32 ? cols - 32 * k : 32);
    nwords = static_cast<int>(words - B * k < B ? words - B * k : B);
#pragma unroll
    for (int wd = 0; wd < 8; ++wd) raw[wd] = 0;  // padding bytes are code 0: in range
#pragma unroll
    for (int j = 0; j < 32; ++j)  // fully unrolled: raw stays in registers
      if (j < valid) raw[j / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(ld(q + e0 + j))) << (8 * (j % 4));
  }
  if (out_of_range_bits<B>(raw) != 0) {  // rare: report the chunk's first bad element
    constexpr int qmin = -(1 << (B - 1)), qmax = (1 << (B - 1)) - 1;
    int first = 0;
#pragma unroll
    for (int j = 31; j >= 0; --j) {  // padding bytes are 0, never bad
      const int v = static_cast<int8_t>((raw[j / 4] >> (8 * (j % 4))) & 0xFFu);
      if (v < qmin || v > qmax) first = j;
    }
    report_bad(bad, e0 + first);
  }
  uint32_t o[B];
  pack_chunk<B>(raw, o);
  if (vec) {
    constexpr int V = chunk_vec_words<B>();
    uint32_t* dst = out + w0;
#pragma unroll
    for (int k = 0; k < B; k += V) {
      if constexpr (V == 4) *reinterpret_cast<uint4*>(dst + k) = make_uint4(o[k], o[k + 1], o[k + 2], o[k + 3]);
      else if constexpr (V == 2) *reinterpret_cast<uint2*>(dst + k) = make_uint2(o[k], o[k + 1]);
      else dst[k] = o[k];
    }
  } else {
    const int used = valid * B;  // stream bits of the chunk's elements; the rest stay 0
#pragma unroll
    for (int k = 0; k < B; ++k) {
      const int lim = used - 32 * k;
      if (lim < 32) o[k] &= lim <= 0 ? 0u : ((1u << lim) - 1u);
      if (k < nwords) out[w0 + k] = o[k];
    }
  }
}

// Chunk g of unpack_rows.
template <int B>
__host__ __device__ inline void unpack_one_chunk(const uint32_t* packed, int64_t cols, int64_t words, int64_t cpr,
                                                 bool vec, int64_t g, int8_t* q) {
  constexpr uint32_t kMask = (1u << B) - 1u;
  constexpr int kOffset = 1 << (B - 1);
  uint32_t w[B];
  int64_t e0;
  int valid = 32;
  if (vec) {
    e0 = 32 * g;
    constexpr int V = chunk_vec_words<B>();
    const uint32_t* src = packed + B * g;
#pragma unroll
    for (int k = 0; k < B; k += V) {
      if constexpr (V == 4) {
        const uint4 t = ld(reinterpret_cast<const uint4*>(src + k));
        w[k] = t.x, w[k + 1] = t.y, w[k + 2] = t.z, w[k + 3] = t.w;
      } else if constexpr (V == 2) {
        const uint2 t = ld(reinterpret_cast<const uint2*>(src + k));
        w[k] = t.x, w[k + 1] = t.y;
      } else {
        w[k] = ld(src + k);
      }
    }
  } else {
    const int64_t r = g / cpr, k = g - r * cpr;
    e0 = r * cols + 32 * k;
    valid = static_cast<int>(cols - 32 * k < 32 ? cols - 32 * k : 32);
    const int64_t w0 = r * words + B * k;
    const int nwords = static_cast<int>(words - B * k < B ? words - B * k : B);
#pragma unroll
    for (int i = 0; i < B; ++i) w[i] = i < nwords ? ld(packed + w0 + i) : 0u;
  }
  uint32_t bytes[8];
#pragma unroll
  for (int wd = 0; wd < 8; ++wd) {
    uint32_t acc = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int j = 4 * wd + b, bit = j * B, word = bit / 32, sh = bit % 32;
      uint32_t u = w[word] >> sh;
      if (sh + B > 32) u |= w[word + 1] << (32 - sh);
      const int v = static_cast<int>(u & kMask) - kOffset;  // unpack_codes: ((v >> shift) & mask) - offset
      acc |= (static_cast<uint32_t>(v) & 0xFFu) << (8 * b);
    }
    bytes[wd] = acc;
  }
  if (vec) {
    uint4* dst = reinterpret_cast<uint4*>(q + e0);
    dst[0] = make_uint4(bytes[0], bytes[1], bytes[2], bytes[3]);
    dst[1] = make_uint4(bytes[4], bytes[5], bytes[6], bytes[7]);
  } else {
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if (j < valid) q[e0 + j] = static_cast<int8_t>((bytes[j / 4] >> (8 * (j % 4))) & 0xFFu);
  }
}

}  // namespace pack_detail
}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
