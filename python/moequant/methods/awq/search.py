"""AWQ (activation-aware weight quantization) math: scale search, clipping search, exact folding.

Pure functions on tensors; the orchestration over a decoder layer is :mod:`moequant.methods.awq.layer`. Formulas
follow AutoAWQ (``awq/quantize/quantizer.py``; ../shared/reference/moe-algorithms.md §4.3):

* scale search, per group of matrices that read the same input X (columns = input channels c):
  ``x_mean[c] = mean_t |X[t, c]|`` (or ``sqrt(mean_t X[t, c]^2)``: :func:`activation_salience`),
  ``w_mean[c] = mean over rows of |W[r, c]| / max|W within its quant group|``
  (over the concatenated rows of all matrices of the group); for ``ratio = i / grid`` (i = 0 .. grid-1)
  ``s = clamp(x_mean^ratio / (w_mean^(1-ratio) + 1e-4), min=1e-4)`` (duo scaling; ``x_mean^ratio`` without),
  normalised ``s / sqrt(max(s) min(s))``, non-finite entries set to 1; the loss of a candidate is the output
  error of ``Q(W diag(s)) diag(s)^-1`` on X (computed by the caller). The identity ``s = 1`` is a candidate
  too, so the chosen scales never increase the search loss.
* folding: the producer of X divides its output channel c by ``s[c]`` (a norm's weight, a Linear's rows and
  bias), every consumer multiplies its input column c by ``s[c]``; in exact arithmetic the model is unchanged.
  With power-of-two scales (``pow2=True``) the fold is exact in every floating-point format (used where a norm
  also feeds a router, so routing is bit-identical).
* clipping search, per output row and quant group: ``max_val = max|W_g| (1 - i / grid)`` for
  ``i < max_shrink * grid``; W clamped to ``[-max_val, max_val]``; error ``mean_t (X_g (Q(W_g) - W_g)^T)^2``.

The quantizer inside both searches is the min/max grid of the core (:func:`fake_quantize`, bit-exact with
``moequant.ops.quantize_rtn(scale_search="minmax")``); the final quantization is the recipe's (RTN or GPTQ).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from ...formats import check_bits, matrix_group_size

__all__ = [
    "SALIENCES", "ScaleSearchResult", "activation_absmean", "activation_salience", "weight_absmean", "awq_scales", "search_scale", "fake_quantize",
    "search_clip", "apply_clip", "round_pow2", "widen",
]


def _groups(cols: int, group_size: Optional[int]) -> int:
    """Columns per quant group of a ``cols``-column matrix (``cols`` for per-channel)."""
    g = matrix_group_size(group_size, cols)
    return cols if g == -1 else g


def activation_absmean(x: torch.Tensor) -> torch.Tensor:
    """``mean_t |x[t, c]|`` in float32 over all leading dims: ``[..., C]`` -> ``[C]``."""
    return x.reshape(-1, x.shape[-1]).float().abs().mean(0)


SALIENCES = ("abs", "l2")


def activation_salience(x: torch.Tensor, salience: str = "abs") -> torch.Tensor:
    """The per-input-channel activation statistic ``x_mean`` of the scale search, ``[..., C]`` -> ``[C]`` (float32):
    ``"abs"``: ``mean_t |x[t, c]|`` (AutoAWQ's, :func:`activation_absmean`); ``"l2"``: ``sqrt(mean_t x[t, c]^2)``,
    the L2 salience ``E[x^2]`` as its root, so that it has the units of ``E|x|`` and the ratio grid keeps its range
    (``E[x^2]^r = rms^(2r)``). The L2 statistic weighs rare large activations more (``rms >= mean |x|``, equal only
    for a channel of constant magnitude)."""
    if salience == "abs":
        return activation_absmean(x)
    if salience == "l2":
        return x.reshape(-1, x.shape[-1]).float().pow(2).mean(0).sqrt()
    raise ValueError(f"salience: expected one of {SALIENCES}, got {salience!r}")


_ABSMEAN_ROWS = 16384  # rows per fp32 temporary of weight_absmean


def _row_chunks(w: torch.Tensor, size: int):
    """Consecutive ``size``-row blocks of ``w.reshape(-1, C)``. Where that reshape would copy (a transposed
    fused-expert view, gpt-oss), each block is cut from a slice of the leading (expert) dim instead, so the whole
    tensor is never copied; the blocks are then contiguous, as the whole copy's rows were (same values)."""
    c = w.shape[-1]
    try:
        flat = w.view(-1, c)
    except RuntimeError:
        flat = None
    if flat is not None:
        for r0 in range(0, flat.shape[0], size):
            yield flat[r0:r0 + size]
        return
    w3 = w.flatten(0, -3)  # [lead, R, C]; a no-op for the 3-D expert tensors
    per = w3.shape[1]
    total = w3.shape[0] * per
    for r0 in range(0, total, size):
        r1 = min(r0 + size, total)
        e0, e1 = r0 // per, (r1 - 1) // per + 1
        yield w3[e0:e1].reshape(-1, c)[r0 - e0 * per:r1 - e0 * per].contiguous()


def weight_absmean(weights: list, group_sizes: list) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: every row of every matrix (``[..., rows, C]``) normalised by the max |w| of its
    quant group, then averaged over all rows of all matrices -> ``[C]`` float32."""
    total, rows = None, 0
    for w, gs in zip(weights, group_sizes):
        g = _groups(w.shape[-1], gs)
        n = 0
        # Row chunks: fused experts are [E * 2I, H] (DeepSeek-V3: 7.5G elements); one fp32 temporary per chunk.
        for chunk in _row_chunks(w, _ABSMEAN_ROWS):
            a = chunk.float().abs()
            a = a.reshape(a.shape[0], -1, g)
            s = (a / (a.amax(-1, keepdim=True) + 1e-6)).reshape(a.shape[0], -1).sum(0)
            total = s if total is None else total + s
            n += chunk.shape[0]
        rows += n
    if total is None:
        raise ValueError("weights: expected at least one matrix")
    return total / rows


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it already is (folds keep the precision of float64 layers)."""
    return t if t.dtype == torch.float64 else t.float()


def round_pow2(s: torch.Tensor) -> torch.Tensor:
    """The nearest power of two of each (positive) scale, in log space."""
    return torch.exp2(torch.round(torch.log2(s)))


def awq_scales(x_mean: torch.Tensor, w_mean: Optional[torch.Tensor], ratio: float, duo: bool = True,
               pow2: bool = False) -> torch.Tensor:
    """Candidate per-channel scales for one ratio (module docstring), float32 ``[C]``."""
    x = x_mean.float().clamp(min=1e-4)
    if duo:
        if w_mean is None:
            raise ValueError("w_mean: required with duo scaling")
        s = (x.pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s = torch.where(torch.isfinite(s), s, torch.ones_like(s))
    return round_pow2(s) if pow2 else s


class ScaleSearchResult(NamedTuple):
    scales: torch.Tensor   # [C] float32, the best candidate (all ones if the identity won)
    ratio: Optional[float]  # the best ratio, None when the identity won
    loss: float            # its loss
    identity_loss: float   # loss of s = 1
    losses: list           # loss per ratio i / grid


def search_scale(x_mean: torch.Tensor, w_mean: Optional[torch.Tensor], loss_fn: Callable[[torch.Tensor], float],
                 grid: int = 20, duo: bool = True, pow2: bool = False) -> ScaleSearchResult:
    """Grid search of the scale exponent (module docstring); ``loss_fn(s [C]) -> float`` is the output error of
    the group quantized with ``Q(W diag(s)) diag(s)^-1``. Ties keep the earlier candidate (identity first)."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid: expected an integer >= 1, got {grid!r}")
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    best_s, best_r = ones, None
    best = ident = float(loss_fn(ones))
    losses = []
    for i in range(grid):
        r = i / grid
        s = awq_scales(x_mean, w_mean, r, duo, pow2)
        loss = float(loss_fn(s))
        losses.append(loss)
        if loss < best:
            best, best_s, best_r = loss, s, r
    return ScaleSearchResult(best_s, best_r, best, ident, losses)


def fake_quantize(w: torch.Tensor, bits: int, group_size: Optional[int], symmetric: bool,
                  scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Min/max quantize-dequantize of ``w [..., C]`` along the last dim in groups, float32; bit-exact with
    ``ops.quantize_rtn(w, bits, group_size, symmetric, scale_dtype=...).dequantized`` for each matrix."""
    check_bits(bits)
    shape = w.shape
    g = _groups(shape[-1], group_size)
    x = w.float().reshape(-1, g)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    lo, hi = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / torch.tensor((qmax - qmin) / 2.0, dtype=torch.float32)
    else:
        scale = (hi - lo) / torch.tensor(float(qmax - qmin), dtype=torch.float32)
    scale = scale.to(scale_dtype).float()
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(scale_dtype).eps, dtype=torch.float32), scale)
    if symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = torch.clamp(torch.round(torch.tensor(float(qmin)) - lo / scale), qmin, qmax)
    q = torch.clamp(torch.round(x / scale[:, None] + zero[:, None]), qmin, qmax)
    return ((q - zero[:, None]) * scale[:, None]).reshape(shape)


