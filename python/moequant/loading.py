"""Lazy, layer-at-a-time model loading from a safetensors checkpoint.

The pipeline never materialises the whole model. :class:`LazyModel` builds the transformers model on the
``meta`` device, loads only the small non-layer parts (embeddings, final norm, lm_head, rotary tables) into
memory, and hands out one decoder layer at a time with its weights read from the checkpoint
(:meth:`LazyModel.load_layer`). Checkpoint names come from the family adapter: per-expert tensors
(``...experts.{e}.gate_proj.weight``) are stacked into the fused runtime parameters (``experts.gate_up_proj``),
other names are mapped with :meth:`MoEFamily.disk_name`.

:func:`record_layer_inputs` runs the cheap part of the model's forward (embeddings, masks, rotary tables)
with every decoder layer replaced by a recorder, which yields exactly the arguments the model would pass to
each layer, for any family, without running a single layer.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .models import MoEFamily, detect_family, text_config

logger = logging.getLogger(__name__)

__all__ = ["CheckpointIndex", "CheckpointReader", "DiskTensor", "LazyModel", "LayerInputs", "PlannedTensor",
           "TensorHeader", "check_checkpoint", "fused_expert_disk_name", "has_checkpoint", "layer_plan",
           "record_layer_inputs", "scan_weights"]


# ---------------------------------------------------------------------------------------------- checkpoint files
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype strings -> bits per element (safetensors 0.8: sub-byte F4/F6 included).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_WEIGHT_DTYPES = ("BF16", "F16", "F32", "F64")  # what a floating runtime tensor may be read from
_MAX_HEADER = 100 * 1024**2  # the safetensors readers refuse larger headers
_REMEDY = "the file is damaged or incomplete: re-download it or re-save the model (model.save_pretrained(DIR))"


class TensorHeader(NamedTuple):
    """One tensor as its safetensors header describes it (nothing read from the data section)."""

    file: Path
    dtype: str                # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int                # absolute byte offsets of the data in ``file``
    end: int


class CheckpointIndex:
    """The validated headers of every safetensors file of a checkpoint directory: ``tensors`` maps each tensor
    name to its :class:`TensorHeader`; ``files`` lists the files; ``total_bytes`` is their tensor data size."""

    def __init__(self, directory: Path, tensors: dict[str, TensorHeader], files: list[Path]):
        self.dir, self.tensors, self.files = directory, tensors, files
        self.total_bytes = sum(t.end - t.begin for t in tensors.values())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def module_names(self) -> set[str]:
        """Module names of the checkpoint: tensor names without their last component (``.weight``, ``.bias``)."""
        return {n.rsplit(".", 1)[0] for n in self.tensors if "." in n}


def has_checkpoint(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds safetensors weights (an index or a single file) at all."""
    d = Path(model_dir)
    return (d / INDEX_FILE).is_file() or (d / SINGLE_FILE).is_file()


