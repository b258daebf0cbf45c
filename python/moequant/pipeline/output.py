"""Where a run writes: the preflight's check that the output directory is writable and has room
(:func:`check_output`), and the translation of a failed write during the run (full disk, quota, read-only file
system, permission, file too large) into one :class:`OutputWriteError` naming the path, the free space, the remedy
and what was kept (:func:`output_write_error`)."""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

__all__ = ["OutputWriteError", "check_output", "output_write_error"]

logger = logging.getLogger(__name__)


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


def check_output(out: Optional[Path], plan, resume: bool) -> None:
    """The directory the run writes into (``out``'s parent, created later if missing; the system temporary
    directory when ``out`` is None) must be writable, and its device must have room for the estimated work
    directory plus checkpoint of the preflight's ``plan`` (:class:`moequant.pipeline.preflight.Plan`; less what a
    resumed work directory holds already). Raises OSError (PermissionError for an unwritable directory) with the
    numbers and the remedy."""
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
        states = getattr(plan, "states", None)
        held = ""
        if states is not None and states.on_disk:  # the hidden states' store is what makes the work directory big
            held = (f", of which {2 * states.bytes / 1e9:.2f} GB the calibration hidden states' disk-backed store: "
                    f"they exceed the host budget of {states.budget / 1e9:.2f} GB (host_memory_gb)")
        raise OutputWriteError(errno.ENOSPC, f"not enough free space for {what}: the run writes about "
                               f"{need / 1e9:.2f} GB (work directory {plan.work_bytes / 1e9:.2f} GB{held}, checkpoint "
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



def output_write_error(exc: BaseException, out: Optional[Path], work_path: Path) -> Optional[OutputWriteError]:
    """The :class:`OutputWriteError` that ``exc`` (raised during a run writing ``out``, with its work directory at
    ``work_path``) stands for, or None when it is not a failed write of the run's output (re-raise it as it is)."""
    failure = _write_failure(exc)
    if failure is None or not _is_output_path(failure[1], out, work_path):
        return None
    return _write_error(*failure, out, work_path)
