"""The calibration hidden states between decoder layers: in host memory, or in a disk-backed store in the work
directory when they do not fit the host budget (``recipe.host_memory_gb``; :mod:`moequant.pipeline.hostmem` decides).

A layer reads its inputs batch by batch (:class:`HiddenStates`, a sequence of ``[rows, seq_len, hidden]`` CPU
tensors) and writes its outputs batch by batch into a sink (:meth:`StatesStore.sink`), which becomes the next
layer's inputs (:meth:`StatesSink.finish`).

* **In memory** (:class:`MemoryStates`): the tensors themselves; a layer holds its inputs and its outputs (two
  copies). The commit writes them into the work directory.
* **On disk** (:class:`DiskStates`): one file per copy, in the work directory. A sink preallocates its file (a full
  disk fails here, before the layer computes), writes each batch at its offset as the layer produces it, and the
  commit flushes it to disk and renames it into place: no second write. A batch is read back with ``preadv`` into
  a fresh tensor when the layer asks for it; host memory holds a batch or two, the page cache the rest.

Both write the same file (:data:`STATES_FORMAT`): a safetensors file of the batches (``batch_00000`` ...) in the
compute dtype, so the work directory does not depend on where the states lived (a run may resume with another
``host_memory_gb``), and a resumed run reads back exactly the bytes that were computed: bit-identical.
"""
from __future__ import annotations

import errno
import json
import math
import os
import secrets
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from ..io.files import current_umask, fsync_path, pread_into, pwrite_from
from ..io.safetensors import TORCH_DTYPES, read_header
from .host import HostCopies

__all__ = ["STATES_FORMAT", "HiddenStates", "MemoryStates", "DiskStates", "StatesSink", "StatesStore",
           "open_states", "num_tokens"]

STATES_FORMAT = "moequant-hidden-states"
_ALIGN = 64  # the data section starts at a multiple of this (the header is padded with spaces)
_SAFETENSORS_DTYPES = {v: k for k, v in TORCH_DTYPES.items()}


def _batch(b: int) -> str:
    return f"batch_{b:05d}"


def num_tokens(hidden) -> int:
    """Calibration tokens (rows x sequence length) of a layer's inputs: a :class:`HiddenStates` (from its shapes,
    nothing read) or a list of tensors."""
    shapes = hidden.shapes if isinstance(hidden, HiddenStates) else [tuple(h.shape) for h in hidden]
    return sum(s[0] * s[1] for s in shapes)


