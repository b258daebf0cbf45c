"""docs/quality.md, "Asymmetric calibration (GPTAQ), small protocol, CPU": the trained qwen3moe-tiny quantized by
benchmarks/quality.py configurations (``default-w4``, ``default+gptaq-w4``, ...; group 128) on the small protocol
of benchmarks/simulation_table.py (SAMPLES x 128 calibration tokens of calib.txt, seed 0), perplexity on the first
WINDOWS windows of 256 tokens of heldout.txt and of wt2_test.txt (weights only: these schemes quantize no
activations).

    PYTHONPATH=python python benchmarks/gptaq_table.py OUT_ROOT [--rows bf16,default-w4,default+gptaq-w4,...]
        [--samples 32] [--windows 16] [--markdown]

Rows run one at a time; OUT_ROOT/gptaq_table.json is rewritten after each, and a rerun skips the rows in it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import build_recipe  # noqa: E402
from simulation_table import SEQ_LEN, TEXT, TINY, eval_ids, load_bf16, quantize_once  # noqa: E402

from moequant.eval import load_model, perplexity  # noqa: E402
from moequant.io.files import atomic_write_json  # noqa: E402

ROWS = ["bf16", "default-w4", "default+gptaq-w4", "default+gptaq05-w4", "default+gptaq0-w4",
        "default-w3", "default+gptaq-w3", "default+gptaq05-w3", "default+gptaq0-w3"]
TEXTS = {"heldout": "heldout.txt", "wt2": "wt2_test.txt"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 128 tokens (default 32)")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of 256 tokens per text")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    path = args.root / "gptaq_table.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    if table and (table.get("windows"), table.get("samples")) != (args.windows, args.samples):
        ap.error(f"{path} was measured with other --windows / --samples")
    table.update(windows=args.windows, samples=args.samples, seq_len=SEQ_LEN, model=str(TINY),
                 threads=torch.get_num_threads())
    rows = table.setdefault("rows", {})
    ids = {k: eval_ids(f, args.windows) for k, f in TEXTS.items()}
    opts = SimpleNamespace(group_size=128, num_samples=args.samples, seq_len=128, device="cpu", ebss_jsonl=None)
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if name not in rows:
            t = time.time()
            if name == "bf16":
                model, qsec = load_bf16(), None
            else:
                recipe = build_recipe(name, opts, TEXT, args.root)
                qsec = quantize_once(recipe, args.root / name)
                model = load_model(args.root / name, loader="moequant")
            rows[name] = {k: perplexity(model, v, seq_len=SEQ_LEN, progress=False) for k, v in ids.items()}
            rows[name].update(quantize_seconds=None if qsec is None else round(qsec, 1),
                              row_seconds=round(time.time() - t, 1))
            atomic_write_json(path, table)
        r = rows[name]
        print(f"{name:22s} heldout {r['heldout']:.4f}  wt2 {r['wt2']:.3f}  ({r.get('row_seconds')} s)", flush=True)
    if args.markdown:
        base = rows.get("bf16")
        print("| config | held-out | WikiText-2 |\n| --- | --- | --- |")
        for name, r in rows.items():
            d = "" if base is None or r is base else f" ({100 * (r['heldout'] / base['heldout'] - 1):+.2f} %)"
            print(f"| `{name}` | {r['heldout']:.4f}{d} | {r['wt2']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
