"""The GPTQ solver (registered as ``gptq``): act-order with static groups, MSE or min/max scales, damping with
reported escalation; on a GPU same-shape matrices of a layer are solved in one batched call. Floating-point formats
(FP8, NVFP4, MXFP4) go through the format solver :func:`moequant.ops.gptq_quantize_format` (the CPU core; the
batched GPU solver behind :attr:`GPTQSolver.float_batched`), where this build has it (:meth:`GPTQSolver.supports`)."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch

from ... import ops
from ...formats import FloatFormat
from ..base import Solver

__all__ = ["GPTQSolver"]


class GPTQSolver(Solver):
    name = "gptq"
    needs_hessian = True
    act_order = True
    reference = "gptq_quantize_ref"
    # The batched GPU solver for floating-point formats (ops.gptq_quantize_format_batched): on since
    # tests/python/test_fp_gptq_cuda.py and test_fp_schemes_cuda.py passed on a GPU (docs/gpu-runs.md, run 36; the
    # kernels have not changed since). False: a CUDA matrix in a floating-point format is solved by the CPU core, one
    # at a time (test_fp_schemes_cuda.py compares both routes).
    float_batched: ClassVar[bool] = True

    def supports(self, fmt) -> bool:
        """Integer formats always; floating-point formats with the format solver (``ops.gptq_quantize_format``)."""
        return not isinstance(fmt, FloatFormat) or hasattr(ops, "gptq_quantize_format")

    def solve(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme, storage: torch.dtype,
              global_scale: Optional[torch.Tensor] = None):
        fmt = scheme.format
        if isinstance(fmt, FloatFormat):
            q = ops.gptq_quantize_format(w, h, fmt.core(storage), act_order=scheme.act_order, damp=scheme.damp,
                                         block_size=scheme.block_size, global_scale=global_scale)
            return ops.from_format_quantized(q, fmt, storage)
        return ops.gptq_quantize(w, h, scale_dtype=storage, **scheme.gptq_kwargs())

    def batchable(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme) -> bool:
        """The batched GPU solver's limits: CUDA, a Hessian, ``block_size <= 128``; for integer formats MSE scales
        only with act-order; floating-point formats through :func:`moequant.ops.gptq_quantize_format_batched` while
        :attr:`float_batched` is on."""
        if isinstance(scheme.format, FloatFormat):
            return self.float_batched and w.is_cuda and h is not None and scheme.block_size <= 128
        return (w.is_cuda and h is not None and scheme.block_size <= 128
                and (scheme.scale_search != "mse" or scheme.act_order))

    def batch_bytes(self, rows: int, cols: int) -> int:
        return 4 * (3 * cols * cols + 4 * rows * cols)  # H (+ copy, workspace) and W, Q, dequantized, error

    def solve_batched(self, w: torch.Tensor, h: torch.Tensor, scheme, storage: torch.dtype,
                      compute_loss: bool, global_scale: Optional[torch.Tensor] = None) -> list:
        fmt = scheme.format
        if isinstance(fmt, FloatFormat):
            out = ops.gptq_quantize_format_batched(w, h, fmt.core(storage), act_order=scheme.act_order,
                                                   damp=scheme.damp, block_size=scheme.block_size,
                                                   global_scale=global_scale, compute_loss=compute_loss,
                                                   overwrite_h=True)
            return [ops.from_format_quantized(q, fmt, storage) for q in out]
        return ops.gptq_quantize_batched(w, h, scale_dtype=storage, overwrite_h=True, compute_loss=compute_loss,
                                         **scheme.gptq_kwargs())
