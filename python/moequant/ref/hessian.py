"""Plain-PyTorch reference of the routed (per-expert) Hessian accumulation of ``moequant.ops.HessianAccumulator``.

For tokens x_t routed to expert e with routing weight c_t (1 when no weights are given):
``H[e] = sum_t c_t x_t x_t^T`` (a sum, not normalised), ``counts[e]`` = number of tokens routed to e,
``mass[e] = sum_t c_t`` (float64). The overall scale of H does not matter to GPTQ (damping is relative),
but the sums are what the accumulator reports, so they are what is compared.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulate_hessian_ref"]


def accumulate_hessian_ref(
    x: Tensor,
    expert_ids: Tensor,
    weights: Tensor | None,
    num_experts: int,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-expert weighted Gram matrices of the rows of ``x``.

    x: float [n, d]; expert_ids: integer [n] with values in ``[0, num_experts)``; weights: float [n] (>= 0) or
    ``None``. Returns ``(H dtype [E, d, d], counts int64 [E], mass float64 [E])``.

    Equivalence: ``moequant.ops.HessianAccumulator(E, d, dtype=float64).add(x, expert_ids, weights)`` agrees with
    this to within float64 rounding; the float32 accumulator within the budget of ``tests/python/tolerances.py``.
    """
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [tokens, dim], got {x.dim()}-D")
    n, d = x.shape
    if expert_ids.shape != (n,) or expert_ids.is_floating_point():
        raise ValueError(
            f"expert_ids: expected an integer tensor of shape [{n}], got {expert_ids.dtype} {list(expert_ids.shape)}"
        )
    ids = expert_ids.to(torch.int64)
    if n and (ids.min() < 0 or ids.max() >= num_experts):
        raise ValueError(f"expert_ids: expected values in [0, {num_experts}), got [{ids.min()}, {ids.max()}]")
    if weights is None:
        c = torch.ones(n, dtype=torch.float64)
    else:
        if weights.shape != (n,):
            raise ValueError(f"weights: expected shape [{n}], got {list(weights.shape)}")
        c = weights.to(torch.float64)
        if not torch.isfinite(c).all() or (c < 0).any():
            raise ValueError("weights: expected finite values >= 0")
    xs = x.to(dtype)
    hs = torch.zeros(num_experts, d, d, dtype=dtype)
    counts = torch.zeros(num_experts, dtype=torch.int64)
    mass = torch.zeros(num_experts, dtype=torch.float64)
    for e in range(num_experts):
        sel = ids == e
        xe = xs[sel]
        ce = c[sel]
        hs[e] = (xe * ce.to(dtype).unsqueeze(1)).t() @ xe
        counts[e] = int(sel.sum())
        mass[e] = ce.sum()
    return hs, counts, mass
