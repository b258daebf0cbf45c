"""Safetensors checkpoints on disk: the one reader of moequant.

:func:`check_checkpoint` validates every file of a checkpoint directory from its headers and size alone (index,
header length and JSON, dtypes, data offsets, exact file size) into a :class:`CheckpointIndex`;
:class:`CheckpointReader` reads tensors lazily, one at a time, from a validated single-file or sharded checkpoint
(the source model, an exported checkpoint); :func:`scan_weights` reads every floating-point tensor once and names
the first holding NaN or Inf.

A checkpoint whose config.json declares an FP8 block-scaled or MXFP4 source (:mod:`moequant.io.source`) is presented
in its *view*: runtime names, bf16 dtypes and decoded shapes (``CheckpointIndex.view``, ``CheckpointReader.names /
shape / dtype / get``), its scale companions hidden; ``CheckpointIndex.tensors`` stays the raw headers (what the
NaN scan and the fingerprint read).
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .files import pread_into

__all__ = ["INDEX_FILE", "SINGLE_FILE", "SAFETENSORS_DTYPE_BITS", "TORCH_DTYPES", "WEIGHT_DTYPES", "TensorHeader",
           "CheckpointIndex", "CheckpointReader", "check_checkpoint", "has_checkpoint", "scan_weights", "layer_of",
           "REMEDY"]

# ---------------------------------------------------------------------------------------------- checkpoint files
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# safetensors dtype strings -> bits per element (safetensors 0.8: sub-byte F4/F6 included).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
# safetensors dtype strings -> torch dtypes (the ones a checkpoint tensor is read as).
TORCH_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
WEIGHT_DTYPES = ("BF16", "F16", "F32", "F64")  # what a floating runtime tensor may be read from
_MAX_HEADER = 100 * 1024**2  # the safetensors readers refuse larger headers
REMEDY = "the file is damaged or incomplete: re-download it or re-save the model (model.save_pretrained(DIR))"


class TensorHeader(NamedTuple):
    """One tensor as its safetensors header describes it (nothing read from the data section)."""

    file: Path
    dtype: str                # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int                # absolute byte offsets of the data in ``file``
    end: int


class CheckpointIndex:
    """The validated headers of every safetensors file of a checkpoint directory: ``tensors`` maps each raw tensor
    name to its :class:`TensorHeader`; ``files`` lists the files; ``total_bytes`` is their tensor data size.

    ``source``: the :class:`~moequant.io.source.SourceFormat` config.json declares (FP8 / MXFP4), else None;
    ``view``: the runtime-visible tensors (name -> :class:`~moequant.io.source.ViewTensor`: every raw tensor as it
    is, or, for a source format, the decoded ones in bf16 with their companions hidden); ``view_bytes``: their
    size as read; ``scan_kinds``: raw scale tensors -> how :func:`scan_weights` checks them."""

    def __init__(self, directory: Path, tensors: dict[str, TensorHeader], files: list[Path], source=None):
        from .source import source_view

        self.dir, self.tensors, self.files, self.source = directory, tensors, files, source
        self.total_bytes = sum(t.end - t.begin for t in tensors.values())
        self.view, self.scan_kinds = source_view(tensors, source)
        self.view_bytes = sum(v.nbytes for v in self.view.values())

    def __contains__(self, name: str) -> bool:
        return name in self.view

    def shape(self, name: str) -> tuple[int, ...]:
        return self.view[name].shape

    def module_names(self) -> set[str]:
        """Module names of the checkpoint: tensor names without their last component (``.weight``, ``.bias``)."""
        return {n.rsplit(".", 1)[0] for n in self.view if "." in n}


def has_checkpoint(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds safetensors weights (an index or a single file) at all."""
    d = Path(model_dir)
    return (d / INDEX_FILE).is_file() or (d / SINGLE_FILE).is_file()


