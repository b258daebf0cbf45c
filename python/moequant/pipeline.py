"""The layer-sequential quantization pipeline: calibrate, solve and export one decoder layer at a time.

Flow (:func:`quantize`): the model is opened lazily (:class:`moequant.loading.LazyModel`: only embeddings, norm,
lm_head in memory); calibration windows are embedded and the arguments of every layer recorded; then for each
layer L: load its weights from disk onto the compute device, run the calibration batches through it with the
capture hooks (routed expert rows, Linear inputs -> Hessians), quantize (:mod:`moequant.solve`), write the
dequantized weights back, run the batches through the *quantized* layer to produce layer L+1's inputs, and save
the layer's results, the activations and a progress marker into a work directory ``<out>.partial``
(:mod:`moequant.workdir`). Methods that change weights before they are quantized (rotation, AWQ) hook in as
:mod:`moequant.transforms`. After the last layer the checkpoint is exported atomically (temporary directory, then
rename) and the work directory removed. Peak memory: one layer plus the calibration activations.

A crash or Ctrl-C leaves ``<out>`` absent and ``<out>.partial`` resumable: ``resume=True`` (``--resume``) continues
after the last finished layer, bit-identically to an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import ops
from .capture import LayerCapture
from .export import export_checkpoint, quantization_config_block
from .loading import LazyModel, record_layer_inputs
from .recipe import Recipe
from .report import LayerRecord, QuantizationReport
from .solve import quantize_experts, quantize_linears
from .transforms import LayerStep, build_transforms, layer_export_tensors
from .workdir import WORK_VERSION, WorkDir, model_fingerprint, open_work_dir

logger = logging.getLogger(__name__)

# WorkDir lives in moequant.workdir; re-exported because tests/python/test_awq.py builds one as pipeline.WorkDir.
__all__ = ["quantize", "preflight", "WorkDir"]


def _as_recipe(recipe) -> Recipe:
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, os.PathLike)):
        return Recipe.load(recipe)
    raise ValueError(f"recipe: expected a Recipe, a dict or a recipe file path, got {type(recipe).__name__}")


def _model_dir(model_or_path) -> Path:
    if isinstance(model_or_path, (str, os.PathLike)):
        p = Path(model_or_path)
    else:
        p = Path(getattr(getattr(model_or_path, "config", None), "_name_or_path", "") or "")
        if not (p / "config.json").is_file():
            raise ValueError("model_or_path: moequant quantizes from a checkpoint on disk, layer by layer; save the "
                             "model with save_pretrained(dir) and pass dir")
    if not p.is_dir():
        raise FileNotFoundError(f"model_or_path: {p} is not a directory; pass a local Hugging Face checkpoint")
    return p


def resolve_device(spec: Optional[str]) -> torch.device:
    """The torch device of a recipe's ``device`` (None / ``"auto"``: CUDA when available), checked."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} requested but no CUDA GPU is available; use device='cpu'")
    return dev


def _calibration_ids(calibration, tokenizer, recipe: Recipe) -> torch.Tensor:
    from .data import calibration_batches

    cfg = recipe.calibration
    if calibration is None:
        if not cfg.text_files and not cfg.jsonl_files:
            raise ValueError("calibration: no calibration data; pass a text file (CLI: --calib FILE) or set "
                             "calibration.text_files in the recipe")
        return calibration_batches(tokenizer, cfg)
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration: expected token ids [num_samples, seq_len] (int64), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        return calibration.long()
    if isinstance(calibration, (str, os.PathLike)):
        calibration = [calibration]
    files = [str(c) for c in calibration]
    import dataclasses

    cfg = dataclasses.replace(cfg, text_files=[f for f in files if not f.endswith(".jsonl")],
                              jsonl_files=[f for f in files if f.endswith(".jsonl")])
    return calibration_batches(tokenizer, cfg)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _run_layer(layer, hidden: list, kwargs: list, index: int, device) -> list:
    out = []
    for h, kw in zip(hidden, kwargs):
        y = layer(h.to(device), **kw[index])
        out.append((y[0] if isinstance(y, tuple) else y).cpu())
    return out


def _ignore_list(lazy: LazyModel, schemes: dict) -> list[str]:
    """compressed-tensors ignore: routers and other high-precision modules by pattern, plus every Linear of the
    layers that was not quantized, by exact on-disk name."""
    quantized = {n for names in schemes.values() for n in names}
    ignore = ["lm_head"] + [p for p in lazy.family.ignore_patterns() if p != "lm_head"]
    from .models import linear_modules

    fam = lazy.family
    for i in range(lazy.num_layers):
        layer, prefix = lazy.meta_layer(i), lazy.layer_prefix(i)
        names = [fam.disk_name(n) for n in linear_modules(layer, fam, prefix)]
        experts = fam.experts_of(layer)
        if experts is not None:
            for e in range(experts.gate_up_proj.shape[0]):
                names += list(fam.disk_expert_names(prefix, e).values())
        ignore += [n for n in names if n not in quantized]
    return ignore


