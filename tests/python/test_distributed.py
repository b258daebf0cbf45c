"""Multi-process quantization (moequant.pipeline.distributed, docs/distributed.md) on the CPU with gloo: ranks are
forked processes of one process group (tests/python/dist_worker.py).

- 2 and 3 ranks on tiny models of three families (a dense layer among MoE layers, DeepSeek's MLA and shared expert,
  Qwen2-MoE's gated shared expert) write the checkpoint of one process bit for bit, also with expert groups, the
  ``mean`` fallback of starved experts and the ``shrink`` policy;
- a rank killed mid-run ends every rank with one DistributedError within seconds, a hung one within the process
  group's timeout; the finished layers stay in DIR.partial, DIR is absent, and a resume with another number of ranks
  (or from a one-process run) is bit-identical;
- a run with fewer calibration batches than ranks, and AWQ, are one error on every rank before anything is written;
- ``torchrun --nproc-per-node 2 -m moequant quantize`` (the CLI) writes the same checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoints import checkpoint_tensors
from dist_worker import run_ranks
from family_checkpoints import CALIB_TEXT, NAMES, family_checkpoint

import moequant
from moequant import pipeline
from moequant.pipeline.distributed import BatchSlice, DistContext, units_of
from moequant.pipeline.states import MemoryStates

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CALIBRATION = {"num_samples": 6, "seq_len": 32, "batch_size": 1}


def _recipe(**kw) -> dict:
    return {"calibration": CALIBRATION, **kw}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-models")
    return lambda name: family_checkpoint(name, root)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """The one-process checkpoint of (family, recipe), made once."""
    root, made = tmp_path_factory.mktemp("dist-ref"), {}

    def get(family: str, recipe: dict) -> Path:
        key = (family, json.dumps(recipe, sort_keys=True))
        if key not in made:
            out = root / f"ref{len(made)}"
            pipeline.quantize(str(models(family)), recipe, calibration=str(CALIB_TEXT), output_dir=out, progress=False)
            made[key] = out
        return made[key]
    return get


def _spec(model: Path, out: Path, recipe: dict, **kw) -> dict:
    return {"model": str(model), "out": str(out), "recipe": recipe, "calibration": str(CALIB_TEXT), **kw}


def _same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ from one process's, e.g. {differ[:3]}"
    ra, rb = (json.loads((d / "moequant_report.json").read_text()) for d in (a, b))
    for la, lb in zip(ra["layers"], rb["layers"]):
        assert la["expert_tokens"] == lb["expert_tokens"]
        keys = ("name", "tokens", "loss", "fallback", "error")
        assert [{k: m.get(k) for k in keys} for m in la["modules"]] == \
            [{k: m.get(k) for k in keys} for m in lb["modules"]]


def _ok(results: list) -> None:
    bad = [r for r in results if not r.get("ok")]
    assert not bad, bad


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("family,world", [("qwen3_moe", 2), ("deepseek_v3", 3), ("qwen2_moe", 2),
                                          pytest.param("qwen3_moe", 3, marks=_SLOW),
                                          pytest.param("deepseek_v3", 2, marks=_SLOW),
                                          pytest.param("qwen2_moe", 3, marks=_SLOW)] +
                         [pytest.param(f, 2, marks=_SLOW) for f in NAMES if f not in ("qwen3_moe", "deepseek_v3",
                                                                                       "qwen2_moe")])
def test_ranks_write_the_one_process_checkpoint(models, reference, family, world, tmp_path):
    recipe = _recipe()
    out = tmp_path / "out"
    results = run_ranks(world, _spec(models(family), out, recipe), tmp_path)
    _ok(results)
    _same_checkpoint(reference(family, recipe), out)
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("world,extra", [
    (3, {"experts_per_group": 1, "fallback": {"min_tokens": 100}}),  # units = groups; starved experts: layer mean
    (2, {"fallback": {"min_tokens": 100}}),  # one group cut into one unit per rank; the mean across units
    (3, {"fallback": {"policy": "shrink"}}),  # all-token and pooled targets
    (2, {"host_memory_gb": 0}),  # rank 0's hidden states in the disk-backed store
])
def test_groups_and_fallbacks(models, reference, world, extra, tmp_path):
    recipe = _recipe(**extra)
    out = tmp_path / "out"
    results = run_ranks(world, _spec(models("mixtral"), out, recipe), tmp_path)
    _ok(results)
    if extra.get("fallback", {}).get("min_tokens"):
        assert results[0]["fallbacks"] > 0  # the case is exercised
    _same_checkpoint(reference("mixtral", recipe), out)


def _partial_layers(out: Path) -> int:
    progress = out.with_name(out.name + ".partial") / "progress.json"
    return json.loads(progress.read_text())["completed_layers"] if progress.is_file() else 0


@pytest.mark.parametrize("dead", [1, 0])
def test_killed_rank_ends_every_rank_and_resume_with_two(models, reference, dead, tmp_path):
    recipe = _recipe()
    out = tmp_path / "out"
    t0 = time.time()
    results = run_ranks(3, _spec(models("deepseek_v3"), out, recipe, die_rank=dead, die_at_layer=1, timeout_s=120),
                        tmp_path)
    took = time.time() - t0
    assert results[dead].get("exitcode") == -9, results[dead]
    for r in results:
        if r["rank"] != dead:
            assert r.get("type") == "DistributedError", r
            assert "lost the other ranks" in r["error"] and "--resume" in r["error"], r
            if dead != 0:
                assert "layer 1" in r["error"] and str(out) + ".partial" in r["error"], r
    assert took < 60, f"the surviving ranks took {took:.0f} s to stop (process group timeout 120 s)"
    assert not out.exists()  # nothing partial left as if complete
    # rank 0 commits layer 0 on a background thread while layer 1 starts: killed, it may not have finished
    done = _partial_layers(out)
    assert done == 1 or (dead == 0 and done == 0)
    resumed = run_ranks(2, _spec(models("deepseek_v3"), out, recipe, resume=True), tmp_path)
    _ok(resumed)
    assert resumed[0]["resumed_from_layer"] == (done or None)
    _same_checkpoint(reference("deepseek_v3", recipe), out)


def test_without_output_dir(models, tmp_path):
    """No checkpoint: rank 0 works in a temporary directory; every rank returns rank 0's report."""
    spec = _spec(models("qwen3_moe"), tmp_path / "unused", _recipe())
    spec["out"] = None
    results = run_ranks(2, spec, tmp_path)
    _ok(results)
    assert [r["layers"] for r in results] == [3, 3]
    assert not (tmp_path / "unused").exists()


