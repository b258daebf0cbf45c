"""The preflight: everything that can be checked before the first layer starts and before anything is written
(:func:`preflight`, docs/pipeline.md "Failure and resume"), and what it found (:class:`Plan`)."""
from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Optional, Union

import torch

from ..calibration.kv_cache import KVCacheHooks, kv_attentions
from ..io.safetensors import SAFETENSORS_DTYPE_BITS, scan_weights
from ..io.source import SUPPORTED, unsupported_reason
from ..models import intermediate_size, linear_modules, num_experts, text_config
from ..models.lazy import LazyModel
from ..recipe.recipe import DEFAULT_IGNORE, Recipe
from ..recipe.scheme import match_pattern
from .output import check_output

__all__ = ["Plan", "preflight"]

logger = logging.getLogger(__name__)


class Plan:
    """What :func:`preflight` found: the quantized matrices (``quantized``: on-disk name -> ``(scheme, out, in)``;
    the scheme is a :class:`~moequant.recipe.QuantScheme`)
    and the estimated bytes a run writes (``work_bytes`` into the work directory, ``checkpoint_bytes`` for the
    export)."""

    def __init__(self):
        self.quantized: dict[str, tuple] = {}
        self.work_bytes = 0
        self.checkpoint_bytes = 0
        self.states = None  # the run's moequant.pipeline.hostmem.StatesPlan (where the hidden states live)

    @property
    def count(self) -> int:
        return len(self.quantized)


def preflight(lazy: LazyModel, recipe: Recipe, *, output_dir: Union[str, os.PathLike, None] = None,
              export_format: str = "pack-quantized", calibration_shape: Optional[tuple[int, int]] = None,
              resume: bool = False, scan: bool = True, progress: bool = False, states=None) -> Plan:
    """Checks everything that can be checked before the first layer starts and before anything is written.

    In order (cheap first): the model is not quantized already; every matrix the recipe quantizes, resolved by its
    on-disk name (group size divides its input dimension; something is quantized at all); every user ``ignore``
    pattern and every override pattern matches a module (else the near matches are listed); with a pack-quantized
    ``output_dir``, every MoE layer's routed experts resolve to one scheme or all to high precision (vLLM runs them
    as one kernel); every tensor the loader reads exists with the shape the config implies (headers only); the
    output's directory is writable and its device has room for the estimated work directory and checkpoint
    (``calibration_shape`` ``(num_samples, seq_len)`` sizes the activations; ``states``, the run's
    :class:`~moequant.pipeline.hostmem.StatesPlan`, says whether they are its disk-backed store); last, ``scan``: every weight is read
    once and must be finite (:func:`moequant.io.safetensors.scan_weights`, a bar "checking weights" with
    ``progress``).

    Raises ValueError (OSError for an unwritable or full output) naming the module, tensor, layer or pattern, the
    expected and the actual value, and the remedy. Returns the :class:`Plan`."""
    fam, plan = lazy.family, Plan()
    plan.states = states
    q = getattr(lazy.config, "quantization_config", None) or getattr(text_config(lazy.config),
                                                                     "quantization_config", None)
    if q:  # an FP8 / MXFP4 source is read decoded: LazyModel dropped its quantization_config
        why = unsupported_reason(q if isinstance(q, dict) else q.to_dict())
        raise ValueError(f"model: {lazy.dir} is quantized already (config.json's quantization_config: {why}); "
                         f"moequant reads unquantized checkpoints and {SUPPORTED}: quantize the original "
                         f"unquantized checkpoint")
    packed = output_dir is not None and export_format == "pack-quantized"

    def check(disk_name: str, out_features: int, in_features: int):
        scheme = recipe.resolve(disk_name)
        if scheme is None:
            return None
        g = scheme.group_size
        if not scheme.format.divides(in_features) and scheme.preset is not None:
            raise ValueError(f"preset: {scheme.preset} quantizes groups of {g} input columns, which do not divide "
                             f"in_features={in_features} of {disk_name}; add a recipe override for that module (another "
                             f"scheme, or skip: true)")
        if not scheme.format.divides(in_features):
            raise ValueError(f"group_size: {g} does not divide in_features={in_features} of {disk_name}; choose a "
                             f"group size that divides it (or -1 for per-channel), or add a recipe override for "
                             f"that module")
        plan.quantized[disk_name] = (scheme, out_features, in_features)
        return scheme

    candidates: list[str] = []
    for i in range(lazy.num_layers):
        layer, prefix = lazy.meta_layer(i), lazy.layer_prefix(i)
        for name, lin in linear_modules(layer, fam, prefix).items():
            candidates.append(fam.disk_name(name))
            check(candidates[-1], lin.out_features, lin.in_features)
        experts = fam.experts_of(layer)
        if experts is not None:
            hidden = experts.gate_up_proj.shape[-1 if fam.layout == "standard" else 1]
            inter = intermediate_size(experts, fam)
            resolved = []
            for e in range(num_experts(experts)):
                names = fam.disk_expert_names(prefix, e)
                for proj, (o, k) in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter))):
                    candidates.append(names[proj])
                    resolved.append((names[proj], check(names[proj], o, k), k))
            if packed:
                _check_expert_schemes(prefix, f"{prefix}.{fam.disk_experts}", resolved)
    if not plan.quantized:
        raise ValueError("recipe: no module would be quantized (everything is ignored or skipped); check the "
                         "recipe's ignore list and overrides")
    if recipe.kv_cache is not None:
        _check_kv_cache(lazy, recipe.kv_cache)
    _check_patterns(recipe, candidates, lazy.reader.index.module_names() | set(candidates))
    lazy.check_layer_tensors()
    _estimate_bytes(plan, lazy, export_format, calibration_shape)
    check_output(Path(output_dir) if output_dir is not None else None, plan, resume)
    if scan:
        t = time.time()
        scan_weights(lazy.reader.index, progress=progress)
        logger.info("checked %.2f GB of weights for NaN/Inf in %.1f s", lazy.reader.index.total_bytes / 1e9,
                    time.time() - t)
    return plan


