"""Export of quantized MoE checkpoints that vLLM and transformers load as they are.

Two modes:

* ``"pack-quantized"`` -- a compressed-tensors checkpoint (the mode keeps the name of its first format): each
  quantized Linear ``<prefix>`` is written in the format of its config group -- ``pack-quantized`` for the
  integer weight-only schemes (``weight_packed`` / ``weight_scale`` / ``weight_shape`` + ``weight_zero_point``
  when asymmetric), ``int-quantized`` (W8A8), ``float-quantized`` (FP8, FP8_BLOCK), ``nvfp4-pack-quantized``,
  ``mxfp4-pack-quantized`` (:func:`moequant.formats.compressed_tensor_names`) -- and ``config.json`` gets a
  ``quantization_config`` block (:func:`moequant.formats.quantization_config_block`);
* ``"dequantized"`` -- ``<prefix>.weight`` = the fake-quantized weight in the original dtype, a plain checkpoint
  that any loader reads (no ``quantization_config``).

The source checkpoint is streamed tensor by tensor and results can be handed over layer by layer (an iterable
of `Replacements`), so neither the model nor all results need to be in memory. docs/export.md restates the format.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

import torch

from ..formats import PACK_QUANTIZED, as_format, compressed_tensor_names, config_groups, group_of
from .safetensors import CheckpointReader
from .writer import DEFAULT_MAX_SHARD_BYTES, CheckpointWriter, copy_side_files, write_extra_files

__all__ = ["Replacements", "export_checkpoint", "EXPORT_MODES", "EXPERT_MODULE_RE"]

logger = logging.getLogger(__name__)

EXPORT_MODES = (PACK_QUANTIZED, "dequantized")
EXPERT_MODULE_RE = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")
"""A routed expert's on-disk module name (``<...>.experts.<e>.<proj>``); group 1 is its MoE layer's experts."""


@dataclass
class Replacements:
    """One chunk of export results (typically one decoder layer).

    quantized: on-disk module prefix (e.g. ``"model.layers.0.mlp.experts.3.gate_proj"``) -> quantized tensor
        (a :class:`moequant.ops.QuantizedTensor`, or anything with ``.codes`` int8 [out, in], ``.scale`` float32
        [out, G], ``.zero_point`` int8 [out, G], a format (:func:`moequant.formats.as_format`) and ``.dequantized``
        float32 [out, in]). The source must contain ``<prefix>.weight`` with shape [out, in].
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


def _keys(formats) -> list:
    """The labels of formats (``"W4 g128 sym"``, ``"NVFP4 g16"``), sorted: for messages."""
    return sorted(f.label() for f in formats)


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
    decode_device: torch.device | str | None = None,
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
        decode_device: where the tensors of an FP8 / MXFP4 source (:mod:`moequant.io.source`) are decoded (None:
            the CPU). Such a source is exported in its bf16 view: every tensor under its runtime name, the copied
            FP8 / MXFP4 tensors decoded, their scale companions dropped, its ``quantization_config`` replaced and
            ``dtype`` / ``torch_dtype`` bfloat16.
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
        groups = config_groups(quantization_config) if mode == "pack-quantized" else None
        with CheckpointReader(source_dir, decode_device=decode_device) as src:
            if src.index.source is not None:  # read in its bf16 view, written as a bf16 checkpoint would be
                config.pop("quantization_config", None)
                if isinstance(config.get("text_config"), dict):
                    config["text_config"].pop("quantization_config", None)
                config.update({k: "bfloat16" for k in ("dtype", "torch_dtype") if k in config} or {"dtype": "bfloat16"})
            if "quantization_config" in config:
                raise ValueError(f"{source_dir} is already quantized; export from the unquantized checkpoint")
            consumed = _write_replacements(src, writer, replacements, mode, groups)
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


def _write_replacements(src: CheckpointReader, writer: CheckpointWriter, replacements: ReplacementsLike | None,
                        mode: str, groups: list | None) -> set[str]:  # fmt: skip
    """Writes every chunk's tensors (each quantized module in the compressed-tensors format of the config group
    that applies to it, :func:`moequant.formats.group_of`); returns the source tensor names they replace."""
    consumed: set[str] = set()
    added: set[str] = set()
    expert_schemes: dict = {}  # "<...>.experts" -> (first prefix, its config group)

    def claim(name: str, what: str) -> None:
        if name not in src:
            raise KeyError(f"{what}: {name!r} is not a tensor of the source checkpoint (use on-disk names)")
        if name in consumed:
            raise ValueError(f"{what}: {name!r} is replaced twice")
        consumed.add(name)

    def add_new(name: str, in_source: str, twice: str) -> None:
        """Records a tensor name the source lacks; ``in_source`` / ``twice``: the errors if it has it or if it
        was written already."""
        if name in src:
            raise ValueError(in_source)
        if name in added:
            raise ValueError(twice)
        added.add(name)

    n_chunks = 0
    for chunk in _iter_chunks(replacements):
        n_chunks += 1
        for name in chunk.removed:
            claim(name, "removed")
        for prefix, qt in chunk.quantized.items():
            wname = f"{prefix}.weight"
            if prefix in chunk.dtypes:  # a module split out of a removed fused source tensor
                add_new(wname, f"dtypes: {prefix!r} has a source weight {wname!r}; dtypes is only for modules absent "
                        f"from the source", f"quantized: {prefix!r} is written twice")
                shape, dtype = tuple(qt.codes.shape), chunk.dtypes[prefix]
            else:
                claim(wname, "quantized")
                shape, dtype = src.shape(wname), src.dtype(wname)
            if tuple(qt.codes.shape) != shape:
                raise ValueError(f"{prefix}: codes shape {tuple(qt.codes.shape)} != source weight shape {shape}")
            keys = as_format(qt).equivalents(shape[1])
            if mode == "dequantized":
                writer.add(wname, qt.dequantized.detach().to("cpu", dtype))
                continue
            group = group_of(prefix, groups)
            if group is None or group.format not in keys:
                raise ValueError(
                    f"{prefix}: scheme {_keys(keys)} is not that of its config group "
                    f"({group.name + ': ' + group.format.label() if group else 'none applies'}) in quantization_config "
                    f"(groups: {_keys({g.format for g in groups})})"
                )
            m = EXPERT_MODULE_RE.match(prefix)
            if m:  # vLLM resolves one scheme per MoE layer (from expert 0's projections)
                first, seen = expert_schemes.setdefault(m.group(1), (prefix, group))
                if seen != group:
                    raise ValueError(
                        f"{prefix} uses scheme {_keys(keys)} ({group.name}) but {first} uses {seen.format.label()} "
                        f"({seen.name}): vLLM requires one scheme for all experts' projections of a layer"
                    )
            for name, t in compressed_tensor_names(prefix, qt, dtype, group.compression, group.activations).items():
                writer.add(name, t)
        for name, t in chunk.tensors.items():
            claim(name, "tensors")
            if tuple(t.shape) != src.shape(name):
                raise ValueError(f"tensors: {name!r} has shape {tuple(t.shape)}, source has {src.shape(name)}")
            writer.add(name, t.detach().to("cpu", src.dtype(name)))
        for name, t in chunk.added.items():
            add_new(name, f"added: {name!r} is a tensor of the source checkpoint; replace it through 'tensors' "
                    f"instead", f"added: {name!r} is added twice")
            writer.add(name, t.detach().cpu())
    logger.info("exported %d replacement chunk(s), %d source tensors replaced", n_chunks, len(consumed))
    return consumed
