"""``moequant report OUT``: a saved run (the quantize report ``moequant_report.json`` and, if present, the compare
result ``moequant_compare.json``) as plain text (:func:`render_text`) and as one self-contained HTML page with the
PNG figures of :mod:`moequant.eval.figures` inlined as base64 (:func:`render_html`: no file, script or network
access besides the page itself)."""
from __future__ import annotations

import base64
import html
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .compare_result import CompareResult, load_compare

__all__ = ["Run", "load_run", "render_text", "render_html", "REPORT_FILE", "HTML_FILE"]

REPORT_FILE = "moequant_report.json"
HTML_FILE = "moequant_report.html"


@dataclass
class Run:
    """A saved run: its directory, the quantize report (None when only a compare result is there) and the compare
    result (None when ``moequant compare`` was not run)."""

    dir: Path
    report: Optional[object]
    compare: Optional[CompareResult]


def load_run(out_dir: str | os.PathLike, compare_file: str | os.PathLike | None = None) -> Run:
    """Reads ``OUT/moequant_report.json`` and ``OUT/moequant_compare.json`` (or ``compare_file``); one-line errors
    naming what is missing and how to make it."""
    from ..pipeline.report import QuantizationReport
    from .compare import COMPARE_FILE

    d = Path(out_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory; pass the output directory of moequant quantize")
    rp = d / REPORT_FILE
    cp = Path(compare_file) if compare_file is not None else d / COMPARE_FILE
    if compare_file is not None and not cp.is_file():
        raise FileNotFoundError(f"--compare {cp} not found; pass the file moequant compare wrote")
    report = QuantizationReport.load(rp) if rp.is_file() else None
    comp = load_compare(cp) if cp.is_file() else None
    if report is None and comp is None:
        raise FileNotFoundError(f"{d} holds neither {REPORT_FILE} nor {COMPARE_FILE}; pass the output directory of "
                                f"moequant quantize (or run moequant compare BASE {d} --text FILE)")
    return Run(d, report, comp)


def _rel(e: float, w: float) -> Optional[float]:
    return e / w if w > 0 else None


def _fmt(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _worst_experts(report, n: int = 5) -> list:
    """The ``n`` routed experts with the largest relative error: (layer, expert, rel, tokens, fallback)."""
    rows = []
    for x in report.layers:
        for e, (err, en, fb) in x.expert_errors().items():
            if en > 0:
                tok = x.expert_tokens[e] if e < len(x.expert_tokens) else None
                rows.append((x.index, e, err / en, tok, fb))
    return sorted(rows, key=lambda r: -r[2])[:n]


def render_text(run: Run) -> str:
    """The terminal version: the report summary, the worst experts, the utilization strip and the compare summary."""
    parts = []
    rep = run.report
    if rep is not None:
        parts.append(rep.summary())
        if rep.budget:
            parts.append(rep.budget_table())
        worst = _worst_experts(rep)
        if worst:
            parts.append("experts with the largest relative error tr(dW H dW^T) / tr(W H W^T):\n" + "\n".join(
                f"  layer {li:3d} expert {e:4d}: {r:.4g} ({t} calibration tokens{', fallback' if fb else ''})"
                for li, e, r, t, fb in worst))
        table = rep.utilization_table()
        if table:
            parts.append("tokens per expert (columns: experts, darker = more tokens):\n" + table)
    if run.compare is not None:
        parts.append(run.compare.summary())
    else:
        parts.append(f"no compare result in {run.dir}: run moequant compare BASE {run.dir} --text FILE")
    return "\n\n".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}figure{margin:1em 0}img{max-width:100%;
border:1px solid #eee}figcaption{font-size:.85em;color:#555}pre{background:#f7f7f7;padding:1em;overflow-x:auto;
font-size:.8em}.bad{background:#fde2e1}
"""


def _table(headers: list, rows: list, left: int = 1) -> str:
    head = "".join(f"<th class='l'>{html.escape(h)}</th>" if i < left else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(
        f"<td class='l'>{html.escape(str(c))}</td>" if i < left else f"<td>{html.escape(str(c))}</td>"
        for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _figure(png: Optional[bytes], caption: str) -> str:
    if png is None:
        return ""
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _summary_rows(run: Run) -> list:
    rows = []
    rep, c = run.report, run.compare
    if rep is not None:
        scheme = rep.recipe.get("scheme", {}) if isinstance(rep.recipe, dict) else {}
        rows += [("model", rep.model), ("family", rep.family),
                 ("scheme", f"W{scheme.get('bits', '?')} g{scheme.get('group_size', '?')} "
                            f"{'sym' if scheme.get('symmetric') else 'asym'} {scheme.get('method', '')}"),
                 ("calibration", f"{rep.calibration_samples} x {rep.calibration_seq_len} tokens"),
                 ("device / time", f"{rep.device}, {rep.seconds:.1f} s"),
                 ("matrices / fallbacks", f"{sum(len(x.modules) for x in rep.layers)} / {len(rep.fallbacks)}")]
        tot = [sum(v) for v in zip(*[(e, w) for x in rep.layers for e, w, _ in x.error_by_kind().values()])] or [0, 0]
        rows.append(("relative error, all matrices", _fmt(_rel(*tot) if tot[1] else None, ".4g")))
    if c is not None:
        rows += [("compare text", f"{c.tokens} tokens ({c.windows} x {c.seq_len}) of {c.text or 'token ids'}"),
                 ("KL per token (mean / median / p99 / max)",
                  f"{c.kl_mean:.5f} / {_fmt(c.kl_median, '.5f')} / {_fmt(c.kl_p99, '.4f')} / {c.kl_max:.3f}"),
                 ("top-1 agreement", f"{c.top1_agreement:.4f}"),
                 ("perplexity original / quantized", f"{c.ppl_base:.4f} / {c.ppl_quant:.4f} "
                                                     f"({100 * (c.ppl_quant / c.ppl_base - 1):+.2f}%)")]
        for key, what in (("topk_changed", "top-k set changed"), ("layer_error", "layer output error")):
            w = c.worst_layer(key)
            if w is not None:
                rows.append((f"worst layer, {what}", f"layer {w.index}: {getattr(w, key):.4g}"))
    return rows


def _budget_grid(budget: dict):
    from ..pipeline.report import budget_grid

    return budget_grid(budget)


def _budget_rows(b: dict) -> list:
    target = f"{b['target']['bits']:g} bits per weight" if "bits" in b["target"] else f"{b['target']['size_gb']:g} GB"
    kinds: dict = {}
    for u in b["units"]:
        k = kinds.setdefault(u["kind"], [0.0, 0])
        k[0] += u["bits"] * u["params"]
        k[1] += u["params"]
    return [("target", target),
            ("achieved", f"{b['achieved_bits']:.4f} bits per quantized weight, {b['quantized_params']} weights"),
            ("checkpoint (pack-quantized)", f"{b['checkpoint_bytes'] / 1e9:.4g} GB"),
            ("candidates", ", ".join(b["candidates"])),
            ("units", f"{len(b['units'])} (routed experts per {b['experts']}; weight: {b['expert_weight']})"),
            ("bits per weight by kind", ", ".join(f"{k} {v[0] / v[1]:.3f}" for k, v in kinds.items() if v[1])),
            ("weighted error / lower bound", f"{b['error']:.6g} / {b['lower_bound']:.6g}"
                                             f"{'' if b['exact'] else ' (front thinned)'}"),
            ("measurement pass", f"{b['measure_seconds']:.1f} s, propagating {b['propagation'] or 'the base scheme'}"),
            ("pinned by overrides", str(len(b["pinned"])))]


def _layer_rows(run: Run) -> tuple[list, list]:
    from ..pipeline.report import MODULE_KINDS

    rep, c = run.report, run.compare
    by = {x.index: x for x in c.layers} if c is not None else {}
    kinds = [k for k in MODULE_KINDS if rep is not None and any(k in x.error_by_kind() for x in rep.layers)]
    headers = ["layer"]
    if rep is not None:
        headers += ["matrices", "fallbacks", "tokens min / median / max"] + [f"rel. error {k}" for k in kinds]
    if c is not None:
        headers += ["hidden drift", "layer error", "top-k changed", "top-1 flip"]
    indices = [x.index for x in rep.layers] if rep is not None else list(by)
    recs = {x.index: x for x in rep.layers} if rep is not None else {}
    rows = []
    for i in indices:
        row = [i]
        if rep is not None:
            x = recs[i]
            t = x.expert_tokens
            ek = x.error_by_kind()
            row += [len(x.modules), sum(1 for m in x.modules if m.fallback),
                    f"{min(t)} / {int(statistics.median(t))} / {max(t)}" if t else "–"]
            row += [_fmt(_rel(ek[k][0], ek[k][1]) if k in ek else None, ".4g") for k in kinds]
        if c is not None:
            d = by.get(i)
            row += [_fmt(getattr(d, k, None), ".4g") for k in ("hidden_drift", "layer_error", "topk_changed",
                                                                "top1_flip")]
        rows.append(row)
    return headers, rows


def render_html(run: Run) -> str:
    """The self-contained HTML page of a run (figures need matplotlib: ImportError with the install command)."""
    from . import figures

    figures.require_matplotlib()
    rep, c = run.report, run.compare
    title = f"moequant report: {run.dir.name}"
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           "<h2>Summary</h2>", _table(["", "value"], _summary_rows(run), left=2)]
    headers, rows = _layer_rows(run)
    out += ["<h2>Per layer</h2>", _table(headers, rows)]
    if rep is not None:
        worst = _worst_experts(rep, 10)
        if worst:
            out += ["<h2>Experts that lose most</h2>",
                    _table(["layer", "expert", "relative error", "calibration tokens", "fallback"],
                           [(li, e, f"{r:.4g}", t, "yes" if fb else "") for li, e, r, t, fb in worst], left=0)]
        out += ["<h2>Calibration</h2>",
                _figure(figures.utilization(rep), "Tokens routed to each expert during calibration, relative to a "
                        "uniform share, log scale (red: rare, blue: busy, grey: none; x: the expert's Hessian came "
                        "from the fallback policy)."),
                _figure(figures.layer_errors(rep), "Relative error tr(dW H dW^T) / tr(W H W^T) summed per layer and "
                        "module kind, with H the normalised calibration Hessian and dW the stored weight's error."),
                _figure(figures.expert_errors(rep), "Each routed expert's relative error against the calibration "
                        "tokens it saw: rarely used experts sit on the left.")]
    if rep is not None and rep.budget:
        out += ["<h2>Budget allocation</h2>", _table(["", "value"], _budget_rows(rep.budget), left=2)]
        columns, grid = _budget_grid(rep.budget)
        out += [_table(["layer"] + columns, [[i] + [grid[i].get(col, ("–", 0.0))[0] for col in columns]
                                             for i in sorted(grid)]),
                _figure(figures.budget_allocation(rep), "Scheme chosen for each layer and module group under the "
                        "budget, coloured by its bits per weight (scales and zero points included). Each unit's "
                        "candidates were solved in a measurement pass and scored by tr(dW H dW^T) times its "
                        "calibration tokens (routed experts: routing mass); the allocation minimises their sum.")]
    if c is not None:
        out += ["<h2>Compared with the original model</h2>",
                _figure(figures.kl_histogram(c), "Distribution of the per-token KL divergence of the quantized "
                        "model's next-token distribution from the original's."),
                _figure(figures.routing_drift(c), "Routing drift per MoE layer and hidden-state errors per layer "
                        "(definitions: moequant.eval.compare)."),
                _figure(figures.load_change(c), "Change of each expert's share of the routed tokens.")]
    out += ["<h2>Text</h2>", f"<pre>{html.escape(render_text(run))}</pre>", "</body></html>"]
    return "\n".join(out)
