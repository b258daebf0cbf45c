"""The GPTQ solver (registered as ``gptq``): act-order with static groups, MSE or min/max scales, damping with
reported escalation; on a GPU same-shape matrices of a layer are solved in one batched call."""
from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ..base import Solver

__all__ = ["GPTQSolver"]


class GPTQSolver(Solver):
    name = "gptq"
    needs_hessian = True
    act_order = True
    reference = "gptq_quantize_ref"

    def solve(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme, storage: torch.dtype) -> ops.QuantizedTensor:
        return ops.gptq_quantize(w, h, scale_dtype=storage, **scheme.gptq_kwargs())

    def batchable(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme) -> bool:
        """The batched GPU solver's limits: CUDA, a Hessian, ``block_size <= 128``, MSE scales only with act-order."""
        return (w.is_cuda and h is not None and scheme.block_size <= 128
                and (scheme.scale_search != "mse" or scheme.act_order))

    def batch_bytes(self, rows: int, cols: int) -> int:
        return 4 * (3 * cols * cols + 4 * rows * cols)  # H (+ copy, workspace) and W, Q, dequantized, error

    def solve_batched(self, w: torch.Tensor, h: torch.Tensor, scheme, storage: torch.dtype,
                      compute_loss: bool) -> list:
        return ops.gptq_quantize_batched(w, h, scale_dtype=storage, overwrite_h=True, compute_loss=compute_loss,
                                         **scheme.gptq_kwargs())
