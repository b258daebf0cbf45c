"""The greedy rounding correction step (docs/algorithms.md): with a scheme's ``rounding_passes`` > 0 and a Hessian,
the solver's codes are refined by :func:`moequant.ops.refine_rounding` (C++ ``moequant/rounding.h``, reference twin
``moequant/ref/rounding_ref.h``)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import ops

__all__ = ["refine"]


def refine(qt: ops.QuantizedTensor, w: torch.Tensor, h: Optional[torch.Tensor], scheme) -> ops.QuantizedTensor:
    """``qt`` refined by the greedy correction when ``scheme.rounding_passes`` is set and there is a Hessian, else
    ``qt`` itself."""
    if scheme.rounding_passes and h is not None:
        return ops.refine_rounding(qt, w, h, passes=scheme.rounding_passes,
                                   outlier_quantile=scheme.rounding_outlier_quantile)
    return qt
