"""Host memory (issue 13): the calibration hidden states beyond ``host_memory_gb`` live in a disk-backed store in the
work directory; the run's anonymous memory is one layer plus the hidden states plus a fixed margin; a layer's
per-expert checkpoint tensors are read straight into their fused parameters.

- the disk-backed store gives the in-memory path's checkpoint bit for bit (MoE and dense layers, uneven batches,
  expert groups), resumes after a SIGKILL in the middle of writing a layer's outputs, and after an interruption
  with another ``host_memory_gb`` (either way);
- no room for the store: one error before the first layer (the preflight, as for the checkpoint); a full disk
  when a layer's store is created: the run's one-line write error, the finished layers kept;
- the states file (:mod:`moequant.pipeline.states`), the host budget (:mod:`moequant.pipeline.hostmem`: cgroup v1 /
  v2 limits), the recipe field and the CLI flag;
- peak anonymous memory of whole runs in a subprocess (``host_memory_probe.py``) against the bound, and not
  growing with the number of layers; the growth of resident memory while a layer loads is the layer itself.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import CrashAfterLayer0, checkpoint_tensors, crash_observer
from family_checkpoints import CALIB_TEXT, TOKENIZER, family_checkpoint

import moequant
from moequant import cli, pipeline
from moequant.pipeline import LayerObserver
from moequant.pipeline.hostmem import GIB, available_host_memory, plan_states
from moequant.pipeline.states import DiskStates, MemoryStates, StatesSink, open_states
from moequant.recipe import Recipe

HERE = Path(__file__).resolve().parent
PYTHON_DIR = str(Path(moequant.__file__).resolve().parents[1])
IDS = torch.randint(100, 8000, (5, 32), generator=torch.Generator().manual_seed(3))  # batches of 2, 2, 1


def _recipe(**kw) -> Recipe:  # GPTQ (its results depend on the layer inputs), minmax scales (fast)
    return Recipe.from_dict({"scheme": {"scale_search": "minmax"},
                             "calibration": {"num_samples": 5, "seq_len": 32, "batch_size": 2}, **kw})


def _quantize(model, out, recipe, **kw):
    return pipeline.quantize(str(model), recipe, calibration=kw.pop("calibration", IDS), output_dir=out,
                             progress=False, **kw)


def _same(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([PYTHON_DIR, str(HERE), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """Qwen3-MoE: layers MoE, dense, MoE (4 experts)."""
    return family_checkpoint("qwen3_moe", tmp_path_factory.mktemp("hostmem-model"))


@pytest.fixture(scope="module")
def in_memory(model, tmp_path_factory) -> Path:
    """The checkpoint of an uninterrupted run with the hidden states in memory."""
    out = tmp_path_factory.mktemp("in-memory") / "out"
    report = _quantize(model, out, _recipe())
    assert report.hidden_states["on_disk"] is False and report.hidden_states["automatic"] is True
    return out


class _Kinds(LayerObserver):
    def __init__(self):
        self.kinds = []

    def layer_inputs(self, index, prefix, hidden, kwargs):
        self.kinds.append(type(hidden).__name__)


# ------------------------------------------------------------------------------------------ the disk-backed store
def test_disk_store_is_bit_identical_to_memory(model, in_memory, tmp_path):
    seen = _Kinds()
    report = _quantize(model, tmp_path / "disk", _recipe(host_memory_gb=0), observers=[seen])
    assert report.hidden_states == {**report.hidden_states, "on_disk": True, "automatic": False, "budget": 0}
    assert seen.kinds == ["DiskStates"] * 3
    _same(in_memory, tmp_path / "disk")
    saved = json.loads((tmp_path / "disk" / "moequant_report.json").read_text())
    assert saved["hidden_states"]["on_disk"] is True
    # a budget between one and two copies of the states is still too small: two copies live at once
    one = report.hidden_states["bytes"]
    r = _quantize(model, tmp_path / "between", _recipe(host_memory_gb=1.5 * one / GIB))
    assert r.hidden_states["on_disk"] is True
    r = _quantize(model, tmp_path / "enough", _recipe(host_memory_gb=2.01 * one / GIB), observers=[seen])
    assert r.hidden_states["on_disk"] is False and seen.kinds[-3:] == ["MemoryStates"] * 3
    _same(in_memory, tmp_path / "enough")


def test_disk_store_with_expert_groups(model, tmp_path):
    a = _quantize(model, tmp_path / "mem", _recipe(experts_per_group=1))
    b = _quantize(model, tmp_path / "disk", _recipe(experts_per_group=1, host_memory_gb=0))
    assert not a.hidden_states["on_disk"] and b.hidden_states["on_disk"]
    _same(tmp_path / "mem", tmp_path / "disk")


KILLER = r"""
import json, os, signal, sys, time
from pathlib import Path
import torch
from moequant import pipeline
from moequant.pipeline import states
from moequant.recipe import Recipe

