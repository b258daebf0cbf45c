// benchmarks/probe_mse_screen.cu -- standalone probe behind the MSE scale search kernel's design (docs/kernels.md).
//
// The MSE scale search of quantize_rtn (kernels/src/quant_pack.cu) is most of the default recipe's solve time on
// DeepSeek-V3 (9.7 ms per 4096 x 7168 matrix, 14.6 ms per expert, ~3.7 s per layer). This probe includes that
// translation unit and times, on the same inputs, the library's kernel against variants of its float screen:
//   elements     the screen before session 13 (search_qparams_screened for every group): one warp per group, lanes
//                over the elements, one candidate at a time (qparams redundant in every lane, a butterfly sum per
//                candidate), then the exact double error of the admitted candidates
//   library      quantize_rtn as built (session 13: search_qparams_lanes for groups of <= 512, lanes over the
//                candidates, each lane its own candidate's qparams and error over the group in shared memory; the
//                same exact pass)
//   lanes/mul    as library with x * (1 / scale) for the codes (timing only: the codes may differ near ties)
//   pass1 only   as library without the exact pass (timing only: the float minimum, not the CPU's choice)
// and counts the candidates the screen admits to the exact pass (mean per group). The library must give the
// elements kernel's scales, zeros and codes bit for bit (checked; the probe prints MISMATCH otherwise).
// Build + run (not part of the library build):
//   nvcc -O3 -arch=sm_90 -I kernels/include -I kernels/src -I .carry/include -o /tmp/probe_mse \
//        benchmarks/probe_mse_screen.cu && /tmp/probe_mse
#include "../kernels/src/quant_pack.cu"

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "probe_util.cuh"

namespace mq = moequant::cuda_detail;
using mq::kFullMask;
using mq::kWarp;
using mq::QP;
using mq::RtnParams;

constexpr int kMaxN = 512;
constexpr int kMaxCand = 128;

