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

:func:`gptq_quantize_format_ref` is GPTQ in any weight format of :mod:`moequant.ref.formats` (the twin of
``moequant.ops.gptq_quantize_format`` / ``gptq_format.h``); its docstring states the math.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import formats as fref
from .quant import check_bits, group_size_of, dequantize_values_ref, mse_qparams_ref, qparams_ref, quantize_ref

__all__ = ["GptqRefResult", "GptqFormatRefResult", "gptq_quantize_ref", "gptq_quantize_format_ref",
           "quadratic_loss_ref"]


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


# --- GPTQ in any weight format ----------------------------------------------------------------------------------------


class GptqFormatRefResult(NamedTuple):
    codes: Tensor  # uint8 [out, in] (the element's bits; int: the two's-complement byte)
    scales: Tensor  # float32 [sr, sc] scale values
    scale_codes: Tensor  # uint8 [sr, sc] (FP8 / E8M0 bytes; 0 for float scales)
    zeros: Tensor  # int32 [sr, sc] (asymmetric int; else 0)
    global_scale: Tensor  # float32 [1] (1 without one)
    dequantized: Tensor  # float32 [out, in]
    loss: float  # tr((W - Q) H (W - Q)^T), float64
    dead_columns: int
    escalations: int


def _int_solver_format(spec: "fref.FormatSpec", cols: int) -> bool:
    """The int layouts quant.h expresses (per channel, groups dividing in_features): solved by the int GPTQ."""
    return spec.element == "int" and (spec.group == "channel" or (spec.group == "group" and spec.group_size > 0
                                                                  and cols % spec.group_size == 0))


def gptq_quantize_format_ref(
    w: Tensor,
    h: Tensor,
    spec: "fref.FormatSpec",
    act_order: bool = False,
    damp: float = 0.01,
    global_scale: Tensor | float | None = None,
    factor: Tensor | None = None,
    max_damp_escalations: int = 8,
    damp_escalation_factor: float = 10.0,
) -> GptqFormatRefResult:
    """GPTQ of ``w`` float [out, in] in the format ``spec`` (:class:`moequant.ref.formats.FormatSpec`) on ``h``.

    The math, for W read as float32 and H as float64:

    1. dead columns (``H_ii = 0``): ``H_ii := 1``, ``W[:, i] := 0``;
    2. the scales are fixed before any column is quantized: they are RTN's (:func:`moequant.ref.formats.quantize_ref`)
       of that W -- every tile's scale from its own range, the NVFP4 global scale from the whole matrix first unless
       ``global_scale`` is given (a partner's, e.g. gate's for up). The quantizer of element (r, c) is
       ``q(x) = encode(x / s_rc)``, ``dq = decode(q) * s_rc`` with ``s_rc`` the effective scale of its tile (ints:
       ``clamp(round(x / s + z))``, ``(q - z) * s``);
    3. the processing order P: columns by descending ``H_ii`` (stable) with ``act_order``, else as they are;
    4. ``U``: the upper Cholesky factor of ``(P^T H P + lambda I)^-1`` with ``lambda = frac * mean(diag)``, ``frac =
       damp`` times ``damp_escalation_factor`` per failed factorisation (at most ``max_damp_escalations``), computed
       here in float64 and rounded to float32 -- or ``factor`` (float32 [in, in], processing order), e.g. the core's
       own (``moequant._C.gptq_factor``), which makes this function and the core agree bit for bit;
    5. for each position j in order (column ``c = P[j]``), in float32: ``e = (w_j - dq(w_j)) / U_jj`` and
       ``w_k := w_k - e * U_jk`` for every later position k (the product rounded, then the difference).

    ``loss`` is ``tr((W - Q) H (W - Q)^T)`` with the caller's W and H. The int layouts quant.h expresses (per channel,
    groups dividing in_features) are the int GPTQ's (:func:`gptq_quantize_ref`, group parameters from the updated
    columns without act-order), as in the core.
    """
    _check_inputs(w, h, damp, 1)
    rows, cols = w.shape
    if _int_solver_format(spec, cols):
        r = gptq_quantize_ref(w, h, spec.bits, spec.group_size if spec.group == "group" else -1, spec.symmetric,
                              act_order, damp, scale_dtype=spec.scale_dtype)
        z = torch.zeros(r.scale.shape, dtype=torch.uint8)
        return GptqFormatRefResult(r.codes.view(torch.uint8), r.scale, z, r.zero_point.to(torch.int32),
                                   torch.ones(1), r.dequantized, r.loss, r.dead_columns, 0)
    H = h.to(torch.float64).clone()
    W = w.float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    rtn = fref.quantize_ref(W, spec, global_scale)
    eff = rtn.scales / rtn.global_scale if spec.global_scale else rtn.scales
    eff = fref._expand(eff, spec, rows, cols)
    zero = fref._expand(rtn.zeros, spec, rows, cols)
    if not torch.isfinite(eff).all():
        raise ValueError("scale_dtype: float16 cannot hold the scale of a tile; use bfloat16 or float32 scales")

    perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices if act_order else torch.arange(cols)
    escalations = 0
    if factor is None:
        Hp = H[perm][:, perm]
        mean = torch.diagonal(Hp).mean()
        frac = damp
        while True:
            try:
                L = torch.linalg.cholesky(Hp + frac * mean * torch.eye(cols, dtype=torch.float64))
                U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
                break
            except RuntimeError:  # torch.linalg.LinAlgError: not positive definite
                if escalations >= max_damp_escalations:
                    raise
                escalations += 1
                frac *= damp_escalation_factor
    else:
        U = factor.float()

    Wp = W[:, perm].clone()
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    Q = torch.zeros(rows, cols, dtype=torch.float32)
    for j in range(cols):
        c = int(perm[j])
        x, s, z = Wp[:, j], eff[:, c], zero[:, c]
        if spec.element == "int":
            qmin, qmax = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
            qi = torch.clamp(torch.round(x / s + z.float()), qmin, qmax).to(torch.int32)
            q, dq = qi.to(torch.int8).view(torch.uint8), (qi - z).float() * s
        else:
            q = fref._encode(spec.element, x / s)
            dq = fref._decode(spec.element, q) * s
        codes[:, c], Q[:, c] = q, dq
        e = (x - dq) / U[j, j]
        Wp[:, j + 1:] -= e.unsqueeze(1) * U[j, j + 1:].unsqueeze(0)

    return GptqFormatRefResult(codes, rtn.scales, rtn.scale_codes, rtn.zeros, rtn.global_scale, Q,
                               quadratic_loss_ref(w.float(), Q, h), int(dead.sum()), escalations)
