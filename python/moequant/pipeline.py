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
import re
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
__all__ = ["quantize", "preflight", "Plan", "OutputWriteError", "WorkDir"]


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


def resolve_device(spec: Optional[str]) -> torch.device:
    """The torch device of a recipe's ``device`` (None / ``"auto"``: CUDA when available), checked."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} requested but no CUDA GPU is available; use device='cpu'")
    return dev


def _calibration_ids(calibration, model_dir: Path, recipe: Recipe, vocab_size: Optional[int] = None
                     ) -> torch.Tensor:
    """The calibration token ids ``[num_samples, seq_len]``, checked against the model's vocabulary. Text is
    tokenized with the tokenizer saved in ``model_dir``, which is loaded only when some text needs it (token ids,
    as a tensor or JSONL ``input_ids``, need no tokenizer)."""
    from .data import calibration_batches

    cfg = recipe.calibration
    if calibration is None:
        if not cfg.text_files and not cfg.jsonl_files:
            raise ValueError("calibration: no calibration data; pass a text file (CLI: --calib FILE) or set "
                             "calibration.text_files in the recipe")
        ids = calibration_batches(model_dir, cfg)
    elif isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"calibration: expected token ids [num_samples, seq_len] (int64), got "
                             f"{calibration.dtype} {tuple(calibration.shape)}")
        if calibration.numel() == 0:
            raise ValueError(f"calibration: expected token ids [num_samples, seq_len] with at least one sample of "
                             f"at least one token, got the empty shape {tuple(calibration.shape)}")
        ids = calibration.detach().cpu().long()
    elif isinstance(calibration, (str, os.PathLike, list, tuple)):
        files = [calibration] if isinstance(calibration, (str, os.PathLike)) else list(calibration)
        if not files or not all(isinstance(f, (str, os.PathLike)) for f in files):
            raise ValueError(f"calibration: expected a file path or a non-empty list of file paths, got "
                             f"{calibration!r}")
        files = [os.fspath(f) for f in files]
        import dataclasses

        cfg = dataclasses.replace(cfg, text_files=[f for f in files if not f.endswith(".jsonl")],
                                  jsonl_files=[f for f in files if f.endswith(".jsonl")])
        ids = calibration_batches(model_dir, cfg)
    else:
        raise ValueError(f"calibration: expected token ids [num_samples, seq_len] (an int64 tensor), a text or "
                         f"JSONL file path (or a list of them), or None for the recipe's files; got "
                         f"{type(calibration).__name__}")
    if ids.numel() == 0:
        raise ValueError("calibration: the calibration data gave no sample; add text or JSONL samples of at least "
                         f"seq_len={cfg.seq_len} tokens")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        bad = lo if lo < 0 else hi
        row = int((ids == bad).any(dim=1).nonzero()[0, 0])
        limit = f"[0, vocab_size={vocab_size}) of {model_dir / 'config.json'}" if vocab_size else "[0, vocab_size)"
        raise ValueError(f"calibration: token ids must lie in {limit}, got {'min' if lo < 0 else 'max'} id {bad} "
                         f"(sample {row}); "
                         f"tokenize with this model's tokenizer (ids from another tokenizer do not fit its "
                         f"embedding)")
    return ids


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
        for name in linear_modules(layer, fam, prefix):  # by on-disk name (vLLM) and runtime name (transformers)
            disk = fam.disk_name(name)
            if disk not in quantized:
                ignore += [disk] + ([name] if name != disk else [])
        ignore += [n for n in _expert_module_names(lazy, fam, i) if n not in quantized]
    return ignore


class Plan:
    """What :func:`preflight` found: the quantized matrices (``quantized``: on-disk name -> ``(scheme, out, in)``)
    and the estimated bytes a run writes (``work_bytes`` into the work directory, ``checkpoint_bytes`` for the
    export)."""

    def __init__(self):
        self.quantized: dict[str, tuple] = {}
        self.work_bytes = 0
        self.checkpoint_bytes = 0

    @property
    def count(self) -> int:
        return len(self.quantized)


def preflight(lazy: LazyModel, recipe: Recipe, *, output_dir: Union[str, os.PathLike, None] = None,
              export_format: str = "pack-quantized", calibration_shape: Optional[tuple[int, int]] = None,
              resume: bool = False, scan: bool = True, progress: bool = False) -> Plan:
    """Checks everything that can be checked before the first layer starts and before anything is written.

    In order (cheap first): the model is not quantized already; every matrix the recipe quantizes, resolved by its
    on-disk name (group size divides its input dimension; something is quantized at all); every user ``ignore``
    pattern and every override pattern matches a module (else the near matches are listed); with a pack-quantized
    ``output_dir``, every MoE layer's routed experts resolve to one scheme or all to high precision (vLLM runs them
    as one kernel); every tensor the loader reads exists with the shape the config implies (headers only); the
    output's directory is writable and its device has room for the estimated work directory and checkpoint
    (``calibration_shape`` ``(num_samples, seq_len)`` sizes the activations); last, ``scan``: every weight is read
    once and must be finite (``loading.scan_weights``, a bar "checking weights" with ``progress``).

    Raises ValueError (OSError for an unwritable or full output) naming the module, tensor, layer or pattern, the
    expected and the actual value, and the remedy. Returns the :class:`Plan`."""
    from .models import intermediate_size, linear_modules, num_experts, text_config

    fam, plan = lazy.family, Plan()
    if getattr(lazy.config, "quantization_config", None) or getattr(text_config(lazy.config),
                                                                     "quantization_config", None):
        raise ValueError(f"model: {lazy.dir} is quantized already (config.json has a quantization_config); "
                         f"quantize the original unquantized checkpoint")
    packed = output_dir is not None and export_format == "pack-quantized"

    def check(disk_name: str, out_features: int, in_features: int):
        scheme = recipe.resolve(disk_name)
        if scheme is None:
            return None
        g = scheme.group_size
        if g not in (None, -1) and in_features % g:
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
    _check_patterns(recipe, candidates, lazy.reader.index.module_names() | set(candidates))
    lazy.check_layer_tensors()
    _estimate_bytes(plan, lazy, export_format, calibration_shape)
    _check_output(Path(output_dir) if output_dir is not None else None, plan, resume)
    if scan:
        from .loading import scan_weights

        t = time.time()
        scan_weights(lazy.reader.index, progress=progress)
        logger.info("checked %.2f GB of weights for NaN/Inf in %.1f s", lazy.reader.index.total_bytes / 1e9,
                    time.time() - t)
    return plan


def _scheme_label(s) -> str:
    return f"W{s.bits} {'per-channel' if s.group_size in (None, -1) else f'g{s.group_size}'} " \
        f"{'sym' if s.symmetric else 'asym'}"


def _check_expert_schemes(prefix: str, experts: str, resolved: list) -> None:
    """vLLM runs all routed experts of a MoE layer as one fused kernel with one scheme: their gate, up and down
    matrices must all resolve to one scheme (compared with the export's key: bits, group size, symmetric; one group
    spanning the row == per-channel) or all to high precision. ``resolved``: ``(name, scheme or None, in_features)``."""
    from .export import _qt_keys  # the key export._write_replacements compares (it refuses mixed schemes too)

    remedy = (f"give all experts of the layer one scheme with an override of the pattern '{experts}.*' (or "
              f"skip: true for all of them), or export with --format dequantized")
    quantized = [(n, s, k) for n, s, k in resolved if s is not None]
    high = [n for n, s, _ in resolved if s is None]
    if quantized and high:
        raise ValueError(f"{prefix}: the routed experts are partly quantized and partly kept in high precision "
                         f"({quantized[0][0]}: {_scheme_label(quantized[0][1])}; {high[0]}: high precision), but "
                         f"vLLM runs all experts of a MoE layer as one kernel with one scheme; {remedy}")
    keys = first = None
    for name, scheme, in_features in quantized:
        k = _qt_keys(scheme, in_features)
        if keys is None:
            keys, first = k, (name, scheme)
        elif not keys & k:
            raise ValueError(f"{prefix}: the routed experts resolve to different schemes ({first[0]}: "
                             f"{_scheme_label(first[1])}; {name}: {_scheme_label(scheme)}), but vLLM runs all experts "
                             f"of a MoE layer as one kernel with one scheme; {remedy}")
        else:
            keys &= k


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
    from .recipe import DEFAULT_IGNORE, match_pattern

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
    """Fills ``plan.work_bytes`` / ``plan.checkpoint_bytes``: per quantized matrix the work directory holds int8
    codes and float32 scales / int8 zero points per group, the checkpoint its packed codes (bits / 8 bytes a
    weight), scales and zero points (or, dequantized, the weight in the checkpoint dtype); every other tensor is
    copied as it is, and so are the side files (config, tokenizer); the work directory also holds the activations
    (num_samples x seq_len x hidden, in the compute dtype) twice while they are replaced."""
    from .loading import SAFETENSORS_DTYPE_BITS
    from .models import text_config

    index = lazy.reader.index
    storage_bytes = 2
    work = ckpt = source = 0
    for name, (scheme, out_f, in_f) in plan.quantized.items():
        h = index.tensors.get(name + ".weight")
        src = (h.end - h.begin) if h is not None else out_f * in_f * storage_bytes
        if h is not None:
            storage_bytes = SAFETENSORS_DTYPE_BITS[h.dtype] // 8 or 1
        source += src
        groups = 1 if scheme.group_size in (None, -1) else max(in_f // scheme.group_size, 1)
        work += out_f * in_f + out_f * groups * 5
        if export_format == "dequantized":
            ckpt += src
        else:
            ckpt += out_f * in_f * scheme.bits // 8 + out_f * groups * (storage_bytes + scheme.bits / 8)
    ckpt += max(index.total_bytes - source, 0)
    ckpt += sum(f.stat().st_size for f in lazy.dir.iterdir()  # config, tokenizer: copied as they are
                if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")))
    if calibration_shape is not None:
        hidden = int(getattr(text_config(lazy.config), "hidden_size", 0) or 0)
        elem = torch.empty((), dtype=lazy.dtype).element_size()
        work += 2 * calibration_shape[0] * calibration_shape[1] * hidden * elem
    plan.work_bytes, plan.checkpoint_bytes = int(work), int(ckpt)


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _free_bytes(p: Path) -> int:
    try:
        return shutil.disk_usage(_existing_ancestor(p)).free
    except OSError:
        return 0


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def _check_output(out: Optional[Path], plan: Plan, resume: bool) -> None:
    """The directory the run writes into (``out``'s parent, created later if missing; the system temporary
    directory when ``out`` is None) must be writable, and its device must have room for the estimated work
    directory plus checkpoint (less what a resumed work directory holds already). Raises OSError (PermissionError
    for an unwritable directory) with the numbers and the remedy."""
    import errno
    import tempfile

    target = out.parent if out is not None else Path(tempfile.gettempdir())
    base = _existing_ancestor(target)
    if not base.is_dir():
        raise NotADirectoryError(f"output_dir: {base} is not a directory; choose another --out (output_dir)")
    partial = out.with_name(out.name + ".partial") if out is not None else None
    probe_dirs = [base] + ([partial] if resume and partial is not None and partial.is_dir() else [])
    for d in probe_dirs:
        try:
            fd, probe = tempfile.mkstemp(prefix=".moequant-probe-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise PermissionError(exc.errno or errno.EACCES,
                                  f"output_dir: cannot write in {d} ({exc.strerror or exc}); choose a writable --out "
                                  f"(output_dir) or fix the directory's permissions") from None
    need = plan.work_bytes + (plan.checkpoint_bytes if out is not None else 0)
    if resume and partial is not None:
        need = max(need - _dir_bytes(partial), plan.checkpoint_bytes)
    free = _free_bytes(base)
    logger.info("output: about %.2f GB to write (work directory %.2f GB, checkpoint %.2f GB); %.2f GB free in %s",
                need / 1e9, plan.work_bytes / 1e9, plan.checkpoint_bytes / 1e9 if out is not None else 0.0,
                free / 1e9, base)
    if free < need:
        what = f"{out} and {partial}" if out is not None else f"the temporary work directory in {base}"
        ckpt = plan.checkpoint_bytes / 1e9 if out is not None else 0.0
        raise OutputWriteError(errno.ENOSPC, f"not enough free space for {what}: the run writes about "
                               f"{need / 1e9:.2f} GB (work directory {plan.work_bytes / 1e9:.2f} GB, checkpoint "
                               f"{ckpt:.2f} GB), {free / 1e9:.2f} GB are free on that device; free space or choose "
                               f"another --out (output_dir)")


class OutputWriteError(OSError):
    """The output cannot be written: no space (before or during the run), quota, read-only file system, permission.
    ``errno`` says which (ENOSPC, EDQUOT, EROFS, EACCES, EFBIG; None when the writer gave none); its text is the
    message alone (no ``[Errno N]`` prefix), so the CLI prints it as its one error line."""

    def __init__(self, code: Optional[int], message: str, filename: Optional[str] = None):
        super().__init__(code, message)
        self.message, self.filename = message, filename

    def __str__(self) -> str:
        return self.message


def _write_failure(exc: BaseException) -> Optional[tuple]:
    """``(errno or None, filename or None)`` when ``exc`` (or an exception it was raised from) is a failed write of
    the kinds that an output's device causes (full, quota, read-only, permission, file too large), else None.
    safetensors reports ``(os error N)`` in its message; torch.save to a path reports a failed zip write with no
    errno (None)."""
    import errno

    codes = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG}
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in codes:
            return e.errno, e.filename
        text = str(e)
        m = re.search(r"os error (\d+)", text)
        if m and int(m.group(1)) in codes:
            return int(m.group(1)), None
        if "PytorchStreamWriter" in text or ("inline_container.cc" in text and "unexpected pos" in text):
            return None, None
        e = e.__cause__ or e.__context__
    return None


def _is_output_path(filename, out: Optional[Path], work_path: Path) -> bool:
    """Whether a failed file (None: unknown, assumed to be) lies where the run writes: the work directory, or next
    to ``out`` (the export's temporary directory); an error reading the model is not a write failure."""
    if not filename:
        return True
    f = Path(filename).absolute()
    roots = [work_path.absolute()] + ([out.absolute().parent] if out is not None else [])
    return any(f == r or r in f.parents for r in roots)


def _write_error(code: Optional[int], filename, out: Optional[Path], work_path: Path) -> OutputWriteError:
    import errno

    path = Path(filename) if filename else (work_path if out is None or work_path.exists() else out)
    free = _free_bytes(path)
    if code is None and free < 64 * 1024**2:
        code = errno.ENOSPC  # torch.save gives no errno; a device this full is the likely cause
    what = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EFBIG: "file too large for the file system"}.get(code, "a write failed")
    remedy = "choose a writable --out (output_dir)" if code in (errno.EROFS, errno.EACCES) else \
        "free space or choose another --out (output_dir)"
    if out is not None:
        kept = (f"the finished layers are kept in {out.with_name(out.name + '.partial')}, continue with --resume "
                f"(resume=True)")
    else:
        kept = "nothing is kept (without output_dir the work directory is temporary)"
    return OutputWriteError(code, f"{what} writing {path} ({free / 1e9:.2f} GB free); {remedy}; {kept}", str(path))


