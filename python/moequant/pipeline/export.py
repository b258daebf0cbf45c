"""The pipeline's export step: the checkpoint written from the work directory's per-layer results (routed experts
laid out per :mod:`moequant.io.expert_layout`, the globals the transforms changed, the recipe and the report), its
``quantization_config`` (config groups, ignore list), and which loaders will read it (:mod:`moequant.io.compat`,
said before the run)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..formats import WeightsConfig, quantization_config_block
from ..formats.kv_cache import KV_SCALE_NAMES
from ..io.compat import LoaderSupport, ModuleScheme, describe, loader_support
from ..io.expert_layout import layer_replacements
from ..io.export import export_checkpoint
from ..io.safetensors import CheckpointReader
from ..models import linear_modules, num_experts
from ..models.lazy import LazyModel
from ..recipe.recipe import Recipe
from .report import QuantizationReport
from .workdir import WorkDir

__all__ = ["export_run", "run_loader_support", "expert_module_names"]

logger = logging.getLogger(__name__)

KV_SCALE_SUFFIXES = tuple(f".{n}" for n in KV_SCALE_NAMES)


def _version() -> str:
    from .. import __version__

    return __version__


def export_run(lazy: LazyModel, work: WorkDir, recipe: Recipe, transforms: list, model_dir: Path, out: Path,
               export_format: str, report: QuantizationReport) -> None:
    """Writes the checkpoint ``out`` from the work directory's per-layer results (routed experts laid out per
    :mod:`moequant.io.expert_layout`), the globals the transforms changed, the recipe and the report."""
    fam = lazy.family
    schemes = work.schemes(lazy.num_layers)
    qcfg = quantization_config_block(_config_groups(schemes, recipe, lazy), _ignore_list(lazy, schemes),
                                     kv_cache=recipe.kv_cache)
    if export_format != "dequantized":
        report.quantization_format = qcfg["format"]
    overrides = {k: v for tr in transforms for k, v in tr.config_overrides().items()}
    # an FP8 / MXFP4 source: the tensors the export copies are decoded (on the GPU of a GPU run) and written in bf16
    decode_device = getattr(lazy.reader, "decode_device", None)
    metadata = {"version": _version(), **({"source_format": lazy.source.to_dict()} if lazy.source else {})}
    with CheckpointReader(model_dir, decode_device=decode_device) as source:
        def chunks():
            for index, chunk in enumerate(work.iter_replacements(lazy.num_layers)):
                if export_format == "dequantized":  # a plain checkpoint: no KV-cache scales without their config
                    chunk.added = {k: v for k, v in chunk.added.items() if not k.endswith(KV_SCALE_SUFFIXES)}
                experts = fam.experts_of(lazy.meta_layer(index))
                yield layer_replacements(fam, lazy.layer_prefix(index), num_experts(experts) if experts is not None
                                         else 0, chunk, source, export_format)
            for tr in transforms:
                extra = tr.export_globals()
                if extra is not None:
                    yield extra

        export_checkpoint(model_dir, out, chunks(), qcfg, mode=export_format,
                          extra_files={"moequant_recipe.json": recipe.to_dict(),
                                       "moequant_report.json": report.to_dict()},
                          metadata=metadata, config_overrides=overrides or None, decode_device=decode_device)


def run_loader_support(lazy: LazyModel, plan, export_format: str) -> list[LoaderSupport]:
    """Which loaders will read the checkpoint (:mod:`moequant.io.compat`), from the preflight's ``plan``; every
    loader that will not is named in a warning before the run starts."""
    fam = lazy.family
    schemes = {name: ModuleScheme.of(scheme, (o, i)) for name, (scheme, o, i) in plan.quantized.items()}
    fused_layers = []
    for i in range(lazy.num_layers):
        experts = expert_module_names(lazy, i)
        if experts and not fam.disk_fused and not any(n in schemes for n in experts):
            fused_layers.append(f"{lazy.layer_prefix(i)}.{fam.experts}")
    support = loader_support(fam, schemes, export_format, fused_layers)
    for s in support:
        if not s.loads:
            logger.warning("the checkpoint will not load in %s", describe([s]))
    return support


def _group_order(key: tuple) -> str:
    """Sort key of a config group ``(format, observer, actorder, activations)``: the text of ``(format key,
    observer, actorder, activation kind)``, which fixes the order of the groups in config.json."""
    fmt, observer, actorder, act = key
    return str((*fmt.key, observer, actorder, act.kind if act is not None else ""))


def _config_groups(schemes: dict, recipe: Recipe, lazy: LazyModel) -> list:
    """One compressed-tensors config group per distinct format and the recipe's scale search (``observer``),
    act-order (``actorder``) and input activations of its modules. The routed experts' group comes first and
    targets the class ``"Linear"`` (vLLM's MoE loader needs that target; transformers dequantizes every expert with
    the first group
    that targets a class); the others list their modules by exact name, which compressed-tensors and vLLM match
    before class names. Without quantized experts the largest group targets ``"Linear"``. ``schemes``:
    {format: [module names]} of the work directory."""
    expert_modules = {n for i in range(lazy.num_layers) for n in expert_module_names(lazy, i)}
    groups: dict = {}
    for fmt, names in schemes.items():
        for name in names:
            sc = recipe.resolve(name)
            observer = "mse" if sc is not None and sc.scale_search == "mse" else "minmax"
            actorder = "weight" if sc is not None and sc.solver.act_order and sc.act_order else None
            groups.setdefault((fmt, observer, actorder, sc.activations if sc is not None else None), []).append(name)
    with_experts = [k for k, names in groups.items() if expert_modules.intersection(names)]
    main = max(with_experts or groups, key=lambda k: (len(groups[k]), _group_order(k)))
    order = [main] + sorted((k for k in groups if k != main), key=_group_order)
    return [(["Linear"] if key == main else sorted(groups[key]), WeightsConfig(*key)) for key in order]


def expert_module_names(lazy: LazyModel, index: int) -> list[str]:
    """On-disk names of the routed expert matrices of layer ``index`` (empty for a dense layer)."""
    family = lazy.family
    experts = family.experts_of(lazy.meta_layer(index))
    if experts is None:
        return []
    prefix = lazy.layer_prefix(index)
    return [n for e in range(num_experts(experts)) for n in family.disk_expert_names(prefix, e).values()]


def _ignore_list(lazy: LazyModel, schemes: dict) -> list[str]:
    """compressed-tensors ignore: routers and other high-precision modules by pattern, plus every Linear of the
    layers that was not quantized, by exact on-disk name."""
    quantized = {n for names in schemes.values() for n in names}
    ignore = ["lm_head"] + [p for p in lazy.family.ignore_patterns() if p != "lm_head"]
    fam = lazy.family
    for i in range(lazy.num_layers):
        layer, prefix = lazy.meta_layer(i), lazy.layer_prefix(i)
        for name in linear_modules(layer, fam, prefix):  # by on-disk name (vLLM) and runtime name (transformers)
            disk = fam.disk_name(name)
            if disk not in quantized:
                ignore += [disk] + ([name] if name != disk else [])
        ignore += [n for n in expert_module_names(lazy, i) if n not in quantized]
    return ignore
