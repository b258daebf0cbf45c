"""The quality table of docs/quality.md in one call: optional EBSS data, then benchmarks/quality.py rows in
parallel worker processes (the tiny model leaves a GPU mostly idle), then one merged JSON and a markdown table.

    python benchmarks/quality_table.py --out OUT_DIR --configs bf16,rtn-w4,gptq-w4,... [--workers 4] \
        [--model ../shared/models/qwen3moe-tiny] [--text-dir ../shared/data/evaltext] [--ebss]

``--ebss`` first generates ``OUT_DIR/ebss.jsonl`` (``moequant ebss``: 128 x 512 tokens, beam 4, tau 1.2) for the
``+ebss`` / ``+mix`` rows. Each worker writes ``OUT_DIR/quality_<i>.json`` (after every row) and ``quality_<i>.log``;
the merged result is ``OUT_DIR/quality.json`` and ``OUT_DIR/quality.md`` (rows in the order given). Exit status 1 if
any row failed (the others are still reported).

``--resume``: the rows OUT_DIR already holds (``quality.json`` and the worker files of a run that was stopped part
way, of the same model and protocol) are kept and not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def markdown(rows: dict, order: list, baseline: dict | None) -> str:
    lines = ["| config | held-out ppl | WikiText-2 ppl | quantize s | total s | fallbacks |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in order:
        r = rows.get(name)
        if r is None:
            lines.append(f"| {name} | failed | failed | | | |")
            continue
        secs = [f"{r[k]:.1f}" if r.get(k) is not None else "" for k in ("quantize_seconds", "total_seconds")]
        lines.append(f"| {name} | {r['heldout']:.3f} | {r['wt2']:.2f} | {secs[0]} | {secs[1]} | "
                     f"{r.get('fallbacks', '')} |")
    if baseline:
        lines.append("")
        lines.append("Reference (../shared/baselines): " + ", ".join(
            f"{k} {v['heldout']:.3f}/{v['wt2']:.2f}" for k, v in baseline.get("results", {}).items()
            if isinstance(v, dict) and "heldout" in v))
    return "\n".join(lines) + "\n"


def earlier_rows(out: Path, args) -> tuple[dict, dict]:
    """The rows ``out`` holds from earlier runs of the same model and protocol (``quality.json``, then the worker
    files of a run stopped before it merged them) and the metadata of one of those files."""
    rows, meta = {}, {}
    for f in [out / "quality.json"] + sorted(out.glob("quality_*.json")):
        if not f.is_file():
            continue
        d = json.loads(f.read_text())
        if (d.get("model"), d.get("num_samples"), d.get("seq_len")) != (args.model, args.num_samples, args.seq_len):
            print(f"resume: {f} is of another model or protocol; not used", flush=True)
            continue
        rows.update(d.pop("rows", {}))
        d.pop("workers", None)
        d.pop("wall_seconds", None)
        meta = d
    return rows, meta


def worker_env(device: str, workers: int, environ) -> dict:
    """The environment of the row workers: on the CPU each gets its share of the cores as its thread count
    (``OMP_NUM_THREADS``; torch would give every worker all of them). On the 2-core development machine, rows
    ``bf16,rtn-w4`` with 2 workers took 206 s with one thread each and finished no row in 10 minutes (stopped) with two each
    (``bf16`` alone, two threads: 88 s). A value the user set is kept."""
    env = dict(environ)
    if not str(device).startswith("cuda") and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", required=True, help="comma list, or @FILE with one config per line "
                    "(benchmarks/quality_rows.txt: the table of docs/quality.md)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--model", default="../shared/models/qwen3moe-tiny")
    ap.add_argument("--text-dir", default="../shared/data/evaltext")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ebss", action="store_true", help="generate OUT/ebss.jsonl first")
    ap.add_argument("--baseline", default="../shared/baselines/qwen3moe-tiny.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows OUT already holds (module docstring)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = Path(args.configs[1:]).read_text().replace("\n", ",") if args.configs.startswith("@") else args.configs
    names = [c.strip() for c in spec.split(",") if c.strip()]
    done, meta = earlier_rows(out, args) if args.resume else ({}, {})
    if done:
        print(f"resuming: {len([k for k in names if k in done])} of {len(names)} rows already in {out}", flush=True)
        # merged now, so that the worker files can start empty and a stop part way loses none of them
        (out / "quality.json").write_text(json.dumps({**meta, "rows": done}, indent=2))
    todo = [k for k in names if k not in done]
    ebss = out / "ebss.jsonl"
    if args.ebss:
        t = time.time()
        cmd = [sys.executable, "-m", "moequant", "ebss", args.model, "--out", str(ebss), "--num-samples", str(args.num_samples),
               "--seq-len", str(args.seq_len), "--batch-size", "32", "--device", args.device]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        print(f"ebss: {time.time() - t:.1f} s", flush=True)
    for f in out.glob("quality_*.json"):  # quality.py merges into them: no rows of an earlier run
        f.unlink()
    n = max(1, min(args.workers, len(todo))) if todo else 0
    shards = [todo[i::n] for i in range(n)]
    procs = []
    env = worker_env(args.device, n, os.environ)
    for i, shard in enumerate(shards):
        cmd = [sys.executable, str(HERE / "quality.py"), "--model", args.model, "--text-dir", args.text_dir,
               "--device", args.device, "--configs", ",".join(shard), "--num-samples", str(args.num_samples),
               "--seq-len", str(args.seq_len), "--json", str(out / f"quality_{i}.json"),
               "--keep-going"]
        if ebss.is_file():
            cmd += ["--ebss-jsonl", str(ebss)]
        log = open(out / f"quality_{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    t = time.time()
    rcs = []
    for p, log in procs:
        rcs.append(p.wait())
        log.close()
    rows = dict(done)
    for i in range(n):
        f = out / f"quality_{i}.json"
        if f.is_file():
            d = json.loads(f.read_text())
            rows.update(d.pop("rows"))
            meta = d
    ordered = {**{k: rows[k] for k in names if k in rows}, **{k: v for k, v in rows.items() if k not in names}}
    meta.update(rows=ordered, workers=n, wall_seconds=round(time.time() - t, 1))
    (out / "quality.json").write_text(json.dumps(meta, indent=2))
    base = Path(args.baseline)
    table = markdown(rows, names, json.loads(base.read_text()) if base.is_file() else None)
    (out / "quality.md").write_text(table)
    print(table)
    print(f"{len(rows)}/{len(names)} rows in {time.time() - t:.0f} s with {n} workers on {meta.get('device_name')}")
    return 0 if all(rc == 0 for rc in rcs) and len(rows) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
