"""Weight-format kernels (CUDA, kernels/src/format.cu): time, GB/s and % of the measured copy bandwidth, per format.

Run on a GPU machine from the repository root (moequant built with CUDA):
    python benchmarks/bench_formats.py [--rows 16384] [--cols 7168]

Bytes = what the call must move at least once: quantize reads w (4 B fp32 / 2 B bf16 per element) and writes the codes
(1 B) and, unless "no deq", the float32 dequantized weight (4 B), plus the scales; a per-tensor scale or a computed
NVFP4 global scale needs a range pass that reads w once more, and those rows count that read too ("+range"), so their
% is of the traffic actually required by the two passes. dequantize reads the codes (1 B) and writes 4 B (fp32) or 2 B
(bf16); pack / unpack move 1 B of codes and 0.5 B (FP4) / 0.75 B (FP6) packed; the FP8 block decoder reads 1 B and
writes 2 B (bf16); the gpt-oss MXFP4 decoder reads 0.5 B + 1/32 B of scales and writes 2 B (bf16).

"ms" is the median of single calls between CUDA events (host launch latency included; quantize and pack wait for their
error flags, so they include one stream synchronisation); "ms b2b" the per-call time of 10 back-to-back calls. GB/s and
"% of copy" use "ms"; "% b2b" uses "ms b2b". The copy bandwidth is a large clone() measured in this process.
The target (issue #14) is >= 70 % of copy on 16384 x 7168.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import back_to_back_ms, copy_bandwidth_gbps, cuda_time_ms, print_table  # noqa: E402

from moequant import _C  # noqa: E402

EK, SD = _C.ElementKind, _C.ScaleDtype


def _row(op, fmt_name, shape, nbytes, ms, ms_b2b, bw):
    return [op, fmt_name, shape, f"{ms:.3f}", f"{nbytes / ms / 1e6:.0f}", f"{100 * nbytes / ms / 1e6 / bw:.0f}%",
            f"{ms_b2b:.3f}", f"{100 * nbytes / ms_b2b / 1e6 / bw:.0f}%"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=7168)
    args = ap.parse_args()
    R, C = args.rows, args.cols
    n = R * C
    shape = f"{R}x{C}"
    bw = copy_bandwidth_gbps()
    formats = [
        ("nvfp4", _C.Format.nvfp4(), 16),
        ("mxfp4", _C.Format.mxfp4(), 32),
        ("mxfp6_e2m3", _C.Format.mx(EK.fp6_e2m3), 32),
        ("mxfp8", _C.Format.mx(EK.fp8_e4m3), 32),
        ("fp8_block128", _C.Format.fp8_block(), 128 * 128),
        ("fp8_channel", _C.Format.fp8_channel(SD.bfloat16), C),
        ("fp8_tensor", _C.Format.fp8_tensor(), n),
    ]
    rows = []
    torch.manual_seed(0)
    w32 = torch.randn(R, C, device="cuda") * 0.02
    w16 = w32.to(torch.bfloat16)
    for name, fmt, group in formats:
        scale_bytes = 8 * max(1, n // group)  # value + byte, generously
        two_pass = name == "fp8_tensor" or name == "nvfp4"
        for w, wname, es in ((w32, "fp32", 4), (w16, "bf16", 2)):
            for deq in (True, False):
                q = lambda: _C.format_quantize(w, fmt, None, deq)  # noqa: E731
                nbytes = n * (es + 1 + (4 if deq else 0)) + scale_bytes + (n * es if two_pass else 0)
                op = f"quantize {wname}{'' if deq else ' no deq'}{' +range' if two_pass else ''}"
                rows.append(_row(op, name, shape, nbytes, cuda_time_ms(q, repeats=5), back_to_back_ms(q), bw))
        if name == "nvfp4":  # the global scale given (fused gate / up share one): one pass
            g = torch.tensor([448.0 * 6.0 / w32.abs().max().item()], device="cuda")
            q = lambda: _C.format_quantize(w16, fmt, g, False)  # noqa: E731
            rows.append(_row("quantize bf16 no deq, global given", name, shape, n * 3 + scale_bytes,
                             cuda_time_ms(q, repeats=5), back_to_back_ms(q), bw))
        codes, scales, _, _, gs, _ = _C.format_quantize(w16, fmt, None, False)
        gg = gs if name == "nvfp4" else None
        for out_dtype, oes in ((SD.bfloat16, 2), (SD.float32, 4)):
            d = lambda: _C.format_dequantize(codes, scales, None, gg, fmt, out_dtype)  # noqa: E731
            rows.append(_row(f"dequantize -> {'bf16' if oes == 2 else 'fp32'}", name, shape,
                             n * (1 + oes) + scales.numel() * 4, cuda_time_ms(d, repeats=5), back_to_back_ms(d), bw))
        if fmt.element in (EK.fp4_e2m1, EK.fp6_e2m3):
            per = 0.5 if fmt.element == EK.fp4_e2m1 else 0.75
            p = lambda: _C.pack_fp_codes(codes, fmt.element)  # noqa: E731
            packed = p()
            rows.append(_row("pack", name, shape, int(n * (1 + per)), cuda_time_ms(p, repeats=5), back_to_back_ms(p),
                             bw))
            u = lambda: _C.unpack_fp_codes(packed, fmt.element, C)  # noqa: E731
            rows.append(_row("unpack", name, shape, int(n * (1 + per)), cuda_time_ms(u, repeats=5),
                             back_to_back_ms(u), bw))
        del codes, scales
    # source-checkpoint decoders
    weight = (w32 * 2000).to(torch.float8_e4m3fn)
    scale_inv = torch.rand((R + 127) // 128, (C + 127) // 128, device="cuda") * 1e-3
    dsk = lambda: _C.decode_fp8_block_scaled(weight, scale_inv, 128, 128, SD.bfloat16)  # noqa: E731
    rows.append(_row("decode -> bf16", "deepseek_fp8_128x128", shape, n * 3, cuda_time_ms(dsk, repeats=5),
                     back_to_back_ms(dsk), bw))
    blocks = torch.randint(0, 256, (R, C // 32, 16), dtype=torch.uint8, device="cuda")
    bscales = torch.randint(110, 130, (R, C // 32), dtype=torch.uint8, device="cuda")
    mx = lambda: _C.decode_mxfp4_blocks(blocks, bscales, SD.bfloat16)  # noqa: E731
    rows.append(_row("decode -> bf16", "gpt_oss_mxfp4", shape, int(n * (0.5 + 2) + n // 32),
                     cuda_time_ms(mx, repeats=5), back_to_back_ms(mx), bw))
    print(f"device copy bandwidth (clone, measured): {bw:.0f} GB/s; device: {torch.cuda.get_device_name()}")
    print_table("weight formats (CUDA)", ["op", "format", "shape", "ms", "GB/s", "% of copy", "ms b2b", "% b2b"], rows)


if __name__ == "__main__":
    main()
