"""Timing helpers shared by the GPU benchmarks: CUDA events, warm-up, median of repeats, copy bandwidth."""

from __future__ import annotations

import statistics

import torch


def cuda_time_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in ms, measured with CUDA events around each call (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a large clone, measured in this process."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    ms = cuda_time_ms(lambda: x.clone(), repeats=10, warmup=2)
    del x
    return 2 * nbytes / (ms * 1e-3) / 1e9


def fp32_gemm_tflops(n: int = 8192) -> float:
    """Achieved fp32 (TF32 off) GEMM rate in this process: the practical SIMT ceiling."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    ms = cuda_time_ms(lambda: a @ b, repeats=5, warmup=2)
    torch.backends.cuda.matmul.allow_tf32 = prev
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title} ==")
    for k, r in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("-+-".join("-" * w for w in widths))
