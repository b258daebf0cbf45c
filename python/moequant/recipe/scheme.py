"""The scheme of one module (:class:`QuantScheme`: a format plus the solver's settings), per-module exceptions
(:class:`Override`) and the module-name patterns both use (:func:`match_pattern`).

A scheme's ``method`` names a solver of a :class:`moequant.methods.SolverRegistry`: the built-in one
(:func:`moequant.methods.default_solvers`: ``gptq``, ``rtn``) unless the scheme, override or recipe was made with
``solvers=`` another registry (which the pipeline then uses: ``moequant.quantize(..., solvers=...)``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import InitVar, dataclass
from typing import Any, ClassVar, Optional

from ..formats import FloatFormat, IntFormat, preset
from ..formats.schemes import PRESETS
from ..methods.registry import default_solvers
from .fields import Section, check_bool, check_choice, check_int, check_keys, check_pos_float, fail

__all__ = ["QuantScheme", "Override", "match_pattern", "check_pattern", "SCALE_SEARCHES", "preset_fields"]

SCALE_SEARCHES = ("minmax", "mse")
_FIXED = ("bits", "group_size", "symmetric", "scale_search")  # what a preset may fix


def preset_fields(name) -> dict:
    """The scheme fields the preset ``name`` fixes: ``bits``, ``group_size``, ``symmetric`` of its weight format
    (FP8: 8 / -1, FP8_BLOCK: 8 / 128, NVFP4: 4 / 16, MXFP4: 4 / 32) and, for the floating-point ones,
    ``scale_search: minmax`` (their scales are min / max ones); none for ``None``."""
    if name is None:
        return {}
    p = preset(name)
    out = {"bits": p.weights.bits, "group_size": p.weights.group_size, "symmetric": p.weights.symmetric}
    if isinstance(p.weights, FloatFormat):
        out["scale_search"] = "minmax"
    return out


def match_pattern(pattern: str, name: str) -> bool:
    """Whether a module ``name`` matches ``pattern`` (``"re:<regex>"``: ``re.match``; else a case-sensitive glob)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def check_pattern(name: str, pattern: Any) -> None:
    """ValueError naming ``name`` unless ``pattern`` is a non-empty glob or a valid ``"re:<regex>"``."""
    if not isinstance(pattern, str) or not pattern or pattern == "re:":
        fail(name, "a non-empty glob or 're:<regex>' pattern", pattern)
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            fail(name, "a valid regular expression after 're:'", pattern, f"fix the regex ({exc})")


