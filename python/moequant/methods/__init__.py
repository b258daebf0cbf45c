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
core, kernel, binding, :mod:`moequant.ops` entry and :mod:`moequant.ref` twin). This package imports only
``base`` and ``registry`` (light): the recipe imports the registry and the method sections.
"""
from .base import LayerStep, LayerTransform, Solver, layer_export_tensors
from .registry import TRANSFORMS, SolverRegistry, build_transforms, default_solvers

__all__ = ["Solver", "LayerStep", "LayerTransform", "layer_export_tensors", "SolverRegistry", "default_solvers",
           "build_transforms", "TRANSFORMS"]
