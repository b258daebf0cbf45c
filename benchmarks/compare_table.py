"""The fidelity table of docs/quality.md: ``moequant compare`` of quantized checkpoints against their original, one row
each, plus where the damage is (from each run's compare result and calibration report).

    python benchmarks/compare_table.py --model ../shared/models/qwen3moe-tiny \
        --text ../shared/data/evaltext/heldout.txt OUT/rtn-w4 OUT/gptq-w4 ... [--max-windows N] [--json table.json]
    python benchmarks/compare_table.py ... --quantize --calib ../shared/data/evaltext/calib.txt --num-samples 32 \
        OUT/rtn-w4 OUT/default-w3 ...   # first quantizes each RUN named like a benchmarks/quality.py config
    python benchmarks/compare_table.py ... --max-windows 64 --spread OUT/...   # 64 windows evenly spread over the text

Each RUN is a ``moequant quantize`` output; with ``--quantize`` a missing RUN is made first, its directory name read
as a ``benchmarks/quality.py`` config (``rtn-w4``, ``gptq-w3``, ``default-w4``: the recipe that script builds, on
``--num-samples`` x 512 tokens of ``--calib``, pack-quantized). Its compare result is saved as
``RUN/moequant_compare.json`` (reused when present with the same settings, unless ``--force``), so ``moequant report
RUN`` shows the run afterwards.

``--max-windows N`` alone compares the first N windows of the text; with ``--spread`` the N windows are taken evenly
spaced over the whole text instead (first and last included), so a text made of several sources (``heldout.txt``:
the last 1% of each training source, one after another) is sampled from each. The compare result then names the text
``TEXT [N windows spread]``.

Columns: means over the MoE layers for the routing drift (``top-k set changed``, ``top-1 flip``; ``load moved``: half
the summed absolute change of the expert loads, the share of routed slots that changed expert in aggregate),
``largest load change`` the one expert whose share changed most (points of the routed slots), the layer with the
most top-k drift and with the largest own output error, and the calibration report's layer with the largest routed
relative error ``tr(dW H dW^T) / tr(W H W^T)``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def quantize(run: Path, args) -> None:
    """Quantizes the model into ``run`` by the quality.py config its name spells."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality

    from moequant import pipeline

    calib = Path(args.calib)
    ns = argparse.Namespace(group_size=128, num_samples=args.num_samples, seq_len=512, device=args.device or "cpu",
                            ebss_jsonl=None)
    recipe = quality.build_recipe(run.name, ns, calib.parent, run.parent)
    recipe.calibration.text_files = [str(calib)]
    t = time.time()
    pipeline.quantize(args.model, recipe, output_dir=run, progress=False)
    print(f"{run.name}: quantized in {time.time() - t:.0f} s", file=sys.stderr, flush=True)


def text_label(args) -> str:
    """The text name the compare result records (and is reused by)."""
    return f"{args.text} [{args.max_windows} windows spread]" if args.spread else str(args.text)


def spread_ids(args):
    """``--max-windows`` windows evenly spaced over ``--text``, concatenated (plus the token after the last, so that
    the perplexity protocol sees exactly those windows)."""
    import torch

    from moequant.calibration.data import load_tokenizer
    from moequant.eval.ppl import load_token_ids, window_starts

    ids = load_token_ids(load_tokenizer(args.model), args.text, seq_len=args.seq_len)
    starts = list(window_starts(ids.numel(), args.seq_len))
    n = min(args.max_windows, len(starts))
    pick = [starts[round(i * (len(starts) - 1) / max(n - 1, 1))] for i in range(n)]
    parts = [ids[s: s + args.seq_len] for s in pick] + [ids[pick[-1] + args.seq_len: pick[-1] + args.seq_len + 1]]
    return torch.cat(parts)


