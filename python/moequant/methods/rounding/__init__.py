"""Greedy rounding correction after any solver (``scheme.rounding_passes``): :func:`refine`."""
from .refine import refine

__all__ = ["refine"]
