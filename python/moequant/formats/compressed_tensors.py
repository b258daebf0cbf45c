"""The compressed-tensors ``quantization_config`` block of ``config.json``: one config group per distinct scheme
(:class:`WeightsConfig`: the weight format, how the solver chose the scales, the input-activation format), each
with its compressed-tensors ``format`` (``pack-quantized``, ``int-quantized``, ``float-quantized``,
``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``, ``mxfp6-pack-quantized``, ``mxfp8-quantized``; the top-level ``format`` is that format, or
``mixed-precision`` when the groups differ), written by :func:`quantization_config_block` and parsed back by
:func:`config_groups`. The tensors of one quantized Linear are in :mod:`moequant.formats.tensors`. docs/export.md
restates both.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from .activations import ACTIVATION_KINDS, ActivationFormat
from .floating import FloatFormat
from .integer import IntFormat
from .kv_cache import kv_cache_scheme_args
from .schemes import MIXED_PRECISION, PACK_QUANTIZED, WeightFormat, compression_format

__all__ = ["PACK_QUANTIZED", "MIXED_PRECISION", "WeightsConfig", "as_format", "weights_args",
           "quantization_config_block", "ConfigGroup", "config_groups", "config_formats", "group_of", "OBSERVERS",
           "ACTORDERS"]

logger = logging.getLogger(__name__)

OBSERVERS = ("minmax", "mse")
ACTORDERS = (None, "weight")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def as_format(obj: Any) -> WeightFormat:
    """The weight format of ``obj``: a format itself (:class:`IntFormat` / :class:`FloatFormat`), anything with a
    ``format`` (a ``QuantScheme``, a quantized tensor), or an object / mapping with ``bits``, ``group_size`` (<= 0 or
    None: per-channel) and ``symmetric`` (an integer format), validated."""
    if isinstance(obj, (IntFormat, FloatFormat)):
        return obj
    fmt = _get(obj, "format")
    if isinstance(fmt, (IntFormat, FloatFormat)):
        return fmt
    return IntFormat.from_key((_get(obj, "bits"), _get(obj, "group_size"), _get(obj, "symmetric")))


@dataclass(frozen=True)
class WeightsConfig:
    """One config group's scheme: the weight ``format``, how the scales were chosen (``observer``: ``"minmax"`` or
    ``"mse"``), whether GPTQ processed the columns in activation order with static groups (``actorder``:
    ``"weight"``, no ``g_idx``; None: in their order) and the runtime's input quantization (``activations``, None
    for weight-only schemes)."""

    format: WeightFormat
    observer: str = "minmax"
    actorder: Optional[str] = None
    activations: Optional[ActivationFormat] = None

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer: expected one of {OBSERVERS}, got {self.observer!r}")
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder: expected one of {ACTORDERS}, got {self.actorder!r}")
        if self.activations is not None and not isinstance(self.activations, ActivationFormat):
            raise ValueError(f"activations: expected an ActivationFormat or None, got {self.activations!r}")
        self.compression  # a weight / activation pair no loader reads is an error here

    @property
    def compression(self) -> str:
        """The group's compressed-tensors format (:func:`moequant.formats.compression_format`)."""
        return compression_format(self.format, self.activations)

    @classmethod
    def of(cls, obj: Any) -> "WeightsConfig":
        """``obj`` itself, or the format (:func:`as_format`) and optional ``observer`` / ``actorder`` /
        ``activations`` of a scheme."""
        if isinstance(obj, WeightsConfig):
            return obj
        return cls(as_format(obj), _get(obj, "observer", "minmax"), _get(obj, "actorder", None),
                   _get(obj, "activations", None))


def weights_args(w: WeightsConfig) -> dict:
    """compressed-tensors' ``weights`` arguments of a config group (``type`` from the format; no ``scale_dtype``:
    compressed-tensors 0.11 / 0.12 reject it, and its default is the one each format stores; except for MXFP6 /
    MXFP8, formats of compressed-tensors 0.20, whose MXFP8 compressor takes only ``scale_dtype`` uint8)."""
    fmt = w.format
    out = {"num_bits": fmt.bits, "type": fmt.type, "symmetric": fmt.symmetric}
    if isinstance(fmt, FloatFormat) and fmt.is_block:
        out.update(strategy="block", group_size=None, block_structure=list(fmt.block))
    elif isinstance(fmt, FloatFormat) and fmt.kind == "nvfp4":
        out.update(strategy="tensor_group", group_size=fmt.group_size)
    else:
        out.update(strategy="channel" if fmt.per_channel else "group",
                   group_size=None if fmt.per_channel else fmt.group_size)
    out.update(dynamic=False, actorder=w.actorder, observer=w.observer)
    if isinstance(fmt, FloatFormat) and fmt.kind in ("mxfp6", "mxfp8"):
        out["scale_dtype"] = "torch.uint8"  # E8M0 bytes
    return out


