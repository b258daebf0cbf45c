// kernels/src/quant_pack.cu -- RTN quantization, dequantization and int32 bit packing on the GPU.
//
// Bit-exactness with libmoequant/include/moequant/quant.h and pack.h is the contract, so:
//   * every float / double operation that appears in quant.h is an explicit round-to-nearest intrinsic
//     (__fadd_rn, __fmul_rn, __fdiv_rn, __dadd_rn, ...): nvcc contracts a*b+c into an FMA by default
//     (-fmad=true), which would change the last bit relative to the CPU's separate multiply and add;
//   * rintf is round-half-to-even like std::nearbyint in the default rounding mode;
//   * std::min / std::max are reproduced as the exact ternaries the standard library uses
//     (std::min(a, b) = b < a ? b : a), so signed zeros resolve the same way;
//   * the MSE error of a candidate is accumulated in double, sequentially in element order, by one chain of
//     __dadd_rn (the per-element terms are computed in parallel by the warp and handed to the chain with
//     shuffles) -- the same sum as the CPU loop, not a tree reduction. That exact error is only computed for the
//     candidates a float screen cannot rule out (search_qparams_screened: same result, a fraction of the pow()).
// Bandwidth (issue #4): the common cases run as vectorised single passes -- minmax RTN with a power-of-two group of
// 16..512 as a team of gs/16 lanes per group holding the group in registers (float4 loads, one read of w), dequantize
// four codes per thread, pack / unpack one 32-element chunk per thread (32 elements of b bits are exactly b words, so
// chunks never share a word; 16-byte loads / stores when rows are a multiple of 32). Other shapes and the MSE search
// take the general kernels; both give the same bits.
// The only operation without a bit-exact twin is pow(double, double): CUDA's pow is within 2 ulp and glibc's
// within 1 ulp, so a candidate's MSE error may differ in its last bits from the CPU's. The chosen scale can
// only differ when two *different* candidates have errors within a few ulp of each other (identical
// candidates are skipped, see search_qparams), which real weight groups practically never produce.
#include "launch.h"
#include "pack_device.cuh"
#include "quant_device.cuh"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace moequant {
inline namespace v0 {
namespace cuda_detail {
namespace {

// Exact, std_min / std_max, round_to_bf16 / round_to_fp16 / round_scale, scale_epsilon and qparams_from_range
// live in quant_device.cuh (shared with gptq_batched.cu).

using QP = QParamsT<int32_t>;

__host__ __device__ inline int32_t quantize_value(float x, const QP& p, int bits) {
  const float v = rintf(Exact::add(Exact::div(x, p.scale), static_cast<float>(p.zero)));
  const float c = std_min(std_max(v, static_cast<float>(-(1 << (bits - 1)))), static_cast<float>((1 << (bits - 1)) - 1));
  return static_cast<int32_t>(c);
}

__host__ __device__ inline float dequantize_value(int32_t q, const QP& p) {
  return Exact::mul(static_cast<float>(q - p.zero), p.scale);
}

// Candidate i of compute_qparams' MSE grid (quant.h): 0 is the min/max range itself, i >= 1 the range shrunk by
// 1 - i / mse_grid.
__host__ __device__ inline QP mse_candidate(int i, float lo, float hi, const RtnParams& s) {
  if (i == 0) return qparams_from_range<int32_t>(lo, hi, s);
  const float shrink = Exact::to_float(Exact::dsub(1.0, Exact::ddiv(static_cast<double>(i), s.mse_grid)));
  return qparams_from_range<int32_t>(Exact::mul(shrink, lo), Exact::mul(shrink, hi), s);
}

// Whether candidate i duplicates candidate i - 1 (the same scale and zero point).
__host__ __device__ inline bool mse_duplicate(int i, const QP& p, float lo, float hi, const RtnParams& s) {
  if (i == 0) return false;
  const QP q = mse_candidate(i - 1, lo, hi, s);
  return p.scale == q.scale && p.zero == q.zero;
}

// Calls f(i, p) for the candidates i = 0..mse_steps in the CPU's order, skipping a candidate identical to the previous
// one evaluated (equivalently, to candidate i - 1: a skipped candidate equals the one evaluated before it): its error
// is the same number, which can never pass the strict `<` (either the previous one won and best_err equals it, or it
// lost and best_err is already <= it), so the result is unchanged and many pow() evaluations are saved (bf16 scales
// collapse neighbouring shrink factors onto the same scale). Stops early when f returns false.
template <class F>
__host__ __device__ inline void for_each_mse_candidate(float lo, float hi, const RtnParams& s, F&& f) {
  QP prev{};
  for (int i = 0; i <= s.mse_steps; ++i) {
    const QP p = mse_candidate(i, lo, hi, s);
    if (i > 0 && p.scale == prev.scale && p.zero == prev.zero) continue;
    prev = p;
    if (!f(i, p)) return;
  }
}

// compute_qparams of quant.h after the min/max pass, over the candidates `admit(i, p)` lets through (i = the
// candidate's index in the grid): `err(p)` must return the group's sequential MSE error; the first admitted candidate
// with the smallest error wins (the CPU's strict `<`).
template <class ErrFn, class Admit>
__host__ __device__ QP search_qparams_admitted(float lo, float hi, const RtnParams& s, const ErrFn& err,
                                               Admit&& admit) {
  QP best = mse_candidate(0, lo, hi, s);
  if (!s.mse) return best;
  double best_err = 0.0;
  bool have = false;
  for_each_mse_candidate(lo, hi, s, [&](int i, const QP& p) {
    if (!admit(i, p)) return true;
    const double e = err(p);
    if (!have || e < best_err) {
      best_err = e;
      best = p;
      have = true;
    }
    return true;
  });
  return best;
}

// The CPU's search: every candidate admitted.
template <class ErrFn>
__host__ __device__ QP search_qparams(float lo, float hi, const RtnParams& s, const ErrFn& err) {
  return search_qparams_admitted(lo, hi, s, err, [](int, const QP&) { return true; });
}

// |v - dequant(quant(v))|^norm in double, the CPU's per-element term.
__host__ __device__ inline double mse_term(float v, const QP& p, int bits, double norm) {
  const float d = dequantize_value(quantize_value(v, p, bits), p);
  return pow(fabs(Exact::dsub(static_cast<double>(v), static_cast<double>(d))), norm);
}

// Sequential error of one group, computed by a whole warp: lane j evaluates the term of element base + j, then
// every lane runs the same chain e += term_0, term_1, ... (shuffled in element order), so the sum is the CPU's
// left-to-right sum, identical in every lane (no divergence, no broadcast needed).
// 32-bit indices on purpose (the API caps in_features at INT32_MAX): pow() is an out-of-line call and every
// register live across it beyond the callee-saved set would spill.
struct WarpGroupErr {
  const float* x;
  int n;
  int bits;
  double norm;
  int lane;
  __device__ double operator()(const QP& p) const {
    double e = 0.0;
    for (int base = 0; base < n; base += kWarp) {
      const int i = base + lane;
      const double t = i < n ? mse_term(__ldg(x + i), p, bits, norm) : 0.0;
      const int cnt = n - base < kWarp ? n - base : kWarp;
      for (int j = 0; j < cnt; ++j) e = Exact::dadd(e, __shfl_sync(kFullMask, t, j));
    }
    return e;
  }
};

// Float screen of a candidate's MSE error (all lanes return the same value: a butterfly sum is symmetric, and
// fp32 addition commutes). The same codes as the exact error (quantize_value is shared), then the difference in
// float, __powf (exp2(y log2 x) on the special-function units: <= ~1e-4 relative for |log2 x| <= 150) with the
// exponent rounded to float, and a tree sum: within kScreenRel of the double error plus FLT_MIN per element
// (underflow), see search_qparams_screened.
struct WarpGroupErrF {
  const float* x;
  int n;
  int bits;
  float norm;
  int lane;
  __device__ float operator()(const QP& p) const {
    float e = 0.0f;
    for (int i = lane; i < n; i += kWarp) {
      const float v = __ldg(x + i);
      e += __powf(fabsf(v - dequantize_value(quantize_value(v, p, bits), p)), norm);
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) e += __shfl_xor_sync(kFullMask, e, off);
    return e;
  }
};

// The CPU's MSE search (search_qparams) with the expensive exact error evaluated only where it can matter:
//   pass 1  the float error e_f of every candidate (cheap: powf, tree sum) and its minimum m;
//   pass 2  the candidates in the CPU's order, skipping those with e_f > T, T = (m + tau)(1 + r)/(1 - r) + tau;
//           the others get the exact double error (the CPU's sequential chain) and the CPU's strict `<` rule.
// With |e_f - e| <= r e + tau for every candidate (r = kScreenRel = 1e-3; tau = n * FLT_MIN for terms that
// underflow in float), a candidate whose exact error equals the minimum always has e_f <= T, so every skipped one
// is strictly worse and the result is the CPU's: the first candidate with the minimal exact error.
// The bound's conditions, checked here (otherwise the full exact search runs):
//   - n <= kScreenMaxN: each lane adds n / 32 float terms in sequence, relative error <= (n / 32 + 5) 2^-24
//     (1.2e-4 at 2^16) on top of __powf's ~1e-4, so r keeps a > 4x margin;
//   - mse_norm >= 1: a difference that __powf flushes to 0 (subnormal) then contributes d^norm <= d < FLT_MIN,
//     which tau covers; with norm < 1, d^norm could be far above FLT_MIN;
//   - every float error finite (checked in pass 1).
// `cache` (kScreenCache floats of the warp's shared memory, or null): pass 1's float errors, so that pass 2 does not
// recompute them (searches with more candidates recompute).
constexpr double kScreenRel = 1e-3;
constexpr int kScreenMaxN = 1 << 16;
constexpr int kScreenCache = 128;
template <class ErrD, class ErrF>
__device__ QP search_qparams_screened(float lo, float hi, const RtnParams& s, int n, const ErrD& err,
                                      const ErrF& errf, float* cache) {
  if (!s.mse) return mse_candidate(0, lo, hi, s);
  if (n > kScreenMaxN || !(s.mse_norm >= 1.0)) return search_qparams(lo, hi, s, err);
  if (s.mse_steps + 1 > kScreenCache) cache = nullptr;
  float fmin = __int_as_float(0x7f800000);  // +inf
  bool finite = true;
  for_each_mse_candidate(lo, hi, s, [&](int i, const QP& p) {
    const float ef = errf(p);
    finite = isfinite(ef);  // warp-uniform
    fmin = fminf(fmin, ef);
    if (cache && (threadIdx.x & (kWarp - 1)) == 0) cache[i] = ef;
    return finite;
  });
  if (!finite) return search_qparams(lo, hi, s, err);
  __syncwarp();
  const double tau = static_cast<double>(n) * 1.1754943508222875e-38;  // FLT_MIN per element
  const double limit = (static_cast<double>(fmin) + tau) * ((1.0 + kScreenRel) / (1.0 - kScreenRel)) + tau;
  return search_qparams_admitted(lo, hi, s, err, [&](int i, const QP& p) {
    const float ef = cache ? cache[i] : errf(p);
    return static_cast<double>(ef) <= limit;  // warp-uniform
  });
}

// One lane's float screen of a candidate over a whole group held in shared memory (`xs`, n elements): the terms of
// WarpGroupErrF (the same codes, difference and __powf), summed in element order in chunks of 32 (each chunk's
// partial sum added to the total): relative error <= (31 + n / 32 + 1) 2^-24, 2.8e-6 at n = kLaneScreenMaxN, far
// inside search_qparams_screened's kScreenRel.
struct LaneGroupErrF {
  const float* xs;
  int n;
  int bits;
  float norm;
  __device__ float operator()(const QP& p) const {
    float e = 0.0f;
    for (int j0 = 0; j0 < n; j0 += kWarp) {
      const int j1 = j0 + kWarp < n ? j0 + kWarp : n;
      float part = 0.0f;
      for (int j = j0; j < j1; ++j) {
        const float v = xs[j];  // the same address in every lane: a shared-memory broadcast
        part += __powf(fabsf(v - dequantize_value(quantize_value(v, p, bits), p)), norm);
      }
      e += part;
    }
    return e;
  }
};

// search_qparams_screened with pass 1 spread over the lanes by candidate instead of by element: lane l screens the
// candidates l, l + 32, ... over the whole group (xs: the group in the warp's shared memory), so each candidate's
// parameters are computed once instead of in all 32 lanes and no butterfly sum runs per candidate. Pass 2 is
// search_qparams_screened's (the exact error of the admitted candidates, warp-cooperative). The same result as
// search_qparams_screened (and the CPU): both admit every candidate whose exact error can be the minimum; the exact
// errors then choose. Conditions (checked by the caller): s.mse, n <= kLaneScreenMaxN, s.mse_steps < kScreenCache,
// s.mse_norm >= 1.
constexpr int kLaneScreenMaxN = 512;
template <class ErrD>
__device__ QP search_qparams_lanes(float lo, float hi, const RtnParams& s, int n, const ErrD& err, const float* xs,
                                   float* cache) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const LaneGroupErrF errf{xs, n, s.bits, static_cast<float>(s.mse_norm)};
  float fmin = __int_as_float(0x7f800000);  // +inf
  bool finite = true;
  for (int i = lane; i <= s.mse_steps; i += kWarp) {  // lanes diverge here: no warp collectives inside
    const QP p = mse_candidate(i, lo, hi, s);
    if (mse_duplicate(i, p, lo, hi, s)) {  // never evaluated in pass 2 (for_each_mse_candidate skips it)
      cache[i] = __int_as_float(0x7f800000);  // +inf: never counted as admitted below
      continue;
    }
    const float ef = errf(p);
    finite = finite && isfinite(ef);
    fmin = fminf(fmin, ef);
    cache[i] = ef;
  }
  if (!__all_sync(kFullMask, finite)) return search_qparams(lo, hi, s, err);
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) fmin = fminf(fmin, __shfl_xor_sync(kFullMask, fmin, off));
  __syncwarp();  // every lane's cache entries visible to the whole warp
  const double tau = static_cast<double>(n) * 1.1754943508222875e-38;  // FLT_MIN per element
  const double limit = (static_cast<double>(fmin) + tau) * ((1.0 + kScreenRel) / (1.0 - kScreenRel)) + tau;
  // One candidate admitted (most groups: 1.3 on average on 4096 x 7168, benchmarks/probe_mse_screen.cu): it is the
  // CPU's choice without its exact error, since the candidate with the minimal exact error is always admitted.
  int count = 0, mine = -1;
  for (int i = lane; i <= s.mse_steps; i += kWarp)
    if (static_cast<double>(cache[i]) <= limit) {
      ++count;
      mine = i;
    }
  if (__reduce_add_sync(kFullMask, static_cast<unsigned>(count)) == 1) {
    const int only = __shfl_sync(kFullMask, mine, __ffs(__ballot_sync(kFullMask, count > 0)) - 1);
    return mse_candidate(only, lo, hi, s);
  }
  return search_qparams_admitted(lo, hi, s, err,
                                 [&](int i, const QP&) { return static_cast<double>(cache[i]) <= limit; });
}

// One warp per (row, group), grid-stride over groups. The group's min/max is a warp reduction (exact: min and
// max of non-NaN floats do not depend on the order, and lo starts at +0 so -0 never enters, as on the CPU),
// the parameter search runs redundantly in all lanes (cheap scalar code, keeps the warp converged) -- except the
// float screen of an MSE search over a group of at most kLaneScreenMaxN elements, one candidate per lane over the
// group copied to shared memory (search_qparams_lanes) -- and the elementwise quantize / dequantize is spread over
// the lanes with coalesced accesses.
__global__ void __launch_bounds__(256) quantize_rtn_kernel(const float* __restrict__ w, int64_t rows, int64_t cols,
                                                           int64_t ld, RtnParams p, int8_t* __restrict__ codes,
                                                           float* __restrict__ scales, int32_t* __restrict__ zeros,
                                                           float* __restrict__ dequantized,
                                                           unsigned long long* __restrict__ bad_index) {
  __shared__ float screen[256 / kWarp][kScreenCache];  // per warp: the float errors of the MSE candidates
  __shared__ float group[256 / kWarp][kLaneScreenMaxN];  // per warp: the group, for search_qparams_lanes
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t gs = p.group_size, ng = cols / gs, total = rows * ng;
  const bool lanes = p.mse && gs <= kLaneScreenMaxN && p.mse_steps < kScreenCache && p.mse_norm >= 1.0;
  float* xs = group[threadIdx.x / kWarp];
  for (int64_t t = warp; t < total; t += num_warps) {  // uniform per warp: shuffles below are safe
    const int64_t r = t / ng, g = t - r * ng;
    const float* x = w + r * ld + g * gs;
    float lo = 0.0f, hi = 0.0f;
    int64_t first_bad = -1;
    for (int64_t i = lane; i < gs; i += kWarp) {
      const float v = __ldg(x + i);
      if (lanes) xs[i] = v;
      if (!isfinite(v) && first_bad < 0) first_bad = i;
      lo = std_min(lo, v);
      hi = std_max(hi, v);
    }
    if (first_bad >= 0) atomicMin(bad_index, static_cast<unsigned long long>(r * cols + g * gs + first_bad));
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    const WarpGroupErr err{x, static_cast<int>(gs), p.bits, p.mse_norm, lane};
    QP qp;
    if (lanes) {
      __syncwarp();  // the group in shared memory, written by every lane
      qp = search_qparams_lanes(lo, hi, p, static_cast<int>(gs), err, xs, screen[threadIdx.x / kWarp]);
    } else {
      qp = search_qparams_screened(lo, hi, p, static_cast<int>(gs), err,
                                   WarpGroupErrF{x, static_cast<int>(gs), p.bits, static_cast<float>(p.mse_norm), lane},
                                   p.mse ? screen[threadIdx.x / kWarp] : nullptr);
    }
    __syncwarp();  // the warp's screen cache and group are rewritten by its next group
    if (lane == 0) {
      if (scales) scales[t] = qp.scale;  // t == r * ng + g
      if (zeros) zeros[t] = qp.zero;
    }
    if (codes || dequantized) {
      const int64_t o = r * cols + g * gs;
      for (int64_t i = lane; i < gs; i += kWarp) {
        const int32_t q = quantize_value(__ldg(x + i), qp, p.bits);
        if (codes) codes[o + i] = static_cast<int8_t>(q);
        if (dequantized) dequantized[o + i] = dequantize_value(q, qp);
      }
    }
  }
}

// u32 division by a divisor fixed for the launch (dividends < 2^31): q = (n * m) >> p with p = 31 + ceil(log2 d),
// m = ceil(2^p / d). The error of m * d - 2^p is < d <= 2^(p-31), so n * (m * d - 2^p) < 2^p for n < 2^31 and the
// quotient is exact (the CUTLASS FastDivmod argument).
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
  __host__ __device__ uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(n) * m) >> p);
  }
};

