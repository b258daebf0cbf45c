"""Quantize / dequantize / pack / unpack benchmark (CUDA): effective GB/s against the device copy bandwidth.

Bytes = what the kernel must read + write: quantize_rtn (w f32 in; codes i8 + dequantized f32 + scales/zeros out),
dequantize (codes + scales/zeros in, f32 out), pack (codes in, int32 words out), unpack (words in, codes out).
The copy bandwidth is a large clone() measured in this process (2 * bytes / time).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import copy_bandwidth_gbps, cuda_time_ms, print_table  # noqa: E402

from moequant import ops  # noqa: E402


def main():
    bw = copy_bandwidth_gbps()
    rows = []
    for R, C, gs, search in [(16384, 7168, 128, "minmax"), (4096, 2048, 128, "minmax"), (4096, 7168, 128, "mse")]:
        w = torch.randn(R, C, device="cuda")
        ng = C // gs
        t_q = cuda_time_ms(lambda: ops.quantize_rtn(w, 4, gs, scale_search=search), repeats=5)
        qt = ops.quantize_rtn(w, 4, gs)
        b_q = R * C * (4 + 1 + 4) + R * ng * 8
        rows.append([f"quantize_rtn {search}", f"{R}x{C}", f"{t_q:.3f}", f"{b_q / t_q / 1e6:.0f}",
                     f"{100 * b_q / t_q / 1e6 / bw:.0f}%"])
        if search != "minmax":
            continue
        t_d = cuda_time_ms(lambda: ops.dequantize(qt.codes, qt.scale, qt.zero_point, gs, 4), repeats=5)
        b_d = R * C * (1 + 4) + R * ng * 8
        rows.append(["dequantize", f"{R}x{C}", f"{t_d:.3f}", f"{b_d / t_d / 1e6:.0f}", f"{100 * b_d / t_d / 1e6 / bw:.0f}%"])
        t_p = cuda_time_ms(lambda: ops.pack_int32(qt.codes, 4), repeats=5)
        packed = ops.pack_int32(qt.codes, 4)
        b_p = R * C * (1 + 0.5)
        rows.append(["pack 4-bit", f"{R}x{C}", f"{t_p:.3f}", f"{b_p / t_p / 1e6:.0f}", f"{100 * b_p / t_p / 1e6 / bw:.0f}%"])
        t_u = cuda_time_ms(lambda: ops.unpack_int32(packed, 4, C), repeats=5)
        rows.append(["unpack 4-bit", f"{R}x{C}", f"{t_u:.3f}", f"{b_p / t_u / 1e6:.0f}", f"{100 * b_p / t_u / 1e6 / bw:.0f}%"])
        del w, qt, packed
        torch.cuda.empty_cache()
    print(f"device copy bandwidth (clone, measured): {bw:.0f} GB/s")
    print_table("quantize / pack (CUDA)", ["op", "shape", "ms", "GB/s", "% of copy"], rows)


if __name__ == "__main__":
    main()
