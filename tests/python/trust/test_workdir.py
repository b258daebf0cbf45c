"""The work directory ``<out>.partial`` (issue #11): a kill at any point resumes bit-identically, a resume checks the
checkpoint's content (not its path), a second process is locked out, and a damaged directory is one clear error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moequant
from moequant import cli, pipeline
from moequant.recipe import CalibrationConfig, QuantScheme, Recipe
from checkpoints import CrashAfterLayer0, checkpoint_tensors, crash_observer
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[3]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
PYTHON_DIR = str(Path(moequant.__file__).resolve().parents[1])


IDS = torch.randint(0, 8000, (4, 32), generator=torch.Generator().manual_seed(0))  # calibration token ids


def _recipe(**scheme) -> Recipe:  # GPTQ (its results depend on the layer inputs), minmax scales (fast)
    return Recipe(scheme=QuantScheme(group_size=32, scale_search="minmax", **scheme),
                  calibration=CalibrationConfig(num_samples=4, seq_len=32, batch_size=2))


def _groups_recipe() -> Recipe:  # _recipe() with the experts in groups of 2: their results in part files
    r = _recipe()
    r.experts_per_group = 2
    return r


def _quantize(model, out, recipe=None, **kw):
    return pipeline.quantize(model, recipe or _recipe(), calibration=kw.pop("calibration", IDS), output_dir=out,
                             progress=False, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def expected(tiny, tmp_path_factory) -> dict:
    """The tensors of an uninterrupted run of ``_recipe()``."""
    out = tmp_path_factory.mktemp("full") / "out"
    _quantize(tiny, out)
    return checkpoint_tensors(out)


@pytest.fixture(scope="module")
def expected_groups(tiny, tmp_path_factory) -> dict:
    """The tensors of an uninterrupted run of ``_recipe()`` with experts in groups of 2 (part files)."""
    out = tmp_path_factory.mktemp("full-groups") / "out"
    _quantize(tiny, out, _groups_recipe())
    return checkpoint_tensors(out)


@pytest.fixture(scope="module")
def interrupted_groups(tiny, tmp_path_factory) -> Path:
    """As :func:`interrupted`, with experts in groups of 2: layer 0's results partly in part files."""
    out = tmp_path_factory.mktemp("interrupted-groups") / "out"
    with pytest.raises(CrashAfterLayer0):
        _quantize(tiny, out, _groups_recipe(), observers=crash_observer())
    partial = out.with_name("out.partial")
    assert sorted(p.name for p in partial.glob("layer_00000.part*")) == ["layer_00000.part0000.safetensors",
                                                                         "layer_00000.part0001.safetensors"]
    return partial


