"""Quantization to an integer format: :class:`QuantizedTensor`, :func:`make_spec` (the C++ ``QuantSpec``),
round-to-nearest (:func:`quantize_rtn`) and :func:`dequantize`, plus the argument checks and result wrapping the
other op families share (:mod:`moequant.ops.gptq`, :mod:`moequant.ops.rounding`). Twins: :mod:`moequant.ref.quant`.

Format contract (compressed-tensors ``pack-quantized``, see docs/formats.md): codes ``q`` are signed integers in
``[-2^(b-1), 2^(b-1)-1]``; ``dequantized = (q - zero_point) * scale`` per group of ``group_size`` input columns
(``-1``: one group per row).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from moequant import _C
from moequant.formats import IntFormat, check_bits, matrix_group_size

__all__ = ["QuantizedTensor", "make_spec", "quantize_rtn", "dequantize", "check_float_matrix", "scale_dtype_for",
           "check_fp16_scales", "from_core"]

_SCALE_DTYPES = {
    torch.float32: _C.ScaleDtype.float32,
    torch.bfloat16: _C.ScaleDtype.bfloat16,
    torch.float16: _C.ScaleDtype.float16,
}
_SEARCHES = {"minmax": _C.ScaleSearch.minmax, "mse": _C.ScaleSearch.mse}


@dataclasses.dataclass
class QuantizedTensor:
    """A quantized ``[out, in]`` weight.

    Attributes:
        codes: int8 ``[out, in]``, signed codes in ``[-2^(b-1), 2^(b-1)-1]``.
        scale: float32 ``[out, G]``; each value is exactly representable in ``scale_dtype``.
        zero_point: int8 ``[out, G]`` (all zeros when symmetric).
        format: the :class:`~moequant.formats.IntFormat` (the solvers give the effective group size, ``in`` for
            per-channel; the pipeline keeps the recipe's, -1). ``bits``, ``group_size``, ``symmetric`` read it.
        scale_dtype: the dtype the scales are exactly representable in.
        loss: the proxy loss ``tr((W - Q) H (W - Q)^T)`` when a Hessian was used, else None.
        info: solver details (damping used, escalations, dead columns) when applicable.
        values: float32 ``[out, in]`` dequantized weight as the solver computed it, or None (read back from a file):
            :attr:`dequantized` then computes it from the codes on each access (it is not kept).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    format: IntFormat
    scale_dtype: torch.dtype = torch.float32
    loss: Optional[float] = None
    info: dict = dataclasses.field(default_factory=dict)
    values: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)

    @property
    def dequantized(self) -> torch.Tensor:
        """float32 ``[out, in]`` = ``(codes - zero_point) * scale`` per group."""
        if self.values is not None:
            return self.values
        fmt = self.format
        return dequantize(self.codes, self.scale, None if fmt.symmetric else self.zero_point, fmt.group_size,
                          fmt.bits)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def group_size(self) -> int:
        return self.format.group_size

    @property
    def symmetric(self) -> bool:
        return self.format.symmetric

    @property
    def damp(self) -> Optional[float]:
        return self.info.get("damp")

    @property
    def escalations(self) -> int:
        return int(self.info.get("escalations", 0))

    @property
    def dead_columns(self) -> int:
        return int(self.info.get("dead_columns", 0))

    def rows(self, sl: slice) -> "QuantizedTensor":
        """Rows ``sl`` of the matrix (rows are independent given the Hessian), same format, loss and info."""
        return QuantizedTensor(codes=self.codes[sl].contiguous(), scale=self.scale[sl].contiguous(),
                               zero_point=self.zero_point[sl].contiguous(), format=self.format,
                               scale_dtype=self.scale_dtype, loss=self.loss, info=self.info,
                               values=self.dequantized[sl])