def search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group_size: Optional[int], symmetric: bool,
                grid: int = 20, max_shrink: float = 0.5, scale_dtype: torch.dtype = torch.float32,
                row_chunk: int = 256) -> torch.Tensor:
    """Per-(row, group) clipping threshold minimising ``mean_t (X_g (Q(clip(W_g)) - W_g)^T)^2``.

    Args: ``w [out, in]``, ``x [n, in]`` (the matrix's inputs, e.g. 512 sampled tokens). Returns ``max_val
    [out, G]`` float32 (``G = in / group_size``); the unclipped maximum where nothing helps."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid: expected an integer >= 1, got {grid!r}")
    if not 0 < max_shrink < 1:
        raise ValueError(f"max_shrink: expected a number in (0, 1), got {max_shrink!r}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x: expected [n, {w.shape[-1]}] inputs of w {tuple(w.shape)}, got {tuple(x.shape)}")
    out, cols = w.shape
    g = _groups(cols, group_size)
    G = cols // g
    xg = x.float().reshape(-1, G, g)
    best_max = torch.empty(out, G, dtype=torch.float32, device=w.device)
    steps = max(1, int(math.ceil(max_shrink * grid - 1e-9)))
    for r0 in range(0, out, row_chunk):
        wg = w[r0:r0 + row_chunk].float().reshape(-1, G, g)
        org_max = wg.abs().amax(-1)
        best_err = torch.full_like(org_max, float("inf"))
        best = org_max.clone()
        for i in range(steps):
            mv = org_max * (1 - i / grid)
            cw = torch.maximum(torch.minimum(wg, mv[..., None]), -mv[..., None])
            q = fake_quantize(cw, bits, g, symmetric, scale_dtype)
            e = torch.einsum("ngk,ogk->nog", xg, q - wg)
            err = e.pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, mv, best)
        best_max[r0:r0 + row_chunk] = best
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor) -> torch.Tensor:
    """``clamp(W_g, -max_val, max_val)`` per (row, group): ``w [out, in]``, ``max_val [out, G]`` -> new tensor."""
    out, cols = w.shape
    G = max_val.shape[1]
    mv = max_val.to(w.dtype)[..., None]
    wg = w.reshape(out, G, cols // G)
    return torch.maximum(torch.minimum(wg, mv), -mv).reshape(out, cols)
