"""The moequant command line: argument errors, exit codes, quantize wiring (fake pipeline), inspect, eval."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from moequant import cli
from moequant.cli import main

def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moequant: error: "), err
    assert "Traceback" not in err
    return lines[0]


class FakePipeline:
    """Stands in for moequant.pipeline: records the call, returns a report with summary()."""

    def __init__(self):
        self.calls = []

    def quantize(self, model_path, recipe, output_dir=None, *, resume=False, export_format="pack-quantized",
                 progress=True):
        self.calls.append(dict(model_path=model_path, recipe=recipe, output_dir=output_dir, resume=resume,
                               export_format=export_format, progress=progress))
        return types.SimpleNamespace(summary=lambda: "REPORT-SUMMARY")


@pytest.fixture
def fake_pipeline(monkeypatch):
    import moequant.pipeline.lock  # noqa: F401 -- the CLI imports it by its full name: it must stay reachable (a test
    # run alone used to fail here: the stand-in package below has no submodules)
    fake = FakePipeline()
    monkeypatch.setitem(sys.modules, "moequant.pipeline", fake)
    return fake


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A model directory with only a qwen3_moe config.json (enough for every check before the pipeline)."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    return d


@pytest.fixture
def calib(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text("some calibration text\n")
    return p


@pytest.mark.parametrize("argv, match", [
    ([], "the following arguments are required"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["quantize", "m"], "required: --out"),
    (["quantize", "m", "--out", "o", "--method", "awq"], "argument --method: invalid choice: 'awq'"),
    (["quantize", "m", "--out", "o", "--num-samples", "0"], "--num-samples: expected an integer >= 1, got '0'"),
    (["quantize", "m", "--out", "o", "--bits", "four"], "argument --bits: invalid int value"),
    (["quantize", "m", "--out", "o", "--format", "gguf"], "argument --format: invalid choice"),
    (["eval", "m"], "required: --text"),
    (["eval", "m", "--text", "t", "--batch-size", "-3"], "--batch-size: expected an integer >= 1"),
    (["inspect"], "required: MODEL"),
    (["-v", "-q", "inspect", "m"], "not allowed with argument"),
])
def test_argument_errors_exit_2(capsys, argv, match):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert match in _one_error_line(err) and out == ""


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "quantize" in capsys.readouterr().out
    assert main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--out", "--recipe", "--bits", "--group-size", "--symmetric", "--method", "--calib",
                 "--num-samples", "--seq-len", "--device", "--resume", "--format"):
        assert flag in out


def test_quantize_missing_model_exits_2(capsys, tmp_path, fake_pipeline, calib):
    rc = main(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), "--calib", str(calib)])
    assert rc == 2 and "model directory" in _one_error_line(capsys.readouterr().err)
    assert fake_pipeline.calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_quantize_existing_out_exits_2_before_work(capsys, tmp_path, model_dir, calib, fake_pipeline, monkeypatch,
                                                   resume):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("previous run")
    monkeypatch.setattr(cli.common, "load_config", lambda *a: pytest.fail("work started despite the existing --out"))
    rc = main(["quantize", str(model_dir), "--out", str(out), "--calib", str(calib)] + ["--resume"] * resume)
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"--out {out} already exists" in line and ("out.partial" in line) == resume
    assert fake_pipeline.calls == [] and (out / "model.safetensors").read_text() == "previous run"


def test_quantize_unfinished_run_without_resume_exits_2(capsys, tmp_path, model_dir, calib, fake_pipeline):
    (tmp_path / "out.partial").mkdir()
    rc = main(["quantize", str(model_dir), "--out", str(tmp_path / "out"), "--calib", str(calib)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "out.partial holds an unfinished run; pass --resume" in line
    assert fake_pipeline.calls == []


def test_quantize_calls_pipeline_with_flags_over_recipe(capsys, tmp_path, model_dir, calib, fake_pipeline):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("scheme: {bits: 8, group_size: 64}\noverrides: [{pattern: 'model.layers.0.*', skip: true}]\n")
    out = tmp_path / "out"
    rc = main(["quantize", str(model_dir), "--out", str(out), "--recipe", str(recipe), "--bits", "3", "--symmetric",
               "--calib", str(calib), "--num-samples", "16", "--seq-len", "64", "--format", "dequantized"])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip().splitlines()[-1] == "REPORT-SUMMARY"
    (call,) = fake_pipeline.calls
    r = call["recipe"]
    assert (r.scheme.bits, r.scheme.group_size, r.scheme.symmetric) == (3, 64, True)  # flag > file > default
    assert r.calibration.text_files == [str(calib)] and (r.calibration.num_samples, r.calibration.seq_len) == (16, 64)
    assert r.resolve("model.layers.0.self_attn.q_proj") is None
    assert call["model_path"] == str(model_dir) and call["output_dir"] == str(out)
    assert call["resume"] is False and call["export_format"] == "dequantized"


def test_quantize_resume_unfinished_run(capsys, tmp_path, model_dir, calib, fake_pipeline):
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    assert main(["quantize", str(model_dir), "--out", str(out), "--method", "rtn", "--resume", "--calib",
                 str(calib)]) == 0
    (call,) = fake_pipeline.calls
    assert call["resume"] is True and call["recipe"].scheme.method == "rtn"
    assert call["export_format"] == "pack-quantized"


@pytest.mark.parametrize("extra, match", [
    ([], "no calibration data; pass --calib FILE"),
    (["--calib", "missing.txt"], "calibration file missing.txt not found"),
    (["--method", "rtn", "--bits", "9", "--calib", "CALIB"], "bits: expected an integer in [2, 8], got 9"),
    (["--method", "rtn", "--group-size", "0", "--calib", "CALIB"], "group_size: expected a positive integer"),
    (["--method", "rtn", "--recipe", "missing.yaml", "--calib", "CALIB"], "recipe file missing.yaml not found"),
    (["--method", "rtn", "--device", "tpu", "--calib", "CALIB"], "device: expected 'cpu', 'cuda', 'cuda:N'"),
])
def test_quantize_user_errors_exit_2(capsys, tmp_path, model_dir, calib, fake_pipeline, extra, match):
    extra = [str(calib) if a == "CALIB" else a for a in extra]
    rc = main(["quantize", str(model_dir), "--out", str(tmp_path / "out")] + extra)
    assert rc == 2 and match in _one_error_line(capsys.readouterr().err)
    assert fake_pipeline.calls == []


def test_quantize_unsupported_family_exits_2(capsys, tmp_path, calib, fake_pipeline):
    d = tmp_path / "llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["quantize", str(d), "--out", str(tmp_path / "o"), "--calib", str(calib)]) == 2
    assert "unsupported MoE model_type" in _one_error_line(capsys.readouterr().err)
    assert fake_pipeline.calls == []


def test_cuda_device_without_gpu_exits_2(capsys, tmp_path, model_dir, calib, fake_pipeline):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "o"), "--calib", str(calib),
                 "--device", device]) == 2
    assert f"--device {device}" in _one_error_line(capsys.readouterr().err)
    assert fake_pipeline.calls == []


def test_log_levels(capsys, tmp_path, model_dir, calib, fake_pipeline):
    args = ["quantize", str(model_dir), "--calib", str(calib)]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "INFO moequant.cli: model" in capsys.readouterr().err
    assert main(["-q"] + args + ["--out", str(tmp_path / "b")]) == 0
    assert "INFO" not in capsys.readouterr().err
    assert [c["progress"] for c in fake_pipeline.calls] == [True, False]
    assert main(args + ["--out", str(tmp_path / "c"), "-q"]) == 0
    assert "INFO" not in capsys.readouterr().err


def test_inspect_tiny(capsys, shared_tiny_model):
    assert main(["inspect", str(shared_tiny_model)]) == 0
    out = capsys.readouterr().out
    fields = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert fields["family"].startswith("qwen3_moe")
    assert fields["layers"] == "6 (MoE 6, dense 0)"
    assert fields["experts per layer"] == "16" and fields["top-k"] == "4"
    assert fields["hidden size"] == "384" and fields["moe intermediate size"] == "128"
    assert fields["parameters"].startswith("19,703,424 (19.7M")
    # 6 layers x (q, k, v, o) Linears; 6 x 16 experts x 3 projections
    assert fields["quantized"] == "24 Linears + 96 experts x 3 projections (312 weight matrices)"
    hp = fields["high precision"]
    assert "model.layers.*.mlp.gate (x6)" in hp and "lm_head" in hp and "model.embed_tokens" in hp


def test_inspect_missing_model_exits_2(capsys, tmp_path):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "model directory" in _one_error_line(capsys.readouterr().err)


def test_eval_tiny_last_line_is_ppl(capsys, tmp_path, shared_dir, shared_tiny_model):
    model = shared_tiny_model
    heldout = shared_dir / "data" / "evaltext" / "heldout.txt"
    if not heldout.is_file():
        pytest.skip(f"evaluation text not found at {heldout}")
    text = tmp_path / "slice.txt"
    text.write_text(heldout.read_text(encoding="utf-8")[:1200], encoding="utf-8")
    assert main(["-q", "eval", str(model), "--text", str(text), "--seq-len", "64", "--device", "cpu",
                 "--batch-size", "4"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"ppl=(\d+\.\d{4})", last)
    assert m, last
    assert 1.0 < float(m.group(1)) < 1000.0 and math.isfinite(float(m.group(1)))


def test_eval_user_errors_exit_2(capsys, tmp_path, shared_tiny_model):
    model = shared_tiny_model
    assert main(["eval", str(model), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "--text" in _one_error_line(capsys.readouterr().err)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert main(["eval", str(model), "--text", str(short), "--seq-len", "64", "--device", "cpu"]) == 2
    assert "fewer than seq_len + 1" in _one_error_line(capsys.readouterr().err)


def test_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moequant", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("moequant: error: model directory")


def test_quantize_bad_gptaq_recipe_is_one_error_line(capsys, tmp_path, model_dir, calib, fake_pipeline):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("gptaq: {enabled: true, alpha: 3}\n")
    rc = main(["quantize", str(model_dir), "--out", str(tmp_path / "out"), "--recipe", str(recipe), "--calib",
               str(calib)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and "gptaq.alpha: expected a number in [0, 2], got 3" in line and fake_pipeline.calls == []
    recipe.write_text("gptaq: {enabled: true}\n")
    assert main(["quantize", str(model_dir), "--out", str(tmp_path / "out2"), "--recipe", str(recipe), "--calib",
                 str(calib)]) == 0
    assert fake_pipeline.calls[-1]["recipe"].gptaq.enabled
