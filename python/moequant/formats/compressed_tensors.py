"""The compressed-tensors encoding of :class:`~moequant.formats.IntFormat`: the ``pack-quantized`` tensors of one
quantized Linear (:func:`compressed_tensor_names`) and the ``quantization_config`` block of ``config.json``
(:func:`quantization_config_block`, parsed back by :func:`config_formats`). docs/formats.md and docs/export.md
restate both. A new format (FP8, NVFP4, MXFP4) gets its definition next to :mod:`moequant.formats.integer` and its
encoding here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .integer import IntFormat

__all__ = ["PACK_QUANTIZED", "WeightsConfig", "as_format", "compressed_tensor_names", "weights_args",
           "quantization_config_block", "config_formats", "OBSERVERS", "ACTORDERS"]

logger = logging.getLogger(__name__)

PACK_QUANTIZED = "pack-quantized"
OBSERVERS = ("minmax", "mse")
ACTORDERS = (None, "weight")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def as_format(obj: Any) -> IntFormat:
    """The :class:`IntFormat` of ``obj``: a format itself, anything with a ``format`` (a ``QuantScheme``, a
    ``QuantizedTensor``), or an object / mapping with ``bits``, ``group_size`` (<= 0 or None: per-channel) and
    ``symmetric``, validated."""
    if isinstance(obj, IntFormat):
        return obj
    fmt = _get(obj, "format")
    if isinstance(fmt, IntFormat):
        return fmt
    return IntFormat.from_key((_get(obj, "bits"), _get(obj, "group_size"), _get(obj, "symmetric")))


@dataclass(frozen=True)
class WeightsConfig:
    """The ``weights`` of one config group: the format, how the scales were chosen (``observer``: ``"minmax"`` or
    ``"mse"``) and whether GPTQ processed the columns in activation order with static groups (``actorder``:
    ``"weight"``, no ``g_idx``; None: in their order)."""

    format: IntFormat
    observer: str = "minmax"
    actorder: Optional[str] = None

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer: expected one of {OBSERVERS}, got {self.observer!r}")
        if self.actorder not in ACTORDERS:
            raise ValueError(f"actorder: expected one of {ACTORDERS}, got {self.actorder!r}")

    @classmethod
    def of(cls, obj: Any) -> "WeightsConfig":
        """``obj`` itself, or the format (:func:`as_format`) and optional ``observer`` / ``actorder`` of a scheme."""
        if isinstance(obj, WeightsConfig):
            return obj
        return cls(as_format(obj), _get(obj, "observer", "minmax"), _get(obj, "actorder", None))


def weights_args(w: WeightsConfig) -> dict:
    """compressed-tensors' ``weights`` arguments of a config group (``type`` from the format)."""
    fmt = w.format
    return {
        "num_bits": fmt.bits, "type": fmt.type, "symmetric": fmt.symmetric,
        "strategy": "channel" if fmt.per_channel else "group",
        "group_size": None if fmt.per_channel else fmt.group_size,
        "dynamic": False, "actorder": w.actorder, "observer": w.observer,
    }  # fmt: skip


