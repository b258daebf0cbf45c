"""Output files (issue #11): SIGTERM unwinds like Ctrl-C, a killed export leaves no temporary directory behind for
long, ``ebss`` never overwrites and writes atomically, and every output gets the modes of the user's umask.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moequant
from moequant import cli, pipeline
from moequant.calibration import ebss
from moequant.io.writer import CheckpointWriter
from checkpoints import checkpoint_tensors
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[3]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
PYTHON_DIR = str(Path(moequant.__file__).resolve().parents[1])
TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def _argv(model: Path, out: Path) -> list:
    recipe = out.parent / "recipe.json"  # minmax scales: fast
    recipe.write_text(json.dumps({"scheme": {"scale_search": "minmax"}}))
    return ["quantize", str(model), "--out", str(out), "--recipe", str(recipe), "--calib", str(CALIB),
            "--num-samples", "4", "--seq-len", "32", "--group-size", "32", "--device", "cpu"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([PYTHON_DIR, TESTS_DIR, os.environ.get("PYTHONPATH", "")])}


# The CLI in a child process whose export stalls (after creating the checkpoint's temporary directory) until it is
# signalled; it announces the stall by creating the file argv[1].
STALLED_EXPORT = """
import os, sys, time
from moequant import cli
from moequant.io import writer

marker, real_add = sys.argv[1], writer.CheckpointWriter.add

def stalling_add(self, name, tensor):
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)
    return real_add(self, name, tensor)

writer.CheckpointWriter.add = stalling_add
sys.exit(cli.main(sys.argv[2:]))
"""


def _stall_in_export(tmp_path: Path, argv: list) -> subprocess.Popen:
    marker = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_EXPORT, str(marker)] + argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run did not reach the export: {proc.communicate()}")
        time.sleep(0.05)
    return proc


# --------------------------------------------------------------------------- (5) signals, stale temporaries
def test_sigterm_during_export_prints_interrupted_leaves_nothing_and_resume_completes(tiny, tmp_path):
    out = tmp_path / "out"
    proc = _stall_in_export(tmp_path, _argv(tiny, out))
    assert len(list(tmp_path.glob("out.tmp-*"))) == 1  # the checkpoint being written
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 143 and lines[-1] == "moequant: interrupted", err
    assert "Traceback" not in err
    assert list(tmp_path.glob("out.tmp-*")) == [] and not out.exists()
    assert (tmp_path / "out.partial").is_dir()  # every layer is kept: --resume goes straight to the export
    assert cli.main(_argv(tiny, out) + ["--resume", "-q"]) == 0
    assert not (tmp_path / "out.partial").exists()
    pipeline.quantize(tiny, _cli_recipe(), output_dir=tmp_path / "direct", progress=False)  # uninterrupted
    a, b = checkpoint_tensors(out), checkpoint_tensors(tmp_path / "direct")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli_recipe():
    from moequant.recipe import Recipe

    return Recipe.from_cli(Recipe.from_dict({"scheme": {"scale_search": "minmax"}}), group_size=32,
                           calib=[str(CALIB)], num_samples=4, seq_len=32, device="cpu")


def test_killed_export_leaves_a_temporary_that_the_next_run_removes(tiny, tmp_path, caplog):
    out = tmp_path / "out"
    proc = _stall_in_export(tmp_path, _argv(tiny, out))
    proc.kill()  # SIGKILL: no cleanup runs
    proc.communicate(timeout=60)
    (stale,) = tmp_path.glob("out.tmp-*")
    with caplog.at_level(logging.WARNING, logger="moequant"):
        pipeline.quantize(tiny, _cli_recipe(), output_dir=out, progress=False, resume=True)
    assert not stale.exists() and list(tmp_path.glob("out.tmp-*")) == [] and out.is_dir()
    assert any(str(stale) in r.getMessage() and f"pid {proc.pid}" in r.getMessage() for r in caplog.records), \
        caplog.text


def test_stale_temporaries_removed_only_when_their_owner_is_gone(tmp_path, caplog):
    """Next to an output: a temporary directory is removed when its owner process (same host) has ended, also when
    its pid now belongs to another process or the host rebooted; kept when the owner runs, is on another host, or
    is unknown (no or a garbled owner file)."""
    from moequant.io.files import OWNER_FILE

    probe = CheckpointWriter(tmp_path / "probe")  # a real owner record of this process
    me = json.loads((probe.tmp_dir / OWNER_FILE).read_text())
    probe.abort()
    assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    owners = {
        "dead": {**me, "pid": dead_pid, "start_time": None},
        "pid-reused": {**me, "start_time": (me["start_time"] or 0) + 12345},
        "rebooted": {**me, "boot_id": "another-boot"},
        "alive": me,
        "other-host": {**me, "pid": dead_pid, "host": me["host"] + "-elsewhere"},
        "garbled": "{not json",
        "no-owner": None,
    }
    if me.get("start_time") is None:  # no /proc: a reused pid cannot be told apart
        owners.pop("pid-reused")
    if me.get("boot_id") is None:
        owners.pop("rebooted")
    for name, owner in owners.items():
        d = tmp_path / f"out.tmp-{name}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 1000)
        if owner is not None:
            (d / OWNER_FILE).write_text(owner if isinstance(owner, str) else json.dumps(owner))
    with caplog.at_level(logging.INFO, logger="moequant"):
        with CheckpointWriter(tmp_path / "out") as w:
            w.add("t", torch.ones(2))
    left = sorted(p.name[len("out.tmp-"):] for p in tmp_path.glob("out.tmp-*"))
    assert left == sorted({"alive", "other-host", "garbled", "no-owner"} & set(owners))
    removed = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(removed) == len(owners) - len(left) and all("removed" in m for m in removed), removed
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / OWNER_FILE).exists()


# ------------------------------------------------------------------------------------------ (6) ebss output
def test_ebss_refuses_an_existing_out(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    out = tmp_path / "cal.jsonl"
    out.write_text("previous\n")
    monkeypatch.setattr(ebss, "run", lambda *a, **k: pytest.fail("generation started despite the existing --out"))
    assert cli.main(["ebss", str(model), "--out", str(out), "--device", "cpu"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"moequant: error: --out {out} already exists; choose another --out or delete it"]
    assert out.read_text() == "previous\n"
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="already exists"):  # the library refuses too, before loading
        ebss.run(model, out, device="cpu", num_samples=1, seq_len=2)
    assert out.read_text() == "previous\n"


def _result(sequences) -> ebss.EbssResult:
    n = len(sequences)
    return ebss.EbssResult(sequences=sequences, sigma=[0.1] * n, nll=[1.0] * n,
                           config=ebss.EbssConfig(num_samples=n, seq_len=3))


def test_ebss_output_is_all_or_nothing(tmp_path):
    out = tmp_path / "cal.jsonl"
    with pytest.raises(TypeError):  # fails in the middle of the JSONL
        ebss.write_jsonl(_result([[1, 2, 3], [4, object(), 6]]), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(TypeError):  # fails in the sidecar
        ebss.write_jsonl(_result([[1, 2, 3]]), out, extra_meta={"model": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    ebss.write_jsonl(_result([[1, 2, 3]]), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.jsonl", "cal.jsonl.meta.json"]
    with pytest.raises(FileExistsError, match="already exists"):
        ebss.write_jsonl(_result([[7, 8, 9]]), out, overwrite=False)
    assert out.read_text() == '{"input_ids": [1, 2, 3]}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.jsonl", "cal.jsonl.meta.json"]


# ------------------------------------------------------------------------------------------ (7) modes
WRITE_UNDER_UMASKS = """
import os, sys
from pathlib import Path
import torch
from moequant import pipeline
from moequant.calibration import ebss
from moequant.io.writer import CheckpointWriter
from moequant.recipe import CalibrationConfig, QuantScheme, Recipe
from checkpoints import CrashAfterLayer0, crash_observer

