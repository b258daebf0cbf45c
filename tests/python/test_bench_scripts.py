"""The benchmark scripts' own logic that a CPU can check: quality.py's row names (integer and preset rows),
bench_e2e.py's smoke run with the layer profiler and with ``--out``, and scripts/host_memory_cgroup.py's smoke run
(the GPU numbers themselves are in docs/benchmarks.md)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _bench(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quality():
    return _bench("quality")


def test_quality_rows_parse_integer_and_preset_names():
    q = _quality()
    scheme, recipe, feats = q.parse_config("gptq+ao-nvfp4a16")
    assert scheme == {"preset": "NVFP4A16", "method": "gptq", "act_order": True, "damp": 0.01} and feats == {"ao"}
    assert q.parse_config("default-MXFP4A16")[0] == {"preset": "MXFP4A16"}
    scheme, _, _ = q.parse_config("rtn-w3-g-1")
    assert (scheme["bits"], scheme["group_size"], scheme["method"]) == (3, -1, "rtn")
    assert q.parse_config("rtn-fp8_block")[0]["preset"] == "FP8_BLOCK"
    assert q.parse_config("gptq-nvfp4")[0]["preset"] == "NVFP4"
    for bad, needle in (("gptq-nvfp5", "expected <method>"), ("foo-nvfp4a16", "method must be one of"),
                        ("gptq+b3.0-nvfp4a16", "unknown feature")):
        with pytest.raises(ValueError, match=needle):
            q.parse_config(bad)
    for f in ("quality_rows.txt", "quality_rows_budget.txt", "quality_rows_formats.txt",
              "quality_rows_formats_act.txt", "quality_rows_gptaq.txt", "quality_rows_w4.txt"):
        for line in (REPO / "benchmarks" / f).read_text().splitlines():
            if line.strip() and not line.startswith("#") and line.strip() != "bf16":
                q.parse_config(line.strip())


def test_quality_gptaq_rows_build_valid_recipes(tmp_path):
    import types

    q = _quality()
    args = types.SimpleNamespace(group_size=128, num_samples=8, seq_len=64, device="cpu", ebss_jsonl=None)
    rows = [r.strip() for r in (REPO / "benchmarks" / "quality_rows_gptaq.txt").read_text().splitlines()]
    recipes = {r: q.build_recipe(r, args, tmp_path, tmp_path) for r in rows if r and r != "bf16"}
    assert recipes["default+gptaq05+gptaqe-w3"].gptaq.to_dict() == {"enabled": True, "alpha": 0.5,
                                                                     "modules": ["routed"]}
    assert not recipes["default-w3"].gptaq.enabled and recipes["default+gptaq0-w4"].gptaq.alpha == 0.0


def test_quality_bits_of_a_preset_row(tmp_path):
    import types

    q = _quality()
    args = types.SimpleNamespace(group_size=128, num_samples=8, seq_len=64, device="cpu", ebss_jsonl=None)
    nv = q.build_recipe("gptq-nvfp4a16", args, tmp_path, tmp_path)
    assert nv.scheme.describe().startswith("NVFP4A16")
    from testdata import tiny_qwen3_checkpoint

    model = tiny_qwen3_checkpoint(tmp_path / "m")
    assert q.average_bits(str(model), nv.scheme) == pytest.approx(4.5, abs=0.01)  # FP4 + an FP8 scale per 16
    # W4 g32 symmetric: 4 + 16 / 32, plus the int32 weight_shape of each (small) matrix
    assert q.average_bits(str(model), {"bits": 4, "group_size": 32, "symmetric": True}) == pytest.approx(4.5, abs=0.05)


def test_quality_activation_preset_row_is_evaluated_as_deployed(tmp_path):
    """A preset that quantizes activations (FP8 W8A8) is exported compressed and evaluated with the runtime's
    activation quantization simulated: its perplexity differs from the same checkpoint's weights alone."""
    import types

    from moequant import pipeline

    q = _quality()
    args = types.SimpleNamespace(group_size=128, num_samples=4, seq_len=32, device="cpu", ebss_jsonl=None)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    recipe = q.build_recipe("rtn-fp8", args, tmp_path, tmp_path)
    assert recipe.scheme.activations is not None and "FP8" in q.ACTIVATION_PRESETS
    from testdata import tiny_qwen3_checkpoint

    model = tiny_qwen3_checkpoint(tmp_path / "m")
    out = tmp_path / "q"
    pipeline.quantize(str(model), recipe, output_dir=out, progress=False)
    ids = torch.randint(0, 90, (129,), generator=torch.Generator().manual_seed(0))
    sim = q.evaluate(str(out), ids, ids, "cpu", 32, simulate=True)
    plain = q.evaluate(str(out), ids, ids, "cpu", 32, simulate=False)
    assert sim["heldout"] > 0 and sim["heldout"] != plain["heldout"]


