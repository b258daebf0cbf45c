"""GPTQ (the default solver): the math is the C++ core / CUDA kernel behind :func:`moequant.ops.gptq_quantize`
and :func:`moequant.ops.gptq_quantize_batched`; twin :func:`moequant.ref.gptq_quantize_ref`."""
from .solver import GPTQSolver

__all__ = ["GPTQSolver"]