def test_hung_rank_times_out(models, tmp_path):
    out = tmp_path / "out"
    # 10 s: long enough for a loaded CI machine's healthy collectives, short for the test
    results = run_ranks(2, _spec(models("qwen3_moe"), out, _recipe(), die_rank=1, hang_at_layer=1, timeout_s=10),
                        tmp_path, wait_s=90, straggle_s=5)
    assert results[1].get("hung"), results[1]
    assert results[0].get("type") == "DistributedError", results[0]
    assert "(timeout 10 s)" in results[0]["error"] and "layer 1" in results[0]["error"], results[0]
    assert results[0]["seconds"] < 60, results[0]
    assert not out.exists() and _partial_layers(out) == 1


class _Stop(pipeline.LayerObserver):
    def layer_inputs(self, index, prefix, hidden, kwargs):
        if index == 1:
            raise KeyboardInterrupt


def test_one_process_run_resumes_on_two_ranks(models, reference, tmp_path):
    recipe = _recipe()
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(str(models("qwen2_moe")), recipe, calibration=str(CALIB_TEXT), output_dir=out,
                          progress=False, observers=[_Stop()])
    assert _partial_layers(out) == 1
    resumed = run_ranks(2, _spec(models("qwen2_moe"), out, recipe, resume=True), tmp_path)
    _ok(resumed)
    _same_checkpoint(reference("qwen2_moe", recipe), out)


