"""Routed Hessian benchmark: moequant's CUDA accumulate_hessian vs torch x_e^T x_e per expert.

n routed rows (tokens * top_k) of dim d spread uniformly over E experts (a subset of the model's experts so that
E * d^2 floats fit). Useful FLOPs = n * d * (d + 1) (one multiply-add per lower-triangle entry per row, the SYRK
count); both implementations are charged the same count. % of the H100 fp32 SIMT peak and of the fp32 GEMM rate
measured in this process. torch: gather rows per expert (index_select), then xe.T @ xe (fp32, TF32 off).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cuda_time_ms, fp32_gemm_tflops, print_table  # noqa: E402
from shapes import H100_FP32_TFLOPS, SHAPES  # noqa: E402

from moequant import ops  # noqa: E402


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    gemm_tf = fp32_gemm_tflops()
    cases = [("deepseek-v3", 32, 8192), ("qwen3-30b-a3b", 128, 16384), ("gpt-oss-120b", 64, 8192),
             ("mixtral-8x7b", 8, 16384)]
    rows = []
    for model, E, tokens in cases:
        shp = SHAPES[model]
        d = shp.hidden
        n = tokens * shp.top_k
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, d, device="cuda", generator=g)
        ids = torch.randint(0, E, (n,), device="cuda", generator=g, dtype=torch.int32)
        acc = ops.HessianAccumulator(E, d, device="cuda")
        t_ours = cuda_time_ms(lambda: acc.add(x, ids), repeats=3, warmup=1)
        order = torch.argsort(ids.long(), stable=True)
        counts = torch.bincount(ids.long(), minlength=E).tolist()
        H = torch.zeros(E, d, d, device="cuda")

        def torch_ref():
            xs = x.index_select(0, order)
            o = 0
            for e in range(E):
                xe = xs[o:o + counts[e]]
                H[e] += xe.t() @ xe
                o += counts[e]

        t_torch = cuda_time_ms(torch_ref, repeats=3, warmup=1)
        flops = n * d * (d + 1)
        tf_o, tf_t = flops / (t_ours * 1e-3) / 1e12, flops / (t_torch * 1e-3) / 1e12
        rows.append([model, d, E, n, f"{t_ours:.2f}", f"{tf_o:.1f}", f"{100 * tf_o / H100_FP32_TFLOPS:.0f}%",
                     f"{100 * tf_o / gemm_tf:.0f}%", f"{t_torch:.2f}", f"{tf_t:.1f}", f"{t_torch / t_ours:.2f}x"])
        print("  done", rows[-1], flush=True)
        del x, ids, acc, H, order
        torch.cuda.empty_cache()
    print(f"fp32 GEMM (TF32 off) measured: {gemm_tf:.1f} TFLOP/s")
    print_table("routed Hessian accumulation (fp32)", ["model", "dim", "E", "rows", "ours ms", "TFLOP/s", "%fp32 peak",
                                                       "%GEMM", "torch ms", "torch TFLOP/s", "speedup"], rows)


if __name__ == "__main__":
    main()
