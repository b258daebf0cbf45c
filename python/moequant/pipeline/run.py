"""The layer-sequential quantization run (:func:`quantize`): calibrate, solve and export one decoder layer at a time.

Flow: the model is opened lazily (:class:`moequant.models.LazyModel`: only embeddings, norm, lm_head in memory)
and checked (:func:`moequant.pipeline.preflight.preflight`); calibration windows are embedded and the arguments of
every layer recorded; then for each layer L: :meth:`~moequant.pipeline.layer.LayerQuantizer.quantize_layer` (load
its weights onto the compute device, apply the transforms, capture the Hessians, solve, write the dequantized
weights back), run the batches through the *quantized* layer to produce layer L+1's inputs, and save the layer's
results, the activations and a progress marker into a work directory ``<out>.partial``
(:mod:`moequant.pipeline.workdir`). After the last layer the checkpoint is exported atomically
(:mod:`moequant.pipeline.export`) and the work directory removed. Peak memory: one layer plus the calibration
activations.

(Over 400 lines: :func:`quantize` is the one entry point whose checks must all run before the first layer -- the
recipe, the preflight, the budget's two passes, the host-memory plan, the distributed refusals -- and the loop.)

A crash or Ctrl-C leaves ``<out>`` absent and ``<out>.partial`` resumable: ``resume=True`` (``--resume``) continues
after the last finished layer, bit-identically to an uninterrupted run.

Under an initialised ``torch.distributed`` group of several ranks (``torchrun``) every rank runs this loop on its
share of the calibration batches and rank 0 alone writes (:mod:`moequant.pipeline.distributed`,
``docs/distributed.md``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..calibration.data import calibration_ids
from ..io.fingerprint import model_fingerprint
from ..io.safetensors import check_checkpoint
from ..methods.base import layer_export_tensors
from ..methods.registry import build_transforms
from ..models import text_config
from ..models.lazy import LazyModel, config_dtype
from ..recipe.device import resolve_device
from ..recipe.recipe import Recipe
from .export import export_run, run_loader_support
from .commits import LayerCommits
from .distributed import BatchSlice, current_context, gather_outputs, scatter_states
from .groups import check_layers_fit
from .host import layer_to_host_later
from .hostmem import StatesPlan, available_host_memory, layer_host_bytes, plan_states
from .layer import LayerObserver, LayerQuantizer, hessian_precision, layer_inputs
from .output import output_write_error
from .preflight import preflight
from .report import QuantizationReport
from .states import StatesStore
from .workdir import WORK_VERSION, WorkDir, open_work_dir

__all__ = ["quantize"]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("pack-quantized", "dequantized")


def _as_recipe(recipe, solvers) -> Recipe:
    if recipe is None:
        return Recipe(solvers=solvers)
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe, solvers)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.load(recipe, solvers)
    raise ValueError(f"recipe: expected a Recipe, a dict or a recipe file path, got {type(recipe).__name__}")


def _expandable_segments() -> None:
    """Lets torch's CUDA allocator grow segments in place (``expandable_segments``) unless the user configured the
    allocator (``PYTORCH_CUDA_ALLOC_CONF``): the expert groups allocate and free tens of GB of differently sized
    Hessians and results per layer, which otherwise fragments the cache by several GB (a DeepSeek-V3 layer on an
    80 GB H100 ran out of memory with 4.2 GB reserved but unallocated)."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    # torch 2.11 deprecates the CUDA-specific setter (a FutureWarning on every run) for the accelerator one
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setter("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:  # an older torch, or a platform without it
        logger.debug("expandable_segments not set: %s", e)


def _model_dir(model_or_path) -> Path:
    if not isinstance(model_or_path, (str, os.PathLike)):
        from torch import nn

        what = f"a {type(model_or_path).__name__}" + (" (torch.nn.Module)" if isinstance(model_or_path, nn.Module)
                                                      else "")
        # A loaded module's weights may differ from the checkpoint at config._name_or_path (edited, fine-tuned,
        # another dtype): quantizing that file instead would silently ignore them, so a module is refused.
        raise ValueError(f"model_or_path: expected the path of a checkpoint directory, got {what}; moequant "
                         f"quantizes a checkpoint on disk, layer by layer; save your model with "
                         f"model.save_pretrained(DIR) and pass DIR")
    p = Path(model_or_path)
    if not p.is_dir():
        raise FileNotFoundError(f"model_or_path: {p} is not a directory; pass a local Hugging Face checkpoint")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model_or_path: {p} has no config.json; pass a Hugging Face model directory")
    return p


def _states_plan(lazy: LazyModel, recipe: Recipe, tokens: int, device: torch.device) -> StatesPlan:
    """Where the run keeps its calibration hidden states (:func:`moequant.pipeline.hostmem.plan_states`): one copy
    is ``tokens x hidden_size`` in the compute dtype; the automatic budget is what is available after the largest
    decoder layer's needs (:func:`~moequant.pipeline.hostmem.layer_host_bytes`; page-locked on a GPU)."""
    elt = torch.empty((), dtype=lazy.dtype).element_size()
    hidden = int(getattr(text_config(lazy.config), "hidden_size", 0) or 0)
    available = layer = 0
    if recipe.host_memory_gb is None:
        available = available_host_memory()
        layer = max(layer_host_bytes([p.numel() * elt for p in lazy.meta_layer(i).parameters()],
                                     pinned=device.type == "cuda") for i in range(lazy.num_layers))
    return plan_states(tokens * hidden * elt, recipe.host_memory_gb, layer, available)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def quantize(model_or_path, recipe: Union[Recipe, dict, str, None] = None, calibration=None,
             output_dir: Union[str, os.PathLike, None] = None, *, resume: bool = False,
             export_format: str = "pack-quantized", progress: bool = True, solvers=None,
             observers: Sequence[LayerObserver] = (), prefetch: Optional[bool] = None, probe=None,
             scan: bool = True) -> QuantizationReport:
    """Quantizes a Hugging Face MoE checkpoint layer by layer and (with ``output_dir``) exports it.

    Args:
        model_or_path: checkpoint directory (a loaded ``nn.Module`` is refused: its weights may differ from the
            checkpoint it came from; save it with ``save_pretrained(DIR)`` and pass DIR).
        recipe: :class:`Recipe`, its dict, or a YAML/JSON recipe file (default: W4 g128 symmetric GPTQ).
        calibration: token ids ``[num_samples, seq_len]`` (no tokenizer needed), text/JSONL file path(s), or None
            for the recipe's ``calibration`` settings. Text is tokenized with the tokenizer saved in the model
            directory.
        output_dir: where the checkpoint is written (must not exist); None quantizes without writing anything.
        resume: continue the unfinished run in ``<output_dir>.partial``.
        export_format: ``"pack-quantized"`` (compressed-tensors) or ``"dequantized"`` (bf16 weights).
        solvers: the :class:`~moequant.methods.SolverRegistry` the recipe's methods are looked up in (default: the
            recipe's own, the built-in solvers unless it was made with another).
        observers: :class:`~moequant.pipeline.layer.LayerObserver` callbacks of the layer loop.
        prefetch: read layer L+1 from the checkpoint on a background thread while layer L computes (None: on a GPU,
            where the layer's weights leave host memory for the device; the results are the same either way).
        probe: ``probe(jobs, storage, recipe)`` sees every batch of solve jobs before they are solved
            (:func:`moequant.pipeline.jobs.finish_jobs`; the budget's measurement pass uses it).
        scan: read every weight once before the run to check it is finite (the preflight's last step).

    A recipe with a ``budget`` (:class:`moequant.methods.budget.BudgetConfig`) runs twice: a measurement pass that
    solves every candidate scheme, then the allocation and the run with it (:mod:`moequant.pipeline.budget`); the
    report's ``budget`` holds the allocation and the saved recipe is the one that ran (the allocation as overrides).

    Returns:
        :class:`QuantizationReport` (also saved as ``moequant_report.json`` in the output).
    """
    t0 = time.time()
    # a value set after construction is checked like the constructor's
    recipe = _as_recipe(recipe, solvers).validated(solvers)
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format: expected 'pack-quantized' or 'dequantized', got {export_format!r}")
    model_dir = _model_dir(model_or_path)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and out.exists():
        raise FileExistsError(f"output_dir: {out} already exists; choose another directory or delete it")
    device = resolve_device(recipe.device)
    dist = current_context(device)  # an initialised process group of several ranks (torchrun): docs/distributed.md
    if dist is not None:
        if device.type == "cuda":  # each rank on its own GPU (torchrun: LOCAL_RANK, torch.cuda.set_device)
            if device.index is not None and device.index != torch.cuda.current_device():
                raise ValueError(f"device: expected 'cuda' in a distributed run (each rank computes on its own "
                                 f"GPU, the current one: cuda:{torch.cuda.current_device()} on rank {dist.rank}), "
                                 f"got {recipe.device!r}")
            device = torch.device("cuda", torch.cuda.current_device())
            if dist.device.type == "cuda":  # NCCL: the collectives run on the rank's GPU (gloo: on the CPU)
                dist.device = device
        if recipe.awq.enabled:
            raise ValueError("awq.enabled: expected false in a distributed run (AWQ searches each layer on all "
                             "calibration batches, which no rank holds); run AWQ in one process")
        if recipe.budget.enabled or probe is not None:
            raise ValueError("budget.enabled: expected false in a distributed run (its measurement pass is not "
                             "distributed yet; the budget is on when budget.bits or budget.size_gb is set); run the "
                             "budget in one process")
        if recipe.gptaq.enabled:
            raise ValueError("gptaq.enabled: expected false in a distributed run (the down_proj inputs through the "
                             "quantized gate/up are not exchanged between ranks yet); run gptaq in one process")
        if recipe.kv_cache is not None:
            raise ValueError(f"kv_cache: expected null in a distributed run (the KV scales are each attention's "
                             f"maximum over all calibration batches, which no rank holds; not reduced across ranks "
                             f"yet), got {recipe.kv_cache!r}; calibrate the KV cache in one process")
    if device.type == "cuda":
        _expandable_segments()
    # Preflight: everything checkable is checked before the first layer starts and before anything is written.
    import transformers

    index = check_checkpoint(model_dir)  # headers and file sizes of every shard
    # On the CPU, layers compute in float32 (faster than bf16 there, and more accurate); on a GPU in the
    # checkpoint's dtype. Scales and written-back weights always use the checkpoint's dtype.
    storage = config_dtype(transformers.AutoConfig.from_pretrained(model_dir))  # bf16 for an FP8 / MXFP4 source
    # an FP8 / MXFP4 source (moequant.io.source) is decoded per tensor as it is read, on the GPU when there is one
    lazy = LazyModel(model_dir, dtype=torch.float32 if device.type == "cpu" else storage, index=index,
                     decode_device=device if device.type == "cuda" else None)
    precision = hessian_precision(recipe, device, lazy.dtype)
    if dist is None:
        ids = calibration_ids(calibration, model_dir, recipe.calibration,
                              getattr(text_config(lazy.config), "vocab_size", None))
    else:  # tokenized once, on rank 0, and the same token ids on every rank
        ids = dist.on_root(lambda: calibration_ids(calibration, model_dir, recipe.calibration,
                                                   getattr(text_config(lazy.config), "vocab_size", None)),
                           "the calibration data")
        dist.check_batches(len(ids.split(recipe.calibration.batch_size)), recipe.calibration.batch_size)
    states = _states_plan(lazy, recipe, int(ids.numel()), device)  # in host memory, or on disk in the work directory
    logger.info("%s", states.describe())
    root = dist is None or dist.is_root
    progress = progress and root
    budget = None
    if recipe.budget.enabled:  # measure every candidate, allocate, then run with the allocation (pipeline.budget)
        from .budget import run_budget, sizing_recipe

        plan = preflight(lazy, sizing_recipe(recipe, solvers), output_dir=out, export_format=export_format,
                         calibration_shape=tuple(ids.shape), resume=resume, progress=progress, scan=scan,
                         states=states)
        recipe, budget = run_budget(quantize, lazy, recipe, plan, ids, model_dir=model_dir, out=out,
                                    export_format=export_format, resume=resume, storage=storage, progress=progress,
                                    solvers=solvers, prefetch=prefetch, device=device)

    def _preflight():
        return preflight(lazy, recipe, output_dir=out, export_format=export_format,
                         calibration_shape=tuple(ids.shape), resume=resume, progress=progress,
                         scan=scan and budget is None, states=states)

    # a distributed run checks (and later writes) on rank 0; its error is every rank's
    plan = _preflight() if dist is None else dist.on_root(_preflight, "the preflight checks")
    # every MoE layer's experts fit the device's budget in groups of at least one (else one error naming it)
    quantizer = LayerQuantizer(lazy, recipe, device, storage, precision=precision,
                               prefetch=device.type == "cuda" if prefetch is None else prefetch, probe=probe,
                               dist=dist)
    if dist is None:
        check_layers_fit(lazy, recipe, int(ids.numel()), quantizer.budget())
    else:  # rank 0's budget decides the groups of every rank
        dist.on_root(lambda: check_layers_fit(lazy, recipe, int(ids.numel()), quantizer.budget()) and None,
                     "the expert group plans")
        quantizer.plan_tokens = int(ids.numel())
    support = run_loader_support(lazy, plan, export_format) if out is not None and root else []
    transforms = build_transforms(recipe, lazy.family, storage)
    for tr in transforms:  # e.g. the rotation of the globals, before the calibration inputs are recorded
        tr.before_calibration(lazy)
    # host_memory_gb changes where the hidden states live, not a bit of the results: a run may resume with another
    fingerprint = {"version": WORK_VERSION, "model": model_fingerprint(model_dir),
                   # kv_cache null, gptaq off: absent, as in the manifests of runs started before the settings existed
                   "recipe": {k: v for k, v in recipe.to_dict().items()
                              if k != "host_memory_gb" and not (k == "kv_cache" and v is None)
                              and not (k == "gptaq" and not v["enabled"])},
                   "calibration_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                   "export_format": export_format}
    tmp_root = work = None

    def _open_work():
        nonlocal tmp_root
        if out is not None:
            return open_work_dir(out, fingerprint, resume)  # <out>.partial, locked; stale <out>.tmp-* removed
        tmp_root = tempfile.mkdtemp(prefix="moequant-work-")
        return WorkDir(Path(tmp_root) / "work", fingerprint, False)

    if dist is not None:
        dist.kept = (f"the finished layers are kept in {out.with_name(out.name + '.partial')}: rerun with --resume "
                     f"(resume=True), with any number of processes") if out is not None else \
            "nothing is kept (without output_dir the work directory is temporary)"
    if dist is None:
        work = _open_work()
    else:  # rank 0 owns the work directory; the others learn where it resumes
        work = dist.on_root(lambda: _OpenedWork(_open_work()), "opening the work directory").work
    report = QuantizationReport(model=str(model_dir), family=lazy.family.name, recipe=recipe.to_dict(),
                                device=str(device), calibration_samples=int(ids.shape[0]),
                                calibration_seq_len=int(ids.shape[1]), output_dir=str(out) if out else None,
                                export_format=export_format if out else None, hessian_precision=precision,
                                loaders=[s.to_dict() for s in support],
                                source_format=lazy.source.to_dict() if lazy.source is not None else None,
                                hidden_states=states.to_dict(), budget=budget)
    # the hidden states between layers: in memory, or in a disk-backed store of the work directory (rank 0 of a
    # distributed run holds every batch; the others hold theirs, in memory)
    store = StatesStore(states.on_disk and root, work.path if work is not None else None,
                        work.umask if work is not None else None, pin_memory=device.type == "cuda")
    hidden = full = None
    batches = ids.split(recipe.calibration.batch_size)
    mine = range(len(batches)) if dist is None else dist.batch_range(len(batches))
    try:
        start = work.completed if dist is None else dist.broadcast_object(
            work.completed if root else None, 0, "the resume point")
        # this rank's batches: contiguous, so that their batches are the single-process run's
        local_ids = ids if dist is None else torch.cat(batches[mine.start:mine.stop])
        hidden, kwargs = layer_inputs(lazy, local_ids, recipe.calibration.batch_size, device, store=store,
                                      keep_hidden=start == 0)
        # embeddings, final norm and lm_head are not needed any more (the export reads the checkpoint)
        logger.debug("released %.2f GB of non-layer weights", lazy.release_non_layer_parts() / 1e9)
        if start > 0:
            report.resumed_from_layer = start
            if root:
                full = work.load_activations(in_memory=not states.on_disk, pin_memory=device.type == "cuda")
            if root and full.dtype != lazy.dtype:  # a CPU run (float32) resumed on a GPU (bf16), or the reverse
                error = ValueError(f"{work.path}: its activations are {full.dtype} but this run computes in "
                                   f"{lazy.dtype} on {device}; resume on the device the run started on (recipe "
                                   f"device, --device), or delete {work.path} to start over")
            else:
                error = None
            if dist is not None:
                dist.on_root(lambda: _raise(error), "checking the resumed activations")
                hidden = scatter_states(dist, full)
            elif error is not None:
                raise error
            else:
                hidden, full = full, None
            if root:
                report.layers = [work.load_record(i) for i in range(start)]
            logger.info("resuming after layer %d of %d", start - 1, lazy.num_layers)
        quantizer.transforms = list(transforms)
        # a streamed layer's expert groups go to the work directory as they finish (not on the other ranks of a
        # distributed run, whose results are rank 0's)
        quantizer.part_writer = work.save_part if dist is None else None
        with (LayerCommits(work, observers) if root else _NoCommits(observers)) as commits:
            for index in _progress(range(start, lazy.num_layers), lazy.num_layers - start, "quantizing layers",
                                   progress):
                t = time.time()
                for obs in observers:
                    obs.layer_inputs(index, lazy.layer_prefix(index), hidden, kwargs)
                # layer L+1 is calibrated on the outputs of the *quantized* layer L (a MoE layer's engine computes
                # them), written batch by batch into the store (rank 0 of a distributed run: every batch's)
                if dist is not None:
                    dist.where = f"layer {index} ({lazy.layer_prefix(index)})"
                shapes = hidden.shapes if dist is None or not root else \
                    [(len(b), *hidden.shapes[0][1:]) for b in batches]
                sink = store.sink(shapes, hidden.dtype)
                try:
                    result = quantizer.quantize_layer(index, hidden, kwargs, outputs=sink)
                    if result.outputs is None:
                        quantizer.run_layer(result.layer, index, hidden, kwargs, out=sink)
                    if dist is None:
                        outputs = sink.finish()
                    elif root:  # the other ranks' batches after rank 0's
                        outputs = gather_outputs(dist, sink, hidden.dtype)
                    else:
                        outputs = sink.finish()
                        gather_outputs(dist, None, hidden.dtype, outputs)
                except BaseException:
                    sink.abort()
                    raise
                dense = layer_export_tensors(transforms, result.step, set(result.results))
                # to host memory on the commit thread (off a GPU on its own stream): the device keeps the codes only
                # until they are copied
                to_host = layer_to_host_later(result.results, dense, quantizer.device)
                result.results, dense = {}, None
                record = result.record(round(time.time() - t, 3))
                result.layer = result.step = result.outputs = None  # the module's memory goes now
                # written while the next layer computes
                commits.submit(index, result, record, outputs, dense, to_host=to_host)
                # submit waited for the previous commit, the last reader of this layer's inputs
                hidden.close()
                if full is not None:
                    full.close()
                hidden, full = outputs, None
                if dist is not None and root:  # rank 0 computes its own batches of all it holds
                    hidden, full = BatchSlice(outputs, mine), outputs
                report.layers.append(record)
                del result
                logger.info("layer %d/%d done in %.1f s", index + 1, lazy.num_layers, record.seconds)
        report.seconds = round(time.time() - t0, 3)
        hidden.close()
        if full is not None:
            full.close()
        if dist is not None:
            dist.where = "the export"

        def _export():
            if out is not None:
                export_run(lazy, work, recipe, transforms, model_dir, out, export_format, report)
                shutil.rmtree(work.path)
                if budget is not None:
                    from .budget import budget_file

                    budget_file(out).unlink(missing_ok=True)
                report.seconds = round(time.time() - t0, 3)
            return report

        # a distributed run: rank 0 exports; every rank returns its report once the checkpoint is complete, or
        # raises its error
        report = _export() if dist is None else dist.on_root(_export, "the export on rank 0")
    except Exception as exc:  # a full, read-only or forbidden output device: one clear error, the layers kept
        error = output_write_error(exc, out, work.path) if work is not None else None
        if error is None:
            raise
        raise error from exc
    finally:
        for states_ in (hidden, full):
            if states_ is not None:
                states_.close()
        quantizer.close()
        if work is not None:
            work.close()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return report


def _raise(error: Optional[BaseException]) -> None:
    if error is not None:
        raise error


class _OpenedWork:
    """Rank 0's opened work directory as :meth:`DistContext.on_root` hands it around: the object itself on rank 0,
    None elsewhere (only its resume point travels, separately)."""

    def __init__(self, work: WorkDir) -> None:
        self.work = work

    def __reduce__(self):
        return (_OpenedWork, (None,))


class _NoCommits:
    """The commits of a rank that writes nothing (not rank 0 of a distributed run): observers still hear of every
    finished layer."""

    def __init__(self, observers) -> None:
        self.observers = list(observers)

    def submit(self, index: int, result, record, hidden, tensors, to_host=None) -> None:
        for obs in self.observers:  # the results are complete on rank 0 only: none copied here
            obs.layer_done(index, result)

    def __enter__(self) -> "_NoCommits":
        return self

    def __exit__(self, *exc) -> None:
        return None