def read_header(path: Path) -> dict[str, TensorHeader]:
    """Validates one safetensors file from its header and size alone; raises ValueError naming the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated: {size} bytes, a safetensors file needs at least 8; {REMEDY}")
        n = struct.unpack("<Q", head)[0]
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: corrupt: the header length field says {n} bytes (at most {_MAX_HEADER}); "
                             f"{REMEDY}")
        if 8 + n > size:
            raise ValueError(f"{path}: truncated: {size} bytes, header needs {8 + n}; {REMEDY}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError(f"expected a JSON object, got {type(header).__name__}")
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"{path}: corrupt: the header is not valid JSON ({exc}); {REMEDY}") from None
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
            raise ValueError(f"{path}: corrupt: tensor {name!r} has a malformed header entry {info!r}; {REMEDY}")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {dtype!r} (known: "
                             f"{', '.join(SAFETENSORS_DTYPE_BITS)}); {REMEDY}")
        numel = math.prod(shape)
        want = (numel * SAFETENSORS_DTYPE_BITS[dtype] + 7) // 8
        if e - b != want:
            raise ValueError(f"{path}: corrupt: tensor {name!r} ({dtype} {list(shape)}) needs {want} bytes, its "
                             f"data offsets [{b}, {e}] span {e - b}; {REMEDY}")
        out[name] = TensorHeader(path, dtype, shape, base + b, base + e)
        end_max = max(end_max, e)
    if size < base + end_max:
        raise ValueError(f"{path}: truncated: {size} bytes, header needs {base + end_max} ({n}-byte header + "
                         f"{end_max} bytes of tensor data); {REMEDY}")
    if size > base + end_max:
        raise ValueError(f"{path}: corrupt: {size} bytes, {size - base - end_max} more than the header describes "
                         f"({base + end_max}); {REMEDY}")
    return out


def check_checkpoint(model_dir: str | os.PathLike) -> CheckpointIndex:
    """Validates every safetensors file of a checkpoint directory from the headers and file sizes alone.

    Checks that the index (``model.safetensors.index.json``) parses and every file it names exists and holds the
    tensors it lists; that each file's 8-byte header length and JSON header parse; that every tensor's dtype is
    known and its data offsets match its shape and lie within the file; and that the file size is exactly
    8 + header + the end of the tensor data (which catches truncation without reading any tensor data).

    A config.json declaring an FP8 block-scaled or MXFP4 source (:mod:`moequant.io.source`) adds the checks of its
    view: every quantized weight has its scale companion with the right dtype and shape.

    Raises:
        FileNotFoundError: no safetensors weights, or a file the index names is missing.
        ValueError: anything else, naming the file, what is wrong and the remedy (re-download / re-save).
    """
    from .source import config_quantization, source_format

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
                             f"{REMEDY}") from None
        files = sorted({d / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {len(missing)} missing file(s): {', '.join(missing[:3])}"
                                    f"{' ...' if len(missing) > 3 else ''}; the download is incomplete: "
                                    f"re-download the model or re-save it")
        tensors: dict[str, TensorHeader] = {}
        headers = {f: read_header(f) for f in files}
        for name, fname in weight_map.items():
            h = headers[d / fname].get(name)
            if h is None:
                raise ValueError(f"{index}: names tensor {name!r} in {fname}, whose header has no such tensor; "
                                 f"{REMEDY}")
            tensors[name] = h
    elif single.is_file():
        files = [single]
        tensors = read_header(single)
    else:
        raise FileNotFoundError(
            f"{d}: no {SINGLE_FILE} or {INDEX_FILE}; moequant reads Hugging Face safetensors checkpoints "
            f"(convert .bin checkpoints with save_pretrained(safe_serialization=True))")
    return CheckpointIndex(d, tensors, files, source_format(config_quantization(d)))


class CheckpointReader:
    """Lazy read access to the tensors of a single-file or sharded safetensors checkpoint directory whose headers
    were validated by :func:`check_checkpoint` (done here unless ``index`` is given). :meth:`get` reads one tensor;
    names, shapes and dtypes come from the headers. A context manager (closes the open files).

    Names, shapes, dtypes and tensors are those of the index's view: an FP8 / MXFP4 source is read in bf16 under
    its runtime names, each decoded tensor decoded when it is read, on ``decode_device`` when given (a GPU: its raw
    bytes go there and are decoded by the kernels), else on the device :meth:`get` returns it on.

    ``names()`` is in file order: the index's order for a sharded checkpoint, sorted for a single file (the order
    safetensors lists it in), which is the order an export writes the tensors it copies."""

    def __init__(self, model_dir: str | os.PathLike, index: CheckpointIndex | None = None,
                 decode_device: torch.device | str | None = None):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.index = index if index is not None else check_checkpoint(self.dir)
        self.decode_device = decode_device
        view = self.index.view
        self._names = list(view) if (self.dir / INDEX_FILE).is_file() else sorted(view)
        self._safe_open = safe_open
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}  # plain descriptors of read_into

    def names(self) -> list[str]:
        """Tensor names in file order (see the class docstring)."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self.index.view

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[self._entry(name).dtype]

    def get(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Reads one tensor (a copy owned by the caller), on ``device`` (default the CPU); a decoded view tensor
        is decoded on ``decode_device`` (else ``device``) and then moved to ``device``."""
        vt = self._entry(name)
        if vt.codec is None:
            t = self.raw(name)
            return t if device is None else t.to(device)
        from .source import decode

        t = decode(name, vt, self.raw, self.decode_device if self.decode_device is not None else device)
        return t.to(device if device is not None else "cpu")

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Reads one tensor into ``out``, a preallocated tensor of its shape (any dtype and device; a slice of a
        larger buffer, e.g. one expert's rows of a fused parameter). A stored tensor is read with ``preadv`` (the
        file is not memory-mapped): straight into ``out``'s memory when ``out`` is a contiguous CPU tensor of its
        dtype (pinned or not), else into one temporary of its stored dtype that is copied into ``out`` (converting
        the dtype as ``Tensor.copy_`` does: bit for bit what ``get(name).to(dtype)`` gives). A decoded view tensor
        (FP8 / MXFP4) is decoded (on ``decode_device`` when given) and copied. Returns ``out``."""
        vt = self._entry(name)
        if tuple(out.shape) != tuple(vt.shape):
            raise ValueError(f"read_into: {name} has shape {list(vt.shape)}, the destination {list(out.shape)}")
        if vt.codec is not None:  # decoded where it decodes, then one copy into out (a GPU's into pinned memory)
            return out.copy_(self.get(name, device=self.decode_device if self.decode_device is not None
                                      else out.device))
        h = self.index.tensors[name]
        stored = TORCH_DTYPES.get(h.dtype)
        if stored is None:  # a dtype torch cannot hold (never a weight: the preflight checks them)
            return out.copy_(self.get(name))
        direct = out.device.type == "cpu" and out.is_contiguous() and stored == out.dtype
        dst = out if direct else torch.empty(h.shape, dtype=stored)
        if dst.numel():
            fd = self._fds.get(h.file)
            if fd is None:
                fd = self._fds[h.file] = os.open(h.file, os.O_RDONLY)
            pread_into(fd, dst, h.begin)
        return out if direct else out.copy_(dst)

    def raw(self, name: str) -> torch.Tensor:
        """Reads one tensor as it is stored (a scale companion, or a quantized weight's codes), on the CPU."""
        try:
            path = self.index.tensors[name].file
        except KeyError:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}") from None
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._safe_open(path, "pt")
        return handle.get_tensor(name)

    def _entry(self, name: str):
        try:
            return self.index.view[name]
        except KeyError:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}") from None

    def close(self) -> None:
        self._handles.clear()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- weight scan
