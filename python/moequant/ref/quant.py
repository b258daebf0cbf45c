"""Plain-PyTorch twin of ``libmoequant/include/moequant/quant.h`` (integer formats, 2..8 bits).

Every function here reproduces the C++ core bit for bit on CPU; the tests in ``tests/python/test_ops.py``
compare ``moequant.ops`` against these functions with ``torch.equal``.

The contract (compressed-tensors semantics), for a group of values x with b bits:

* ``qmin = -2**(b-1)``, ``qmax = 2**(b-1) - 1``; the group's range ``[lo, hi]`` is widened to include 0;
* symmetric: ``scale = max(-lo, hi) / ((qmax - qmin) / 2)``, ``zero = 0``;
* asymmetric: ``scale = (hi - lo) / (qmax - qmin)``, ``zero = clamp(round(qmin - lo / scale), qmin, qmax)``;
* the scale is rounded (to nearest, ties to even) to its storage dtype *before* the zero point is derived,
  and a zero scale becomes that dtype's epsilon;
* quantize ``q = clamp(round(x / scale + zero), qmin, qmax)``; dequantize ``(q - zero) * scale``; all in
  float32, ``round`` is half-to-even (``torch.round``, like ``std::nearbyint``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RtnResult",
    "qrange",
    "qparams_ref",
    "mse_qparams_ref",
    "quantize_ref",
    "dequantize_values_ref",
    "quantize_rtn_ref",
    "dequantize_ref",
]

_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RtnResult(NamedTuple):
    codes: Tensor  # int8 [out, in]
    scale: Tensor  # float32 [out, G]
    zero_point: Tensor  # int8 [out, G] (zeros when symmetric)
    dequantized: Tensor  # float32 [out, in]


def check_bits(bits: int) -> None:
    """ValueError unless ``bits`` is an integer in [2, 8] (the twins check their own arguments, independently of
    the package's validation)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an integer in [2, 8], got {bits!r}")


def _check_scale_dtype(scale_dtype: torch.dtype) -> None:
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype: expected one of float32, bfloat16, float16, got {scale_dtype}")


def qrange(bits: int) -> tuple[int, int]:
    """``(qmin, qmax) = (-2**(bits-1), 2**(bits-1) - 1)``."""
    check_bits(bits)
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _qparams_from_range(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """quant.h ``qparams_from_range`` on tensors: lo, hi float32 of any (equal) shape -> (scale f32, zero i32)."""
    qmin, qmax = qrange(bits)
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / torch.tensor((qmax - qmin) / 2.0, dtype=torch.float32)
    else:
        scale = (hi - lo) / torch.tensor(float(qmax - qmin), dtype=torch.float32)
    scale = scale.to(scale_dtype).float()  # round to the storage dtype (RNE), as round_scale() does
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=torch.float32), scale)
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        z = torch.round(torch.tensor(float(qmin), dtype=torch.float32) - lo / scale)
        zero = torch.clamp(z, qmin, qmax).to(torch.int32)
    return scale, zero


def qparams_ref(w_group: Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype = torch.float32):
    """Min/max parameters of each group: ``w_group`` float [..., g] -> ``(scale float32 [...], zero int32 [...])``.

    Bit-exact with quant.h ``qparams_from_range`` / ``compute_qparams`` (ScaleSearch::kMinMax).
    """
    _check_scale_dtype(scale_dtype)
    x = w_group.float()
    return _qparams_from_range(x.amin(-1), x.amax(-1), bits, symmetric, scale_dtype)


