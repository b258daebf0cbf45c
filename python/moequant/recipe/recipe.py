"""Quantization recipes: what to quantize, how, and with which calibration data.

(About 400 lines: the recipe's sections and their validation stay with the one dataclass users build; the scheme
type is in :mod:`moequant.recipe.scheme`, the validation helpers in :mod:`moequant.recipe.fields`.)

A :class:`Recipe` is plain, validated data (dataclasses) that round-trips through ``to_dict()`` /
``from_dict()`` and JSON or YAML files (``Recipe.load(path)``, ``recipe.save(path)``). Every bad value raises
ValueError naming the field, the expected and the actual value, and a remedy; unknown keys are an error
that lists the known ones.

Resolution of one module (:meth:`Recipe.resolve`), by its full *checkpoint* module name, the name it has in the
exported compressed-tensors checkpoint (``"model.layers.3.self_attn.q_proj"``; routed experts one by one, e.g.
``"model.layers.3.mlp.experts.7.gate_proj"``, Mixtral ``"model.layers.3.block_sparse_moe.experts.7.w1"``):

1. a module matched by any ``ignore`` pattern stays in high precision (``None``); overrides cannot re-enable it;
2. otherwise the **last** matching entry of ``overrides`` wins (order matters, like CSS): ``skip=True`` keeps
   the module in high precision, else its ``scheme`` fields replace those of the base ``scheme`` (fields of
   earlier matching overrides are *not* merged in);
3. with no matching override the base ``scheme`` applies.

Patterns: ``"re:<regex>"`` uses ``re.match`` on the full name (anchored at the start, like compressed-tensors:
``"re:.*mlp\\.gate$"``); anything else is a case-sensitive glob (``fnmatch``) on the full name
(``"model.layers.*.self_attn.*"``; a plain name such as ``"lm_head"`` matches only itself).
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from ..formats import IntFormat
from ..formats.kv_cache import check_kv_cache
from ..methods.awq.config import AWQConfig
from ..methods.budget.config import BudgetConfig, parse_budget
from ..methods.gptaq.config import GPTAQConfig
from ..methods.rotation.config import RotationConfig
from .device import DEVICE_PATTERN
from .fields import Section, check_bool, check_choice, check_int, check_keys, check_pos_float, fail, str_list
from .scheme import Override, QuantScheme, check_pattern, match_pattern

__all__ = [
    "RECIPE_VERSION", "DEFAULT_IGNORE", "QuantScheme", "Override", "CalibrationConfig", "FallbackConfig",
    "Recipe", "match_pattern", "AWQConfig", "RotationConfig", "BudgetConfig", "GPTAQConfig",
]

RECIPE_VERSION = 1
DEFAULT_IGNORE = (
    "lm_head",                 # output head (tied to the embeddings in many small models)
    "re:.*embed_tokens$",      # token embeddings
    "re:.*mlp\\.gate$",        # routers (Qwen, DeepSeek, OLMoE)
    "re:.*block_sparse_moe\\.gate$",  # routers (Mixtral, PhiMoE checkpoints)
    "re:.*\\.router(\\.layer)?$",  # routers (GPT-OSS; GraniteMoE checkpoint: router.layer)
    "re:.*shared_expert_gate$",  # sigmoid gate of the shared expert, nn.Linear [1, H] (cannot be packed)
)
_POLICIES = ("mean", "identity", "rtn", "shrink")
_HESSIAN_DTYPES = ("float32", "float64")
_HESSIAN_PRECISIONS = ("auto", "fp32", "tf32", "bf16")


@dataclass
class CalibrationConfig(Section):
    """Calibration data (see :mod:`moequant.calibration.data`).

    Attributes:
        text_files: UTF-8 text files, concatenated in order, from which ``num_samples`` random windows are drawn.
        jsonl_files: JSONL files of ``{"input_ids": [...]}`` or ``{"text": "..."}`` lines, used as whole samples
            (those of at least ``seq_len`` tokens, truncated to ``seq_len``).
        num_samples, seq_len: calibration samples and their length in tokens.
        seed: seed of the local generator drawing the windows. batch_size: samples per forward pass.
    """

    _where: ClassVar[str] = "calibration"
    text_files: list = field(default_factory=list)
    jsonl_files: list = field(default_factory=list)
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Re-checks every field (also called by :func:`moequant.calibration.data.calibration_batches`)."""
        self.text_files = str_list("calibration.text_files", self.text_files)
        self.jsonl_files = str_list("calibration.jsonl_files", self.jsonl_files)
        check_int("calibration.num_samples", self.num_samples, 1, "128 is the reference protocol")
        check_int("calibration.seq_len", self.seq_len, 2, "512 is the reference protocol")
        check_int("calibration.seed", self.seed, 0)
        check_int("calibration.batch_size", self.batch_size, 1, "lower it if memory runs out")


