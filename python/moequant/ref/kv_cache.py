"""Plain twin of :func:`moequant.formats.kv_cache.kv_scale`: the stored FP8 KV-cache scale of an observed maximum,
compressed-tensors' ``calculate_qparams`` for a symmetric 8-bit float tensor (``max / ((448 - -448) / 2)``, a zero
scale replaced by the eps of the scale dtype), in Python floats."""
from __future__ import annotations

import torch

__all__ = ["kv_scale_ref"]


def kv_scale_ref(amax: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[1]`` tensor of ``dtype``: ``amax / 448`` (rounded to float32, then to ``dtype``), eps of ``dtype`` for 0."""
    s = float(amax) / ((448.0 - -448.0) / 2)
    if s == 0.0:
        return torch.tensor([torch.finfo(dtype).eps], dtype=dtype)
    return torch.tensor([s], dtype=torch.float32).to(dtype)
