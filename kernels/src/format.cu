// kernels/src/format.cu -- the weight formats of moequant/format.h on the GPU: RTN quantize, dequantize, FP4 / FP6
// pack / unpack, and the gpt-oss MXFP4 block decoder (the DeepSeek FP8 block decoder is a dequantize).
//
// Bit-exactness with the CPU core is by construction: the per-group and per-element arithmetic is the scalar part of
// moequant/format.h itself (derive_group_params, quantize_element, dequantize_element, the codecs), compiled
// __host__ __device__ with explicit _rn intrinsics (no FMA contraction). What the kernels add is only data movement and
// the min / max reductions, which are exact and order-independent (every partial starts at +0, so -0.0 never wins).
//
// Bandwidth (one pass, 16-byte accesses): a *team* of TEAM lanes owns one work tile (a scale group: 16 / 32 / 128
// columns, a 128 x 128 block, a whole row) and holds it in registers, 8 consecutive elements per lane and chunk
// (two float4 loads of fp32 or one 16-byte load of bf16); the team reduces min / max with shuffles (TEAM <= 32) or
// through shared memory (TEAM = 256, one tile per block), derives the parameters and writes 8 codes (8 bytes) and 8
// dequantized floats (2 x 16 bytes) per chunk. Shapes or layouts the vector path cannot take (columns or tile widths
// not a multiple of 8, misaligned pointers or row strides, fp16 input, tiles above 2048 chunks) go to a general
// kernel: one warp per work tile, two passes, scalar accesses -- same bits, slower. The vector kernels are instantiated
// per element kind (Variant: int, FP8 E4M3, FP4 E2M1, each by division or, for E8M0 scales, by the exact reciprocal;
// FP6 takes the generic code), so a chunk's elements are coded without a per-element dispatch (docs/kernels.md).
#include "format_launch.h"
#include "launch.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

using fmt_detail::bits_of;
using fmt_detail::float_of;
using fmt_detail::mq_fdiv;
using fmt_detail::mq_fsub;
using fmt_detail::std_max;
using fmt_detail::std_min;

constexpr int kThreads = 256;

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// u32 division by a divisor fixed for the launch (dividends < 2^31), as in quant_pack.cu.
struct FastDiv {
  uint32_t m = 1;
  int p = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t d) {
    int l = 0;
    while ((uint64_t{1} << l) < d) ++l;
    p = 31 + l;
    m = static_cast<uint32_t>(((uint64_t{1} << p) + d - 1) / d);
  }
  __device__ uint32_t div(uint32_t n) const { return static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> p); }
};

// ---- element loads, widened exactly to fp32 ------------------------------------------------------------------------

__device__ inline float load1(const float* p) { return __ldg(p); }
__device__ inline float load1(const __nv_bfloat16* p) {
  return __uint_as_float(static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}
__device__ inline float load1(const __half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// 8 consecutive elements at a 16-byte aligned (bf16) / 32-byte offset (fp32) address.
__device__ inline void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ inline void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

// ---- outputs ------------------------------------------------------------------------------------------------------

struct QuantOut {
  uint8_t* codes;
  float* scales;
  uint8_t* scale_codes;
  int32_t* zeros;
  float* deq;
};

__device__ inline void write_params(const QuantOut& o, int64_t si, const GroupParams& gp) {
  if (o.scales) o.scales[si] = gp.scale;
  if (o.scale_codes) o.scale_codes[si] = gp.scale_code;
  if (o.zeros) o.zeros[si] = gp.zero;
}

__device__ inline void report_bad(FormatWorkspace* ws, int64_t at) {
  atomicMin(&ws->bad_index, static_cast<unsigned long long>(at));
}

__device__ inline void fold_range(float v, float& lo, float& hi, bool& bad) {
  bad |= !fmt_detail::is_finite_bits(bits_of(v));
  lo = std_min(lo, v);
  hi = std_max(hi, v);
}

// Parameters of a tile from its own range, or (per-tensor scale) from the tensor range of the range pass.
__device__ inline GroupParams tile_params(const FormatLaunch& p, const FormatWorkspace* ws, float lo, float hi,
                                          float g) {
  if (p.from_range) {
    lo = mq_fsub(0.0f, __uint_as_float(ws->neg_lo_bits));
    hi = __uint_as_float(ws->hi_bits);
  }
  return derive_group_params(p.core, lo, hi, g);
}

// ---- workspace reset, tensor range, global scale ------------------------------------------------------------------

__global__ void init_workspace_kernel(FormatWorkspace* ws) {
  ws->bad_index = kNoBadIndex;
  ws->neg_lo_bits = 0;
  ws->hi_bits = 0;
  ws->bad_global = 0;
  ws->global_scale = 1.0f;
}

// max(-w, 0) and max(w, 0) of the whole tensor (one atomicMax per block on the bits: non-negative floats order like
// their bit patterns), the first non-finite element. vec: rows of a multiple of 8 elements, 16-byte aligned chunks.
template <typename T>
__global__ void __launch_bounds__(kThreads) range_kernel(const T* __restrict__ w, int64_t rows, int64_t cols,
                                                          int64_t ld, bool vec, FormatWorkspace* ws) {
  __shared__ float s_neg[kThreads / kWarp], s_hi[kThreads / kWarp];
  float neg = 0.0f, hi = 0.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {
    const int64_t cpr = cols / 8, n = rows * cpr;
    for (int64_t q = start; q < n; q += stride) {
      const int64_t r = q / cpr, c = 8 * (q - r * cpr);
      float v[8];
      if constexpr (sizeof(T) == 4 || std::is_same<T, __nv_bfloat16>::value) {
        load8(w + r * ld + c, v);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = load1(w + r * ld + c + j);
      }
      bool bad = false;
      float lo = 0.0f, h = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) fold_range(v[j], lo, h, bad);
      if (bad) {
        int first = 0;
#pragma unroll
        for (int j = 7; j >= 0; --j)
          if (!fmt_detail::is_finite_bits(bits_of(v[j]))) first = j;
        report_bad(ws, r * cols + c + first);
      } else {
        neg = std_max(neg, mq_fsub(0.0f, lo));
        hi = std_max(hi, h);
      }
    }
  } else {
    const int64_t n = rows * cols;
    for (int64_t i = start; i < n; i += stride) {
      const int64_t r = i / cols, c = i - r * cols;
      const float v = load1(w + r * ld + c);
      if (!fmt_detail::is_finite_bits(bits_of(v))) {
        report_bad(ws, i);
        continue;
      }
      neg = std_max(neg, mq_fsub(0.0f, std_min(v, 0.0f)));
      hi = std_max(hi, v);
    }
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    neg = std_max(neg, __shfl_xor_sync(kFullMask, neg, off));
    hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) {
    s_neg[warp] = neg;
    s_hi[warp] = hi;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kThreads / kWarp; ++i) {
      neg = std_max(neg, s_neg[i]);
      hi = std_max(hi, s_hi[i]);
    }
    atomicMax(&ws->neg_lo_bits, __float_as_uint(neg));
    atomicMax(&ws->hi_bits, __float_as_uint(hi));
  }
}

