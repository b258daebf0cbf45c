"""Fake quantization of what a runtime quantizes at inference: a Linear's input (the W8A8 / W4A4 schemes'
:class:`~moequant.formats.ActivationFormat`) and the FP8 KV cache (per-tensor ``k_scale`` / ``v_scale``). Pure
functions on torch tensors (CPU or CUDA, any leading dimensions, any float dtype; computed in float32, returned in
the input's dtype), used by ``moequant eval``'s simulation (:mod:`moequant.eval.simulate`); twin:
:mod:`moequant.ref.act_quant`. docs/formats.md ("Activation and KV-cache simulation") restates them.

=============  =========================================================================================
kind           what a row ``x`` (one token's input, ``in_features`` values) becomes
=============  =========================================================================================
``fp8_token``  ``s = amax(x) / 448`` (float32), ``e4m3(x / s) * s`` (vLLM's dynamic per-token FP8)
``fp8_group``  the same per 128 columns (vLLM's ``per_token_group_quant_fp8``, FP8_BLOCK's activations)
``int8_token`` ``s = amax(x) / 127``, ``clamp(round_half_even(x * (127 / amax(x))), -128, 127) * s`` (vLLM's
               ``scaled_int8_quant``; compressed-tensors' own fake quantization divides by 127.5 instead)
``nvfp4``      groups of 16: FP8 group scale ``e4m3(amax / 6 * g)`` with the module's static
               ``input_global_scale`` g, FP4 E2M1 elements of ``x / (scale / g)`` (the format core's NVFP4)
``mxfp4``      groups of 32, E8M0 scales (the format core's MXFP4, compressed-tensors' scale rounding)
``mxfp8``      the same with FP8 E4M3 elements (the format core's ``mx(fp8_e4m3)``)
=============  =========================================================================================

The float kinds go through the format core (:meth:`ActivationFormat.core`, ``moequant/format.h``: the C++ core on
the CPU, the CUDA kernels on a GPU); ``e4m3`` saturates at +-448 as vLLM's conversions do. The FP8 KV cache:
``e4m3(x / scale) * scale`` with the calibrated per-tensor scale (vLLM's cache write and read).
"""
from __future__ import annotations

from typing import Optional

import torch

from moequant.formats import ActivationFormat

from .formats import format_quantize

__all__ = ["fake_quantize_activations", "fake_quantize_fp8", "FP8_E4M3_MAX", "INT8_TOKEN_MAX"]

FP8_E4M3_MAX = 448.0
INT8_TOKEN_MAX = 127.0


def _check(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{what}: expected a floating-point tensor of at least 1 dimension, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


def fake_quantize_activations(x: torch.Tensor, fmt: ActivationFormat,
                              global_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` (``[..., in_features]``) quantized and dequantized as the runtime quantizes a Linear's input in
    format ``fmt`` (module docstring), row by row along the last dimension; same shape and dtype.
    ``global_scale``: NVFP4's static ``input_global_scale`` (float32, one element; required for ``nvfp4``,
    refused for the others)."""
    _check(x, "x")
    if not isinstance(fmt, ActivationFormat):
        raise ValueError(f"fmt: expected an ActivationFormat, got {fmt!r}")
    if fmt.static_global_scale != (global_scale is not None):
        raise ValueError(f"global_scale: {fmt.label()} {'needs' if fmt.static_global_scale else 'takes no'} "
                         f"input_global_scale, got {'None' if global_scale is None else 'one'}")
    if x.numel() == 0:
        return x.clone()
    rows = x.reshape(-1, x.shape[-1]).float()
    if fmt.kind == "int8_token":
        amax = rows.abs().amax(dim=1, keepdim=True)
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        q = torch.clamp(torch.round(rows * (INT8_TOKEN_MAX / safe)), -INT8_TOKEN_MAX - 1, INT8_TOKEN_MAX)
        # divided by a tensor on the rows' device: CUDA divides by a Python scalar as a multiplication by its
        # reciprocal (one bit less exact), which would make the GPU's scales differ from the CPU's and vLLM's
        scale = safe / torch.full((), INT8_TOKEN_MAX, device=rows.device)
        out = torch.where(amax > 0, q * scale, torch.zeros_like(rows))
    else:
        g = None
        if global_scale is not None:
            g = torch.as_tensor(global_scale, dtype=torch.float32).reshape(1).to(rows.device)
        out = format_quantize(rows.contiguous(), fmt.core(), g, dequantized=True).dequantized
    return out.reshape(x.shape).to(x.dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``e4m3(clamp(x / scale, -448, 448)) * scale`` in float32, returned in ``x``'s dtype: a tensor stored in an
    FP8 E4M3 KV cache with the per-tensor ``scale`` (``k_scale`` / ``v_scale``, > 0) and read back."""
    _check(x, "x")
    s = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    if s.numel() != 1 or not bool(torch.isfinite(s).all()) or not float(s) > 0:
        raise ValueError(f"scale: expected one finite value > 0, got {s.tolist()}")
    s = s.to(x.device)
    q = torch.clamp(x.float() / s, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)
