"""One step of the layer loop: calibrate and quantize one decoder layer on given inputs (:class:`LayerQuantizer`).

:func:`moequant.pipeline.quantize` repeats it for L = 0 .. N-1, feeding layer L+1 the outputs of the *quantized*
layer L (:meth:`LayerQuantizer.run_layer` on :attr:`LayerResult.layer`). The step is public so that a caller can
calibrate a layer on inputs of its choice (the propagation tests calibrate every layer on the unquantized model's
hidden states and compare); :func:`layer_inputs` records the inputs of layer 0 and the keyword arguments of every
layer, exactly as the pipeline does.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..calibration.capture import LayerCapture
from ..calibration.kv_cache import KVCacheHooks, KVObserver, kv_attentions
from ..formats.kv_cache import kv_scale
from ..methods.base import LayerStep
from ..models.base import num_experts, text_config
from ..models.lazy import LazyModel, record_layer_inputs
from ..recipe.recipe import Recipe
from .activations import complete_input_scales, static_input_scale
from .experts import MoELayerEngine
from .groups import GIB, plan_layer
from .host import DeviceInputs, HostCopies
from .jobs import quantize_experts, quantize_linears
from .report import LayerRecord
from .states import StatesStore, num_tokens

__all__ = ["LayerQuantizer", "LayerResult", "LayerObserver", "layer_inputs", "hessian_precision", "accumulator_factory"]


def hessian_precision(recipe: Recipe, device: torch.device, compute_dtype: torch.dtype) -> str:
    """The Hessian update precision a run uses: the recipe's ``hessian_precision`` with ``"auto"`` resolved
    (bf16 tensor cores when the layer computes in bf16 on CUDA, else fp32)."""
    p = recipe.hessian_precision
    if device.type != "cuda":
        if p not in ("auto", "fp32"):
            raise ValueError(f"hessian_precision: expected 'auto' or 'fp32' on {device.type}, got {p!r}; tf32/bf16 "
                             "use CUDA tensor cores: run on a GPU or set hessian_precision to 'auto'")
        return "fp32"
    if p == "auto":
        return "bf16" if compute_dtype == torch.bfloat16 and recipe.hessian_dtype == "float32" else "fp32"
    return p


def accumulator_factory(recipe: Recipe, device: torch.device, precision: str = "fp32"):
    """``make(num_experts, dim, device) -> HessianAccumulator`` in the recipe's ``hessian_dtype`` (float64 ones live
    on the CPU) with the update ``precision`` on CUDA."""
    dtype = torch.float64 if recipe.hessian_dtype == "float64" else torch.float32

    def make(num_experts: int, dim: int, dev):
        d = dev if dtype == torch.float32 else torch.device("cpu")
        return ops.HessianAccumulator(num_experts, dim, dtype=dtype, device=d,
                                      precision=precision if d.type == "cuda" else "fp32")

    return make


def layer_inputs(lazy: LazyModel, ids: torch.Tensor, batch_size: int, device, store: Optional[StatesStore] = None,
                 keep_hidden: bool = True) -> tuple:
    """``(hidden, kwargs)`` of the calibration token ids ``[N, S]`` in batches of ``batch_size``: per batch the
    inputs of layer 0 (on the CPU) and the keyword arguments the model passes to every layer
    (``kwargs[batch][layer]``, on ``device``), recorded by the model's own forward
    (:func:`moequant.models.lazy.record_layer_inputs`).

    ``hidden`` is a list of tensors (pinned host copies of a GPU's), or with a ``store`` its
    :class:`~moequant.pipeline.states.HiddenStates` (each batch goes into the store as it is recorded: a disk-backed
    store never holds them all in memory); ``keep_hidden=False`` drops them (None: a resumed run needs only the
    keyword arguments)."""
    batches = ids.split(batch_size)
    kwargs, sink = [], None
    try:
        for b in batches:
            r = record_layer_inputs(lazy, b, device)
            kwargs.append(r.kwargs_per_layer)
            if not keep_hidden:
                continue
            h = r.hidden_states
            if sink is None:  # the shapes of every batch: its rows, then the first batch's [seq_len, hidden]
                sink = HostCopies() if store is None else \
                    store.sink([(len(x), *h.shape[1:]) for x in batches], h.dtype)
            sink.append(h)
    except BaseException:
        if sink is not None and store is not None:
            sink.abort()
        raise
    if not keep_hidden or sink is None:
        return None, kwargs
    return (sink.finish() if store is not None else sink.done()), kwargs


@dataclass
class LayerResult:
    """One quantized decoder layer.

    Attributes:
        index, prefix: the layer; layer: the module on the compute device, computing with the dequantized weights
            (what a loader reconstructs); step: the :class:`~moequant.methods.base.LayerStep` the transforms saw.
        outputs: the layer's outputs on the calibration batches (CPU; a list, or the states sink given to
            :meth:`LayerQuantizer.quantize_layer`), when the step computed them (the expert streaming engine does;
            else :meth:`LayerQuantizer.run_layer` on ``layer``). phases: seconds per step of
            the layer (load, forwards, solves, ...). groups: how the routed experts went through the device.
        results: on-disk module name -> :class:`~moequant.ops.QuantizedTensor`, linears then experts.
        modules: a :class:`~moequant.pipeline.report.ModuleRecord` per solved matrix. expert_tokens, expert_mass:
            routed calibration rows and Hessian weight mass per expert (the routing mass when routing-weighted, else
            the rows; empty for a dense layer). routing_mass: per expert the sum of its tokens' routing weights.
        kv_scales: with the recipe's ``kv_cache``, ``{"<attention>.k_scale" / ".v_scale": [1] tensor}`` (on-disk
            names, checkpoint dtype) from the keys and values the quantized layer stored while computing
            :attr:`outputs` (:mod:`moequant.formats.kv_cache`); else empty.
        parts: the expert groups whose results the engine wrote to the work directory's part files
            (:attr:`LayerQuantizer.part_writer`) instead of :attr:`results`; part_writes: those writes still in
            flight (:class:`~moequant.pipeline.host.PartWrites`, or None): the layer's commit waits for them.
    """

    index: int
    prefix: str
    layer: nn.Module
    step: LayerStep
    results: dict
    modules: list
    moe: bool
    expert_tokens: list = field(default_factory=list)
    expert_mass: list = field(default_factory=list)
    outputs: Optional[list] = None
    phases: dict = field(default_factory=dict)
    groups: Optional[str] = None
    kv_scales: dict = field(default_factory=dict)
    routing_mass: list = field(default_factory=list)
    parts: int = 0
    part_writes: Optional[object] = None

    def record(self, seconds: float) -> LayerRecord:
        """The layer's report record."""
        return LayerRecord(index=self.index, prefix=self.prefix, seconds=seconds, moe=self.moe,
                           expert_tokens=self.expert_tokens, expert_mass=self.expert_mass, modules=self.modules,
                           phases=dict(self.phases), groups=self.groups, routing_mass=self.routing_mass)