def preflight(lazy: LazyModel, recipe: Recipe) -> int:
    """Checks the recipe against every matrix of the model before any work; returns how many are quantized.

    Raises ValueError naming the first module whose input dimension the group size does not divide."""
    from .models import intermediate_size, linear_modules, num_experts

    fam, count = lazy.family, 0

    def check(disk_name: str, in_features: int) -> None:
        nonlocal count
        scheme = recipe.resolve(disk_name)
        if scheme is None:
            return
        count += 1
        g = scheme.group_size
        if g not in (None, -1) and in_features % g:
            raise ValueError(f"group_size: {g} does not divide in_features={in_features} of {disk_name}; choose a "
                             f"group size that divides it (or -1 for per-channel), or add a recipe override for "
                             f"that module")

    for i in range(lazy.num_layers):
        layer, prefix = lazy.meta_layer(i), lazy.layer_prefix(i)
        for name, lin in linear_modules(layer, fam, prefix).items():
            check(fam.disk_name(name), lin.in_features)
        experts = fam.experts_of(layer)
        if experts is not None:
            hidden = experts.gate_up_proj.shape[-1 if fam.layout == "standard" else 1]
            inter = intermediate_size(experts, fam)
            for e in range(num_experts(experts)):
                names = fam.disk_expert_names(prefix, e)
                check(names["gate"], hidden)
                check(names["up"], hidden)
                check(names["down"], inter)
    if count == 0:
        raise ValueError("recipe: no module would be quantized (everything is ignored or skipped); check the "
                         "recipe's ignore list and overrides")
    return count


