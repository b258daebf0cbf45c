"""Routed Hessian benchmark: moequant's CUDA accumulate_hessian vs torch x_e^T x_e per expert.

n routed rows (tokens * top_k) of dim d spread uniformly over E experts (a subset of the model's experts so that
E * d^2 floats fit). Useful FLOPs = n * d * (d + 1) (one multiply-add per lower-triangle entry per row, the SYRK
count); both implementations are charged the same count. % of the H100 fp32 SIMT peak and of the fp32 GEMM rate
measured in this process. torch: gather rows per expert (index_select), then xe.T @ xe (fp32, TF32 off).

Second table: the precision option of HessianAccumulator ("fp32" SIMT SSYRK, "tf32" / "bf16" tensor-core GEMMs on
the lower block triangle), TFLOP/s with the same useful-FLOP count, % of the datasheet dense peak of the precision
(H100 SXM: fp32 67, TF32 495, BF16 990 TFLOP/s) and of an 8192^3 GEMM measured in the same precision here.
Third table: effect on GPTQ. For a few DeepSeek-V3 experts (gate+up, [4096, 7168], 4-bit g128 asym) GPTQ is solved
with each precision's Hessian and the proxy loss tr((W-Q) H32 (W-Q)^T) is evaluated with the fp32 Hessian H32;
reported relative to the solve on H32 itself (1.000 = no loss of quality). Also the relative Frobenius error of H.
Usage: python benchmarks/bench_hessian.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cuda_time_ms, fp32_gemm_tflops, print_table  # noqa: E402
from shapes import H100_FP32_TFLOPS, SHAPES  # noqa: E402

from moequant import ops  # noqa: E402


PEAK_TFLOPS = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}  # H100 SXM datasheet, dense


def gemm_tflops(precision: str, n: int = 8192) -> float:
    """Achieved n^3 GEMM rate in this process in the given precision (fp32 = TF32 off)."""
    if precision == "fp32":
        return fp32_gemm_tflops(n)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device="cuda").to(dt)
    b = torch.randn(n, n, device="cuda").to(dt)
    ms = cuda_time_ms(lambda: a @ b, repeats=5, warmup=2)
    torch.backends.cuda.matmul.allow_tf32 = prev
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


def precision_tables(quick: bool) -> None:
    gemm = {p: gemm_tflops(p) for p in PEAK_TFLOPS}
    cases = [("deepseek-v3", 32, 8192), ("qwen3-30b-a3b", 128, 16384)]
    if quick:
        cases = cases[:1]
    rows = []
    for model, E, tokens in cases:
        shp = SHAPES[model]
        d, n = shp.hidden, tokens * shp.top_k
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, d, device="cuda", generator=g)
        ids = torch.randint(0, E, (n,), device="cuda", generator=g, dtype=torch.int32)
        flops = n * d * (d + 1)
        for p in PEAK_TFLOPS:
            acc = ops.HessianAccumulator(E, d, device="cuda", precision=p)
            ms = cuda_time_ms(lambda: acc.add(x, ids), repeats=3, warmup=1)
            tf = flops / (ms * 1e-3) / 1e12
            rows.append([model, d, E, n, p, f"{ms:.2f}", f"{tf:.1f}", f"{100 * tf / PEAK_TFLOPS[p]:.0f}%",
                         f"{100 * tf / gemm[p]:.0f}%"])
            print("  done", rows[-1], flush=True)
            del acc
            torch.cuda.empty_cache()
        del x, ids
    print("measured 8192^3 GEMM TFLOP/s: " + ", ".join(f"{p} {v:.1f}" for p, v in gemm.items()))
    print_table("routed Hessian by precision", ["model", "dim", "E", "rows", "precision", "ms", "TFLOP/s",
                                                "% peak (datasheet)", "% GEMM (same precision)"], rows)

    # GPTQ proxy loss with each precision's Hessian, evaluated with the fp32 Hessian.
    shp = SHAPES["deepseek-v3"]
    E, n_solve, d = 32, 2 if quick else 4, shp.hidden
    n = 8192 * shp.top_k
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(n, d, device="cuda", generator=g) * torch.exp(0.5 * torch.randn(d, device="cuda", generator=g))
    ids = torch.randint(0, E, (n,), device="cuda", generator=g, dtype=torch.int32)
    wts = torch.rand(n, device="cuda", generator=g)
    W = torch.randn(n_solve, 2 * shp.width, d, device="cuda", generator=g) * d ** -0.5
    hs = {}
    for p in PEAK_TFLOPS:
        acc = ops.HessianAccumulator(E, d, device="cuda", precision=p)
        acc.add(x, ids, wts)
        hs[p] = acc.hessians[:n_solve].clone()
        del acc
        torch.cuda.empty_cache()
    h32 = hs["fp32"]

    def loss(qts):
        out = []
        for e, q in enumerate(qts):
            D = W[e] - q.dequantized
            out.append(float(((D @ h32[e]) * D).sum(dtype=torch.float64)))
        return out

    base = loss(ops.gptq_quantize_batched(W, h32, bits=4, group_size=128, compute_loss=False))
    rows = []
    for p in PEAK_TFLOPS:
        rel_h = [float((hs[p][e] - h32[e]).norm() / h32[e].norm()) for e in range(n_solve)]
        lp = loss(ops.gptq_quantize_batched(W, hs[p], bits=4, group_size=128, compute_loss=False))
        ratios = [a / b for a, b in zip(lp, base)]
        rows.append([p, f"{max(rel_h):.2e}", f"{sum(ratios) / len(ratios):.4f}", f"{max(ratios):.4f}"])
    print_table(f"GPTQ proxy loss with each Hessian ({n_solve} DeepSeek-V3 gate+up experts, evaluated with fp32 H)",
                ["Hessian", "max rel Frobenius err of H", "loss / loss(fp32 H) mean", "max"], rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precision-only", action="store_true", help="only the precision tables")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if not args.precision_only:
        fp32_table(args.quick)
    precision_tables(args.quick)


def fp32_table(quick: bool):
    gemm_tf = fp32_gemm_tflops()
    cases = [("deepseek-v3", 32, 8192), ("qwen3-30b-a3b", 128, 16384), ("gpt-oss-120b", 64, 8192),
             ("mixtral-8x7b", 8, 16384)]
    if quick:
        cases = cases[:1]
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