@pytest.fixture(scope="module")
def interrupted(tiny, tmp_path_factory) -> Path:
    """A work directory left by a run of ``_recipe()`` interrupted after layer 0 (a template: copy it, do not touch)."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    with pytest.raises(CrashAfterLayer0):
        _quantize(tiny, out, observers=crash_observer())
    return out.with_name("out.partial")


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Kill(BaseException):
    """Stands in for a kill: no `except Exception` handler catches it."""


# ------------------------------------------------------------------------------------------ (1) atomic updates
@pytest.mark.parametrize("host_memory_gb, groups", [(None, None), (0, None), (None, 2)],
                         ids=["states-in-memory", "states-on-disk", "expert-groups-in-part-files"])
def test_kill_between_any_two_writes_resumes_bit_identically(tiny, expected, expected_groups, tmp_path, monkeypatch,
                                                             host_memory_gb, groups):
    """The run is killed right after its k-th rename (os.replace / os.rename: every atomic file or directory update
    of the work directory and the export), for k = 1, 2, ... until a run gets through; each interrupted run is then
    resumed and must give the uninterrupted checkpoint, bit for bit. On the old work format, a kill between writing
    the activations and progress.json re-quantized a layer on its own outputs (a different checkpoint, no error).
    With the hidden states in the disk-backed store (host_memory_gb 0) a layer's outputs file is renamed into place
    by the commit instead of written by it; with expert groups (experts_per_group 2) each group's results are written
    to a part file before the layer's commit, and a kill after any of them resumes to the groups' own checkpoint."""
    state = {"prefix": None, "count": 0, "kill_at": None}

    def after(real):
        def wrapped(src, dst, *args, **kwargs):
            result = real(src, dst, *args, **kwargs)
            if state["prefix"] and os.fspath(dst).startswith(state["prefix"]):
                state["count"] += 1
                if state["count"] == state["kill_at"]:
                    raise Kill(f"killed after write {state['count']}: {dst}")
            return result
        return wrapped

    monkeypatch.setattr(os, "replace", after(os.replace))
    monkeypatch.setattr(os, "rename", after(os.rename))
    r = _recipe() if groups is None else _groups_recipe()
    r.host_memory_gb = host_memory_gb
    want = expected if groups is None else expected_groups
    k = 1
    while True:
        out = tmp_path / f"run-{k:03d}"
        state.update(prefix=str(out), count=0, kill_at=k)
        try:
            _quantize(tiny, out, r)
        except Kill:
            state["kill_at"] = None
        else:
            break  # k is past the last write: every point between two writes was covered
        if not out.exists():  # else the kill came after the checkpoint's own rename: it is complete
            report = _quantize(tiny, out, r, resume=True)
            assert report.resumed_from_layer in (None, 0, 1, 2)
            assert not out.with_name(out.name + ".partial").exists()
        _assert_same(checkpoint_tensors(out), want)
        assert [p.name for p in tmp_path.glob(f"{out.name}.tmp-*")] == []
        k += 1
    assert k > 9, f"only {k - 1} writes seen: the hook does not see the run's writes"


# ------------------------------------------------------------------------------------------ (2) fingerprint
@pytest.mark.parametrize("change", ["weights", "shapes"])
def test_resume_refuses_another_checkpoint_at_the_same_path(tmp_path, change):
    """The same path with other content: other weights of the same shapes (header and size unchanged; the
    sampled data blocks differ) or other shapes. The old fingerprint held only the path and resumed silently."""
    model = tiny_qwen3_checkpoint(tmp_path / "model")
    out, r = tmp_path / "out", _recipe()
    with pytest.raises(CrashAfterLayer0):
        _quantize(model, out, r, observers=crash_observer())
    shutil.rmtree(model)
    if change == "weights":
        tiny_qwen3_checkpoint(model, seed=1)
    else:
        tiny_qwen3_checkpoint(model, moe_intermediate_size=32)
    with pytest.raises(ValueError) as info:
        _quantize(model, out, r, resume=True)
    msg, partial = str(info.value), tmp_path / "out.partial"
    assert "model's content differs" in msg and "model.safetensors" in msg, msg
    assert ("config.json" in msg) == (change == "shapes"), msg
    assert f"delete {partial}" in msg and "\n" not in msg
    assert partial.is_dir() and not out.exists()  # nothing lost


def test_resume_names_what_differs_and_follows_moved_content(tiny, interrupted, expected, tmp_path):
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    shutil.copytree(interrupted, partial)
    cases = [
        (dict(recipe=_recipe(bits=3)), "the recipe differs (scheme)"),
        (dict(recipe=_recipe(), calibration=IDS.flip(0)), "the calibration data differs"),
        (dict(recipe=_recipe(), export_format="dequantized"),
         "the format differs (it was pack-quantized, now dequantized)"),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError) as info:
            _quantize(tiny, out, kw.pop("recipe"), resume=True, **kw)
        assert words in str(info.value) and f"delete {partial}" in str(info.value), str(info.value)
    manifest = partial / "manifest.json"  # a work directory of an older work format
    saved = manifest.read_text()
    manifest.write_text(json.dumps({**json.loads(saved), "version": 1}))
    with pytest.raises(ValueError, match=r"made by another moequant version \(work format 1; .*delete "):
        _quantize(tiny, out, resume=True)
    manifest.write_text(saved)
    # the same content under another path (a moved or copied checkpoint) resumes
    moved = shutil.copytree(tiny, tmp_path / "moved")
    report = _quantize(moved, out, resume=True)
    assert report.resumed_from_layer == 1
    _assert_same(checkpoint_tensors(out), expected)


# ------------------------------------------------------------------------------------------ (3) lock
HOLDER = """
import json, sys
from pathlib import Path
from moequant.pipeline.workdir import WorkDir
work = WorkDir(Path(sys.argv[1]), json.loads(sys.argv[2]), resume=sys.argv[3] == "1")
print("ready", flush=True)
sys.stdin.read()  # hold until the test closes stdin or kills us
"""


def _hold(path: Path, fingerprint: dict, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PYTHON_DIR, os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), json.dumps(fingerprint), "1" if resume else "0"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        pytest.fail(f"holder did not start: {line!r} {p.communicate()[1]}")
    return p


def test_second_process_is_locked_out_until_the_first_ends(tiny, interrupted, tmp_path, capsys):
    """A fresh run holding a new work directory locks out a fresh run and a resume of the same --out (one line
    naming the directory and the holder's pid); the lock goes with the holder, also when it is killed."""
    from moequant.pipeline.workdir import WorkDir

    fingerprint = {"v": 1}
    fresh = tmp_path / "fresh.partial"
    holder = _hold(fresh, fingerprint, resume=False)
    try:
        for resume in (False, True):
            with pytest.raises(ValueError) as info:
                WorkDir(fresh, fingerprint, resume=resume)
            msg = str(info.value)
            assert f"{fresh} is in use by another moequant run (pid {holder.pid} on " in msg, msg
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    with WorkDir(fresh, fingerprint, resume=True) as work:
        assert work.completed == 0

    # a resume of a real run's work directory, through the pipeline and the CLI
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    shutil.copytree(interrupted, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    holder = _hold(partial, manifest, resume=True)
    try:
        with pytest.raises(ValueError, match=f"in use by another moequant run \\(pid {holder.pid} on "):
            _quantize(tiny, out, resume=True)
        argv = ["quantize", str(tiny), "--out", str(out), "--calib", str(CALIB), "--num-samples", "4",
                "--seq-len", "32", "--group-size", "32", "--device", "cpu", "-q"]
        for extra in ([], ["--resume"]):
            assert cli.main(argv + extra) == 2
            lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"moequant: error: {partial} is in use by another "
                                                           f"moequant run (pid {holder.pid} on "), lines
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    report = _quantize(tiny, out, resume=True)
    assert report.resumed_from_layer == 1 and not partial.exists()


# ------------------------------------------------------------------------------------------ (4) damaged directory
def _garble(p: Path) -> None:
    p.write_bytes(b"\x00garbled{" * 3)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:60])


