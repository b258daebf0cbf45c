"""The layer-sequential pipeline: :func:`quantize` and its parts.

* :mod:`~moequant.pipeline.run`: :func:`quantize`, the layer loop;
* :mod:`~moequant.pipeline.layer`: one step of the loop (:class:`LayerQuantizer`), its callbacks
  (:class:`LayerObserver`), :func:`hessian_precision`;
* :mod:`~moequant.pipeline.jobs`: per-layer solve decisions (solver, Hessian, fallback), :func:`solve_matrix`;
* :mod:`~moequant.pipeline.preflight`: the checks before any work (:func:`preflight`, :class:`Plan`);
* :mod:`~moequant.pipeline.output`: writability, free space, write failures (:class:`OutputWriteError`);
* :mod:`~moequant.pipeline.workdir`: the resumable work directory (its lock: :mod:`~moequant.pipeline.lock`);
  :mod:`~moequant.pipeline.report`: the report;
* :mod:`~moequant.pipeline.export`: the export step (config groups, ignore list, loader support);
* :mod:`~moequant.pipeline.distributed`: the same run on several processes (``torchrun``), bit-identical.

Methods plug in only through :mod:`moequant.methods` (solvers by name, layer transforms).
"""
from .layer import LayerObserver, LayerQuantizer, LayerResult, hessian_precision, layer_inputs
from .output import OutputWriteError
from .preflight import Plan, preflight
from .run import quantize

__all__ = ["quantize", "preflight", "Plan", "OutputWriteError", "hessian_precision", "LayerQuantizer", "LayerResult",
           "LayerObserver", "layer_inputs"]
