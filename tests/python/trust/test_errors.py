"""Issue #11: bad input ends in ONE clear error, found before the first layer starts and before anything is written.

One test per class of bad input. Each checks the Python API (the exception type, and that its message names the
file / tensor / layer / field, the expected and the actual value, and the remedy) and, where the CLI can meet the
case, ``moequant.cli.main`` (exit code 2, exactly one ``moequant: error:`` line on stderr, no traceback). Runs that
must stop in preflight are also checked to have loaded no layer and written nothing.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moequant import pipeline
from moequant.cli import main
from moequant.models.lazy import LazyModel
from moequant.recipe import DEFAULT_IGNORE, CalibrationConfig, Override, QuantScheme, Recipe
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[3]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
SHARD = "model.safetensors"
EXPERT = "model.layers.1.mlp.experts.2.up_proj"


# ------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The random 2-layer Qwen3-MoE of testdata (hidden 64, 4 experts of width 64, vocab 8192, tokenizer saved)."""
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("trust") / "model")


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A private copy of the tiny model, free to corrupt."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def _recipe(**scheme) -> Recipe:
    """The recipe :func:`cli_quantize` builds from its flags (so a CLI run can resume an API run)."""
    scheme = {"group_size": 32, "symmetric": True, **scheme}  # symmetric: no warning about transformers' loader
    return Recipe(scheme=QuantScheme(**scheme), device="cpu",
                  calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=2, seq_len=32))