DAMAGE = {
    "manifest-garbled": ("manifest.json", _garble),
    "manifest-not-an-object": ("manifest.json", lambda p: p.write_text("[1, 2]")),
    "manifest-missing": ("manifest.json", Path.unlink),
    "progress-garbled": ("progress.json", _garble),
    "progress-no-keys": ("progress.json", lambda p: p.write_text("{}")),
    "record-garbled": ("layer_00000.json", _garble),
    "record-wrong-fields": ("layer_00000.json", lambda p: p.write_text('{"nonsense": 1}')),
    "layer-truncated": ("layer_00000.safetensors", _truncate),
    "layer-garbled": ("layer_00000.safetensors", _garble),
    "layer-missing": ("layer_00000.safetensors", Path.unlink),
    "activations-truncated": ("activations*.safetensors", _truncate),
    "activations-garbled": ("activations*.safetensors", _garble),
    "activations-missing": ("activations*.safetensors", Path.unlink),
}


PART_DAMAGE = {
    "part-missing": ("layer_00000.part0001.safetensors", Path.unlink),
    "part-garbled": ("layer_00000.part0000.safetensors", _garble),
    "part-truncated": ("layer_00000.part0001.safetensors", _truncate),
}


@pytest.mark.parametrize("case", sorted(PART_DAMAGE))
def test_damaged_part_file_is_one_clear_error(tiny, interrupted_groups, tmp_path, case):
    """A committed layer's part file (expert groups) missing or damaged: the same one-line error, nothing touched."""
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    shutil.copytree(interrupted_groups, partial)
    name, damage = PART_DAMAGE[case]
    damage(partial / name)
    before = sorted(p.name for p in partial.iterdir())
    with pytest.raises(ValueError) as info:
        _quantize(tiny, out, _groups_recipe(), resume=True)
    msg = str(info.value)
    assert str(partial / name) in msg and f"delete {partial}" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in partial.iterdir()) == before and not out.exists()


def test_part_files_of_an_uncommitted_layer_are_removed_on_resume(tiny, interrupted_groups, expected_groups,
                                                                  tmp_path):
    """Part files of the layer the run was in when it stopped (layer 1 here) are orphans: the resume removes them
    before it redoes the layer, and the checkpoint is the uninterrupted one."""
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    shutil.copytree(interrupted_groups, partial)
    stale = partial / "layer_00001.part0000.safetensors"
    shutil.copy(partial / "layer_00000.part0000.safetensors", stale)  # what a kill in layer 1 would leave
    removed = []
    real_unlink = Path.unlink

    def watch(p, *a, **k):
        removed.append(p.name)
        return real_unlink(p, *a, **k)

    import unittest.mock

    with unittest.mock.patch.object(Path, "unlink", watch):
        report = _quantize(tiny, out, _groups_recipe(), resume=True)
    assert report.resumed_from_layer == 1 and "layer_00001.part0000.safetensors" in removed
    _assert_same(checkpoint_tensors(out), expected_groups)


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_work_directory_is_one_clear_error(tiny, interrupted, tmp_path, case):
    """A damaged file of the work directory: a one-line ValueError naming the file and saying to delete the
    directory (not a JSON / safetensors / unpickling traceback or a KeyError), and nothing written or removed."""
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    shutil.copytree(interrupted, partial)
    pattern, damage = DAMAGE[case]
    (target,) = partial.glob(pattern)
    damage(target)
    before = sorted(p.name for p in partial.iterdir())
    with pytest.raises(ValueError) as info:
        _quantize(tiny, out, resume=True)
    msg = str(info.value)
    assert str(target) in msg and f"delete {partial}" in msg and "\n" not in msg, msg
    assert sorted(p.name for p in partial.iterdir()) == before and not out.exists()
    assert [p.name for p in tmp_path.glob("out.tmp-*")] == []
