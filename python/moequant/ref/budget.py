"""Plain twin of :func:`moequant.methods.budget.allocate`: every combination of options enumerated."""
from __future__ import annotations

import itertools
from typing import Optional, Sequence

__all__ = ["allocate_ref"]


def allocate_ref(options: Sequence[Sequence[Optional[tuple]]], budget: float) -> tuple[tuple, float, float]:
    """``(choice, cost, error)`` of the least-error choice of one option per unit with total cost <= ``budget``
    (ties in error: the cheaper, then the first in enumeration order). ValueError when no choice fits."""
    best = None
    for choice in itertools.product(*[[j for j, o in enumerate(opts) if o is not None] for opts in options]):
        cost = sum(options[i][j][0] for i, j in enumerate(choice))
        err = sum(options[i][j][1] for i, j in enumerate(choice))
        if cost > budget:
            continue
        if best is None or (err, cost) < (best[2], best[1]):
            best = (tuple(choice), float(cost), float(err))
    if best is None:
        raise ValueError(f"budget: {budget} bits is below the cheapest choice")
    return best