def row(run: Path, args) -> dict:
    from moequant.eval.compare import COMPARE_FILE, compare
    from moequant.eval.compare_result import load_compare
    from moequant.pipeline.report import QuantizationReport

    path = run / COMPARE_FILE
    c = load_compare(path) if path.is_file() and not args.force else None
    if c is None or c.seq_len != args.seq_len or c.text != text_label(args) or \
            (args.max_windows is not None and c.windows != args.max_windows):
        t = time.time()
        if args.spread:
            if getattr(args, "_ids", None) is None:
                args._ids = spread_ids(args)
            c = compare(args.model, run, token_ids=args._ids, seq_len=args.seq_len, batch_size=args.batch_size,
                        device=args.device, progress=False)
            c.text = text_label(args)
        else:
            c = compare(args.model, run, args.text, seq_len=args.seq_len, max_windows=args.max_windows,
                        batch_size=args.batch_size, device=args.device, progress=False)
        c.save(path)
        print(f"{run.name}: compared in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    moe = c.moe_layers
    out = dict(run=run.name, tokens=c.tokens, kl_mean=c.kl_mean, kl_p99=c.kl_p99, top1=c.top1_agreement,
               ppl_base=c.ppl_base, ppl_quant=c.ppl_quant, topk_changed=_mean([x.topk_changed for x in moe]),
               top1_flip=_mean([x.top1_flip for x in moe]),
               final_drift=c.layers[-1].hidden_drift if c.layers else None,
               worst_drift_layer=(lambda w: (w.index, w.topk_changed))(c.worst_layer("topk_changed")),
               worst_error_layer=(lambda w: (w.index, w.layer_error))(c.worst_layer("layer_error")),
               worst_update_layer=(lambda w: (w.index, w.update_error))(c.worst_layer("update_error")),
               load_moved=_mean([sum(abs(d) for d in x.load_change) / 2 for x in moe]),
               load_changes=sorted(((x.index, e, d) for x in moe for e, d in enumerate(x.load_change)),
                                   key=lambda r: -abs(r[2]))[:3],
               seconds=c.seconds)
    rp = run / "moequant_report.json"
    if rp.is_file():
        rep = QuantizationReport.load(rp)
        experts = sorted(((x.index, e, err / en, x.expert_tokens[e]) for x in rep.layers
                          for e, (err, en, _) in x.expert_errors().items() if en > 0), key=lambda r: -r[2])
        out["worst_experts"] = experts[:3]
        by_layer = []
        for x in rep.layers:
            k = x.error_by_kind().get("routed")
            if k and k[1] > 0:
                by_layer.append((x.index, k[0] / k[1]))
        out["worst_routed_layer"] = max(by_layer, key=lambda r: r[1]) if by_layer else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=None, help="default: every window of the text")
    ap.add_argument("--spread", action="store_true",
                    help="take the --max-windows windows evenly spaced over the text, not the first ones")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None)
    ap.add_argument("--force", action="store_true", help="recompute compare results that exist")
    ap.add_argument("--quantize", action="store_true", help="make missing RUNs first (module docstring)")
    ap.add_argument("--calib", help="calibration text for --quantize")
    ap.add_argument("--num-samples", type=int, default=32, help="calibration windows of 512 tokens (--quantize)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.spread and args.max_windows is None:
        ap.error("--spread needs --max-windows N (the number of windows to spread over the text)")
    for r in args.runs:
        if args.quantize and not (r / "moequant_report.json").is_file():
            quantize(r, args)
    rows = [row(r, args) for r in args.runs]
    print("| run | KL mean | KL p99 | top-1 agreement | ppl (orig. → quant.) | top-k set changed | top-1 flip | "
          "load moved | largest load change | hidden drift, last layer | most drift | largest layer error | "
          "worst routed layer (calib.) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        wd, we, wr = r["worst_drift_layer"], r["worst_error_layer"], r.get("worst_routed_layer")
        lc = r["load_changes"][0]
        print(f"| {r['run']} | {r['kl_mean']:.4f} | {r['kl_p99']:.3f} | {r['top1']:.4f} | "
              f"{r['ppl_base']:.3f} → {r['ppl_quant']:.3f} | {r['topk_changed']:.4f} | {r['top1_flip']:.4f} | "
              f"{100 * r['load_moved']:.2f}pt | L{lc[0]} e{lc[1]} {100 * lc[2]:+.2f}pt | {r['final_drift']:.4f} | L{wd[0]} {wd[1]:.3f} | L{we[0]} {we[1]:.4f} | "
              + (f"L{wr[0]} {wr[1]:.4f}" if wr else "–") + " |")
    print()
    for r in rows:
        wu = r["worst_update_layer"]
        print(f"{r['run']}: largest error relative to the layer update: L{wu[0]} {wu[1]:.4f}; largest load changes: "
              + ", ".join(f"L{li} e{e} {100 * d:+.2f}pt" for li, e, d in r["load_changes"]))
        if r.get("worst_experts"):
            print(f"{r['run']}: experts with the largest calibration error: " + ", ".join(
                f"L{li} e{e} ({rel:.4f}, {tok} tokens)" for li, e, rel, tok in r["worst_experts"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
