"""Checkpoint helpers shared by the pipeline, rotation, AWQ and loading tests: read a saved checkpoint, load
checkpoints in plain transformers (a subprocess without moequant), and the crash-after-layer-0-then-resume check
(a resumed run must write exactly the tensors of an uninterrupted one)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors import safe_open

from moequant import pipeline
from moequant.pipeline import LayerObserver


def checkpoint_tensors(d: Path) -> dict:
    """Every tensor of the ``*.safetensors`` files of directory ``d``, by name."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


# Loads each given checkpoint with plain transformers (no moequant import) and saves its logits on the token ids in
# ``<checkpoint>/logits.pt``, or the error's first line; ``PATH=mxfp4`` loads with transformers' MXFP4 dequantization.
# A compressed-tensors checkpoint also gets ``logits_weights.pt``: the logits with compressed-tensors' quantization
# forward turned off (its decompressed weights alone, without the activation fake-quantization of W8A8 / W4A4
# schemes).
_LOADER = r"""
import sys, json, torch, transformers
transformers.logging.set_verbosity_error()
ids, out = torch.load(sys.argv[1]), {}
for arg in sys.argv[2:]:
    path, _, quant = arg.partition("=")
    kw = {"quantization_config": transformers.Mxfp4Config(dequantize=True)} if quant == "mxfp4" else {}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)
        with torch.no_grad():
            torch.save(model(ids).logits, path + "/logits.pt")
            qc = getattr(model.config, "quantization_config", None)
            if type(qc).__name__ == "CompressedTensorsConfig":
                from compressed_tensors.quantization import disable_quantization
                model.apply(disable_quantization)
                torch.save(model(ids).logits, path + "/logits_weights.pt")
        out[path] = "ok"
    except Exception as exc:
        out[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
print(json.dumps(out))
"""


def transformers_logits(ids_file: Path, checkpoints: list) -> dict:
    """Loads ``checkpoints`` (paths, or ``"PATH=mxfp4"``) in one subprocess that never imports moequant and saves
    their logits on the token ids saved in ``ids_file`` as ``<checkpoint>/logits.pt``; returns {path: "ok" or the
    error's first line}."""
    proc = subprocess.run([sys.executable, "-c", _LOADER, str(ids_file), *map(str, checkpoints)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


class CrashAfterLayer0(RuntimeError):
    """Raised by :func:`crash_after_layer_0` to interrupt a run."""


def crash_after_layer_0(index: int, crash: type = CrashAfterLayer0) -> None:
    """Interrupts a run once layer 0 is saved, by raising ``crash`` (any BaseException type, e.g.
    KeyboardInterrupt); :func:`crash_observer` calls it from the pipeline."""
    if index == 0:
        raise crash("simulated interruption after layer 0")


class _CrashAfterLayer0(LayerObserver):
    def __init__(self, crash: type):
        self.crash = crash

    def layer_done(self, index, result) -> None:
        crash_after_layer_0(index, self.crash)


def crash_observer(crash: type = CrashAfterLayer0) -> list:
    """``observers`` of :func:`moequant.pipeline.quantize` that interrupt the run once layer 0 is committed
    (:func:`crash_after_layer_0`)."""
    return [_CrashAfterLayer0(crash)]


def assert_resume_bit_identical(model, recipe, tmp_path: Path, crash: type = CrashAfterLayer0,
                                while_interrupted: Optional[Callable[[Path], None]] = None, **quantize_kw) -> dict:
    """Runs ``recipe`` on ``model`` uninterrupted (``tmp_path/full``), then interrupted after layer 0 by ``crash``
    (:func:`crash_after_layer_0`) and resumed (``tmp_path/resumed``). Asserts that the interruption leaves no output
    but a resumable ``resumed.partial``, that ``while_interrupted(tmp_path/"resumed")`` (optional: checks on the
    interrupted state) passes, that the resumed run starts at layer 1 and removes the work directory, and that the two
    checkpoints hold the same tensors, bit for bit. Returns the full run's."""
    kw = {"progress": False, **quantize_kw}
    pipeline.quantize(model, recipe, output_dir=tmp_path / "full", **kw)
    out = tmp_path / "resumed"
    work = out.with_name(out.name + ".partial")
    with pytest.raises(crash):
        pipeline.quantize(model, recipe, output_dir=out, observers=crash_observer(crash), **kw)
    assert not out.exists() and work.is_dir()  # no half-written output
    if while_interrupted is not None:
        while_interrupted(out)
    report = pipeline.quantize(model, recipe, output_dir=out, resume=True, **kw)
    assert report.resumed_from_layer == 1
    assert not work.exists()
    a, b = checkpoint_tensors(tmp_path / "full"), checkpoint_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a