def compressed_tensor_names(prefix: str, qt: Any, weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one quantized Linear.

    Args:
        prefix: on-disk module name, e.g. ``"model.layers.0.mlp.experts.3.gate_proj"``.
        qt: quantized tensor (a :class:`moequant.ops.QuantizedTensor`, or anything with ``codes`` int8 [out, in],
            ``scale`` [out, G], ``zero_point`` [out, G] and a format, :func:`as_format`).
        weight_dtype: the checkpoint's weight dtype; the scales are stored in it and must be exactly representable
            (quantize with the scale dtype set to the checkpoint dtype).

    Returns (insertion-ordered):
        ``<prefix>.weight_packed`` int32 [out, ceil(in*bits/32)] (packed along the input dim, LSB first, +2^(b-1));
        ``<prefix>.weight_scale`` weight_dtype [out, G] (G = 1 for per-channel);
        ``<prefix>.weight_shape`` int64 [2] = [out, in];
        ``<prefix>.weight_zero_point`` int32 [ceil(out*bits/32), G] (packed along the output dim), asymmetric only.
    """
    from moequant import ops  # the native extension; imported lazily so this module imports without it

    codes = qt.codes
    if codes.dim() != 2 or codes.dtype != torch.int8:
        raise ValueError(f"{prefix}: codes: expected int8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    fmt = as_format(qt)
    bits, gs, sym = fmt.key
    groups = in_f // gs if 0 < gs < in_f else 1
    if 0 < gs < in_f and in_f % gs:
        raise ValueError(f"{prefix}: group_size: expected a divisor of in_features={in_f}, got {gs}")
    if tuple(qt.scale.shape) != (out_f, groups):
        raise ValueError(f"{prefix}: scale: expected shape {(out_f, groups)}, got {tuple(qt.scale.shape)}")
    scale = qt.scale.detach().to("cpu", weight_dtype)
    if not torch.equal(scale.float(), qt.scale.detach().to("cpu", torch.float32)):
        raise ValueError(
            f"{prefix}: scales are not exactly representable in {weight_dtype}; quantize with the scale dtype set "
            "to the checkpoint's weight dtype so that loaders dequantize to exactly the optimized weights"
        )
    packed = ops.pack_int32(codes.detach().cpu(), bits)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out_f, math.ceil(in_f * bits / 32)):
        raise RuntimeError(f"{prefix}: ops.pack_int32 returned {packed.dtype} {tuple(packed.shape)}")
    result = {
        f"{prefix}.weight_packed": packed,
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    zp = qt.zero_point
    if sym:
        if zp is not None and bool((zp != 0).any()):
            raise ValueError(f"{prefix}: symmetric quantization with non-zero zero points")
    else:
        if zp is None or tuple(zp.shape) != (out_f, groups):
            raise ValueError(f"{prefix}: zero_point: expected int8 [{out_f}, {groups}] for an asymmetric scheme")
        zpp = ops.pack_zero_points(zp.detach().cpu().to(torch.int8), bits)
        if zpp.dtype != torch.int32 or tuple(zpp.shape) != (math.ceil(out_f * bits / 32), groups):
            raise RuntimeError(f"{prefix}: ops.pack_zero_points returned {zpp.dtype} {tuple(zpp.shape)}")
        result[f"{prefix}.weight_zero_point"] = zpp
    return result


def quantization_config_block(groups: Sequence[tuple[Sequence[str], Any]], ignore: Sequence[str]) -> dict:
    """The portable compressed-tensors ``quantization_config`` (reference §1.2, parses on CT 0.11 .. 0.20).

    Args:
        groups: ``(targets, weights)`` pairs; ``weights`` is a :class:`WeightsConfig`, or a scheme it is made of
            (:meth:`WeightsConfig.of`: a format, optionally with ``observer`` and ``actorder``, as attributes or
            mapping keys). Targets are class names (``"Linear"``) or ``"re:"`` regexes over on-disk module names.
            Pairs with the same weights are merged into one group, in the order of their first pair. With several
            schemes put the routed experts' group first (transformers dequantizes every expert with the first group
            that targets a class name, unless a ``re:`` target mentions ``experts``) and keep ``"Linear"`` as a
            target (vLLM's MoE needs it).
        ignore: module names or ``re:`` patterns left unquantized (``lm_head``, routers ...).
    Returns:
        a JSON-able dict for ``config.json["quantization_config"]``.
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
            "targets": list(targets), "format": PACK_QUANTIZED, "weights": weights_args(w),
            "input_activations": None, "output_activations": None,
        }  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def config_formats(quantization_config: Mapping) -> list[tuple[str, list[str], IntFormat]]:
    """``(group name, targets, format)`` of every config group of a ``quantization_config``, in file order. A
    group whose weights are not integers raises ValueError (moequant writes and reads integer formats only)."""
    out = []
    for name, group in (quantization_config.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type", IntFormat.type) != IntFormat.type:
            raise ValueError(f"quantization_config: group {name!r} has weights of type {w.get('type')!r}; moequant "
                             "reads integer (pack-quantized) checkpoints")
        out.append((name, list(group.get("targets") or []),
                    IntFormat.from_key((w.get("num_bits", 8), w.get("group_size"), w.get("symmetric", True)))))
    return out