model, out = sys.argv[1], Path(sys.argv[2])
progress = out.with_name(out.name + ".partial") / "progress.json"
sinks = {"n": 0}
original_init, original_append = states.StatesSink.__init__, states.StatesSink.append

def init(self, *a, **kw):
    original_init(self, *a, **kw)
    self.number = sinks["n"]  # 0: layer 0's inputs, 1: its outputs, 2: layer 1's outputs
    sinks["n"] += 1

def append(self, t):
    original_append(self, t)
    if self.number == 2:  # one batch of layer 1's outputs is on disk: wait for layer 0's commit, then die
        for _ in range(600):
            if progress.exists() and json.loads(progress.read_text())["completed_layers"] >= 1:
                break
            time.sleep(0.1)
        print("killing", self.path.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

states.StatesSink.__init__, states.StatesSink.append = init, append
recipe = Recipe.from_dict(json.loads(sys.argv[3]))
pipeline.quantize(model, recipe, calibration=torch.load(sys.argv[4]), output_dir=out, progress=False)
"""


def test_sigkill_while_a_layer_writes_its_outputs_resumes_bit_identically(model, in_memory, tmp_path):
    """A real kill (SIGKILL: no handler runs) while layer 1 writes its outputs into the store: the work directory
    keeps layer 0 and an orphan of layer 1's outputs; the resume removes it and gives the in-memory checkpoint."""
    out, ids = tmp_path / "out", tmp_path / "ids.pt"
    torch.save(IDS, ids)
    recipe = _recipe(host_memory_gb=0)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(model), str(out), json.dumps(recipe.to_dict()),
                           str(ids)], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = tmp_path / "out.partial"
    orphans = [p.name for p in partial.glob("states.tmp-*")]
    assert len(orphans) == 1 and f"killing {orphans[0]}" in proc.stdout, (orphans, proc.stdout)
    assert json.loads((partial / "progress.json").read_text())["completed_layers"] == 1

    class NoOrphan(LayerObserver):  # the resume removed the killed layer's unfinished store
        def layer_inputs(self, index, prefix, hidden, kwargs):
            if index == 1:  # (later, the previous layer's outputs are a states.tmp-* until their commit)
                assert list(partial.glob("*.tmp-*")) == []

    report = _quantize(model, out, recipe, resume=True, observers=[NoOrphan()])
    assert report.resumed_from_layer == 1 and not partial.exists()
    _same(in_memory, out)


@pytest.mark.parametrize("first, then", [(None, 0), (0, None)])
def test_resume_with_another_host_memory_gb(model, in_memory, tmp_path, first, then):
    """host_memory_gb is not part of the run's fingerprint: the activations file is the same either way."""
    out = tmp_path / "out"
    with pytest.raises(CrashAfterLayer0):
        _quantize(model, out, _recipe(host_memory_gb=first), observers=crash_observer())
    assert [p.name for p in (tmp_path / "out.partial").glob("activations_*")] == ["activations_00000.safetensors"]
    seen = _Kinds()
    report = _quantize(model, out, _recipe(host_memory_gb=then), resume=True, observers=[seen])
    assert report.resumed_from_layer == 1
    assert seen.kinds == ["DiskStates" if then == 0 else "MemoryStates"] * 2
    _same(in_memory, out)


def test_resume_with_activations_of_another_dtype_is_one_clear_error(model, tmp_path):
    """A run's activations are in its compute dtype (float32 on the CPU, bf16 on a GPU): resuming on the other
    device cannot be bit-identical and is refused with the remedy."""
    out = tmp_path / "out"
    with pytest.raises(CrashAfterLayer0):
        _quantize(model, out, _recipe(), observers=crash_observer())
    act = tmp_path / "out.partial" / "activations_00000.safetensors"
    states = open_states(act, True)
    MemoryStates([t.to(torch.bfloat16) for t in states]).persist(act)  # as a GPU run would have written them
    with pytest.raises(ValueError, match=r"activations are torch.bfloat16 but this run computes in torch.float32 "
                                         r"on cpu; resume on the device the run started on .* delete "):
        _quantize(model, out, _recipe(), resume=True)