@dataclass
class FallbackConfig(Section):
    """Experts that received fewer than ``min_tokens`` calibration tokens.

    ``policy``: ``"mean"`` (GPTQ on the mean Hessian of the layer's experts), ``"identity"`` (GPTQ with
    ``H = I``, equivalent to RTN), ``"rtn"`` (plain round to nearest) or ``"shrink"``: *every* expert uses
    ``H_e' = (n_e H_e + k H_all) / (n_e + k)`` (normalised Hessians; n_e = the expert's rows, or its routing
    mass when routing-weighted; k = ``shrinkage_tokens``; H_all = the layer's all-token Hessian of that input,
    docs/algorithms.md), so starved experts lean on the layer and well-calibrated ones keep their own Hessian.
    ``calibrate_all_experts`` (shrink only): the down_proj target of expert e is the Hessian of its
    intermediate activation over *all* tokens (every token through every expert in the capture, E times the
    expert compute); off, it is the pooled down_proj Hessian of the routed rows of all experts.
    """

    _where: ClassVar[str] = "fallback"
    min_tokens: int = 8
    policy: str = "mean"
    shrinkage_tokens: float = 64.0
    calibrate_all_experts: bool = False

    def __post_init__(self) -> None:
        check_int("fallback.min_tokens", self.min_tokens, 0)
        check_choice("fallback.policy", self.policy, _POLICIES)
        check_pos_float("fallback.shrinkage_tokens", self.shrinkage_tokens, remedy="the default is 64")
        check_bool("fallback.calibrate_all_experts", self.calibrate_all_experts)



