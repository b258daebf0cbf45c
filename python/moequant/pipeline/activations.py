"""What a checkpoint stores about activations: NVFP4 W4A4's static ``input_global_scale`` per quantized Linear
(compressed-tensors / llm-compressor: ``generate_gparam`` of the largest ``|x|`` the module saw in calibration,
their ``static_minmax`` observer; :func:`moequant.formats.nvfp4_global_scale`).

The solve jobs (:mod:`moequant.pipeline.jobs`) set it from the rows that fed the module's Hessian (a routed
expert: its routed rows). :func:`complete_input_scales` then gives every routed expert that saw no calibration token
the scale of the largest input any expert of that projection saw in the layer (llm-compressor would leave it
uninitialised or NaN: its issues #2826 / #1864), and any module still without one the scale of ``|x| = 0`` (1.0),
with a warning."""
from __future__ import annotations

import logging

import torch

from ..formats import nvfp4_global_scale
from ..io.export import EXPERT_MODULE_RE

__all__ = ["complete_input_scales", "static_input_scale"]

logger = logging.getLogger(__name__)


def static_input_scale(recipe, name: str) -> bool:
    """Module ``name`` takes a static input global scale (NVFP4 W4A4) under ``recipe``."""
    scheme = recipe.resolve(name)
    return scheme is not None and scheme.activations is not None and scheme.activations.static_global_scale


def complete_input_scales(results: dict, recipe) -> None:
    """Fills the missing ``input_global_scale`` of the NVFP4 W4A4 results of one layer in place (module
    docstring). ``results``: on-disk module name -> quantized tensor; ``recipe``: the run's (which modules are
    NVFP4 W4A4)."""
    missing = [n for n, qt in results.items()
               if getattr(qt, "input_global_scale", 0) is None and static_input_scale(recipe, n)]
    if not missing:
        return
    best: dict = {}  # (experts prefix, projection) -> the smallest scale (= the largest |x|) of the layer
    for name, qt in results.items():
        m = EXPERT_MODULE_RE.match(name)
        if m and getattr(qt, "input_global_scale", None) is not None:
            key = (m.group(1), name.rsplit(".", 1)[1])
            best[key] = torch.minimum(best[key], qt.input_global_scale) if key in best else qt.input_global_scale
    unseen = []
    for name in missing:
        m = EXPERT_MODULE_RE.match(name)
        key = (m.group(1), name.rsplit(".", 1)[1]) if m else None
        if key in best:
            results[name].input_global_scale = best[key].clone()
        else:
            results[name].input_global_scale = nvfp4_global_scale(0.0)
            unseen.append(name)
    if unseen:
        logger.warning("%d NVFP4 module(s) saw no calibration input (e.g. %s): input_global_scale 1.0", len(unseen),
                       unseen[0])
