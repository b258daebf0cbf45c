"""Hadamard transform benchmark (CUDA): GB/s (read + write) against the device copy bandwidth, and the dense
fp32 matmul x @ H / sqrt(n) (TF32 off) as the naive baseline for n <= 8192.

"ms" is the median of 21 single calls, each between its own pair of CUDA events (it includes the host's launch
latency: the GPU idles until the call reaches it); "ms b2b" is the median per-call time of 10 back-to-back calls
between one pair of events (the launch latency hidden behind the previous call), the steady state of a pipeline
that transforms many tensors. GB/s and "% of copy" use "ms"; "% b2b" uses "ms b2b".
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import back_to_back_ms, copy_bandwidth_gbps, cuda_time_ms, print_table  # noqa: E402

from moequant import ops  # noqa: E402
from moequant.ref import hadamard_matrix  # noqa: E402


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    bw = copy_bandwidth_gbps()
    rows = []
    total_elems = 1 << 26  # 64M elements per call (256 MB fp32)
    for n in [128, 768, 2048, 4096, 7168, 14336, 16384, 32768]:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(total_elems // n, n, device="cuda").to(dtype)
            ms = cuda_time_ms(lambda: ops.hadamard_transform(x), repeats=21, warmup=3)
            ms_b2b = back_to_back_ms(lambda: ops.hadamard_transform(x))
            nbytes = 2 * x.numel() * x.element_size()
            dense = "-"
            if n <= 8192 and dtype == torch.float32:
                Hm = (hadamard_matrix(n).float() / math.sqrt(n)).cuda()
                dense = f"{cuda_time_ms(lambda: x @ Hm, repeats=3, warmup=1):.3f}"
                del Hm
            rows.append([n, str(dtype).replace("torch.", ""), x.shape[0], f"{ms:.3f}", f"{nbytes / ms / 1e6:.0f}",
                         f"{100 * nbytes / ms / 1e6 / bw:.0f}%", f"{ms_b2b:.3f}",
                         f"{100 * nbytes / ms_b2b / 1e6 / bw:.0f}%", dense])
            del x
            torch.cuda.empty_cache()
    tiny = torch.randn(1, 128, device="cuda").to(torch.bfloat16)
    floor_us = 1e3 * cuda_time_ms(lambda: ops.hadamard_transform(tiny), repeats=21, warmup=3)
    print(f"device copy bandwidth (clone, measured): {bw:.0f} GB/s")
    print(f"per-call floor (one 1 x 128 bf16 call, the host path + launch of any call): {floor_us:.1f} us")
    print_table("Hadamard transform (CUDA)", ["n", "dtype", "rows", "ms", "GB/s", "% of copy", "ms b2b", "% b2b",
                                                    "dense fp32 ms"], rows)


if __name__ == "__main__":
    main()
