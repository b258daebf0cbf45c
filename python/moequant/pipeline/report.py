"""What a quantization run did, per layer and per module: saved as JSON next to every output."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional


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


@dataclasses.dataclass
class LayerRecord:
    index: int
    prefix: str
    seconds: float
    moe: bool
    expert_tokens: list = dataclasses.field(default_factory=list)  # routed rows per expert
    expert_mass: list = dataclasses.field(default_factory=list)    # routing-weight mass per expert
    modules: list = dataclasses.field(default_factory=list)        # ModuleRecord
    phases: dict = dataclasses.field(default_factory=dict)         # seconds per step (load, forwards, solves, ...)
    groups: Optional[str] = None                                   # how the experts went through the device

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerRecord":
        d = dict(d)
        d["modules"] = [ModuleRecord(**m) for m in d.get("modules", [])]
        return cls(**d)


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

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
            lines.append(f"  layer {layer.index:3d}: {len(layer.modules)} matrices,{util} fallbacks {fb}, "
                         f"{loss}, {layer.seconds:.1f} s")
        lines.append(f"  total {self.seconds:.1f} s" + (f"; output {self.output_dir} ({self.export_format})"
                                                        if self.output_dir else ""))
        for s in self.loaders:
            how = "" if s.get("tested", True) else " (from its source, untested)"
            state = "loads" if s["loads"] else "does NOT load"
            lines.append(f"  {s['loader']}{how}: {state}" + (f" ({'; '.join(s['reasons'])})" if s["reasons"] else ""))
        return "\n".join(lines)

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