# safetensors dtype (or scan kind of a source's scales) -> (same-width integer view, magnitude mask (all bits but
# the sign), smallest non-finite magnitude (exponent bits all ones: Inf, above it NaN; F8_E4M3 has no Inf, 0x7F is
# its NaN)). The scales of an FP8 / MXFP4 source (moequant.io.source) are checked for the values that *decode* to
# NaN/Inf in bf16: an FP8 weight_scale_inv s with bf16(fp32(448 * s)) = inf (|s| >= 0x7B120000 = 7.58e35, NaN and
# Inf included), an E8M0 byte 255 (NaN) or >= 253 (2^126: every E2M1 code >= 4, which each group of a quantized
# weight holds, decodes beyond bf16's range).
_FLOAT_BITS = {
    "BF16": (torch.int16, 0x7FFF, 0x7F80), "F16": (torch.int16, 0x7FFF, 0x7C00),
    "F32": (torch.int32, 0x7FFFFFFF, 0x7F800000), "F64": (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
    "F8_E5M2": (torch.uint8, 0x7F, 0x7C), "F8_E4M3": (torch.uint8, 0x7F, 0x7F),
    "FP8_SCALE_INV": (torch.int32, 0x7FFFFFFF, 0x7B120000), "E8M0": (torch.uint8, 0xFF, 0xFD),
}  # fmt: skip
_SCAN_CHUNK = 64 * 1024**2  # bytes read and tested at a time


def layer_of(name: str) -> str:
    """``"layer N"`` for a tensor name inside the decoder layers, else ``"outside the decoder layers"``."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return f"layer {m.group(1)}" if m else "outside the decoder layers"


def scan_weights(index: CheckpointIndex, progress: bool = False) -> None:
    """Reads every floating-point tensor of the checkpoint once, file by file in offset order (sequential reads of
    at most 64 MiB into one reused buffer), and raises ValueError naming the first tensor holding NaN or Inf (its
    layer, file, how many and where). A value is non-finite when its exponent bits are all ones (F8_E4M3: its NaN
    code); that is tested on the raw bits as one integer max per chunk (``max(bits & ~sign) >= exponent mask``), so
    no tensor is converted. An FP8 / MXFP4 source is scanned as stored: its FP8 weights for their NaN codes, its
    scales for the values that decode to NaN/Inf (``_FLOAT_BITS``); FP4 codes have none. ``progress`` shows a tqdm
    bar "checking weights"."""
    names = {id(h): n for n, h in index.tensors.items()}
    kinds = {id(h): index.scan_kinds.get(n, h.dtype) for n, h in index.tensors.items()}
    todo = sorted((h for h in index.tensors.values() if kinds[id(h)] in _FLOAT_BITS), key=lambda h: (h.file, h.begin))
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
                    idt, mag, inf = _FLOAT_BITS[kinds[id(h)]]
                    size = views[idt].element_size()
                    f.seek(h.begin)
                    for b in range(h.begin, h.end, _SCAN_CHUNK):
                        nbytes = min(_SCAN_CHUNK, h.end - b)
                        if f.readinto(mv[:nbytes]) != nbytes:
                            raise ValueError(f"{path}: truncated while reading {names[id(h)]}; {REMEDY}")
                        n = nbytes // size
                        if int(torch.bitwise_and(views[idt][:n], mag, out=masked[idt][:n]).max()) >= inf:
                            _raise_non_finite(names[id(h)], h, f, kinds[id(h)])
                        if bar is not None:
                            bar.update(nbytes)
    finally:
        del views, mv
        if bar is not None:
            bar.close()


def _raise_non_finite(name: str, h: TensorHeader, f, kind: str) -> None:
    idt, mag, inf = _FLOAT_BITS[kind]
    f.seek(h.begin)
    x = torch.frombuffer(bytearray(f.read(h.end - h.begin)), dtype=idt)
    bad = x.bitwise_and(mag) >= inf
    n, first = int(bad.sum()), int(bad.nonzero()[0, 0])
    where = list(torch.unravel_index(torch.tensor(first), h.shape)) if h.shape else []
    what = "NaN/Inf value(s)" if kind == h.dtype else f"{kind} scale(s) that decode to NaN/Inf in bf16"
    raise ValueError(f"{name} ({layer_of(name)}, {h.file.name}): {n} {what} of {x.numel()}, the "
                     f"first at index {[int(i) for i in where]}; the checkpoint is corrupt (or was saved from a "
                     f"diverged model): re-download it or re-save it from good weights")

