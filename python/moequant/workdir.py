"""The work directory of a pipeline run (``<out>.partial``): what makes :func:`moequant.pipeline.quantize` resumable.

Per finished layer ``layer_NNNNN.safetensors`` (codes, scales and zero points of every quantized matrix, plus
``dense::<name>`` high-precision tensors a transform changed) and ``layer_NNNNN.json`` (its report record); the
activations after the last finished layer (``activations.pt``); ``progress.json`` and the run's fingerprint
(``manifest.json``). Every file is written to a temporary name and renamed, so a crash leaves a consistent state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional

import torch

from . import ops
from .export import Replacements
from .report import LayerRecord

__all__ = ["WORK_VERSION", "StoredQuantized", "WorkDir"]

WORK_VERSION = 1  # the format of the files above; part of every run's fingerprint (manifest.json)


class StoredQuantized:
    """A quantized matrix read back from a work file; ``dequantized`` is computed on demand."""

    def __init__(self, codes, scale, zero_point, bits, group_size, symmetric):
        self.codes, self.scale, self.zero_point = codes, scale, zero_point
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric

    @property
    def dequantized(self) -> torch.Tensor:
        return ops.dequantize(self.codes, self.scale, None if self.symmetric else self.zero_point,
                              self.group_size, self.bits)


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


class WorkDir:
    """The resumable state of one run: per-layer results, activations after the last finished layer, progress."""

    def __init__(self, path: Path, fingerprint: dict, resume: bool):
        self.path = path
        manifest = path / "manifest.json"
        if path.exists():
            if not resume:
                raise FileExistsError(
                    f"{path} holds an unfinished run; pass resume=True (CLI: --resume) to continue it, or delete it")
            old = json.loads(manifest.read_text()) if manifest.is_file() else None
            if old != fingerprint:
                raise ValueError(f"{path}: the unfinished run used a different model, recipe or calibration; "
                                 f"delete {path} or rerun with the same settings")
        else:
            path.mkdir(parents=True)
            _atomic_write_json(manifest, fingerprint)

    @property
    def completed(self) -> int:
        p = self.path / "progress.json"
        return json.loads(p.read_text())["completed_layers"] if p.is_file() else 0

    def save_layer(self, index: int, results: dict, record: LayerRecord, hidden: list,
                   tensors: Optional[dict] = None) -> None:
        """``tensors``: optional on-disk tensor name -> high-precision tensor (e.g. a norm or router weight changed
        by a smoothing or rotation transform) that the export writes in place of the source tensor."""
        from safetensors.torch import save_file

        stored, meta = {}, {}
        for name, qt in results.items():
            stored[f"{name}::codes"] = qt.codes.contiguous().cpu()
            stored[f"{name}::scale"] = qt.scale.contiguous().cpu()
            stored[f"{name}::zero"] = qt.zero_point.contiguous().cpu()
            meta[name] = [qt.bits, qt.group_size, qt.symmetric]
        for name, t in (tensors or {}).items():
            stored[f"dense::{name}"] = t.detach().contiguous().cpu()
        f = self.path / f"layer_{index:05d}.safetensors"
        save_file(stored, str(f) + ".tmp", metadata={"schemes": json.dumps(meta)})
        os.replace(str(f) + ".tmp", f)
        _atomic_write_json(self.path / f"layer_{index:05d}.json", record.to_dict())
        act = self.path / "activations.pt"
        torch.save([h.cpu() for h in hidden], str(act) + ".tmp")
        os.replace(str(act) + ".tmp", act)
        _atomic_write_json(self.path / "progress.json", {"completed_layers": index + 1})

    def load_record(self, index: int) -> LayerRecord:
        return LayerRecord.from_dict(json.loads((self.path / f"layer_{index:05d}.json").read_text()))

    def load_activations(self) -> list:
        return torch.load(self.path / "activations.pt")

    def iter_replacements(self, num_layers: int) -> Iterator[Replacements]:
        from safetensors import safe_open

        for index in range(num_layers):
            with safe_open(str(self.path / f"layer_{index:05d}.safetensors"), "pt") as f:
                meta = json.loads(f.metadata()["schemes"])
                quantized = {name: StoredQuantized(f.get_tensor(f"{name}::codes"), f.get_tensor(f"{name}::scale"),
                                                   f.get_tensor(f"{name}::zero"), b, g, s)
                             for name, (b, g, s) in meta.items()}
                dense = {k[len("dense::"):]: f.get_tensor(k) for k in f.keys() if k.startswith("dense::")}
            yield Replacements(quantized=quantized, tensors=dense)

    def schemes(self, num_layers: int) -> dict:
        """{(bits, group_size, symmetric): [module names]} over all finished layers."""
        from safetensors import safe_open

        out: dict = {}
        for index in range(num_layers):
            with safe_open(str(self.path / f"layer_{index:05d}.safetensors"), "pt") as f:
                for name, (b, g, s) in json.loads(f.metadata()["schemes"]).items():
                    out.setdefault((b, g, s), []).append(name)
        return out