# ------------------------------------------------------------------------------------------ no room
def test_no_room_for_the_store_is_one_error_before_the_first_layer(model, tmp_path, monkeypatch, capsys):
    from moequant.pipeline import output

    monkeypatch.setattr(output, "_free_bytes", lambda p: 1000)
    out = tmp_path / "q"
    with pytest.raises(OSError) as info:
        _quantize(model, out, _recipe(host_memory_gb=0))
    msg = str(info.value)
    assert msg.startswith("not enough free space for ") and "\n" not in msg, msg
    assert "the calibration hidden states' disk-backed store: they exceed the host budget of 0.00 GB " \
           "(host_memory_gb)" in msg, msg
    assert not out.exists() and not (tmp_path / "q.partial").exists()
    with pytest.raises(OSError) as info:  # in memory: the message does not blame the store
        _quantize(model, out, _recipe())
    assert "disk-backed store" not in str(info.value)
    capsys.readouterr()
    rc = cli.main(["-q", "quantize", str(model), "--out", str(out), "--calib", str(CALIB_TEXT), "--num-samples",
                   "4", "--seq-len", "32", "--host-memory-gb", "0"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("moequant: error: not enough free space"), err
    assert "disk-backed store" in err[0] and not (tmp_path / "q.partial").exists()


def test_disk_full_when_a_layer_creates_its_store(model, in_memory, tmp_path, monkeypatch):
    """posix_fallocate reserves a layer's outputs before the layer computes: ENOSPC there is the run's one-line
    write error, layer 0 stays committed, and the resume (with room again) is bit-identical."""
    calls = {"n": 0}
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        calls["n"] += 1
        if calls["n"] == 3:  # the inputs of layer 0, its outputs, then layer 1's outputs
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        _quantize(model, out, _recipe(host_memory_gb=0))
    msg = str(info.value)
    assert msg.startswith("no space left on device writing ") and "continue with --resume" in msg, msg
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "progress.json").read_text())["completed_layers"] == 1
    assert list(partial.glob("states.tmp-*")) == []  # the failed store is not left behind
    monkeypatch.setattr(os, "posix_fallocate", real)
    assert _quantize(model, out, _recipe(host_memory_gb=0), resume=True).resumed_from_layer == 1
    _same(in_memory, out)


# ------------------------------------------------------------------------------------------ the states file
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_file_round_trip(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 7, 5, generator=g).to(dtype) for n in (3, 3, 1)]
    old = os.umask(0o027)
    try:
        MemoryStates(batches).persist(tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o640
    for in_memory in (True, False):
        s = open_states(tmp_path / "a.safetensors", in_memory)
        assert isinstance(s, MemoryStates if in_memory else DiskStates)
        assert s.shapes == [(3, 7, 5), (3, 7, 5), (1, 7, 5)] and s.dtype == dtype and len(s) == 3
        assert all(torch.equal(x, y) for x, y in zip(s, batches)) and torch.equal(s[-1], batches[-1])
        s.close()
    from safetensors.torch import load_file  # a plain safetensors file

    assert torch.equal(load_file(str(tmp_path / "a.safetensors"))["batch_00001"], batches[1])
    # a sink: checked shapes, all batches, renamed into place; an unfinished one is removed
    sink = StatesSink([(3, 7, 5), (1, 7, 5)], dtype, tmp_path)
    with pytest.raises(RuntimeError, match=r"batch 0 is .* \[3, 7, 4\], expected .* \[3, 7, 5\]"):
        sink.append(torch.zeros(3, 7, 4, dtype=dtype))
    sink.append(batches[0])
    with pytest.raises(RuntimeError, match="1 of 2 batches written"):
        sink.finish()
    sink.abort()
    assert list(tmp_path.glob("states.tmp-*")) == []
    sink = StatesSink([(3, 7, 5)], dtype, tmp_path)
    sink.append(batches[0])
    done = sink.finish()
    done.persist(tmp_path / "b.safetensors")
    assert list(tmp_path.glob("states.tmp-*")) == [] and torch.equal(done[0], batches[0])
    done.close()
    assert torch.equal(open_states(tmp_path / "b.safetensors", True)[0], batches[0])
    unfinished = StatesSink([(1, 7, 5)], dtype, tmp_path)
    unfinished.append(batches[2])
    unfinished.finish().close()  # never persisted: closing removes it
    assert list(tmp_path.glob("states.tmp-*")) == []


def test_damaged_states_file_is_one_clear_error(tmp_path):
    MemoryStates([torch.ones(2, 3, 4)]).persist(tmp_path / "a.safetensors")
    p = tmp_path / "a.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated"):
        open_states(p, False)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2, 3, 4)}, str(p))
    with pytest.raises(ValueError, match="not a hidden-states file"):
        open_states(p, True)


