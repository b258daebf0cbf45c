// benchmarks/probe_hessian_gemm.cu -- standalone cuBLAS probe behind the tensor-core Hessian update design.
//
// Times the ways of computing the lower triangle of H_e += A_e A_e^T (A_e: [dim, K] column-major, i.e. K rows of
// dim features) for E experts with cuBLAS, on tensor cores (BF16 inputs or FP32 inputs with TF32 math, FP32
// accumulation, beta = 1 into an FP32 H), so the library's tile size and call structure are chosen from data:
//   cols      one cublasGemmEx per block column per expert (the previous library design, 512/1024-wide columns)
//   batch T   the lower triangle as T x T tiles (i >= j), all experts' tiles of one shape in one cublasGemmBatchedEx,
//             rows stored sample-major (A = [dim, K] column-major, "NT": both operands MN-major)
//   group T   the NT tiles through cublasGemmGroupedBatchedEx, one group per expert (variable K capable)
//   full      the full square per expert (strided batched, 2x the work): the GEMM rate ceiling of this K
// Results (H100, cuBLAS 13.0): docs/kernels.md. The "TN" layout the library uses for TF32 (feature-major rows) is
// not in this probe; its effect was measured end to end (bench_hessian.py).
// Rates are useful TFLOP/s = E * K * dim * (dim + 1) / t (the SYRK count, as bench_hessian.py).
// Build + run (not part of the library build):
//   nvcc -O2 -arch=sm_90 -o /tmp/probe benchmarks/probe_hessian_gemm.cu -lcublas && /tmp/probe
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "probe_util.cuh"

static bool cb_ok(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    std::printf("  %s: cuBLAS %s\n", what, cublasGetStatusString(s));
    return false;
  }
  return true;
}

__global__ void fill(float* p, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    p[i] = (h & 0xffff) / 32768.0f - 1.0f;
  }
}
__global__ void tobf(const float* s, __nv_bfloat16* d, size_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    d[i] = __float2bfloat16_rn(s[i]);
}

struct Case { const char* name; long d, E, K; };