class LayerQuantizer:
    """Calibrates and quantizes decoder layers of a lazily opened model (:meth:`quantize_layer`) and runs a layer on
    calibration batches (:meth:`run_layer`).

    Args:
        lazy: the :class:`~moequant.models.LazyModel` (layers are loaded from it one at a time).
        recipe: the validated recipe; its schemes' solvers are looked up in its registry.
        device: the compute device; storage: the checkpoint dtype (scales and written-back weights).
        transforms: the run's :class:`~moequant.methods.base.LayerTransform` list, applied in order before the
            capture.
        precision: the resolved Hessian update precision (:func:`hessian_precision`).
        probe: sees every batch of solve jobs before they are solved (:func:`~moequant.pipeline.jobs.finish_jobs`).
        dist: the :class:`~moequant.pipeline.distributed.DistContext` of a multi-process run (the batches given to
            :meth:`quantize_layer` are this rank's; results and records are complete on rank 0 only), else None.
    """

    def __init__(self, lazy: LazyModel, recipe: Recipe, device, storage: torch.dtype, *, transforms=(),
                 precision: str = "fp32", prefetch: bool = False, probe=None, dist=None):
        self.probe = probe
        self.lazy, self.recipe, self.device, self.storage = lazy, recipe, torch.device(device), storage
        self.dist = dist  # a DistContext of a multi-process run: the inputs are this rank's batches
        self.plan_tokens: Optional[int] = None  # calibration tokens of all batches (set by a distributed run)
        self.transforms = list(transforms)
        self.factory = accumulator_factory(recipe, self.device, precision)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moequant-prefetch") if prefetch else None
        self._next: Optional[tuple[int, Future]] = None
        # host copies of a layer bound for a GPU (the prefetched layer, streamed experts) are page-locked
        self._pin = self.device.type == "cuda"
        # part_writer(index, part, results): where a streamed layer's expert groups go as they finish (the run's
        # WorkDir.save_part; None: the engine returns them with the layer)
        self.part_writer = None

    def close(self) -> None:
        """Stops the prefetch thread (a layer being read is finished first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool, self._next = None, None

    def _load(self, index: int, experts_device) -> nn.Module:
        """Layer ``index`` on the device (its experts on ``experts_device`` when given): the one a background
        read prepared (in host memory), else read now."""
        lazy = self.lazy
        if self._next is not None and self._next[0] == index:
            layer = self._next[1].result()
            self._next = None
            return lazy.place_layer(layer, self.device, experts_device)
        self._next = None
        return lazy.load_layer(index, self.device, experts_device=experts_device, pin_memory=self._pin)

    def _prefetch(self, index: int) -> None:
        """Starts reading layer ``index`` into host memory on the background thread (prefetch on, and only while
        the current layer's weights are on the device, so that host memory holds one layer)."""
        if self._pool is not None and index < self.lazy.num_layers:
            self._next = (index, self._pool.submit(self.lazy.load_layer, index, "cpu", pin_memory=self._pin))

    @torch.no_grad()
    def run_layer(self, layer: nn.Module, index: int, hidden, kwargs: list, out=None):
        """The outputs (CPU) of ``layer`` (layer ``index``) on the batches ``hidden`` with their recorded
        ``kwargs``: a list (pinned host copies of a GPU's outputs, made while the next batches compute), or appended
        batch by batch to ``out`` (a states sink, :mod:`moequant.pipeline.states`), which is returned."""
        sink = HostCopies() if out is None else out
        for b in range(len(hidden)):
            sink.append(self._forward(layer, index, hidden[b], kwargs[b]))
        return sink.done() if out is None else out

    def _forward(self, layer: nn.Module, index: int, h: torch.Tensor, kw: list) -> torch.Tensor:
        y = layer(h.to(self.device, non_blocking=True), **kw[index])  # no wait for the stream (DeviceInputs)
        return y[0] if isinstance(y, tuple) else y

    def _keep_inputs(self, plan, hidden) -> bool:
        """Keep a MoE layer's inputs on the GPU across the engine's passes when the plan leaves room for them (an
        unbounded plan always does)."""
        if self.device.type != "cuda":
            return False
        elt = torch.empty((), dtype=self.lazy.dtype).element_size()
        need = num_tokens(hidden) * int(text_config(self.lazy.config).hidden_size) * elt
        return plan.slack is None or plan.slack >= need

    def budget(self) -> Optional[int]:
        """Device memory a MoE layer may use: ``recipe.device_memory_gb``, else on a GPU what is free now (the
        driver's free memory plus what torch's allocator caches unused) less a margin (10 % of the device, at least
        2 GiB: the CUDA context's growth and what the plan does not itemize), else unbounded."""
        if self.recipe.device_memory_gb is not None:
            return int(self.recipe.device_memory_gb * GIB)
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return max(0, free + cached - max(2 * GIB, total // 10))

    def quantize_layer(self, index: int, hidden, kwargs: list, outputs=None) -> LayerResult:
        """Loads layer ``index`` onto the device, applies the transforms, captures its Hessians on ``hidden`` (the
        layer's inputs, per batch, with the recorded ``kwargs``: a list of tensors or
        :class:`~moequant.pipeline.states.HiddenStates`), quantizes it by the recipe and writes the dequantized
        weights back into it. A MoE layer goes through the expert streaming engine
        (:class:`~moequant.pipeline.experts.MoELayerEngine`), which also computes the layer's outputs: into
        ``outputs`` (a states sink) when given, else a list (:attr:`LayerResult.outputs`)."""
        lazy, recipe, fam = self.lazy, self.recipe, self.lazy.family
        prefix = lazy.layer_prefix(index)
        t0 = time.perf_counter()
        budget = self.budget()
        plan = None
        if fam.experts_of(lazy.meta_layer(index)) is not None:
            def make_plan():
                # every batch's tokens: a rank holds every batch's pass-1 routed rows
                tokens = num_tokens(hidden) if self.plan_tokens is None else self.plan_tokens
                return plan_layer(lazy.meta_layer(index), fam, recipe, tokens, lazy.dtype, budget, prefix)
            # a distributed run uses rank 0's plan on every rank (the units of distribution are its groups)
            plan = make_plan() if self.dist is None else self.dist.on_root(make_plan, "the expert group plan")
            if not plan.resident and self.transforms:
                raise ValueError(f"device_memory_gb: {prefix} does not fit the device ({plan.describe_budget()}), "
                                 f"but awq / rotation transform the whole layer on the device; raise "
                                 f"device_memory_gb or turn awq and rotation off")
        resident = plan is None or plan.resident
        layer = self._load(index, None if resident else "cpu")
        load_s = time.perf_counter() - t0
        if resident:  # the layer's weights left host memory for the device: the next one may come in
            self._prefetch(index + 1)
        step = LayerStep(index, prefix, layer, hidden, kwargs, self.device)
        for tr in self.transforms:  # in order: rotation, then AWQ
            tr.before_capture(step)
        kv = self._kv_observer(layer, prefix)
        if plan is not None:
            inputs = DeviceInputs(hidden, self.device, self._keep_inputs(plan, hidden))
            engine = MoELayerEngine(layer, fam, prefix, recipe, self.storage, self.device, self.factory, plan,
                                    len(hidden), lambda b: self._forward(layer, index, inputs[b], kwargs[b]),
                                    outputs=outputs, probe=self.probe, dist=self.dist,
                                    output_hooks=kv[0] if kv else None, part_sink=self._part_sink(index, layer))
            out = engine.run()
            inputs.release()
            complete_input_scales(out.results, recipe)
            return LayerResult(index, prefix, layer, step, out.results, out.records, moe=True,
                               expert_tokens=out.expert_tokens, expert_mass=out.expert_mass, outputs=out.outputs,
                               phases={"load": round(load_s, 4), **out.phases},
                               groups=plan.describe(out.num_experts), routing_mass=out.routing_mass,
                               kv_scales=self._kv_scales(kv), parts=out.parts, part_writes=out.part_writes)
        with torch.no_grad():
            shrink = recipe.fallback.policy == "shrink"
            if self.dist is not None:
                from .distributed import recording_factory, solve_linears
            cap = LayerCapture(layer, fam, layer_prefix=prefix, weighting="routing" if recipe.routing_weighted
                               else "none", shared_weighting="gate" if recipe.routing_weighted else "none",
                               all_tokens=shrink, all_token_down=shrink and recipe.fallback.calibrate_all_experts,
                               accumulator_factory=self.factory if self.dist is None else recording_factory)
            if self.dist is not None and cap.experts is not None:
                raise RuntimeError(f"{prefix}: a MoE layer outside the expert streaming engine in a distributed run")
            with cap.attach():
                self.run_layer(layer, index, hidden, kwargs)
            if self.dist is None:
                res_l, rec_l = quantize_linears(cap, fam, recipe, self.storage, self.probe)
            else:  # every rank's inputs in batch order, solved on rank 0, the weights to every rank
                res_l, rec_l = solve_linears(self.dist, cap, fam, recipe, self.storage, self.factory, layer,
                                             probe=self.probe)
            res_e, rec_e = quantize_experts(cap, fam, recipe, prefix, self.storage, self.probe)
        ec = cap.experts
        complete_input_scales(res_e, recipe)
        complete_input_scales(res_l, recipe)
        computed = None
        if kv:  # the quantized layer's outputs, with its KV cache observed
            with kv[0]:
                computed = self.run_layer(layer, index, hidden, kwargs, out=outputs)
        return LayerResult(index, prefix, layer, step, {**res_l, **res_e}, rec_l + rec_e, moe=ec is not None,
                           expert_tokens=[int(c) for c in ec.gate_up.counts.tolist()] if ec else [],
                           expert_mass=[round(float(m), 6) for m in ec.gate_up.mass.tolist()] if ec else [],
                           outputs=computed, kv_scales=self._kv_scales(kv))

    def _kv_observer(self, layer: nn.Module, prefix: str) -> Optional[tuple]:
        """With the recipe's ``kv_cache``: ``(hooks, observer, attentions)`` tapping the KV cache of the layer's
        attentions (:mod:`moequant.calibration.kv_cache`), attached by the caller around the forwards that compute
        the quantized layer's outputs; else None."""
        if self.recipe.kv_cache is None:
            return None
        attentions = kv_attentions(layer, prefix)
        if not attentions:
            return None
        observer = KVObserver()
        return KVCacheHooks(attentions, observer.observe), observer, attentions

    def _part_sink(self, index: int, layer: nn.Module):
        """The engine's ``part_sink`` for layer ``index``: :attr:`part_writer` bound to it, unless a routed expert
        of the layer takes a static input scale, which :func:`complete_input_scales` completes from the whole
        layer's results (NVFP4 W4A4)."""
        if self.part_writer is None:
            return None
        fam = self.lazy.family
        experts = fam.experts_of(layer)
        prefix = self.lazy.layer_prefix(index)
        for e in range(num_experts(experts)):
            if any(static_input_scale(self.recipe, n) for n in fam.disk_expert_names(prefix, e).values()):
                return None
        return lambda part, results: self.part_writer(index, part, results)

    def _kv_scales(self, kv: Optional[tuple]) -> dict:
        """``k_scale`` / ``v_scale`` of the attentions an observer saw, by on-disk name, in the checkpoint dtype."""
        if not kv:
            return {}
        _, observer, attentions = kv
        out = {}
        for name in attentions:
            if name not in observer.amax:
                raise RuntimeError(f"kv_cache: {name} stored no keys or values in the calibration forward (its "
                                   f"forward does not call past_key_values.update); moequant cannot calibrate it")
            disk = self.lazy.family.disk_name(name)
            amax = observer.amax[name].cpu()
            out[f"{disk}.k_scale"] = kv_scale(amax[0], self.storage)
            out[f"{disk}.v_scale"] = kv_scale(amax[1], self.storage)
        return out


class LayerObserver:
    """Callbacks of the layer loop of :func:`moequant.pipeline.quantize` (``observers=[...]``), a public seam for
    tests and tools; every method does nothing by default. An exception raised here ends the run like any other
    (the finished layers stay in the work directory)."""

    def layer_inputs(self, index: int, prefix: str, hidden: list, kwargs: list) -> None:
        """Before layer ``index`` is calibrated: its inputs (per batch, CPU: a
        :class:`~moequant.pipeline.states.HiddenStates`, whose batches a disk-backed store reads when indexed) and
        the recorded keyword arguments (``kwargs[batch][index]``). The tensors are the pipeline's: do not change
        them."""

    def layer_done(self, index: int, result: Optional[LayerResult]) -> None:
        """After layer ``index`` is committed to the work directory (resumable from the next layer); the commit runs
        while the next layer computes, so this comes after that layer's :meth:`layer_inputs`. ``result`` no longer
        holds the layer module nor its outputs (``result.layer`` / ``result.step`` / ``result.outputs`` are None)."""

