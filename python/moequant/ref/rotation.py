"""Reference twin of the residual rotation (``moequant.rotation``): the dense orthogonal matrix, in float64.

Contract: ``random_hadamard_ref(n, seed) = H_n diag(s) / sqrt(n)`` with ``H_n`` the ``+-1`` matrix of
:func:`moequant.ref.hadamard_matrix` (the matrix of the core's transform: ``hadamard_ref(x) = x @ H_n / sqrt(n)``)
and ``s`` the seeded random signs ``2 * randint(0, 2, (n,)) - 1`` of a CPU ``torch.Generator`` seeded with
``seed``. ``Q Q^T = I``. Rotating a Linear ``W [out, in]`` on its input side is ``W @ Q`` (it then reads
``x @ Q``); on its output side ``Q^T @ W`` (its output becomes ``y @ Q``; a bias ``b`` becomes ``b @ Q``).
"""

from __future__ import annotations

import math

import torch

from .hadamard import hadamard_matrix


def random_signs_ref(n: int, seed: int) -> torch.Tensor:
    """The seeded ``+-1`` vector ``s`` [n] (float64)."""
    g = torch.Generator().manual_seed(int(seed))
    return (2 * torch.randint(0, 2, (n,), generator=g) - 1).to(torch.float64)


def random_hadamard_ref(n: int, seed: int) -> torch.Tensor:
    """``Q = H_n diag(s) / sqrt(n)`` [n, n], float64, orthogonal."""
    return hadamard_matrix(n) * random_signs_ref(n, seed)[None, :] / math.sqrt(n)


def rotate_along_ref(x: torch.Tensor, q: torch.Tensor, dim: int) -> torch.Tensor:
    """``x @ Q`` along dimension ``dim`` of ``x`` (float64 computation, returned in ``x.dtype``)."""
    y = torch.movedim(x.detach().cpu().to(torch.float64), dim, -1) @ q
    return torch.movedim(y, -1, dim).to(dtype=x.dtype, device=x.device)
