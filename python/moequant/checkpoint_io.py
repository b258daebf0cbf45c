"""Streaming, atomic reading and writing of Hugging Face safetensors checkpoints.

`SafetensorsSource` reads a checkpoint directory (single ``model.safetensors`` or a sharded
``model.safetensors.index.json``) lazily, one tensor at a time. `CheckpointWriter` writes one atomically:
everything goes to a temporary sibling directory ``<out>.tmp-<random>`` that is renamed to ``<out>`` only by
`CheckpointWriter.commit`; on any failure the temporary directory is removed and ``<out>`` never appears.
Tensors are added one at a time and a shard is flushed as soon as it is full, so the peak memory is one shard.

Files the pipeline writes get the modes ``open``/``mkdir`` would give them under the user's umask (files
``0o666 & ~umask``, directories ``0o777 & ~umask``), never the 0600/0700 of ``tempfile``. A temporary directory
holds an owner file (pid, host) so that one left behind by a killed process is recognised and removed by the next
writer of the same output (:func:`remove_stale_temporaries`); one whose owner may still run is never touched.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "SafetensorsSource", "CheckpointWriter", "copy_side_files", "write_extra_files",
    "DEFAULT_MAX_SHARD_BYTES", "TOKENIZER_PATTERNS", "current_umask", "atomic_write", "make_owned_tmpdir",
    "remove_stale_temporaries", "apply_umask_modes", "OWNER_FILE",
]  # fmt: skip

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Files copied verbatim from the source checkpoint when present (glob patterns).
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken", "chat_template*",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip

_ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


# ------------------------------------------------------------------------------- file modes, atomic files, temporaries
OWNER_FILE = ".moequant-owner"  # inside a temporary directory: who writes it (JSON: pid, host, boot id, start time)


def current_umask() -> int:
    """The process umask, read without changing it (Linux: ``/proc/self/status``; elsewhere the racy
    ``os.umask`` round trip)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask_modes(root: str | os.PathLike, umask: Optional[int] = None) -> None:
    """Gives ``root`` and everything under it the modes ``mkdir``/``open`` create under ``umask`` (default: the
    process's): directories ``0o777 & ~umask``, files ``0o666 & ~umask``. Symbolic links are left alone."""
    mask = current_umask() if umask is None else umask
    dmode, fmode = 0o777 & ~mask, 0o666 & ~mask
    root = Path(root)
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def _fsync_path(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_to: Callable[[Path], None], *, overwrite: bool = True,
                 umask: Optional[int] = None) -> Path:
    """Writes ``path`` all or nothing: ``write_to(tmp)`` writes a temporary sibling, which is flushed to disk, given
    the mode ``open`` would give it (``0o666 & ~umask``) and renamed into place. With ``overwrite=False`` an existing
    ``path`` (also one that appeared meanwhile) raises FileExistsError and is left untouched. On any exception
    (also KeyboardInterrupt) the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{secrets.token_hex(4)}")
    mask = current_umask() if umask is None else umask
    try:
        write_to(tmp)
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~mask)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path exists: no window in which another file could be replaced
            except FileExistsError:
                raise FileExistsError(f"{path} already exists; choose another output path or delete it") from None
            except OSError:  # a file system without hard links
                if path.exists():
                    raise FileExistsError(f"{path} already exists; choose another output path or delete it")
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
        _fsync_path(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs) -> Path:
    """:func:`atomic_write` of ``obj`` as JSON (indent 2, sorted keys)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), **kwargs)


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_namespace() -> Optional[str]:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _start_time(pid: int) -> Optional[int]:
    """Start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_record() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(), "pid_namespace": _pid_namespace(),
            "start_time": _start_time(pid)}


def make_owned_tmpdir(target: str | os.PathLike, umask: Optional[int] = None) -> Path:
    """A new directory ``<target>.tmp-<random>`` next to ``target`` with the mode ``mkdir`` would give it and an
    owner file naming this process (see :func:`remove_stale_temporaries`)."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~(current_umask() if umask is None else umask))
        (tmp / OWNER_FILE).write_text(json.dumps(_owner_record()) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _owner_gone(owner: Any) -> tuple[bool, str]:
    """(True, why) when the process that wrote ``owner`` (an owner record) has certainly ended, else (False, why)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int) or not isinstance(owner.get("host"),
                                                                                             str):
        return False, "its owner file is unreadable"
    pid, host = owner["pid"], owner["host"]
    if host != socket.gethostname():
        return False, f"it belongs to pid {pid} on another host ({host})"
    if owner.get("pid_namespace") not in (None, _pid_namespace()):
        return False, f"it belongs to pid {pid} of another container on this host"
    boot = _boot_id()
    if owner.get("boot_id") is not None and boot is not None and owner["boot_id"] != boot:
        return True, f"left by pid {pid} before this host rebooted"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True, f"left by pid {pid}, which is no longer running"
    except PermissionError:  # a process of another user has that pid: alive (maybe a reused pid; keep it)
        pass
    now = _start_time(pid)
    if owner.get("start_time") is not None and now is not None and now != owner["start_time"]:
        return True, f"left by pid {pid}, which is no longer running (the pid now belongs to another process)"
    return False, f"its owner (pid {pid}) is still running"


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Removes the directories ``<target>.tmp-*`` that a killed writer left behind: those whose owner file names a
    process of this host that has ended. Directories of a running process, of another host or container, or without
    a readable owner file are kept (and logged). Returns the removed paths."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for tmp in sorted(target.parent.glob(f"{target.name}.tmp-*")):
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        try:
            owner = json.loads((tmp / OWNER_FILE).read_text())
        except (OSError, ValueError):
            owner = None
        gone, why = _owner_gone(owner)
        if gone:
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                logger.warning("removed %s, an unfinished output %s", tmp, why)
                removed.append(tmp)
        elif owner is None:
            logger.info("left %s in place: it has no owner file; delete it if no moequant run writes it", tmp)
        else:
            logger.debug("left %s in place: %s", tmp, why)
    return removed


class SafetensorsSource:
    """Lazy read access to the tensors of a safetensors checkpoint directory.

    Only the headers are read on construction; `get` materialises one tensor. Works as a context manager
    (closes the open file handles).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {name: self.directory / fname for name, fname in weight_map.items()}
        elif single.is_file():
            self._file_of = {}
            with safe_open(single, framework="pt") as f:
                for name in f.keys():
                    self._file_of[name] = single
        else:
            raise FileNotFoundError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found; expected a Hugging Face checkpoint "
                "saved in safetensors format (re-save it with model.save_pretrained(..., safe_serialization=True))"
            )
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str):
        try:
            path = self._file_of[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in the checkpoint {self.directory}") from None
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="pt")
        return self._handles[path]

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard)."""
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        """Reads one tensor (a copy owned by the caller)."""
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "SafetensorsSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointWriter:
    """Writes a Hugging Face checkpoint directory atomically, streaming tensors into size-limited shards.

    Usage::

        with CheckpointWriter(out_dir) as w:     # raises FileExistsError if out_dir exists, before writing
            w.add("model.embed_tokens.weight", t)
            w.write_json("config.json", cfg)
        # committed (renamed into place) on a clean exit, removed on an exception

    Shards hold at most `max_shard_bytes` of tensor data (a single larger tensor gets a shard of its own) and
    are named ``model-0000K-of-0000N.safetensors`` with a ``model.safetensors.index.json``, or a single
    ``model.safetensors`` when everything fits in one shard.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes: expected > 0, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise FileExistsError(
                f"output directory {self.out_dir} already exists; choose another --out or delete it first"
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        remove_stale_temporaries(self.out_dir)  # left by a killed writer of the same output
        self._umask = current_umask()
        self.tmp_dir = make_owned_tmpdir(self.out_dir, self._umask)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # names per flushed shard
        self._names: set[str] = set()
        self._total_bytes = 0
        self._done = False
        logger.debug("writing checkpoint to temporary directory %s", self.tmp_dir)

    # -- tensors ---------------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queues one tensor; flushes the current shard first if `tensor` would overflow it."""
        self._check_open()
        if name in self._names:
            raise ValueError(f"tensor {name!r} was added twice")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() != nbytes:  # a view into a larger buffer: own the data
            t = t.clone()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending[name] = t
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        k = len(self._shards) + 1
        save_file(self._pending, str(self.tmp_dir / f"shard-{k:05d}.safetensors"), metadata={"format": "pt"})
        logger.debug("flushed shard %d: %d tensors, %.1f MiB", k, len(self._pending), self._pending_bytes / 2**20)
        self._shards.append(list(self._pending))
        self._pending = {}
        self._pending_bytes = 0

    # -- other files -----------------------------------------------------------------------------------
    def write_json(self, filename: str, obj: Any) -> None:
        """Writes `obj` as JSON (indent 2, sorted keys) to `filename` inside the checkpoint."""
        self._check_open()
        with open(self._path(filename), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    def write_text(self, filename: str, text: str) -> None:
        self._check_open()
        self._path(filename).write_text(text)

    def copy_file(self, src: str | os.PathLike, filename: str | None = None) -> None:
        self._check_open()
        shutil.copyfile(src, self._path(filename or Path(src).name))

    def _path(self, filename: str) -> Path:
        p = Path(filename)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"filename: expected a plain relative name inside the checkpoint, got {filename!r}")
        return self.tmp_dir / p

    # -- lifecycle -------------------------------------------------------------------------------------
    def commit(self) -> Path:
        """Flushes the last shard, names the shards, writes the index and renames the directory into place."""
        self._check_open()
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.tmp_dir / "shard-00001.safetensors", self.tmp_dir / SINGLE_FILE)
        elif n > 1:
            weight_map = {}
            for k, names in enumerate(self._shards, start=1):
                fname = f"model-{k:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp_dir / f"shard-{k:05d}.safetensors", self.tmp_dir / fname)
                weight_map.update({name: fname for name in names})
            index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            self.write_json(INDEX_FILE, index)
        apply_umask_modes(self.tmp_dir, self._umask)  # safetensors writes 0600 files
        for p in self.tmp_dir.rglob("*"):  # on disk before the rename makes them the checkpoint
            if p.is_file() and not p.is_symlink():
                _fsync_path(p)
        _fsync_path(self.tmp_dir)
        if self.out_dir.exists():  # appeared while we were writing: never overwrite someone else's output
            raise FileExistsError(
                f"output directory {self.out_dir} appeared while writing; choose another --out or delete it first"
            )
        os.rename(self.tmp_dir, self.out_dir)
        self._done = True
        # the owner file goes only now: a kill before the rename leaves a temporary the next writer can remove
        (self.out_dir / OWNER_FILE).unlink(missing_ok=True)
        _fsync_path(self.out_dir)
        _fsync_path(self.out_dir.parent)
        logger.info("wrote %s (%d tensors, %d shard(s), %.1f MiB)", self.out_dir, len(self._names), max(n, 1),
                    self._total_bytes / 2**20)  # fmt: skip
        return self.out_dir

    def abort(self) -> None:
        """Discards everything written so far (idempotent)."""
        self._pending = {}
        if not self._done:
            self._done = True
            # the owner file last: interrupted here, the rest is still recognised as stale by the next writer
            for p in self.tmp_dir.iterdir() if self.tmp_dir.is_dir() else ():
                if p.name != OWNER_FILE:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _check_open(self) -> None:
        if self._done:
            raise RuntimeError(f"CheckpointWriter for {self.out_dir} is already committed or aborted")

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def copy_side_files(source_dir: str | os.PathLike, writer: CheckpointWriter,
                    patterns: tuple[str, ...] = ("generation_config.json", *TOKENIZER_PATTERNS)) -> list[str]:
    """Copies the tokenizer / generation-config files of `source_dir` that match `patterns`; returns their names."""
    copied = []
    for pattern in patterns:
        for path in sorted(Path(source_dir).glob(pattern)):
            if path.is_file() and path.name not in copied:
                writer.copy_file(path)
                copied.append(path.name)
    return copied


def write_extra_files(writer: CheckpointWriter, extra_files: Mapping[str, Any] | None) -> None:
    """Writes each extra file: a `Path` is copied, a `str` is written as text, anything else is dumped as JSON."""
    for name, value in (extra_files or {}).items():
        if isinstance(value, os.PathLike):
            writer.copy_file(value, name)
        elif isinstance(value, str):
            writer.write_text(name, value)
        else:
            writer.write_json(name, value)