// The global scale: the caller's (validated) or global_scale_from_amax of the tensor range.
__global__ void global_scale_kernel(FormatCore core, const float* global_in, FormatWorkspace* ws, float* global_out) {
  float g;
  if (global_in != nullptr) {
    g = *global_in;
    if (!(fmt_detail::is_finite_bits(bits_of(g)) && g > 0.0f)) {
      ws->bad_global = 1;
      g = 1.0f;
    }
  } else {
    g = global_scale_from_amax(core, std_max(__uint_as_float(ws->neg_lo_bits), __uint_as_float(ws->hi_bits)));
  }
  ws->global_scale = g;
  if (global_out) *global_out = g;
}

// ---- element variants of the team kernel ---------------------------------------------------------------------------
// The element code of the hot formats without the per-element dispatch of quantize_element (a switch over the element
// kinds and the integer path in every element, which keeps the compiler from interleaving a chunk's 8 elements):
// the launcher picks the variant once per call. kE8M0 scales are powers of two, so their variants multiply by the
// exact reciprocal (e8m0_reciprocal: the same bits as the division). kGeneric is quantize_element itself (FP6).
enum Variant : int { kGeneric = 0, kIntElem, kE4m3Div, kE4m3Pow2, kE2m1Div, kE2m1Pow2 };

__host__ __device__ constexpr bool is_pow2_variant(int v) { return v == kE4m3Pow2 || v == kE2m1Pow2; }

Variant variant_of(const FormatCore& c) {
  const bool pow2 = c.scale_kind == static_cast<int>(ScaleKind::kE8M0) && !c.global_scale;
  switch (c.element) {
    case static_cast<int>(ElementKind::kInt): return kIntElem;
    case static_cast<int>(ElementKind::kFp8E4M3): return pow2 ? kE4m3Pow2 : kE4m3Div;
    case static_cast<int>(ElementKind::kFp4E2M1): return pow2 ? kE2m1Pow2 : kE2m1Div;
    default: return kGeneric;
  }
}

// `inv`: e8m0_reciprocal of the group's scale code (the Pow2 variants only).
template <int V>
__device__ __forceinline__ uint8_t quantize_v(const FormatCore& c, float x, const GroupParams& gp, float inv) {
  if constexpr (V == kIntElem) return quantize_int_element(c.bits, x, gp);
  else if constexpr (V == kE4m3Div) return e4m3_encode(mq_fdiv(x, gp.effective));
  else if constexpr (V == kE4m3Pow2) return e4m3_encode(fmt_detail::mq_fmul(x, inv));
  else if constexpr (V == kE2m1Div) return e2m1_encode(mq_fdiv(x, gp.effective));
  else if constexpr (V == kE2m1Pow2) return e2m1_encode(fmt_detail::mq_fmul(x, inv));
  else return quantize_element(c, x, gp);
}
// dequantize_element for the variant's element kind.
template <int V>
__device__ __forceinline__ float dequantize_v(const FormatCore& c, uint8_t q, float eff, int32_t zero) {
  if constexpr (V == kIntElem) return dequantize_int_element(q, eff, zero);
  else if constexpr (V == kE4m3Div || V == kE4m3Pow2) return dequantize_decoded(e4m3_decode(q), eff);
  else if constexpr (V == kE2m1Div || V == kE2m1Pow2) return dequantize_decoded(e2m1_decode(q), eff);
  else return dequantize_element(c, q, eff, zero);
}