@dataclass
class QuantScheme(Section):
    """Weight quantization of one module: its :attr:`format` (``bits``, ``group_size``, ``symmetric``) and how the
    solver named by ``method`` finds the codes.

    Attributes:
        bits: code width, 2..8. group_size: input columns per scale (a divisor of in_features); ``-1`` (or
            None, stored as -1) = one scale per output channel. symmetric: no zero point.
        preset: a named scheme (:mod:`moequant.formats.schemes`, llm-compressor's names): ``"W8A8"`` (int8 weights
            per channel, int8 per-token activations), ``"FP8"`` (= ``"FP8_DYNAMIC"``), ``"FP8_BLOCK"``, ``"NVFP4"``,
            ``"NVFP4A16"``, ``"MXFP4"``, ``"MXFP4A16"``, ``"MXFP6A16"``, ``"MXFP6A8"``, ``"MXFP8A16"``, ``"MXFP8"``,
            or None (integer weights from ``bits`` / ``group_size`` /
            ``symmetric``, 16-bit activations). ``"W4A16"`` and ``"W8A16"`` are accepted and stored as their integer
            fields (preset None). A preset fixes ``bits``, ``group_size``, ``symmetric`` (and ``scale_search:
            minmax`` for the floating-point ones, :func:`preset_fields`): left at their defaults they take its
            values, other values are an error; changing ``preset`` with :meth:`replace` (an override) resets them.
        method: a registered solver (:mod:`moequant.methods`): ``"gptq"`` (Hessian-aware, needs calibration data)
            or ``"rtn"`` (round to nearest).
        scale_search: ``"minmax"`` or ``"mse"`` (grid search of shrink factors ``1 - i/mse_grid`` down to
            ``mse_min_shrink``, error ``sum |w - q|^mse_norm``).
        act_order: GPTQ column order by decreasing Hessian diagonal (static groups, no g_idx).
        damp: GPTQ damping, a fraction of ``mean(diag H)``. block_size: GPTQ lazy-update block width.
        rounding_passes: greedy rounding correction after the solve (0 = off; ``moequant.ops.refine_rounding``,
            docs/algorithms.md): flip budget per row in units of its columns. rounding_outlier_quantile: |w|
            quantile of a group above which codes are left alone (0.99: the top 1%).
        solvers (init only): the :class:`~moequant.methods.SolverRegistry` whose names ``method`` may take
            (default: the built-in solvers); kept with the scheme and its :meth:`replace` copies, not serialized.
    """

    _where: ClassVar[str] = "scheme"
    # Defaults: W4A16 g128 symmetric, the format every loader reads (vLLM, and transformers, whose MoE loader drops
    # zero points), as llm-compressor's W4A16 preset; the solver settings are the best measured recipe on the
    # trained test MoE (docs/quality.md, issue-5 table): GPTQ with act-order (static groups), the MSE scale search
    # and damping 0.1 -- among the recipes not worse than RTN out of domain (WikiText-2) at W4 and W3, the best
    # held-out perplexity within the run-to-run spread, at no cost.
    bits: int = 4
    group_size: Optional[int] = 128
    symmetric: bool = True
    method: str = "gptq"
    scale_search: str = "mse"
    mse_grid: int = 100
    mse_min_shrink: float = 0.2
    mse_norm: float = 2.4
    act_order: bool = True
    damp: float = 0.1
    block_size: int = 128
    rounding_passes: int = 0
    rounding_outlier_quantile: float = 0.99
    preset: Optional[str] = None
    solvers: InitVar[Any] = None

    def __post_init__(self, solvers: Any = None) -> None:
        if solvers is not None:
            self._solvers = solvers
        if self.group_size is None:
            self.group_size = -1
        self._apply_preset()
        self.format  # bits, group_size and symmetric are validated by the format
        check_choice("method", self.method, self.solver_registry().names(),
                     "use 'rtn' when no calibration data is available")
        if isinstance(self.format, FloatFormat) and self.rounding_passes:
            fail("rounding_passes", f"0 with {self.preset} (the greedy rounding correction is for integer formats)",
                 self.rounding_passes)
        check_choice("scale_search", self.scale_search, SCALE_SEARCHES)
        check_int("mse_grid", self.mse_grid, 1, "the default is 100")
        check_pos_float("mse_min_shrink", self.mse_min_shrink, 1.0, "the default is 0.2")
        check_pos_float("mse_norm", self.mse_norm, remedy="the default is 2.4")
        check_bool("act_order", self.act_order)
        check_pos_float("damp", self.damp, remedy="typical values are 0.01 to 0.1")
        check_int("block_size", self.block_size, 1, "the default is 128")
        check_int("rounding_passes", self.rounding_passes, 0, "0 turns the greedy rounding correction off")
        check_pos_float("rounding_outlier_quantile", self.rounding_outlier_quantile, 1.0, "the default is 0.99")

    def _apply_preset(self) -> None:
        """Resolves ``preset`` (aliases, case) and fills or checks the fields it fixes (class docstring)."""
        if self.preset is None:
            return
        if not isinstance(self.preset, str):
            fail("preset", f"one of {', '.join(PRESETS)} or null", self.preset)
        p = preset(self.preset)
        for name, value in preset_fields(p.name).items():
            current = getattr(self, name)
            if current != value and current != _DEFAULTS[name]:
                fail(name, f"{value!r} with preset {p.name} (the preset fixes it)", current,
                     f"leave {name} out, or set preset: null for an integer format of your own")
            setattr(self, name, value)
        self.preset = None if p.weight_only and isinstance(p.weights, IntFormat) else p.name

    @property
    def format(self):
        """The weight format: the preset's (an :class:`~moequant.formats.IntFormat` or
        :class:`~moequant.formats.FloatFormat`), else the :class:`~moequant.formats.IntFormat` of ``bits``,
        ``group_size``, ``symmetric`` (validated: bits 2..8, group size > 0 or -1, symmetric a bool)."""
        if self.preset is not None:
            return preset(self.preset).weights
        return IntFormat(self.bits, self.group_size, self.symmetric)

    @property
    def activations(self):
        """The runtime's input quantization (:class:`~moequant.formats.ActivationFormat`), None for weight-only."""
        return preset(self.preset).activations if self.preset is not None else None

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    def use_solvers(self, solvers: Any) -> None:
        """Looks ``method`` up in ``solvers`` from now on (a recipe made with a registry gives it to its scheme)."""
        self._solvers = solvers

    def solver_registry(self):
        """The registry ``method`` is looked up in (the built-in solvers unless the scheme was made with another)."""
        registry = getattr(self, "_solvers", None)
        return registry if registry is not None else default_solvers()

    @property
    def solver(self):
        """The :class:`~moequant.methods.Solver` named by ``method``."""
        return self.solver_registry().get(self.method)

    @classmethod
    def from_dict(cls, data: Any, solvers: Any = None) -> "QuantScheme":
        """From a mapping of fields (unknown keys are an error), or a preset name (``"NVFP4"``); ``solvers`` as the
        constructor's."""
        if isinstance(data, str):
            data = {"preset": data}
        check_keys(cls, data, cls._where)
        _check_given(data)
        return cls(**data, solvers=solvers)

    @classmethod
    def from_preset(cls, name: str, solvers: Any = None, **fields: Any) -> "QuantScheme":
        """The scheme of preset ``name`` with other fields (``method``, ``act_order``, ...) as given."""
        return cls.from_dict({**fields, "preset": name}, solvers)

    def replace(self, **changes: Any) -> "QuantScheme":
        """A copy with some fields changed (validated; unknown field names are an error). A new ``preset`` resets
        the fields the old and the new preset fix to the new one's values (or the defaults for None), unless
        ``changes`` sets them."""
        check_keys(QuantScheme, changes, "scheme")
        _check_given(changes)
        if "preset" in changes:
            for name in set(preset_fields(self.preset)) | set(preset_fields(changes["preset"])):
                changes.setdefault(name, _DEFAULTS[name])
        return dataclasses.replace(self, solvers=getattr(self, "_solvers", None), **changes)

    def quant_kwargs(self) -> dict:
        """Keyword arguments shared by :func:`moequant.ops.quantize_rtn` and :func:`moequant.ops.gptq_quantize`."""
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "scale_search": self.scale_search, "mse_grid": self.mse_grid,
                "mse_min_shrink": self.mse_min_shrink, "mse_norm": self.mse_norm}

    def gptq_kwargs(self) -> dict:
        """Keyword arguments of :func:`moequant.ops.gptq_quantize` (besides ``w``, ``h``, ``scale_dtype``)."""
        return {**self.quant_kwargs(), "act_order": self.act_order, "damp": self.damp, "block_size": self.block_size}

    def describe(self) -> str:
        """Short label, e.g. ``"W4 g128 asym gptq"``, ``"NVFP4 rtn"``."""
        extra = (" act-order" if self.act_order and self.solver.act_order else "") + \
            (" mse" if self.scale_search == "mse" else "") + \
            (f" round{self.rounding_passes}" if self.rounding_passes else "")
        return f"{self.preset or self.format.label()} {self.method}{extra}"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(QuantScheme) if f.name in _FIXED}


