"""Plain-PyTorch reference GPTQ (column by column, float64), the oracle for ``moequant.ops.gptq_quantize``.

It follows ``shared/tools/ref_baseline.py::gptq`` with the integer format of quant.h:

1. dead columns (``diag(H) == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``;
2. act-order uses *static* groups: the parameters of group g come from the original columns
   ``[g*gs, (g+1)*gs)`` (after step 1), then the columns are swept in a stable descending order of ``diag(H)``;
   without act-order the parameters of a group are computed when its first column is reached, from the
   group's columns as updated by every column quantized so far -- including, for a group that runs past the
   current block, the block's still-pending lazy update. This makes the result independent of ``block_size``
   (lazy updates are only a reorganisation of the column-by-column algorithm). ref_baseline.py reads those
   later columns without the pending update; its defaults (group = block = 128) never reach that case, and
   where it is reached (e.g. group 32, block 48) skipping the update gives measurably worse groups;
3. damping ``H += damp * mean(diag(H)) * I``;
4. ``U = cholesky(cholesky_inverse(cholesky(H)), upper=True)`` (the upper Cholesky factor of H^-1), float64;
5. for each column i: ``q = dequant(quant(w_i))``, ``e = (w_i - q) / U[i, i]``, ``W[:, j] -= e U[i, j]`` for j > i,
   applied lazily: within a block of ``block_size`` columns at once, to later columns after the block.

The returned ``loss`` is ``tr((W - Q) H (W - Q)^T)`` in float64 with the caller's (undamped) H and W.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .quant import check_bits, group_size_of, dequantize_values_ref, mse_qparams_ref, qparams_ref, quantize_ref

__all__ = ["GptqRefResult", "gptq_quantize_ref", "quadratic_loss_ref"]


class GptqRefResult(NamedTuple):
    codes: Tensor  # int8 [out, in]
    scale: Tensor  # float32 [out, G]
    zero_point: Tensor  # int8 [out, G] (zeros when symmetric)
    dequantized: Tensor  # float32 [out, in]
    loss: float  # tr((W - Q) H (W - Q)^T), float64
    dead_columns: int  # columns with diag(H) == 0


def quadratic_loss_ref(w: Tensor, q: Tensor, h: Tensor) -> float:
    """``tr((w - q) h (w - q)^T)`` in float64: w, q float [out, in], h float [in, in] -> Python float.

    This is ``sum_t ||(w - q) x_t||^2`` when ``h = sum_t x_t x_t^T``: the layer-output error GPTQ minimises.
    """
    d = w.to(torch.float64) - q.to(torch.float64)
    return float(((d @ h.to(torch.float64)) * d).sum())


def _check_inputs(w: Tensor, h: Tensor, damp: float, block_size: int) -> None:
    if w.dim() != 2:
        raise ValueError(f"w: expected a 2-D tensor [out_features, in_features], got {w.dim()}-D")
    if not w.is_floating_point():
        raise ValueError(f"w: expected a floating-point tensor (float32/bfloat16/float16), got {w.dtype}")
    cols = w.shape[1]
    if h.dim() != 2 or tuple(h.shape) != (cols, cols):
        raise ValueError(f"h: expected shape [{cols}, {cols}] (in_features squared), got {list(h.shape)}")
    if not h.is_floating_point():
        raise ValueError(f"h: expected a float32/float64 tensor, got {h.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("w: expected finite values, got NaN or Inf")
    if not torch.isfinite(h).all():
        raise ValueError("h: expected finite values, got NaN or Inf")
    if not (damp > 0 and math.isfinite(damp)):
        raise ValueError(f"damp: expected a finite value > 0, got {damp}")
    if not block_size >= 1:
        raise ValueError(f"block_size: expected >= 1, got {block_size}")


def gptq_quantize_ref(
    w: Tensor,
    h: Tensor,
    bits: int = 4,
    group_size: int | None = 128,
    symmetric: bool = False,
    act_order: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    scale_search: str = "minmax",
    scale_dtype: torch.dtype = torch.float32,
    mse_grid: int = 100,
    mse_min_shrink: float = 0.2,
    mse_norm: float = 2.4,
) -> GptqRefResult:
    """GPTQ of ``w`` float [out, in] against the Hessian ``h`` float [in, in] (see the module docstring).

    Returns ``GptqRefResult(codes int8 [out, in], scale float32 [out, G], zero_point int8 [out, G],
    dequantized float32 [out, in], loss float, dead_columns int)``. ``dequantized`` is exactly
    ``dequantize_ref(codes, scale, zero_point, group_size)``.

    Equivalence: ``moequant.ops.gptq_quantize`` agrees with this to the GPTQ tier of
    ``tests/python/tolerances.py`` (same codes for almost all entries, same loss to 1e-3): both are exact
    algorithms, but a float32 implementation may round a value sitting on a code boundary the other way,
    and the error feedback then carries the difference along the row.
    """
    check_bits(bits)
    _check_inputs(w, h, damp, block_size)
    if scale_search not in ("minmax", "mse"):
        raise ValueError(f"scale_search: expected 'minmax' or 'mse', got {scale_search!r}")
    rows, cols = w.shape
    gs = group_size_of(cols, group_size)
    n_groups = cols // gs

    def params(cols_now: Tensor) -> tuple[Tensor, Tensor]:  # [rows, gs] float64 -> ([rows], [rows])
        x = cols_now.float()  # quant.h works on float32 values
        if scale_search == "mse":
            return mse_qparams_ref(x, bits, symmetric, scale_dtype, mse_grid, mse_min_shrink, mse_norm)
        return qparams_ref(x, bits, symmetric, scale_dtype)

    W = w.float().to(torch.float64).clone()
    H = h.to(torch.float64).clone()
    dead = torch.nonzero(torch.diagonal(H) == 0).flatten()
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.zeros(rows, n_groups, dtype=torch.float32)
    zero = torch.zeros(rows, n_groups, dtype=torch.int32)
    perm = torch.arange(cols)
    if act_order:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = params(W[:, g * gs : (g + 1) * gs])
        perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices
        W = W[:, perm]
        H = H[perm][:, perm]

    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    codes = torch.zeros(rows, cols, dtype=torch.int32)
    Q = torch.zeros(rows, cols, dtype=torch.float32)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros(rows, i2 - i1, dtype=torch.float64)
        for i in range(i2 - i1):
            c = i1 + i
            if act_order:
                g = int(perm[c]) // gs
            else:
                g = c // gs
                if c % gs == 0:
                    # the group's columns as updated so far: those in this block are current in W1, later ones
                    # still owe this block's pending (lazy) update
                    later = W[:, i2:] - E1[:, :i] @ U[i1:c, i2:]
                    scale[:, g], zero[:, g] = params(torch.cat([W1[:, i:], later], dim=1)[:, :gs])
            x = W1[:, i]
            q = quantize_ref(x.float(), scale[:, g], zero[:, g], bits)
            d = dequantize_values_ref(q, scale[:, g], zero[:, g])
            codes[:, c] = q
            Q[:, c] = d
            e = (x - d.to(torch.float64)) / U[c, c]
            W1[:, i:] -= e.unsqueeze(1) * U[c, c:i2].unsqueeze(0)
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    if act_order:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
    return GptqRefResult(
        codes=codes.to(torch.int8),
        scale=scale,
        zero_point=zero.to(torch.int8),
        dequantized=Q,
        loss=quadratic_loss_ref(w.float(), Q, h),
        dead_columns=int(dead.numel()),
    )