// ---- quantize: the team kernel (vector path) ---------------------------------------------------------------------------
// TEAM lanes per work tile (TEAM in 1..32 divides a warp, or 256 = the block), lane s holds chunks s + TEAM k, k < KMAX,
// of 8 elements (chunk i = row i / cpr of the tile, columns 8 (i % cpr) .. + 7). Requires: cols and work_cols multiples
// of 8, 16-byte aligned w / row stride, 8-byte aligned codes, 16-byte aligned dequantized, chunks per tile <= TEAM KMAX,
// fewer than 2^31 tiles (wtc_div: the tiles per row of tiles). V: the element variant (variant_of).
template <typename T, int TEAM, int KMAX, int V>
__global__ void __launch_bounds__(kThreads) quantize_team_kernel(const T* __restrict__ w, int64_t rows, int64_t cols,
                                                                  int64_t ld, FormatLaunch p, FastDiv wtc_div,
                                                                  FormatWorkspace* ws, QuantOut o) {
  constexpr int kTeams = kThreads / TEAM;
  __shared__ float s_lo[kThreads / kWarp], s_hi[kThreads / kWarp];
  const int team = static_cast<int>(threadIdx.x) / TEAM, s = static_cast<int>(threadIdx.x) % TEAM;
  const int64_t wtr = (rows + p.work_rows - 1) / p.work_rows, wtc = (cols + p.work_cols - 1) / p.work_cols;
  const uint32_t ntiles = static_cast<uint32_t>(wtr * wtc);
  const bool one_row = p.work_rows == 1;  // group / channel / row tiles: chunk i is columns 8 i .. 8 i + 7
  const float g = p.core.global_scale ? ws->global_scale : 1.0f;
  for (uint32_t base = blockIdx.x * kTeams; base < ntiles; base += gridDim.x * kTeams) {
    // uniform per block: shuffles and barriers are safe
    const uint32_t tile = base + team;
    const bool active = tile < ntiles;
    int64_t tr = 0, tc = 0, r0 = 0, c0 = 0;
    int cpr = 0, nch = 0;
    if (active) {
      tr = wtc_div.div(tile);
      tc = tile - tr * wtc;
      r0 = tr * p.work_rows;
      c0 = tc * p.work_cols;
      const int64_t re = p.work_rows < rows - r0 ? p.work_rows : rows - r0;
      const int64_t ce = p.work_cols < cols - c0 ? p.work_cols : cols - c0;
      cpr = static_cast<int>(ce / 8);
      nch = static_cast<int>(re) * cpr;
    }
    float v[KMAX][8];
    float lo = 0.0f, hi = 0.0f;
    int64_t first_bad = -1;
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      const int i = s + TEAM * k;
      if (i < nch) {
        const int rr = one_row ? 0 : i / cpr, cc = i - rr * cpr;
        const int64_t r = r0 + rr, c = c0 + 8 * cc;
        load8(w + r * ld + c, v[k]);
        bool bad = false;
#pragma unroll
        for (int j = 0; j < 8; ++j) fold_range(v[k][j], lo, hi, bad);
        if (bad && first_bad < 0) {
          int first = 0;
#pragma unroll
          for (int j = 7; j >= 0; --j)
            if (!fmt_detail::is_finite_bits(bits_of(v[k][j]))) first = j;
          first_bad = r * cols + c + first;
        }
      }
    }
    if (first_bad >= 0) report_bad(ws, first_bad);
    if constexpr (TEAM <= kWarp) {
#pragma unroll
      for (int off = TEAM / 2; off > 0; off /= 2) {
        lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
        hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
      }
    } else {
#pragma unroll
      for (int off = kWarp / 2; off > 0; off /= 2) {
        lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
        hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
      }
      const int warp = static_cast<int>(threadIdx.x) / kWarp;
      if (threadIdx.x % kWarp == 0) {
        s_lo[warp] = lo;
        s_hi[warp] = hi;
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kThreads / kWarp; ++i) {
        lo = std_min(lo, s_lo[i]);
        hi = std_max(hi, s_hi[i]);
      }
      __syncthreads();  // s_lo / s_hi are rewritten by the next tile
    }
    if (!active) continue;
    GroupParams gp;
    if (is_pow2_variant(V) && !p.from_range)  // derive_group_params' kE8M0 case, without its dispatch
      gp = mx_group_params(p.core.element, std_max(mq_fsub(0.0f, std_min(lo, 0.0f)), std_max(hi, 0.0f)));
    else
      gp = tile_params(p, ws, lo, hi, g);
    const float inv = is_pow2_variant(V) ? e8m0_reciprocal(gp.scale_code) : 1.0f;
    if (s == 0 && (!p.from_range || tile == 0)) write_params(o, p.from_range ? 0 : tr * p.scale_cols + tc, gp);
#pragma unroll
    for (int k = 0; k < KMAX; ++k) {
      const int i = s + TEAM * k;
      if (i < nch) {
        const int rr = one_row ? 0 : i / cpr, cc = i - rr * cpr;
        const int64_t at = (r0 + rr) * cols + c0 + 8 * cc;
        uint8_t q[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) q[j] = quantize_v<V>(p.core, v[k][j], gp, inv);
        if (o.codes) {
          const uint32_t lo4 = q[0] | (q[1] << 8) | (q[2] << 16) | (static_cast<uint32_t>(q[3]) << 24);
          const uint32_t hi4 = q[4] | (q[5] << 8) | (q[6] << 16) | (static_cast<uint32_t>(q[7]) << 24);
          *reinterpret_cast<uint2*>(o.codes + at) = make_uint2(lo4, hi4);
        }
        if (o.deq) {
          float d[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) d[j] = dequantize_v<V>(p.core, q[j], gp.effective, gp.zero);
          float4* dst = reinterpret_cast<float4*>(o.deq + at);
          dst[0] = make_float4(d[0], d[1], d[2], d[3]);
          dst[1] = make_float4(d[4], d[5], d[6], d[7]);
        }
      }
    }
  }
}

