"""A cheap fingerprint of a checkpoint's content (:func:`model_fingerprint`): what a resumed run compares to know it
continues on the same model, whatever the checkpoint's size and wherever it was moved."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["model_fingerprint"]

_SAMPLE_BLOCKS, _SAMPLE_BYTES = 16, 4096  # per shard: data blocks hashed with the header


def _shard_digest(path: Path) -> dict:
    """Size and sha256 of a safetensors file's header (8-byte length + JSON: names, dtypes, shapes, offsets) and of
    16 evenly spaced 4 KiB blocks of its data: reads ~64 KiB whatever the file's size."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            raise ValueError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes); "
                             "re-save the checkpoint with save_pretrained(..., safe_serialization=True)")
        h.update(head)
        h.update(f.read(n))
        start, data = 8 + n, size - 8 - n
        for k in range(_SAMPLE_BLOCKS if data > 0 else 0):
            f.seek(start + (data - min(data, _SAMPLE_BYTES)) * k // max(_SAMPLE_BLOCKS - 1, 1))
            h.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "sha256_header_and_samples": h.hexdigest()}


def model_fingerprint(model_dir: str | os.PathLike) -> dict:
    """What identifies a checkpoint's content cheaply (even for a 1 TB model): for ``config.json`` and the
    safetensors index its size and sha256; for each safetensors shard its size and the sha256 of its header plus
    sampled data blocks (:func:`_shard_digest`). ``path`` (resolved) is kept for messages; resuming compares only
    ``files``, so a checkpoint moved elsewhere still matches."""
    d = Path(model_dir)
    files: dict = {}
    for name in ("config.json", "model.safetensors.index.json"):
        p = d / name
        if p.is_file():
            data = p.read_bytes()
            files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    index = d / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index}: unreadable safetensors index ({exc}); re-save the checkpoint") from None
    for name in shards:
        if (d / name).is_file():
            files[name] = _shard_digest(d / name)
    return {"path": str(d.resolve()), "files": files}
