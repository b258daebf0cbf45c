"""The adapter interface between the pipeline and the methods: what a method implements to plug into
:func:`moequant.pipeline.quantize`. The pipeline knows no method by name; it calls these interfaces only, and the
methods import nothing of the pipeline.

**Solvers** (:class:`Solver`): how the codes of one matrix are found from its weight and (optionally) Hessian
(GPTQ, RTN; AutoRound or GPTAQ would be others). A solver is registered by name in a
:class:`moequant.methods.registry.SolverRegistry`; a scheme's ``method`` names it.

**Layer transforms** (:class:`LayerTransform`): methods that change the model's weights before they are quantized
(rotation, AWQ). The pipeline calls every enabled transform at fixed points, in the order
:func:`moequant.methods.registry.build_transforms` returns them (rotation, then AWQ):

1. :meth:`~LayerTransform.before_calibration` once, after the preflight and before the calibration inputs are
   recorded (QuaRot R1 rotates the embeddings, final norm and lm_head here);
2. per decoder layer, :meth:`~LayerTransform.before_capture` right after the layer is loaded and before its
   Hessians are captured (rotation of the layer; AWQ smoothing and clipping on the layer's recorded inputs);
3. per decoder layer, after it is quantized, :meth:`~LayerTransform.export_tensors` with the on-disk names of
   the quantized modules: every high-precision tensor the transform changed in that layer, by checkpoint name
   (a rotated matrix the recipe leaves in high precision, AWQ's scaled norms). The layer's export tensors are
   merged in transform order (:func:`layer_export_tensors`), so a later transform's version of a tensor wins;
4. at the export, :meth:`~LayerTransform.export_globals` (replacements after the layers') and
   :meth:`~LayerTransform.config_overrides` (``config.json`` keys).

The pipeline calls 2 and 3 for one layer at a time, so a transform may remember what it did to the current layer
in between. Transforms are deterministic functions of the recipe and the checkpoint: a resumed run rebuilds them
and gets the same results (only their per-layer tensors are stored in the work directory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
from torch import nn

if TYPE_CHECKING:  # type hints only: the methods do not import the layers above them
    from ..io.export import Replacements
    from ..ops import QuantizedTensor

__all__ = ["Solver", "LayerStep", "LayerTransform", "layer_export_tensors"]


class Solver:
    """A rounding method: the codes of one ``[out, in]`` matrix in the scheme's format.

    Class attributes:
        name: the ``method`` value that selects it (recipe ``scheme.method``, CLI ``--method``).
        needs_hessian: it uses the Hessian; a matrix without calibration data (no Hessian) is then solved by the
            registry's fallback solver (RTN) and reported as such.
        act_order: it honours ``QuantScheme.act_order`` (the checkpoint's ``actorder`` then says ``"weight"``).
        reference: the name of its plain-PyTorch twin in :mod:`moequant.ref` (the semantics its core or kernel
            is tested against).
    """

    name: ClassVar[str] = ""
    needs_hessian: ClassVar[bool] = True
    act_order: ClassVar[bool] = False
    reference: ClassVar[str] = ""

    def supports(self, fmt) -> bool:
        """Whether it solves weights of the format ``fmt`` (a scheme's ``format``; the recipe refuses other
        schemes for this method). Default: the integer formats (:class:`~moequant.formats.IntFormat`)."""
        from ..formats import IntFormat

        return isinstance(fmt, IntFormat)

    def solve(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme, storage: torch.dtype,
              **kwargs) -> "QuantizedTensor":
        """The quantization of ``w`` by ``scheme`` (a :class:`moequant.recipe.QuantScheme`) on the Hessian ``h``
        (None when there is none and the solver does not need one), with scales exactly representable in
        ``storage`` (the checkpoint dtype): a :class:`~moequant.ops.QuantizedTensor` (integer formats) or
        :class:`~moequant.ops.FloatQuantizedTensor`. ``global_scale`` (keyword, given only for NVFP4 matrices
        with fused partners): the float32 ``[1]`` global scale to use instead of the matrix's own."""
        raise NotImplementedError

    def batchable(self, w: torch.Tensor, h: Optional[torch.Tensor], scheme) -> bool:
        """Whether :meth:`solve_batched` handles this matrix (default: no batched path)."""
        return False

    def batch_bytes(self, rows: int, cols: int) -> int:
        """Device memory one ``[rows, cols]`` matrix takes in :meth:`solve_batched` (sizes its chunks)."""
        return 0

    def solve_batched(self, w: torch.Tensor, h: torch.Tensor, scheme, storage: torch.dtype,
                      compute_loss: bool, **kwargs) -> list:
        """:meth:`solve` of E same-shape matrices ``w [E, out, in]`` on ``h [E, in, in]`` (``h`` may be destroyed);
        ``compute_loss=False`` may leave ``loss`` None; ``global_scale`` (keyword, NVFP4): float32 ``[E]``."""
        raise NotImplementedError


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

    def export_globals(self) -> Optional["Replacements"]:
        """Replacements of non-layer tensors for the export, or None."""
        return None

    def config_overrides(self) -> dict:
        """Top-level ``config.json`` keys the export sets."""
        return {}


def layer_export_tensors(transforms: list[LayerTransform], step: LayerStep,
                         quantized: set) -> Optional[dict[str, torch.Tensor]]:
    """The high-precision tensors of one quantized layer the export writes in place of the source tensors (merged
    in transform order: a later transform's version wins), or None when there are none."""
    out: dict[str, torch.Tensor] = {}
    for t in transforms:
        out.update(t.export_tensors(step, quantized))
    return out or None
