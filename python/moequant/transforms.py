"""Per-layer transforms of the pipeline: methods that change the model's weights before they are quantized.

A :class:`LayerTransform` hooks into :func:`moequant.pipeline.quantize` at fixed points, and the pipeline calls
every enabled transform there in the order :func:`build_transforms` returns them (rotation, then AWQ):

1. :meth:`~LayerTransform.before_calibration` once, after the preflight and before the calibration inputs are
   recorded (QuaRot R1 rotates the embeddings, final norm and lm_head here);
2. per decoder layer, :meth:`~LayerTransform.before_capture` right after the layer is loaded and before its
   Hessians are captured (rotation of the layer; AWQ smoothing and clipping on the layer's recorded inputs);
3. per decoder layer, after it is quantized, :meth:`~LayerTransform.export_tensors` with the on-disk names of
   the quantized modules: every high-precision tensor the transform changed in that layer, by checkpoint name
   (a rotated matrix the recipe leaves in high precision, AWQ's scaled norms). The layer's export tensors are
   merged in transform order, so a later transform's version of a tensor wins;
4. at the export, :meth:`~LayerTransform.export_globals` (replacements after the layers') and
   :meth:`~LayerTransform.config_overrides` (``config.json`` keys).

The pipeline calls 2 and 3 for one layer at a time, so a transform may remember what it did to the current layer
in between. Transforms are deterministic functions of the recipe and the checkpoint: a resumed run rebuilds them
and gets the same results (only their per-layer tensors are stored in the work directory).
The adapters here only call :mod:`moequant.rotation_pipeline` and :mod:`moequant.awq_layer`, imported lazily.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .export import Replacements
from .models.base import MoEFamily
from .recipe import Recipe

__all__ = ["LayerStep", "LayerTransform", "RotationTransform", "AWQTransform", "build_transforms",
           "layer_export_tensors"]


@dataclass
class LayerStep:
    """The decoder layer the pipeline is quantizing and its recorded inputs.

    Attributes:
        index: layer number; prefix: its module name (``"model.layers.3"``).
        layer: the loaded layer on ``device`` (changed in place by the transforms).
        hidden: the calibration batches' inputs of this layer (CPU); kwargs: per batch, the recorded keyword
            arguments of every layer (``kwargs[batch][index]``).
    """

    index: int
    prefix: str
    layer: nn.Module
    hidden: list
    kwargs: list
    device: torch.device


class LayerTransform:
    """Base class: every hook does nothing (see the module docstring for when each is called)."""

    def before_calibration(self, lazy) -> None:
        """Changes the lazily opened model's globals (``lazy.model``) before the calibration inputs are recorded."""

    def before_capture(self, step: LayerStep) -> None:
        """Changes ``step.layer`` in place (remembering what it changed for :meth:`export_tensors`)."""

    def export_tensors(self, step: LayerStep, quantized: set) -> dict[str, torch.Tensor]:
        """The high-precision tensors this transform changed in the quantized layer, by checkpoint name;
        ``quantized``: the on-disk module names written from their codes (those are not exported here)."""
        return {}

    def export_globals(self) -> Optional[Replacements]:
        """Replacements of non-layer tensors for the export, or None."""
        return None

    def config_overrides(self) -> dict:
        """Top-level ``config.json`` keys the export sets."""
        return {}


class RotationTransform(LayerTransform):
    """QuaRot R1 residual rotation (``recipe.rotation``): :class:`moequant.rotation_pipeline.PipelineRotation`."""

    def __init__(self, seed: int, storage: torch.dtype):
        self.seed, self.storage = seed, storage
        self._rotation = None  # PipelineRotation, made by before_calibration
        self._changed: list[str] = []  # layer-relative names rotated in the current layer

    def before_calibration(self, lazy) -> None:
        from .rotation_pipeline import PipelineRotation

        self._rotation = PipelineRotation(lazy, self.seed, self.storage)

    def before_capture(self, step: LayerStep) -> None:
        self._changed = self._rotation.rotate_layer(step.layer)

    def export_tensors(self, step: LayerStep, quantized: set) -> dict[str, torch.Tensor]:
        from .rotation_pipeline import rotated_export_tensors

        return rotated_export_tensors(step.layer, self._rotation.family, step.prefix, self._changed, quantized)

    def export_globals(self) -> Optional[Replacements]:
        return self._rotation.globals

    def config_overrides(self) -> dict:
        return self._rotation.config_overrides


class AWQTransform(LayerTransform):
    """AWQ smoothing and clipping (``recipe.awq``) before GPTQ/RTN, around :func:`moequant.awq_layer.apply_awq`."""

    def __init__(self, recipe: Recipe, family: MoEFamily, storage: torch.dtype):
        self.recipe, self.family, self.storage = recipe, family, storage
        self._tensors: dict[str, torch.Tensor] = {}  # changed tensors of the current layer, by checkpoint name

    def before_capture(self, step: LayerStep) -> None:
        from .awq_layer import apply_awq

        self._tensors = apply_awq(step.layer, self.family, self.recipe, step.prefix, step.hidden, step.kwargs,
                                  step.index, step.device, self.storage).tensors

    def export_tensors(self, step: LayerStep, quantized: set) -> dict[str, torch.Tensor]:
        return self._tensors


def build_transforms(recipe: Recipe, family: MoEFamily, storage: torch.dtype) -> list[LayerTransform]:
    """The transforms ``recipe`` enables, in the order the pipeline applies them (rotation, then AWQ).

    ``family``: the model's :class:`MoEFamily`; ``storage``: the checkpoint's dtype (changed tensors the
    transforms export are rounded to or written in it)."""
    out: list[LayerTransform] = []
    if recipe.rotation.enabled:
        out.append(RotationTransform(recipe.rotation.seed, storage))
    if recipe.awq.enabled:  # AWQ followed by GPTQ/RTN: smoothed and clipped before the Hessian capture
        out.append(AWQTransform(recipe, family, storage))
    return out


def layer_export_tensors(transforms: list[LayerTransform], step: LayerStep,
                         quantized: set) -> Optional[dict[str, torch.Tensor]]:
    """The high-precision tensors of one quantized layer the export writes in place of the source tensors (merged
    in transform order: a later transform's version wins), or None when there are none."""
    out: dict[str, torch.Tensor] = {}
    for t in transforms:
        out.update(t.export_tensors(step, quantized))
    return out or None
