"""Timing helpers shared by the GPU benchmarks: CUDA events, warm-up, median of repeats, copy bandwidth."""

from __future__ import annotations

import statistics

import torch


def cuda_time_ms(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in ms, measured with CUDA events around each call (after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn, calls: int = 10, repeats: int = 5) -> float:
    """Per-call time in ms of `calls` back-to-back calls between one pair of CUDA events (the launch latency hidden
    behind the previous call): median over `repeats` rounds, after one warm-up round, divided by `calls`."""
    return cuda_time_ms(lambda: [fn() for _ in range(calls)], repeats=repeats, warmup=1) / calls


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a large clone, measured in this process."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    ms = cuda_time_ms(lambda: x.clone(), repeats=10, warmup=2)
    del x
    return 2 * nbytes / (ms * 1e-3) / 1e9


def fp32_gemm_tflops(n: int = 8192) -> float:
    """Achieved fp32 (TF32 off) GEMM rate in this process: the practical SIMT ceiling."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    ms = cuda_time_ms(lambda: a @ b, repeats=5, warmup=2)
    torch.backends.cuda.matmul.allow_tf32 = prev
    del a, b
    return 2 * n**3 / (ms * 1e-3) / 1e12


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title} ==")
    for k, r in enumerate(cells):
        print(" | ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("-+-".join("-" * w for w in widths))


def timeline_report(fn, title: str, min_gap_us: float = 5.0, top: int = 12) -> None:
    """Runs fn() once under torch.profiler (CPU + CUDA) and prints where the wall time goes: the CPU time of the
    call, the GPU's busy time (union of kernels / copies / memsets), every GPU idle gap of at least min_gap_us
    inside the call with the GPU work around it and the CUDA runtime calls the host was in meanwhile, and the
    runtime calls by total time. Profiling adds its own host overhead; read the gaps as where, not how much."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("timeline_call"):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X"]
    call = [e for e in events if e.get("name") == "timeline_call" and e.get("cat") in ("user_annotation",
                                                                                         "cpu_op")]
    if not call:
        print(f"timeline {title}: no call range in the trace")
        return
    t0, t1 = call[0]["ts"], call[0]["ts"] + call[0]["dur"]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                  and e["ts"] < t1 + 1e6 and e["ts"] + e["dur"] > t0), key=lambda e: e["ts"])
    api = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                  and t0 <= e["ts"] <= t1), key=lambda e: e["ts"])
    if not gpu:
        print(f"timeline {title}: no GPU work recorded")
        return
    busy, end, gaps = 0.0, gpu[0]["ts"], []
    prev = gpu[0]
    for e in gpu:
        s, f = e["ts"], e["ts"] + e["dur"]
        if s - end >= min_gap_us:
            during = [a["name"] for a in api if a["ts"] < s and a["ts"] + a["dur"] > end]
            gaps.append((s - end, prev["name"][:48], e["name"][:48], ", ".join(dict.fromkeys(during))[:90]))
        busy += max(0.0, f - max(s, end))
        if f > end:
            end, prev = f, e
    span = end - gpu[0]["ts"]
    print(f"\ntimeline {title}: CPU {(t1 - t0) / 1e3:.3f} ms (call), GPU span {span / 1e3:.3f} ms, "
          f"busy {busy / 1e3:.3f} ms, idle {(span - busy) / 1e3:.3f} ms in {len(gaps)} gaps >= {min_gap_us} us; "
          f"launch of the first GPU work {(gpu[0]['ts'] - t0) / 1e3:.3f} ms after the call began")
    for g in sorted(gaps, reverse=True)[:top]:
        print(f"  gap {g[0]:8.1f} us  after {g[1]}  before {g[2]}  host in: {g[3]}")
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")
                   and t0 <= e["ts"] <= gpu[0]["ts"] and e.get("name") != "timeline_call"), key=lambda e: e["ts"])
    print("  host before the first GPU work (start offset, duration, event): " + "; ".join(
        f"+{(e['ts'] - t0) / 1e3:.3f} {e['dur'] / 1e3:.3f} {e['name'][:40]}" for e in host[:30]))
    totals: dict[str, list[float]] = {}
    for a in api:
        t = totals.setdefault(a["name"], [0.0, 0])
        t[0] += a["dur"]
        t[1] += 1
    print("  host runtime calls: " + "; ".join(f"{k} {v[0] / 1e3:.3f} ms x{v[1]}" for k, v in
                                              sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]))
