"""The ``gptaq`` section of a :class:`moequant.recipe.Recipe`: asymmetric calibration of the routed and shared
experts' down_proj and the attention's output projection (:mod:`moequant.pipeline.gptaq`, math in :mod:`moequant.ops.gptaq`, twin :mod:`moequant.ref.gptaq`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...recipe.fields import Section, check_bool, fail

__all__ = ["GPTAQConfig", "MODULES"]

MODULES = ("routed", "shared", "attention")  # routed experts' down_proj, shared expert's down_proj, o_proj


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
        alpha: the weight of the correction; 1 is the exact (damped) least-squares target, 0 the plain solve on
            ``H~`` ("true-sequential" GPTQ). At most 2. Default 0.5: at W3 on the dev model it gained on the held-out
            and the WikiText-2 text with every calibration size measured; 1 gained more held-out but lost out of
            domain (docs/quality.md).
        modules: which matrices are solved this way: ``"routed"`` (every routed expert's down_proj, on its inputs
            through its quantized gate/up), ``"shared"`` (the shared expert's down_proj) and ``"attention"`` (each
            attention's output projection); the last two are solved after the layer's other Linears, on their
            inputs in one more forward of the layer. Default: all three.
    """

    _where: ClassVar[str] = "gptaq"
    enabled: bool = False
    alpha: float = 0.5
    modules: list = field(default_factory=lambda: list(MODULES))

    def __post_init__(self) -> None:
        check_bool("gptaq.enabled", self.enabled)
        m = self.modules
        if not isinstance(m, (list, tuple)) or not m or any(x not in MODULES for x in m) or len(set(m)) != len(m):
            fail("gptaq.modules", f"a non-empty list of distinct names of {', '.join(map(repr, MODULES))}", m,
                 "the default is all three")
        self.modules = list(m)
        a = self.alpha
        if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a) or not 0 <= a <= 2:
            fail("gptaq.alpha", "a number in [0, 2]", a, "1 is the exact least-squares target, 0 turns the "
                 "correction off")