// ---- quantize: the general kernel ----------------------------------------------------------------------------------
// One warp per work tile, any shape and layout: pass 1 reduces the tile's range, pass 2 quantizes it.
template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_general_kernel(const T* __restrict__ w, int64_t rows, int64_t cols,
                                                                     int64_t ld, FormatLaunch p, FormatWorkspace* ws,
                                                                     QuantOut o) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t wtr = (rows + p.work_rows - 1) / p.work_rows, wtc = (cols + p.work_cols - 1) / p.work_cols;
  const int64_t ntiles = wtr * wtc;
  const float g = p.core.global_scale ? ws->global_scale : 1.0f;
  for (int64_t tile = warp; tile < ntiles; tile += num_warps) {  // uniform per warp
    const int64_t tr = tile / wtc, tc = tile - tr * wtc, r0 = tr * p.work_rows, c0 = tc * p.work_cols;
    const int64_t re = p.work_rows < rows - r0 ? p.work_rows : rows - r0;
    const int64_t ce = p.work_cols < cols - c0 ? p.work_cols : cols - c0;
    const int64_t n = re * ce;
    float lo = 0.0f, hi = 0.0f;
    int64_t first_bad = -1;
    for (int64_t e = lane; e < n; e += kWarp) {
      const int64_t r = r0 + e / ce, c = c0 + e % ce;
      const float v = load1(w + r * ld + c);
      bool bad = false;
      fold_range(v, lo, hi, bad);
      if (bad && first_bad < 0) first_bad = r * cols + c;  // e increases row-major within the tile
    }
    if (first_bad >= 0) report_bad(ws, first_bad);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    const GroupParams gp = tile_params(p, ws, lo, hi, g);
    if (lane == 0 && (!p.from_range || tile == 0)) write_params(o, p.from_range ? 0 : tr * p.scale_cols + tc, gp);
    for (int64_t e = lane; e < n; e += kWarp) {
      const int64_t r = r0 + e / ce, c = c0 + e % ce;
      const uint8_t q = quantize_element(p.core, load1(w + r * ld + c), gp);
      if (o.codes) o.codes[r * cols + c] = q;
      if (o.deq) o.deq[r * cols + c] = dequantize_element(p.core, q, gp.effective, gp.zero);
    }
  }
}

// The parameters of the (empty) groups of an empty matrix that still have a scale: the tensor scale of a [0, c] or
// [r, 0] matrix, the row scales of [r, 0]. One thread per scale.
__global__ void empty_groups_kernel(int64_t n, FormatLaunch p, FormatWorkspace* ws, QuantOut o) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  write_params(o, i, derive_group_params(p.core, 0.0f, 0.0f, p.core.global_scale ? ws->global_scale : 1.0f));
}

// ---- dequantize -----------------------------------------------------------------------------------------------------

template <bool kBf16>
__device__ inline void store8(void* out, int64_t at, const float (&d)[8]) {
  if constexpr (kBf16) {
    uint32_t h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      h[i] = bf16_bits_of(d[2 * i]) | (static_cast<uint32_t>(bf16_bits_of(d[2 * i + 1])) << 16);
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(out) + at) = make_uint4(h[0], h[1], h[2], h[3]);
  } else {
    float4* dst = reinterpret_cast<float4*>(static_cast<float*>(out) + at);
    dst[0] = make_float4(d[0], d[1], d[2], d[3]);
    dst[1] = make_float4(d[4], d[5], d[6], d[7]);
  }
}

__device__ inline void store1(void* out, bool bf16, int64_t at, float v) {
  if (bf16) static_cast<uint16_t*>(out)[at] = bf16_bits_of(v);
  else static_cast<float*>(out)[at] = v;
}

// 8 codes per thread and step: chunk q = row r, columns 8 c8 ..; scale (r / tile_rows, 8 c8 / tile_cols). Requires
// cols and tile_cols multiples of 8 (or tile_cols = cols), 8-byte aligned codes, 16-byte aligned out, < 2^31 chunks.
template <bool kBf16, int V>
__global__ void __launch_bounds__(kThreads) dequantize_vec_kernel(const uint8_t* __restrict__ codes, uint32_t chunks,
                                                                   FastDiv cpr_div, FastDiv tr_div, FastDiv tc8_div,
                                                                   uint32_t cpr, int64_t scale_cols,
                                                                   const float* __restrict__ scales,
                                                                   const int32_t* __restrict__ zeros,
                                                                   const float* __restrict__ global, FormatCore core,
                                                                   void* __restrict__ out) {
  const float g = core.global_scale ? __ldg(global) : 1.0f;
  const uint32_t stride = gridDim.x * blockDim.x;
  for (uint32_t q = blockIdx.x * blockDim.x + threadIdx.x; q < chunks; q += stride) {
    const uint32_t r = cpr_div.div(q), c8 = q - r * cpr;
    const int64_t si = static_cast<int64_t>(tr_div.div(r)) * scale_cols + tc8_div.div(c8);
    const float s = __ldg(scales + si);
    const float eff = core.global_scale ? mq_fdiv(s, g) : s;
    const int32_t z = zeros ? __ldg(zeros + si) : 0;
    const uint2 cc = __ldg(reinterpret_cast<const uint2*>(codes) + q);
    float d[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint8_t code = static_cast<uint8_t>(((j < 4 ? cc.x : cc.y) >> (8 * (j & 3))) & 0xFFu);
      d[j] = dequantize_v<V>(core, code, eff, z);
    }
    store8<kBf16>(out, static_cast<int64_t>(q) * 8, d);
  }
}

__global__ void __launch_bounds__(kThreads) dequantize_general_kernel(
    const uint8_t* __restrict__ codes, int64_t rows, int64_t cols, int64_t tile_rows, int64_t tile_cols,
    int64_t scale_cols, const float* __restrict__ scales, const int32_t* __restrict__ zeros,
    const float* __restrict__ global, FormatCore core, bool bf16, void* __restrict__ out) {
  const float g = core.global_scale ? __ldg(global) : 1.0f;
  const int64_t n = rows * cols, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / cols, c = i - r * cols, si = (r / tile_rows) * scale_cols + c / tile_cols;
    const float s = __ldg(scales + si);
    const float eff = core.global_scale ? mq_fdiv(s, g) : s;
    store1(out, bf16, i, dequantize_element(core, __ldg(codes + i), eff, zeros ? __ldg(zeros + si) : 0));
  }
}

