"""The lock of a work directory (``DIR.partial/lock``): a non-blocking ``flock`` held by the process using the
directory (released when it ends, also when killed), stamped with its pid and host so that a second process is
told who holds it."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

__all__ = ["LOCK", "try_lock", "lock_holder"]

LOCK = "lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        return f"pid {int(text[0])} on {text[1]}"
    except (OSError, ValueError, IndexError):
        return "pid unknown"


def try_lock(directory: Path) -> Optional[int]:
    """An fd holding an exclusive flock on ``directory/lock``, stamped with this process's pid and host; None when
    the directory vanished meanwhile. Raises ValueError naming the holder when another process holds it."""
    lock = directory / LOCK
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise ValueError(f"{directory}: expected a moequant work directory, found a file; delete it") from None
        raise ValueError(f"{lock}: cannot open the lock file ({exc.strerror}); check the permissions of "
                         f"{directory}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{directory} is in use by another moequant run ({_holder(fd)}); wait for it to "
                             "finish or stop it") from None
        try:  # the directory may have been removed (a finished run) between open and flock: then start over
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        stamp = f"{os.getpid()} {socket.gethostname()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, stamp, 0)
        return fd
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise


def lock_holder(directory: str | os.PathLike) -> Optional[str]:
    """``"pid N on HOST"`` when another process holds the work directory's lock, else None (never takes it)."""
    try:
        fd = os.open(Path(directory) / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None
