"""Greedy rounding correction of a quantized matrix (:func:`refine_rounding`, C++ ``moequant/rounding.h``; its
reference twin is the C++ ``moequant/ref/rounding_ref.h``)."""
from __future__ import annotations

import dataclasses

import torch

from moequant import _C

from .quant import QuantizedTensor, check_float_matrix, make_spec

__all__ = ["refine_rounding"]


def refine_rounding(qt: QuantizedTensor, w: torch.Tensor, h: torch.Tensor, passes: int = 1,
                    outlier_quantile: float = 0.99) -> QuantizedTensor:
    """Greedy rounding correction of ``qt`` (from :func:`quantize_rtn` or :func:`gptq_quantize` of ``w``).

    With the group parameters of ``qt`` fixed, flips single codes by +-1 (within range), best first, while the
    proxy loss ``(w_r - q_r) h (w_r - q_r)^T`` of each row drops; the ``floor((1 - outlier_quantile) * group)``
    largest ``|w|`` of each group keep their codes; ``passes`` bounds the flips per row to ``passes`` times its
    free columns. The loss never increases (a row that would not improve keeps its codes). Returns a new
    QuantizedTensor (same scales / zero points) whose ``loss`` is the loss after and whose ``info`` gains
    ``rounding`` = {loss_before, loss_after, flips, excluded, rows_reverted}. C++ core (``moequant/rounding.h``)
    on the CPU; results are moved back to ``qt``'s device. Deterministic.
    """
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"qt: expected a QuantizedTensor, got {type(qt).__name__}")
    check_float_matrix(w, "w")
    if tuple(w.shape) != tuple(qt.codes.shape):
        raise ValueError(f"w: expected the shape of qt.codes {tuple(qt.codes.shape)}, got {tuple(w.shape)}")
    cols = w.shape[1]
    if not isinstance(h, torch.Tensor) or h.dim() != 2 or not h.is_floating_point() or tuple(h.shape) != (cols, cols):
        raise ValueError(f"h: expected a float32/float64 tensor [{cols}, {cols}], got "
                         f"{getattr(h, 'dtype', type(h))} {tuple(getattr(h, 'shape', ()))}")
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes: expected an integer >= 0, got {passes!r}")
    if not (isinstance(outlier_quantile, (int, float)) and 0 < outlier_quantile <= 1):
        raise ValueError(f"outlier_quantile: expected a number in (0, 1], got {outlier_quantile!r}")
    spec = make_spec(qt.bits, qt.group_size, qt.symmetric, in_features=cols)
    hh = h.detach().cpu().contiguous()
    hh = hh if hh.dtype == torch.float64 else hh.float()
    zp = None if qt.symmetric else qt.zero_point.to(torch.int32).cpu().contiguous()
    codes, deq, info = _C.greedy_rounding(w.detach().float().cpu().contiguous(), hh,
                                          qt.codes.to(torch.int8).cpu().contiguous(),
                                          qt.scale.float().cpu().contiguous(), zp, spec, int(passes),
                                          float(outlier_quantile))
    device = qt.codes.device
    return dataclasses.replace(qt, codes=codes.to(device), values=deq.to(device),
                               loss=float(info["loss_after"]), info={**qt.info, "rounding": dict(info)})
