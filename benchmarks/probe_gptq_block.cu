// benchmarks/probe_gptq_block.cu -- standalone probe of the batched GPTQ column kernel (docs/kernels.md).
//
// gptq_block_kernel<ACT = true, RW = 4, SMEM = true> (kernels/src/gptq_batched.cu) is 1.86 ms per launch on 16
// DeepSeek-V3 experts' gate+up (4096 x 7168, one 128-column block; session 13's profile), ~2.1 s of a layer, where
// a count of its instructions gives ~0.35 ms. This probe includes that translation unit and times the same launch
// on synthetic inputs (the kernel's arithmetic does not depend on the values' meaning) under variants that isolate
// where the time goes:
//   act/random perm   the library's launch: act-order, a random column permutation (W, scales and zeros read and
//                     codes and dequantized values written at permuted columns: one 32-byte sector per element)
//   act/identity      the same kernel with the identity permutation (every access coalesced)
//   act RW=2 / RW=8   rows per warp (timing only)
//   static            ACT = false (groups from the running columns; timing only)
//   permute row       one pass that gathers a whole [E * rows, C] matrix into processing order (what a solve would
//                     pay once to make every block's accesses coalesced)
// Build + run (not part of the library build):
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -arch=sm_90 -I kernels/include -I kernels/src \
//        -I libmoequant/include -I .carry/include -o /tmp/probe_gptq benchmarks/probe_gptq_block.cu && /tmp/probe_gptq
#include "../kernels/src/gptq_batched.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);       \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

namespace mq = moequant::cuda_detail;

__device__ inline float hash01(uint64_t i) {
  i ^= i >> 33;
  i *= 0xff51afd7ed558ccdULL;
  i ^= i >> 33;
  i *= 0xc4ceb9fe1a85ec53ULL;
  i ^= i >> 33;
  return static_cast<float>(i >> 40) * (1.0f / 16777216.0f);
}

__global__ void fill_kernel(float* x, int64_t n, float lo, float hi, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] = lo + (hi - lo) * hash01(i + seed);
}

// U's diagonal: 1 (Rt's element (c, c) of every expert), so the column loop's errors stay bounded.
__global__ void diag_kernel(float* rt, int64_t E, int64_t C) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < E * C;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / C, c = i - e * C;
    rt[e * C * C + c * C + c] = 1.0f;
  }
}

// out[row, k] = in[row, perm[k]]: one block per row, the row read from L1/L2 at permuted positions.
__global__ void __launch_bounds__(256) permute_rows_kernel(const float* __restrict__ in, const int32_t* __restrict__ perm,
                                                           int64_t rows_per_e, int64_t C, float* __restrict__ out) {
  const int64_t row = blockIdx.x, e = row / rows_per_e;
  const int32_t* p = perm + e * C;
  for (int64_t k = threadIdx.x; k < C; k += blockDim.x) out[row * C + k] = in[row * C + p[k]];
}

template <bool ACT, int RW>
void launch(const float* W, const float* Rt, float* dW, float* Dblk, const int32_t* perm, const uint8_t* dead,
            float* scales, int32_t* zeros, int8_t* codes, float* deq, int64_t E, int64_t rows, int64_t C, int64_t i1,
            int bw, const mq::RtnParams& p) {
  const size_t smem = mq::gptq_block_bytes(bw);
  auto kernel = mq::gptq_block_kernel<ACT, RW, true>;
  CK(mq::raise_smem_limit(kernel, smem));
  const dim3 grid(static_cast<unsigned>((rows + mq::kBlockWarps * RW - 1) / (mq::kBlockWarps * RW)),
                  static_cast<unsigned>(E));
  kernel<<<grid, mq::kBlockWarps * mq::kWarp, smem>>>(W, Rt, dW, Dblk, ACT ? perm : nullptr, dead, scales, zeros, codes,
                                                       deq, rows, C, p.group_size, i1, bw, mq::kGptqMaxBlock, p);
  CK(cudaGetLastError());
}