def quantization_config_block(groups: Sequence[tuple[Sequence[str], Any]], ignore: Sequence[str],
                              kv_cache: Optional[str] = None) -> dict:
    """The portable compressed-tensors ``quantization_config`` (reference §1.2, parses on CT 0.11 .. 0.20).

    Args:
        groups: ``(targets, weights)`` pairs; ``weights`` is a :class:`WeightsConfig`, or a scheme it is made of
            (:meth:`WeightsConfig.of`: a format, optionally with ``observer``, ``actorder`` and ``activations``, as
            attributes or mapping keys). Targets are class names (``"Linear"``) or ``"re:"`` regexes over on-disk
            module names, or exact module names. Pairs with the same weights are merged into one group, in the
            order of their first pair. With several schemes put the routed experts' group first (transformers
            dequantizes every expert with the first group that targets a class name, unless a ``re:`` target
            mentions ``experts``) and keep ``"Linear"`` as a target (vLLM's MoE needs it).
        ignore: module names or ``re:`` patterns left unquantized (``lm_head``, routers ...).
        kv_cache: ``"fp8"``: the ``kv_cache_scheme`` of an FP8 KV cache with per-tensor scales
            (:func:`moequant.formats.kv_cache.kv_cache_scheme_args`); None: ``kv_cache_scheme`` null.
    Returns:
        a JSON-able dict for ``config.json["quantization_config"]``: each group has its ``format``; the top-level
        ``format`` is the groups' common one, else ``"mixed-precision"``.
    """
    merged: dict[WeightsConfig, list[str]] = {}
    for targets, scheme in groups:
        if isinstance(targets, str):
            raise TypeError(f"targets: expected a list of strings, got the string {targets!r}")
        key = WeightsConfig.of(scheme)
        merged.setdefault(key, [])
        merged[key] += [t for t in targets if t not in merged[key]]
    if not merged:
        raise ValueError("groups: expected at least one (targets, scheme) pair")
    if not any(t == "Linear" for ts in merged.values() for t in ts):
        logger.warning("no config group targets 'Linear': vLLM's MoE loader requires one (llm-compressor #2163)")
    config_groups = {}
    for i, (w, targets) in enumerate(merged.items()):
        config_groups[f"group_{i}"] = {
            "targets": list(targets), "format": w.compression, "weights": weights_args(w),
            "input_activations": w.activations.args() if w.activations is not None else None,
            "output_activations": None,
        }  # fmt: skip
    formats = {g["format"] for g in config_groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED_PRECISION,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": kv_cache_scheme_args(kv_cache),
    }


# ------------------------------------------------------------------------------------------ reading a config back
@dataclass(frozen=True)
class ConfigGroup:
    """A parsed config group: its name, targets, weight format, input-activation format (None: weight-only) and
    compressed-tensors format."""

    name: str
    targets: tuple
    format: WeightFormat
    activations: Optional[ActivationFormat]
    compression: str


def _weight_format(name: str, w: Mapping) -> WeightFormat:
    typ, bits, strategy, gs = w.get("type", "int"), w.get("num_bits", 8), w.get("strategy"), w.get("group_size")
    if typ == IntFormat.type:
        return IntFormat.from_key((bits, gs, w.get("symmetric", True)))
    if typ == FloatFormat.type:
        if bits == 8 and strategy == "channel":
            return FloatFormat("fp8")
        if bits == 8 and strategy == "block" and list(w.get("block_structure") or []) == list(FloatFormat.block):
            return FloatFormat("fp8_block")
        if bits == 4 and gs == 16 and strategy in ("tensor_group", None):
            return FloatFormat("nvfp4")
        if bits == 4 and gs == 32 and strategy in ("group", None):
            return FloatFormat("mxfp4")
        if bits == 6 and gs == 32 and strategy in ("group", None):
            return FloatFormat("mxfp6")
        if bits == 8 and gs == 32 and strategy in ("group", None) and str(w.get("scale_dtype")) in ("torch.uint8",
                                                                                                     "uint8"):
            return FloatFormat("mxfp8")
    raise ValueError(f"quantization_config: group {name!r} has weights moequant does not read ({typ}, {bits} bits, "
                     f"strategy {strategy!r}, group_size {gs!r}); moequant reads the formats it writes "
                     "(docs/export.md)")


def _activation_format(name: str, a: Optional[Mapping]) -> Optional[ActivationFormat]:
    if not a:
        return None
    for kind in ACTIVATION_KINDS:
        want = ActivationFormat(kind).args()
        if all(a.get(k, None) == v for k, v in want.items() if k != "observer"):
            return ActivationFormat(kind)
    raise ValueError(f"quantization_config: group {name!r} has input_activations moequant does not read ({dict(a)})")


def config_groups(quantization_config: Mapping) -> list[ConfigGroup]:
    """Every config group of a ``quantization_config`` moequant wrote, in file order (a group with formats moequant
    does not write raises ValueError)."""
    out = []
    top = quantization_config.get("format", PACK_QUANTIZED)
    for name, group in (quantization_config.get("config_groups") or {}).items():
        fmt = _weight_format(name, group.get("weights") or {})
        act = _activation_format(name, group.get("input_activations"))
        out.append(ConfigGroup(name, tuple(group.get("targets") or ()), fmt, act, group.get("format") or top))
    return out


def config_formats(quantization_config: Mapping) -> list[tuple[str, list[str], WeightFormat]]:
    """``(group name, targets, weight format)`` of every config group (:func:`config_groups`), in file order."""
    return [(g.name, list(g.targets), g.format) for g in config_groups(quantization_config)]


def group_of(module: str, groups: Sequence) -> Optional[Any]:
    """The config group compressed-tensors (and vLLM) apply to ``module``: a group naming it exactly or by a ``re:``
    target first, else a group targeting a class (``"Linear"``); None when none does. ``groups``:
    :class:`ConfigGroup` s (or anything with ``targets``)."""
    for g in groups:
        for t in g.targets:
            if t == module or (t.startswith("re:") and re.match(t[3:], module)):
                return g
    for g in groups:
        if any(not t.startswith("re:") and "." not in t for t in g.targets):
            return g
    return None
