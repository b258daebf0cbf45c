"""Streaming, atomic reading and writing of Hugging Face safetensors checkpoints.

`SafetensorsSource` reads a checkpoint directory (single ``model.safetensors`` or a sharded
``model.safetensors.index.json``) lazily, one tensor at a time. `CheckpointWriter` writes one atomically:
everything goes to a temporary sibling directory ``<out>.tmp-<random>`` that is renamed to ``<out>`` only by
`CheckpointWriter.commit`; on any failure the temporary directory is removed and ``<out>`` never appears.
Tensors are added one at a time and a shard is flushed as soon as it is full, so the peak memory is one shard.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "SafetensorsSource", "CheckpointWriter", "copy_side_files", "write_extra_files",
    "DEFAULT_MAX_SHARD_BYTES", "TOKENIZER_PATTERNS",
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
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f"{self.out_dir.name}.tmp-", dir=self.out_dir.parent))
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
        if self.out_dir.exists():  # appeared while we were writing: never overwrite someone else's output
            raise FileExistsError(
                f"output directory {self.out_dir} appeared while writing; choose another --out or delete it first"
            )
        os.rename(self.tmp_dir, self.out_dir)
        self._done = True
        logger.info("wrote %s (%d tensors, %d shard(s), %.1f MiB)", self.out_dir, len(self._names), max(n, 1),
                    self._total_bytes / 2**20)  # fmt: skip
        return self.out_dir

    def abort(self) -> None:
        """Discards everything written so far (idempotent)."""
        self._pending = {}
        if not self._done:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self._done = True

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
