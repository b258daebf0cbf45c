"""Routed Hessian benchmark: moequant's CUDA HessianAccumulator (fp32 / tf32 / bf16) vs torch per expert.

Shapes: the four real models of shapes.py with the issue's calibration size, 65,536 tokens routed top-k, i.e.
65536 * top_k / num_experts rows per expert (DeepSeek-V3 2048, Qwen3-30B-A3B 4096, gpt-oss-120b 2048,
Mixtral-8x7B 16384), over a subset of E experts so that E * hidden^2 floats fit (rows routed uniformly at random,
so per-expert counts vary by a few percent). Useful FLOPs = rows * d * (d + 1) (one multiply-add per
lower-triangle entry per row: the SYRK count), charged equally to every implementation.

Rows per model: fp32 activations x with each precision, then bf16 x (a bf16 layer's own activations, which the
kernels read as they are: 2 instead of 4 bytes per element in the row pass) with tf32 and bf16.
Columns per (model, x dtype, precision):
  add ms / TFLOP/s / % peak   HessianAccumulator.add on an accumulator that already holds data: validation, sort,
                              the scaled-row pass (bf16: written as bf16), the update; the mirror is deferred to
                              the next read of `hessians` (the steady state of calibration: many adds, one read)
  b2b ms / % peak             per add of 4 back-to-back adds between one pair of events: an add returns once the
                              GEMMs are queued, so the host's work before the next add's first launch overlaps
                              the previous add's GEMMs, as in a calibration loop (the single-call "add ms" includes
                              that host time; each add still waits for its own two readbacks)
  +read ms / % peak           add followed by reading `hessians` (the mirror pass over all E * d^2 entries): the
                              cost of a single batch used at once
  torch ms / ratio            index_select + per-expert H[e] += xe^T xe in the same precision (fp32 with TF32 off,
                              TF32 on, or bf16 rows with an fp32-output GEMM), the full square, same process and
                              inputs; ratio = torch ms / add ms
% peak: of the H100 SXM datasheet dense peak of the precision (fp32 66.9, TF32 494.7, BF16 989.4 TFLOP/s); the
8192^3 GEMM rate of each precision measured in this process is printed for reference.
Second table: effect on GPTQ. For a few DeepSeek-V3 experts (gate+up, [4096, 7168], 4-bit g128 asym) GPTQ is solved
with each precision's Hessian and the proxy loss tr((W-Q) H32 (W-Q)^T) is evaluated with the fp32 Hessian H32;
reported relative to the solve on H32 itself (1.000 = no loss of quality). Also the relative Frobenius error of H.
Usage: python benchmarks/bench_hessian.py [--quick] [--no-loss] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import back_to_back_ms, cuda_time_ms, fp32_gemm_tflops, print_table, timeline_report  # noqa: E402
from shapes import SHAPES  # noqa: E402

from moequant import ops  # noqa: E402

PEAK_TFLOPS = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}  # H100 SXM datasheet, dense
CALIB_TOKENS = 65536
# (model, experts held at once): E * hidden^2 * 4 bytes of Hessians per accumulator
CASES = [("deepseek-v3", 32), ("qwen3-30b-a3b", 128), ("gpt-oss-120b", 64), ("mixtral-8x7b", 8)]
# (dtype of x, precision of the update)
RUNS = [("fp32", "fp32"), ("fp32", "tf32"), ("fp32", "bf16"), ("bf16", "tf32"), ("bf16", "bf16")]


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


def _mm_f32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output (bf16 inputs: the GEMM's fp32 accumulator kept, where torch supports out_dtype)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return (a @ b).float()


def torch_hessians(x, order, counts, H, precision):
    """torch baseline: gather the rows by expert, then one full GEMM per expert in the given precision."""
    xs = x.index_select(0, order)
    xs = xs.to(torch.bfloat16) if precision == "bf16" else xs.float()
    o = 0
    for e, c in enumerate(counts):
        xe = xs[o:o + c]
        if precision == "bf16":
            H[e] += _mm_f32_out(xe.t(), xe)
        else:
            H[e].addmm_(xe.t(), xe)
        o += c


def speed_table(quick: bool) -> None:
    gemm = {p: gemm_tflops(p) for p in PEAK_TFLOPS}
    rows = []
    for model, E in CASES[:1] if quick else CASES:
        shp = SHAPES[model]
        d = shp.hidden
        per_expert = CALIB_TOKENS * shp.top_k // shp.experts
        n = per_expert * E
        g = torch.Generator(device="cuda").manual_seed(0)
        x32 = torch.randn(n, d, device="cuda", generator=g)
        xs = {"fp32": x32, "bf16": x32.to(torch.bfloat16)}
        ids = torch.randint(0, E, (n,), device="cuda", generator=g, dtype=torch.int32)
        order = torch.argsort(ids.long(), stable=True)
        counts = torch.bincount(ids.long(), minlength=E).tolist()
        flops = n * d * (d + 1)
        for xd, p in RUNS:
            x = xs[xd]
            acc = ops.HessianAccumulator(E, d, device="cuda", precision=p)
            t_add = cuda_time_ms(lambda: acc.add(x, ids), repeats=3, warmup=1)
            t_b2b = back_to_back_ms(lambda: acc.add(x, ids), calls=4, repeats=3)

            def add_and_read():
                acc.add(x, ids)
                return acc.hessians

            t_read = cuda_time_ms(add_and_read, repeats=3, warmup=1)
            del acc
            torch.cuda.empty_cache()
            H = torch.zeros(E, d, d, device="cuda")
            prev = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = p == "tf32"
            t_torch = cuda_time_ms(lambda: torch_hessians(x, order, counts, H, p), repeats=3, warmup=1)
            torch.backends.cuda.matmul.allow_tf32 = prev
            del H
            torch.cuda.empty_cache()
            tf_add, tf_b2b, tf_read, tf_torch = (flops / (t * 1e-3) / 1e12 for t in (t_add, t_b2b, t_read, t_torch))
            rows.append([model, d, E, n, xd, p, f"{t_add:.2f}", f"{tf_add:.1f}",
                         f"{100 * tf_add / PEAK_TFLOPS[p]:.0f}%",
                         f"{100 * tf_add / gemm[p]:.0f}%", f"{t_b2b:.2f}", f"{100 * tf_b2b / PEAK_TFLOPS[p]:.0f}%",
                         f"{t_read:.2f}", f"{100 * tf_read / PEAK_TFLOPS[p]:.0f}%",
                         f"{t_torch:.2f}", f"{tf_torch:.1f}", f"{t_torch / t_add:.2f}x"])
            print("  done", rows[-1], flush=True)
        del x, x32, xs, ids, order
        torch.cuda.empty_cache()
    print("measured 8192^3 GEMM TFLOP/s: " + ", ".join(f"{p} {v:.1f}" for p, v in gemm.items()))
    print_table("routed Hessian (65,536 tokens' rows per expert)",
                ["model", "dim", "E", "rows", "x", "precision", "add ms", "TFLOP/s", "% peak", "% GEMM", "b2b ms", "b2b % peak", "+read ms",
                 "+read % peak", "torch ms", "torch TFLOP/s", "vs torch"], rows)


def loss_table(quick: bool) -> None:
    """GPTQ proxy loss with each precision's Hessian, evaluated with the fp32 Hessian."""
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


