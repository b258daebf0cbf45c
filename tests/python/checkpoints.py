"""Checkpoint helpers shared by the pipeline, rotation and AWQ tests: read a saved checkpoint, and the
crash-after-layer-0-then-resume check (a resumed run must write exactly the tensors of an uninterrupted one)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moequant import pipeline


def checkpoint_tensors(d: Path) -> dict:
    """Every tensor of the ``*.safetensors`` files of directory ``d``, by name."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


class CrashAfterLayer0(RuntimeError):
    """Raised by :func:`crash_after_layer_0` to interrupt a run."""


def crash_after_layer_0(index: int) -> None:
    """``_after_layer`` hook of :func:`moequant.pipeline.quantize` that interrupts the run once layer 0 is saved."""
    if index == 0:
        raise CrashAfterLayer0("simulated crash after layer 0")


def assert_resume_bit_identical(model, recipe, tmp_path: Path, crash: type = CrashAfterLayer0,
                                **quantize_kw) -> dict:
    """Runs ``recipe`` on ``model`` uninterrupted (``tmp_path/full``), then interrupted after layer 0 by ``crash``
    (any BaseException type, e.g. KeyboardInterrupt) and resumed (``tmp_path/resumed``); asserts the two checkpoints
    hold the same tensors, bit for bit. Returns the full run's."""
    kw = {"progress": False, **quantize_kw}
    pipeline.quantize(model, recipe, output_dir=tmp_path / "full", **kw)

    def interrupt(index: int) -> None:
        if index == 0:
            raise crash("simulated interruption after layer 0")

    with pytest.raises(crash):
        pipeline.quantize(model, recipe, output_dir=tmp_path / "resumed", _after_layer=interrupt, **kw)
    pipeline.quantize(model, recipe, output_dir=tmp_path / "resumed", resume=True, **kw)
    a, b = checkpoint_tensors(tmp_path / "full"), checkpoint_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a