// ---- FP4 / FP6 pack / unpack ----------------------------------------------------------------------------------------
// A *unit* is one packed group: FP4 2 codes -> 1 byte, FP6 4 codes -> 3 bytes. With cols a multiple of the unit's
// codes the matrix is one flat stream of units and a thread takes 8 units (16 FP4 codes -> 8 bytes; 32 FP6 codes -> 24
// bytes); otherwise (padded rows) a thread takes one unit.

template <int B>
__device__ inline uint32_t pack_unit(const uint8_t* c) {  // c: the unit's codes
  if constexpr (B == 4) return c[0] | (c[1] << 4);
  else return c[0] | (c[1] << 6) | (c[2] << 12) | (static_cast<uint32_t>(c[3]) << 18);
}

template <int B>
__global__ void __launch_bounds__(kThreads) pack_vec_kernel(const uint8_t* __restrict__ codes, int64_t n_groups8,
                                                             int64_t cols, uint8_t* __restrict__ out,
                                                             unsigned long long* bad_index) {
  constexpr int kCodes = B == 4 ? 16 : 32, kBytes = B == 4 ? 8 : 24;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n_groups8; t += stride) {
    uint8_t c[kCodes];
    const uint4* src = reinterpret_cast<const uint4*>(codes + t * kCodes);
#pragma unroll
    for (int k = 0; k < kCodes / 16; ++k) {
      const uint4 u = __ldg(src + k);
      const uint32_t wds[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 16; ++j) c[16 * k + j] = static_cast<uint8_t>((wds[j / 4] >> (8 * (j % 4))) & 0xFFu);
    }
    int first = -1;
#pragma unroll
    for (int j = kCodes - 1; j >= 0; --j)
      if (c[j] >> B) first = j;
    if (first >= 0) atomicMin(bad_index, static_cast<unsigned long long>(t * kCodes + first));
    if constexpr (B == 4) {
      uint32_t wd[2] = {0, 0};
#pragma unroll
      for (int u = 0; u < 8; ++u) wd[u / 4] |= pack_unit<4>(c + 2 * u) << (8 * (u % 4));
      *reinterpret_cast<uint2*>(out + t * kBytes) = make_uint2(wd[0], wd[1]);
    } else {
      uint8_t b[24];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const uint32_t word = pack_unit<6>(c + 4 * u);
        b[3 * u] = word & 0xFF;
        b[3 * u + 1] = (word >> 8) & 0xFF;
        b[3 * u + 2] = (word >> 16) & 0xFF;
      }
      uint2* dst = reinterpret_cast<uint2*>(out + t * kBytes);
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        uint32_t x = 0, y = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          x |= static_cast<uint32_t>(b[8 * k + j]) << (8 * j);
          y |= static_cast<uint32_t>(b[8 * k + 4 + j]) << (8 * j);
        }
        dst[k] = make_uint2(x, y);
      }
    }
  }
  (void)cols;
}

// One unit per thread, rows padded with zero codes (the row's last unit may be partial).
template <int B>
__global__ void __launch_bounds__(kThreads) pack_unit_kernel(const uint8_t* __restrict__ codes, int64_t rows,
                                                              int64_t cols, uint8_t* __restrict__ out,
                                                              unsigned long long* bad_index) {
  constexpr int kPer = B == 4 ? 2 : 4, kBytes = B == 4 ? 1 : 3;
  const int64_t upr = (cols + kPer - 1) / kPer, n = rows * upr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / upr, u = i - r * upr;
    uint8_t c[kPer];
    int first = -1;
#pragma unroll
    for (int j = kPer - 1; j >= 0; --j) {
      const int64_t col = u * kPer + j;
      c[j] = col < cols ? __ldg(codes + r * cols + col) : 0;
      if (c[j] >> B) first = j;
    }
    if (first >= 0) atomicMin(bad_index, static_cast<unsigned long long>(r * cols + u * kPer + first));
    const uint32_t word = pack_unit<B>(c);
    uint8_t* dst = out + r * upr * kBytes + u * kBytes;
#pragma unroll
    for (int k = 0; k < kBytes; ++k) dst[k] = static_cast<uint8_t>((word >> (8 * k)) & 0xFF);
  }
}

template <int B>
__global__ void __launch_bounds__(kThreads) unpack_vec_kernel(const uint8_t* __restrict__ packed, int64_t n_groups8,
                                                               uint8_t* __restrict__ codes) {
  constexpr int kCodes = B == 4 ? 16 : 32, kBytes = B == 4 ? 8 : 24;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n_groups8; t += stride) {
    uint8_t b[kBytes];
    const uint2* src = reinterpret_cast<const uint2*>(packed + t * kBytes);
#pragma unroll
    for (int k = 0; k < kBytes / 8; ++k) {
      const uint2 u = __ldg(src + k);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        b[8 * k + j] = static_cast<uint8_t>((u.x >> (8 * j)) & 0xFF);
        b[8 * k + 4 + j] = static_cast<uint8_t>((u.y >> (8 * j)) & 0xFF);
      }
    }
    uint8_t c[kCodes];
    if constexpr (B == 4) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        c[2 * j] = b[j] & 0xF;
        c[2 * j + 1] = b[j] >> 4;
      }
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const uint32_t word = b[3 * u] | (b[3 * u + 1] << 8) | (static_cast<uint32_t>(b[3 * u + 2]) << 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) c[4 * u + j] = static_cast<uint8_t>((word >> (6 * j)) & 0x3F);
      }
    }
    uint4* dst = reinterpret_cast<uint4*>(codes + t * kCodes);
