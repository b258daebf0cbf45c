"""The orthonormal Hadamard transform (:func:`hadamard_transform`). Twin: :func:`moequant.ref.hadamard_ref`."""
from __future__ import annotations

import torch

from moequant import _C

__all__ = ["hadamard_transform"]


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard transform along the last dimension: ``x @ (H_m kron H_{2^k}) / sqrt(n)``.

    ``n = x.shape[-1]`` must be a power of two or 12, 20, 28 or 40 times one, ``n <= 32768`` (7168 = 28 * 256).
    float32 / bfloat16 / float16 (computed in fp32, rounded once), same dtype and device as ``x`` (CPU core or
    CUDA kernel). Equals :func:`moequant.ref.hadamard_ref` to fp32 rounding.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    return _C.hadamard(x.contiguous())

