"""Plain twins of :mod:`moequant.awq`'s fake quantizer and clipping search (loops, float64 loss).

``fake_quantize_ref`` composes the core's own reference formulas (:mod:`moequant.ref.quant`) group by group;
``search_clip_ref`` tries every shrink step for one (row, group) at a time.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .quant import dequantize_values_ref, qparams_ref, quantize_ref

__all__ = ["fake_quantize_ref", "search_clip_ref"]


def fake_quantize_ref(w: Tensor, bits: int, group_size: Optional[int], symmetric: bool,
                      scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """Min/max quantize-dequantize of each group of ``group_size`` values along the last dim (float32)."""
    cols = w.shape[-1]
    g = cols if group_size in (None, -1) else group_size
    flat = w.float().reshape(-1, cols)
    out = torch.empty_like(flat)
    for r in range(flat.shape[0]):
        for c0 in range(0, cols, g):
            grp = flat[r, c0:c0 + g]
            scale, zero = qparams_ref(grp, bits, symmetric, scale_dtype)
            out[r, c0:c0 + g] = dequantize_values_ref(quantize_ref(grp, scale, zero, bits), scale, zero)
    return out.reshape(w.shape)


def search_clip_ref(w: Tensor, x: Tensor, bits: int, group_size: Optional[int], symmetric: bool,
                    grid: int = 20, max_shrink: float = 0.5, scale_dtype: torch.dtype = torch.float32) -> Tensor:
    """``max_val [out, G]``: per (row, group), the first shrink step ``1 - i/grid`` with the least
    ``mean_t (x_g . (Q(clamp(w_g)) - w_g))^2``."""
    out_f, cols = w.shape
    g = cols if group_size in (None, -1) else group_size
    steps = max(1, int(math.ceil(max_shrink * grid - 1e-9)))
    res = torch.empty(out_f, cols // g)
    for r in range(out_f):
        for j, c0 in enumerate(range(0, cols, g)):
            wg, xg = w[r, c0:c0 + g].float(), x[:, c0:c0 + g].float()
            org = wg.abs().max()
            best, best_err = float(org), math.inf
            for i in range(steps):
                mv = float(org * (1 - i / grid))  # the threshold in float32, as the fast path computes it
                q = fake_quantize_ref(wg.clamp(-mv, mv)[None], bits, g, symmetric, scale_dtype)[0]
                err = float(((xg.double() @ (q - wg).double()) ** 2).mean())
                if err < best_err:
                    best, best_err = mv, err
            res[r, j] = best
    return res
