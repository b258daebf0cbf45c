"""PNG figures of a quantization run (matplotlib, the optional ``report`` dependency): expert utilization, errors
by layer and module kind, per-expert error against calibration tokens (from the quantize report), and routing drift,
expert load change and the per-token KL histogram (from a compare result). Each function returns PNG bytes, or None
when the run has no data for the figure. Figures are drawn on their own ``Figure`` (no pyplot state)."""
from __future__ import annotations

import io
import math
from typing import Optional

__all__ = ["require_matplotlib", "utilization", "layer_errors", "expert_errors", "routing_drift", "load_change",
           "kl_histogram", "budget_allocation"]

KIND_COLORS = {"attention": "#4C72B0", "shared": "#55A868", "routed": "#C44E52", "dense": "#8172B2"}


def require_matplotlib():
    """The ``matplotlib`` module; ImportError with the install command when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the HTML report needs matplotlib: pip install 'moequant[report]' (or pip install "
                          "matplotlib)") from None
    return matplotlib


def _figure(w: float, h: float):
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plain_log(ax, axis: str = "y") -> None:
    """Log axis with plain number labels (0.004, 200) instead of 4x10^-3."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    # within about a decade, 1-2-5 would label one tick or none: label every integer multiple instead
    subs = (1.0, 2.0, 5.0) if lo > 0 and hi / lo > 12 else tuple(float(k) for k in range(1, 10))
    a.set_major_locator(LogLocator(base=10, subs=subs))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def _layer_colors(fig, ax, sc, layers: list) -> None:
    """A colour bar with one integer tick per layer (at most 12 labelled)."""
    cb = fig.colorbar(sc, ax=ax, label="layer")
    step = max(1, math.ceil(len(layers) / 12))
    cb.set_ticks(layers[::step])


def _expert_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")


def _layer_ticks(ax, labels: list, axis: str = "x") -> None:
    step = max(1, math.ceil(len(labels) / 24))
    pos = list(range(0, len(labels), step))
    (ax.set_xticks if axis == "x" else ax.set_yticks)(pos, [str(labels[p]) for p in pos])


def utilization(report) -> Optional[bytes]:
    """Heat map, MoE layers x experts: each expert's calibration tokens over the uniform share (1 = its fair share
    of the layer's routed tokens, log colour scale); experts with no token in grey, fallbacks marked x."""
    import numpy as np
    from matplotlib.colors import LogNorm

    layers = [x for x in report.layers if x.expert_tokens]
    if not layers:
        return None
    E = max(len(x.expert_tokens) for x in layers)
    share = np.full((len(layers), E), np.nan)
    for r, x in enumerate(layers):
        total = sum(x.expert_tokens) or 1
        for e, t in enumerate(x.expert_tokens):
            share[r, e] = t * len(x.expert_tokens) / total if t > 0 else np.nan
    fig = _figure(min(14, max(7.5, 4 + E * 0.12)), min(10, max(3.0, 1.8 + 0.32 * len(layers))))
    ax = fig.add_subplot()
    ax.set_facecolor("#BBBBBB")
    finite = share[np.isfinite(share)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.1, 10)
    span = max(hi, 1 / lo, 1.5)
    im = ax.imshow(share, aspect="auto", cmap="RdBu", norm=LogNorm(1 / span, span), interpolation="nearest")
    for r, x in enumerate(layers):
        fb = [e for e, (_, _, f) in x.expert_errors().items() if f]
        if fb:
            ax.scatter(fb, [r] * len(fb), marker="x", color="black", s=40, linewidths=2)
    cb = fig.colorbar(im, ax=ax, label="tokens / uniform share")
    steps = (0.5, 0.7, 1, 1.5, 2) if span <= 2 else (0.1, 0.2, 0.5, 1, 2, 5, 10) if span <= 10 else \
        (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000)
    ticks = [t for t in steps if 1 / span <= t <= span]
    cb.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    cb.minorticks_off()
    _expert_axis(ax)
    _layer_ticks(ax, [x.index for x in layers], "y")
    ax.set_title("Expert utilization in calibration (red: rare, grey: no token, x: fallback)")
    return _png(fig)