def _check_kv_cache(lazy: LazyModel, kind: str) -> None:
    """``kv_cache``: the model has attentions whose KV cache moequant sees (``self_attn`` with ``k_proj`` /
    ``v_proj`` calling ``past_key_values.update``: :mod:`moequant.calibration.kv_cache`)."""
    found = 0
    for i in range(lazy.num_layers):
        attentions = kv_attentions(lazy.meta_layer(i), lazy.layer_prefix(i))
        KVCacheHooks(attentions, lambda *a: None)  # the forward takes past_key_values (else ValueError)
        found += len(attentions)
    if not found:
        raise ValueError(f"kv_cache: {kind!r} needs attentions that cache keys and values (self_attn with k_proj and "
                         f"v_proj); {lazy.family.name}'s attention caches something else (MLA: a compressed "
                         f"latent), which moequant does not calibrate; set kv_cache to null")


def _check_expert_schemes(prefix: str, experts: str, resolved: list) -> None:
    """vLLM runs all routed experts of a MoE layer as one fused kernel with one scheme: their gate, up and down
    matrices must all resolve to one format (compared as the export compares them, ``IntFormat.equivalents``: one
    group spanning the row == per-channel) or all to high precision. ``resolved``: ``(name, scheme or None,
    in_features)``."""
    remedy = (f"give all experts of the layer one scheme with an override of the pattern '{experts}.*' (or "
              f"skip: true for all of them), or export with --format dequantized")
    quantized = [(n, s, k) for n, s, k in resolved if s is not None]
    high = [n for n, s, _ in resolved if s is None]
    if quantized and high:
        raise ValueError(f"{prefix}: the routed experts are partly quantized and partly kept in high precision "
                         f"({quantized[0][0]}: {_label(quantized[0][1])}; {high[0]}: high precision), but "
                         f"vLLM runs all experts of a MoE layer as one kernel with one scheme; {remedy}")
    keys = first = None
    for name, scheme, in_features in quantized:
        k = {(f, scheme.activations) for f in scheme.format.equivalents(in_features)}
        if keys is None:
            keys, first = k, (name, scheme)
        elif not keys & k:
            raise ValueError(f"{prefix}: the routed experts resolve to different schemes ({first[0]}: "
                             f"{_label(first[1])}; {name}: {_label(scheme)}), but vLLM runs all experts "
                             f"of a MoE layer as one kernel with one scheme; {remedy}")
        else:
            keys &= k


def _label(scheme) -> str:
    """``"W4 g128 sym"``, ``"NVFP4"``: a scheme's format (and activations) in messages."""
    return scheme.preset or scheme.format.label()


_GROUP_RE = re.compile(r"\.(\d+)(?=\.|$)")