#pragma unroll
    for (int k = 0; k < kCodes / 16; ++k) {
      uint32_t wd[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wd[i] = c[16 * k + 4 * i] | (c[16 * k + 4 * i + 1] << 8) | (c[16 * k + 4 * i + 2] << 16) |
                (static_cast<uint32_t>(c[16 * k + 4 * i + 3]) << 24);
      dst[k] = make_uint4(wd[0], wd[1], wd[2], wd[3]);
    }
  }
}

template <int B>
__global__ void __launch_bounds__(kThreads) unpack_unit_kernel(const uint8_t* __restrict__ packed, int64_t rows,
                                                                int64_t cols, uint8_t* __restrict__ codes) {
  constexpr int kPer = B == 4 ? 2 : 4, kBytes = B == 4 ? 1 : 3;
  const int64_t upr = (cols + kPer - 1) / kPer, n = rows * upr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t r = i / upr, u = i - r * upr;
    const uint8_t* src = packed + r * upr * kBytes + u * kBytes;
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < kBytes; ++k) word |= static_cast<uint32_t>(__ldg(src + k)) << (8 * k);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t col = u * kPer + j;
      if (col < cols) codes[r * cols + col] = static_cast<uint8_t>((word >> (B * j)) & ((1u << B) - 1u));
    }
  }
}

// ---- gpt-oss MXFP4 blocks ---------------------------------------------------------------------------------------------
// Thread per 4 bytes (8 codes) of the flat block stream: group = word / 4, out 8 values at 8 * word.
template <bool kBf16>
__global__ void __launch_bounds__(kThreads) mxfp4_blocks_vec_kernel(const uint32_t* __restrict__ blocks,
                                                                     const uint8_t* __restrict__ scales, int64_t words,
                                                                     void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < words; q += stride) {
    const uint32_t wd = __ldg(blocks + q);
    const uint8_t e = __ldg(scales + (q >> 2));
    float d[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) d[j] = mxfp4_block_value(static_cast<uint8_t>((wd >> (8 * (j / 2))) & 0xFF), j & 1, e);
    store8<kBf16>(out, q * 8, d);
  }
}

__global__ void __launch_bounds__(kThreads) mxfp4_blocks_general_kernel(const uint8_t* __restrict__ blocks,
                                                                         const uint8_t* __restrict__ scales,
                                                                         int64_t bytes, bool bf16,
                                                                         void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < bytes; i += stride) {
    const uint8_t b = __ldg(blocks + i), e = __ldg(scales + i / 16);
    store1(out, bf16, 2 * i, mxfp4_block_value(b, 0, e));
    store1(out, bf16, 2 * i + 1, mxfp4_block_value(b, 1, e));
  }
}

// ---- quantize launch helpers ----------------------------------------------------------------------------------------

int next_pow2(int64_t n) {
  int t = 1;
  while (t < n) t *= 2;
  return t;
}

template <typename T, int TEAM, int KMAX, int V>
cudaError_t launch_team_v(const T* w, int64_t rows, int64_t cols, int64_t ld, const FormatLaunch& p,
                          FormatWorkspace* ws, const QuantOut& o, int64_t ntiles, cudaStream_t stream) {
  const FastDiv wtc_div(static_cast<uint32_t>((cols + p.work_cols - 1) / p.work_cols));
  quantize_team_kernel<T, TEAM, KMAX, V><<<grid_for(ntiles, kThreads / TEAM), kThreads, 0, stream>>>(
      w, rows, cols, ld, p, wtc_div, ws, o);
  return cudaGetLastError();
}

template <typename T, int TEAM, int KMAX>
cudaError_t launch_team(const T* w, int64_t rows, int64_t cols, int64_t ld, const FormatLaunch& p, FormatWorkspace* ws,
                        const QuantOut& o, int64_t ntiles, cudaStream_t stream) {
  switch (variant_of(p.core)) {
    case kIntElem: return launch_team_v<T, TEAM, KMAX, kIntElem>(w, rows, cols, ld, p, ws, o, ntiles, stream);
    case kE4m3Div: return launch_team_v<T, TEAM, KMAX, kE4m3Div>(w, rows, cols, ld, p, ws, o, ntiles, stream);
    case kE4m3Pow2: return launch_team_v<T, TEAM, KMAX, kE4m3Pow2>(w, rows, cols, ld, p, ws, o, ntiles, stream);
    case kE2m1Div: return launch_team_v<T, TEAM, KMAX, kE2m1Div>(w, rows, cols, ld, p, ws, o, ntiles, stream);
    case kE2m1Pow2: return launch_team_v<T, TEAM, KMAX, kE2m1Pow2>(w, rows, cols, ld, p, ws, o, ntiles, stream);
    default: return launch_team_v<T, TEAM, KMAX, kGeneric>(w, rows, cols, ld, p, ws, o, ntiles, stream);
  }
}

