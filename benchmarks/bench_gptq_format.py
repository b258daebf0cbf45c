"""Batched GPTQ in the weight formats (issue #14; kernels/src/gptq_format.cu): time per expert, ratio to the int solver.

Per shape (benchmarks/shapes.py: Qwen3-30B-A3B and DeepSeek-V3 experts, gate+up solved as one [2I, H] weight, down
[H, I]) and format, E experts solved together by ops.gptq_quantize_format_batched on CUDA tensors:
  ms/exp     per expert, amortised over the batch (median of repeats, CUDA events), without the proxy loss
  int4 g128  ops.gptq_quantize_batched on the same W and H (4-bit asymmetric, groups of 128): the int batched solver
  vs int     ms/exp of the format / ms/exp of the int solver (1.00 = as fast; the factorisation and trailing SGEMMs
             are shared, only the tile parameters and the column kernel differ)
  vs RTN     mean over experts of tr((W-Q) H (W-Q)^T) of GPTQ / of RTN (ops.format_quantize, same format): < 1
  cpu ms     the CPU core (ops.gptq_quantize_format) on expert 0 (only where in_features <= --cpu-max-cols), and
  cpu codes  the fraction of expert 0's codes equal to the CPU core's (the GPU's fp32 factor and SGEMMs round
             differently: expect >= 0.99), loss gpu/cpu
Usage (repository root, CUDA build): python benchmarks/bench_gptq_format.py [--quick] [--act-order]
    [--shapes qwen3-30b-a3b,deepseek-v3] [--formats nvfp4,mxfp4,...] [--cpu-max-cols 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cuda_time_ms, print_table  # noqa: E402
from shapes import SHAPES  # noqa: E402

from moequant import _C, ops  # noqa: E402

EK, SD = _C.ElementKind, _C.ScaleDtype
FORMATS = {
    "nvfp4": _C.Format.nvfp4(),
    "mxfp4": _C.Format.mxfp4(),
    "mxfp6_e2m3": _C.Format.mx(EK.fp6_e2m3),
    "mxfp8": _C.Format.mx(EK.fp8_e4m3),
    "fp8_block128": _C.Format.fp8_block(),
    "fp8_channel": _C.Format.fp8_channel(SD.bfloat16),
    "fp8_tensor": _C.Format.fp8_tensor(),
    "int4_tensor": _C.Format(EK.int, bits=4, symmetric=True, group=_C.GroupKind.tensor),  # the static-scale engine
    "int4_g128": _C.Format.int_(4, False, 128),  # routed to the int solver (sanity: vs int ~ 1)
}


def make_problem(E, R, C, seed=0):
    """W ~ N(0, 0.02^2) with a few outliers; H = X^T X / n of correlated activations (as bench_gptq.py)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(E, R, C, device="cuda", generator=g) * 0.02
    W[:, ::97, ::89] *= 20.0
    H = torch.empty(E, C, C, device="cuda")
    for e in range(E):
        X = torch.randn(1024, C, device="cuda", generator=g)
        X = X + 0.3 * X.roll(1, dims=1)
        H[e] = X.t() @ X / 1024
    return W, H


def proxy_loss(w, q, h):
    d = (w - q).double()
    return float(((d @ h.double()) * d).sum())


def bench_shape(model, proj, E, fmt_names, act_order, repeats, cpu_max_cols):
    shp = SHAPES[model]
    R, C = shp.gate_up if proj == "gate_up" else shp.down
    W, H = make_problem(E, R, C)
    torch.backends.cuda.matmul.allow_tf32 = False
    t_int = cuda_time_ms(lambda: ops.gptq_quantize_batched(W, H, bits=4, group_size=128, act_order=act_order,
                                                           block_size=128, compute_loss=False),
                         repeats=repeats, warmup=1) / E
    rows = []
    for name in fmt_names:
        fmt = FORMATS[name]

        def run(loss=False):
            return ops.gptq_quantize_format_batched(W, H, fmt, act_order=act_order, block_size=128, compute_loss=loss)

        t = cuda_time_ms(run, repeats=repeats, warmup=1) / E
        res = run(True)
        ratios = []
        for e in range(E):
            rtn = ops.format_quantize(W[e], fmt).dequantized
            ratios.append(proxy_loss(W[e], res[e].dequantized, H[e]) / proxy_loss(W[e], rtn, H[e]))
        esc = sum(q.info["escalations"] for q in res)
        cpu_ms, match, lratio = "-", "-", "-"
        if C <= cpu_max_cols:
            t0 = time.perf_counter()
            cpu = ops.gptq_quantize_format(W[0].cpu(), H[0].cpu(), fmt, act_order=act_order)
            cpu_ms = f"{(time.perf_counter() - t0) * 1e3:.0f}"
            match = f"{float((res[0].codes.cpu() == cpu.codes).float().mean()):.4f}"
            lratio = f"{res[0].loss / cpu.loss:.4f}"
        rows.append([f"{model} {proj}", f"{R}x{C}", E, name, f"{t:.3f}", f"{t_int:.3f}", f"{t / t_int:.2f}",
                     f"{sum(ratios) / len(ratios):.3f}", esc, cpu_ms, match, lratio])
        print("  done", rows[-1], flush=True)
        del res
        torch.cuda.empty_cache()
    del W, H
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer experts and repeats")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--shapes", default="qwen3-30b-a3b,deepseek-v3")
    ap.add_argument("--formats", default="nvfp4,mxfp4,mxfp8,fp8_block128,fp8_channel,int4_tensor,int4_g128")
    ap.add_argument("--cpu-max-cols", type=int, default=2048,
                    help="compare expert 0 with the CPU core where in_features <= this (0: never)")
    args = ap.parse_args()
    fmt_names = args.formats.split(",")
    for n in fmt_names:
        if n not in FORMATS:
            ap.error(f"--formats: unknown format {n!r}; choose from {', '.join(FORMATS)}")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, act_order={args.act_order}")
    q = args.quick
    plan = {  # (model, proj): experts per batch
        ("qwen3-30b-a3b", "gate_up"): 16 if q else 128,
        ("qwen3-30b-a3b", "down"): 16 if q else 128,
        ("deepseek-v3", "gate_up"): 4 if q else 32,
        ("deepseek-v3", "down"): 8 if q else 32,
    }
    wanted = set(args.shapes.split(","))
    rows = []
    for (model, proj), E in plan.items():
        if model not in wanted:
            continue
        try:
            rows += bench_shape(model, proj, E, fmt_names, args.act_order, 2 if q else 3, args.cpu_max_cols)
        except torch.OutOfMemoryError as exc:
            print(f"  {model} {proj}: out of memory ({exc})", flush=True)
            torch.cuda.empty_cache()
    print_table(f"batched GPTQ in weight formats, ms per expert (amortised over E), act_order={args.act_order}", [
        "shape", "RxC", "E", "format", "ms/exp", "int4 g128", "vs int", "vs RTN", "escal", "cpu ms (exp 0)",
        "cpu codes", "loss gpu/cpu"], rows)


if __name__ == "__main__":
    main()
