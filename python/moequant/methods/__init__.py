"""Quantization methods, one package per method, and how they plug into the pipeline.

* :mod:`~moequant.methods.base`: the adapter interface (:class:`Solver`, :class:`LayerTransform`,
  :class:`LayerStep`) -- all the pipeline knows of a method;
* :mod:`~moequant.methods.registry`: the solver registry (:class:`SolverRegistry`, :func:`default_solvers`) and
  the layer transforms in order (:func:`build_transforms`);
* solvers: :mod:`~moequant.methods.gptq`, :mod:`~moequant.methods.rtn`; after any solver, the greedy rounding
  correction :mod:`~moequant.methods.rounding`;
* transforms: :mod:`~moequant.methods.rotation` (QuaRot R1), :mod:`~moequant.methods.awq` (config + math + layer
  adapter each).

A new rounding method is ``methods/<name>/`` with a :class:`Solver` registered in :func:`default_solvers` (plus its
core, kernel, binding, :mod:`moequant.ops` entry and :mod:`moequant.ref` twin). Names are re-exported lazily:
the recipe imports the method sections (``methods.awq.config``) while it is itself being imported.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Solver": "base", "LayerStep": "base", "LayerTransform": "base", "layer_export_tensors": "base",
    "SolverRegistry": "registry", "default_solvers": "registry", "build_transforms": "registry",
    "TRANSFORMS": "registry",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
