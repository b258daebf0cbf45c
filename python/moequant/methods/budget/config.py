"""The ``budget`` section of a :class:`moequant.recipe.Recipe`: budgeted mixed precision (docs/algorithms.md,
"Budgeted mixed precision"; the run: :mod:`moequant.pipeline.budget`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from ...formats import IntFormat
from ...recipe.fields import Section, check_choice, check_int, fail
from .units import EXPERT_GRANULARITIES

__all__ = ["BudgetConfig", "DEFAULT_CANDIDATES", "CANDIDATE_KEYS", "parse_budget", "candidate_label"]

CANDIDATE_KEYS = ("bits", "group_size", "symmetric")
# int2 .. int8 around the useful range: W2 needs small groups to be usable; W3 per-channel sits between W2 g32 and
# W3 g128 in size; W8 per-channel is near lossless
DEFAULT_CANDIDATES = (
    {"bits": 2, "group_size": 32}, {"bits": 2, "group_size": 64}, {"bits": 3, "group_size": -1},
    {"bits": 3, "group_size": 64}, {"bits": 3, "group_size": 128}, {"bits": 4, "group_size": 64},
    {"bits": 4, "group_size": 128}, {"bits": 8, "group_size": -1},
)
EXPERT_WEIGHTS = ("mass", "tokens")
SENSITIVITIES = ("none", "residual", "layer", "matrix")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GB|GiB|MB|MiB|TB|TiB|kB|KiB)\s*$", re.IGNORECASE)
_UNITS = {"kb": 1e3, "kib": 2**10, "mb": 1e6, "mib": 2**20, "gb": 1e9, "gib": 2**30, "tb": 1e12, "tib": 2**40}


def candidate_label(fields: dict) -> str:
    """``"W3 g128"`` (plus ``" sym"`` / ``" asym"`` when the candidate sets it)."""
    g = fields["group_size"]
    g = "per-channel" if g in (-1, None) else f"g{g}"
    sym = "" if "symmetric" not in fields else (" sym" if fields["symmetric"] else " asym")
    return f"W{fields['bits']} {g}{sym}"


def parse_budget(text: str) -> dict:
    """The CLI's ``--budget``: a number of bits per weight (``"3.5"``) -> ``{"bits": 3.5}``, or a checkpoint size
    with a unit (``"12GB"``, ``"800MiB"``) -> ``{"size_gb": ...}`` (GB = 1e9 bytes). ValueError otherwise."""
    s = str(text).strip()
    try:
        return {"bits": float(s)}
    except ValueError:
        pass
    m = _SIZE.match(s)
    if not m:
        raise ValueError(f"--budget: expected bits per weight (e.g. 3.5) or a checkpoint size with a unit (e.g. "
                         f"12GB, 800MiB), got {text!r}")
    return {"size_gb": float(m.group(1)) * _UNITS[m.group(2).lower()] / 1e9}


@dataclass
class BudgetConfig(Section):
    """Budgeted mixed precision: every allocation unit (matrices a loader runs in one scheme,
    :mod:`moequant.methods.budget.units`) gets the candidate that minimises the total measured error within a size
    budget. On when ``bits`` or ``size_gb`` is set.

    Attributes:
        bits: average bits per quantized weight, scales and zero points included (W4 g128 symmetric with 16-bit
            scales = 4.125). size_gb: the checkpoint's size in GB (1e9 bytes), everything included (the
            high-precision tensors and side files too). At most one of the two.
        candidates: the schemes to choose from, each a mapping of ``bits``, ``group_size`` (-1: per-channel) and
            optionally ``symmetric`` (default: the base scheme's) applied on top of the base scheme, whose solver
            settings they share. Integer weight-only formats only: a floating-point or named scheme (``preset``:
            NVFP4A16, MXFP4A16, FP8, ...) is refused as a candidate, and the base scheme must be an integer one
            (no ``preset``); modules a user override gives such a scheme are pinned and count as fixed bits.
        experts: how the routed experts' scheme may vary: ``"layer"`` (per MoE layer, all its experts' gate, up and
            down in one scheme: what vLLM loads; the default), ``"model"`` (one scheme for every layer's experts:
            what transformers loads), ``"projection"`` (gate+up and down apart) or ``"expert"`` (each expert
            apart); the last two only with the dequantized export (no loader reads them pack-quantized).
        expert_weight: an expert's measured error counts with its routing mass (``"mass"``: the sum of the routing
            weights of its calibration tokens) or its token count (``"tokens"``).
        sensitivity: how the measured errors of different matrices are made comparable (default ``"matrix"``, the best
            measured on the trained test MoE, docs/quality.md): ``"none"``: as measured,
            times the weights above; ``"residual"``: each layer's errors also divided by the mean squared norm of the
            residual stream after it (pass 1's calibration tokens): relative to the signal they are added to;
            ``"layer"``: each layer's errors also times the loss's sensitivity to its output, ``mean_t ||dLoss/dh||^2``
            of the unquantized model; ``"matrix"``: each matrix's error times the loss's sensitivity to that matrix's
            own output, ``sum_t ||dLoss/dy_t||^2 / d_out`` over the tokens it sees (a routed expert's include its
            routing weight, so ``expert_weight`` does not apply). ``layer`` and ``matrix`` come from one forward and
            one backward pass, layer by layer, over ``sensitivity_samples`` calibration windows
            (:func:`moequant.calibration.sensitivity.loss_sensitivity`).
        sensitivity_samples: calibration windows behind ``"layer"`` and ``"matrix"`` (the first ones).
    """

    _where: ClassVar[str] = "budget"
    bits: Optional[float] = None
    size_gb: Optional[float] = None
    candidates: list = field(default_factory=lambda: [dict(c) for c in DEFAULT_CANDIDATES])
    experts: str = "layer"
    expert_weight: str = "mass"
    sensitivity: str = "matrix"
    sensitivity_samples: int = 16

    def __post_init__(self) -> None:
        for name in ("bits", "size_gb"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                                  or v != v or v == float("inf")):
                fail(f"budget.{name}", "a positive number or null", v,
                     "e.g. bits: 3.5 (bits per weight, scales included)" if name == "bits" else "e.g. size_gb: 12")
        if self.bits is not None and self.size_gb is not None:
            fail("budget", "one of bits or size_gb", {"bits": self.bits, "size_gb": self.size_gb},
                 "set one budget and null the other")
        if self.bits is not None and not 1.0 <= self.bits <= 16.0:
            fail("budget.bits", "a number of bits per weight in [1, 16]", self.bits,
                 "candidates store 2..8-bit codes plus scales")
        if not isinstance(self.candidates, (list, tuple)) or not self.candidates:
            fail("budget.candidates", "a non-empty list of {bits, group_size[, symmetric]} mappings",
                 self.candidates)
        self.candidates = [dict(c) if isinstance(c, dict) else c for c in self.candidates]
        seen = set()
        for i, c in enumerate(self.candidates):
            where = f"budget.candidates[{i}]"
            named = c.get("preset") if isinstance(c, dict) else c if isinstance(c, str) else None
            if named is not None:  # NVFP4A16, MXFP4A16, FP8, ... or W4A16
                fail(where, "an integer format {bits, group_size[, symmetric]}", f"preset {named}",
                     "floating-point and named schemes are not budget candidates (the measurement and the bit "
                     "accounting are those of integer pack-quantized formats); pin such modules with an override, "
                     "they count as fixed bits")
            if not isinstance(c, dict) or "bits" not in c or "group_size" not in c:
                fail(where, "a mapping with bits and group_size (and optionally symmetric)", c)
            unknown = sorted(set(c) - set(CANDIDATE_KEYS))
            if unknown:
                fail(where, f"keys among {', '.join(CANDIDATE_KEYS)}", ", ".join(unknown),
                     "a candidate sets the format only; solver settings come from the base scheme")
            try:
                IntFormat(c["bits"], c["group_size"], c.get("symmetric", True))
            except ValueError as exc:
                raise ValueError(f"{where}.{exc}") from None
            key = (c["bits"], c["group_size"], c.get("symmetric"))
            if key in seen:
                fail(where, "a candidate not listed before", candidate_label(c), "remove the duplicate")
            seen.add(key)
        check_choice("budget.experts", self.experts, EXPERT_GRANULARITIES,
                     "'layer' for vLLM, 'model' for transformers")
        check_choice("budget.expert_weight", self.expert_weight, EXPERT_WEIGHTS)
        check_choice("budget.sensitivity", self.sensitivity, SENSITIVITIES)
        check_int("budget.sensitivity_samples", self.sensitivity_samples, 1, "the default is 16")

    @property
    def enabled(self) -> bool:
        return self.bits is not None or self.size_gb is not None