// The screen before session 13 for every group (quantize_rtn_kernel's MSE path then; codes, scales, zeros only).
__global__ void __launch_bounds__(256) elements_kernel(const float* __restrict__ w, int64_t rows, int64_t cols,
                                                       RtnParams p, int8_t* __restrict__ codes,
                                                       float* __restrict__ scales, int32_t* __restrict__ zeros) {
  __shared__ float screen[256 / kWarp][mq::kScreenCache];
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int64_t gs = p.group_size, ng = cols / gs, total = rows * ng;
  for (int64_t t = warp; t < total; t += num_warps) {
    const int64_t r = t / ng, g = t - r * ng;
    const float* x = w + r * cols + g * gs;
    float lo = 0.0f, hi = 0.0f;
    for (int64_t i = lane; i < gs; i += kWarp) {
      const float v = __ldg(x + i);
      lo = mq::std_min(lo, v);
      hi = mq::std_max(hi, v);
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      lo = mq::std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = mq::std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    const QP qp = mq::search_qparams_screened(
        lo, hi, p, static_cast<int>(gs), mq::WarpGroupErr{x, static_cast<int>(gs), p.bits, p.mse_norm, lane},
        mq::WarpGroupErrF{x, static_cast<int>(gs), p.bits, static_cast<float>(p.mse_norm), lane},
        screen[threadIdx.x / kWarp]);
    __syncwarp();
    if (lane == 0) {
      scales[t] = qp.scale;
      zeros[t] = qp.zero;
    }
    for (int64_t i = lane; i < gs; i += kWarp)
      codes[r * cols + g * gs + i] = static_cast<int8_t>(mq::quantize_value(__ldg(x + i), qp, p.bits));
  }
}

// Mode: 0 lanes/div (the library's screen), 1 lanes/mul, 2 pass 1 only, 3 lanes/div counting the admitted candidates into *count.
template <int kMode>
__global__ void __launch_bounds__(256) lanes_kernel(const float* __restrict__ w, int64_t rows, int64_t cols,
                                                    RtnParams p, int8_t* __restrict__ codes,
                                                    float* __restrict__ scales, int32_t* __restrict__ zeros,
                                                    unsigned long long* count) {
  __shared__ float xs[256 / kWarp][kMaxN];
  __shared__ float cache[256 / kWarp][kMaxCand];
  const int wi = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int gs = static_cast<int>(p.group_size);
  const int64_t ng = cols / gs, total = rows * ng;
  float* x = xs[wi];
  float* ce = cache[wi];
  unsigned long long admitted = 0;
  for (int64_t t = warp; t < total; t += num_warps) {
    const int64_t r = t / ng, g = t - r * ng;
    const float* src = w + r * cols + g * gs;
    float lo = 0.0f, hi = 0.0f;
    for (int i = lane; i < gs; i += kWarp) {
      const float v = __ldg(src + i);
      x[i] = v;
      lo = mq::std_min(lo, v);
      hi = mq::std_max(hi, v);
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      lo = mq::std_min(lo, __shfl_xor_sync(kFullMask, lo, off));
      hi = mq::std_max(hi, __shfl_xor_sync(kFullMask, hi, off));
    }
    __syncwarp();
    // pass 1: lane = candidate
    float fmin = __int_as_float(0x7f800000);
    bool finite = true;
    const float norm = static_cast<float>(p.mse_norm);
    for (int base = 0; base <= p.mse_steps; base += kWarp) {
      const int i = base + lane;
      if (i <= p.mse_steps) {
        const QP pc = mq::mse_candidate(i, lo, hi, p);
        bool dup = false;
        if (i > 0) {
          const QP pp = mq::mse_candidate(i - 1, lo, hi, p);
          dup = pp.scale == pc.scale && pp.zero == pc.zero;
        }
        float ef = __int_as_float(0x7f800000);
        if (!dup) {
          const float inv = 1.0f / pc.scale;
          float acc = 0.0f;
          for (int j0 = 0; j0 < gs; j0 += kWarp) {
            float part = 0.0f;
            const int j1 = j0 + kWarp < gs ? j0 + kWarp : gs;
            for (int j = j0; j < j1; ++j) {
              const float v = x[j];
              int32_t q;
              if (kMode == 1) {
                const float u = rintf(__fadd_rn(__fmul_rn(v, inv), static_cast<float>(pc.zero)));
                q = static_cast<int32_t>(mq::std_min(mq::std_max(u, static_cast<float>(-(1 << (p.bits - 1)))),
                                                     static_cast<float>((1 << (p.bits - 1)) - 1)));
              } else {
                q = mq::quantize_value(v, pc, p.bits);
              }
              part += __powf(fabsf(v - mq::dequantize_value(q, pc)), norm);
            }
            acc += part;
          }
          ef = acc;
          if (!isfinite(ef)) finite = false;
          fmin = fminf(fmin, ef);
        }
        ce[i] = ef;
      }
    }
    finite = __all_sync(kFullMask, finite);
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) fmin = fminf(fmin, __shfl_xor_sync(kFullMask, fmin, off));
    __syncwarp();
    QP best = mq::mse_candidate(0, lo, hi, p);
    if (kMode == 2) {
      for (int i = 0; i <= p.mse_steps; ++i)
        if (ce[i] == fmin) {
          best = mq::mse_candidate(i, lo, hi, p);
          break;
        }
    } else if (!finite) {
      best = mq::search_qparams(lo, hi, p, mq::WarpGroupErr{src, gs, p.bits, p.mse_norm, lane});
    } else {
      const double tau = static_cast<double>(gs) * 1.1754943508222875e-38;
      const double limit = (static_cast<double>(fmin) + tau) * ((1.0 + mq::kScreenRel) / (1.0 - mq::kScreenRel)) + tau;
      const mq::WarpGroupErr err{src, gs, p.bits, p.mse_norm, lane};
      double best_err = 0.0;
      bool have = false;
      QP prev{};
      for (int i = 0; i <= p.mse_steps; ++i) {
        const QP pc = mq::mse_candidate(i, lo, hi, p);
        if (i > 0 && pc.scale == prev.scale && pc.zero == prev.zero) continue;
        prev = pc;
        if (!(static_cast<double>(ce[i]) <= limit)) continue;
        ++admitted;
        const double e = err(pc);
        if (!have || e < best_err) {
          best_err = e;
          best = pc;
          have = true;
        }
      }
    }
    __syncwarp();
    if (lane == 0) {
      scales[t] = best.scale;
      zeros[t] = best.zero;
    }
    const int64_t o = r * cols + g * gs;
    for (int i = lane; i < gs; i += kWarp) codes[o + i] = static_cast<int8_t>(mq::quantize_value(x[i], best, p.bits));
    __syncwarp();
  }
  if (kMode == 3 && lane == 0) atomicAdd(count, admitted);
}

template <int kMode>
void launch_lanes(const float* w, int64_t rows, int64_t cols, const RtnParams& p, int8_t* codes, float* scales,
                  int32_t* zeros, unsigned long long* count) {
  const int64_t groups = rows * (cols / p.group_size);
  lanes_kernel<kMode><<<mq::grid_for(groups, 8), 256>>>(w, rows, cols, p, codes, scales, zeros, count);
  CK(cudaGetLastError());
}

