"""The ``awq`` section of a :class:`moequant.recipe.Recipe` (AWQ before the solve,
:mod:`moequant.methods.awq.layer`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...recipe.fields import Section, check_bool, check_choice, check_int, fail
from .search import SALIENCES

__all__ = ["AWQConfig"]


@dataclass
class AWQConfig(Section):
    """AWQ before the solve (:mod:`moequant.methods.awq.layer`, docs/algorithms.md): per-input-channel scales folded
    into the preceding norm or Linear (into the router too, so routing is unchanged), then a clipping search.

    Attributes:
        enabled: run AWQ on every layer before its Hessian capture. grid: scale exponents ``i / grid`` tried.
        duo_scaling: ``s = x_mean^a / w_mean^(1-a)`` (AutoAWQ's default) instead of ``x_mean^a``.
        salience: the activation statistic ``x_mean`` per input channel: ``"abs"`` = ``E|x|`` (AutoAWQ's default),
            ``"l2"`` = ``sqrt(E[x^2])`` (L2 salience; :func:`moequant.methods.awq.search.activation_salience`).
        clip_search: search a per-group clipping threshold (not for q/k projections). clip_grid,
            clip_max_shrink: thresholds ``max|w| (1 - i / clip_grid)`` for ``i < clip_max_shrink * clip_grid``.
        max_tokens: calibration tokens (whole batches, at least one) behind the scale search.
        clip_tokens: tokens sampled per matrix for the clipping search.
        min_tokens: routed tokens an expert needs for its own down_proj scales and clipping.
        exact_routing: power-of-two scales for a norm that also feeds a router or gate, so the fold is exact in
            the checkpoint dtype and routing bit-identical (False: routing identical up to rounding).
    """

    _where: ClassVar[str] = "awq"
    enabled: bool = False
    grid: int = 20
    duo_scaling: bool = True
    salience: str = "abs"
    clip_search: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    max_tokens: int = 8192
    clip_tokens: int = 512
    min_tokens: int = 8
    exact_routing: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "duo_scaling", "clip_search", "exact_routing"):
            check_bool(f"awq.{name}", getattr(self, name))
        check_choice("awq.salience", self.salience, SALIENCES)
        check_int("awq.grid", self.grid, 1, "the default is 20")
        check_int("awq.clip_grid", self.clip_grid, 1, "the default is 20")
        if not isinstance(self.clip_max_shrink, (int, float)) or isinstance(self.clip_max_shrink, bool) \
                or not 0 < self.clip_max_shrink < 1:
            fail("awq.clip_max_shrink", "a number in (0, 1)", self.clip_max_shrink, "the default is 0.5")
        check_int("awq.max_tokens", self.max_tokens, 1, "the default is 8192")
        check_int("awq.clip_tokens", self.clip_tokens, 1, "the default is 512")
        check_int("awq.min_tokens", self.min_tokens, 1, "the default is 8")