@dataclass
class Recipe:
    """A full quantization recipe (see the module docstring for the resolution rules).

    Attributes:
        scheme: the base :class:`QuantScheme` (or a preset name, ``"NVFP4"``: :meth:`QuantScheme.from_dict`).
            ignore: patterns of modules kept in high precision
            (default :data:`DEFAULT_IGNORE`: lm_head, embeddings, routers, shared_expert_gate).
        overrides: ordered :class:`Override` list, the last match wins. calibration, fallback, awq: see those classes.
        hessian_dtype: ``"float32"`` or ``"float64"`` Hessian accumulation.
        hessian_precision: inputs of the Hessian update on a GPU (accumulation is always in ``hessian_dtype``):
            ``"fp32"`` (SIMT), ``"tf32"`` or ``"bf16"`` (tensor cores); ``"auto"`` (default) = ``"bf16"`` when the
            layer computes in bf16 on CUDA (its activations are bf16 already, so only the routing-weight scaling
            is rounded), else ``"fp32"``. CPU runs always use fp32; asking for tf32/bf16 there is an error.
        routing_weighted: weight each routed token's Hessian contribution by its routing weight.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or None (the pipeline picks). version: recipe format version.
        solver_memory_gb: GPU memory the batched expert GPTQ may use at once; a layer's experts are solved in
            chunks that fit it (weights, Hessians and workspace).
        report_loss: record every matrix's proxy loss ``tr(dW H dW^T)`` of its weights as stored, and the
            statistics ``error`` / ``energy`` (default). False skips them (two products with H per matrix; on a GPU
            one bf16 tensor-core GEMM); the report then shows no loss.
        rotation: offline Hadamard rotation of the residual stream before calibration (:class:`RotationConfig`).
        device_memory_gb: memory of the compute device one MoE layer may use (docs/pipeline.md, "Expert
            streaming"): its routed experts go through the device in groups that fit. None (default): on a GPU the
            memory free when the layer starts, less 2 GiB; on the CPU unbounded (one group).
        experts_per_group: routed experts per group, overriding what ``device_memory_gb`` allows (None: from the
            budget). Results do not depend on it beyond the rounding of summing the groups' outputs.
        budget: budgeted mixed precision (:class:`BudgetConfig`): with ``bits`` or ``size_gb`` set, each
            allocation unit gets the candidate scheme that minimises the measured error within that size
            (:mod:`moequant.pipeline.budget`); the base ``scheme`` then gives the solver settings and the fields a
            candidate leaves out.
        host_memory_gb: host memory the calibration hidden states may use (docs/pipeline.md, "Host memory"): a
            layer holds two copies (its inputs and outputs, ``num_samples x seq_len x hidden`` each); when they need
            more, they live in a disk-backed store in the work directory, read back per batch. 0 keeps them on
            disk. None (default): half of the host memory available when the run starts (MemAvailable, or a
            cgroup limit's room when lower) after one decoder layer. Results are bit-identical either way, so a run
            may resume with another value (it is not part of the run's fingerprint).
        gptaq: asymmetric calibration of the routed experts' down_proj (:class:`GPTAQConfig`): solved after their
            gate/up, on the inputs through the quantized gate/up, towards the original output.
        kv_cache: ``"fp8"``: calibrate every attention's FP8 KV-cache ``k_scale`` / ``v_scale`` and export them with
            a ``kv_cache_scheme`` (:mod:`moequant.formats.kv_cache`, docs/export.md "FP8 KV cache"); None: no.
        solvers (init only): the :class:`~moequant.methods.SolverRegistry` the schemes' ``method`` names are looked
            up in (default: the built-in solvers); given to the scheme and the overrides, not serialized.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    ignore: list = field(default_factory=lambda: list(DEFAULT_IGNORE))
    overrides: list = field(default_factory=list)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    hessian_dtype: str = "float32"
    hessian_precision: str = "auto"
    routing_weighted: bool = False
    device: Optional[str] = None
    solver_memory_gb: float = 8.0
    report_loss: bool = True
    rotation: RotationConfig = field(default_factory=RotationConfig)
    device_memory_gb: Optional[float] = None
    experts_per_group: Optional[int] = None
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    host_memory_gb: Optional[float] = None
    kv_cache: Optional[str] = None
    gptaq: GPTAQConfig = field(default_factory=GPTAQConfig)
    version: int = RECIPE_VERSION
    solvers: InitVar[Any] = None

    def __post_init__(self, solvers: Any = None) -> None:
        if solvers is not None:
            self._solvers = solvers
        self.validate()

    def validate(self) -> "Recipe":
        """Checks the whole recipe again, every section and every override, and returns it.

        A recipe is plain mutable data (``r.scheme.bits = 3``, ``r.overrides.append(...)`` are allowed, and the
        tests and users rely on it), so a value set after construction is only checked here: this raises the
        same ValueError the constructor raises for the same value. :func:`moequant.quantize` calls it (through
        :meth:`validated`) before any work. Sections given as mappings are converted to their dataclasses."""
        solvers = getattr(self, "_solvers", None)
        if self.version != RECIPE_VERSION:
            fail("version", str(RECIPE_VERSION), self.version,
                  "this moequant reads recipe version 1; upgrade moequant or rewrite the recipe")
        if isinstance(self.scheme, str):  # a preset name: scheme: NVFP4
            self.scheme = QuantScheme.from_dict(self.scheme, solvers)
        for name, cls in (("scheme", QuantScheme), ("calibration", CalibrationConfig), ("fallback", FallbackConfig),
                          ("awq", AWQConfig), ("rotation", RotationConfig), ("budget", BudgetConfig),
                          ("gptaq", GPTAQConfig)):
            if isinstance(getattr(self, name), dict):
                data = getattr(self, name)
                setattr(self, name, QuantScheme.from_dict(data, solvers) if cls is QuantScheme else cls.from_dict(data))
            if not isinstance(getattr(self, name), cls):
                fail(name, f"a {cls.__name__}, a mapping or a preset name (e.g. NVFP4)" if cls is QuantScheme
                     else f"a {cls.__name__} or a mapping", getattr(self, name))
        if not isinstance(self.ignore, (list, tuple)):
            fail("ignore", "a list of patterns", self.ignore)
        self.ignore = list(self.ignore)
        for i, p in enumerate(self.ignore):
            check_pattern(f"ignore[{i}]", p)
        if not isinstance(self.overrides, (list, tuple)):
            fail("overrides", "a list of {pattern, scheme, skip} entries", self.overrides)
        self.overrides = [Override.from_dict(o, solvers) if isinstance(o, dict) else o for o in self.overrides]
        for i, o in enumerate(self.overrides):
            if not isinstance(o, Override):
                fail(f"overrides[{i}]", "an Override or a mapping", o)
        check_choice("hessian_dtype", self.hessian_dtype, _HESSIAN_DTYPES)
        check_choice("hessian_precision", self.hessian_precision, _HESSIAN_PRECISIONS)
        if self.hessian_dtype == "float64" and self.hessian_precision not in ("auto", "fp32"):
            fail("hessian_precision", "'auto' or 'fp32' with hessian_dtype 'float64'", self.hessian_precision,
                  "tf32/bf16 tensor-core updates accumulate in float32; drop one of the two settings")
        check_bool("routing_weighted", self.routing_weighted)
        if self.device is not None and (not isinstance(self.device, str) or not DEVICE_PATTERN.match(self.device)):
            fail("device", "'cpu', 'cuda', 'cuda:N' or null", self.device)
        check_pos_float("solver_memory_gb", self.solver_memory_gb)
        check_bool("report_loss", self.report_loss)
        if self.device_memory_gb is not None:
            check_pos_float("device_memory_gb", self.device_memory_gb,
                            remedy="the GPU memory a layer may use, e.g. 70 on an 80 GB card; null: the free memory")
        if self.experts_per_group is not None:
            check_int("experts_per_group", self.experts_per_group, 1, "null chooses it from device_memory_gb")
        if self.host_memory_gb is not None and not (
                isinstance(self.host_memory_gb, (int, float)) and not isinstance(self.host_memory_gb, bool)
                and math.isfinite(self.host_memory_gb) and self.host_memory_gb >= 0):
            fail("host_memory_gb", "a finite number >= 0 or null", self.host_memory_gb,
                 "the host memory the calibration hidden states may use; 0 keeps them on disk; null: automatic")
        self.kv_cache = check_kv_cache(self.kv_cache)
        if solvers is not None:  # the recipe's registry reaches its scheme and overrides (their method names)
            for section in (self.scheme, *self.overrides):
                section.use_solvers(solvers)
        # The sections' own checks again: a field changed after construction (r.calibration.num_samples = -1).
        for section in (self.scheme, self.calibration, self.fallback, self.awq, self.rotation, self.budget,
                        self.gptaq, *self.overrides):
            section.__post_init__()
        if self.gptaq.enabled and self.budget.enabled:
            fail("gptaq.enabled", "false with a budget", True,
                 "the budget measures its candidates on the plain solve; turn gptaq or the budget off")
        if self.budget.enabled and self.scheme.preset is not None:
            fail("scheme.preset", "null (an integer base scheme) with a budget", self.scheme.preset,
                 "the budget's candidates are integer formats applied to the base scheme; give floating-point "
                 "or named schemes to modules through overrides (they are pinned, as fixed bits)")
        resolved = [("scheme", self.scheme)]
        for o in self.overrides:  # each override on this recipe's base scheme (a preset fixes some fields)
            if not o.skip:
                try:
                    resolved.append((f"overrides[{o.pattern!r}].scheme", self.scheme.replace(**o.scheme)))
                except ValueError as exc:
                    raise ValueError(f"overrides[{o.pattern!r}].scheme.{exc} (the base scheme is "
                                     f"{self.scheme.preset or self.scheme.format.label()})") from None
        for where, sc in resolved:
            if not sc.solver.supports(sc.format):
                names = [s.name for s in sc.solver_registry() if s.supports(sc.format)]
                fail(f"{where}.method", f"a method that solves {sc.format.label()} weights ({', '.join(names)})",
                     sc.method)
            if self.awq.enabled and not isinstance(sc.format, IntFormat):  # AWQ searches with the int quantizer
                fail("awq.enabled", f"false with the {sc.preset} scheme of {where} (AWQ searches integer formats)",
                     True, "turn awq off, or use an integer scheme")
        return self

    def validated(self, solvers: Any = None) -> "Recipe":
        """A validated deep copy (:meth:`validate`): what a run uses, unaffected by later changes to ``self``.
        ``solvers``: the registry to validate the methods against (default: the recipe's own)."""
        out = copy.deepcopy(self)
        if solvers is not None:
            out._solvers = solvers
        return out.validate()

    def solver_registry(self):
        """The registry the schemes' methods are looked up in (:meth:`QuantScheme.solver_registry`)."""
        return self.scheme.solver_registry()

    # ------------------------------------------------------------------ resolution
    def is_ignored(self, module_name: str) -> bool:
        """Whether ``module_name`` matches an ``ignore`` pattern."""
        return any(match_pattern(p, module_name) for p in self.ignore)

    def matching_override(self, module_name: str) -> Optional[Override]:
        """The last override whose pattern matches ``module_name``, or None."""
        for o in reversed(self.overrides):
            if o.matches(module_name):
                return o
        return None

    def resolve(self, module_name: str) -> Optional[QuantScheme]:
        """The scheme of a module, or None when it stays in high precision (ignored or a skip override)."""
        if self.is_ignored(module_name):
            return None
        o = self.matching_override(module_name)
        if o is None:
            return self.scheme
        return None if o.skip else self.scheme.replace(**o.scheme)

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict:
        """Plain JSON/YAML-able dict (``from_dict(to_dict())`` reproduces the recipe)."""
        return {"version": self.version, "scheme": self.scheme.to_dict(), "ignore": list(self.ignore),
                "overrides": [o.to_dict() for o in self.overrides], "calibration": self.calibration.to_dict(),
                "fallback": self.fallback.to_dict(), "awq": self.awq.to_dict(), "hessian_dtype": self.hessian_dtype,
                "hessian_precision": self.hessian_precision,
                "routing_weighted": self.routing_weighted, "device": self.device,
                "solver_memory_gb": self.solver_memory_gb, "report_loss": self.report_loss,
                "rotation": self.rotation.to_dict(), "device_memory_gb": self.device_memory_gb,
                "experts_per_group": self.experts_per_group, "budget": self.budget.to_dict(),
                "host_memory_gb": self.host_memory_gb, "kv_cache": self.kv_cache, "gptaq": self.gptaq.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, solvers: Any = None) -> "Recipe":
        """Builds a recipe from a dict; missing keys take their defaults, unknown keys are an error. ``solvers``:
        the registry of the schemes' methods (default: the built-in solvers)."""
        return cls(**check_keys(cls, data, "recipe"), solvers=solvers)

    @classmethod
    def load(cls, path: str | os.PathLike, solvers: Any = None) -> "Recipe":
        """Reads a ``.json``, ``.yaml`` or ``.yml`` recipe file (``solvers``: as :meth:`from_dict`)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe file {p} not found; pass an existing .yaml/.yml/.json file")
        fmt, text = _format_of(p), p.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if fmt == "json" else _yaml().safe_load(text)
        except Exception as exc:  # json.JSONDecodeError / yaml.YAMLError
            raise ValueError(f"recipe file {p}: not valid {fmt.upper()} ({exc})") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"recipe file {p}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            return cls.from_dict(data, solvers)
        except ValueError as exc:
            raise ValueError(f"recipe file {p}: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Writes the recipe as JSON or YAML, chosen by the suffix of ``path``."""
        p = Path(path)
        text = json.dumps(self.to_dict(), indent=2) + "\n" if _format_of(p) == "json" else \
            _yaml().safe_dump(self.to_dict(), sort_keys=False)
        p.write_text(text, encoding="utf-8")

    # ------------------------------------------------------------------ CLI flags
    @classmethod
    def from_cli(cls, base: "Recipe | str | os.PathLike | None" = None, *, bits: Optional[int] = None,
                 group_size: Optional[int] = None, symmetric: Optional[bool] = None, method: Optional[str] = None,
                 calib: Optional[list] = None, num_samples: Optional[int] = None, seq_len: Optional[int] = None,
                 device: Optional[str] = None, device_memory_gb: Optional[float] = None,
                 host_memory_gb: Optional[float] = None, scheme: Optional[str] = None,
                 budget: Optional[str] = None, kv_cache: Optional[str] = None) -> "Recipe":
        """A copy of ``base`` (a Recipe, a recipe file, or None for the defaults) with CLI flag values applied.

        A flag left at None was not given and keeps the recipe's value; a given flag overrides the file.
        ``scheme`` (a preset name, ``--scheme NVFP4``) replaces the base scheme's preset first (as an override's
        ``{preset: ...}`` would: the fields it fixes come from it); then ``bits``/``group_size``/``symmetric``/
        ``method`` change the *base* scheme (overrides still apply on top).
        ``calib`` replaces both calibration file lists: ``*.jsonl`` paths go to ``jsonl_files``, others to
        ``text_files``. ``budget``: ``--budget``, bits per weight (``"3.5"``) or a checkpoint size (``"12GB"``):
        sets ``budget.bits`` or ``budget.size_gb`` (and clears the other).
        """
        base = base if isinstance(base, Recipe) else cls() if base is None else cls.load(base)
        data = base.to_dict()
        if scheme is not None:
            data["scheme"] = base.scheme.replace(preset=scheme).to_dict()
        for key, val in (("bits", bits), ("group_size", group_size), ("symmetric", symmetric), ("method", method)):
            if val is not None:
                data["scheme"][key] = val
        cal = data["calibration"]
        if calib is not None:
            calib = str_list("--calib", calib)
            cal["jsonl_files"] = [c for c in calib if c.endswith(".jsonl")]
            cal["text_files"] = [c for c in calib if not c.endswith(".jsonl")]
        for key, val in (("num_samples", num_samples), ("seq_len", seq_len)):
            if val is not None:
                cal[key] = val
        if device is not None:
            data["device"] = device
        if device_memory_gb is not None:
            data["device_memory_gb"] = device_memory_gb
        if budget is not None:
            data["budget"].update({"bits": None, "size_gb": None, **parse_budget(budget)})
        if host_memory_gb is not None:
            data["host_memory_gb"] = host_memory_gb
        if kv_cache is not None:  # "none" turns a recipe file's off
            data["kv_cache"] = None if kv_cache == "none" else kv_cache
        return cls.from_dict(data)


def _yaml():
    import yaml  # imported lazily: only YAML recipes need it

    return yaml


def _format_of(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValueError(f"recipe file {p}: expected a .json, .yaml or .yml suffix, got {suffix or 'none'!r}")