def profile_table(quick: bool) -> None:
    """Per-kernel CUDA time of one BF16 add per shape (torch.profiler): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    for model, E in CASES[:1] if quick else CASES:
        shp = SHAPES[model]
        d = shp.hidden
        n = CALIB_TOKENS * shp.top_k // shp.experts * E
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(n, d, device="cuda", generator=g)
        ids = torch.randint(0, E, (n,), device="cuda", generator=g, dtype=torch.int32)
        acc = ops.HessianAccumulator(E, d, device="cuda", precision="bf16")
        for xin in (x, x.to(torch.bfloat16)):
            acc.add(xin, ids)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                acc.add(xin, ids)
                torch.cuda.synchronize()
            print(f"profile {model} (dim {d}, {E} experts, {n} rows, x {xin.dtype}) bf16 add:")
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))
            timeline_report(lambda: acc.add(xin, ids), f"{model} bf16 add, x {xin.dtype}")
        del acc, x, ids, xin
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="DeepSeek-V3 only, 2 experts in the loss table")
    ap.add_argument("--no-loss", action="store_true", help="skip the GPTQ proxy-loss table")
    ap.add_argument("--profile", action="store_true", help="only the per-kernel CUDA time of one bf16 add per shape")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.profile:
        profile_table(args.quick)
        return
    speed_table(args.quick)
    if not args.no_loss:
        loss_table(args.quick)


if __name__ == "__main__":
    main()
