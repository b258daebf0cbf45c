"""Quantizes a random-weight Qwen3-30B-A3B-shaped model (or another of benchmarks/bench_e2e.py's configs) with N decoder
layers on the GPU under a cgroup memory limit of one layer + the calibration hidden states + a margin (issue 13:
"a run under a cgroup memory limit of (one layer + hidden states + 4 GB) succeeds"), once with the hidden states
placed automatically and once forced into the disk-backed store (``host_memory_gb: 0``); ``--modes`` adds
``memory`` (forced into host memory: two copies).

The run itself is ``tests/python/host_memory_probe.py`` (``moequant.quantize`` with the process's RssAnon sampled
every 2 ms): this script builds the model if needed, computes the limit, starts the probe inside a memory cgroup
with swap off, and reports per mode: exit status (an OOM kill is SIGKILL), the anonymous-memory peak against the
limit, the cgroup's own peak (``memory.peak``) and OOM kills when it owns the cgroup, where the hidden states lived.

How the limit is applied, the first that works (say which with --via, default auto):
  * ``systemd-run --scope -p MemoryMax=... -p MemorySwapMax=0`` (as root, else ``--user``);
  * cgroup v2 by hand (root, a writable /sys/fs/cgroup with the memory controller): a new group under the root;
  * cgroup v1 by hand (root): /sys/fs/cgroup/memory/<group> with memory.limit_in_bytes (and memsw when present).
When none works the script says why, runs without a limit, compares the measured peak with the limit, and exits 3.

Usage (GPU machine, repository root, moequant built):
    python scripts/host_memory_cgroup.py [--model qwen3-30b-a3b] [--layers 4] [--samples 128] [--seq-len 2048]
        [--margin-gb 4] [--modes auto,disk] [--via auto|systemd|cgroup2|cgroup1|none] [--work DIR] [--keep]
        [--json OUT]
Exit status: 0 every mode finished under the limit; 1 a mode failed (OOM kill or error); 3 no limit could be
applied (measured only).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "python" / "host_memory_probe.py"
GIB = 2**30
# how each mode places the calibration hidden states (the probe's host_memory_gb)
MODES = {"auto": [], "disk": ["--host-memory-gb", "0"], "memory": ["--host-memory-gb", "100000"]}


# ------------------------------------------------------------------------------------------ sizes
def layer_and_states_bytes(model: Path, samples: int, seq_len: int) -> tuple[int, int, int]:
    """(the largest decoder layer's bytes on disk (bf16: as it sits in host memory on a GPU run), one copy of the
    hidden states in bf16, the number of layers), from the safetensors headers and config.json."""
    sys.path.insert(0, str(REPO / "python"))
    from moequant.io.safetensors import check_checkpoint, layer_of

    index = check_checkpoint(model)
    per: dict[str, int] = {}
    for name, h in index.tensors.items():
        where = layer_of(name)
        if where.startswith("layer "):
            per[where] = per.get(where, 0) + h.end - h.begin
    cfg = json.loads((model / "config.json").read_text())
    hidden = cfg.get("hidden_size") or cfg["text_config"]["hidden_size"]
    return max(per.values()), samples * seq_len * hidden * 2, len(per)


# ------------------------------------------------------------------------------------------ the limit
def _run_quiet(argv: list) -> tuple[bool, str]:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    lines = (p.stderr or p.stdout).strip().splitlines()
    return p.returncode == 0, lines[-1] if lines else f"exit {p.returncode}"


def systemd_prefix(limit: int) -> tuple[list | None, str]:
    """The argv prefix that runs a command in a transient scope with the limit (tried with ``true`` first)."""
    exe = shutil.which("systemd-run")
    if exe is None:
        return None, "systemd-run not found"
    props = ["-p", f"MemoryMax={limit}", "-p", "MemorySwapMax=0"]
    reasons = []
    for user in ([[], ["--user"]] if os.geteuid() == 0 else [["--user"]]):
        argv = [exe, *user, "--scope", "--quiet", *props]
        ok, why = _run_quiet(argv + ["true"])
        if ok:
            return argv, f"systemd-run {' '.join(user + ['--scope'] + props)}"
        reasons.append(f"systemd-run {' '.join(user + ['--scope'])}: {why}")
    return None, "; ".join(reasons)


class HandMadeCgroup:
    """A memory cgroup made by hand (root): ``path``, joined by the child in ``preexec``; removed by ``close``."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    def preexec(self):
        procs = self.path / ("cgroup.procs" if self.version == 2 else "tasks")
        procs.write_text(str(os.getpid()))

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.version == 2 else "memory.max_usage_in_bytes")
        try:
            return int(f.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def oom_kills(self) -> int | None:
        try:
            if self.version == 2:
                events = dict(line.split() for line in (self.path / "memory.events").read_text().splitlines())
                return int(events.get("oom_kill", 0))
            return int(dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
                       .get("oom_kill", 0))
        except (OSError, ValueError):
            return None

    def close(self):
        try:
            self.path.rmdir()
        except OSError:
            pass


def cgroup2(limit: int) -> tuple[HandMadeCgroup | None, str]:
    root = Path("/sys/fs/cgroup")
    if not (root / "cgroup.controllers").is_file():
        return None, "no cgroup v2 hierarchy at /sys/fs/cgroup"
    if "memory" not in (root / "cgroup.controllers").read_text().split():
        return None, "cgroup v2: the memory controller is not available at /sys/fs/cgroup"
    if os.geteuid() != 0 or not os.access(root, os.W_OK):
        return None, "cgroup v2: /sys/fs/cgroup is not writable (needs root, and a writable cgroup mount)"
    if "memory" not in (root / "cgroup.subtree_control").read_text().split():
        try:
            (root / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            return None, (f"cgroup v2: cannot enable the memory controller for child groups of /sys/fs/cgroup "
                          f"({exc.strerror}; in a container whose processes sit in its root group the kernel "
                          f"refuses it)")
    path = root / f"moequant-hostmem-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.max").write_text(str(limit))
        if (path / "memory.swap.max").exists():
            (path / "memory.swap.max").write_text("0")
    except OSError as exc:
        try:
            path.rmdir()
        except OSError:
            pass
        return None, f"cgroup v2: cannot set up {path} ({exc.strerror})"
    return HandMadeCgroup(path, 2), f"cgroup v2 {path} (memory.max {limit}, memory.swap.max 0)"


def cgroup1(limit: int) -> tuple[HandMadeCgroup | None, str]:
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").is_file():
        return None, "no cgroup v1 memory hierarchy at /sys/fs/cgroup/memory"
    if os.geteuid() != 0 or not os.access(root, os.W_OK):
        return None, "cgroup v1: /sys/fs/cgroup/memory is not writable (needs root)"
    path = root / f"moequant-hostmem-{os.getpid()}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        if (path / "memory.memsw.limit_in_bytes").exists():
            (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
    except OSError as exc:
        try:
            path.rmdir()
        except OSError:
            pass
        return None, f"cgroup v1: cannot set up {path} ({exc.strerror})"
    return HandMadeCgroup(path, 1), f"cgroup v1 {path} (memory.limit_in_bytes {limit})"


def swap_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------ one run
def run_mode(mode: str, args, model: Path, limit: int, via: str, work: Path) -> dict:
    out = work / f"probe-{mode}.json"
    out.unlink(missing_ok=True)
    argv = [sys.executable, str(PROBE), str(model), str(out), "--device", args.device, "--samples", str(args.samples),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--work", str(work / f"out-{mode}")]
    if mode not in MODES:
        raise SystemExit(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    argv += MODES[mode]
    shutil.rmtree(work / f"out-{mode}", ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]))
    prefix, cg, how, reasons = [], None, "no limit", []
    for kind in ((via,) if via != "auto" else ("systemd", "cgroup2", "cgroup1")):
        if kind == "none":
            break
        if kind == "systemd":
            p, why = systemd_prefix(limit)
            if p is not None:
                prefix, how = p, why
                break
        else:
            cg, why = (cgroup2 if kind == "cgroup2" else cgroup1)(limit)
            if cg is not None:
                how = why
                break
        reasons.append(why)
    limited = bool(prefix) or cg is not None
    print(f"[{mode}] limit {limit / GIB:.2f} GiB via {how}" +
          ("" if limited else f" ({'; '.join(reasons) or '--via none'})"), flush=True)
    t = time.time()
    try:
        proc = subprocess.run(prefix + argv, env=env, text=True, capture_output=True,
                              preexec_fn=cg.preexec if cg is not None else None)
        res = {"mode": mode, "limited": limited, "via": how, "returncode": proc.returncode,
               "seconds": round(time.time() - t, 1)}
        if cg is not None:
            res["cgroup_peak"], res["oom_kills"] = cg.peak(), cg.oom_kills()
    finally:
        if cg is not None:
            cg.close()
    if not limited:
        res["why_unlimited"] = "; ".join(reasons) or "--via none"
    if out.is_file():
        res["probe"] = json.loads(out.read_text())
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        res["error"] = "\n".join(tail)
    shutil.rmtree(work / f"out-{mode}", ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--margin-gb", type=float, default=4.0, help="the limit's margin above layer + states (GiB)")
    ap.add_argument("--modes", default="auto,disk", help="comma-separated: auto (the automatic placement), disk "
                    "(host_memory_gb 0: the disk-backed store), memory (forced into host memory)")
    ap.add_argument("--via", default="auto", choices=("auto", "systemd", "cgroup2", "cgroup1", "none"))
    ap.add_argument("--work", default="/tmp/moequant-hostmem")
    ap.add_argument("--model-dir", help="an existing checkpoint instead of building --model (kept)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the script on a small model")
    ap.add_argument("--keep", action="store_true", help="keep the built model")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_dir) if args.model_dir else work / f"{args.model}-{args.layers}l"
    if not (model / "config.json").is_file():
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_e2e import build_model

        t = time.time()
        n = build_model(args.model, args.layers, model, args.device)
        print(f"built {args.model} x {args.layers} layers ({n:.2f} B parameters) in {time.time() - t:.1f} s")
    layer, states, layers = layer_and_states_bytes(model, args.samples, args.seq_len)
    limit = int(layer + states + args.margin_gb * GIB)
    print(f"{model.name} ({layers} layers): one layer {layer / GIB:.2f} GiB, hidden states "
          f"{args.samples} x {args.seq_len} tokens {states / GIB:.2f} GiB (one copy, bf16), margin "
          f"{args.margin_gb:.1f} GiB -> limit {limit / GIB:.2f} GiB; swap {swap_total() / GIB:.1f} GiB")
    results = []
    for mode in args.modes.split(","):
        r = run_mode(mode, args, model, limit, args.via, work)
        results.append(r)
        p = r.get("probe")
        if p:
            over = p["peak"] - limit
            print(f"[{mode}] rc {r['returncode']} in {r['seconds']} s; RssAnon base {p['base'] / GIB:.2f} GiB, peak "
                  f"{p['peak'] / GIB:.2f} GiB ({'over' if over > 0 else 'under'} the limit by {abs(over) / GIB:.2f} "
                  f"GiB); phases {', '.join(f'{k} {v / GIB:.2f}' for k, v in p['peaks'].items())} GiB; "
                  f"hidden states {'on disk' if p['hidden_states']['on_disk'] else 'in memory'}"
                  + (f"; cgroup peak {r['cgroup_peak'] / GIB:.2f} GiB, OOM kills {r['oom_kills']}"
                     if r.get("cgroup_peak") is not None else ""))
        else:
            print(f"[{mode}] FAILED rc {r['returncode']} (-9 = SIGKILL: the OOM killer) after {r['seconds']} s: "
                  f"{r.get('error', '')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"limit": limit, "layer": layer, "states": states, "runs": results},
                                              indent=2))
    if not args.keep and not args.model_dir:
        shutil.rmtree(model, ignore_errors=True)
    if not all(r.get("probe") and r["returncode"] == 0 for r in results):
        return 1
    if not all(r["limited"] for r in results):
        print("NOTE: no cgroup limit could be applied on this machine (see the reasons above); the peaks were "
              "measured without one")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
