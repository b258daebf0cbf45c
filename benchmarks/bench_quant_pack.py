"""Quantize / dequantize / pack / unpack benchmark (CUDA): effective GB/s against the device copy bandwidth.

Bytes = what the kernel must read + write: quantize_rtn (w f32 in; codes i8 + dequantized f32 + scales/zeros out),
dequantize (codes + scales/zeros in, f32 out), pack (codes in, int32 words out), unpack (words in, codes out).
The copy bandwidth is a large clone() measured in this process (2 * bytes / time).

"ms" is the median of single calls, each between its own pair of CUDA events: it includes the host's launch latency
and, for quantize_rtn and pack (which wait for their error flag: quantize_rtn reads a device flag back, pack a
page-locked host word the kernel writes), the stream synchronisation. "ms b2b" is the per-call time of 10
back-to-back calls between one pair of events: for dequantize and unpack (no host wait) the launch latency then hides
behind the previous call; for quantize_rtn and pack it cannot (each call waits).
GB/s and "% of copy" use "ms"; "% b2b" uses "ms b2b".
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import back_to_back_ms, copy_bandwidth_gbps, cuda_time_ms, print_table  # noqa: E402

from moequant import ops  # noqa: E402


def _row(op, shape, nbytes, ms, ms_b2b, bw):
    return [op, shape, f"{ms:.3f}", f"{nbytes / ms / 1e6:.0f}", f"{100 * nbytes / ms / 1e6 / bw:.0f}%",
            f"{ms_b2b:.3f}", f"{100 * nbytes / ms_b2b / 1e6 / bw:.0f}%"]


def main():
    bw = copy_bandwidth_gbps()
    rows = []
    for R, C, gs, search in [(16384, 7168, 128, "minmax"), (4096, 2048, 128, "minmax"), (4096, 7168, 128, "mse")]:
        w = torch.randn(R, C, device="cuda")
        ng = C // gs
        quant = lambda: ops.quantize_rtn(w, 4, gs, scale_search=search)  # noqa: E731
        t_q = cuda_time_ms(quant, repeats=5)
        t_q2 = back_to_back_ms(quant) if search == "minmax" else t_q
        qt = ops.quantize_rtn(w, 4, gs)
        b_q = R * C * (4 + 1 + 4) + R * ng * 8
        rows.append(_row(f"quantize_rtn {search}", f"{R}x{C}", b_q, t_q, t_q2, bw))
        if search != "minmax":
            continue
        deq = lambda: ops.dequantize(qt.codes, qt.scale, qt.zero_point, gs, 4)  # noqa: E731
        b_d = R * C * (1 + 4) + R * ng * 8
        rows.append(_row("dequantize", f"{R}x{C}", b_d, cuda_time_ms(deq, repeats=5), back_to_back_ms(deq), bw))
        pack = lambda: ops.pack_int32(qt.codes, 4)  # noqa: E731
        packed = ops.pack_int32(qt.codes, 4)
        b_p = R * C * (1 + 0.5)
        rows.append(_row("pack 4-bit", f"{R}x{C}", b_p, cuda_time_ms(pack, repeats=5), back_to_back_ms(pack), bw))
        unpack = lambda: ops.unpack_int32(packed, 4, C)  # noqa: E731
        rows.append(_row("unpack 4-bit", f"{R}x{C}", b_p, cuda_time_ms(unpack, repeats=5), back_to_back_ms(unpack),
                         bw))
        del w, qt, packed
        torch.cuda.empty_cache()
    print(f"device copy bandwidth (clone, measured): {bw:.0f} GB/s")
    print_table("quantize / pack (CUDA)", ["op", "shape", "ms", "GB/s", "% of copy", "ms b2b", "% b2b"], rows)


if __name__ == "__main__":
    main()
