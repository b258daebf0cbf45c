"""Atomic files and owned temporary directories, with the modes the user's umask gives.

Files the pipeline writes get the modes ``open``/``mkdir`` would give them under the user's umask (files
``0o666 & ~umask``, directories ``0o777 & ~umask``), never the 0600/0700 of ``tempfile``. :func:`atomic_write`
writes a file all or nothing (temporary sibling, flushed, renamed). A temporary directory
(:func:`make_owned_tmpdir`) holds an owner file (pid, host) so that one left behind by a killed process is
recognised and removed by the next writer of the same output (:func:`remove_stale_temporaries`); one whose owner
may still run is never touched.
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
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    import torch

__all__ = ["OWNER_FILE", "current_umask", "apply_umask_modes", "fsync_path", "atomic_write", "atomic_write_json",
           "make_owned_tmpdir", "remove_stale_temporaries", "pread_into", "pwrite_from"]

logger = logging.getLogger(__name__)

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


def fsync_path(path: str | os.PathLike) -> None:
    """Flushes a file or directory to disk (a directory that cannot be fsynced is skipped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as a flat byte view (no copy)."""
    import torch

    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fills the contiguous CPU tensor ``out`` with the bytes of file descriptor ``fd`` from ``offset`` (a loop of
    ``preadv``: one call reads at most ~2 GiB); EOFError when the file ends first."""
    view, done = _bytes_of(out), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise EOFError(f"the file ends {len(view) - done} bytes early (reading {len(view)} bytes at {offset})")
        done += n


def pwrite_from(fd: int, t: torch.Tensor, offset: int) -> None:
    """Writes the bytes of the contiguous CPU tensor ``t`` at ``offset`` of file descriptor ``fd``."""
    view, done = _bytes_of(t), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


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
        fsync_path(tmp)
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
        fsync_path(path.parent)
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