int main() {
  const int64_t E = 16, rows = 4096, C = 7168, gs = 128, i1 = 3584;
  const int bw = 128;
  const int64_t n = E * rows * C, ng = C / gs;
  mq::RtnParams p;
  p.bits = 4;
  p.symmetric = false;
  p.group_size = gs;
  float *W, *Rt, *dW, *Dblk, *scales, *deq, *tmp;
  int32_t *zeros, *perm_rand, *perm_id;
  int8_t* codes;
  uint8_t* dead;
  CK(cudaMalloc(&W, n * 4));
  CK(cudaMalloc(&dW, n * 4));
  CK(cudaMalloc(&deq, n * 4));
  CK(cudaMalloc(&tmp, n * 4));
  CK(cudaMalloc(&codes, n));
  CK(cudaMalloc(&Rt, E * C * C * 4));
  CK(cudaMalloc(&Dblk, E * rows * bw * 4));
  CK(cudaMalloc(&scales, E * rows * ng * 4));
  CK(cudaMalloc(&zeros, E * rows * ng * 4));
  CK(cudaMalloc(&perm_rand, E * C * 4));
  CK(cudaMalloc(&perm_id, E * C * 4));
  CK(cudaMalloc(&dead, E * C));
  fill_kernel<<<4096, 256>>>(W, n, -0.04f, 0.04f, 1);
  fill_kernel<<<4096, 256>>>(dW, n, -0.002f, 0.002f, 2);
  fill_kernel<<<4096, 256>>>(Rt, E * C * C, -0.01f, 0.01f, 3);
  diag_kernel<<<1024, 256>>>(Rt, E, C);
  fill_kernel<<<4096, 256>>>(scales, E * rows * ng, 0.005f, 0.006f, 4);
  CK(cudaMemset(zeros, 0, E * rows * ng * 4));  // zero point 0 with codes in [-8, 7]: the arithmetic is the same
  CK(cudaMemset(dead, 0, E * C));
  {
    std::vector<int32_t> id(static_cast<size_t>(E * C)), rnd(static_cast<size_t>(E * C));
    std::mt19937 gen(7);
    for (int64_t e = 0; e < E; ++e) {
      std::iota(id.begin() + e * C, id.begin() + (e + 1) * C, 0);
      std::iota(rnd.begin() + e * C, rnd.begin() + (e + 1) * C, 0);
      std::shuffle(rnd.begin() + e * C, rnd.begin() + (e + 1) * C, gen);
    }
    CK(cudaMemcpy(perm_id, id.data(), E * C * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(perm_rand, rnd.data(), E * C * 4, cudaMemcpyHostToDevice));
  }
  CK(cudaDeviceSynchronize());
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  auto timed = [&](const char* name, auto&& fn) {
    fn();
    CK(cudaDeviceSynchronize());
    float best = 1e30f;
    for (int rep = 0; rep < 7; ++rep) {
      CK(cudaEventRecord(e0));
      fn();
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      best = std::min(best, ms);
    }
    std::printf("  %-22s %8.3f ms\n", name, best);
  };
  std::printf("%lld experts x %lld x %lld, block [%lld, %lld), 4-bit asym g128 (one launch)\n", (long long)E,
              (long long)rows, (long long)C, (long long)i1, (long long)(i1 + bw));
  timed("act/random perm RW=4", [&] {
    launch<true, 4>(W, Rt, dW, Dblk, perm_rand, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p);
  });
  timed("act/identity RW=4", [&] {
    launch<true, 4>(W, Rt, dW, Dblk, perm_id, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p);
  });
  timed("act/identity RW=2", [&] {
    launch<true, 2>(W, Rt, dW, Dblk, perm_id, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p);
  });
  timed("act/identity RW=8", [&] {
    launch<true, 8>(W, Rt, dW, Dblk, perm_id, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p);
  });
  timed("act/random perm RW=2", [&] {
    launch<true, 2>(W, Rt, dW, Dblk, perm_rand, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p);
  });
  timed("static RW=4", [&] {
    launch<false, 4>(W, Rt, dW, Dblk, nullptr, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p);
  });
  timed("permute rows (once)", [&] {
    permute_rows_kernel<<<static_cast<unsigned>(E * rows), 256>>>(W, perm_rand, rows, C, tmp);
    CK(cudaGetLastError());
  });
  timed("copy (same bytes)", [&] { CK(cudaMemcpyAsync(tmp, W, n * 4, cudaMemcpyDeviceToDevice)); });
  return 0;
}
