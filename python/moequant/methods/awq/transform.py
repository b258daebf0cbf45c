"""AWQ's pipeline adapter: :class:`AWQTransform` runs :func:`moequant.methods.awq.layer.apply_awq` on every layer
before its Hessian capture and hands the changed high-precision tensors to the export."""
from __future__ import annotations

import torch

from ...models.base import MoEFamily
from ..base import LayerStep, LayerTransform
from .layer import apply_awq

__all__ = ["AWQTransform"]


class AWQTransform(LayerTransform):
    """AWQ smoothing and clipping (``recipe.awq``) before GPTQ/RTN, around :func:`apply_awq`."""

    def __init__(self, recipe, family: MoEFamily, storage: torch.dtype):
        self.recipe, self.family, self.storage = recipe, family, storage
        self._tensors: dict[str, torch.Tensor] = {}  # changed tensors of the current layer, by checkpoint name

    def before_capture(self, step: LayerStep) -> None:
        self._tensors = apply_awq(step.layer, self.family, self.recipe, step.prefix, step.hidden, step.kwargs,
                                  step.index, step.device, self.storage).tensors

    def export_tensors(self, step: LayerStep, quantized: set) -> dict[str, torch.Tensor]:
        return self._tensors