# ------------------------------------------------------------------------------------------ the host budget
def _tree(root: Path, files: dict) -> None:
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


def test_available_host_memory_reads_meminfo_and_cgroups(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    meminfo = "MemTotal:  9000000 kB\nMemAvailable:  8000000 kB\n"
    # cgroup v2: no limit in the process's own scope, 3 GiB on its parent; page cache counts as free
    _tree(proc, {"meminfo": meminfo, "self/cgroup": "0::/a.slice/run.scope\n"})
    _tree(cg, {"a.slice/run.scope/memory.max": "max\n", "a.slice/memory.max": str(3 * GIB) + "\n",
               "a.slice/memory.current": str(GIB) + "\n", "a.slice/memory.stat": "anon 1\nfile 536870912\n"})
    assert available_host_memory(proc, cg) == 3 * GIB - GIB + GIB // 2
    (cg / "a.slice/memory.max").write_text("max\n")
    assert available_host_memory(proc, cg) == 8000000 * 1024  # no limit anywhere: MemAvailable
    # cgroup v1: memory.limit_in_bytes; the "unlimited" value is ignored
    proc1, cg1 = tmp_path / "proc1", tmp_path / "cg1"
    _tree(proc1, {"meminfo": "MemAvailable: 9000000 kB\n", "self/cgroup": "4:cpu:/x\n3:memory:/docker/abc\n"})
    _tree(cg1, {"memory/docker/abc/memory.limit_in_bytes": str(2 * GIB), "memory/docker/abc/memory.usage_in_bytes":
                str(GIB), "memory/docker/abc/memory.stat": "cache 0\ntotal_cache 1073741824\n",
                "memory/memory.limit_in_bytes": str(2**63 - 4096)})
    assert available_host_memory(proc1, cg1) == 2 * GIB
    assert available_host_memory(tmp_path / "none", tmp_path / "none") is None


def test_plan_states():
    one = 3 * GIB
    assert plan_states(one, None, 10 * GIB, 30 * GIB) == plan_states(one, None, 10 * GIB, 30 * GIB)
    p = plan_states(one, None, 10 * GIB, 30 * GIB)  # 30 - 10 = 20 GiB >= 2 x 3
    assert not p.on_disk and p.automatic and p.budget == 20 * GIB
    assert not plan_states(one, None, 24 * GIB, 30 * GIB).on_disk  # 6 GiB: just fits
    assert plan_states(one, None, 25 * GIB, 30 * GIB).on_disk  # 5 GiB < 6
    assert plan_states(one, None, 40 * GIB, 30 * GIB).budget == 0  # a layer larger than what is available
    assert not plan_states(one, None, 0, None).on_disk  # nothing known: in memory, as before
    assert plan_states(one, 0, 0, None).on_disk and plan_states(one, 0.0, 0, 10**15).on_disk
    assert not plan_states(one, 6, 0, 0).on_disk and plan_states(one, 5.99, 0, 10**15).on_disk
    assert "on disk, in the work directory (2 x 3.22 GB; host budget 0.00 GB, host_memory_gb)" in \
        plan_states(one, 0, 0, None).describe()


def test_layer_host_bytes_counts_the_read_ahead_layer_rounded_when_pinned():
    from moequant.pipeline.hostmem import layer_host_bytes

    mib = 2**20
    qwen = [768 * mib, 384 * mib, 16 * mib, 3 * mib]  # fused gate/up and down, q, a tensor of no power of two
    assert layer_host_bytes(qwen, pinned=False) == 2 * 1171 * mib + GIB
    # page-locked: 1024 + 512 + 16 + 4 MiB read ahead, the layer's results, the margin
    assert layer_host_bytes(qwen, pinned=True) == (1024 + 512 + 16 + 4) * mib + 1171 * mib + GIB
    assert layer_host_bytes([0, 1, 2, 3], pinned=True, margin=0) == (0 + 1 + 2 + 4) + 6
    # Qwen3-30B-A3B's two copies of 1.07 GB: on disk with 5.5 GiB left, in memory with 5.75 GiB (what a cgroup limit
    # of one layer + one copy + 4 GiB left; the run finished so, session 12) or more
    layer = layer_host_bytes(qwen, pinned=True)
    assert plan_states(int(1.07e9), None, layer, int(5.5 * GIB)).on_disk
    assert not plan_states(int(1.07e9), None, layer, int(5.75 * GIB)).on_disk
    assert not plan_states(int(1.07e9), None, layer, 120 * GIB).on_disk


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "8", True])
def test_recipe_host_memory_gb_is_checked(bad):
    with pytest.raises(ValueError, match=r"^host_memory_gb: expected a finite number >= 0 or null"):
        Recipe(host_memory_gb=bad)
    r = Recipe()
    r.host_memory_gb = bad
    with pytest.raises(ValueError, match="host_memory_gb"):
        r.validated()


