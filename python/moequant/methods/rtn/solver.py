"""The round-to-nearest solver (registered as ``rtn``; also the fallback for matrices without a Hessian)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ..base import Solver

__all__ = ["RTNSolver"]


class RTNSolver(Solver):
    name = "rtn"
    needs_hessian = False
    act_order = False
    reference = "quantize_rtn_ref"

    def solve(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme, storage: torch.dtype) -> ops.QuantizedTensor:
        return ops.quantize_rtn(w, scale_dtype=storage, **scheme.quant_kwargs())
