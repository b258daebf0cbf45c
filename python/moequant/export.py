"""Export of quantized MoE checkpoints that vLLM and transformers load as they are.

Two modes:

* ``"pack-quantized"`` -- the compressed-tensors ``pack-quantized`` format (INT W2..W8 A16, group-wise or
  per-channel, symmetric or asymmetric): each quantized Linear ``<prefix>`` loses ``<prefix>.weight`` and gains
  ``weight_packed`` / ``weight_scale`` / ``weight_shape`` (+ ``weight_zero_point`` when asymmetric), and
  ``config.json`` gets a ``quantization_config`` block (see `quantization_config_block`);
* ``"dequantized"`` -- ``<prefix>.weight`` = the fake-quantized weight in the original dtype, a plain checkpoint
  that any loader reads (no ``quantization_config``).

The source checkpoint is streamed tensor by tensor and results can be handed over layer by layer (an iterable
of `Replacements`), so neither the model nor all results need to be in memory. docs/export.md restates the format.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import torch

from moequant.checkpoint_io import (
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointWriter,
    SafetensorsSource,
    copy_side_files,
    write_extra_files,
)

__all__ = [
    "Replacements",
    "compressed_tensor_names",
    "quantization_config_block",
    "export_checkpoint",
    "EXPORT_MODES",
]

logger = logging.getLogger(__name__)

EXPORT_MODES = ("pack-quantized", "dequantized")
_FORMAT = "pack-quantized"
_EXPERT_RE = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")


@dataclass
class Replacements:
    """One chunk of export results (typically one decoder layer).

    quantized: on-disk module prefix (e.g. ``"model.layers.0.mlp.experts.3.gate_proj"``) -> quantized tensor
        (duck-typed: ``.codes`` int8 [out, in], ``.scale`` float32 [out, G], ``.zero_point`` int8 [out, G],
        ``.bits``, ``.group_size`` (<= 0 or None: per-channel), ``.symmetric``, ``.dequantized`` float32 [out, in]).
        The source must contain ``<prefix>.weight`` with shape [out, in].
    tensors: full tensor name -> tensor that overrides the source tensor of that name (e.g. a norm weight
        changed by a smoothing transform); same shape as the source, cast to the source dtype.
    added: full tensor name -> tensor absent from the source, written as given (dtype included), e.g. the
        ``lm_head.weight`` of a rotated model whose source ties it to the embeddings.
    removed: source tensor names not written: their content is in ``quantized`` / ``added`` under other names
        (e.g. GPT-OSS's fused ``mlp.experts.gate_up_proj``, written as per-expert quantized modules).
    dtypes: on-disk module prefix -> checkpoint dtype, for quantized modules that have no ``<prefix>.weight`` in
        the source (the per-expert modules of a fused source tensor listed in ``removed``).
    """

    quantized: Mapping[str, Any] = field(default_factory=dict)
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)
    removed: Sequence[str] = ()
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)


ReplacementsLike = Union[Replacements, Mapping[str, Mapping], Iterable[Union[Replacements, Mapping[str, Mapping]]]]


def _as_chunk(obj: Any) -> Replacements:
    if isinstance(obj, Replacements):
        return obj
    keys = ("quantized", "tensors", "added", "removed", "dtypes")
    if isinstance(obj, Mapping) and set(obj) <= set(keys):
        return Replacements(**{k: obj[k] for k in keys if k in obj})
    raise TypeError(
        "replacements: expected a Replacements, a dict with keys 'quantized'/'tensors'/'added'/'removed'/'dtypes', "
        "or an iterable of those; "
        f"got {type(obj).__name__}"
    )


def _iter_chunks(replacements: ReplacementsLike | None) -> Iterator[Replacements]:
    """Yields the chunks one at a time (a generator input is consumed lazily)."""
    if replacements is None:
        return
    if isinstance(replacements, (Replacements, Mapping)):
        yield _as_chunk(replacements)
        return
    for item in replacements:
        yield _as_chunk(item)


def _scheme_key(bits: int, group_size: int | None, symmetric: bool) -> tuple[int, int, bool]:
    return int(bits), (int(group_size) if group_size and group_size > 0 else -1), bool(symmetric)


def _qt_keys(qt: Any, in_features: int) -> frozenset[tuple[int, int, bool]]:
    """The config schemes a quantized tensor is stored correctly under: one group spanning the whole row
    (``group_size`` <= 0, None or == in_features) is both "channel" and "group of in_features"."""
    bits, gs, sym = _scheme_key(qt.bits, qt.group_size, qt.symmetric)
    if gs < 0 or gs >= in_features:
        return frozenset({(bits, -1, sym), (bits, in_features, sym)})
    return frozenset({(bits, gs, sym)})


def _attr(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


def compressed_tensor_names(prefix: str, qt: Any, weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors ``pack-quantized`` tensors of one quantized Linear.

    Args:
        prefix: on-disk module name, e.g. ``"model.layers.0.mlp.experts.3.gate_proj"``.
        qt: quantized tensor (see `Replacements.quantized`); codes [out, in], scale [out, G], zero_point [out, G].
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
    bits, gs, sym = _scheme_key(qt.bits, qt.group_size, qt.symmetric)
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
        groups: ``(targets, scheme)`` pairs; ``scheme`` has ``bits``, ``group_size`` (<= 0 / None: per-channel)
            and ``symmetric``, and optionally ``observer`` (how the scales were chosen: ``"minmax"``, the default,
            or ``"mse"``) and ``actorder`` (``"weight"``: GPTQ processed the columns in activation order with
            static groups, no ``g_idx``; None, the default: in their order), as attributes or mapping keys.
            Targets are class names (``"Linear"``) or ``"re:"`` regexes over on-disk module names. Pairs with the
            same scheme are merged into one group, in the order of their first pair. With several schemes put the
            routed experts' group first (transformers dequantizes every expert with the first group that targets
            a class name, unless a ``re:`` target mentions ``experts``) and keep ``"Linear"`` as a target (vLLM's
            MoE needs it).
        ignore: module names or ``re:`` patterns left unquantized (``lm_head``, routers ...).
    Returns:
        a JSON-able dict for ``config.json["quantization_config"]``.
    """
    merged: dict[tuple, list[str]] = {}
    for targets, scheme in groups:
        if isinstance(targets, str):
            raise TypeError(f"targets: expected a list of strings, got the string {targets!r}")
        key = _scheme_key(_attr(scheme, "bits"), _attr(scheme, "group_size"), _attr(scheme, "symmetric"))
        if not 1 <= key[0] <= 8:
            raise ValueError(f"bits: pack-quantized supports 1..8 bits, got {key[0]}")
        observer, actorder = _optional(scheme, "observer", "minmax"), _optional(scheme, "actorder", None)
        if observer not in _OBSERVERS:
            raise ValueError(f"observer: expected one of {_OBSERVERS}, got {observer!r}")
        if actorder not in _ACTORDERS:
            raise ValueError(f"actorder: expected one of {_ACTORDERS}, got {actorder!r}")
        key = (*key, observer, actorder)
        merged.setdefault(key, [])
        merged[key] += [t for t in targets if t not in merged[key]]
    if not merged:
        raise ValueError("groups: expected at least one (targets, scheme) pair")
    if not any(t == "Linear" for ts in merged.values() for t in ts):
        logger.warning("no config group targets 'Linear': vLLM's MoE loader requires one (llm-compressor #2163)")
    config_groups = {}
    for i, ((bits, gs, sym, observer, actorder), targets) in enumerate(merged.items()):
        weights = {
            "num_bits": bits, "type": "int", "symmetric": sym,
            "strategy": "group" if gs > 0 else "channel", "group_size": gs if gs > 0 else None,
            "dynamic": False, "actorder": actorder, "observer": observer,
        }  # fmt: skip
        config_groups[f"group_{i}"] = {
            "targets": list(targets), "format": _FORMAT, "weights": weights,
            "input_activations": None, "output_activations": None,
        }  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": _FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


_OBSERVERS = ("minmax", "mse")
_ACTORDERS = (None, "weight")


def _optional(scheme: Any, name: str, default: Any) -> Any:
    if isinstance(scheme, Mapping):
        return scheme.get(name, default)
    return getattr(scheme, name, default)


def _config_schemes(quantization_config: Mapping) -> set[tuple[int, int, bool]]:
    out = set()
    for group in quantization_config.get("config_groups", {}).values():
        w = group.get("weights") or {}
        out.add(_scheme_key(w.get("num_bits", 8), w.get("group_size"), w.get("symmetric", True)))
    return out


def export_checkpoint(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    replacements: ReplacementsLike | None,
    quantization_config: Mapping | None,
    mode: str = "pack-quantized",
    extra_files: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    metadata: Mapping[str, Any] | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `out_dir` = the source checkpoint with the replacements applied, atomically.

    Args:
        source_dir: Hugging Face checkpoint (config.json + safetensors, single file or sharded).
        out_dir: must not exist (FileExistsError before anything is written).
        replacements: a `Replacements`, a dict ``{"quantized": ..., "tensors": ...}``, or an iterable (e.g. a
            generator reading per-layer result files) of those; consumed one chunk at a time.
        quantization_config: the block of `quantization_config_block` (required for ``"pack-quantized"``;
            ignored for ``"dequantized"``).
        mode: ``"pack-quantized"`` or ``"dequantized"``.
        extra_files: ``{filename: JSON-able object | pathlib.Path to copy | str text}`` added to the checkpoint.
        max_shard_bytes: shard size limit.
        metadata: JSON-able dict stored in config.json under ``"moequant"`` (with ``export_mode``).
        config_overrides: top-level config.json keys set to these values (e.g. ``{"tie_word_embeddings": False}``
            when a chunk adds an untied ``lm_head.weight``).
    Returns:
        the committed output directory.
    """
    if mode not in EXPORT_MODES:
        raise ValueError(f"mode: expected one of {EXPORT_MODES}, got {mode!r}")
    if mode == "pack-quantized" and not quantization_config:
        raise ValueError("quantization_config: required for mode 'pack-quantized' (see quantization_config_block)")
    source_dir = Path(source_dir)
    with CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes) as writer:
        config_path = source_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found; source_dir must be a Hugging Face checkpoint")
        with open(config_path) as f:
            config = json.load(f)
        if "quantization_config" in config:
            raise ValueError(f"{source_dir} is already quantized; export from the unquantized checkpoint")
        allowed = _config_schemes(quantization_config) if mode == "pack-quantized" else None
        with SafetensorsSource(source_dir) as src:
            consumed = _write_replacements(src, writer, replacements, mode, allowed)
            for name in src.names():
                if name not in consumed:
                    writer.add(name, src.get(name))
        if mode == "pack-quantized":
            config["quantization_config"] = dict(quantization_config)
        config["moequant"] = {"export_mode": mode, **(metadata or {})}
        config.update(config_overrides or {})
        writer.write_json("config.json", config)
        copied = copy_side_files(source_dir, writer)
        logger.debug("copied %s", copied)
        write_extra_files(writer, extra_files)
    return Path(out_dir)


def _write_replacements(src: SafetensorsSource, writer: CheckpointWriter, replacements: ReplacementsLike | None,
                        mode: str, allowed: set | None) -> set[str]:  # fmt: skip
    """Writes every chunk's tensors; returns the source tensor names they replace."""
    consumed: set[str] = set()
    added: set[str] = set()
    expert_schemes: dict[str, tuple[str, frozenset]] = {}  # "<...>.experts" -> (first prefix, compatible schemes)

    def claim(name: str, what: str) -> None:
        if name not in src:
            raise KeyError(f"{what}: {name!r} is not a tensor of the source checkpoint (use on-disk names)")
        if name in consumed:
            raise ValueError(f"{what}: {name!r} is replaced twice")
        consumed.add(name)

    n_chunks = 0
    for chunk in _iter_chunks(replacements):
        n_chunks += 1
        for name in chunk.removed:
            claim(name, "removed")
        for prefix, qt in chunk.quantized.items():
            wname = f"{prefix}.weight"
            if prefix in chunk.dtypes:  # a module split out of a removed fused source tensor
                if wname in src:
                    raise ValueError(f"dtypes: {prefix!r} has a source weight {wname!r}; dtypes is only for modules "
                                     f"absent from the source")
                if wname in added:
                    raise ValueError(f"quantized: {prefix!r} is written twice")
                added.add(wname)
                shape, dtype = tuple(qt.codes.shape), chunk.dtypes[prefix]
            else:
                claim(wname, "quantized")
                shape, dtype = src.shape(wname), src.dtype(wname)
            if tuple(qt.codes.shape) != shape:
                raise ValueError(f"{prefix}: codes shape {tuple(qt.codes.shape)} != source weight shape {shape}")
            keys = _qt_keys(qt, shape[1])
            m = _EXPERT_RE.match(prefix) if mode == "pack-quantized" else None
            if m:  # vLLM resolves one scheme per MoE layer (from expert 0's projections)
                first, seen = expert_schemes.setdefault(m.group(1), (prefix, keys))
                if not keys & seen:
                    raise ValueError(
                        f"{prefix} uses scheme (bits, group_size, symmetric) {sorted(keys)} but {first} uses "
                        f"{sorted(seen)}: vLLM requires one scheme for all experts' projections of a layer"
                    )
                expert_schemes[m.group(1)] = (first, keys & seen)
            if mode == "dequantized":
                writer.add(wname, qt.dequantized.detach().to("cpu", dtype))
                continue
            if not keys & allowed:
                raise ValueError(
                    f"{prefix}: scheme (bits, group_size, symmetric) {sorted(keys)} matches no config group of "
                    f"quantization_config {sorted(allowed)}"
                )
            for name, t in compressed_tensor_names(prefix, qt, dtype).items():
                writer.add(name, t)
        for name, t in chunk.tensors.items():
            claim(name, "tensors")
            if tuple(t.shape) != src.shape(name):
                raise ValueError(f"tensors: {name!r} has shape {tuple(t.shape)}, source has {src.shape(name)}")
            writer.add(name, t.detach().to("cpu", src.dtype(name)))
        for name, t in chunk.added.items():
            if name in src:
                raise ValueError(f"added: {name!r} is a tensor of the source checkpoint; replace it through "
                                 f"'tensors' instead")
            if name in added:
                raise ValueError(f"added: {name!r} is added twice")
            added.add(name)
            writer.add(name, t.detach().cpu())
    logger.info("exported %d replacement chunk(s), %d source tensors replaced", n_chunks, len(consumed))
    return consumed