def one_error_line(capsys) -> str:
    """The single ``moequant: error:`` line of stderr (asserts there is exactly one line and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moequant: error: "), err
    assert "Traceback" not in err
    return lines[0]


def cli_quantize(model: Path, out: Path, *extra: str) -> int:
    return main(["-q", "quantize", str(model), "--out", str(out), "--calib", str(CALIB), "--num-samples", "2",
                 "--seq-len", "32", "--group-size", "32", "--symmetric", "--device", "cpu", *extra])


@pytest.fixture
def no_layer_work(monkeypatch):
    """Fails the test if the pipeline loads a decoder layer (preflight must have stopped the run before)."""
    def refuse(self, index, device="cpu"):
        pytest.fail(f"layer {index} was loaded: the error was not found in preflight")

    monkeypatch.setattr(LazyModel, "load_layer", refuse)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(out.name + ".")] == []


def rewrite(model: Path, change) -> None:
    """Rewrites the model's safetensors file after ``change(tensors)`` edits the dict of tensors in place."""
    tensors = load_file(str(model / SHARD))
    change(tensors)
    save_file(tensors, str(model / SHARD), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------- 1. files
def _truncate(model: Path) -> str:
    f = model / SHARD
    size = f.stat().st_size
    with open(f, "r+b") as h:
        h.truncate(size - 1000)
    return f"truncated: {size - 1000} bytes, header needs {size}"


def _bad_header_json(model: Path) -> str:
    f = model / SHARD
    data = bytearray(f.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    data[9] = ord("!")
    f.write_bytes(bytes(data))
    return "the header is not valid JSON"


def _header_length_too_big(model: Path) -> str:
    f = model / SHARD
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    return "header needs"


def _unknown_dtype(model: Path) -> str:
    f = model / SHARD
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].replace(b'"BF16"', b'"BX16"', 1)
    f.write_bytes(data[:8] + header + data[8 + n:])
    return "unknown dtype 'BX16'"


def _index_names_missing_shard(model: Path) -> str:
    names = list(load_file(str(model / SHARD)))
    (model / SHARD).rename(model / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[-1]] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return "names 1 missing file(s): model-00002-of-00002.safetensors"


def _index_not_json(model: Path) -> str:
    (model / SHARD).rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return "not a safetensors index"


@pytest.mark.parametrize("corrupt", [_truncate, _bad_header_json, _header_length_too_big, _unknown_dtype,
                                     _index_names_missing_shard, _index_not_json])
def test_truncated_or_corrupt_safetensors(model, tmp_path, capsys, no_layer_work, corrupt):
    """Every shard is validated from its header and size (index, header length and JSON, dtypes, data offsets,
    exact file size) by quantize, eval and inspect alike, before transformers or a layer reads it."""
    what = corrupt(model)
    out = tmp_path / "q"
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        pipeline.quantize(model, _recipe(), output_dir=out, progress=False)
    msg = str(info.value)
    assert what in msg and ("re-download" in msg or "re-save" in msg), msg
    assert "model" in msg and ".safetensors" in msg, msg  # names the file
    assert_nothing_written(out)
    text = tmp_path / "eval.txt"
    text.write_text(CALIB.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    for argv in (None, ["-q", "eval", str(model), "--text", str(text), "--seq-len", "32", "--device", "cpu"],
                 ["inspect", str(model)]):
        rc = cli_quantize(model, out) if argv is None else main(argv)
        assert rc == 2 and what in one_error_line(capsys)
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------- 2. shapes
@pytest.mark.parametrize("case", ["wrong_shape", "missing"])
def test_wrong_or_missing_tensor_found_before_layer_0(model, tmp_path, capsys, no_layer_work, case):
    """Every tensor the loader reads for every layer (here: an expert of the LAST layer) is checked against the
    shape the config implies, from the headers, before layer 0 starts."""
    def change(t):
        if case == "wrong_shape":
            t[EXPERT + ".weight"] = t[EXPERT + ".weight"][:, :32].contiguous()
        else:
            del t[EXPERT + ".weight"]

    rewrite(model, change)
    out = tmp_path / "q"
    with pytest.raises(ValueError) as info:
        pipeline.quantize(model, _recipe(), output_dir=out, progress=False)
    msg = str(info.value)
    assert EXPERT + ".weight" in msg, msg
    if case == "wrong_shape":
        assert "layer 1" in msg and "shape [64, 32]" in msg and "implies [64, 64]" in msg, msg
    else:
        assert "has no tensor" in msg and "[64, 64]" in msg, msg
    assert_nothing_written(out)
    assert cli_quantize(model, out) == 2 and EXPERT in one_error_line(capsys)
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------- 3. NaN / Inf
def test_nan_in_a_weight_named_before_layer_0(model, tmp_path, capsys, no_layer_work):
    def change(t):
        t[EXPERT + ".weight"][5, 7] = float("nan")
        t[EXPERT + ".weight"][9, 1] = float("-inf")

    rewrite(model, change)
    out = tmp_path / "q"
    with pytest.raises(ValueError) as info:
        pipeline.quantize(model, _recipe(), output_dir=out, progress=False)
    msg = str(info.value)
    assert f"{EXPERT}.weight (layer 1, model.safetensors): 2 NaN/Inf value(s) of 4096, the first at index [5, 7]" \
        in msg and "re-download" in msg, msg
    assert_nothing_written(out)
    assert cli_quantize(model, out) == 2 and "NaN/Inf" in one_error_line(capsys)
    assert_nothing_written(out)


# ------------------------------------------------------------------------------------------------- 4. output disk
def test_output_disk_full_or_unwritable(tiny, tmp_path, capsys, monkeypatch):
    """Before the run: too little free space or an unwritable directory is refused with the numbers. During the
    run: a failed write (ENOSPC from Python, or from safetensors' Rust writer) is one line that says where the
    finished layers are kept and how to continue."""
    from collections import namedtuple

    from safetensors import SafetensorError

    from moequant.io import writer as checkpoint_writer
    from moequant.pipeline.workdir import WorkDir

    out = tmp_path / "deep" / "q"  # the parent does not exist yet: created by the run, checked before it
    # (a) preflight: 1 kB free
    usage = namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(OSError) as info:
        pipeline.quantize(tiny, _recipe(), output_dir=out, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert re.search(r"not enough free space .*the run writes about [\d.]+ GB \(work directory [\d.]+ GB, checkpoint "
                     r"[\d.]+ GB\), 0\.00 GB are free on that device; free space or choose another --out",
                     str(info.value)), str(info.value)
    assert cli_quantize(tiny, out) == 2 and "not enough free space" in one_error_line(capsys)
    assert not (tmp_path / "deep").exists()
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    # (b) preflight: a directory the run cannot write in (probe refused, as on a read-only mount)
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match=r"output_dir: cannot write in .*Read-only file system.*choose a "
                                              r"writable --out"):
        pipeline.quantize(tiny, _recipe(), output_dir=out, progress=False)
    assert cli_quantize(tiny, out) == 2 and "cannot write in" in one_error_line(capsys)
    monkeypatch.undo()

    # (c) during the run: ENOSPC while saving layer 1; the finished layer 0 is kept for --resume
    original = WorkDir.save_layer

    def full_at_layer_1(self, index, *a, **k):
        if index == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "layer_00001.safetensors"))
        return original(self, index, *a, **k)

    monkeypatch.setattr(WorkDir, "save_layer", full_at_layer_1)
    with pytest.raises(OSError) as info:
        pipeline.quantize(tiny, _recipe(), output_dir=out, progress=False)
    partial = out.with_name("q.partial")
    assert re.fullmatch(rf"no space left on device writing {re.escape(str(partial))}/layer_00001.safetensors "
                        rf"\([\d.]+ GB free\); free space or choose another --out \(output_dir\); the finished layers "
                        rf"are kept in {re.escape(str(partial))}, continue with --resume \(resume=True\)",
                        str(info.value)), str(info.value)
    assert json.loads((partial / "progress.json").read_text())["completed_layers"] == 1 and not out.exists()
    monkeypatch.undo()

    # (d) during the export, from safetensors' writer (no OSError, an "(os error 28)" message): CLI, then resume
    def full_save(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_writer, "save_file", full_save)  # the checkpoint writer's shards
    assert cli_quantize(tiny, out, "--resume") == 2
    line = one_error_line(capsys)
    assert "no space left on device writing" in line and "continue with --resume" in line, line
    assert partial.is_dir() and not out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["q.partial"]  # the writer's temporary directory is gone
    monkeypatch.undo()
    assert cli_quantize(tiny, out, "--resume") == 0 and out.is_dir() and not partial.exists()


