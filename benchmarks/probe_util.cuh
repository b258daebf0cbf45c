// benchmarks/probe_util.cuh -- shared by the standalone CUDA probes (benchmarks/probe_*.cu): the error check (a failing
// CUDA call prints its error and location and ends the probe with status 1) and the best-of-N event timing.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__);       \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// Best of `reps` timed runs of fn() (one untimed warm-up first), each between its own pair of events on the default
// stream; prep() runs before every run, outside the timed region.
template <class Prep, class Fn>
float probe_best_ms(int reps, Prep&& prep, Fn&& fn) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  prep();
  fn();
  CK(cudaDeviceSynchronize());
  float best = 1e30f;
  for (int rep = 0; rep < reps; ++rep) {
    prep();
    CK(cudaEventRecord(e0));
    fn();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    best = ms < best ? ms : best;
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return best;
}