// The team configuration for `chunks` chunks per tile (-1: none fits, use the general kernel).
template <typename T>
cudaError_t launch_team_for(int64_t chunks, const T* w, int64_t rows, int64_t cols, int64_t ld, const FormatLaunch& p,
                            FormatWorkspace* ws, const QuantOut& o, int64_t ntiles, cudaStream_t stream) {
  if (chunks <= 32) {
    switch (next_pow2(chunks)) {
      case 1: return launch_team<T, 1, 1>(w, rows, cols, ld, p, ws, o, ntiles, stream);
      case 2: return launch_team<T, 2, 1>(w, rows, cols, ld, p, ws, o, ntiles, stream);
      case 4: return launch_team<T, 4, 1>(w, rows, cols, ld, p, ws, o, ntiles, stream);
      case 8: return launch_team<T, 8, 1>(w, rows, cols, ld, p, ws, o, ntiles, stream);
      case 16: return launch_team<T, 16, 1>(w, rows, cols, ld, p, ws, o, ntiles, stream);
      default: return launch_team<T, 32, 1>(w, rows, cols, ld, p, ws, o, ntiles, stream);
    }
  }
  if (chunks <= 64) return launch_team<T, 32, 2>(w, rows, cols, ld, p, ws, o, ntiles, stream);
  if (chunks <= 128) return launch_team<T, 32, 4>(w, rows, cols, ld, p, ws, o, ntiles, stream);
  if (chunks <= 256) return launch_team<T, 32, 8>(w, rows, cols, ld, p, ws, o, ntiles, stream);
  if (chunks <= 512) return launch_team<T, 256, 2>(w, rows, cols, ld, p, ws, o, ntiles, stream);
  if (chunks <= 1024) return launch_team<T, 256, 4>(w, rows, cols, ld, p, ws, o, ntiles, stream);
  return launch_team<T, 256, 8>(w, rows, cols, ld, p, ws, o, ntiles, stream);
}

constexpr int64_t kMaxTeamChunks = 2048;  // 256 lanes x 8 chunks of 8 elements

template <typename T>
cudaError_t quantize_typed(const T* w, int64_t rows, int64_t cols, int64_t ld, const FormatLaunch& p,
                           FormatWorkspace* ws, const QuantOut& o, bool vec_type, cudaStream_t stream) {
  const int64_t ntiles = ((rows + p.work_rows - 1) / p.work_rows) * ((cols + p.work_cols - 1) / p.work_cols);
  const int64_t esize = static_cast<int64_t>(sizeof(T));
  const int64_t chunks = p.work_rows * (p.work_cols / 8);
  const bool vec = vec_type && cols % 8 == 0 && p.work_cols % 8 == 0 && (ld * esize) % 16 == 0 && aligned(w, 16) &&
                   aligned(o.codes, 8) && aligned(o.deq, 16) && chunks <= kMaxTeamChunks &&
                   ntiles < (int64_t{1} << 31);  // the team kernel's 32-bit tile index
  if constexpr (!std::is_same<T, __half>::value) {  // fp16 input takes the general kernel (no load8 for it)
    if (vec) return launch_team_for<T>(chunks, w, rows, cols, ld, p, ws, o, ntiles, stream);
  }
  quantize_general_kernel<T><<<grid_for(ntiles, kThreads / kWarp), kThreads, 0, stream>>>(w, rows, cols, ld, p, ws, o);
  return cudaGetLastError();
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------------------------------

cudaError_t launch_format_quantize(const void* w, ElementType w_type, int64_t rows, int64_t cols, int64_t ld,
                                   const FormatLaunch& p, const float* global_in, FormatWorkspace* ws, uint8_t* codes,
                                   float* scales, uint8_t* scale_codes, int32_t* zeros, float* global_out,
                                   float* dequantized, cudaStream_t stream) {
  init_workspace_kernel<<<1, 1, 0, stream>>>(ws);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t n = rows * cols;
  if (n > 0 && format_needs_range(p, global_in != nullptr)) {
    const int64_t esize = static_cast<int64_t>(element_size(w_type));
    const bool vec = cols % 8 == 0 && (ld * esize) % 16 == 0 && aligned(w, 16) && w_type != ElementType::kF16;
    const unsigned grid = grid_for(vec ? n / 8 : n, kThreads * 4);
    if (w_type == ElementType::kBf16)
      range_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(w), rows, cols, ld,
                                                                  vec, ws);
    else if (w_type == ElementType::kF16)
      range_kernel<__half><<<grid, kThreads, 0, stream>>>(static_cast<const __half*>(w), rows, cols, ld, false, ws);
    else
      range_kernel<float><<<grid, kThreads, 0, stream>>>(static_cast<const float*>(w), rows, cols, ld, vec, ws);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.core.global_scale) {
    global_scale_kernel<<<1, 1, 0, stream>>>(p.core, global_in, ws, global_out);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const QuantOut o{codes, scales, scale_codes, zeros, dequantized};
  if (n == 0) {  // groups without elements that still have a scale get an all-zero group's parameters
    const int64_t groups = p.group == static_cast<int>(GroupKind::kTensor) ? 1
                           : p.group == static_cast<int>(GroupKind::kChannel) && cols == 0 ? rows
                                                                                           : 0;
    if (groups == 0) return cudaSuccess;
    empty_groups_kernel<<<grid_for(groups, kThreads), kThreads, 0, stream>>>(groups, p, ws, o);
    return cudaGetLastError();
  }
  if (w_type == ElementType::kBf16)
    return quantize_typed(static_cast<const __nv_bfloat16*>(w), rows, cols, ld, p, ws, o, true, stream);
  if (w_type == ElementType::kF16)
    return quantize_typed(static_cast<const __half*>(w), rows, cols, ld, p, ws, o, false, stream);
  return quantize_typed(static_cast<const float*>(w), rows, cols, ld, p, ws, o, true, stream);
}

cudaError_t launch_format_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const float* scales,
                                     const int32_t* zeros, const float* global, const FormatLaunch& p, void* out,
                                     ElementType out_type, cudaStream_t stream) {
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  const bool bf16 = out_type == ElementType::kBf16;
  const int64_t tr = p.tile_rows, tc = p.tile_cols;
  const bool vec = cols % 8 == 0 && tc % 8 == 0 && n / 8 < (int64_t{1} << 31) && aligned(codes, 8) && aligned(out, 16);
  if (vec) {
    const uint32_t chunks = static_cast<uint32_t>(n / 8), cpr = static_cast<uint32_t>(cols / 8);
    const FastDiv cpr_div(cpr), tr_div(static_cast<uint32_t>(tr < rows ? tr : rows)),
        tc8_div(static_cast<uint32_t>(tc / 8));
    const unsigned grid = grid_for(chunks, kThreads);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(codes, chunks, cpr_div, tr_div, tc8_div, cpr, p.scale_cols, scales, zeros,
                                            global, p.core, out);
      return cudaGetLastError();
    };
    switch (variant_of(p.core)) {  // the decode of the element kind (the Div / Pow2 variants decode alike)
      case kIntElem:
        return bf16 ? launch(dequantize_vec_kernel<true, kIntElem>) : launch(dequantize_vec_kernel<false, kIntElem>);
      case kE4m3Div:
      case kE4m3Pow2:
        return bf16 ? launch(dequantize_vec_kernel<true, kE4m3Div>) : launch(dequantize_vec_kernel<false, kE4m3Div>);
      case kE2m1Div:
      case kE2m1Pow2:
        return bf16 ? launch(dequantize_vec_kernel<true, kE2m1Div>) : launch(dequantize_vec_kernel<false, kE2m1Div>);
      default:
        return bf16 ? launch(dequantize_vec_kernel<true, kGeneric>) : launch(dequantize_vec_kernel<false, kGeneric>);
    }
  }
  dequantize_general_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(codes, rows, cols, tr, tc, p.scale_cols,
                                                                           scales, zeros, global, p.core, bf16, out);
  return cudaGetLastError();
}