// ---- RTN minmax, vectorised: a team of TS lanes per group of 16 * TS floats, the group in registers ----------
// Lane s of a team holds float4 number s, s + TS, s + 2 TS, s + 3 TS of its group, so every load / store
// instruction of a team covers 16 * TS contiguous bytes per quad. Teams never straddle warps; the loop bound is
// uniform per warp (inactive teams ride along), so the full-mask shuffles are safe.
template <int TS>
__global__ void __launch_bounds__(256) quantize_rtn_minmax_kernel(const float* __restrict__ w, int64_t cols, int64_t ld,
                                                                  RtnParams p, uint32_t groups, FastDiv ng_div,
                                                                  int8_t* __restrict__ codes,
                                                                  float* __restrict__ scales,
                                                                  int32_t* __restrict__ zeros,
                                                                  float* __restrict__ dequantized,
                                                                  unsigned long long* __restrict__ bad_index) {
  constexpr int kGs = 16 * TS, kTeams = kWarp / TS;
  const int lane = static_cast<int>(threadIdx.x % kWarp), sub = lane % TS;
  const uint32_t warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
  const uint32_t num_warps = gridDim.x * blockDim.x / kWarp;
  const uint32_t ng = static_cast<uint32_t>(cols / kGs);
  for (uint32_t base = warp * kTeams; base < groups; base += num_warps * kTeams) {
    const uint32_t t = base + static_cast<uint32_t>(lane / TS);
    const bool active = t < groups;
    const uint32_t r = ng_div.div(active ? t : 0), g = (active ? t : 0) - r * ng;
    const float4* x = reinterpret_cast<const float4*>(w + static_cast<int64_t>(r) * ld + static_cast<int64_t>(g) * kGs);
    float4 v[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = active ? __ldg(x + sub + i * TS) : make_float4(0.f, 0.f, 0.f, 0.f);
    float lo = 0.0f, hi = 0.0f;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float e[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        bad |= !isfinite(e[k]);
        lo = std_min(lo, e[k]);
        hi = std_max(hi, e[k]);
      }
    }
    if (bad) {  // rare: the first non-finite element of this lane, in element order
      int64_t first = -1;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float e[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (first < 0 && !isfinite(e[k])) first = 4 * (sub + i * TS) + k;
      }
      atomicMin(bad_index, static_cast<unsigned long long>(static_cast<int64_t>(r) * cols +
                                                           static_cast<int64_t>(g) * kGs + first));
    }
    // min / max of non-NaN floats are order-independent, and every partial starts at +0 like the CPU's lo / hi
#pragma unroll
    for (int off = TS / 2; off > 0; off /= 2) {
      lo = std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    if (!active) continue;
    const QP qp = qparams_from_range<int32_t>(lo, hi, p);
    if (sub == 0) {
      if (scales) scales[t] = qp.scale;
      if (zeros) zeros[t] = qp.zero;
    }
    const int64_t o = static_cast<int64_t>(r) * cols + static_cast<int64_t>(g) * kGs;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t at = o + 4 * (sub + i * TS);
      const int32_t q0 = quantize_value(v[i].x, qp, p.bits), q1 = quantize_value(v[i].y, qp, p.bits);
      const int32_t q2 = quantize_value(v[i].z, qp, p.bits), q3 = quantize_value(v[i].w, qp, p.bits);
      if (codes) {
        const uint32_t packed4 = (static_cast<uint32_t>(q0) & 0xFFu) | ((static_cast<uint32_t>(q1) & 0xFFu) << 8) |
                                 ((static_cast<uint32_t>(q2) & 0xFFu) << 16) | (static_cast<uint32_t>(q3) << 24);
        *reinterpret_cast<uint32_t*>(codes + at) = packed4;
      }
      if (dequantized)
        *reinterpret_cast<float4*>(dequantized + at) = make_float4(dequantize_value(q0, qp), dequantize_value(q1, qp),
                                                                    dequantize_value(q2, qp), dequantize_value(q3, qp));
    }
  }
}