def _read_header(path: Path) -> dict[str, TensorHeader]:
    """Validates one safetensors file from its header and size alone; raises ValueError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, a safetensors file needs at least 8; {_REMEDY}")
        n = struct.unpack("<Q", head)[0]
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: corrupt: the header length field says {n} bytes (at most {_MAX_HEADER}); "
                             f"{_REMEDY}")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated: {size} bytes, header needs {8 + n}; {_REMEDY}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {type(header).__name__}")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: corrupt: the header is not valid JSON ({exc}); {_REMEDY}") from None
    base, out, end_max = 8 + n, {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            ok = all(isinstance(x, int) and x >= 0 for x in (*shape, b, e)) and b <= e
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: corrupt: tensor {name!r} has a malformed header entry {info!r}; {_REMEDY}")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (known: "
                             f"{', '.join(SAFETENSORS_DTYPE_BITS)}); {_REMEDY}")
        numel = math.prod(shape)
        want = (numel * SAFETENSORS_DTYPE_BITS[dtype] + 7) // 8
        if e - b != want:
            raise ValueError(f"{path}: corrupt: tensor {name!r} ({dtype} {list(shape)}) needs {want} bytes, its "
                             f"data offsets [{b}, {e}] span {e - b}; {_REMEDY}")
        out[name] = TensorHeader(path, dtype, shape, base + b, base + e)
        end_max = max(end_max, e)
    if size < base + end_max:
        raise ValueError(f"{path}: truncated: {size} bytes, header needs {base + end_max} ({n}-byte header + "
                         f"{end_max} bytes of tensor data); {_REMEDY}")
    if size > base + end_max:
        raise ValueError(f"{path}: corrupt: {size} bytes, {size - base - end_max} more than the header describes "
                         f"({base + end_max}); {_REMEDY}")
    return out


def check_checkpoint(model_dir: str | os.PathLike) -> CheckpointIndex:
    """Validates every safetensors file of a checkpoint directory from the headers and file sizes alone.

    Checks that the index (``model.safetensors.index.json``) parses and every file it names exists and holds the
    tensors it lists; that each file's 8-byte header length and JSON header parse; that every tensor's dtype is
    known and its data offsets match its shape and lie within the file; and that the file size is exactly
    8 + header + the end of the tensor data (which catches truncation without reading any tensor data).

    Raises:
        FileNotFoundError: no safetensors weights, or a file the index names is missing.
        ValueError: anything else, naming the file, what is wrong and the remedy (re-download / re-save).
    """
    d = Path(model_dir)
    index, single = d / INDEX_FILE, d / SINGLE_FILE
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise ValueError("weight_map is not a mapping of tensor names to file names")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: corrupt: not a safetensors index ({exc.__class__.__name__}: {exc}); "
                             f"{_REMEDY}") from None
        files = sorted({d / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {len(missing)} missing file(s): {', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''}; the download is incomplete: "
                                    f"re-download the model or re-save it")
        tensors: dict[str, TensorHeader] = {}
        headers = {f: _read_header(f) for f in files}
        for name, fname in weight_map.items():
            h = headers[d / fname].get(name)
            if h is None:
                raise ValueError(f"{index}: names tensor {name!r} in {fname}, whose header has no such tensor; "
                                 f"{_REMEDY}")
            tensors[name] = h
    elif single.is_file():
        files = [single]
        tensors = _read_header(single)
    else:
        raise FileNotFoundError(
            f"{d}: no {SINGLE_FILE} or {INDEX_FILE}; moequant reads Hugging Face safetensors checkpoints "
            f"(convert .bin checkpoints with save_pretrained(safe_serialization=True))")
    return CheckpointIndex(d, tensors, files)


class CheckpointReader:
    """Reads tensors lazily, one at a time, from a single-file or sharded safetensors checkpoint whose headers
    were validated by :func:`check_checkpoint` (done here unless ``index`` is given)."""

    def __init__(self, model_dir: str | os.PathLike, index: CheckpointIndex | None = None):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.index = index if index is not None else check_checkpoint(self.dir)
        self._where = {name: h.file for name, h in self.index.tensors.items()}
        self._safe_open = safe_open
        self._handles: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index.shape(name)

    def get(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._safe_open(path, "pt")
        return handle.get_tensor(name)


# ---------------------------------------------------------------------------------------------- weight scan
# safetensors dtype -> (same-width integer view, magnitude mask (all bits but the sign), smallest non-finite
# magnitude (exponent bits all ones: Inf, above it NaN; F8_E4M3 has no Inf, 0x7F is its NaN)).
_FLOAT_BITS = {
    "BF16": (torch.int16, 0x7FFF, 0x7F80), "F16": (torch.int16, 0x7FFF, 0x7C00),
    "F32": (torch.int32, 0x7FFFFFFF, 0x7F800000), "F64": (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
    "F8_E5M2": (torch.uint8, 0x7F, 0x7C), "F8_E4M3": (torch.uint8, 0x7F, 0x7F),
}  # fmt: skip
_SCAN_CHUNK = 64 * 1024**2  # bytes read and tested at a time


def _layer_of(name: str) -> str:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return f"layer {m.group(1)}" if m else "outside the decoder layers"


def scan_weights(index: CheckpointIndex, progress: bool = False) -> None:
    """Reads every floating-point tensor of the checkpoint once, file by file in offset order (sequential reads of
    at most 64 MiB into one reused buffer), and raises ValueError naming the first tensor holding NaN or Inf (its
    layer, file, how many and where). A value is non-finite when its exponent bits are all ones (F8_E4M3: its NaN
    code); that is tested on the raw bits as one integer max per chunk (``max(bits & ~sign) >= exponent mask``), so
    no tensor is converted. ``progress`` shows a tqdm bar "checking weights"."""
    todo = sorted((h for h in index.tensors.values() if h.dtype in _FLOAT_BITS), key=lambda h: (h.file, h.begin))
    names = {id(h): n for n, h in index.tensors.items()}
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(h.end - h.begin for h in todo), desc="checking weights", unit="B",
                       unit_scale=True, leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    buf = bytearray(_SCAN_CHUNK)
    mv = memoryview(buf)
    views = {idt: torch.frombuffer(buf, dtype=idt) for idt in {v[0] for v in _FLOAT_BITS.values()}}
    work = torch.empty(_SCAN_CHUNK, dtype=torch.uint8)  # reused: a fresh 64 MiB temporary per chunk costs more
    masked = {idt: work.view(idt) for idt in views}    # (page faults) than the test itself
    try:
        for path in sorted({h.file for h in todo}):
            with open(path, "rb", buffering=0) as f:
                for h in (h for h in todo if h.file == path):
                    idt, mag, inf = _FLOAT_BITS[h.dtype]
                    size = views[idt].element_size()
                    f.seek(h.begin)
                    for b in range(h.begin, h.end, _SCAN_CHUNK):
                        nbytes = min(_SCAN_CHUNK, h.end - b)
                        if f.readinto(mv[:nbytes]) != nbytes:
                            raise ValueError(f"{path}: truncated while reading {names[id(h)]}; {_REMEDY}")
                        n = nbytes // size
                        if int(torch.bitwise_and(views[idt][:n], mag, out=masked[idt][:n]).max()) >= inf:
                            _raise_non_finite(names[id(h)], h, f)
                        if bar is not None:
                            bar.update(nbytes)
    finally:
        del views, mv
        if bar is not None:
            bar.close()


def _raise_non_finite(name: str, h: TensorHeader, f) -> None:
    idt, mag, inf = _FLOAT_BITS[h.dtype]
    f.seek(h.begin)
    x = torch.frombuffer(bytearray(f.read(h.end - h.begin)), dtype=idt)
    bad = x.bitwise_and(mag) >= inf
    n, first = int(bad.sum()), int(bad.nonzero()[0, 0])
    where = list(torch.unravel_index(torch.tensor(first), h.shape)) if h.shape else []
    raise ValueError(f"{name} ({_layer_of(name)}, {h.file.name}): {n} NaN/Inf value(s) of {x.numel()}, the "
                     f"first at index {[int(i) for i in where]}; the checkpoint is corrupt (or was saved from a "
                     f"diverged model): re-download it or re-save it from good weights")


class LayerInputs:
    """What the model passes to each decoder layer for one calibration batch (recorded, not computed here)."""

    def __init__(self, hidden_states: torch.Tensor, kwargs_per_layer: list[dict]):
        self.hidden_states = hidden_states
        self.kwargs_per_layer = kwargs_per_layer


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records its keyword arguments and passes hidden states through."""

    def __init__(self, like: nn.Module, sink: list):
        super().__init__()
        self._sink = sink
        for k, v in vars(like).items():  # plain attributes the model loop may read (layer_type, attention_type)
            if not k.startswith("_") and isinstance(v, (str, int, float, bool)):
                setattr(self, k, v)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("moequant: decoder layers are expected to receive keyword arguments after "
                               "hidden_states; this model's loop passes positional ones")
        self._sink.append(kwargs)
        return hidden_states


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