int main() {
  cublasHandle_t h;
  cublasCreate(&h);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const Case cases[] = {{"deepseek-v3", 7168, 32, 2048}, {"qwen3-30b-a3b", 2048, 128, 4096},
                        {"gpt-oss-120b", 2880, 64, 2048}, {"mixtral-8x7b", 4096, 8, 16384}};
  for (const Case& c : cases) {
    const long d = c.d, E = c.E, K = c.K, ld = (d + 7) / 8 * 8;
    float* A32; __nv_bfloat16* A16; float* H;
    CK(cudaMalloc(&A32, sizeof(float) * E * K * ld));
    CK(cudaMalloc(&A16, 2 * E * K * ld));
    CK(cudaMalloc(&H, sizeof(float) * E * d * d));
    fill<<<4096, 256>>>(A32, (size_t)E * K * ld, 1);
    tobf<<<4096, 256>>>(A32, A16, (size_t)E * K * ld);
    CK(cudaMemset(H, 0, sizeof(float) * E * d * d));
    void** dptr;
    CK(cudaMalloc(&dptr, sizeof(void*) * 3 * E * 2000));
    const double useful = double(E) * K * d * (d + 1);
    for (int prec = 0; prec < 2; ++prec) {  // 0 bf16, 1 tf32
      const void* A = prec ? (const void*)A32 : (const void*)A16;
      const size_t el = prec ? 4 : 2;
      const cudaDataType_t at = prec ? CUDA_R_32F : CUDA_R_16BF;
      const cublasComputeType_t ct = prec ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      const float one = 1.0f;
      auto ptrA = [&](long e, long off) { return (const void*)((const char*)A + (size_t)(e * K * ld + off) * el); };
      auto timeit = [&](const char* label, auto&& fn) {
        if (!fn()) return;
        CK(cudaDeviceSynchronize());
        float best = 1e30f;
        for (int r = 0; r < 3; ++r) {
          cudaEventRecord(e0);
          fn();
          cudaEventRecord(e1);
          CK(cudaEventSynchronize(e1));
          float ms;
          cudaEventElapsedTime(&ms, e0, e1);
          if (ms < best) best = ms;
        }
        std::printf("%-14s d=%5ld E=%3ld K=%5ld %s %-12s %8.3f ms %7.1f useful TFLOP/s\n", c.name, d, E, K,
                    prec ? "tf32" : "bf16", label, best, useful / (best * 1e-3) / 1e12);
      };
      // cols: the previous design
      timeit("cols", [&]() {
        const long T = d <= 1024 ? d : (d <= 4096 ? 512 : 1024);
        for (long e = 0; e < E; ++e)
          for (long j0 = 0; j0 < d; j0 += T) {
            const int w = (int)(d - j0 < T ? d - j0 : T);
            if (!cb_ok(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, (int)(d - j0), w, (int)K, &one, ptrA(e, j0), at,
                                    (int)ld, ptrA(e, j0), at, (int)ld, &one, H + e * d * d + j0 * d + j0,
                                    CUDA_R_32F, (int)d, ct, CUBLAS_GEMM_DEFAULT), "cols"))
              return false;
          }
        return true;
      });
      for (long T : {128L, 256L, 384L, 512L, 1024L}) {
        if (T > d) continue;
        // tiles of three shapes: full, last row (rem x T), corner (rem x rem)
        const long nt = (d + T - 1) / T, rem = d - (nt - 1) * T;
        struct Shape { long m, n; std::vector<const void*> a, b; std::vector<void*> cc; };
        Shape sh[3] = {{T, T, {}, {}, {}}, {rem, T, {}, {}, {}}, {rem, rem, {}, {}, {}}};
        for (long e = 0; e < E; ++e)
          for (long j = 0; j < nt; ++j)
            for (long i = j; i < nt; ++i) {
              Shape& s = sh[i < nt - 1 ? 0 : (j < nt - 1 ? 1 : 2)];
              s.a.push_back(ptrA(e, i * T));
              s.b.push_back(ptrA(e, j * T));
              s.cc.push_back(H + e * d * d + j * T * d + i * T);
            }
        if (rem == T) {  // all full: merge
          for (int k = 1; k < 3; ++k) {
            sh[0].a.insert(sh[0].a.end(), sh[k].a.begin(), sh[k].a.end());
            sh[0].b.insert(sh[0].b.end(), sh[k].b.begin(), sh[k].b.end());
            sh[0].cc.insert(sh[0].cc.end(), sh[k].cc.begin(), sh[k].cc.end());
            sh[k].a.clear(); sh[k].b.clear(); sh[k].cc.clear();
          }
        }
        std::vector<void*> host;
        std::vector<size_t> base(3);
        for (int k = 0; k < 3; ++k) {
          base[k] = host.size();
          for (auto p : sh[k].a) host.push_back(const_cast<void*>(p));
          for (auto p : sh[k].b) host.push_back(const_cast<void*>(p));
          for (auto p : sh[k].cc) host.push_back(p);
        }
        if (host.size() > size_t(3 * E * 2000)) continue;
        CK(cudaMemcpy(dptr, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
        char label[32];
        std::snprintf(label, sizeof label, "batch %ld", T);
        timeit(label, [&]() {
          for (int k = 0; k < 3; ++k) {
            const long cnt = (long)sh[k].a.size();
            if (!cnt) continue;
            void** p = dptr + base[k];
            if (!cb_ok(cublasGemmBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_T, (int)sh[k].m, (int)sh[k].n, (int)K, &one,
                                           (const void* const*)p, at, (int)ld, (const void* const*)(p + cnt), at,
                                           (int)ld, &one, p + 2 * cnt, CUDA_R_32F, (int)d, (int)cnt, ct,
                                           CUBLAS_GEMM_DEFAULT), "batched"))
              return false;
          }
          return true;
        });
        if (T != 256 && T != 512) continue;
        // grouped: one group per (expert, shape), pointers in the order expert-major of the shapes above
        std::vector<cublasOperation_t> ta, tb;
        std::vector<int> m, n, k, lda, ldb, ldc, gs;
        std::vector<float> al, be;
        std::vector<void*> ga, gb, gc;
        for (int s = 0; s < 3; ++s) {
          const long cnt = (long)sh[s].a.size();
          if (!cnt) continue;
          const long per = cnt / E;
          for (long e = 0; e < E; ++e) {
            ta.push_back(CUBLAS_OP_N); tb.push_back(CUBLAS_OP_T);
            m.push_back((int)sh[s].m); n.push_back((int)sh[s].n); k.push_back((int)K);
            lda.push_back((int)ld); ldb.push_back((int)ld); ldc.push_back((int)d);
            gs.push_back((int)per); al.push_back(1.0f); be.push_back(1.0f);
            for (long q = 0; q < per; ++q) {
              ga.push_back(const_cast<void*>(sh[s].a[e * per + q]));
              gb.push_back(const_cast<void*>(sh[s].b[e * per + q]));
              gc.push_back(sh[s].cc[e * per + q]);
            }
          }
        }
        const long tot = (long)ga.size();
        std::vector<void*> gall(ga);
        gall.insert(gall.end(), gb.begin(), gb.end());
        gall.insert(gall.end(), gc.begin(), gc.end());
        CK(cudaMemcpy(dptr, gall.data(), gall.size() * sizeof(void*), cudaMemcpyHostToDevice));
        std::snprintf(label, sizeof label, "group %ld", T);
        timeit(label, [&]() {
          return cb_ok(cublasGemmGroupedBatchedEx(h, ta.data(), tb.data(), m.data(), n.data(), k.data(), al.data(),
                                                  (const void* const*)dptr, at, lda.data(),
                                                  (const void* const*)(dptr + tot), at, ldb.data(), be.data(),
                                                  dptr + 2 * tot, CUDA_R_32F, ldc.data(), (int)m.size(), gs.data(),
                                                  ct), "grouped");
        });
      }
      timeit("full(2x work)", [&]() {
        return cb_ok(cublasGemmStridedBatchedEx(h, CUBLAS_OP_N, CUBLAS_OP_T, (int)d, (int)d, (int)K, &one, A, at,
                                                (int)ld, K * ld, A, at, (int)ld, K * ld, &one, H, CUDA_R_32F, (int)d,
                                                d * d, (int)E, ct, CUBLAS_GEMM_DEFAULT), "full");
      });
    }
    cudaFree(A32); cudaFree(A16); cudaFree(H); cudaFree(dptr);
  }
  return 0;
}