def _check_given(data: dict) -> None:
    """A preset given together with fields it fixes: they must agree (the constructor cannot tell a field given as
    its default from one left out)."""
    if data.get("preset") is None:
        return
    for name, value in preset_fields(data["preset"]).items():
        if name in data and data[name] != value and not (name == "group_size" and data[name] is None and value == -1):
            fail(name, f"{value!r} with preset {preset(data['preset']).name} (the preset fixes it)", data[name],
                 f"leave {name} out, or set preset: null for an integer format of your own")


@dataclass
class Override(Section):
    """Per-module exception to the base scheme.

    Attributes:
        pattern: glob on the full module name or ``"re:<regex>"`` (``re.match``).
        scheme: QuantScheme fields to change relative to the recipe's base scheme (None or {}: the base scheme), or a
            preset name (``"FP8"`` = ``{preset: FP8}``).
        skip: keep matching modules in high precision (then ``scheme`` must be empty).
        solvers (init only): as :class:`QuantScheme`'s, for a ``method`` in ``scheme``.
    """

    _where: ClassVar[str] = "overrides[]"
    pattern: str
    scheme: Optional[dict] = None
    skip: bool = False
    solvers: InitVar[Any] = None

    def __post_init__(self, solvers: Any = None) -> None:
        if solvers is not None:
            self._solvers = solvers
        check_pattern("overrides.pattern", self.pattern)
        check_bool("overrides.skip", self.skip)
        if self.scheme is None:
            self.scheme = {}
        if isinstance(self.scheme, str):
            self.scheme = {"preset": self.scheme}
        if not isinstance(self.scheme, dict):
            fail("overrides.scheme", "a mapping of QuantScheme fields (e.g. {bits: 8}) or a preset name (e.g. FP8)",
                 self.scheme)
        if self.skip and self.scheme:
            fail("overrides.scheme", "nothing when skip is true", self.scheme,
                 f"drop either 'skip' or 'scheme' from the override of {self.pattern!r}")
        try:
            QuantScheme(solvers=getattr(self, "_solvers", None)).replace(**self.scheme)
        except ValueError as exc:
            raise ValueError(f"overrides[{self.pattern!r}].{exc}") from None

    @classmethod
    def from_dict(cls, data: dict, solvers: Any = None) -> "Override":
        """From a mapping of fields (unknown keys are an error); ``solvers`` as the constructor's."""
        return cls(**check_keys(cls, data, cls._where), solvers=solvers)

    def use_solvers(self, solvers: Any) -> None:
        """Validates a ``method`` in ``scheme`` against ``solvers`` from now on."""
        self._solvers = solvers

    def matches(self, name: str) -> bool:
        return match_pattern(self.pattern, name)

    def to_dict(self) -> dict:
        out: dict = {"pattern": self.pattern}
        if self.scheme:
            out["scheme"] = dict(self.scheme)
        if self.skip:
            out["skip"] = True
        return out