struct Out {
  std::vector<int8_t> codes;
  std::vector<float> scales;
  std::vector<int32_t> zeros;
};

int main() {
  const int64_t rows = 4096, cols = 7168, gs = 128;
  const int64_t n = rows * cols, ng = n / gs;
  RtnParams p;
  p.bits = 4;
  p.symmetric = false;
  p.group_size = gs;
  p.scale_dtype = 1;  // bf16, the pipeline's storage of a bf16 model
  p.mse = true;
  p.mse_grid = 100;
  p.mse_steps = 80;  // floor((1 - 0.2) * 100 + 1e-9)
  p.mse_norm = 2.4;
  float *w, *scales, *deq;
  int8_t* codes;
  int32_t* zeros;
  unsigned long long *bad, *count;
  CK(cudaMalloc(&w, n * 4));
  CK(cudaMalloc(&deq, n * 4));
  CK(cudaMalloc(&codes, n));
  CK(cudaMalloc(&scales, ng * 4));
  CK(cudaMalloc(&zeros, ng * 4));
  CK(cudaMalloc(&bad, 8));
  CK(cudaMalloc(&count, 8));
  const char* names[] = {"normal", "heavy-tailed"};
  for (int dist = 0; dist < 2; ++dist) {
    std::vector<float> h(static_cast<size_t>(n));
    std::mt19937 gen(1234 + dist);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (auto& v : h) v = dist == 0 ? 0.02f * nd(gen) : 0.02f * nd(gen) * std::exp(0.7f * nd(gen));
    CK(cudaMemcpy(w, h.data(), n * 4, cudaMemcpyHostToDevice));
    auto fetch = [&]() {
      Out o;
      o.codes.resize(static_cast<size_t>(n));
      o.scales.resize(static_cast<size_t>(ng));
      o.zeros.resize(static_cast<size_t>(ng));
      CK(cudaMemcpy(o.codes.data(), codes, n, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(o.scales.data(), scales, ng * 4, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(o.zeros.data(), zeros, ng * 4, cudaMemcpyDeviceToHost));
      return o;
    };
    auto timed = [&](const char* name, auto&& fn) {
      const float best = probe_best_ms(5, [] {}, fn);
      std::printf("  %-14s %8.3f ms\n", name, best);
      return best;
    };
    std::printf("%s weights, %lld x %lld, 4-bit asym g128, bf16 scales, 81 candidates, norm 2.4\n", names[dist],
                (long long)rows, (long long)cols);
    timed("elements", [&] {
      elements_kernel<<<mq::grid_for(ng, 8), 256>>>(w, rows, cols, p, codes, scales, zeros);
      CK(cudaGetLastError());
    });
    const Out ref = fetch();
    const char* vn[] = {"library", "lanes/div", "lanes/mul", "pass1 only"};
    for (int m = 0; m < 4; ++m) {
      timed(vn[m], [&] {
        if (m == 0) CK(mq::launch_quantize_rtn(w, rows, cols, cols, p, codes, scales, zeros, nullptr, bad, 0));
        if (m == 1) launch_lanes<0>(w, rows, cols, p, codes, scales, zeros, count);
        if (m == 2) launch_lanes<1>(w, rows, cols, p, codes, scales, zeros, count);
        if (m == 3) launch_lanes<2>(w, rows, cols, p, codes, scales, zeros, count);
      });
      const Out o = fetch();
      int64_t ds = 0, dc = 0;
      for (int64_t i = 0; i < ng; ++i) ds += o.scales[i] != ref.scales[i] || o.zeros[i] != ref.zeros[i];
      for (int64_t i = 0; i < n; ++i) dc += o.codes[i] != ref.codes[i];
      std::printf("    vs elements: %lld of %lld groups' parameters differ, %lld codes differ%s\n", (long long)ds,
                  (long long)ng, (long long)dc, (m <= 1 && (ds || dc)) ? "  MISMATCH" : "");
    }
    CK(cudaMemset(count, 0, 8));
    launch_lanes<3>(w, rows, cols, p, codes, scales, zeros, count);
    unsigned long long c = 0;
    CK(cudaMemcpy(&c, count, 8, cudaMemcpyDeviceToHost));
    std::printf("  admitted to the exact pass: %.3f candidates per group (kScreenRel %.0e)\n",
                static_cast<double>(c) / static_cast<double>(ng), mq::kScreenRel);
  }
  return 0;
}
