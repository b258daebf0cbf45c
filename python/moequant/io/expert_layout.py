"""Where a MoE layer's routed experts go in the exported checkpoint: a pure planning step between the work
directory's per-layer results and :func:`moequant.io.export.export_checkpoint`.

Loaders disagree about MoE checkpoints, so the layout depends on the family and on whether the layer's experts
are quantized (a layer's experts are all quantized or all high precision; the preflight refuses anything else):

======================  ==================  ==========================================================================
routed experts          experts on disk     written as
======================  ==================  ==========================================================================
quantized               per expert          per-expert compressed-tensors modules under the source names (unchanged)
quantized               fused (GPT-OSS,     the fused source tensors are removed; per-expert modules under the
                        GraniteMoE)         family's per-expert names (llm-compressor's linearized names, the ones
                                            vLLM loads); GPT-OSS's biases are split per expert
quantized, dequantized  fused               the fused source tensors, holding the dequantized weights
export
high precision in a     per expert          transformers' fused runtime tensors (``mlp.experts.gate_up_proj`` /
pack-quantized export                       ``down_proj``): transformers' compressed-tensors loader dequantizes every
                                            per-expert tensor of a quantized checkpoint and fails on plain weights
high precision          fused               the source tensors (or a transform's changed versions), unchanged
======================  ==================  ==========================================================================
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.base import ExpertTensors, MoEFamily, fuse_experts, gate_up_slices
from .export import Replacements

__all__ = ["FUSED_LEAVES", "layer_replacements", "fused_disk_names"]

FUSED_LEAVES = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def fused_disk_names(family: MoEFamily, prefix: str) -> dict[str, str]:
    """On-disk name of every fused runtime expert tensor of layer ``prefix`` (for families that store them fused:
    GPT-OSS ``mlp.experts.gate_up_proj``, GraniteMoE ``block_sparse_moe.input_linear.weight``)."""
    return {leaf: family.disk_name(f"{prefix}.{family.experts}.{leaf}") for leaf in FUSED_LEAVES}


def _get(name: str, chunk: Replacements, source) -> Optional[torch.Tensor]:
    """The layer's current version of a source tensor: a transform's replacement, else the source's, else None."""
    if name in chunk.tensors:
        return chunk.tensors[name]
    return source.get(name) if name in source else None


def layer_replacements(family: MoEFamily, prefix: str, num_experts: int, chunk: Replacements, source,
                       mode: str = "pack-quantized") -> Replacements:
    """``chunk`` (one layer's results: quantized per-expert modules under the family's per-expert names, and the
    high-precision tensors transforms changed) rewritten to the layout of the table above.

    Args:
        family: the model's family; prefix: the layer's module name (``"model.layers.3"``); num_experts: routed
            experts of the layer (0 for a dense layer: ``chunk`` is returned as it is).
        source: the source checkpoint (``in``, ``get``, ``dtype``: :class:`moequant.io.safetensors.CheckpointReader`).
        mode: the export mode, ``"pack-quantized"`` or ``"dequantized"``.
    """
    if num_experts == 0:
        return chunk
    names = [family.disk_expert_names(prefix, e) for e in range(num_experts)]
    modules = [n for d in names for n in (d["gate"], d["up"], d["down"])]
    quantized = [m for m in modules if m in chunk.quantized]
    if quantized and len(quantized) != len(modules):
        raise ValueError(f"{prefix}: {len(quantized)} of {len(modules)} routed expert matrices are quantized; the "
                         f"experts of a MoE layer are all quantized or all kept in high precision (the recipe "
                         f"check of the preflight enforces this)")
    if family.disk_fused:
        return _from_fused(family, prefix, names, chunk, source, mode) if quantized else chunk
    if quantized or mode != "pack-quantized":
        return chunk
    return _high_precision_fused(family, prefix, names, chunk, source)


