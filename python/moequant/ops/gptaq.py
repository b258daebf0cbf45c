"""GPTAQ-style asymmetric calibration, the device path (math only; twin :mod:`moequant.ref.gptaq`, whose docstring
states it): the joint rows whose Hessian holds ``H~`` and ``C`` (:func:`joint_rows`, :func:`split_joint`), and the
corrected targets of all experts of a projection in one batched Cholesky solve (:func:`gptaq_targets`)."""
from __future__ import annotations

import torch

__all__ = ["joint_rows", "split_joint", "normalised_statistics", "gptaq_targets"]

_ESCALATIONS = 4  # damping x10 each time a matrix is not numerically positive definite


def joint_rows(x: torch.Tensor, x_tilde: torch.Tensor) -> torch.Tensor:
    """``[x~, x - x~]`` ``[n, 2 in]`` float32: one Hessian accumulator fed these rows holds ``sum c x~ x~^T``
    (top left) and ``C = sum c (x - x~) x~^T`` (bottom left), normalised as every Hessian (:func:`split_joint`);
    the difference is taken per row, before the sums, so ``C`` does not cancel large terms."""
    xt = x_tilde.float()
    return torch.cat([xt, x.float() - xt], dim=-1)


def split_joint(joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H~, C)`` of a joint Hessian ``[..., 2 in, 2 in]`` of :func:`joint_rows` (views)."""
    n = joint.shape[-1] // 2
    return joint[..., :n, :n], joint[..., n:, :n]


def normalised_statistics(joint: torch.Tensor, mass: float, k: float = 0.0, target=None):
    """``(H~, C)`` of one expert's raw joint Hessian ``[2 in, 2 in]`` (rows of total weight ``mass``), normalised as
    its plain Hessian is: divided by ``mass``; with a shrinkage ``target`` T (the ``shrink`` fallback policy,
    ``k`` its weight in tokens) ``H~ = (raw H~ + k T) / (mass + k)`` and ``C = raw C / (mass + k)``: T counts as
    ``k`` rows on which the original and the quantized inputs agree (``x = x~``)."""
    h, c = split_joint(joint)
    if target is None:
        return h / mass, c / mass
    return (h + k * target.to(h.dtype)) / (mass + k), c / (mass + k)


@torch.no_grad()
def gptaq_targets(w: torch.Tensor, h_tilde: torch.Tensor, cross: torch.Tensor, alpha: float, damp: float,
                  memory_gb: float = 8.0) -> torch.Tensor:
    """The corrected targets ``W* = W + alpha W C (H~ + lambda I)^-1`` of ``E`` matrices at once, float32
    ``[E, out, in]`` on ``w``'s device: ``w [E, out, in]``, ``h_tilde`` and ``cross`` ``[E, in, in]``; damping
    ``lambda = damp * mean(diag H~)`` after dead columns (``diag(H~) = 0``) get 1, escalated x10 (up to 4 times)
    for a matrix whose Cholesky factorisation fails. Float64 batched Cholesky solves, in chunks of experts that fit
    ``memory_gb``. A matrix with ``H~ = 0`` (no data), or ``alpha = 0``, keeps ``W`` (bit for bit)."""
    if w.dim() != 3 or h_tilde.shape != cross.shape or h_tilde.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"gptaq_targets: expected w [E, out, in] and h_tilde, cross [E, in, in], got "
                         f"{tuple(w.shape)}, {tuple(h_tilde.shape)}, {tuple(cross.shape)}")
    out = w.float().clone()
    if alpha == 0 or w.shape[0] == 0:
        return out
    e_num, rows, cols = w.shape
    per = 8 * (3 * cols * cols + 3 * rows * cols)
    chunk = max(1, int(memory_gb * 2**30 // per))
    eye = torch.eye(cols, dtype=torch.float64, device=w.device)
    for a in range(0, e_num, chunk):
        sl = slice(a, min(a + chunk, e_num))
        h = h_tilde[sl].to(w.device, torch.float64)
        diag = torch.diagonal(h, dim1=-2, dim2=-1)
        live = (diag != 0).any(-1)  # [e]: matrices with data
        h = h + torch.diag_embed((diag == 0).double())  # dead columns: 1 on the diagonal
        lam = damp * torch.diagonal(h, dim1=-2, dim2=-1).mean(-1)
        w64 = w[sl].to(torch.float64)
        rhs = (w64 @ cross[sl].to(w.device, torch.float64)).transpose(-1, -2)  # (W C)^T [e, in, out]
        fac = torch.empty_like(h)
        todo = torch.ones(h.shape[0], dtype=torch.bool, device=w.device)
        for _ in range(_ESCALATIONS + 1):
            idx = todo.nonzero().flatten()
            if not idx.numel():
                break
            l_, info = torch.linalg.cholesky_ex(h[idx] + lam[idx, None, None] * eye)
            fac[idx] = l_
            todo[idx[info != 0]] = True
            todo[idx[info == 0]] = False
            lam = torch.where(todo, lam * 10, lam)
        ok = live & ~todo  # a matrix still failing after the escalations keeps W
        if bool(ok.any()):
            k = ok.nonzero().flatten()
            y = torch.cholesky_solve(rhs[k], fac[k]).transpose(-1, -2)  # (W C) (H~ + lambda)^-1
            out[a + k] = (w64[k] + alpha * y).float()
    return out