def layer_errors(report) -> Optional[bytes]:
    """Bars per layer: relative error sum tr(dW H dW^T) / sum tr(W H W^T) of each module kind."""
    from ..pipeline.report import MODULE_KINDS

    per = [x.error_by_kind() for x in report.layers]
    kinds = [k for k in MODULE_KINDS if any(k in p and p[k][1] > 0 for p in per)]
    if not kinds:
        return None
    fig = _figure(min(14, max(7.5, 4 + 0.45 * len(per) * len(kinds))), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / len(kinds)
    for j, k in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i, p in enumerate(per) if k in p and p[k][1] > 0]
        ys = [p[k][0] / p[k][1] for p in per if k in p and p[k][1] > 0]
        ax.bar(xs, ys, width, label=k, color=KIND_COLORS[k])
    vals = [p[k][0] / p[k][1] for p in per for k in kinds if k in p and p[k][1] > 0 and p[k][0] > 0]
    if vals and max(vals) / min(vals) > 20:
        ax.set_yscale("log")
        _plain_log(ax)
    _layer_ticks(ax, [x.index for x in report.layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("tr(dW H dWᵀ) / tr(W H Wᵀ)")
    ax.set_title("Calibration-time relative error by layer and module kind")
    ax.legend(ncols=len(kinds), fontsize="small")
    ax.grid(axis="y", alpha=0.3, which="both")
    return _png(fig)


def expert_errors(report) -> Optional[bytes]:
    """Scatter: each routed expert's relative error (gate, up, down together) against its calibration tokens,
    coloured by layer; fallbacks as red crosses. Experts with no token sit at the left edge."""
    pts = []
    for x in report.layers:
        for e, (err, en, fb) in x.expert_errors().items():
            if en > 0 and e < len(x.expert_tokens):
                pts.append((x.expert_tokens[e], err / en, x.index, fb))
    if not pts:
        return None
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    ok = [p for p in pts if not p[3]]
    floor = 0.5
    if ok:
        from matplotlib.colors import BoundaryNorm

        layers = sorted({p[2] for p in pts})
        bounds = [v - 0.5 for v in layers] + [layers[-1] + 0.5]
        sc = ax.scatter([max(p[0], floor) for p in ok], [p[1] for p in ok], c=[p[2] for p in ok], cmap="viridis",
                        norm=BoundaryNorm(bounds, 256), s=14, alpha=0.8)
        _layer_colors(fig, ax, sc, layers)
    fb = [p for p in pts if p[3]]
    if fb:
        ax.scatter([max(p[0], floor) for p in fb], [p[1] for p in fb], marker="x", color="red", s=30,
                   label="fallback Hessian")
        ax.legend(fontsize="small")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log(ax, "x")
    _plain_log(ax)
    ax.set_xlabel("calibration tokens routed to the expert (0 plotted at 0.5)")
    ax.set_ylabel("relative error")
    ax.set_title("Per-expert error against tokens seen")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def routing_drift(compare) -> Optional[bytes]:
    """Top: per MoE layer, the fraction of tokens whose top-k set changed and whose top-1 expert flipped. Bottom:
    per layer, the hidden-state drift and the layer's own output error (when measured)."""
    moe = compare.moe_layers
    has_h = any(x.hidden_drift is not None for x in compare.layers)
    if not moe and not has_h:
        return None
    fig = _figure(min(14, max(7.5, 4 + 0.5 * len(compare.layers))), 6.0 if (moe and has_h) else 3.4)
    axes = fig.subplots(2 if (moe and has_h) else 1, 1, squeeze=False)[:, 0]
    if moe:
        ax = axes[0]
        xs = list(range(len(moe)))
        ax.bar([i - 0.2 for i in xs], [x.topk_changed for x in moe], 0.4, label="top-k set changed",
               color="#C44E52")
        ax.bar([i + 0.2 for i in xs], [x.top1_flip for x in moe], 0.4, label="top-1 expert flipped", color="#DD8452")
        _layer_ticks(ax, [x.index for x in moe])
        ax.set_ylabel("fraction of tokens")
        ax.set_xlabel("MoE layer")
        ax.set_title(f"Routing drift, quantized vs original ({compare.tokens} tokens)")
        ax.legend(fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    if has_h:
        ax = axes[-1]
        idx = [x.index for x in compare.layers]
        for key, label, style in (("hidden_drift", "hidden-state drift (accumulated)", "o-"),
                                  ("layer_error", "layer output error (own)", "s--"),
                                  ("update_error", "error / layer update (own)", "^:")):
            vals = [getattr(x, key) for x in compare.layers]
            if any(v is not None for v in vals):
                ax.plot([i for i, v in zip(idx, vals) if v is not None], [v for v in vals if v is not None], style,
                        label=label, markersize=4)
        ax.set_yscale("log")
        _plain_log(ax)
        ax.set_xticks(idx[:: max(1, math.ceil(len(idx) / 24))])
        ax.set_xlabel("layer")
        ax.set_ylabel("relative Frobenius error")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3, which="both")
    return _png(fig)


def load_change(compare) -> Optional[bytes]:
    """Heat map, MoE layers x experts: quantized load minus original load, in percentage points of the routed
    slots."""
    import numpy as np

    moe = [x for x in compare.moe_layers if x.load_base]
    if not moe:
        return None
    E = max(len(x.load_base) for x in moe)
    d = np.zeros((len(moe), E))
    for r, x in enumerate(moe):
        d[r, : len(x.load_base)] = [100 * v for v in x.load_change]
    lim = max(float(np.abs(d).max()), 1e-3)
    fig = _figure(min(14, max(7.5, 4 + E * 0.12)), min(10, max(3.0, 1.8 + 0.32 * len(moe))))
    ax = fig.add_subplot()
    im = ax.imshow(d, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="Δ load (pct. points)")
    _expert_axis(ax)
    _layer_ticks(ax, [x.index for x in moe], "y")
    ax.set_title("Expert load change under quantization (red: more tokens)")
    return _png(fig)


def kl_histogram(compare) -> Optional[bytes]:
    """Histogram of the per-token KL(original || quantized), log-spaced bins."""
    if not compare.kl_hist or not sum(compare.kl_hist):
        return None
    e = compare.kl_hist_edges
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    ax.bar(e[:-1], compare.kl_hist, width=[b - a for a, b in zip(e[:-1], e[1:])], align="edge", color="#4C72B0",
           edgecolor="white")
    ax.set_xscale("log")
    _plain_log(ax, "x")
    ax.axvline(compare.kl_mean, color="#C44E52", linestyle="--", label=f"mean {compare.kl_mean:.3g}")
    ax.set_xlabel("KL(original || quantized) per token, nats (values below 1e-7 in the first bin)")
    ax.set_ylabel("tokens")
    ax.set_title("Per-token KL divergence")
    ax.legend(fontsize="small")
    return _png(fig)


def budget_allocation(report) -> Optional[bytes]:
    """A budgeted run's allocation: heat map, layers x module groups, of the bits per weight each got (scales
    included; the scheme written in the cell); with per-expert units, a second panel of each expert's bits against
    its routing mass (rarely used experts on the left)."""
    import numpy as np

    from ..pipeline.report import budget_grid

    b = getattr(report, "budget", None)
    if not b or not b.get("units"):
        return None
    columns, grid = budget_grid(b)
    layers = sorted(grid)
    per_expert = [u for u in b["units"] if u.get("expert") is not None]
    bits = np.full((len(layers), len(columns)), np.nan)
    for r, i in enumerate(layers):
        for c, label in enumerate(columns):
            if label in grid[i]:
                bits[r, c] = grid[i][label][1]
    fig = _figure(min(14, max(7.5, 3.5 + 2.2 * len(columns) + (4 if per_expert else 0))),
                  min(10, max(3.2, 1.6 + 0.38 * len(layers))))
    ax = fig.add_subplot(1, 2, 1) if per_expert else fig.add_subplot()
    im = ax.imshow(bits, aspect="auto", cmap="viridis", interpolation="nearest")
    for r, i in enumerate(layers):
        for c, label in enumerate(columns):
            if label in grid[i]:
                text = grid[i][label][0] if "," not in grid[i][label][0] else f"{grid[i][label][1]:.2f} avg"
                ax.text(c, r, text, ha="center", va="center", fontsize="x-small",
                        color="white" if bits[r, c] < np.nanmean(bits) else "black")
    ax.set_xticks(range(len(columns)), [c.replace("+", "+\n") for c in columns], fontsize="small")
    _layer_ticks(ax, layers, "y")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label="bits per weight (scales included)")
    target = f"{b['target']['bits']:g} bits" if "bits" in b["target"] else f"{b['target']['size_gb']:g} GB"
    ax.set_title(f"Allocation for {target}: {b['achieved_bits']:.3f} bits per weight")
    if per_expert:
        by = {x.index: x for x in report.layers}
        per: dict = {}  # (layer, expert) -> [bits x params, params]: gate+up and down together
        for u in per_expert:
            acc = per.setdefault((u["layers"][0], u["expert"]), [0.0, 0])
            acc[0] += u["bits"] * u["params"]
            acc[1] += u["params"]
        pts = []
        for (layer, e), (bp, n) in sorted(per.items()):
            x = by.get(layer)
            mass = x.routing_mass if x is not None and x.routing_mass else []
            if e < len(mass) and n:
                pts.append((max(mass[e], 1e-3), bp / n, layer))
        ax2 = fig.add_subplot(1, 2, 2)
        if pts:
            sc = ax2.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", s=14)
            _layer_colors(fig, ax2, sc, sorted({p[2] for p in pts}))
        ax2.set_xscale("log")
        _plain_log(ax2, "x")
        ax2.set_xlabel("routing mass of the expert in calibration")
        ax2.set_ylabel("bits per weight (gate, up and down)")
        ax2.set_title("Per-expert allocation against routing mass")
        ax2.grid(alpha=0.3, which="both")
    return _png(fig)
