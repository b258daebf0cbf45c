"""Deterministic test inputs shared by the test modules (no assertions here)."""
import torch


def weight(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of very different magnitudes plus the special rows: zeros, a constant, all-positive, all-negative."""
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 1, rows).unsqueeze(1)
    if rows >= 6:
        w[1] = 0.0
        w[2] = 0.375
        w[3] = w[3].abs()
        w[4] = -w[4].abs()
    return w
