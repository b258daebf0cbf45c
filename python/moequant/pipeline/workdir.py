"""The work directory of a pipeline run (``<out>.partial``): what makes :func:`moequant.pipeline.quantize` resumable.

Files:

* ``manifest.json``: the run's fingerprint (:func:`moequant.io.fingerprint.model_fingerprint` of the checkpoint's
  content, recipe, calibration hash, export format, :data:`WORK_VERSION`); a resume must present the same one;
* per finished layer ``layer_NNNNN.safetensors`` (of every quantized matrix its codes and scales, and zero points
  for an integer format, or the scale bytes, NVFP4's global scale and input global scale for a floating-point one;
  their formats as ``[bits, group_size, symmetric]`` or ``[kind]`` in the metadata, plus ``dense::<name>``
  high-precision tensors a transform changed and ``added::<name>`` tensors the source lacks: the KV-cache
  ``k_scale`` / ``v_scale``) and ``layer_NNNNN.json`` (its report record); a layer whose routed experts went through
  the device in several groups has its experts' results in ``layer_NNNNN.partKKKK.safetensors`` files (same layout,
  one per group, written as the groups finish: host memory holds a group's results, not the layer's), their number
  in the layer file's metadata (``parts``);
* ``activations_NNNNN.safetensors``: the calibration hidden states after layer NNNNN, one tensor per batch
  (:mod:`moequant.pipeline.states`; with the disk-backed store the very file the layer wrote its outputs into,
  flushed and renamed: the states are written once);
* ``progress.json``: ``{"completed_layers": n, "activations": "activations_<n-1>.safetensors"}``, the commit marker;
* ``lock``: held (``flock``) by the process that uses the directory; it names that process (pid, host)
  (:mod:`moequant.pipeline.lock`).

Atomicity: every file is written to a temporary name, flushed and renamed into place, and a layer is committed by
one rename, that of ``progress.json``. A layer's files and its activations are written under names no committed
state refers to (the layer's own index) before the marker moves to them; the previous activations are removed only
after it has moved. A disk-backed store's file being written by the next layer (``states.tmp-*``) is an orphan until
its layer commits: a resume removes it with the other temporaries, and the part files of layers it does not count. A kill at any point therefore leaves either the state before the layer or the state after it,
and a resume continues bit-identically. The directory itself appears fully formed (manifest and held lock) by one
rename of a temporary directory.

Every damaged or foreign file is reported as a one-line ValueError naming the file and saying to delete the
directory; a directory another live process holds is refused with that process's pid.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..formats import FloatFormat, weight_format_from_key
from ..io.export import Replacements
from ..io.files import (OWNER_FILE, atomic_write, atomic_write_json, current_umask, make_owned_tmpdir,
                        remove_stale_temporaries)
from ..ops import FloatQuantizedTensor, QuantizedTensor
from .lock import try_lock
from .report import LayerRecord
from .states import HiddenStates, MemoryStates, open_states

__all__ = ["WORK_VERSION", "WorkDir", "open_work_dir"]

WORK_VERSION = 5  # the format of the files above; part of every run's fingerprint (manifest.json). 5: a layer's
# expert groups in part files; 4: floating-point results (scale bytes, NVFP4 global / input global scales),
# 3: activations in safetensors (moequant.pipeline.states), 2: torch.save lists

MANIFEST, PROGRESS = "manifest.json", "progress.json"
_ACTIVATIONS = re.compile(r"activations_(\d{5})\.safetensors")
_PART = re.compile(r"layer_(\d{5})\.part(\d{4})\.safetensors")


def _part_name(index: int, part: int) -> str:
    return f"layer_{index:05d}.part{part:04d}.safetensors"


def _differences(old: dict, new: dict) -> str:
    """What differs between two run fingerprints, in words ('' when they match)."""
    said = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict) and "files" in a and "files" in b:
            fa, fb = a["files"], b["files"]
            if fa != fb:
                changed = sorted(n for n in set(fa) | set(fb) if fa.get(n) != fb.get(n))
                where = f" (it was made from {a.get('path')})" if a.get("path") != b.get("path") else ""
                said.append(f"the model's content differs: {', '.join(changed[:3])}"
                            f"{' ...' if len(changed) > 3 else ''} changed{where}")
            continue
        if a == b:
            continue
        if key == "model":
            said.append("the model differs")
        elif key == "recipe":
            if isinstance(a, dict) and isinstance(b, dict):
                parts = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                said.append(f"the recipe differs ({', '.join(parts)})")
            else:
                said.append("the recipe differs")
        elif key == "calibration_sha256":
            said.append("the calibration data differs (another text, sample count, length or seed)")
        elif key == "export_format":
            said.append(f"the format differs (it was {a}, now {b})")
        else:
            said.append(f"{key} differs")
    return "; ".join(said)


def _brief(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 160 characters: for one-line error messages."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip() if lines else ''}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


# ------------------------------------------------------------------------------------------ the work directory
class WorkDir:
    """The resumable state of one run: per-layer results, activations after the last finished layer, progress.

    Opening it takes its lock (released by :meth:`close` or when the process ends, also by a kill)."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict, resume: bool):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None
        self._umask = current_umask()
        self._completed, self._activations = 0, None
        self.created = False  # True when this call created the directory (a fresh run)
        try:
            self._open(fingerprint, resume)
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------------
    def _damaged(self, name: str, what: str) -> ValueError:
        return ValueError(f"{self.path / name}: {what}; the work directory is damaged: delete {self.path} and run "
                          "again (the finished layers are recomputed)")

    def _open(self, fingerprint: dict, resume: bool) -> None:
        for _ in range(5):
            if not (self.path.exists() or self.path.is_symlink()):
                if self._create(fingerprint):
                    return
                continue  # another process created it first: now it exists
            self._lock_fd = try_lock(self.path)
            if self._lock_fd is None:
                continue  # removed meanwhile
            if not resume:
                raise FileExistsError(f"{self.path} holds an unfinished run; pass resume=True (CLI: --resume) to "
                                      "continue it, or delete it")
            self._check_manifest(fingerprint)
            self._read_progress()
            self._remove_orphans()
            return
        raise ValueError(f"{self.path} keeps appearing and disappearing; is another moequant run using it?")

    def _create(self, fingerprint: dict) -> bool:
        """Creates the directory with its manifest and held lock by renaming a prepared temporary directory into
        place; False when another process created it first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_owned_tmpdir(self.path, self._umask)
        fd = None
        try:
            fd = try_lock(tmp)
            atomic_write_json(tmp / MANIFEST, fingerprint, umask=self._umask)
            try:
                os.rename(tmp, self.path)  # fails if the path exists (unless it is an empty directory)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    os.close(fd)
                    fd = None
                    shutil.rmtree(tmp, ignore_errors=True)
                    return False
                raise
        except BaseException:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._lock_fd, self.created = fd, True
        (self.path / OWNER_FILE).unlink(missing_ok=True)  # the lock now says who uses it
        return True

    def _check_manifest(self, fingerprint: dict) -> None:
        p = self.path / MANIFEST
        try:
            old = json.loads(p.read_text())
        except FileNotFoundError:
            raise self._damaged(MANIFEST, "missing (not a moequant work directory, or a damaged one)") from None
        except (OSError, ValueError) as exc:
            raise self._damaged(MANIFEST, f"unreadable ({_brief(exc)})") from None
        if not isinstance(old, dict):
            raise self._damaged(MANIFEST, f"expected a JSON object, got {type(old).__name__}")
        if old.get("version") != fingerprint.get("version"):  # then the other fields may not even be comparable
            raise ValueError(f"{self.path}: cannot resume: it was made by another moequant version (work format "
                             f"{old.get('version')}; this one reads {fingerprint.get('version')}); finish it with that "
                             f"version, or delete {self.path} to start over")
        diff = _differences(old, fingerprint)
        if diff:
            raise ValueError(f"{self.path}: cannot resume: the unfinished run used different settings ({diff}); "
                             f"rerun with its settings, or delete {self.path} to start over")

    def _read_progress(self) -> None:
        p = self.path / PROGRESS
        if not p.exists():
            self._completed, self._activations = 0, None
            return
        try:
            progress = json.loads(p.read_text())
            n, act = progress["completed_layers"], progress["activations"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._damaged(PROGRESS, f"unreadable ({_brief(exc)})") from None
        m = _ACTIVATIONS.fullmatch(act) if isinstance(act, str) else None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1 or m is None or int(m.group(1)) != n - 1:
            raise self._damaged(PROGRESS, f"expected completed_layers >= 1 and its activations file, got {progress}")
        for name in [act] + [f"layer_{i:05d}.{ext}" for i in range(n) for ext in ("safetensors", "json")]:
            if not (self.path / name).is_file():
                raise self._damaged(name, f"missing, but {PROGRESS} counts {n} finished layer(s)")
        self._completed, self._activations = n, act
        for i in range(n):  # headers and records only (cheap): damage shows now, not after hours of work
            self._read_layer(i, False)
            self.load_record(i)
        self.load_activations(in_memory=False).close()  # the header and the file size

    def _remove_orphans(self) -> None:
        """Removes what no committed state refers to (when the directory is opened for a resume): activations of
        earlier layers (the marker has moved past them), part files of layers not committed and temporary files of
        interrupted writes (also a disk-backed store's unfinished ``states.tmp-*``)."""
        for p in self.path.iterdir():
            name = p.name
            stale_act = name.startswith("activations") and name != self._activations
            part = _PART.fullmatch(name)
            stale_part = part is not None and int(part.group(1)) >= self._completed  # of a layer never committed
            if stale_act or stale_part or ".tmp-" in name or name == OWNER_FILE:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def close(self) -> None:
        """Releases the lock (idempotent)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "WorkDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- progress ------------------------------------------------------------------------------------
    @property
    def umask(self) -> int:
        """The umask the directory's files are written under (the process's when it was opened)."""
        return self._umask

    @property
    def completed(self) -> int:
        """Layers finished (committed)."""
        return self._completed

    def save_layer(self, index: int, results: dict, record: LayerRecord, hidden,
                   tensors: Optional[dict] = None, added: Optional[dict] = None, parts: int = 0) -> None:
        """Commits layer ``index`` (= :attr:`completed`): its results, record and the activations after it
        (``hidden``: a :class:`~moequant.pipeline.states.HiddenStates`, or a list of batch tensors; states of the
        disk-backed store are flushed and renamed into place, others written).

        ``tensors``: optional on-disk tensor name -> high-precision tensor (e.g. a norm or router weight changed
        by a smoothing or rotation transform) that the export writes in place of the source tensor. ``added``:
        on-disk tensor name -> a tensor the source lacks (the KV-cache scales), written as it is. ``parts``: the
        layer's part files written before (:meth:`save_part`, numbered from 0), whose results belong to it too."""
        from safetensors.torch import save_file

        if index != self._completed:
            raise ValueError(f"index: expected the next layer {self._completed}, got {index}")
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 0:
            raise ValueError(f"parts: expected an int >= 0, got {parts!r}")
        for k in range(parts):
            if not (self.path / _part_name(index, k)).is_file():
                raise ValueError(f"parts: layer {index} has {parts} part(s), but {_part_name(index, k)} is missing")
        stored, meta = _stored(results)
        for name, t in (tensors or {}).items():
            stored[f"dense::{name}"] = t.detach().contiguous().cpu()
        for name, t in (added or {}).items():
            stored[f"added::{name}"] = t.detach().contiguous().cpu()
        metadata = {"schemes": json.dumps(meta)}
        if parts:
            metadata["parts"] = str(parts)
        # 1. files of this layer, under its own index: no committed state refers to them yet
        atomic_write(self.path / f"layer_{index:05d}.safetensors",
                     lambda tmp: save_file(stored, str(tmp), metadata=metadata), umask=self._umask)
        atomic_write_json(self.path / f"layer_{index:05d}.json", record.to_dict(), umask=self._umask)
        act = f"activations_{index:05d}.safetensors"
        states = hidden if isinstance(hidden, HiddenStates) else MemoryStates([h.cpu() for h in hidden])
        states.persist(self.path / act, umask=self._umask)
        # 2. the commit: one rename
        atomic_write_json(self.path / PROGRESS, {"completed_layers": index + 1, "activations": act},
                          umask=self._umask)
        previous, self._completed, self._activations = self._activations, index + 1, act
        # 3. what the marker no longer refers to (only that: the next layer's store may be writing meanwhile)
        if previous is not None and previous != act:
            (self.path / previous).unlink(missing_ok=True)

    def save_part(self, index: int, part: int, results: dict) -> None:
        """Writes results of layer ``index`` (the one being computed: :attr:`completed`, or the next while the
        previous layer's commit is in flight) into its part file ``part``: a group of its experts, finished before
        the layer (module docstring). Thread-safe against :meth:`save_layer` of the previous layer (each writes its
        own files). The layer's commit
        (``save_layer(..., parts=n)``) makes them its own; until then they are orphans a resume removes."""
        done = self._completed  # the previous layer's commit may still be in flight
        if index not in (done, done + 1):
            raise ValueError(f"index: expected the layer being computed ({done} or {done + 1}), got {index}")
        if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part <= 9999:
            raise ValueError(f"part: expected an int in [0, 9999], got {part!r}")
        from safetensors.torch import save_file

        stored, meta = _stored(results)
        atomic_write(self.path / _part_name(index, part),
                     lambda tmp: save_file(stored, str(tmp), metadata={"schemes": json.dumps(meta)}),
                     umask=self._umask)

    # -- reading -------------------------------------------------------------------------------------
    def load_record(self, index: int) -> LayerRecord:
        name = f"layer_{index:05d}.json"
        try:
            return LayerRecord.from_dict(json.loads((self.path / name).read_text()))
        except FileNotFoundError:
            raise self._damaged(name, "missing") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._damaged(name, f"unreadable ({_brief(exc)})") from None

    def load_activations(self, in_memory: bool = True, pin_memory: bool = False) -> HiddenStates:
        """The activations after the last finished layer: read into memory, or (``in_memory=False``) kept in their
        file and read per batch (the disk-backed store); page-locked with ``pin_memory`` (a GPU run)."""
        name = self._activations
        if name is None:
            raise ValueError(f"{self.path}: no finished layer, hence no saved activations")
        try:
            return open_states(self.path / name, in_memory, pin_memory)
        except FileNotFoundError:
            raise self._damaged(name, "missing") from None
        except (OSError, ValueError, EOFError) as exc:
            raise self._damaged(name, f"unreadable ({_brief(exc)})") from None

    def _read_layer(self, index: int, tensors: bool):
        """Layer ``index``'s (formats, None, None) without ``tensors``, else (quantized results, dense, added), its
        part files' results after its own."""
        name = f"layer_{index:05d}.safetensors"
        meta, quantized, dense, added, parts = self._read_file(name, tensors, True)
        for k in range(parts):
            m, q, _, _, _ = self._read_file(_part_name(index, k), tensors, False)
            meta.update(m)
            if tensors:
                quantized.update(q)
        return (meta, None, None) if not tensors else (quantized, dense, added)

    def _read_file(self, name: str, tensors: bool, layer: bool):
        from safetensors import safe_open

        try:
            with safe_open(str(self.path / name), "pt") as f:
                md = f.metadata()
                meta = json.loads(md["schemes"])
                parts = int(md.get("parts", "0")) if layer else 0
                if parts < 0:
                    raise ValueError(f"parts {parts}")
                if not tensors:
                    return meta, None, None, None, parts
                quantized = {n: _stored_result(f, n, weight_format_from_key(key)) for n, key in meta.items()}
                dense = {k[len("dense::"):]: f.get_tensor(k) for k in f.keys() if k.startswith("dense::")}
                added = {k[len("added::"):]: f.get_tensor(k) for k in f.keys() if k.startswith("added::")}
                return meta, quantized, dense, added, parts
        except FileNotFoundError:
            raise self._damaged(name, "missing") from None
        except Exception as exc:  # SafetensorError, JSON errors, missing keys, a wrong metadata layout
            raise self._damaged(name, f"unreadable ({_brief(exc)})") from None

    def iter_replacements(self, num_layers: int) -> Iterator[Replacements]:
        for index in range(num_layers):
            quantized, dense, added = self._read_layer(index, True)
            yield Replacements(quantized=quantized, tensors=dense, added=added)

    def schemes(self, num_layers: int) -> dict:
        """{weight format (:class:`~moequant.formats.IntFormat` / :class:`~moequant.formats.FloatFormat`): [module
        names]} over all finished layers."""
        out: dict = {}
        for index in range(num_layers):
            meta, _, _ = self._read_layer(index, False)
            try:
                for name, key in meta.items():
                    out.setdefault(weight_format_from_key(key), []).append(name)
            except (AttributeError, TypeError, ValueError) as exc:
                raise self._damaged(f"layer_{index:05d}.safetensors", f"unreadable schemes ({_brief(exc)})") from None
        return out


