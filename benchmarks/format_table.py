"""docs/quality.md, "Every scheme preset, RTN and GPTQ": the trained qwen3moe-tiny quantized with every named scheme
(moequant.formats.schemes.PRESETS) by RTN and by GPTQ, on the small protocol of benchmarks/simulation_table.py
(16 x 128 calibration tokens of calib.txt; the preset's own fields, ``method`` rtn or gptq, every other scheme
field the recipe default; no KV-cache quantization), perplexity on the first WINDOWS windows of 256 tokens of
heldout.txt and of wt2_test.txt, as deployed (moequant eval's default: the activation quantization the scheme
implies is simulated) and with the weights alone, plus bits per quantized weight (benchmarks/quality.py's
``average_bits``: the format's storage_bits over the decoder's quantized matrices, scales included).

    PYTHONPATH=python python benchmarks/format_table.py OUT_ROOT [--windows 16] [--rows bf16,FP8-rtn,...] [--markdown]

Rows run one at a time and print as they finish; OUT_ROOT/format_table.json is rewritten after each row. A rerun
skips the rows already in the JSON and reuses the quantized checkpoints OUT_ROOT/<preset>-<method> (an interrupted
quantization resumes from its ``.partial``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import average_bits  # noqa: E402
from simulation_table import SEQ_LEN, TINY, eval_ids, load_bf16, quantize_once, small_recipe  # noqa: E402

from moequant.eval import load_model, perplexity, simulation_of  # noqa: E402
from moequant.formats.schemes import PRESETS  # noqa: E402
from moequant.io.files import atomic_write_json  # noqa: E402

METHODS = ("rtn", "gptq")
TEXTS = {"heldout": "heldout.txt", "wt2": "wt2_test.txt"}


def all_rows() -> list[str]:
    return ["bf16"] + [f"{p}-{m}" for p in PRESETS for m in METHODS]


def run_row(name: str, root: Path, ids: dict) -> dict:
    """One row: quantize (or reuse), then the perplexities with the simulation on and off."""
    ppl = lambda model: {k: perplexity(model, v, seq_len=SEQ_LEN, progress=False) for k, v in ids.items()}  # noqa: E731
    if name == "bf16":
        p = ppl(load_bf16())
        return {"bits": 16.0, "deployed": p, "weights": p, "simulated": False}
    preset, method = name.rsplit("-", 1)
    recipe = small_recipe({"preset": preset, "method": method})
    seconds = quantize_once(recipe, root / name)
    model = load_model(root / name, loader="moequant")  # simulate=True: eval's default
    sim = simulation_of(model)
    deployed = ppl(model)
    if sim is not None:
        sim.remove()
    weights = ppl(model) if sim is not None else deployed
    return {"bits": average_bits(str(TINY), recipe.scheme), "deployed": deployed, "weights": weights,
            "simulated": sim is not None, "quantize_seconds": None if seconds is None else round(seconds, 1)}


def markdown(rows: dict) -> str:
    """The docs/quality.md table of ``rows`` (JSON rows): deployed and weights-only perplexities, with the change
    against the bf16 row where there is one."""
    base = rows.get("bf16")

    def cell(r: dict, kind: str, text: str) -> str:
        v = r[kind][text]
        s = f"{v:.4f}" if text == "heldout" else f"{v:.2f}"
        if base is not None and r is not base:
            s += f" ({100 * (v / base[kind][text] - 1):+.2f} %)"
        return s if kind == "deployed" or r["simulated"] else "="

    lines = ["| scheme | method | bits | held-out, deployed | WikiText-2, deployed | held-out, weights alone | "
             "WikiText-2, weights alone |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        scheme, method = name.rsplit("-", 1) if "-" in name else (name, "")
        lines.append(f"| {scheme} | {method} | {r['bits']:.3f} | {cell(r, 'deployed', 'heldout')} | "
                     f"{cell(r, 'deployed', 'wt2')} | {cell(r, 'weights', 'heldout')} | {cell(r, 'weights', 'wt2')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="quantized checkpoints and format_table.json go here")
    ap.add_argument("--windows", type=int, default=16, help="windows of 256 tokens per text (default 16)")
    ap.add_argument("--markdown", action="store_true", help="print the table of the JSON's rows as markdown at the end")
    ap.add_argument("--rows", help=f"comma list (default all: {','.join(all_rows())})")
    args = ap.parse_args(argv)
    names = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else all_rows()
    bad = [r for r in names if r not in all_rows()]
    if bad:
        ap.error(f"--rows: unknown row(s) {bad}; expected some of {all_rows()}")
    args.root.mkdir(parents=True, exist_ok=True)
    path = args.root / "format_table.json"
    table = json.loads(path.read_text()) if path.is_file() else {}
    if table and table.get("windows") != args.windows:
        ap.error(f"--windows: {path} was measured with {table.get('windows')} windows, got {args.windows}")
    table.update(windows=args.windows, seq_len=SEQ_LEN, model=str(TINY), torch=torch.__version__,
                 threads=torch.get_num_threads())
    rows = table.setdefault("rows", {})
    ids = {k: eval_ids(f, args.windows) for k, f in TEXTS.items()}
    for name in names:
        if name in rows:
            r = rows[name]
        else:
            t = time.time()
            r = run_row(name, args.root, ids)
            r["row_seconds"] = round(time.time() - t, 1)
            rows[name] = r
            atomic_write_json(path, table)
        d, w = r["deployed"], r["weights"]
        print(f"{name:16s} {r['bits']:6.3f} bits  deployed heldout {d['heldout']:.4f} wt2 {d['wt2']:.2f}  weights "
              f"heldout {w['heldout']:.4f} wt2 {w['wt2']:.2f}  ({r.get('row_seconds')} s)", flush=True)
    if args.markdown:
        print(markdown({k: rows[k] for k in all_rows() if k in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
