"""The round-to-nearest solver (registered as ``rtn``; also the fallback for matrices without a Hessian): every
weight format, integer (:func:`moequant.ops.quantize_rtn`) and floating-point (:func:`moequant.ops.quantize_float`)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ...formats import FloatFormat
from ..base import Solver

__all__ = ["RTNSolver"]


class RTNSolver(Solver):
    name = "rtn"
    needs_hessian = False
    act_order = False
    reference = "quantize_rtn_ref"

    def supports(self, fmt) -> bool:
        return True

    def solve(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme, storage: torch.dtype,
              global_scale: Optional[torch.Tensor] = None):
        fmt = scheme.format
        if isinstance(fmt, FloatFormat):
            return ops.quantize_float(w, fmt, scale_dtype=storage, global_scale=global_scale)
        return ops.quantize_rtn(w, scale_dtype=storage, **scheme.quant_kwargs())
