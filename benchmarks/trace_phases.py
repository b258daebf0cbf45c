#!/usr/bin/env python3
"""Where a profiled layer's time goes, phase by phase, from the timeline ``bench_e2e.py --profile-layer N
--profile-trace T`` writes (a Chrome trace, gzip or plain).

For each ``moequant.*`` phase marker (the engine's ``record_function`` ranges) it prints the phase's wall time, the
GPU's busy time inside it (the union of kernel and copy intervals), the idle share, the launches, the largest kernels,
the CUDA runtime calls that took the most host time (synchronisations, copies) and the outermost torch operators: a phase whose GPU idles is bound
by the host, one whose GPU is busy by its kernels.

    python3 benchmarks/trace_phases.py trace_qwen.json.gz [--top 8]
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict


def load(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union(intervals: list) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def outermost(events: list) -> list:
    """The events not nested in another of the same thread (a torch op's own aten calls are left out)."""
    out, end = [], defaultdict(lambda: float("-inf"))
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        key = (e.get("pid"), e.get("tid"))
        if e["ts"] >= end[key]:
            out.append(e)
            end[key] = e["ts"] + e["dur"]
    return out


def clip(events: list, a: float, b: float) -> list:
    return [(max(e["ts"], a), min(e["ts"] + e["dur"], b), e) for e in events if e["ts"] < b and e["ts"] + e["dur"] > a]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=8, help="kernels and runtime calls listed per phase")
    ap.add_argument("--prefix", default="moequant.", help="the phase markers' name prefix")
    args = ap.parse_args(argv)
    try:
        raw = load(args.trace)
    except (OSError, ValueError, KeyError, EOFError) as exc:  # missing, not gzip / JSON, not a Chrome trace
        print(f"trace_phases: error: {args.trace}: cannot read a Chrome trace ({exc}); pass the file "
              "bench_e2e.py --profile-trace wrote", file=sys.stderr)
        return 2
    ev = [e for e in raw if isinstance(e, dict) and e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    ops = outermost([e for e in ev if e.get("cat") == "cpu_op"])
    phases = [e for e in ev if e.get("cat") == "user_annotation" and e.get("name", "").startswith(args.prefix)]
    if not ev:
        print("trace_phases: error: no complete events in the trace", file=sys.stderr)
        return 2
    t0 = min(e["ts"] for e in ev)
    t1 = max(e["ts"] + e["dur"] for e in ev)
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    print(f"trace: {(t1 - t0) / 1e6:.3f} s, GPU busy {busy / 1e6:.3f} s ({100 * busy / max(t1 - t0, 1):.0f} %), "
          f"{len(gpu)} GPU events, {len(runtime)} runtime calls")
    rows = sorted(phases, key=lambda e: e["ts"])
    # every marker, nested ones too (solve.run_jobs inside expert_solve); a marker's GPU time is the kernels that ran
    # inside its host window (the engine's phase timer waits for its stream at the end, so they finish inside it)
    print(f"{'phase':<34} {'start s':>8} {'wall ms':>9} {'GPU ms':>8} {'idle %':>6} {'launches':>8}")
    totals = defaultdict(lambda: [0.0, 0.0, 0])
    for p in rows:
        a, b = p["ts"], p["ts"] + p["dur"]
        g = clip(gpu, a, b)
        gb = union([(x, y) for x, y, _ in g])
        n = sum(1 for e in runtime if a <= e["ts"] < b and "Launch" in e.get("name", ""))
        name = p["name"][len(args.prefix):]
        t = totals[name]
        t[0] += p["dur"]; t[1] += gb; t[2] += n
        print(f"{name:<34} {(a - t0) / 1e6:8.3f} {p['dur'] / 1e3:9.1f} {gb / 1e3:8.1f} "
              f"{100 * (1 - gb / max(p['dur'], 1)):6.0f} {n:8d}")
    print()
    for name, (wall, gb, n) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        sel = [p for p in rows if p["name"] == args.prefix + name]
        kern, rt, cpu = (defaultdict(lambda: [0.0, 0]) for _ in range(3))
        for p in sel:
            a, b = p["ts"], p["ts"] + p["dur"]
            for x, y, e in clip(gpu, a, b):
                k = kern[e["name"][:90]]; k[0] += y - x; k[1] += 1
            for x, y, e in clip(runtime, a, b):
                r = rt[e["name"]]; r[0] += y - x; r[1] += 1
            for x, y, e in clip(ops, a, b):
                r = cpu[e["name"][:90]]; r[0] += y - x; r[1] += 1
        print(f"== {name}: wall {wall / 1e3:.1f} ms, GPU {gb / 1e3:.1f} ms, {n} launches")
        for k, (d, c) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"   kernel {d / 1e3:8.2f} ms x{c:<5d} {k}")
        for k, (d, c) in sorted(rt.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"   host   {d / 1e3:8.2f} ms x{c:<5d} {k}")
        for k, (d, c) in sorted(cpu.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"   op     {d / 1e3:8.2f} ms x{c:<5d} {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
