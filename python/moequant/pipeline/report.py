"""What a quantization run did, per layer and per module: saved as JSON next to every output."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Optional

MODULE_KINDS = ("attention", "shared", "routed", "dense")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def module_kind(name: str) -> str:
    """``"routed"`` (a routed expert's matrix), ``"shared"`` (a shared expert's), ``"attention"`` or ``"dense"`` (a
    dense MLP's), from a record's on-disk module name."""
    if _EXPERT.search(name):
        return "routed"
    if "shared_expert" in name:
        return "shared"
    return "attention" if re.search(r"attn|attention", name) else "dense"


def expert_of(name: str) -> Optional[int]:
    """The routed expert index in a record's module name, else None."""
    m = _EXPERT.search(name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class ModuleRecord:
    """One quantized matrix (an nn.Linear, or one expert's gate+up solved together, or its down)."""

    name: str                       # on-disk module name (gate+up: the gate name with "+up")
    scheme: str                     # e.g. "W4 g128 asym gptq"
    method: str                     # "gptq" | "rtn"
    tokens: int                     # calibration rows behind its Hessian
    loss: Optional[float] = None    # GPTQ proxy loss tr(dW H dW^T) on the mass-normalised Hessian
    fallback: Optional[str] = None  # None, or the fallback policy used for a starved expert
    escalations: int = 0            # damping escalations of the Cholesky factorisation
    dead_columns: int = 0
    # Calibration statistics (None without a Hessian; error / energy also None with report_loss off), of the
    # normalised Hessian H the solve used (a starved expert's: its fallback's) and W the weight before quantization:
    hessian_trace: Optional[float] = None   # tr(H): the mean squared norm of the inputs
    effective_rank: Optional[float] = None  # tr(H)^2 / ||H||_F^2 (participation ratio of H's eigenvalues)
    error: Optional[float] = None           # tr(dW H dW^T), dW = W - the stored (dequantized) weight
    energy: Optional[float] = None          # tr(W H W^T)
    rel_error: Optional[float] = None       # error / energy


@dataclasses.dataclass
class LayerRecord:
    index: int
    prefix: str
    seconds: float
    moe: bool
    expert_tokens: list = dataclasses.field(default_factory=list)  # routed rows per expert
    expert_mass: list = dataclasses.field(default_factory=list)    # Hessian weight mass per expert (routing-weighted
    #                                                                 runs: the routing mass; else the routed rows)
    modules: list = dataclasses.field(default_factory=list)        # ModuleRecord
    phases: dict = dataclasses.field(default_factory=dict)         # seconds per step (load, forwards, solves, ...)
    groups: Optional[str] = None                                   # how the experts went through the device
    routing_mass: list = dataclasses.field(default_factory=list)   # per expert: sum of its tokens' routing weights

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        d = dict(d)
        d["modules"] = [ModuleRecord(**m) if isinstance(m, dict) else m for m in d.get("modules", [])]
        return cls(**d)

    def error_by_kind(self) -> dict:
        """``{kind: (sum of tr(dW H dW^T), sum of tr(W H W^T), matrices)}`` over the modules with both figures
        (:func:`module_kind`); the relative error of a kind is the ratio of its sums."""
        out: dict = {}
        for m in self.modules:
            if m.error is not None and m.energy is not None:
                e, w, n = out.get(module_kind(m.name), (0.0, 0.0, 0))
                out[module_kind(m.name)] = (e + m.error, w + m.energy, n + 1)
        return out

    def expert_errors(self) -> dict:
        """``{expert: (sum of tr(dW H dW^T), sum of tr(W H W^T), any fallback)}`` over its gate/up/down records."""
        out: dict = {}
        for m in self.modules:
            e = expert_of(m.name)
            if e is None:
                continue
            err, en, fb = out.get(e, (0.0, 0.0, False))
            out[e] = (err + (m.error or 0.0), en + (m.energy or 0.0), fb or bool(m.fallback))
        return out


def budget_grid(budget: dict) -> tuple[list, dict]:
    """The allocation of a report's ``budget`` per layer: ``(columns, {layer: {column: (text, bits)}})``; a column
    per unit label (a unit spanning layers appears in each), the text its scheme (per-expert units: the count of
    each scheme, ``"W2 g64 x10, W3 g128 x6"``) and the bits per weight of that cell (parameter-weighted)."""
    columns: list = []
    cells: dict = {}
    for u in budget["units"]:
        label = u["label"] if u.get("expert") is None else re.sub(r"\.\d+\.", ".*.", u["label"])
        if label not in columns:
            columns.append(label)
        for layer in u["layers"]:
            per = u["params"] / max(len(u["layers"]), 1)
            c = cells.setdefault(layer, {}).setdefault(label, {"schemes": {}, "bits": 0.0, "params": 0.0})
            c["schemes"][u["scheme"]] = c["schemes"].get(u["scheme"], 0) + 1
            c["bits"] += u["bits"] * per
            c["params"] += per
    grid = {}
    for layer, row in cells.items():
        grid[layer] = {}
        for label, c in row.items():
            if sum(c["schemes"].values()) == 1:
                text = next(iter(c["schemes"]))
            else:
                text = ", ".join(f"{k} x{n}" for k, n in sorted(c["schemes"].items()))
            grid[layer][label] = (text, c["bits"] / c["params"] if c["params"] else 0.0)
    return columns, grid


@dataclasses.dataclass
class QuantizationReport:
    """The result of :func:`moequant.quantize`: per-layer records plus run facts."""

    model: str
    family: str
    recipe: dict
    device: str
    calibration_samples: int
    calibration_seq_len: int
    layers: list = dataclasses.field(default_factory=list)  # LayerRecord
    output_dir: Optional[str] = None
    export_format: Optional[str] = None
    seconds: float = 0.0
    resumed_from_layer: Optional[int] = None
    hessian_precision: str = "fp32"  # the resolved Hessian update precision ("fp32", "tf32", "bf16")
    loaders: list = dataclasses.field(default_factory=list)  # moequant.compat.LoaderSupport.to_dict() per loader
    source_format: Optional[dict] = None  # an FP8 / MXFP4 source decoded on load (io.source.SourceFormat.to_dict())
    budget: Optional[dict] = None  # budgeted mixed precision: the allocation (pipeline.budget.budget_record)
    quantization_format: Optional[str] = None  # the checkpoint's compressed-tensors format ("mixed-precision", ...)
    hidden_states: Optional[dict] = None  # where the calibration hidden states lived (hostmem.StatesPlan.to_dict())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantizationReport":
        """A saved report (``moequant_report.json``); ValueError naming the file when it is not one."""
        try:
            d = json.loads(open(path).read())
            names = {f.name for f in dataclasses.fields(cls)}
            d = {k: v for k, v in d.items() if k in names}
            d["layers"] = [LayerRecord.from_dict(x) for x in d.get("layers", [])]
            return cls(**d)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: not a moequant report ({type(exc).__name__}: {exc}); it is written by "
                             f"moequant quantize") from None

    @property
    def fallbacks(self) -> list:
        return [(layer.index, m.name, m.fallback) for layer in self.layers for m in layer.modules if m.fallback]

    def summary(self) -> str:
        """A short human-readable summary: one line per layer, then totals."""
        source = f" (source {self.source_format['quant_method']}, decoded to bf16 on load)" if self.source_format \
            else ""
        lines = [f"moequant: {self.family} model {self.model}{source}, {len(self.layers)} layers on {self.device}, "
                 f"calibration {self.calibration_samples} x {self.calibration_seq_len} tokens"]
        for layer in self.layers:
            losses = [m.loss for m in layer.modules if m.loss is not None and math.isfinite(m.loss)]
            tok = layer.expert_tokens
            util = ""
            if tok:
                starved = sum(1 for t in tok if t == 0)
                util = f" experts: min/median/max tokens {min(tok)}/{sorted(tok)[len(tok) // 2]}/{max(tok)}" \
                       f", {starved} with none,"
            fb = sum(1 for m in layer.modules if m.fallback)
            if losses:
                loss = f"mean GPTQ loss {sum(losses) / len(losses):.4g}"
            elif not self.recipe.get("report_loss", True):
                loss = "GPTQ loss not reported"
            elif any(m.loss is not None for m in layer.modules):
                loss = "GPTQ loss not finite"
            else:
                loss = "no GPTQ loss (no GPTQ-solved matrix)"
            kinds = layer.error_by_kind()
            rel = ", ".join(f"{k} {e / w:.3g}" for k, (e, w, _) in sorted(kinds.items(), key=lambda kv:
                                                                           MODULE_KINDS.index(kv[0])) if w > 0)
            lines.append(f"  layer {layer.index:3d}: {len(layer.modules)} matrices,{util} fallbacks {fb}, "
                         f"{loss}" + (f", relative error {rel}" if rel else "") + f", {layer.seconds:.1f} s")
        fmt = self.export_format if self.export_format == "dequantized" or not self.quantization_format else \
            f"compressed-tensors {self.quantization_format}"
        lines.append(f"  total {self.seconds:.1f} s" + (f"; output {self.output_dir} ({fmt})" if self.output_dir
                                                        else ""))
        if self.budget:
            b = self.budget
            target = f"{b['target']['bits']:g} bits per weight" if "bits" in b["target"] else \
                f"{b['target']['size_gb']:g} GB"
            lines.append(f"  budget {target}: {b['achieved_bits']:.4f} bits per quantized weight (scales included), "
                         f"pack-quantized checkpoint {b['checkpoint_bytes'] / 1e9:.4g} GB; {len(b['units'])} units "
                         f"(experts per {b['experts']}), weighted error {b['error']:.6g} (lower bound "
                         f"{b['lower_bound']:.6g}{'' if b['exact'] else ', front thinned'}), measured in "
                         f"{b['measure_seconds']:.1f} s")
        for s in self.loaders:
            how = "" if s.get("tested", True) else " (from its source, untested)"
            state = "loads" if s["loads"] else "does NOT load"
            lines.append(f"  {s['loader']}{how}: {state}" + (f" ({'; '.join(s['reasons'])})" if s["reasons"] else ""))
        return "\n".join(lines)

    def budget_table(self) -> str:
        """The budget's allocation as text: one row per layer, one column per unit label (:func:`budget_grid`)."""
        if not self.budget:
            return ""
        columns, grid = budget_grid(self.budget)
        rows = [["layer"] + columns] + [[str(i)] + [grid[i].get(c, ("", 0.0))[0] for c in columns]
                                        for i in sorted(grid)]
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        text = ["allocation (scheme per layer and module group; bits include the scales):"]
        text += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(text)

    def utilization_table(self) -> str:
        """Tokens per expert per layer as a text heat map (rows: layers, columns: experts)."""
        shades = " .:-=+*#%@"
        rows = []
        for layer in self.layers:
            if not layer.expert_tokens:
                continue
            top = max(layer.expert_tokens) or 1
            rows.append(f"L{layer.index:3d} |" + "".join(shades[min(9, int(9 * t / top))]
                                                       for t in layer.expert_tokens) + "|")
        return "\n".join(rows)