def _layout(shapes: Sequence[tuple], dtype: torch.dtype) -> tuple[bytes, list[int]]:
    """The safetensors header of batches ``shapes`` in ``dtype`` (padded so that the data starts at a multiple of
    :data:`_ALIGN`) and each batch's absolute byte offset (the last entry: the file size)."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"hidden states: dtype {dtype} cannot be stored")
    elt = torch.empty((), dtype=dtype).element_size()
    header, offsets, pos = {"__metadata__": {"format": STATES_FORMAT}}, [], 0
    for b, shape in enumerate(shapes):
        n = math.prod(shape) * elt
        header[_batch(b)] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append(pos)
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % _ALIGN)
    base = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw, [base + o for o in offsets] + [base + pos]


class HiddenStates(Sequence):
    """A layer's hidden states per calibration batch: ``states[b]`` is batch ``b`` (a CPU tensor the caller may
    keep), ``shapes`` and ``dtype`` describe them without reading anything."""

    shapes: list
    dtype: torch.dtype

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, b):
        """Batch ``b`` (a negative index counts from the end; a slice gives a list of batches)."""
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        if b < 0:
            b += len(self)
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} of {len(self)}")
        return self._batch(b)

    def _batch(self, b: int) -> torch.Tensor:
        """Batch ``b``, ``0 <= b < len(self)`` (the subclass's read)."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) for s in self.shapes) * torch.empty((), dtype=self.dtype).element_size()

    def persist(self, path: Path, umask: Optional[int] = None) -> None:
        """Makes ``path`` a durable file of these states (all or nothing: written or moved under a temporary name,
        flushed, renamed)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases what the states hold (a file descriptor; an unpersisted file is removed)."""


class MemoryStates(HiddenStates):
    """Hidden states held in host memory (the tensors as the layer produced them)."""

    def __init__(self, tensors: list):
        if not tensors:
            raise ValueError("hidden states: no calibration batch")
        self.tensors = list(tensors)
        self.shapes = [tuple(t.shape) for t in self.tensors]
        self.dtype = self.tensors[0].dtype

    def __getitem__(self, b):
        return self.tensors[b]

    def persist(self, path: Path, umask: Optional[int] = None) -> None:
        _copy(self, path, umask)

    def close(self) -> None:
        self.tensors = []


class DiskStates(HiddenStates):
    """Hidden states in a file (:data:`STATES_FORMAT`) read back batch by batch through an open descriptor (which
    stays valid while the file is renamed or removed); ``pin_memory``: each batch is read into page-locked memory
    (a GPU run: its host-to-device copy then runs at PCIe speed)."""

    def __init__(self, fd: int, path: Path, shapes: list, dtype: torch.dtype, offsets: list, persisted: bool,
                 pin_memory: bool = False):
        self._fd, self.path, self.shapes, self.dtype = fd, Path(path), list(shapes), dtype
        self._offsets, self.persisted, self.pin_memory = offsets, persisted, pin_memory

    def _batch(self, b: int) -> torch.Tensor:
        if self._fd is None:
            raise ValueError(f"{self.path}: the hidden states are closed")
        t = torch.empty(self.shapes[b], dtype=self.dtype, pin_memory=self.pin_memory)
        try:
            pread_into(self._fd, t, self._offsets[b])
        except EOFError as exc:
            raise ValueError(f"{self.path}: {exc}; the file was truncated while in use") from None
        return t

    def persist(self, path: Path, umask: Optional[int] = None) -> None:
        path = Path(path)
        if self.persisted and self.path == path:
            return
        if self.persisted or self.path.parent.resolve() != path.parent.resolve():  # copied, batch by batch
            _copy(self, path, umask)
            return
        os.fsync(self._fd)
        os.chmod(self.path, 0o666 & ~(current_umask() if umask is None else umask))
        os.replace(self.path, path)
        fsync_path(path.parent)
        self.path, self.persisted = path, True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            if not self.persisted:
                self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        try:
            if self._fd is not None:
                os.close(self._fd)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _copy(states: HiddenStates, path: Path, umask: Optional[int]) -> None:
    """Writes ``states`` batch by batch into a new file next to ``path`` and renames it to ``path``."""
    path = Path(path)
    sink = StatesSink(states.shapes, states.dtype, path.parent, umask)
    try:
        for b in range(len(states)):
            sink.append(states[b])
        done = sink.finish()
    except BaseException:
        sink.abort()
        raise
    try:
        done.persist(path, umask)
    finally:
        done.close()


class StatesSink:
    """Receives a layer's outputs batch by batch (:meth:`append`) into a new file of ``directory`` (a temporary
    name, ``.tmp-`` in it: a killed run leaves an orphan that the next resume removes), preallocated to its full
    size, then :meth:`finish` gives the :class:`DiskStates` reading it. ``shapes`` / ``dtype``: what the batches
    must be (a decoder layer keeps its inputs' shape and dtype)."""

    def __init__(self, shapes: Sequence[tuple], dtype: torch.dtype, directory: Path, umask: Optional[int] = None,
                 pin_memory: bool = False):
        self.shapes, self.dtype, self.pin_memory = [tuple(s) for s in shapes], dtype, pin_memory
        self.path = Path(directory) / f"states.tmp-{secrets.token_hex(4)}.safetensors"
        header, self._offsets = _layout(self.shapes, dtype)
        self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._count, self._pending = 0, None
        try:
            size = self._offsets[-1]
            try:
                os.posix_fallocate(self._fd, 0, size)  # the space now: a full disk fails before the layer computes
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without fallocate
                    raise
                os.ftruncate(self._fd, size)
            os.pwrite(self._fd, header, 0)
        except BaseException:
            self.abort()
            raise

    def append(self, t: torch.Tensor) -> None:
        """Writes the next batch (a tensor of the expected shape and dtype). A GPU tensor is copied into page-locked
        memory without blocking and written when the next batch arrives (or at :meth:`finish`), so the device
        computes the next batch meanwhile."""
        b = self._count
        if b >= len(self.shapes):
            raise RuntimeError(f"hidden states: more batches than the {len(self.shapes)} expected")
        if tuple(t.shape) != self.shapes[b] or t.dtype != self.dtype:
            raise RuntimeError(f"hidden states: batch {b} is {t.dtype} {list(t.shape)}, expected {self.dtype} "
                               f"{list(self.shapes[b])} (a decoder layer keeps its inputs' shape and dtype)")
        t = t.detach()
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._write_pending()
            self._pending = (b, host, done)
        else:
            self._write_pending()
            pwrite_from(self._fd, t.contiguous(), self._offsets[b])
        self._count += 1

    def _write_pending(self) -> None:
        if self._pending is not None:
            b, host, done = self._pending
            self._pending = None
            done.synchronize()
            pwrite_from(self._fd, host, self._offsets[b])

    def finish(self) -> DiskStates:
        """The written states (every batch must have been appended)."""
        if self._count != len(self.shapes):
            raise RuntimeError(f"hidden states: {self._count} of {len(self.shapes)} batches written")
        self._write_pending()
        fd, self._fd = self._fd, None
        return DiskStates(fd, self.path, self.shapes, self.dtype, self._offsets[:-1], persisted=False,
                          pin_memory=self.pin_memory)

    def abort(self) -> None:
        """Closes and removes the unfinished file."""
        self._pending = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


class _MemorySink(HostCopies):
    """Keeps the batches in host memory (a GPU's as pinned copies, made while the next batches compute)."""

    def finish(self) -> MemoryStates:
        return MemoryStates(self.done())

    def abort(self) -> None:
        self.done()
        self.out = []


class StatesStore:
    """Where a run keeps its hidden states: ``on_disk`` in ``directory`` (the work directory), else in memory.
    :meth:`sink` makes the receiver of one layer's outputs."""

    def __init__(self, on_disk: bool, directory: Optional[Path] = None, umask: Optional[int] = None,
                 pin_memory: bool = False):
        if on_disk and directory is None:
            raise ValueError("StatesStore: a disk-backed store needs a directory")
        self.on_disk, self.directory, self.umask, self.pin_memory = on_disk, directory, umask, pin_memory

    def sink(self, shapes: Sequence[tuple], dtype: torch.dtype):
        """A receiver of batches (``append``, then ``finish()`` -> :class:`HiddenStates`; ``abort()``)."""
        return StatesSink(shapes, dtype, self.directory, self.umask, self.pin_memory) if self.on_disk else \
            _MemorySink()


def open_states(path: Path, in_memory: bool, pin_memory: bool = False) -> HiddenStates:
    """The states of a file written by :meth:`HiddenStates.persist`: read whole (``in_memory``) or kept on disk and
    read per batch (into page-locked memory with ``pin_memory``). Raises ValueError (the safetensors header check's, or naming what is wrong) for a damaged or
    foreign file."""
    path = Path(path)
    headers = read_header(path)  # lengths, offsets, exact size
    shapes, offsets, dtype = [], [], None
    for b in range(len(headers)):
        h = headers.get(_batch(b))
        if h is None or TORCH_DTYPES.get(h.dtype) is None or len(h.shape) != 3:
            raise ValueError(f"{path}: not a hidden-states file (expected tensors batch_00000 .. of rank 3)")
        if dtype is not None and TORCH_DTYPES[h.dtype] != dtype:
            raise ValueError(f"{path}: not a hidden-states file (batches of different dtypes)")
        dtype = TORCH_DTYPES[h.dtype]
        shapes.append(h.shape)
        offsets.append(h.begin)
    if not shapes:
        raise ValueError(f"{path}: not a hidden-states file (no batch)")
    fd = os.open(path, os.O_RDONLY)
    states = DiskStates(fd, path, shapes, dtype, offsets, persisted=True, pin_memory=pin_memory)
    if not in_memory:
        return states
    try:
        return MemoryStates([states[b] for b in range(len(states))])
    finally:
        states.close()
