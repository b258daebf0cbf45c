"""The ``gptaq`` section of a :class:`moequant.recipe.Recipe`: asymmetric calibration of the routed experts'
down_proj (:mod:`moequant.pipeline.gptaq`, math in :mod:`moequant.ops.gptaq`, twin :mod:`moequant.ref.gptaq`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...recipe.fields import Section, check_bool, fail

__all__ = ["GPTAQConfig"]


@dataclass
class GPTAQConfig(Section):
    """GPTAQ-style asymmetric calibration (docs/algorithms.md, "Asymmetric calibration"): a routed expert's
    down_proj is solved after its gate/up, against its inputs ``x~`` through the *quantized* gate/up, towards the
    output of the original matrix on the original inputs ``x`` (same rows, same routing weights ``c``):
    ``min_Q sum c ||W x - Q x~||^2``, i.e. the scheme's solver on ``H~ = sum c x~ x~^T`` with the corrected
    target ``W* = W + alpha W C (H~ + damp)^-1``, ``C = sum c (x - x~) x~^T``.

    Attributes:
        enabled: apply it to every routed expert's down_proj that has its own Hessian (experts on a fallback
            Hessian keep the plain solve).
        alpha: the weight of the correction; 1 is the exact least-squares target, 0 the plain solve on ``H~``
            ("true-sequential" GPTQ of down_proj). At most 2.
    """

    _where: ClassVar[str] = "gptaq"
    enabled: bool = False
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_bool("gptaq.enabled", self.enabled)
        a = self.alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or not 0 <= a <= 2:
            fail("gptaq.alpha", "a number in [0, 2]", a, "1 is the exact least-squares target, 0 turns the "
                 "correction off")
