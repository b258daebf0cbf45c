"""Plain twin of :mod:`moequant.ops.act_quant`: a runtime's input and KV-cache quantization, written from the
runtimes' definitions one token row (and one group) at a time with the element codecs of
:mod:`moequant.ref.formats`. Slow; for tests on small tensors. Bit-exact with the ops.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .formats import (e2m1_decode_ref, e2m1_encode_ref, e4m3_decode_ref, e4m3_encode_ref, e8m0_decode_ref,
                      mx_scale_exponent_ref)

__all__ = ["fake_quantize_activations_ref", "fake_quantize_fp8_ref"]

_GROUP = {"fp8_token": None, "fp8_group": 128, "nvfp4": 16, "mxfp4": 32, "mxfp8": 32, "int8_token": None}


def _fp8_group(v: Tensor) -> Tensor:
    s = v.abs().max() / 448.0  # a float32 scale
    if s == 0:
        s = torch.tensor(torch.finfo(torch.float32).eps)
    return e4m3_decode_ref(e4m3_encode_ref(v / s)) * s


def _int8_row(v: Tensor) -> Tensor:
    amax = v.abs().max()
    if amax == 0:
        return torch.zeros_like(v)
    q = torch.clamp(torch.round(v * (127.0 / amax)), -128, 127)  # torch.round: half to even, as vLLM's rint
    return q * (amax / 127.0)


def _nvfp4_group(v: Tensor, g: Tensor) -> Tensor:
    code = e4m3_encode_ref(v.abs().max() / 6.0 * g)
    if e4m3_decode_ref(code) == 0:  # the format core's smallest scale (0.125) for a group that rounds to 0
        code = torch.tensor(0x20, dtype=torch.uint8)
    eff = e4m3_decode_ref(code) / g
    return e2m1_decode_ref(e2m1_encode_ref(v / eff)) * eff


def _mx_group(v: Tensor, element: str) -> Tensor:
    scale = e8m0_decode_ref(mx_scale_exponent_ref(v.abs().max().reshape(1), element))
    if element == "fp4_e2m1":
        return e2m1_decode_ref(e2m1_encode_ref(v / scale)) * scale
    return e4m3_decode_ref(e4m3_encode_ref(v / scale)) * scale


def fake_quantize_activations_ref(x: Tensor, kind: str, global_scale: Tensor | float | None = None) -> Tensor:
    """Twin of :func:`moequant.ops.fake_quantize_activations` (``kind``: an ``ActivationFormat.kind``)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out = torch.zeros_like(rows)
    g = None if global_scale is None else torch.as_tensor(global_scale, dtype=torch.float32).reshape(())
    size = _GROUP[kind]
    for r in range(rows.shape[0]):
        row = rows[r]
        if kind == "int8_token":
            out[r] = _int8_row(row)
            continue
        width = size or row.numel()
        for c in range(0, row.numel(), width):
            v = row[c:c + width]
            if kind in ("fp8_token", "fp8_group"):
                out[r, c:c + width] = _fp8_group(v)
            elif kind == "nvfp4":
                out[r, c:c + width] = _nvfp4_group(v, g)
            else:
                out[r, c:c + width] = _mx_group(v, "fp4_e2m1" if kind == "mxfp4" else "fp8_e4m3")
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_fp8_ref(x: Tensor, scale: Tensor | float) -> Tensor:
    """Twin of :func:`moequant.ops.fake_quantize_fp8`: each value stored as the FP8 E4M3 code of ``x / scale``
    (saturating) and read back times ``scale``."""
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(())
    flat = x.reshape(-1).float()
    out = torch.stack([e4m3_decode_ref(e4m3_encode_ref(v / s)) * s for v in flat]) if flat.numel() else flat
    return out.reshape(x.shape).to(x.dtype)