def _near_matches(pattern: str, names: set, n: int = 3) -> list[str]:
    """Up to ``n`` module names like ``pattern``: for a plain name the closest names (difflib); for a glob or a
    regex the closest names with every index replaced by ``*`` (``model.layers.*.self_attn.q_proj``), else the
    names sharing the longest literal prefix with it."""
    import difflib

    regex = pattern.startswith("re:")
    body = pattern[3:] if regex else pattern
    if not regex and not re.search(r"[*?\[]", body):
        return difflib.get_close_matches(body, sorted(names), n=n, cutoff=0.6)
    grouped = sorted({_GROUP_RE.sub(".*", x) for x in names})
    query = body.lstrip("^").rstrip("$").replace("\\.", ".").replace(".*", "*") if regex else body
    found = difflib.get_close_matches(query, grouped, n=n, cutoff=0.6)
    if found:
        return found
    literal = re.split(r"[*?\[]", query, maxsplit=1)[0]
    if regex:
        literal = re.split(r"[\\^$*+?{}()|\[\].]", body.lstrip("^").replace("\\.", "\0"), maxsplit=1)[0]
        literal = literal.replace("\0", ".")
    best = max((len(os.path.commonprefix([literal, g])) for g in grouped), default=0)
    return [g for g in grouped if len(os.path.commonprefix([literal, g])) == best][:n] if best else []


def _check_patterns(recipe: Recipe, candidates: list[str], modules: set[str]) -> None:
    """Every user ``ignore`` pattern must match a module of the checkpoint (``modules``; the built-in
    DEFAULT_IGNORE patterns are exempt: they cover every family) and every override pattern a module that the
    recipe resolves (``candidates``, the matrices moequant may quantize): a pattern matching nothing is a typo that
    would silently quantize the wrong modules."""
    def near(pattern: str, names) -> str:
        found = _near_matches(pattern, set(names))
        return f"near matches: {', '.join(found)}" if found else "no module name is close to it"

    for i, pattern in enumerate(recipe.ignore):
        if pattern in DEFAULT_IGNORE or any(match_pattern(pattern, m) for m in modules):
            continue
        raise ValueError(f"ignore[{i}]: pattern {pattern!r} matches no module of the checkpoint "
                         f"({near(pattern, modules)}); fix or remove it (patterns match whole checkpoint module "
                         f"names: docs/recipes.md)")
    for i, o in enumerate(recipe.overrides):
        if any(o.matches(m) for m in candidates):
            continue
        raise ValueError(f"overrides[{i}].pattern: {o.pattern!r} matches no module that moequant quantizes in this "
                         f"model ({near(o.pattern, candidates)}); fix or remove it (patterns match whole checkpoint "
                         f"module names; embeddings, lm_head and routers are never quantized: docs/recipes.md)")


def _estimate_bytes(plan: Plan, lazy: LazyModel, export_format: str, calibration_shape) -> None:
    """Fills ``plan.work_bytes`` / ``plan.checkpoint_bytes``: per quantized matrix the work directory holds one-byte
    codes and float32 scales / zero points or scale bytes per group (block), the checkpoint its packed codes (bits / 8 bytes a
    weight), scales and zero points (or, dequantized, the weight in the checkpoint dtype); every other tensor is
    copied as it is, and so are the side files (config, tokenizer); the work directory also holds the activations
    (num_samples x seq_len x hidden, in the compute dtype) twice while they are replaced. Sizes are those of the
    checkpoint's view: an FP8 / MXFP4 source's tensors as decoded (bf16), which is how the export writes them."""
    index = lazy.reader.index
    storage_bytes = 2
    work = ckpt = source = 0
    for name, (scheme, out_f, in_f) in plan.quantized.items():
        h = index.view.get(name + ".weight")
        src = h.nbytes if h is not None else out_f * in_f * storage_bytes
        if h is not None:
            storage_bytes = SAFETENSORS_DTYPE_BITS[h.dtype] // 8 or 1
        source += src
        scales = math.prod(scheme.format.scale_shape(out_f, in_f))
        work += out_f * in_f + scales * 5
        if export_format == "dequantized":
            ckpt += src
        else:
            ckpt += out_f * in_f * scheme.bits // 8 + scales * (storage_bytes + scheme.bits / 8)
    ckpt += max(index.view_bytes - source, 0)
    ckpt += sum(f.stat().st_size for f in lazy.dir.iterdir()  # config, tokenizer: copied as they are
                if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")))
    if calibration_shape is not None:
        hidden = int(getattr(text_config(lazy.config), "hidden_size", 0) or 0)
        elem = torch.empty((), dtype=lazy.dtype).element_size()
        work += 2 * calibration_shape[0] * calibration_shape[1] * hidden * elem
    plan.work_bytes, plan.checkpoint_bytes = int(work), int(ckpt)

