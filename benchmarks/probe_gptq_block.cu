// benchmarks/probe_gptq_block.cu -- standalone probe of the batched GPTQ column kernel (docs/kernels.md).
//
// gptq_block_kernel<ACT = true, RW = 4, SMEM = true> (kernels/src/gptq_batched.cu) was 1.86 ms per launch on 16
// DeepSeek-V3 experts' gate+up (4096 x 7168, one 128-column block; session 13's profile), ~2.1 s of a layer, where
// a count of its instructions gives ~0.35 ms. This probe includes that translation unit and times the same launch
// on synthetic inputs. Session 14 ran it on the kernel before the processing-order change (docs/kernels.md): 1.694
// ms with a random act-order permutation against 0.780 ms with the identity, i.e. half the time went to gathering W
// and scattering codes / dequantized values at permuted columns. The library's act-order kernel now reads and writes
// its block contiguously (dw holds W in processing order); what is left of the permutation is the scale / zero-point
// lookup of each column's group, the one-pass permute_w before the loop and the unpermute after it. Rows:
//   act/random perm   the library's launch: act-order with a random column permutation
//   act/identity      the identity permutation (scales read by group, broadcast)
//   act RW=2 / RW=8   rows per warp (the library uses 4)
//   static            ACT = false (groups from the running columns; the gathers of W as before)
//   permute_w         once per solve: dw = W in processing order
//   unpermute         once per solve: codes and dequantized values back to the original columns
//   copy              cudaMemcpy of the same bytes as permute_w (the bandwidth reference)
// The act-order kernel writes its dequantized values into its own columns of dw, so every timed launch starts from
// a fresh copy of dw (made outside the timed region): rerunning it on its own output would divide zeros (w - dq = 0)
// through the slow path of the IEEE division (session 14's first run of this probe on the new kernel did that).
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

#include "probe_util.cuh"

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
  float *W, *Rt, *dW, *dW0, *Dblk, *scales, *deq, *tmp;
  int32_t *zeros, *perm_rand, *perm_id, *inv_rand;
  int8_t* codes;
  uint8_t* dead;
  CK(cudaMalloc(&W, n * 4));
  CK(cudaMalloc(&dW, n * 4));
  CK(cudaMalloc(&dW0, n * 4));
  CK(cudaMalloc(&deq, n * 4));
  CK(cudaMalloc(&tmp, n * 4));
  CK(cudaMalloc(&codes, n));
  CK(cudaMalloc(&Rt, E * C * C * 4));
  CK(cudaMalloc(&Dblk, E * rows * bw * 4));
  CK(cudaMalloc(&scales, E * rows * ng * 4));
  CK(cudaMalloc(&zeros, E * rows * ng * 4));
  CK(cudaMalloc(&perm_rand, E * C * 4));
  CK(cudaMalloc(&perm_id, E * C * 4));
  CK(cudaMalloc(&inv_rand, E * C * 4));
  CK(cudaMalloc(&dead, E * C));
  fill_kernel<<<4096, 256>>>(W, n, -0.04f, 0.04f, 1);
  fill_kernel<<<4096, 256>>>(dW0, n, -0.04f, 0.04f, 2);  // as the library's dw: W plus small lazy updates
  fill_kernel<<<4096, 256>>>(Rt, E * C * C, -0.01f, 0.01f, 3);
  diag_kernel<<<1024, 256>>>(Rt, E, C);
  fill_kernel<<<4096, 256>>>(scales, E * rows * ng, 0.005f, 0.006f, 4);
  CK(cudaMemset(zeros, 0, E * rows * ng * 4));  // zero point 0 with codes in [-8, 7]: the arithmetic is the same
  CK(cudaMemset(dead, 0, E * C));
  {
    std::vector<int32_t> id(static_cast<size_t>(E * C)), rnd(static_cast<size_t>(E * C)), inv(rnd.size());
    std::mt19937 gen(7);
    for (int64_t e = 0; e < E; ++e) {
      std::iota(id.begin() + e * C, id.begin() + (e + 1) * C, 0);
      std::iota(rnd.begin() + e * C, rnd.begin() + (e + 1) * C, 0);
      std::shuffle(rnd.begin() + e * C, rnd.begin() + (e + 1) * C, gen);
      for (int64_t k = 0; k < C; ++k) inv[e * C + rnd[e * C + k]] = static_cast<int32_t>(k);
    }
    CK(cudaMemcpy(inv_rand, inv.data(), E * C * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(perm_id, id.data(), E * C * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(perm_rand, rnd.data(), E * C * 4, cudaMemcpyHostToDevice));
  }
  CK(cudaDeviceSynchronize());
  auto fresh = [&] { CK(cudaMemcpy(dW, dW0, n * 4, cudaMemcpyDeviceToDevice)); };
  auto timed = [&](const char* name, auto&& fn) {
    std::printf("  %-22s %8.3f ms\n", name, probe_best_ms(7, fresh, fn));
  };
  std::printf("%lld experts x %lld x %lld, block [%lld, %lld), 4-bit asym g128 (one launch)\n", (long long)E,
              (long long)rows, (long long)C, (long long)i1, (long long)(i1 + bw));
  // one row per kernel variant (the launch<ACT, RW> instantiations share a signature) and permutation
  using Launch = decltype(&launch<true, 4>);
  auto kernel_row = [&](const char* name, Launch fn, const int32_t* perm) {
    timed(name, [&] { fn(W, Rt, dW, Dblk, perm, dead, scales, zeros, codes, deq, E, rows, C, i1, bw, p); });
  };
  kernel_row("act/random perm RW=4", launch<true, 4>, perm_rand);
  kernel_row("act/identity RW=4", launch<true, 4>, perm_id);
  kernel_row("act/identity RW=2", launch<true, 2>, perm_id);
  kernel_row("act/identity RW=8", launch<true, 8>, perm_id);
  kernel_row("act/random perm RW=2", launch<true, 2>, perm_rand);
  kernel_row("static RW=4", launch<false, 4>, nullptr);
  timed("permute_w (once)", [&] {
    mq::permute_w_kernel<<<static_cast<unsigned>(E * rows), 256>>>(W, rows, C, perm_rand, dead, dW);
    CK(cudaGetLastError());
  });
  timed("unpermute (once)", [&] {
    CK(mq::raise_smem_limit(mq::unpermute_kernel, static_cast<size_t>(C)));
    mq::unpermute_kernel<<<static_cast<unsigned>(E * rows), 256, static_cast<size_t>(C)>>>(rows, C, inv_rand, codes, dW,
                                                                                            deq);
    CK(cudaGetLastError());
  });
  timed("copy (same bytes)", [&] { CK(cudaMemcpyAsync(tmp, W, n * 4, cudaMemcpyDeviceToDevice)); });
  return 0;
}
