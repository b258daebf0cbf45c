"""Plain float64 reference of the GPTAQ-style asymmetric calibration (the twin of :mod:`moequant.ops.gptaq`).

A matrix ``W`` whose inputs differ between the original layer (``x``) and the partly quantized one (``x~``: same
tokens, same routing weights ``c``) is quantized for ``min_Q sum c ||W x - Q x~||^2``. With ``d = x - x~``,
``W x - Q x~ = (W - Q) x~ + W d``, so the objective is ``||(W* - Q) X~||^2`` (under ``H~``) plus a constant, with

* ``H~ = sum c x~ x~^T / m`` and ``C = sum c (x - x~) x~^T / m`` (``m = sum c``: normalised like every Hessian),
* the corrected target ``W* = W + alpha W C (H~ + lambda I)^-1``, ``lambda = damp * mean(diag H~)`` (columns with
  ``diag(H~) = 0`` get 1 on the diagonal first, as GPTQ's dead columns); ``alpha = 1`` is the exact least-squares
  target, ``alpha = 0`` gives ``W``.

The scheme's solver then quantizes ``W*`` with ``H~``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["asymmetric_statistics_ref", "gptaq_target_ref", "asymmetric_loss_ref"]


def asymmetric_statistics_ref(x: Tensor, x_tilde: Tensor, c: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(H~, C)`` float64 of rows ``x``, ``x_tilde`` ``[n, in]`` with row weights ``c`` ``[n]`` (None: ones),
    both divided by ``m = sum c`` (zeros when ``m = 0``)."""
    if x.shape != x_tilde.shape or x.dim() != 2:
        raise ValueError(f"x, x_tilde: expected two [n, in] tensors of one shape, got {tuple(x.shape)} and "
                         f"{tuple(x_tilde.shape)}")
    xd, xt = x.double(), x_tilde.double()
    cw = torch.ones(x.shape[0], dtype=torch.float64) if c is None else c.double().reshape(-1)
    m = float(cw.sum())
    h = (xt * cw[:, None]).T @ xt
    cross = ((xd - xt) * cw[:, None]).T @ xt
    return (h / m, cross / m) if m > 0 else (h, cross)


def gptaq_target_ref(w: Tensor, h_tilde: Tensor, cross: Tensor, alpha: float, damp: float) -> Tensor:
    """``W* = W + alpha W C (H~ + lambda I)^-1`` in float64 (the module docstring); ``W`` itself when ``H~`` is
    all zeros (no data) or ``alpha`` is 0."""
    w64, h = w.double(), h_tilde.double().clone()
    diag = torch.diagonal(h)
    if alpha == 0 or not bool((diag != 0).any()):
        return w64.clone()
    dead = diag == 0
    h[dead, dead] = 1.0
    h += damp * float(torch.diagonal(h).mean()) * torch.eye(h.shape[0], dtype=torch.float64)
    return w64 + alpha * torch.linalg.solve(h, (w64 @ cross.double()).T).T  # h symmetric: (h^-1 B^T)^T = B h^-1


def asymmetric_loss_ref(w: Tensor, q: Tensor, x: Tensor, x_tilde: Tensor, c: Optional[Tensor] = None) -> float:
    """``sum c ||W x - Q x~||^2`` over the rows, float64 (the objective the corrected solve minimises)."""
    cw = torch.ones(x.shape[0], dtype=torch.float64) if c is None else c.double().reshape(-1)
    r = x.double() @ w.double().T - x_tilde.double() @ q.double().T
    return float((cw[:, None] * r * r).sum())