def quantize(model_or_path, recipe: Union[Recipe, dict, str, None] = None, calibration=None,
             output_dir: Union[str, os.PathLike, None] = None, *, resume: bool = False,
             export_format: str = "pack-quantized", progress: bool = True,
             _after_layer: Optional[Callable[[int], None]] = None) -> QuantizationReport:
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
    Returns:
        :class:`QuantizationReport` (also saved as ``moequant_report.json`` in the output).
    """
    t0 = time.time()
    recipe = _as_recipe(recipe).validated()  # a value set after construction is checked like the constructor's
    if export_format not in ("pack-quantized", "dequantized"):
        raise ValueError(f"export_format: expected 'pack-quantized' or 'dequantized', got {export_format!r}")
    model_dir = _model_dir(model_or_path)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and out.exists():
        raise FileExistsError(f"output_dir: {out} already exists; choose another directory or delete it")
    device = resolve_device(recipe.device)
    # Preflight: everything checkable is checked before the first layer starts and before anything is written.
    from .loading import _config_dtype, check_checkpoint
    from .models import text_config
    import transformers as _tf

    index = check_checkpoint(model_dir)  # headers and file sizes of every shard
    # On the CPU, layers compute in float32 (faster than bf16 there, and more accurate); on a GPU in the
    # checkpoint's dtype. Scales and written-back weights always use the checkpoint's dtype.
    storage = _config_dtype(_tf.AutoConfig.from_pretrained(model_dir))
    lazy = LazyModel(model_dir, dtype=torch.float32 if device.type == "cpu" else storage, index=index)
    precision = hessian_precision(recipe, device, lazy.dtype)
    ids = _calibration_ids(calibration, model_dir, recipe, getattr(text_config(lazy.config), "vocab_size", None))
    plan = preflight(lazy, recipe, output_dir=out, export_format=export_format,
                     calibration_shape=tuple(ids.shape), resume=resume, progress=progress)
    support = _loader_support(lazy, plan, export_format) if out is not None else []
    transforms = build_transforms(recipe, lazy.family, storage)
    for tr in transforms:  # e.g. the rotation of the globals, before the calibration inputs are recorded
        tr.before_calibration(lazy)
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
                                export_format=export_format if out else None, hessian_precision=precision,
                                loaders=[s.to_dict() for s in support])
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
            _export(lazy, work, recipe, transforms, model_dir, out, export_format, report)
            shutil.rmtree(work.path)
            report.seconds = round(time.time() - t0, 3)
    except Exception as exc:  # a full, read-only or forbidden output device: one clear error, the layers kept
        failure = _write_failure(exc)
        if failure is None or not _is_output_path(failure[1], out, work.path):
            raise
        raise _write_error(*failure, out, work.path) from exc
    finally:
        work.close()
        if tmp_root is not None:
            shutil.rmtree(tmp_root, ignore_errors=True)
    return report


def _version() -> str:
    from . import __version__

    return __version__


def _export(lazy: LazyModel, work: WorkDir, recipe: Recipe, transforms: list, model_dir: Path, out: Path,
            export_format: str, report: QuantizationReport) -> None:
    """Writes the checkpoint from the work directory's per-layer results (routed experts laid out per
    :mod:`moequant.expert_layout`), the globals the transforms changed, the recipe and the report."""
    from .checkpoint_io import SafetensorsSource
    from .expert_layout import layer_replacements
    from .models import num_experts

    fam = lazy.family
    schemes = work.schemes(lazy.num_layers)
    qcfg = quantization_config_block(_config_groups(schemes, recipe, fam, lazy), _ignore_list(lazy, schemes))
    overrides = {k: v for tr in transforms for k, v in tr.config_overrides().items()}
    with SafetensorsSource(model_dir) as source:
        def chunks():
            for index, chunk in enumerate(work.iter_replacements(lazy.num_layers)):
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
                          metadata={"version": _version()}, config_overrides=overrides or None)


def _loader_support(lazy: LazyModel, plan: Plan, export_format: str) -> list:
    """Which loaders will read the checkpoint (:mod:`moequant.compat`), from the preflight's plan; every loader
    that will not is named in a warning before the run starts."""
    from .compat import describe, loader_support

    fam = lazy.family
    schemes = {name: _key(scheme) for name, (scheme, _, _) in plan.quantized.items()}
    fused_layers = []
    for i in range(lazy.num_layers):
        experts = _expert_module_names(lazy, fam, i)
        if experts and not fam.disk_fused and not any(n in schemes for n in experts):
            fused_layers.append(f"{lazy.layer_prefix(i)}.{fam.experts}")
    support = loader_support(fam, schemes, export_format, fused_layers)
    for s in support:
        if not s.loads:
            logger.warning("the checkpoint will not load in %s", describe([s]))
    return support


def _key(scheme) -> Optional[tuple]:
    return None if scheme is None else (scheme.bits, scheme.group_size, scheme.symmetric)


def _config_groups(schemes: dict, recipe: Recipe, family, lazy: LazyModel) -> list:
    """One compressed-tensors config group per distinct format (bits, group size, symmetric) and the recipe's
    scale search (``observer``) and act-order (``actorder``) of its modules. The routed experts' group comes first
    and targets the class ``"Linear"`` (vLLM's MoE loader needs that target; transformers dequantizes every expert
    with the first group that targets a class); the others list their modules by exact name, which
    compressed-tensors and vLLM match before class names. Without quantized experts the largest group targets
    ``"Linear"``."""
    expert_modules = {n for i in range(lazy.num_layers) for n in _expert_module_names(lazy, family, i)}
    groups: dict = {}
    for (bits, gs, sym), names in schemes.items():
        for name in names:
            sc = recipe.resolve(name)
            observer = "mse" if sc is not None and sc.scale_search == "mse" else "minmax"
            actorder = "weight" if sc is not None and sc.method == "gptq" and sc.act_order else None
            groups.setdefault((bits, gs, sym, observer, actorder), []).append(name)
    with_experts = [k for k, names in groups.items() if expert_modules.intersection(names)]
    main = max(with_experts or groups, key=lambda k: (len(groups[k]), str(k)))
    order = [main] + sorted((k for k in groups if k != main), key=str)
    return [(["Linear"] if key == main else sorted(groups[key]),
             {"bits": key[0], "group_size": key[1], "symmetric": key[2], "observer": key[3], "actorder": key[4]})
            for key in order]


def _expert_module_names(lazy: LazyModel, family, index: int) -> list[str]:
    """On-disk names of the routed expert matrices of layer ``index`` (empty for a dense layer)."""
    from .models import num_experts

    experts = family.experts_of(lazy.meta_layer(index))
    if experts is None:
        return []
    prefix = lazy.layer_prefix(index)
    return [n for e in range(num_experts(experts)) for n in family.disk_expert_names(prefix, e).values()]


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
