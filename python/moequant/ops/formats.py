"""Floating-point and microscaling weight formats (``moequant/format.h``): FP8 E4M3, FP4 E2M1, FP6 with float,
FP8 or E8M0 scales, per tensor / channel / group / 2-D block, the NVFP4 per-tensor global scale, and the decoders of
the two quantized source checkpoints moequant reads (DeepSeek-V3 / Kimi-K2 FP8 128x128 blocks, gpt-oss MXFP4).

Torch tensors in and out; CPU tensors go through the C++ core, CUDA tensors through the kernels. The plain-PyTorch
twin is :mod:`moequant.ref.formats`; the formats are built with :class:`Format` (``Format.fp8_block()``,
``Format.nvfp4()``, ``Format.mxfp4()``, ...). docs/formats.md has every format's definition.
"""
from __future__ import annotations

import dataclasses

import torch

from moequant import _C

__all__ = ["Format", "ElementKind", "GroupKind", "ScaleKind", "FormatQuantized", "format_quantize",
           "format_dequantize", "pack_fp_codes", "unpack_fp_codes", "decode_fp8_block_scaled", "decode_mxfp4_blocks"]

Format = _C.Format
ElementKind, GroupKind, ScaleKind = _C.ElementKind, _C.GroupKind, _C.ScaleKind

_OUT_DTYPES = {torch.float32: _C.ScaleDtype.float32, torch.bfloat16: _C.ScaleDtype.bfloat16}


def _out_dtype(dtype: torch.dtype):
    try:
        return _OUT_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}") from None


@dataclasses.dataclass
class FormatQuantized:
    """A weight ``[rows, cols]`` quantized to a :class:`Format` by :func:`format_quantize` (RTN) or
    :func:`moequant.ops.gptq_quantize_format` (GPTQ).

    Attributes:
        codes: uint8 ``[rows, cols]`` element codes (FP8 byte, FP4/FP6 code in the low bits, int: the two's-complement
            byte of the code).
        scales: float32 ``[scale_rows, scale_cols]`` scale values (what dequantization multiplies by, the global
            scale divided out for NVFP4); scale_codes: uint8, their FP8 / E8M0 bytes (0 for float scales).
        zeros: int32 zero points (asymmetric ints; else 0). global_scale: float32 ``[1]`` (1 without one).
        dequantized: float32 ``[rows, cols]`` (empty when not requested). format: the :class:`Format`.
        loss: GPTQ's proxy loss ``tr((W - Q) H (W - Q)^T)`` (None for RTN, or when not computed); info: the solver's
            report (``loss``, ``damp``, ``damp_value``, ``escalations``, ``dead_columns``; empty for RTN).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    scale_codes: torch.Tensor
    zeros: torch.Tensor
    global_scale: torch.Tensor
    dequantized: torch.Tensor
    format: object
    loss: float | None = None
    info: dict = dataclasses.field(default_factory=dict)


def format_quantize(w: torch.Tensor, fmt, global_scale: torch.Tensor | None = None,
                    dequantized: bool = True) -> FormatQuantized:
    """Round-to-nearest quantization of ``w`` (float32 / bfloat16 / float16 ``[rows, cols]``) to ``fmt``;
    ``global_scale``: a float32 tensor of one element (NVFP4 partners such as gate and up share the gate's), else
    computed from ``w``."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor, got {getattr(w, 'shape', type(w))}")
    w = w if w.stride(-1) == 1 else w.contiguous()
    out = _C.format_quantize(w, fmt, global_scale, dequantized)
    return FormatQuantized(*out, format=fmt)


def format_dequantize(q: FormatQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight of ``q`` as a loader reconstructs it, in float32 or bfloat16."""
    f = q.format
    zeros = q.zeros if f.element == ElementKind.int and not f.symmetric else None
    return _C.format_dequantize(q.codes, q.scales, zeros, q.global_scale if f.global_scale else None, f,
                                _out_dtype(dtype))


def pack_fp_codes(codes: torch.Tensor, element) -> torch.Tensor:
    """FP4: two codes per byte, low nibble first; FP6: four codes per three bytes; FP8: the bytes."""
    return _C.pack_fp_codes(codes, element)


def unpack_fp_codes(packed: torch.Tensor, element, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_fp_codes`: uint8 codes ``[rows, cols]``."""
    return _C.unpack_fp_codes(packed, element, int(cols))


def decode_fp8_block_scaled(weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                            dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A DeepSeek-V3 / Kimi-K2 FP8 weight: ``weight`` float8_e4m3fn ``[r, c]`` times ``weight_scale_inv`` float32
    ``[ceil(r/128), ceil(c/128)]`` per 128x128 block (partial edge blocks included), in ``dtype``."""
    return _C.decode_fp8_block_scaled(weight, weight_scale_inv, int(block[0]), int(block[1]), _out_dtype(dtype))


def decode_mxfp4_blocks(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                        ) -> torch.Tensor:
    """A gpt-oss MXFP4 tensor: ``blocks`` uint8 ``[..., G, 16]`` (32 E2M1 codes per group) and E8M0 ``scales``
    uint8 ``[..., G]`` -> ``[..., G * 32]`` in ``dtype`` (transformers' ``convert_moe_packed_tensors`` before its
    transpose)."""
    return _C.decode_mxfp4_blocks(blocks, scales, _out_dtype(dtype))