def quantize(model_or_path, recipe: Union[Recipe, dict, str, None] = None, calibration=None,
             output_dir: Union[str, os.PathLike, None] = None, *, resume: bool = False,
             export_format: str = "pack-quantized", progress: bool = True,
             _after_layer: Optional[Callable[[int], None]] = None) -> QuantizationReport:
    """Quantizes a Hugging Face MoE checkpoint layer by layer and (with ``output_dir``) exports it.

    Args:
        model_or_path: checkpoint directory (or a loaded model whose ``config._name_or_path`` is one).
        recipe: :class:`Recipe`, its dict, or a YAML/JSON recipe file (default: W4 g128 asym GPTQ).
        calibration: token ids ``[num_samples, seq_len]``, text/JSONL file path(s), or None for the recipe's
            ``calibration`` settings.
        output_dir: where the checkpoint is written (must not exist); None quantizes without writing anything.
        resume: continue the unfinished run in ``<output_dir>.partial``.
        export_format: ``"pack-quantized"`` (compressed-tensors) or ``"dequantized"`` (bf16 weights).
    Returns:
        :class:`QuantizationReport` (also saved as ``moequant_report.json`` in the output).
    """
    t0 = time.time()
    recipe = _as_recipe(recipe)
    if export_format not in ("pack-quantized", "dequantized"):
        raise ValueError(f"export_format: expected 'pack-quantized' or 'dequantized', got {export_format!r}")
    model_dir = _model_dir(model_or_path)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and out.exists():
        raise FileExistsError(f"output_dir: {out} already exists; choose another directory or delete it")
    device = resolve_device(recipe.device)
    # On the CPU, layers compute in float32 (faster than bf16 there, and more accurate); on a GPU in the
    # checkpoint's dtype. Scales and written-back weights always use the checkpoint's dtype.
    from .loading import _config_dtype
    import transformers as _tf

    storage = _config_dtype(_tf.AutoConfig.from_pretrained(model_dir))
    lazy = LazyModel(model_dir, dtype=torch.float32 if device.type == "cpu" else storage)
    precision = hessian_precision(recipe, device, lazy.dtype)
    preflight(lazy, recipe)
    transforms = build_transforms(recipe, lazy.family, storage)
    for tr in transforms:  # e.g. the rotation of the globals, before the calibration inputs are recorded
        tr.before_calibration(lazy)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = _calibration_ids(calibration, tokenizer, recipe)
    batch_size = recipe.calibration.batch_size
    fingerprint = {"version": WORK_VERSION, "model": model_fingerprint(model_dir), "recipe": recipe.to_dict(),
                   "calibration_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                   "export_format": export_format}
    import tempfile

    tmp_root = None
    if out is not None:
        work = open_work_dir(out, fingerprint, resume)  # <out>.partial, locked; stale <out>.tmp-* removed
    else:
        tmp_root = tempfile.mkdtemp(prefix="moequant-work-")
        work = WorkDir(Path(tmp_root) / "work", fingerprint, False)
    report = QuantizationReport(model=str(model_dir), family=lazy.family.name, recipe=recipe.to_dict(),
                                device=str(device), calibration_samples=int(ids.shape[0]),
                                calibration_seq_len=int(ids.shape[1]), output_dir=str(out) if out else None,
                                export_format=export_format if out else None, hessian_precision=precision)
    try:
        start = work.completed
        batches = list(ids.split(batch_size))
        recorded = [record_layer_inputs(lazy, b, device) for b in batches]
        kwargs = [r.kwargs_per_layer for r in recorded]
        if start > 0:
            report.resumed_from_layer = start
            hidden = work.load_activations()
            report.layers = [work.load_record(i) for i in range(start)]
            logger.info("resuming after layer %d of %d", start - 1, lazy.num_layers)
        else:
            hidden = [r.hidden_states.cpu() for r in recorded]
        del recorded
        factory = _accumulator_factory(recipe, device, report.hessian_precision)
        weighting = "routing" if recipe.routing_weighted else "none"
        for index in _progress(range(start, lazy.num_layers), lazy.num_layers - start, "quantizing layers",
                               progress):
            t = time.time()
            prefix = lazy.layer_prefix(index)
            layer = lazy.load_layer(index, device)
            step = LayerStep(index, prefix, layer, hidden, kwargs, device)
            for tr in transforms:  # in order: rotation, then AWQ
                tr.before_capture(step)
            with torch.no_grad():
                cap = LayerCapture(layer, lazy.family, layer_prefix=prefix, weighting=weighting,
                                   shared_weighting="gate" if recipe.routing_weighted else "none",
                                   all_tokens=recipe.fallback.policy == "shrink",
                                   all_token_down=recipe.fallback.policy == "shrink"
                                   and recipe.fallback.calibrate_all_experts,
                                   accumulator_factory=factory)
                with cap.attach():
                    _run_layer(layer, hidden, kwargs, index, device)
                res_l, rec_l = quantize_linears(cap, lazy.family, recipe, storage)
                res_e, rec_e = quantize_experts(cap, lazy.family, recipe, prefix, storage)
                hidden = _run_layer(layer, hidden, kwargs, index, device)
            ec = cap.experts
            record = LayerRecord(index=index, prefix=prefix, seconds=round(time.time() - t, 3), moe=ec is not None,
                                 expert_tokens=[int(c) for c in ec.gate_up.counts.tolist()] if ec else [],
                                 expert_mass=[round(float(m), 6) for m in ec.gate_up.mass.tolist()] if ec else [],
                                 modules=rec_l + rec_e)
            dense = layer_export_tensors(transforms, step, {*res_l, *res_e})
            work.save_layer(index, {**res_l, **res_e}, record, hidden, tensors=dense)
            report.layers.append(record)
            del layer, step, cap, res_l, res_e
            logger.info("layer %d/%d done in %.1f s", index + 1, lazy.num_layers, record.seconds)
            if _after_layer is not None:
                _after_layer(index)
        report.seconds = round(time.time() - t0, 3)
        if out is not None:
            schemes = work.schemes(lazy.num_layers)
            if export_format == "pack-quantized" and any(not sym for (_, _, sym) in schemes):
                logger.warning("asymmetric pack-quantized checkpoint: vLLM loads it (asymmetric MoE since vLLM PR "
                               "#44025), transformers 5.23 with compressed-tensors 0.20 does not "
                               "(docs/export.md); use --symmetric or --format dequantized for transformers")
            qcfg = quantization_config_block(_config_groups(schemes), _ignore_list(lazy, schemes))
            chunks = work.iter_replacements(lazy.num_layers)
            extra = [g for g in (tr.export_globals() for tr in transforms) if g is not None]
            if extra:
                import itertools

                chunks = itertools.chain(chunks, extra)
            overrides = {k: v for tr in transforms for k, v in tr.config_overrides().items()}
            export_checkpoint(model_dir, out, chunks, qcfg, mode=export_format,
                              extra_files={"moequant_recipe.json": recipe.to_dict(),
                                           "moequant_report.json": report.to_dict()},
                              metadata={"version": _version()},
                              config_overrides=overrides or None)
            shutil.rmtree(work.path)
            report.seconds = round(time.time() - t0, 3)
    finally:
        work.close()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return report


def _version() -> str:
    from . import __version__

    return __version__


def _config_groups(schemes: dict) -> list:
    """One compressed-tensors config group per distinct scheme. The scheme of most modules targets the class
    "Linear" (vLLM's MoE loader needs that target); the others list their modules by exact name, which
    compressed-tensors and vLLM match before class names."""

    class _S:
        def __init__(self, b, g, s):
            self.bits, self.group_size, self.symmetric = b, g, s

    main = max(schemes, key=lambda k: (len(schemes[k]), k))
    return [(["Linear"] if key == main else sorted(names), _S(*key)) for key, names in sorted(schemes.items())]


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


def _accumulator_factory(recipe: Recipe, device: torch.device, precision: str = "fp32"):
    dtype = torch.float64 if recipe.hessian_dtype == "float64" else torch.float32

    def make(num_experts: int, dim: int, dev):
        d = dev if dtype == torch.float32 else torch.device("cpu")
        return ops.HessianAccumulator(num_experts, dim, dtype=dtype, device=d,
                                      precision=precision if d.type == "cuda" else "fp32")

    return make
