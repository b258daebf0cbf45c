"""The residual rotation's pipeline adapter: :class:`RotationTransform` rotates the lazy model's globals before the
calibration inputs are recorded (:class:`PipelineRotation`), each layer right after it is loaded, and names what the
export must write (:func:`rotated_export_tensors`).

The rotation is a deterministic function of ``recipe.rotation.seed`` and the checkpoint, so a resumed run
rotates identically (nothing about it is stored in the work directory except the per-layer tensors).
"""
from __future__ import annotations

import torch
from torch import nn

from typing import Optional

from ...io.export import Replacements
from ...models.base import MoEFamily, split_expert
from ..base import LayerStep, LayerTransform
from .rotate import hidden_size_of, parameter_at, random_hadamard, rotate_globals_, rotate_layer_, rotation_plan

__all__ = ["PipelineRotation", "RotationTransform", "rotated_export_tensors"]


class PipelineRotation:
    """Rotation state of one pipeline run (see the module docstring).

    Args:
        lazy: the :class:`moequant.models.LazyModel` (globals in memory, layers on ``meta``).
        seed: ``recipe.rotation.seed``.
        storage_dtype: the checkpoint's dtype (an added untied ``lm_head.weight`` is written in it).
    Construction checks the hidden size and the structure of every layer (ValueError with a remedy) and
    rotates the globals of ``lazy`` in place.
    """

    def __init__(self, lazy, seed: int, storage_dtype: torch.dtype):
        self.family: MoEFamily = lazy.family
        self.rotation = random_hadamard(hidden_size_of(lazy.config), seed)
        for i in range(lazy.num_layers):  # structure only: fail before any work
            layer = lazy.meta_layer(i)
            rotation_plan(layer, self.family, self.rotation.size)
        changed = rotate_globals_(lazy.model, self.family, self.rotation)
        tensors, added = {}, {}
        for name, t in changed.items():
            disk = self.family.disk_name(name)
            if disk in lazy.reader:
                tensors[disk] = t.detach().cpu()
            else:  # lm_head tied to the embeddings in the source: write it, untied
                added[disk] = t.detach().to("cpu", storage_dtype)
        self.globals = Replacements(tensors=tensors, added=added)
        self.config_overrides = {"tie_word_embeddings": False} if added else {}

    def rotate_layer(self, layer: nn.Module) -> list[str]:
        """Rotates a freshly loaded layer in place; returns the layer-relative names of the changed tensors."""
        device = next(layer.parameters()).device
        if self.rotation.signs.device != device:  # once per run: the signs then stay on the layers' device
            self.rotation = self.rotation.to(device)
        return rotate_layer_(layer, self.family, self.rotation)


def rotated_export_tensors(layer: nn.Module, family: MoEFamily, prefix: str, changed: list[str],
                         quantized: set) -> dict[str, torch.Tensor]:
    """On-disk name -> tensor (CPU) for every changed tensor of a layer the quantized export does not cover.

    ``changed``: layer-relative tensor names (:func:`moequant.methods.rotation.rotate.rotate_layer_`);
    ``quantized``: on-disk module prefixes written from their codes (their ``.weight`` is skipped, their bias is
    not). Fused runtime experts are split into the checkpoint's per-expert tensors unless the family stores them
    fused on disk."""
    out: dict[str, torch.Tensor] = {}
    experts = family.experts_of(layer)
    for name in changed:
        module_path, _, leaf = name.rpartition(".")
        if experts is not None and module_path == family.experts and not family.disk_fused:
            _per_expert(out, experts, family, prefix, leaf, quantized)
            continue
        disk = family.disk_name(f"{prefix}.{name}")
        if leaf == "weight" and disk.rsplit(".", 1)[0] in quantized:
            continue
        out[disk] = parameter_at(layer, name).detach().cpu().clone()
    return out


def _per_expert(out: dict, experts: nn.Module, family: MoEFamily, prefix: str, leaf: str, quantized: set) -> None:
    projs = {"gate_up_proj": ("gate", "up"), "down_proj": ("down",), "down_proj_bias": ("down",),
             "gate_up_proj_bias": ("gate", "up")}.get(leaf)
    if projs is None:
        raise ValueError(f"rotation: {family.name}: no checkpoint name for the expert tensor {leaf!r}")
    suffix = "bias" if leaf.endswith("_bias") else "weight"
    for e in range(int(experts.gate_up_proj.shape[0])):
        names, views = family.disk_expert_names(prefix, e), split_expert(experts, family, e)
        for p in projs:
            if suffix == "weight" and names[p] in quantized:
                continue
            t = getattr(views, p if suffix == "weight" else f"{p}_bias")
            out[f"{names[p]}.{suffix}"] = t.detach().cpu().contiguous().clone()


class RotationTransform(LayerTransform):
    """QuaRot R1 residual rotation (``recipe.rotation``) as a :class:`~moequant.methods.base.LayerTransform`."""

    def __init__(self, seed: int, storage: torch.dtype):
        self.seed, self.storage = seed, storage
        self._rotation: Optional[PipelineRotation] = None  # made by before_calibration
        self._changed: list[str] = []  # layer-relative names rotated in the current layer

    def before_calibration(self, lazy) -> None:
        self._rotation = PipelineRotation(lazy, self.seed, self.storage)

    def before_capture(self, step: LayerStep) -> None:
        self._changed = self._rotation.rotate_layer(step.layer)

    def export_tensors(self, step: LayerStep, quantized: set) -> dict[str, torch.Tensor]:
        return rotated_export_tensors(step.layer, self._rotation.family, step.prefix, self._changed, quantized)

    def export_globals(self) -> Optional[Replacements]:
        return self._rotation.globals

    def config_overrides(self) -> dict:
        return self._rotation.config_overrides
