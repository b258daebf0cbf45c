"""Reference twin of the Hadamard transform (``moequant/hadamard.h``, ``kernels/src/hadamard.cu``).

Contract: for a tensor ``x`` whose last dimension is ``n = m * 2^k`` with ``m`` in ``{1, 12, 20, 28, 40}`` and
``n <= 32768``, ``hadamard_ref(x) = x @ (H_m kron H_{2^k}) / sqrt(n)`` along the last dimension, where

* ``H_{2^k}`` is the Sylvester matrix, ``H[i, j] = (-1)^popcount(i & j)`` (symmetric);
* ``H_12`` and ``H_20`` are Paley type I matrices (q = 11, 19; q = 3 mod 4): ``H = I + S`` with the skew
  conference matrix ``S = [[0, 1^T], [-1, Q]]``, ``Q[i, j] = chi(j - i)`` (chi = quadratic character mod q);
* ``H_28`` is Paley type II (q = 13; q = 1 mod 4): ``H = C kron [[1, 1], [1, -1]] + I kron [[1, -1], [-1, -1]]``
  with the symmetric conference matrix ``C = [[0, 1^T], [1, Q]]``;
* ``H_40 = [[H_20, H_20], [H_20, -H_20]]`` (Sylvester doubling of Paley-20).

Row ``a * 2^k + b`` of the Kronecker product carries ``H_m[a, .]`` times ``H_{2^k}[b, .]``. The transform is
orthonormal: ``hadamard_ref(hadamard_ref(x) @ ...)`` -- the matrix ``H_n / sqrt(n)`` has ``M M^T = I``.
The explicit matrices are built here (CPU, float64), so this is the slow, obviously-correct oracle.
"""

from __future__ import annotations

import functools
import math

import torch

SPECIAL_ORDERS = (12, 20, 28, 40)
MAX_N = 32768


def _chi(a: int, q: int) -> int:
    """Quadratic character of a mod the prime q: 0, 1 (square) or -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    return torch.tensor([[_chi(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Paley type I Hadamard matrix of order q + 1 (q prime, q = 3 mod 4)."""
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = Q
    return torch.eye(q + 1, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    """Paley type II Hadamard matrix of order 2 (q + 1) (q prime, q = 1 mod 4)."""
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1.0
    C[1:, 0] = 1.0
    C[1:, 1:] = Q
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=None)
def special_hadamard(m: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of order m in {1, 12, 20, 28, 40} used by the transform (float64)."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 12:
        return _paley1(11)
    if m == 20:
        return _paley1(19)
    if m == 28:
        return _paley2(13)
    if m == 40:
        h = _paley1(19)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    raise ValueError(f"m: expected one of 1, 12, 20, 28, 40, got {m}")


def sylvester(p: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order p = 2^k: H[i, j] = (-1)^popcount(i & j) (float64)."""
    i = torch.arange(p)
    bits = (i[:, None] & i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return 1.0 - 2.0 * parity.to(torch.float64)


def decompose(n: int):
    """(m, p) with n = m * p, p a power of two and m in {1, 12, 20, 28, 40}; None when n is unsupported."""
    if not isinstance(n, int) or n < 1 or n > MAX_N:
        return None
    for m in (1, 12, 20, 28, 40):
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    return None


def supported_sizes_text() -> str:
    return ("a power of two up to 32768, or 12, 20, 28 or 40 times a power of two, with n <= 32768 "
            "(e.g. 7168 = 28 * 256)")


@functools.lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> torch.Tensor:
    """The unnormalized +-1 matrix H_m kron H_p of order n (float64)."""
    mp = decompose(n)
    if mp is None:
        raise ValueError(f"n: expected {supported_sizes_text()}, got {n}")
    m, p = mp
    return torch.kron(special_hadamard(m), sylvester(p))


def hadamard_ref(x: torch.Tensor) -> torch.Tensor:
    """``x @ H_n / sqrt(n)`` along the last dimension, computed in float64, returned in ``x.dtype``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x: expected a tensor with at least one dimension, got {type(x).__name__}")
    n = x.shape[-1]
    if decompose(n) is None:
        raise ValueError(f"x: expected a last dimension of {supported_sizes_text()}, got {n}")
    h = hadamard_matrix(n)
    y = (x.detach().cpu().to(torch.float64) @ h) / math.sqrt(n)
    return y.to(dtype=x.dtype, device=x.device)