def test_read_only_output_directory(tiny, tmp_path, capsys):
    """A real read-only directory (chmod 0555). Root writes there anyway, so the case cannot arise as root: the
    refusal is then covered by the refused-probe case of test_output_disk_full_or_unwritable."""
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 0555 does not stop root from writing (the refused-probe case covers it)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="output_dir: cannot write in"):
            pipeline.quantize(tiny, _recipe(), output_dir=ro / "q", progress=False)
        assert cli_quantize(tiny, ro / "q") == 2 and "cannot write in" in one_error_line(capsys)
    finally:
        ro.chmod(0o755)


# ------------------------------------------------------------------------------------------------- 5. tokenizer
def test_missing_tokenizer_is_one_clear_error_and_token_ids_need_none(model, tmp_path, capsys):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model / f).unlink()
    with pytest.raises(FileNotFoundError) as info:
        pipeline.quantize(model, _recipe(), output_dir=tmp_path / "q", progress=False)
    msg = str(info.value)
    assert str(model) in msg and "no tokenizer files" in msg and "tokenizer.json" in msg, msg
    assert "save_pretrained" in msg and "token ids" in msg, msg
    assert cli_quantize(model, tmp_path / "q") == 2 and "no tokenizer files" in one_error_line(capsys)
    text = tmp_path / "eval.txt"
    text.write_text(CALIB.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    assert main(["-q", "eval", str(model), "--text", str(text), "--seq-len", "32", "--device", "cpu"]) == 2
    assert "no tokenizer files" in one_error_line(capsys)
    # token ids: no tokenizer is loaded at all (the run completes)
    ids = torch.randint(0, 8192, (2, 32), generator=torch.Generator().manual_seed(0))
    report = pipeline.quantize(model, _recipe(), calibration=ids, progress=False)
    assert report.calibration_samples == 2 and len(report.layers) == 2
    # a tokenizer that transformers cannot build: its error's first line, the directory and the remedy
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    (model / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"the tokenizer cannot be loaded \(.*\); copy the model's tokenizer"):
        pipeline.quantize(model, _recipe(), output_dir=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


# ------------------------------------------------------------------------------------------------- 6. UTF-8
def test_non_utf8_text_names_file_and_byte_offset(tiny, tmp_path, capsys, no_layer_work):
    good = CALIB.read_text(encoding="utf-8")[:4000].encode("utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(good + "café".encode("latin-1") + good)
    at = len(good) + 3
    with pytest.raises(ValueError) as info:
        pipeline.quantize(tiny, _recipe(), calibration=bad, output_dir=tmp_path / "q", progress=False)
    msg = str(info.value)
    assert f"{bad}: not UTF-8 at byte {at}" in msg and "convert it to UTF-8" in msg, msg
    assert cli_quantize(tiny, tmp_path / "q", "--calib", str(bad)) == 2
    assert f"not UTF-8 at byte {at}" in one_error_line(capsys)
    assert main(["-q", "eval", str(tiny), "--text", str(bad), "--seq-len", "32", "--device", "cpu"]) == 2
    assert f"--text {bad}: not UTF-8 at byte {at}" in one_error_line(capsys)
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n' + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=rf"{re.escape(str(jsonl))}: not UTF-8 at byte {17 + 13}"):
        pipeline.quantize(tiny, _recipe(), calibration=jsonl, progress=False)
    assert_nothing_written(tmp_path / "q")


# ------------------------------------------------------------------------------------------------- 7. token ids
BAD_IDS = [
    (torch.full((2, 32), 8192), r"calibration: token ids must lie in \[0, vocab_size=8192\) of .*config.json, got "
                                r"max id 8192 \(sample 0\)"),
    (torch.tensor([[5] * 32, [1] * 31 + [-1]]), r"calibration: token ids must lie in .*, got min id -1 \(sample 1\)"),
    (torch.zeros(0, 32, dtype=torch.long), r"calibration: expected token ids .* got the empty shape \(0, 32\)"),
    (torch.zeros(2, 0, dtype=torch.long), r"calibration: expected token ids .* got the empty shape \(2, 0\)"),
    (torch.zeros(2, 32), r"calibration: expected token ids \[num_samples, seq_len\] \(int64\), got torch.float32"),
    (torch.zeros(64, dtype=torch.long), r"calibration: expected token ids .* got torch.int64 \(64,\)"),
    ([1, 2, 3], r"calibration: expected a file path or a non-empty list of file paths, got \[1, 2, 3\]"),
]


def test_bad_calibration_token_ids(tiny, tmp_path, no_layer_work):
    """Out-of-vocabulary (vs config.json's vocab_size), negative, empty, wrongly typed or shaped token ids."""
    for ids, match in BAD_IDS:
        with pytest.raises(ValueError, match=match):
            pipeline.quantize(tiny, _recipe(), calibration=ids, output_dir=tmp_path / "q", progress=False)
    assert_nothing_written(tmp_path / "q")


# ------------------------------------------------------------------------------------------------- 8. recipe
MUTATIONS = [  # (change after construction, the constructor call with the same value)
    (lambda r: setattr(r.scheme, "bits", 99), lambda: QuantScheme(bits=99)),
    (lambda r: r.overrides.append("x"), lambda: Recipe(overrides=["x"])),
    (lambda r: setattr(r.calibration, "num_samples", -1), lambda: CalibrationConfig(num_samples=-1)),
    (lambda r: r.ignore.append(""), lambda: Recipe(ignore=[*DEFAULT_IGNORE, ""])),
    (lambda r: r.overrides.append(Override("model.layers.0.*")) or r.overrides[-1].scheme.update(group_size=0),
     lambda: Recipe(overrides=[Override("model.layers.0.*", {"group_size": 0})])),
    (lambda r: setattr(r.fallback, "policy", "zero"), lambda: Recipe(fallback={"policy": "zero"})),
    (lambda r: setattr(r.awq, "grid", 0), lambda: Recipe(awq={"grid": 0})),
    (lambda r: setattr(r, "device", "tpu"), lambda: Recipe(device="tpu")),
]


def test_recipe_mutated_after_construction(tiny, tmp_path, no_layer_work):
    """quantize re-validates the whole recipe (Recipe.validated): the same ValueError as the constructor's."""
    for mutate, construct in MUTATIONS:
        with pytest.raises(ValueError) as expected:
            construct()
        r = _recipe()
        mutate(r)
        with pytest.raises(ValueError) as info:
            pipeline.quantize(tiny, r, output_dir=tmp_path / "q", progress=False)
        assert str(info.value) == str(expected.value)
    assert_nothing_written(tmp_path / "q")


# ------------------------------------------------------------------------------------------------- 9. nn.Module
def test_module_is_refused(tiny, tmp_path, no_layer_work):
    import transformers

    import moequant

    m = transformers.AutoModelForCausalLM.from_pretrained(tiny)  # config._name_or_path is the checkpoint
    with torch.no_grad():
        m.model.layers[0].mlp.experts.gate_up_proj.mul_(2)  # in-memory weights differ from the file's
    for api in (pipeline.quantize, moequant.quantize):
        with pytest.raises(ValueError, match=r"model_or_path: expected the path of a checkpoint directory, got a "
                                             r"Qwen3MoeForCausalLM \(torch.nn.Module\); .*save your model with "
                                             r"model.save_pretrained\(DIR\) and pass DIR"):
            api(m, _recipe(), output_dir=tmp_path / "q", progress=False)
    assert_nothing_written(tmp_path / "q")


# ------------------------------------------------------------------------------------------------- 10. patterns
PATTERN_CASES = [
    ("ignore", {"ignore": ["lm_head", "model.layers.*.self_atn.*"]},
     r"ignore\[1\]: pattern 'model.layers.\*.self_atn.\*' matches no module of the checkpoint \(near matches: "
     r"model.layers.\*.self_attn.*\); fix or remove it"),
    ("ignore", {"ignore": ["model.layers.1.self_attn.q_prj"]},
     r"ignore\[0\]: .*near matches: model.layers.1.self_attn.q_proj"),
    ("override", {"overrides": [Override("model.layers.*.self_atn.*", {"bits": 8})]},
     r"overrides\[0\].pattern: 'model.layers.\*.self_atn.\*' matches no module that moequant quantizes in this "
     r"model \(near matches: model.layers.\*.self_attn"),
    ("override", {"overrides": [Override("re:model\\.layers\\.0\\.attn\\.", skip=True)]},
     r"overrides\[0\].pattern: .*near matches: model.layers.\*"),
    ("override", {"overrides": [Override("lm_head", {"bits": 8})]},
     r"overrides\[0\].pattern: 'lm_head' matches no module that moequant quantizes .*lm_head and routers are never"),
    ("experts", {"overrides": [Override("model.layers.1.mlp.experts.3.*", {"bits": 8})]},
     r"model.layers.1: the routed experts resolve to different schemes \(model.layers.1.mlp.experts.0.gate_proj: "
     r"W4 g32 sym; model.layers.1.mlp.experts.3.gate_proj: W8 g32 sym\).*one kernel with one scheme; give all "
     r"experts of the layer one scheme with an override of the pattern 'model.layers.1.mlp.experts.\*'"),
    ("experts", {"overrides": [Override("*.experts.*.down_proj", skip=True)]},
     r"model.layers.0: the routed experts are partly quantized and partly kept in high precision "
     r"\(model.layers.0.mlp.experts.0.gate_proj: W4 g32 sym; model.layers.0.mlp.experts.0.down_proj: high "
     r"precision\)"),
]


@pytest.mark.parametrize("field, kwargs, match", PATTERN_CASES,
                         ids=["ignore-glob", "ignore-name", "override-glob", "override-regex", "override-lm_head",
                              "experts-two-schemes", "experts-partly-high-precision"])
def test_patterns_matching_nothing_and_unexportable_expert_schemes(tiny, tmp_path, capsys, no_layer_work, field,
                                                                   kwargs, match):
    r = _recipe()
    for k, v in kwargs.items():
        setattr(r, k, v)
    with pytest.raises(ValueError, match=match):
        pipeline.quantize(tiny, r, output_dir=tmp_path / "q", progress=False)
    assert_nothing_written(tmp_path / "q")
    recipe_file = tmp_path / "r.json"
    r.save(recipe_file)
    assert cli_quantize(tiny, tmp_path / "q", "--recipe", str(recipe_file)) == 2
    assert re.search(match, one_error_line(capsys))


def test_expert_scheme_rule_accepts_what_the_export_accepts(tiny, tmp_path):
    lazy = LazyModel(tiny, dtype=torch.float32)
    out = tmp_path / "q"
    ok = [
        [Override("model.layers.1.mlp.experts.*", {"bits": 8})],  # one whole layer on another scheme
        [Override("re:model\\.layers\\.0\\.mlp\\.experts\\.", skip=True)],  # one whole layer in high precision
        # per-channel == one group spanning the row (64 inputs): the export stores both under one key
        [Override("*.experts.*.gate_proj", {"group_size": 64}), Override("*.experts.*.up_proj", {"group_size": -1}),
         Override("*.experts.*.down_proj", {"group_size": -1})],
    ]
    for overrides in ok:
        r = _recipe()
        r.overrides = overrides
        pipeline.preflight(lazy, r, output_dir=out, scan=False)
    r = _recipe()
    r.overrides = [Override("model.layers.1.mlp.experts.3.*", {"bits": 8})]
    pipeline.preflight(lazy, r, output_dir=out, export_format="dequantized", scan=False)  # no fused kernel
    pipeline.preflight(lazy, r, output_dir=None, scan=False)  # nothing exported
    with pytest.raises(ValueError, match="different schemes"):
        pipeline.preflight(lazy, r, output_dir=out, scan=False)


# ------------------------------------------------------------------------------------------------- 11. packaging
def test_packaging_declares_what_the_wheel_needs(monkeypatch):
    """compressed-tensors is a runtime dependency; the wheel pins the torch it is compiled against (in-tree metadata
    provider); import refuses a torch of another major.minor than the build's, with the remedy."""
    import sys

    tomllib = pytest.importorskip("tomllib")
    import moequant

    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "dependencies" in py["project"]["dynamic"] and "dependencies" not in py["project"]
    meta = py["tool"]["scikit-build"]["metadata"]["dependencies"]
    assert meta["provider"] == "moequant_deps" and meta["provider-path"] == "build_support"
    sys.path.insert(0, str(REPO / meta["provider-path"]))
    try:
        import moequant_deps
    finally:
        sys.path.remove(str(REPO / meta["provider-path"]))
    deps = moequant_deps.dynamic_metadata("dependencies", {"requires": meta["requires"]})
    assert deps[0] == f"torch=={torch.__version__.split('+')[0]}"
    assert any(d.startswith("compressed-tensors>=0.20") for d in deps)
    with pytest.raises(ImportError, match=r"built against torch 2\.4\.1\+cu121, but torch .* is installed.*Install "
                                          r"torch==2\.4\.1, or rebuild moequant"):
        moequant.check_torch_version("2.4.1+cu121")
    moequant.check_torch_version(torch.__version__.split("+")[0] + "+other")  # same version, other variant: fine