def _stored(results: dict) -> tuple[dict, dict]:
    """The tensors (``<name>::codes`` ...) and the formats (name -> format key) of a layer file for ``results``."""
    stored, meta = {}, {}
    for name, qt in results.items():
        stored[f"{name}::codes"] = qt.codes.contiguous().cpu()
        stored[f"{name}::scale"] = qt.scale.contiguous().cpu()
        if isinstance(qt.format, FloatFormat):
            stored[f"{name}::scale_codes"] = qt.scale_codes.contiguous().cpu()
            for key, t in (("global", qt.global_scale), ("input_global", qt.input_global_scale)):
                if t is not None:
                    stored[f"{name}::{key}"] = t.detach().reshape(1).float().cpu().clone()
        else:
            stored[f"{name}::zero"] = qt.zero_point.contiguous().cpu()
        meta[name] = list(qt.format.key)
    return stored, meta


def _stored_result(f, name: str, fmt):
    """The quantized result ``name`` of an open layer file ``f`` in the weight format ``fmt``."""
    codes, scale = f.get_tensor(f"{name}::codes"), f.get_tensor(f"{name}::scale")
    if not isinstance(fmt, FloatFormat):
        return QuantizedTensor(codes=codes, scale=scale, zero_point=f.get_tensor(f"{name}::zero"), format=fmt)
    keys = set(f.keys())
    opt = {k: f.get_tensor(f"{name}::{k}") if f"{name}::{k}" in keys else None for k in ("global", "input_global")}
    return FloatQuantizedTensor(codes=codes, scale=scale, scale_codes=f.get_tensor(f"{name}::scale_codes"), format=fmt,
                                global_scale=opt["global"], input_global_scale=opt["input_global"])


def open_work_dir(out: str | os.PathLike, fingerprint: dict, resume: bool) -> WorkDir:
    """The work directory ``<out>.partial`` of a run writing ``out``, opened and locked (:class:`WorkDir`), after
    removing temporary directories that killed runs left next to ``out`` (:func:`remove_stale_temporaries`).
    Raises FileExistsError when ``out`` exists (also when it appeared while another run held the lock)."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    remove_stale_temporaries(out)
    remove_stale_temporaries(partial)
    work = WorkDir(partial, fingerprint, resume)
    if out.exists():  # written meanwhile by another run: never touch it
        if work.created:
            shutil.rmtree(work.path, ignore_errors=True)
        work.close()
        raise FileExistsError(f"output_dir: {out} already exists; choose another directory or delete it")
    return work