root, model, calib = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
r = Recipe(scheme=QuantScheme(group_size=32, scale_search="minmax"),
           calibration=CalibrationConfig(text_files=[calib], num_samples=2, seq_len=32, batch_size=2))
for umask in (0o022, 0o027):
    os.umask(umask)
    d = root / f"{umask:03o}"
    pipeline.quantize(model, r, output_dir=d / "out", progress=False)
    try:
        pipeline.quantize(model, r, output_dir=d / "run", progress=False, observers=crash_observer())
    except CrashAfterLayer0:
        pass
    with CheckpointWriter(d / "sharded", max_shard_bytes=64) as w:
        for i in range(3):
            w.add(f"t{i}", torch.ones(16))
    res = ebss.EbssResult(sequences=[[1, 2, 3]], sigma=[0.1], nll=[1.0], config=ebss.EbssConfig(1, 3))
    ebss.write_jsonl(res, d / "cal.jsonl")
"""


def test_outputs_get_the_modes_of_the_umask(tiny, tmp_path):
    """Checkpoint (shards, index, config, report, recipe), work directory and EBSS files written under umask 022
    and 027: directories 0o777 & ~umask, files 0o666 & ~umask, as mkdir/open make them (tempfile made 0700/0600)."""
    proc = subprocess.run([sys.executable, "-c", WRITE_UNDER_UMASKS, str(tmp_path), str(tiny), str(CALIB)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    for umask in (0o022, 0o027):
        d = tmp_path / f"{umask:03o}"
        trees = [d / "out", d / "run.partial", d / "sharded"]
        assert (d / "sharded" / "model.safetensors.index.json").is_file()
        assert (d / "run.partial" / "manifest.json").is_file() and not (d / "run").exists()
        seen = []
        for tree in trees:
            seen += [tree] + sorted(tree.rglob("*"))
        seen += [d / "cal.jsonl", d / "cal.jsonl.meta.json"]
        for p in seen:
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, f"{p}: {oct(stat.S_IMODE(p.stat().st_mode))}, " \
                                                           f"want {oct(want)} under umask {umask:03o}"
        assert any(p.suffix == ".safetensors" for p in seen) and any(p.name == "moequant_report.json" for p in seen)
