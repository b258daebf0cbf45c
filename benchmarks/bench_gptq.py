"""Batched GPTQ benchmark (issue: GPU fast path): moequant's CUDA solver vs the batched-PyTorch anchor.

Per shape (benchmarks/shapes.py): E experts of one projection solved together; reported per expert (amortised).
  ours       ops.gptq_quantize_batched (CUDA), without / with the proxy loss (one SSYRK rows*cols^2 per expert)
  anchor     the algorithm of /work/shared/tools/ref_gptq_batched.py (batched torch, fp32, TF32 off), same inputs,
             same process
  per-column the plain per-column eager loop on ONE expert (no batching), timed on the first columns and
             extrapolated linearly to all columns
FLOP count of GPTQ (per expert, R rows, C cols, block B), documented in docs/benchmarks.md:
  C^3/3 (Cholesky) + C^3/3 (triangular inverse) + R*C^2 (lazy trailing updates) + R*C*B (in-block updates);
  the loss adds R*C^2. TFLOP/s = that count / time; % of the H100 fp32 SIMT peak (66.9 TFLOP/s) and of the fp32
  GEMM rate measured in this process. (Our inverse runs as full GEMMs: 2*C^3/3 executed, C^3/3 counted.)
Loss columns: tr((W-Q) H (W-Q)^T) of ours / of the anchor (1.00 = same quality; the anchor has no dead-column or
scale-rounding handling but on these inputs it is the same algorithm).
Usage: python benchmarks/bench_gptq.py [--quick] [--shapes deepseek-v3,qwen3-30b-a3b,...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cuda_time_ms, fp32_gemm_tflops, print_table  # noqa: E402
from shapes import GPTQ_ANCHOR_MS, GPTQ_TARGETS_MS, H100_FP32_TFLOPS, SHAPES  # noqa: E402

from moequant import ops  # noqa: E402


# ---- the anchor: /work/shared/tools/ref_gptq_batched.py, verbatim algorithm ----------------------------------
def _qparams(w, maxq):
    xmin = w.amin(-1).clamp(max=0)
    xmax = w.amax(-1).clamp(min=0)
    s = (xmax - xmin).clamp(min=1e-8) / maxq
    z = torch.round(-xmin / s)
    return s, z


def anchor_batched_gptq(W, H, bits=4, group=128, block=128, damp=0.01):
    E, R, C = W.shape
    maxq = 2**bits - 1
    W = W.clone()
    idx = torch.arange(C, device=W.device)
    H = H.clone()
    H[:, idx, idx] += damp * H.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.empty_like(W)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1 = W[:, :, i1:i2].clone()
        Err = torch.empty_like(W1)
        Hi = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group == 0:
                s, z = _qparams(W1[:, :, i:i + group], maxq)
            w = W1[:, :, i]
            q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s
            Q[:, :, i1 + i] = q
            e = (w - q) / Hi[:, i, i][:, None]
            Err[:, :, i] = e
            W1[:, :, i:] -= e[:, :, None] * Hi[:, i, i:][:, None, :]
        W[:, :, i2:] -= torch.bmm(Err, Hinv[:, i1:i2, i2:])
    return Q


def per_column_loop(W, H, ncols, bits=4, group=128, damp=0.01):
    """The plain eager GPTQ (one expert, one column at a time, no lazy blocks) on the first ncols columns."""
    R, C = W.shape
    maxq = 2**bits - 1
    W = W.clone()
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i in range(ncols):
        if i % group == 0:
            s, z = _qparams(W[:, i:i + group], maxq)
        w = W[:, i]
        q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s
        e = (w - q) / U[i, i]
        W[:, i:] -= e[:, None] * U[i, i:][None, :]
    return W


def proxy_loss(W, Q, H):
    """tr((W-Q) H (W-Q)^T) per expert, fp32 GEMM (TF32 off), one expert at a time."""
    out = []
    for e in range(W.shape[0]):
        D = W[e] - Q[e]
        out.append(float(((D @ H[e]) * D).sum(dtype=torch.float64)))
    return out


def make_problem(E, R, C, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.randn(E, R, C, device="cuda", generator=g) * 0.02
    H = torch.empty(E, C, C, device="cuda")
    for e in range(E):  # H = X^T X / n of correlated activations, like a calibration Hessian
        X = torch.randn(1024, C, device="cuda", generator=g)
        X = X + 0.3 * X.roll(1, dims=1)
        H[e] = X.t() @ X / 1024
    return W, H


def gptq_flops(R, C, B, with_loss):
    f = 2 * C**3 / 3 + R * C**2 + R * C * B
    return f + (R * C**2 if with_loss else 0)


def bench_case(model, proj, E, repeats, percol_cols, gemm_tf):
    shp = SHAPES[model]
    R, C = shp.gate_up if proj == "gate_up" else shp.down
    gs = shp.group_size
    W, H = make_problem(E, R, C)
    torch.backends.cuda.matmul.allow_tf32 = False

    def ours(loss):
        return ops.gptq_quantize_batched(W, H, bits=4, group_size=gs, block_size=128, compute_loss=loss)

    t_noloss = cuda_time_ms(lambda: ours(False), repeats=repeats, warmup=1) / E
    t_loss = cuda_time_ms(lambda: ours(True), repeats=max(1, repeats - 1), warmup=0) / E
    res = ours(True)
    loss_ours = sum(r.loss for r in res)
    esc = sum(r.escalations for r in res)
    Q_ours = torch.stack([r.dequantized for r in res])
    loss_ours_torch = sum(proxy_loss(W, Q_ours, H))
    del res, Q_ours
    torch.cuda.empty_cache()

    anchor_ms = float("nan")
    loss_anchor = float("nan")
    if E * R * C * 4 * 3 + E * C * C * 4 * 4 < torch.cuda.get_device_properties(0).total_memory * 0.8:
        anchor_batched_gptq(W[:2], H[:2], group=gs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        Qa = anchor_batched_gptq(W, H, group=gs)
        torch.cuda.synchronize()
        anchor_ms = (time.perf_counter() - t0) * 1e3 / E
        loss_anchor = sum(proxy_loss(W, Qa, H))
        del Qa
        torch.cuda.empty_cache()

    ncols = min(percol_cols, C)
    per_column_loop(W[0], H[0], 8, group=gs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    per_column_loop(W[0], H[0], ncols, group=gs)
    torch.cuda.synchronize()
    percol_ms = (time.perf_counter() - t0) * 1e3 / ncols * C
    del W, H
    torch.cuda.empty_cache()

    key = (model, proj)
    tf = gptq_flops(R, C, 128, False) / (t_noloss * 1e-3) / 1e12
    return [f"{model} {proj}", f"{R}x{C}", E, f"{t_noloss:.3f}", f"{t_loss:.3f}",
            GPTQ_TARGETS_MS.get(key, "-"),
            f"{anchor_ms:.2f}", GPTQ_ANCHOR_MS.get(key, "-"), f"{anchor_ms / t_noloss:.1f}x",
            f"{percol_ms:.0f}", f"{percol_ms / t_noloss:.0f}x", f"{tf:.1f}", f"{100 * tf / H100_FP32_TFLOPS:.0f}%",
            f"{100 * tf / gemm_tf:.0f}%", f"{loss_ours / loss_anchor:.4f}", f"{loss_ours / loss_ours_torch:.6f}", esc]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer experts and repeats")
    ap.add_argument("--shapes", default="deepseek-v3,qwen3-30b-a3b,gpt-oss-120b,mixtral-8x7b")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    gemm_tf = fp32_gemm_tflops()
    print(f"fp32 GEMM (TF32 off) measured: {gemm_tf:.1f} TFLOP/s; spec fp32 peak {H100_FP32_TFLOPS} TFLOP/s")
    q = args.quick
    plan = {  # (model, proj): experts per batch
        ("deepseek-v3", "gate_up"): 8 if q else 32,
        ("deepseek-v3", "down"): 8 if q else 32,
        ("qwen3-30b-a3b", "gate_up"): 32 if q else 128,
        ("qwen3-30b-a3b", "down"): 32 if q else 128,
        ("gpt-oss-120b", "gate_up"): 8 if q else 32,
        ("gpt-oss-120b", "down"): 8 if q else 32,
        ("mixtral-8x7b", "gate_up"): 4 if q else 8,
        ("mixtral-8x7b", "down"): 4 if q else 8,
    }
    wanted = set(args.shapes.split(","))
    rows = []
    for (model, proj), E in plan.items():
        if model not in wanted:
            continue
        try:
            rows.append(bench_case(model, proj, E, repeats=2 if q else 3, percol_cols=64 if q else 128,
                                   gemm_tf=gemm_tf))
            print("  done", model, proj, rows[-1], flush=True)
        except torch.OutOfMemoryError as exc:  # report and go on with the next shape
            print(f"  {model} {proj}: out of memory ({exc})", flush=True)
            torch.cuda.empty_cache()
    print_table("batched GPTQ, ms per expert (amortised over E), 4-bit asym", [
        "shape", "RxC", "E", "ours", "ours+loss", "target", "anchor", "anchor(issue)", "vs anchor", "per-col(extrap)",
        "vs per-col", "TFLOP/s", "%fp32 peak", "%GEMM", "loss ours/anchor", "loss ret/torch", "escal"], rows)


if __name__ == "__main__":
    main()