class LazyModel:
    """A causal LM whose decoder layers are loaded from disk one at a time.

    Args:
        model_dir: a Hugging Face checkpoint directory (config.json + safetensors).
        dtype: dtype of the layers (default: the checkpoint's ``config.dtype``, else bfloat16).
        index: the directory's :func:`check_checkpoint` result, when the caller has it already (else made here).
    """

    def __init__(self, model_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                 experts_implementation: str | None = None, index: CheckpointIndex | None = None,
                 reader: Any = None):
        import transformers

        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.dir}: no config.json; pass a Hugging Face model directory")
        self.config = transformers.AutoConfig.from_pretrained(self.dir)
        if reader is not None and hasattr(self.config, "quantization_config"):
            del self.config.quantization_config  # the reader dequantizes: build the plain model
        self.family: MoEFamily = detect_family(self.config)
        self.dtype = dtype or _config_dtype(self.config)
        # ``reader``: where tensors come from (default the directory's safetensors files, validated by their
        # headers; names(), in, get()), e.g. moequant.exported.ExportedCheckpoint, the source view of a quantized
        # checkpoint: a reader without an ``index`` of headers gets no header checks (load_state_dict still checks
        # every shape).
        self.reader = reader if reader is not None else CheckpointReader(self.dir, index)
        # The capture hook sees the same arguments whatever experts implementation the config dispatches to.
        for attr, value in ((("_experts_implementation", experts_implementation),) if experts_implementation else ()):
            if hasattr(self.config, attr):
                setattr(self.config, attr, value)
        with torch.device("meta"):
            self.model = transformers.AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        self.model.eval()
        self.layers = self.family.layers(self.model)
        self._meta_layers = list(self.layers)
        self._load_non_layer_parts()

    @property
    def num_layers(self) -> int:
        return len(self._meta_layers)

    def layer_prefix(self, index: int) -> str:
        return self.family.layer_prefix(self.model, index)

    def meta_layer(self, index: int) -> nn.Module:
        """Decoder layer ``index`` as built on the meta device (structure and names only, no weights)."""
        return self._meta_layers[index]

    # ------------------------------------------------------------------------------------------ non-layer parts
    def _load_non_layer_parts(self) -> None:
        layers_name = self.family.layer_prefix(self.model, 0).rsplit(".", 1)[0]
        state = {}
        for name, t in self.model.state_dict().items():
            if name.startswith(layers_name + "."):
                continue
            disk = self.family.disk_name(name)
            if disk in self.reader:
                _check_disk_tensor(getattr(self.reader, "index", None), DiskTensor(disk, tuple(t.shape)), t.dtype,
                                   f"model state {name!r}")
                state[name] = self.reader.get(disk).to(t.dtype)
        missing = [n for n in self.model.state_dict() if not n.startswith(layers_name + ".") and n not in state]
        tied = getattr(self.config, "tie_word_embeddings", False) or getattr(
            text_config(self.config), "tie_word_embeddings", False)
        if tied:
            missing = [n for n in missing if not n.endswith("lm_head.weight")]
        if missing:
            raise ValueError(f"{self.dir}: the checkpoint has no tensor for {missing[:5]} (checkpoint names "
                             f"{[self.family.disk_name(n) for n in missing[:5]]}); it does not match its config.json: "
                             f"re-download it or re-save the model")
        self.model.load_state_dict(state, strict=False, assign=True)
        if tied and hasattr(self.model, "get_output_embeddings") and self.model.get_output_embeddings() is not None:
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
        # Non-persistent buffers (rotary inverse frequencies) are computed at construction: rebuild those modules.
        for name, module in list(self.model.named_modules()):
            if name.startswith(layers_name):
                continue
            meta_bufs = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
            if not meta_bufs:
                continue
            try:
                fresh = type(module)(config=self.config)
            except TypeError as exc:
                raise ValueError(
                    f"moequant cannot rebuild module {name!r} ({type(module).__name__}) with buffers {meta_bufs}; "
                    f"this model family is not supported by the lazy loader") from exc
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, fresh)
        leftovers = [n for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                     if t.is_meta and not n.startswith(layers_name + ".")]
        if leftovers:
            raise ValueError(f"moequant: could not materialise {leftovers[:5]} from {self.dir}")

    # ------------------------------------------------------------------------------------------ layers
    def load_layer(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Decoder layer ``index`` with its checkpoint weights, on ``device`` (a fresh module each call)."""
        import copy

        layer = copy.deepcopy(self._meta_layers[index])
        prefix = self.layer_prefix(index)
        state = self._layer_state(layer, prefix)
        layer.load_state_dict(state, strict=True, assign=True)
        still_meta = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
        if still_meta:
            raise ValueError(f"moequant: layer {index} has tensors not stored in the checkpoint "
                                      f"{still_meta[:5]}; this family is not supported by the lazy loader")
        return layer.to(device).eval()

    def layer_plan(self, index: int) -> list["PlannedTensor"]:
        """Which checkpoint tensors (names and shapes) layer ``index`` is read from (:func:`layer_plan`)."""
        return layer_plan(self.family, self._meta_layers[index], self.layer_prefix(index))

    def check_layer_tensors(self) -> int:
        """Checks, from the headers alone, that every tensor :meth:`load_layer` will read for every layer exists
        with the shape (and a floating dtype where the model has one) that the config implies; raises ValueError
        naming the first bad tensor, its layer, the expected and the actual shape. Returns the number checked."""
        n = 0
        for i in range(self.num_layers):
            for entry in self.layer_plan(i):
                for group in entry.groups:
                    for d in group:
                        _check_disk_tensor(getattr(self.reader, "index", None), d, entry.dtype, f"layer {i} state {entry.state!r}")
                        n += 1
        return n

    def _layer_state(self, layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        def read(d: DiskTensor, entry: PlannedTensor) -> torch.Tensor:
            _check_disk_tensor(getattr(self.reader, "index", None), d, entry.dtype, f"{prefix} state {entry.state!r}")
            return self.reader.get(d.name)

        out: dict[str, torch.Tensor] = {}
        for entry in layer_plan(self.family, layer, prefix):
            mats = [torch.cat([read(d, entry) for d in g], dim=0) if len(g) > 1 else read(g[0], entry)
                    for g in entry.groups]
            out[entry.state] = (torch.stack(mats) if entry.stacked else mats[0]).to(entry.dtype)
        return out


# ---------------------------------------------------------------------------------------------- load plan
class DiskTensor(NamedTuple):
    """A checkpoint tensor and the shape the model's config implies for it."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PlannedTensor:
    """One entry of a decoder layer's state dict and the checkpoint tensors it is read from.

    ``groups``: one tuple of :class:`DiskTensor` per stacked slice (per expert), concatenated along dim 0 inside a
    group (gate then up); ``stacked``: the groups are stacked into a new leading (expert) dim, else there is one
    group of one tensor, read as it is."""

    state: str                  # layer-relative state-dict name ("mlp.experts.gate_up_proj")
    shape: tuple[int, ...]      # its runtime shape
    dtype: torch.dtype          # its runtime dtype
    groups: tuple[tuple[DiskTensor, ...], ...]
    stacked: bool = False


def fused_expert_disk_name(family: MoEFamily, layer_prefix: str, state: str) -> str:
    """Checkpoint name of a fused expert tensor (``experts.gate_up_proj`` / ``down_proj`` and their biases) of a
    family whose checkpoint stores the experts fused (``family.disk_fused``).

    This is the one place where a family's own on-disk names for fused experts belong (GraniteMoE:
    ``block_sparse_moe.input_linear.weight`` / ``output_linear.weight``); today the runtime name goes through
    :meth:`MoEFamily.disk_name`, like every other non-expert tensor."""
    return family.disk_name(f"{layer_prefix}.{state}")


def layer_plan(family: MoEFamily, layer: nn.Module, prefix: str) -> list[PlannedTensor]:
    """The load plan of one decoder layer (``layer`` may live on the meta device): for every entry of its state
    dict, the checkpoint tensors it is read from and their expected shapes. Per-expert checkpoint tensors
    (``...experts.{e}.gate_proj.weight [I, H]``, ``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``) are stacked
    into the fused runtime parameters (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``); other names map
    through :meth:`MoEFamily.disk_name` (fused expert tensors through :func:`fused_expert_disk_name`).
    :meth:`LazyModel.load_layer` reads by this plan and :meth:`LazyModel.check_layer_tensors` checks it against the
    checkpoint's headers, so both always agree."""
    fam = family
    experts = fam.experts_of(layer)
    out: list[PlannedTensor] = []
    for name, t in layer.state_dict().items():
        full = f"{prefix}.{name}"
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(t.shape)
        in_experts = experts is not None and name.startswith(fam.experts + ".")
        if in_experts and not fam.disk_fused and leaf in ("gate_up_proj", "down_proj"):
            if fam.layout != "standard":
                raise ValueError(f"{fam.name}: per-expert checkpoints of a transposed layout are not supported")
            n_exp = shape[0]
            groups = []
            for e in range(n_exp):
                names = fam.disk_expert_names(prefix, e)
                if leaf == "gate_up_proj":  # [E, 2I, H]: gate rows first, then up
                    half = (shape[1] // 2, shape[2])
                    groups.append((DiskTensor(names["gate"] + ".weight", half),
                                   DiskTensor(names["up"] + ".weight", half)))
                else:  # [E, H, I]
                    groups.append((DiskTensor(names["down"] + ".weight", shape[1:]),))
            out.append(PlannedTensor(name, shape, t.dtype, tuple(groups), stacked=True))
        else:
            disk = fused_expert_disk_name(fam, prefix, name) if in_experts else fam.disk_name(full)
            out.append(PlannedTensor(name, shape, t.dtype, ((DiskTensor(disk, shape),),)))
    return out


def _check_disk_tensor(index: CheckpointIndex | None, d: DiskTensor, runtime_dtype: torch.dtype, what: str) -> None:
    """Raises ValueError unless checkpoint tensor ``d`` exists with the expected shape (and a floating dtype where
    the runtime tensor is floating). No ``index`` (a reader without headers): nothing to check here."""
    if index is None:
        return
    h = index.tensors.get(d.name)
    if h is None:
        raise ValueError(f"{index.dir}: the checkpoint has no tensor {d.name!r} (needed for {what}, expected shape "
                         f"{list(d.shape)}); the weights do not match config.json: re-download the model or re-save it")
    if h.shape != d.shape:
        raise ValueError(f"{d.name} ({_layer_of(d.name)}, {h.file.name}): shape {list(h.shape)}, but config.json "
                         f"implies {list(d.shape)}; the weights do not belong to this config: use the config.json "
                         f"saved with these weights, or re-save the model")
    if runtime_dtype.is_floating_point and h.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"{d.name} ({_layer_of(d.name)}, {h.file.name}): dtype {h.dtype}, expected one of "
                         f"{', '.join(_WEIGHT_DTYPES)}; moequant quantizes unquantized checkpoints: start from the "
                         f"BF16/F16/F32 weights (dequantize an FP8/FP4 checkpoint first)")


def _config_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.bfloat16


@torch.no_grad()
def record_layer_inputs(lazy: LazyModel, input_ids: torch.Tensor, device: torch.device | str = "cpu"
                        ) -> LayerInputs:
    """Arguments the model passes to every decoder layer for ``input_ids`` ``[B, S]`` (embeddings included).

    Runs the model's own forward with each decoder layer replaced by a recorder, so masks, position ids and
    rotary tables are exactly the model's. Returned tensors live on ``device``.
    """
    model = lazy.model
    sink: list[dict] = []
    recorders = nn.ModuleList(_Recorder(layer, sink) for layer in lazy._meta_layers)
    base = model.get_submodule(lazy.layer_prefix(0).rsplit(".", 2)[0]) if "." in lazy.layer_prefix(0) else model
    original = base.layers
    base.layers = recorders
    captured: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        captured["h"] = kwargs.get("hidden_states", args[0] if args else None)

    hook = recorders[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        base.to(device)
        base(input_ids=input_ids.to(device), use_cache=False)
    finally:
        hook.remove()
        base.layers = original
    kwargs = [{k: v for k, v in kw.items() if k not in ("past_key_values",)} for kw in sink]
    return LayerInputs(captured["h"], kwargs)