def test_bench_e2e_smoke_with_the_layer_profiler(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "prof.txt"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_e2e.py"), "--model", "smoke", "--layers", "2",
                        "--device", "cpu", "--samples", "4", "--seq-len", "32", "--work", str(tmp_path / "w"),
                        "--out", str(tmp_path / "o"), "--keep", "--profile-layer", "1", "--profile-out", str(out),
                        "--profile-trace", str(tmp_path / "t.json.gz")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert text.startswith("profile of layer 1:") and "moequant.expert_solve" in text and "moequant.pass3_forward" in text
    assert "steady state" in r.stdout
    # the timeline: gzip Chrome trace whose phase markers trace_phases.py reads
    r2 = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trace_phases.py"), str(tmp_path / "t.json.gz")],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "== expert_solve:" in r2.stdout and "pass3_forward" in r2.stdout
    # --out: the checkpoint went there (and was removed after the run), not under --work, which keeps the model
    assert (tmp_path / "o").is_dir() and not any((tmp_path / "o").iterdir())
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["ids.pt", "smoke-2l"]


def test_trace_phases_counts_gpu_busy_time_and_idle_share_per_phase(tmp_path, capsys):
    """A phase of 1000 us with kernels at [100, 300) and [200, 500) (overlapping: 400 us busy) and one outside it:
    60 % idle; nested torch ops count once, under the outermost."""
    import gzip
    import json
    ev = [{"ph": "X", "cat": "user_annotation", "name": "moequant.expert_solve", "ts": 0, "dur": 1000, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "kernel", "name": "k1", "ts": 100, "dur": 200, "pid": 0, "tid": 7},
          {"ph": "X", "cat": "kernel", "name": "k2", "ts": 200, "dur": 300, "pid": 0, "tid": 8},
          {"ph": "X", "cat": "kernel", "name": "k3", "ts": 1500, "dur": 100, "pid": 0, "tid": 7},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 50, "dur": 5, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 600, "dur": 300, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "cpu_op", "name": "aten::nonzero", "ts": 550, "dur": 400, "pid": 1, "tid": 1},
          {"ph": "X", "cat": "cpu_op", "name": "aten::copy_", "ts": 560, "dur": 350, "pid": 1, "tid": 1}]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    assert _bench("trace_phases").main([str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("expert_solve "))
    assert row.split()[2:6] == ["1.0", "0.4", "60", "1"]  # wall ms, GPU ms, idle %, launches
    assert "host       0.30 ms x1     cudaStreamSynchronize" in out
    assert "aten::nonzero" in out and "aten::copy_" not in out
    (tmp_path / "bad.json").write_text("not json")
    assert _bench("trace_phases").main([str(tmp_path / "bad.json")]) == 2
    assert _bench("trace_phases").main([str(tmp_path / "missing.json.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("trace_phases: error: ") for line in err)


def test_host_memory_cgroup_smoke_builds_and_runs_both_modes(tmp_path):
    """The GPU machine's cgroup run, without a limit (``--via none``: exit 3, 'measured only') on the smoke model on
    the CPU: it builds the model (it once called bench_e2e.build_model without its device and failed there) and runs
    both placements of the hidden states."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "host_memory_cgroup.py"), "--model", "smoke",
                        "--layers", "2", "--samples", "4", "--seq-len", "32", "--device", "cpu", "--via", "none",
                        "--modes", "auto,disk", "--work", str(tmp_path / "w")], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-2000:]
    assert "built smoke x 2 layers" in r.stdout
    assert "[auto] rc 0" in r.stdout and "hidden states in memory" in r.stdout
    assert "[disk] rc 0" in r.stdout and "hidden states on disk" in r.stdout


def test_quality_table_resumes_from_a_stopped_run(tmp_path, capsys):
    """A run stopped part way leaves its merged file and its workers' per-row files; --resume keeps every row of
    the same model and protocol (another protocol's file is not used) and runs none of them again."""
    import json

    qt = _bench("quality_table")
    row = {"heldout": 12.5, "wt2": 290.0, "quantize_seconds": 1.0, "total_seconds": 2.0, "fallbacks": 0}
    meta = {"device": "cuda", "device_name": "H100", "model": "M", "torch": "x", "num_samples": 128, "seq_len": 512}
    (tmp_path / "quality.json").write_text(json.dumps({**meta, "rows": {"rtn-w4": row}, "workers": 4}))
    (tmp_path / "quality_0.json").write_text(json.dumps({**meta, "rows": {"gptq-w4": row}}))
    (tmp_path / "quality_1.json").write_text(json.dumps({**meta, "seq_len": 256, "rows": {"default-w4": row}}))
    rc = qt.main(["--out", str(tmp_path), "--configs", "gptq-w4,rtn-w4", "--model", "M", "--resume",
                  "--baseline", str(tmp_path / "none.json")])
    assert rc == 0
    merged = json.loads((tmp_path / "quality.json").read_text())
    assert list(merged["rows"]) == ["gptq-w4", "rtn-w4"] and merged["device_name"] == "H100"
    assert not list(tmp_path.glob("quality_*.json"))  # merged into quality.json: nothing left to lose
    out = capsys.readouterr().out
    assert "resuming: 2 of 2 rows" in out and "quality_1.json is of another model or protocol" in out
    assert "| gptq-w4 | 12.500 | 290.00 |" in (tmp_path / "quality.md").read_text()



def test_quality_json_merges_row_by_row(tmp_path):
    """quality.py writes its JSON after every row: rows of the same model merge, another model's are dropped."""
    import argparse
    import json

    q = _quality()
    args = argparse.Namespace(device="cpu", model="M", num_samples=128, seq_len=512, group_size=128)
    p = tmp_path / "q.json"
    q.write_json(p, args, {"rtn-w4": {"heldout": 1.0}})
    q.write_json(p, args, {"gptq-w4": {"heldout": 2.0}})
    d = json.loads(p.read_text())
    assert d["rows"] == {"rtn-w4": {"heldout": 1.0}, "gptq-w4": {"heldout": 2.0}} and d["device_name"] == "cpu"
    q.write_json(p, argparse.Namespace(**{**vars(args), "model": "N"}), {"bf16": {"heldout": 3.0}})
    assert json.loads(p.read_text())["rows"] == {"bf16": {"heldout": 3.0}}
    assert [f.name for f in tmp_path.iterdir()] == ["q.json"]  # no temporary file left


def test_quality_table_shares_the_cores_among_cpu_workers(monkeypatch):
    qt = _bench("quality_table")
    monkeypatch.setattr(qt.os, "cpu_count", lambda: 16)
    assert qt.worker_env("cpu", 4, {})["OMP_NUM_THREADS"] == "4"
    assert qt.worker_env("cpu", 32, {})["OMP_NUM_THREADS"] == "1"
    assert qt.worker_env("cpu", 4, {"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"  # the user's value
    assert "OMP_NUM_THREADS" not in qt.worker_env("cuda", 4, {})  # GPU workers keep torch's default


def test_shell_scripts_parse():
    """Every shell script of the repository parses (``bash -n``): the GPU-machine ones only run where CI is not."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    scripts = sorted(root.glob("scripts/*.sh")) + sorted(root.glob("benchmarks/*.sh")) + sorted(root.glob(".ci/*"))
    assert any(p.name == "gpu_steps.sh" for p in scripts)
    for p in scripts:
        if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash"):
            r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
            assert r.returncode == 0, f"{p}: {r.stderr}"