def test_recipe_and_cli_host_memory_gb(tmp_path):
    assert Recipe().host_memory_gb is None and Recipe(host_memory_gb=0).host_memory_gb == 0
    assert Recipe.from_dict(Recipe(host_memory_gb=12.5).to_dict()).host_memory_gb == 12.5
    assert Recipe.from_cli(None, host_memory_gb=3).host_memory_gb == 3
    from moequant.cli.main import build_parser

    args = build_parser().parse_args(["quantize", "m", "--out", "o", "--host-memory-gb", "0"])
    assert args.host_memory_gb == 0.0


# ------------------------------------------------------------------------------------------ measured memory
def _moe_checkpoint(path: Path, layers: int, experts: int, hidden: int, inter: int) -> Path:
    """A random bf16 Qwen3-MoE (top-2, tied embeddings) with the repository's tokenizer."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = transformers.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * inter,
                                      moe_intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=64, num_experts=experts, num_experts_per_tok=2,
                                      max_position_embeddings=512, tie_word_embeddings=True, norm_topk_prob=True)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _probe(model: Path, out: Path, *args: str) -> dict:
    # Allocations above 64 KiB are mmapped and returned on free: a run of this size then shows its live memory, as
    # a real run's (whose tensors are all above glibc's largest automatic threshold, 32 MiB) does, instead of the
    # allocator arenas' retention of this small model's sub-MiB tensors.
    env = {**_env(), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, str(HERE / "host_memory_probe.py"), str(model), str(out), *args],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_peak_host_memory_is_one_layer_plus_hidden_states(tmp_path):
    """Whole runs on the CPU (GPTQ, 16 experts of 256 x 512, 8 and 2 decoder layers): the anonymous memory the layer
    loop adds to the process stays under the bound below, far from the 8 layers together, and does not grow with
    the number of layers.

    The bound, for a MoE layer on the CPU (float32; the parts a GPU run keeps on the device are marked *): the layer
    as loaded (L); its expert Hessians* (E x (H^2 + I^2) x 4 bytes); the solver's copies of the expert
    weights* and their dequantized results* before the write-back (2 L); its codes and those of the previous layer,
    which the background commit is writing (L / 4 each); the hidden states: inputs and outputs, and the engine's
    two recorded passes* and expert outputs* (6 copies); 32 MiB for the interpreter's and the forward's temporaries
    and the allocator. (The embeddings and lm_head are released before the first layer.) Measured: 130 MB with 8
    layers, 134 MB with 2, bound 147 MB; 295 MB when every loaded layer is kept alive (the probe's --leak)."""
    shape = (16, 256, 512)  # experts, hidden, expert width
    m8 = _moe_checkpoint(tmp_path / "m8", 8, *shape)
    r8 = _probe(m8, tmp_path / "r8.json")
    layer, states = r8["layer"], r8["states"]
    hessians = 16 * (256 * 256 + 512 * 512) * 4
    bound = 3.5 * layer + hessians + 6 * states + 32 * 2**20
    grown = r8["peaks"]["layers"] - r8["base"]
    assert r8["model"] > 1.3 * bound, "the model is too small for the bound to tell one layer from all"
    assert grown <= bound, f"the layer loop added {grown / 1e6:.1f} MB, bound {bound / 1e6:.1f} MB ({r8})"
    r2 = _probe(_moe_checkpoint(tmp_path / "m2", 2, *shape), tmp_path / "r2.json")
    assert r2["layer"] == layer
    assert abs(grown - (r2["peaks"]["layers"] - r2["base"])) < layer / 2, (r8, r2)


_LOAD = r"""
import json, re, sys, torch
from moequant.models.lazy import LazyModel

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

lazy = LazyModel(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current resident size
before = status("VmRSS")
layer = lazy.load_layer(0)
print(json.dumps({"grown": status("VmHWM") - before,
                  "layer": sum(p.numel() * p.element_size() for p in layer.parameters())}))
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_layer_loads_into_its_own_memory(tmp_path_factory, dtype):
    """Loading a layer of 16 per-expert checkpoint tensors x 3 adds the layer's own size to the resident memory
    (file pages included: no mmap of the checkpoint), plus one checkpoint tensor when the dtype is converted; reading
    them and then ``torch.cat`` / ``torch.stack``-ing them held ~2.7 layers."""
    model = tmp_path_factory.getbasetemp() / "load-model"
    if not (model / "config.json").exists():
        _moe_checkpoint(model, 1, 16, 512, 1024)
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(model), dtype], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    one_tensor = 1024 * 512 * 2
    # 8 MiB for the interpreter's own growth: with 4 MiB, a full-suite run on the 2-core machine overshot by 46 KB
    # (float32, session 12); what the test guards against is ~2.7 layers (276 MB here)
    assert r["grown"] <= 1.05 * r["layer"] + one_tensor + 8 * 2**20, r


def test_layer_load_stacks_nothing_and_matches_the_checkpoint(model, monkeypatch):
    from moequant.models.lazy import LazyModel, layer_plan

    lazy = LazyModel(model, dtype=torch.float32)
    refs = {}
    for i in range(lazy.num_layers):
        for e in layer_plan(lazy.family, lazy.meta_layer(i), lazy.layer_prefix(i)):
            mats = [torch.cat([lazy.reader.get(d.name) for d in g]) for g in e.groups]
            refs[i, e.state] = (torch.stack(mats) if e.stacked else mats[0]).to(e.dtype)

    def forbidden(*a, **kw):
        raise AssertionError("load_layer copied through torch.stack / torch.cat")

    monkeypatch.setattr(torch, "stack", forbidden)
    monkeypatch.setattr(torch, "cat", forbidden)
    for i in range(lazy.num_layers):
        state = lazy.load_layer(i).state_dict()
        for (j, name), ref in refs.items():
            if j == i:
                assert state[name].dtype == torch.float32 and torch.equal(state[name], ref), (i, name)


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.gpu
def test_disk_store_on_the_gpu(model, tmp_path):
    """bf16 layers on CUDA: the disk-backed store (batches written from pinned copies, read back into pinned
    memory) gives the in-memory run's checkpoint bit for bit, also resumed after an interruption."""
    a = _quantize(model, tmp_path / "mem", _recipe(device="cuda"))
    b = _quantize(model, tmp_path / "disk", _recipe(device="cuda", host_memory_gb=0))
    assert not a.hidden_states["on_disk"] and b.hidden_states["on_disk"]
    _same(tmp_path / "mem", tmp_path / "disk")
    out = tmp_path / "resumed"
    with pytest.raises(CrashAfterLayer0):
        _quantize(model, out, _recipe(device="cuda", host_memory_gb=0), observers=crash_observer())
    assert _quantize(model, out, _recipe(device="cuda", host_memory_gb=0), resume=True).resumed_from_layer == 1
    _same(tmp_path / "mem", out)


@pytest.mark.gpu
def test_layer_loads_pinned_and_on_the_device(model):
    """A layer read for a GPU: its host tensors page-locked (the prefetch), or each tensor read straight onto the
    device; both equal the plain CPU load bit for bit."""
    from moequant.models.lazy import LazyModel

    lazy = LazyModel(model, dtype=torch.bfloat16)
    for i in range(lazy.num_layers):
        plain = lazy.load_layer(i).state_dict()
        pinned = lazy.load_layer(i, "cpu", pin_memory=True)
        assert all(p.is_pinned() for p in pinned.parameters())
        device = lazy.load_layer(i, "cuda").state_dict()
        streamed = lazy.load_layer(i, "cuda", experts_device="cpu", pin_memory=True)
        for k, v in pinned.state_dict().items():
            assert torch.equal(v, plain[k]) and torch.equal(device[k].cpu(), plain[k]), (i, k)
            assert torch.equal(streamed.state_dict()[k].cpu(), plain[k]), (i, k)
        experts = lazy.family.experts_of(streamed)
        if experts is not None:
            assert all(p.device.type == "cpu" and p.is_pinned() for p in experts.parameters())