def check_float_matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` if it is a 2-D floating-point tensor, else ValueError naming ``name``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [out_features, in_features], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point dtype (float32, bfloat16, float16), got {t.dtype}")
    return t


def make_spec(bits: int = 4, group_size: Optional[int] = 128, symmetric: bool = False, *,
              in_features: Optional[int] = None, scale_search: str = "minmax", mse_grid: int = 100,
              mse_min_shrink: float = 0.2, mse_norm: float = 2.4,
              scale_dtype: torch.dtype = torch.float32) -> "_C.QuantSpec":
    """Builds and validates the C++ ``QuantSpec``."""
    check_bits(bits)
    if in_features is not None:
        group_size = matrix_group_size(group_size, in_features)
    elif group_size is None:
        group_size = -1
    if scale_search not in _SEARCHES:
        raise ValueError(f"scale_search: expected one of {sorted(_SEARCHES)}, got {scale_search!r}")
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype: expected one of float32, bfloat16, float16, got {scale_dtype}")
    return _C.QuantSpec(bits=bits, group_size=group_size, symmetric=bool(symmetric),
                        scale_dtype=_SCALE_DTYPES[scale_dtype], search=_SEARCHES[scale_search],
                        mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm)


def scale_dtype_for(w: torch.Tensor, scale_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The scale dtype of a quantization of ``w``: ``scale_dtype``, else ``w``'s for bf16/fp16 weights, else fp32."""
    if scale_dtype is not None:
        return scale_dtype
    return w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32


def check_fp16_scales(scale: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """float16 scales saturate to inf above 65504 (rounded by the core like a loader would): name the first group
    and the remedy instead of returning a quantization whose dequantized weights are NaN. One reduction (and, on
    CUDA, one synchronisation) only for float16 scales."""
    if scale_dtype != torch.float16 or bool(torch.isfinite(scale).all()):
        return
    where = tuple((~torch.isfinite(scale)).nonzero()[0].tolist())
    raise ValueError(f"scale_dtype: float16 cannot hold the scale of group {where} (index of the scale tensor "
                     f"{tuple(scale.shape)}): it exceeds 65504, the largest float16, because the group's weights "
                     f"span too wide a range; quantize with scale_dtype=torch.bfloat16 or torch.float32")


def from_core(raw, spec, scale_dtype: torch.dtype, in_features: int, loss=None, info=None,
              check_scales: bool = True) -> QuantizedTensor:
    """A :class:`QuantizedTensor` from the core's ``(codes, scale, zero, dequantized)`` for ``spec``; its format
    has the effective group size (``in_features`` for per-channel). ``check_scales=False``: the caller checked the
    scales already (batched results are checked once for all experts)."""
    codes, scale, zero, deq = raw
    if check_scales:
        check_fp16_scales(scale, scale_dtype)
    fmt = IntFormat(spec.bits, spec.group_size if spec.group_size > 0 else in_features, spec.symmetric)
    return QuantizedTensor(codes=codes, scale=scale, zero_point=zero.to(torch.int8), format=fmt,
                           scale_dtype=scale_dtype, loss=loss, info=info or {}, values=deq)


def quantize_rtn(w: torch.Tensor, bits: int = 4, group_size: Optional[int] = 128, symmetric: bool = False, *,
                 scale_search: str = "minmax", mse_grid: int = 100, mse_min_shrink: float = 0.2,
                 mse_norm: float = 2.4, scale_dtype: Optional[torch.dtype] = None) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w`` ``[out, in]`` with per-group parameters.

    ``scale_dtype`` (default: ``w.dtype`` for bf16/fp16 weights, else float32) is the checkpoint dtype of the
    scales; they are rounded to it so the dequantized weight equals what a loader reconstructs. Runs on
    ``w``'s device. Bit-exact with :func:`moequant.ref.quantize_rtn_ref`.
    """
    check_float_matrix(w, "w")
    sd = scale_dtype_for(w, scale_dtype)
    spec = make_spec(bits, group_size, symmetric, in_features=w.shape[1], scale_search=scale_search,
                     mse_grid=mse_grid, mse_min_shrink=mse_min_shrink, mse_norm=mse_norm, scale_dtype=sd)
    return from_core(_C.quantize_rtn(w.float().contiguous(), spec), spec, sd, w.shape[1])


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
               group_size: Optional[int], bits: int = 8) -> torch.Tensor:
    """``(codes - zero_point) * scale`` per group, as float32 ``[out, in]``."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D integer tensor, got {getattr(codes, 'shape', type(codes))}")
    gs = matrix_group_size(group_size, codes.shape[1])
    spec = make_spec(bits, gs, zero_point is None)
    zp = None if zero_point is None else zero_point.to(torch.int32).contiguous()
    return _C.dequantize(codes.to(torch.int8).contiguous(), scale.float().contiguous(), zp, spec)
