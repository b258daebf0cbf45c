"""Quantization to a floating-point weight format (:class:`moequant.formats.FloatFormat`: FP8 per channel / in
128x128 blocks, NVFP4, MXFP4): :class:`FloatQuantizedTensor`, the pipeline's result for such a matrix (the
counterpart of :class:`moequant.ops.QuantizedTensor`, with the same interface), and round-to-nearest
(:func:`quantize_float`) over the format core (:func:`moequant.ops.format_quantize`; twin
:func:`moequant.ref.format_quantize_ref`). :func:`from_format_quantized` wraps what a GPTQ solve of a format returns.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moequant.formats import FloatFormat

from .formats import FormatQuantized, format_dequantize, format_quantize
from .quant import check_float_matrix, scale_dtype_for

__all__ = ["FloatQuantizedTensor", "quantize_float", "from_format_quantized"]


@dataclasses.dataclass
class FloatQuantizedTensor:
    """A ``[out, in]`` weight quantized to a :class:`~moequant.formats.FloatFormat`.

    Attributes:
        codes: uint8 ``[out, in]`` element codes (the FP8 byte; the FP4 code in the low 4 bits).
        scale: float32 scale values ``format.scale_shape(out, in)`` (FP8: exactly representable in ``scale_dtype``;
            NVFP4: the FP8 group scales before the global scale divides them; MXFP4: powers of two).
        scale_codes: uint8, their FP8 / E8M0 bytes (FP4 formats; zeros for FP8's float scales).
        format: the :class:`~moequant.formats.FloatFormat`. scale_dtype: the checkpoint dtype FP8 scales fit.
        global_scale: NVFP4's float32 ``[1]`` global scale (None for the other kinds).
        input_global_scale: NVFP4 W4A4's static float32 ``[1]`` activation global scale from calibration (set by the
            pipeline; None otherwise).
        loss, info, values: as :class:`moequant.ops.QuantizedTensor`'s.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    scale_codes: torch.Tensor
    format: FloatFormat
    scale_dtype: torch.dtype = torch.float32
    global_scale: Optional[torch.Tensor] = None
    input_global_scale: Optional[torch.Tensor] = None
    loss: Optional[float] = None
    info: dict = dataclasses.field(default_factory=dict)
    values: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    @property
    def zero_point(self) -> None:
        """Floating-point formats are symmetric: no zero points."""
        return None

    @property
    def dequantized(self) -> torch.Tensor:
        """float32 ``[out, in]``: ``decode(code) * scale`` (NVFP4: ``* fl(scale / global_scale)``)."""
        if self.values is not None:
            return self.values
        g = self.global_scale if self.global_scale is not None else torch.ones(1, device=self.codes.device)
        q = FormatQuantized(self.codes, self.scale.float(), self.scale_codes, None, g, None,
                            format=self.format.core(self.scale_dtype))
        return format_dequantize(q, torch.float32)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> int:
        return self.format.group_size

    @property
    def symmetric(self) -> bool:
        return True

    @property
    def damp(self) -> Optional[float]:
        return self.info.get("damp")

    @property
    def escalations(self) -> int:
        return int(self.info.get("escalations", 0))

    @property
    def dead_columns(self) -> int:
        return int(self.info.get("dead_columns", 0))

    def rows(self, sl: slice) -> "FloatQuantizedTensor":
        """Rows ``sl`` of the matrix with their scales (the global scales shared); an FP8-block matrix is cut only
        at a block boundary (ValueError otherwise)."""
        start, stop, _ = sl.indices(self.codes.shape[0])
        ssl = sl
        if self.format.is_block:
            br = self.format.block[0]
            if start % br or (stop % br and stop != self.codes.shape[0]):
                raise ValueError(f"rows: an FP8-block matrix is cut only at a multiple of {br} rows, got "
                                 f"{start}:{stop}")
            ssl = slice(start // br, -(-stop // br))
        return dataclasses.replace(self, codes=self.codes[sl].contiguous(), scale=self.scale[ssl].contiguous(),
                                   scale_codes=self.scale_codes[ssl].contiguous(), values=self.dequantized[sl])


def quantize_float(w: torch.Tensor, fmt: FloatFormat, *, scale_dtype: Optional[torch.dtype] = None,
                   global_scale: Optional[torch.Tensor] = None) -> FloatQuantizedTensor:
    """Round-to-nearest quantization of ``w`` ``[out, in]`` to ``fmt`` (min / max scales, compressed-tensors'
    semantics: docs/formats.md). ``scale_dtype`` (default: ``w.dtype`` for bf16 / fp16 weights, else float32) is
    the checkpoint dtype FP8's scales are rounded to; ``global_scale`` (NVFP4): a float32 tensor of one element
    shared with fused partners (gate / up, q / k / v), else computed from ``w``. Runs on ``w``'s device (CPU: the
    C++ core; CUDA: the kernels). Bit-exact with :func:`moequant.ref.format_quantize_ref`."""
    check_float_matrix(w, "w")
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"fmt: expected a moequant.formats.FloatFormat, got {type(fmt).__name__}")
    if global_scale is not None and not fmt.global_scale:
        raise ValueError(f"global_scale: expected None for {fmt.label()} (only NVFP4 has a global scale)")
    sd = scale_dtype_for(w, scale_dtype)
    g = None if global_scale is None else global_scale.detach().to(w.device, torch.float32).reshape(1)
    q = format_quantize(w, fmt.core(sd), g)
    return from_format_quantized(q, fmt, sd)


def from_format_quantized(q: FormatQuantized, fmt: FloatFormat, scale_dtype: torch.dtype,
                          loss: Optional[float] = None, info: Optional[dict] = None) -> FloatQuantizedTensor:
    """A :class:`FloatQuantizedTensor` of ``fmt`` from the format core's result ``q`` (RTN or GPTQ); ``loss`` /
    ``info`` default to ``q``'s own (GPTQ's proxy loss and report) where it has them."""
    loss = loss if loss is not None else getattr(q, "loss", None)
    info = dict(info if info is not None else (getattr(q, "info", None) or {}))
    values = q.dequantized if q.dequantized is not None and q.dequantized.numel() else None
    return FloatQuantizedTensor(codes=q.codes, scale=q.scales, scale_codes=q.scale_codes, format=fmt,
                                scale_dtype=scale_dtype, global_scale=q.global_scale if fmt.global_scale else None,
                                loss=loss, info=info, values=values)