def quantize_ref(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``clamp(round(x / scale + zero), qmin, qmax)`` in float32 -> int32 codes (broadcasting shapes).

    Bit-exact with quant.h ``quantize_value``: the division, then the addition, then round-half-to-even.
    """
    qmin, qmax = qrange(bits)
    v = torch.round(x.float() / scale.float() + zero.float())
    return torch.clamp(v, qmin, qmax).to(torch.int32)


def dequantize_values_ref(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``float(q - zero) * scale`` in float32 (quant.h ``dequantize_value``)."""
    return (q.to(torch.int32) - zero.to(torch.int32)).float() * scale.float()


def abs_pow_sum_f64(err: Tensor, norm: float) -> Tensor:
    """``sum |err|**norm`` over the last dim, left to right in float64, with the C library's ``pow``.

    quant.h accumulates ``std::pow(fabs(v - d), norm)`` in a sequential double loop. ``math.pow`` is that
    same libm ``pow``; ``torch.pow`` uses a SIMD approximation that differs by one ulp in ~2% of inputs, which
    could flip near-ties between candidates. ``cumsum`` on CPU accumulates sequentially, like the C++ loop.
    """
    a = err.abs().to(torch.float64)
    powed = torch.tensor([math.pow(v, norm) for v in a.reshape(-1).tolist()], dtype=torch.float64)
    powed = powed.reshape(a.shape)
    if powed.shape[-1] == 0:
        return powed.sum(-1)
    return torch.cumsum(powed, dim=-1)[..., -1]


def mse_qparams_ref(
    w_group: Tensor,
    bits: int,
    symmetric: bool,
    scale_dtype: torch.dtype = torch.float32,
    grid: int = 100,
    min_shrink: float = 0.2,
    norm: float = 2.4,
):
    """MSE scale search per group: ``w_group`` float [..., g] -> ``(scale float32 [...], zero int32 [...])``.

    Candidates ``p_i = float32(1 - i / grid)`` for ``i = 0 .. floor((1 - min_shrink) * grid + 1e-9)``; the range
    ``[lo * p_i, hi * p_i]`` (fp32 products of the widened min/max) gives candidate parameters; the error
    ``sum |x - dequant(quant(x))| ** norm`` is accumulated in float64 and the first minimum wins (strict ``<``,
    so ties keep the larger range). Bit-exact with quant.h ``compute_qparams`` (ScaleSearch::kMse).
    """
    _check_scale_dtype(scale_dtype)
    if grid < 1:
        raise ValueError(f"mse_grid: expected >= 1, got {grid}")
    if not 0.0 < min_shrink <= 1.0:
        raise ValueError(f"mse_min_shrink: expected a value in (0, 1], got {min_shrink}")
    if not (norm > 0.0 and math.isfinite(norm)):
        raise ValueError(f"mse_norm: expected a finite value > 0, got {norm}")
    x = w_group.float()
    lo = torch.clamp(x.amin(-1), max=0.0)
    hi = torch.clamp(x.amax(-1), min=0.0)
    steps = int(math.floor((1.0 - min_shrink) * grid + 1e-9))
    shrink = torch.tensor([1.0 - i / grid for i in range(steps + 1)], dtype=torch.float64).float()  # [C]
    shape_c = (-1,) + (1,) * lo.dim()
    lo_c = lo.unsqueeze(0) * shrink.reshape(shape_c)  # [C, ...] fp32 products
    hi_c = hi.unsqueeze(0) * shrink.reshape(shape_c)
    scale_c, zero_c = _qparams_from_range(lo_c, hi_c, bits, symmetric, scale_dtype)
    q = quantize_ref(x.unsqueeze(0), scale_c.unsqueeze(-1), zero_c.unsqueeze(-1), bits)
    deq = dequantize_values_ref(q, scale_c.unsqueeze(-1), zero_c.unsqueeze(-1))
    err = abs_pow_sum_f64(x.unsqueeze(0).double() - deq.double(), norm)  # [C, ...]
    best = torch.argmin(err, dim=0, keepdim=True)  # argmin returns the first minimum: the strict-< scan
    return scale_c.gather(0, best).squeeze(0), zero_c.gather(0, best).squeeze(0)


def group_size_of(cols: int, group_size: int | None) -> int:
    """Effective group size: ``None`` or ``<= 0`` means one group per row (per-channel)."""
    if group_size is None or group_size <= 0:
        return cols
    if cols % group_size != 0:
        raise ValueError(
            f"group_size: expected a divisor of in_features={cols} (or -1 for per-channel), got {group_size}"
        )
    return group_size


def quantize_rtn_ref(
    w: Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    scale_search: str = "minmax",
    mse_grid: int = 100,
    mse_min_shrink: float = 0.2,
    mse_norm: float = 2.4,
    scale_dtype: torch.dtype = torch.float32,
) -> RtnResult:
    """Round-to-nearest quantization of ``w`` float [out, in] (fp32/bf16/fp16, read as float32).

    Returns ``RtnResult(codes int8 [out, in], scale float32 [out, G], zero_point int8 [out, G],
    dequantized float32 [out, in])`` with ``G = in / group_size`` (``group_size`` ``None``/``-1``: G = 1).
    Bit-exact with quant.h ``quantize_rtn`` and hence with ``moequant.ops.quantize_rtn``.
    """
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor [out_features, in_features], got {w.dim()}-D")
    if scale_search not in ("minmax", "mse"):
        raise ValueError(f"scale_search: expected 'minmax' or 'mse', got {scale_search!r}")
    x = w.float()
    if not torch.isfinite(x).all():
        raise ValueError("w: expected finite values, got NaN or Inf")
    out, cols = x.shape
    gs = group_size_of(cols, group_size)
    xg = x.reshape(out, cols // gs, gs)
    if scale_search == "mse":
        scale, zero = mse_qparams_ref(xg, bits, symmetric, scale_dtype, mse_grid, mse_min_shrink, mse_norm)
    else:
        scale, zero = qparams_ref(xg, bits, symmetric, scale_dtype)
    q = quantize_ref(xg, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    deq = dequantize_values_ref(q, scale.unsqueeze(-1), zero.unsqueeze(-1))
    return RtnResult(
        codes=q.reshape(out, cols).to(torch.int8),
        scale=scale,
        zero_point=zero.to(torch.int8),
        dequantized=deq.reshape(out, cols),
    )


def dequantize_ref(codes: Tensor, scale: Tensor, zero: Tensor | None, group_size: int | None) -> Tensor:
    """``(codes - zero) * scale`` per group: codes int [out, in], scale [out, G], zero int [out, G] or ``None``.

    Returns float32 [out, in]. Bit-exact with quant.h ``dequantize`` / ``moequant.ops.dequantize``.
    """
    out, cols = codes.shape
    gs = group_size_of(cols, group_size)
    g = cols // gs
    if tuple(scale.shape) != (out, g):
        raise ValueError(f"scale: expected shape [{out}, {g}], got {list(scale.shape)}")
    if zero is None:
        zero = torch.zeros(out, g, dtype=torch.int32)
    deq = dequantize_values_ref(codes.reshape(out, g, gs), scale.unsqueeze(-1), zero.unsqueeze(-1))
    return deq.reshape(out, cols)