// ---- dequantize ------------------------------------------------------------------------------------------------
// General: one thread per element, grid-stride.
__global__ void __launch_bounds__(256) dequantize_kernel(const int8_t* __restrict__ codes,
                                                         const float* __restrict__ scales,
                                                         const int32_t* __restrict__ zeros, int64_t rows, int64_t cols,
                                                         int64_t gs, float* __restrict__ out) {
  const int64_t ng = cols / gs, total = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int64_t r = i / cols, c = i - r * cols;
    const int64_t pi = r * ng + c / gs;
    const QP qp{scales[pi], zeros ? zeros[pi] : 0};
    out[i] = dequantize_value(codes[i], qp);
  }
}

// Vectorised (group size a multiple of 4, < 2^31 quads): four codes per thread and step, kUnroll steps per thread
// issued together; the flat group of element 4q is 4q / gs (gs divides cols), i.e. q / (gs / 4).
constexpr int kDeqUnroll = 4;
__global__ void __launch_bounds__(256) dequantize_quads_kernel(const uint32_t* __restrict__ codes4,
                                                               const float* __restrict__ scales,
                                                               const int32_t* __restrict__ zeros, uint32_t quads,
                                                               FastDiv gq_div, float4* __restrict__ out) {
  const uint32_t step = blockDim.x * kDeqUnroll;
  for (uint32_t base = blockIdx.x * step; base < quads; base += gridDim.x * step) {
    uint32_t c[kDeqUnroll];
    QP qp[kDeqUnroll];
#pragma unroll
    for (int u = 0; u < kDeqUnroll; ++u) {
      const uint32_t q = base + u * blockDim.x + threadIdx.x;
      if (q < quads) {
        const uint32_t pi = gq_div.div(q);
        c[u] = __ldg(codes4 + q);
        qp[u] = QP{__ldg(scales + pi), zeros ? __ldg(zeros + pi) : 0};
      }
    }
#pragma unroll
    for (int u = 0; u < kDeqUnroll; ++u) {
      const uint32_t q = base + u * blockDim.x + threadIdx.x;
      if (q < quads) {
        const int32_t b0 = static_cast<int8_t>(c[u] & 0xFFu), b1 = static_cast<int8_t>((c[u] >> 8) & 0xFFu);
        const int32_t b2 = static_cast<int8_t>((c[u] >> 16) & 0xFFu), b3 = static_cast<int8_t>(c[u] >> 24);
        out[q] = make_float4(dequantize_value(b0, qp[u]), dequantize_value(b1, qp[u]), dequantize_value(b2, qp[u]),
                             dequantize_value(b3, qp[u]));
      }
    }
  }
}