@pytest.mark.parametrize("recipe,needle", [
    (_recipe(calibration={"num_samples": 2, "seq_len": 32, "batch_size": 1}), "calibration.batch_size: 2 calibration"),
    (_recipe(awq={"enabled": True}), "awq.enabled: expected false in a distributed run"),
    (_recipe(budget={"bits": 4.5}), "budget.enabled: expected false in a distributed run"),
    (_recipe(kv_cache="fp8"), "kv_cache: expected null in a distributed run"),
    (_recipe(gptaq={"enabled": True}), "gptaq.enabled: expected false in a distributed run"),
    (_recipe(ignore=["model.layers.*.no_such_module"]), "no_such_module"),  # rank 0's preflight, on every rank
])
def test_refused_before_anything_is_written(models, recipe, needle, tmp_path):
    out = tmp_path / "out"
    results = run_ranks(3, _spec(models("qwen3_moe"), out, recipe), tmp_path)
    for r in results:
        assert r.get("type") == "ValueError" and needle in r["error"], r
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_lost_rank_error_is_one_cli_line():
    from moequant.pipeline.distributed import DistributedError

    e = DistributedError("rank 1 of 2: lost the other ranks")
    assert isinstance(e, OSError) and str(e) == "rank 1 of 2: lost the other ranks"  # the CLI's one line, exit 2


def test_torchrun_cli(models, reference, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"calibration": {"batch_size": 2}}))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(moequant.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "moequant", "-q",
           "quantize", str(models("qwen3_moe")), "--out", str(out), "--recipe", str(recipe), "--calib",
           str(CALIB_TEXT), "--num-samples", "6", "--seq-len", "32", "--device", "cpu"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("moequant: qwen3_moe model") == 1  # rank 0 prints the summary
    _same_checkpoint(reference("qwen3_moe", {"calibration": {"num_samples": 6, "seq_len": 32, "batch_size": 2}}),
                     out)


# ------------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize("batches,world", [(3, 3), (7, 2), (7, 3), (128, 8)])
def test_batch_ranges_cover_every_batch_in_order(batches, world):
    ranges = [DistContext(r, world, torch.device("cpu")).batch_range(batches) for r in range(world)]
    assert [b for r in ranges for b in r] == list(range(batches))
    assert all(len(r) >= 1 for r in ranges)
    assert ranges == DistContext(0, world, torch.device("cpu")).all_batch_ranges(batches)


def test_too_few_batches_message():
    with pytest.raises(ValueError, match="every rank needs at least one batch"):
        DistContext(0, 4, torch.device("cpu")).check_batches(3, 8)


def test_units():
    groups = [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert units_of(groups, False, 7, 2) == groups  # several groups: the groups
    assert units_of([slice(0, 7)], True, 7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert units_of([slice(0, 2)], True, 2, 3) == [slice(0, 1), slice(1, 2)]  # fewer experts than ranks
    assert [DistContext(0, 3, torch.device("cpu")).owner(u) for u in range(5)] == [0, 1, 2, 0, 1]


def test_batch_slice():
    full = MemoryStates([torch.full((1, 2, 3), float(b)) for b in range(5)])
    s = BatchSlice(full, range(2, 4))
    assert len(s) == 2 and s.shapes == [(1, 2, 3)] * 2 and s.dtype == torch.float32
    assert float(s[0][0, 0, 0]) == 2 and float(s[-1][0, 0, 0]) == 3 and len(s[0:2]) == 2
    with pytest.raises(IndexError):
        s[2]
    s.close()
    assert len(full.tensors) == 5  # a slice closes nothing


# ------------------------------------------------------------------------------------------ GPU (the coordinator)
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_gpu_two_ranks_on_one_gpu_with_gloo(models, family, tmp_path):
    """Both ranks compute on cuda:0 (bf16 layers, CUDA Hessians, batched GPTQ on each rank's unit of experts) and
    exchange through gloo: the checkpoint of one process on that GPU, bit for bit (docs/distributed.md,
    "Bit-identity" (a): the batched solver's batches are the ranks' units)."""
    recipe = _recipe(device="cuda")
    ref = tmp_path / "ref"
    pipeline.quantize(str(models(family)), recipe, calibration=str(CALIB_TEXT), output_dir=ref, progress=False)
    out = tmp_path / "out"
    _ok(run_ranks(2, _spec(models(family), out, recipe), tmp_path, start="spawn"))
    _same_checkpoint(ref, out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_gpu_nccl_two_gpus(models, family, tmp_path):
    recipe = _recipe(device="cuda")
    ref = tmp_path / "ref"
    pipeline.quantize(str(models(family)), recipe, calibration=str(CALIB_TEXT), output_dir=ref, progress=False)
    out = tmp_path / "out"
    _ok(run_ranks(2, _spec(models(family), out, recipe, backend="nccl", gpu_per_rank=True), tmp_path,
                  start="spawn"))
    _same_checkpoint(ref, out)