cudaError_t launch_pack_fp(const uint8_t* codes, int64_t rows, int64_t cols, int code_bits, uint8_t* out,
                           unsigned long long* bad_index, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(bad_index, 0xFF, sizeof(unsigned long long), stream);
  if (err != cudaSuccess || rows == 0 || cols == 0) return err;
  const int per = code_bits == 4 ? 2 : 4, group_codes = code_bits == 4 ? 16 : 32;
  const int64_t n = rows * cols;
  const bool vec = cols % per == 0 && n % group_codes == 0 && aligned(codes, 16) && aligned(out, 8);
  if (vec) {
    const int64_t groups = n / group_codes;
    if (code_bits == 4) pack_vec_kernel<4><<<grid_for(groups, kThreads), kThreads, 0, stream>>>(codes, groups, cols, out, bad_index);
    else pack_vec_kernel<6><<<grid_for(groups, kThreads), kThreads, 0, stream>>>(codes, groups, cols, out, bad_index);
    return cudaGetLastError();
  }
  const int64_t units = rows * ((cols + per - 1) / per);
  if (code_bits == 4) pack_unit_kernel<4><<<grid_for(units, kThreads), kThreads, 0, stream>>>(codes, rows, cols, out, bad_index);
  else pack_unit_kernel<6><<<grid_for(units, kThreads), kThreads, 0, stream>>>(codes, rows, cols, out, bad_index);
  return cudaGetLastError();
}

cudaError_t launch_unpack_fp(const uint8_t* packed, int64_t rows, int64_t cols, int code_bits, uint8_t* codes,
                             cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int per = code_bits == 4 ? 2 : 4, group_codes = code_bits == 4 ? 16 : 32;
  const int64_t n = rows * cols;
  const bool vec = cols % per == 0 && n % group_codes == 0 && aligned(packed, 8) && aligned(codes, 16);
  if (vec) {
    const int64_t groups = n / group_codes;
    if (code_bits == 4) unpack_vec_kernel<4><<<grid_for(groups, kThreads), kThreads, 0, stream>>>(packed, groups, codes);
    else unpack_vec_kernel<6><<<grid_for(groups, kThreads), kThreads, 0, stream>>>(packed, groups, codes);
    return cudaGetLastError();
  }
  const int64_t units = rows * ((cols + per - 1) / per);
  if (code_bits == 4) unpack_unit_kernel<4><<<grid_for(units, kThreads), kThreads, 0, stream>>>(packed, rows, cols, codes);
  else unpack_unit_kernel<6><<<grid_for(units, kThreads), kThreads, 0, stream>>>(packed, rows, cols, codes);
  return cudaGetLastError();
}

cudaError_t launch_decode_mxfp4_blocks(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                                       void* out, ElementType out_type, cudaStream_t stream) {
  const int64_t bytes = rows * groups * 16;
  if (bytes == 0) return cudaSuccess;
  const bool bf16 = out_type == ElementType::kBf16;
  if (aligned(blocks, 4) && aligned(out, 16)) {
    const int64_t words = bytes / 4;
    if (bf16)
      mxfp4_blocks_vec_kernel<true><<<grid_for(words, kThreads), kThreads, 0, stream>>>(
          reinterpret_cast<const uint32_t*>(blocks), scales, words, out);
    else
      mxfp4_blocks_vec_kernel<false><<<grid_for(words, kThreads), kThreads, 0, stream>>>(
          reinterpret_cast<const uint32_t*>(blocks), scales, words, out);
    return cudaGetLastError();
  }
  mxfp4_blocks_general_kernel<<<grid_for(bytes, kThreads), kThreads, 0, stream>>>(blocks, scales, bytes, bf16, out);
  return cudaGetLastError();
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
