"""Writing a Hugging Face checkpoint directory atomically (:class:`CheckpointWriter`): everything goes to a
temporary sibling directory ``<out>.tmp-<random>`` (owned, :mod:`moequant.io.files`) that is renamed to ``<out>``
only by :meth:`CheckpointWriter.commit`; on any failure the temporary directory is removed and ``<out>`` never
appears. Tensors are added one at a time and a shard is flushed as soon as it is full, so the peak memory is one
shard. The side files of the source (tokenizer, generation config) are copied by :func:`copy_side_files`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from .files import OWNER_FILE, apply_umask_modes, current_umask, fsync_path, make_owned_tmpdir, remove_stale_temporaries
from .safetensors import INDEX_FILE, SINGLE_FILE

__all__ = ["CheckpointWriter", "copy_side_files", "write_extra_files", "DEFAULT_MAX_SHARD_BYTES",
           "TOKENIZER_PATTERNS"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Files copied verbatim from the source checkpoint when present (glob patterns).
TOKENIZER_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken", "chat_template*",
    "preprocessor_config.json", "processor_config.json",
)  # fmt: skip


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
                fsync_path(p)
        fsync_path(self.tmp_dir)
        if self.out_dir.exists():  # appeared while we were writing: never overwrite someone else's output
            raise FileExistsError(
                f"output directory {self.out_dir} appeared while writing; choose another --out or delete it first"
            )
        os.rename(self.tmp_dir, self.out_dir)
        self._done = True
        # the owner file goes only now: a kill before the rename leaves a temporary the next writer can remove
        (self.out_dir / OWNER_FILE).unlink(missing_ok=True)
        fsync_path(self.out_dir)
        fsync_path(self.out_dir.parent)
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