// ---- pack / unpack: one chunk of 32 elements (pack_device.cuh) per thread, grid-stride ----------------------
using pack_detail::BadReport;
using pack_detail::pack_one_chunk;
using pack_detail::unpack_one_chunk;

template <int B>
__global__ void __launch_bounds__(256) pack_chunks_kernel(const int8_t* __restrict__ q, int64_t rows, int64_t cols,
                                                          int64_t words, bool vec, uint32_t* __restrict__ out,
                                                          BadReport bad) {
  const int64_t cpr = (cols + 31) / 32, total = rows * cpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride)
    pack_one_chunk<B>(q, cols, words, cpr, vec, g, out, bad);
}

template <int B>
__global__ void __launch_bounds__(256) unpack_chunks_kernel(const uint32_t* __restrict__ packed, int64_t rows,
                                                            int64_t cols, int64_t words, bool vec,
                                                            int8_t* __restrict__ q) {
  const int64_t cpr = (cols + 31) / 32, total = rows * cpr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total; g += stride)
    unpack_one_chunk<B>(packed, cols, words, cpr, vec, g, q);
}

}  // namespace

namespace {

bool aligned(const void* ptr, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0; }

// The vectorised minmax kernel for lanes-per-group TS (group size 16 * TS).
template <int TS>
cudaError_t launch_minmax(const float* w, int64_t rows, int64_t cols, int64_t ld, const RtnParams& p, int8_t* codes,
                          float* scales, int32_t* zeros, float* dequantized, unsigned long long* bad_index,
                          cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t ng = cols / (16 * TS), groups = rows * ng;
  quantize_rtn_minmax_kernel<TS><<<grid_for(groups, kThreads / TS), kThreads, 0, stream>>>(
      w, cols, ld, p, static_cast<uint32_t>(groups), FastDiv(static_cast<uint32_t>(ng)), codes, scales, zeros,
      dequantized, bad_index);
  return cudaGetLastError();
}

template <template <int> class Launch, class... Args>
cudaError_t by_bits(int bits, Args... args) {
  switch (bits) {
    case 2: return Launch<2>::run(args...);
    case 3: return Launch<3>::run(args...);
    case 4: return Launch<4>::run(args...);
    case 5: return Launch<5>::run(args...);
    case 6: return Launch<6>::run(args...);
    case 7: return Launch<7>::run(args...);
    default: return Launch<8>::run(args...);
  }
}

template <int B>
struct PackLaunch {
  static cudaError_t run(const int8_t* q, int64_t rows, int64_t cols, int64_t words, bool vec, int32_t* out,
                         BadReport bad, unsigned grid, cudaStream_t stream) {
    pack_chunks_kernel<B><<<grid, 256, 0, stream>>>(q, rows, cols, words, vec, reinterpret_cast<uint32_t*>(out), bad);
    return cudaGetLastError();
  }
};

template <int B>
struct UnpackLaunch {
  static cudaError_t run(const int32_t* packed, int64_t rows, int64_t cols, int64_t words, bool vec, int8_t* q,
                         unsigned grid, cudaStream_t stream) {
    unpack_chunks_kernel<B><<<grid, 256, 0, stream>>>(reinterpret_cast<const uint32_t*>(packed), rows, cols, words,
                                                      vec, q);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t launch_quantize_rtn(const float* w, int64_t rows, int64_t cols, int64_t ld, const RtnParams& p,
                                int8_t* codes, float* scales, int32_t* zeros, float* dequantized,
                                unsigned long long* bad_index, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(bad_index, 0xFF, sizeof(unsigned long long), stream);  // = kNoBadIndex
  if (err != cudaSuccess) return err;
  const int64_t groups = rows * (cols / p.group_size);
  if (groups == 0) return cudaSuccess;
  const int64_t gs = p.group_size;
  const bool vec = !p.mse && gs >= 16 && gs <= 512 && (gs & (gs - 1)) == 0 && groups < (int64_t{1} << 31) &&
                   ld % 4 == 0 && aligned(w, 16) && aligned(codes, 4) && aligned(dequantized, 16);
  if (vec) {
    switch (gs) {
      case 16: return launch_minmax<1>(w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index, stream);
      case 32: return launch_minmax<2>(w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index, stream);
      case 64: return launch_minmax<4>(w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index, stream);
      case 128: return launch_minmax<8>(w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index, stream);
      case 256: return launch_minmax<16>(w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index, stream);
      default: return launch_minmax<32>(w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index, stream);
    }
  }
  constexpr int kThreads = 256;  // 8 warps = 8 groups per block
  quantize_rtn_kernel<<<grid_for(groups, kThreads / kWarp), kThreads, 0, stream>>>(
      w, rows, cols, ld, p, codes, scales, zeros, dequantized, bad_index);
  return cudaGetLastError();
}

cudaError_t launch_dequantize(const int8_t* codes, const float* scales, const int32_t* zeros, int64_t rows,
                              int64_t cols, int64_t group_size, float* out, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  if (group_size % 4 == 0 && total / 4 < (int64_t{1} << 31) && aligned(codes, 4) && aligned(out, 16)) {
    const int64_t quads = total / 4;
    dequantize_quads_kernel<<<grid_for(quads, kThreads * kDeqUnroll), kThreads, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(codes), scales, zeros, static_cast<uint32_t>(quads),
        FastDiv(static_cast<uint32_t>(group_size / 4)), reinterpret_cast<float4*>(out));
    return cudaGetLastError();
  }
  dequantize_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(codes, scales, zeros, rows, cols, group_size,
                                                                         out);
  return cudaGetLastError();
}

cudaError_t launch_pack_rows(const int8_t* q, int64_t rows, int64_t cols, int bits, int32_t* out,
                             unsigned long long* bad_index, unsigned int* any_bad, cudaStream_t stream) {
  if (bad_index != nullptr) {
    const cudaError_t err = cudaMemsetAsync(bad_index, 0xFF, sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t words = (cols * bits + 31) / 32;
  const int64_t chunks = rows * ((cols + 31) / 32);
  if (chunks == 0) return cudaSuccess;
  const bool vec = cols % 32 == 0 && aligned(q, 16) && aligned(out, 16);
  BadReport bad;
  bad.first = bad_index;
  bad.any = any_bad;
  return by_bits<PackLaunch>(bits, q, rows, cols, words, vec, out, bad, grid_for(chunks, 256), stream);
}

cudaError_t launch_unpack_rows(const int32_t* packed, int64_t rows, int64_t cols, int bits, int8_t* q,
                               cudaStream_t stream) {
  const int64_t words = (cols * bits + 31) / 32;
  const int64_t chunks = rows * ((cols + 31) / 32);
  if (chunks == 0) return cudaSuccess;
  const bool vec = cols % 32 == 0 && aligned(packed, 16) && aligned(q, 16);
  return by_bits<UnpackLaunch>(bits, packed, rows, cols, words, vec, q, grid_for(chunks, 256), stream);
}

}  // namespace cuda_detail
}  // namespace v0
}  // namespace moequant