def _from_fused(family: MoEFamily, prefix: str, names: list[dict], chunk: Replacements, source,
                mode: str) -> Replacements:
    """Quantized experts of a family that stores them fused on disk."""
    fused = fused_disk_names(family, prefix)
    present = {leaf: n for leaf, n in fused.items() if n in source}
    for leaf in ("gate_up_proj", "down_proj"):
        if leaf not in present:
            raise KeyError(f"{prefix}: the source checkpoint has no {fused[leaf]!r} (the fused experts of "
                           f"{family.name})")
    tensors = {k: v for k, v in chunk.tensors.items() if k not in (fused["gate_up_proj"], fused["down_proj"])}
    if mode == "dequantized":  # the fused source tensors, holding the dequantized weights
        per_expert = [ExpertTensors(*(chunk.quantized[d[p]].dequantized for p in ("gate", "up", "down")),
                                    None, None, None) for d in names]
        for leaf, t in fuse_experts(family, per_expert).items():
            tensors[fused[leaf]] = t
        rest = {k: v for k, v in chunk.quantized.items() if k not in {n for d in names for n in d.values()}}
        return Replacements(quantized=rest, tensors=tensors, added=dict(chunk.added), removed=list(chunk.removed),
                            dtypes=dict(chunk.dtypes))
    added = dict(chunk.added)
    dtypes = dict(chunk.dtypes)
    for d in names:
        dtypes[d["gate"]] = dtypes[d["up"]] = source.dtype(fused["gate_up_proj"])
        dtypes[d["down"]] = source.dtype(fused["down_proj"])
    gub, db = _get(fused["gate_up_proj_bias"], chunk, source), _get(fused["down_proj_bias"], chunk, source)
    if (gub is None) != (db is None):
        raise KeyError(f"{prefix}: the source checkpoint has only one of {fused['gate_up_proj_bias']!r} and "
                       f"{fused['down_proj_bias']!r}")
    if gub is not None:  # GPT-OSS: per-expert biases in the source dtype
        sel_g, sel_u = gate_up_slices(family, gub.shape[1] // 2)
        gdt, ddt = source.dtype(fused["gate_up_proj_bias"]), source.dtype(fused["down_proj_bias"])
        for e, d in enumerate(names):
            added[d["gate"] + ".bias"] = gub[e, sel_g].to(gdt).contiguous()
            added[d["up"] + ".bias"] = gub[e, sel_u].to(gdt).contiguous()
            added[d["down"] + ".bias"] = db[e].to(ddt).contiguous()
        tensors.pop(fused["gate_up_proj_bias"], None)
        tensors.pop(fused["down_proj_bias"], None)
    removed = list(chunk.removed) + list(present.values())
    return Replacements(quantized=dict(chunk.quantized), tensors=tensors, added=added, removed=removed,
                        dtypes=dtypes)


def _high_precision_fused(family: MoEFamily, prefix: str, names: list[dict], chunk: Replacements,
                          source) -> Replacements:
    """High-precision experts of a family that stores them per expert, in a pack-quantized export: transformers'
    fused runtime tensors."""
    per_expert, removed = [], list(chunk.removed)
    tensors = dict(chunk.tensors)
    dtype = None
    for d in names:
        mats = []
        for p in ("gate", "up", "down"):
            w = d[p] + ".weight"
            t = _get(w, chunk, source)
            if t is None:
                raise KeyError(f"{prefix}: the source checkpoint has no {w!r}")
            dtype = dtype or (source.dtype(w) if w in source else t.dtype)
            mats.append(t)
            tensors.pop(w, None)
            if w in source:
                removed.append(w)
        per_expert.append(ExpertTensors(*mats, None, None, None))
    added = dict(chunk.added)
    for leaf, t in fuse_experts(family, per_expert).items():
        added[f"{prefix}.{family.experts}.{leaf}"] = t.to(dtype)
    return Replacements(quantized=dict(chunk.quantized), tensors=tensors, added=added, removed=removed,
                        dtypes=dict(chunk.dtypes))
