"""Which loaders read a checkpoint moequant writes, decided from its plan before the run (and from a written
checkpoint's ``quantization_config`` by ``moequant eval``).

transformers (5.23 with compressed-tensors 0.20; every rule is exercised by tests/python/trust/test_loadable.py):
    - asymmetric modules do not load: its compressed-tensors layer expects unpacked zero points (size mismatch)
      and its MoE dequantizer passes none ("Asymmetric quant requires zero-point values");
    - it dequantizes the routed experts of every MoE layer with ONE scheme: quantized expert layers with
      different schemes would load wrong weights without an error;
    - it has no loader for per-expert compressed-tensors modules of families that store their experts fused
      (GPT-OSS, GraniteMoE): their quantized experts would be left randomly initialised.
vLLM (read from its source, not run here: no vLLM on our machines):
    - integer weight-only kernels take 4 or 8 bits;
    - routed experts are read per expert: a MoE layer whose experts stay in high precision is written in
      transformers' fused layout (:mod:`moequant.io.expert_layout`), which vLLM's per-expert loaders do not read;
    - asymmetric MoE layers need a vLLM with PR #44025.
A ``"dequantized"`` export is a plain checkpoint: every loader reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from ..formats import IntFormat
from .export import EXPERT_MODULE_RE

__all__ = ["LoaderSupport", "loader_support", "describe"]


@dataclass(frozen=True)
class LoaderSupport:
    """Whether ``loader`` reads the checkpoint, why not (or what it needs), and whether moequant's tests check it."""

    loader: str
    loads: bool
    reasons: tuple = ()
    tested: bool = True

    def to_dict(self) -> dict:
        return {"loader": self.loader, "loads": self.loads, "reasons": list(self.reasons), "tested": self.tested}


def loader_support(family, schemes: Mapping[str, Optional[IntFormat]], export_format: str = "pack-quantized",
                   fused_expert_layers: Sequence[str] = ()) -> list[LoaderSupport]:
    """transformers' and vLLM's support for a checkpoint.

    Args:
        family: the model's :class:`moequant.models.MoEFamily`.
        schemes: every quantized matrix by on-disk name -> its :class:`~moequant.formats.IntFormat` (high-precision
            matrices may be left out or map to None).
        export_format: ``"pack-quantized"`` or ``"dequantized"``.
        fused_expert_layers: MoE layers (``"model.layers.0.mlp.experts"``) whose high-precision experts are
            written in transformers' fused layout.
    """
    if export_format == "dequantized":
        return [LoaderSupport("transformers", True), LoaderSupport("vllm", True, tested=False)]
    quantized = {n: k for n, k in schemes.items() if k is not None}
    experts: dict[str, set] = {}
    for name, key in quantized.items():
        m = EXPERT_MODULE_RE.match(name)
        if m:
            experts.setdefault(m.group(1), set()).add(key)
    asym = sorted(n for n, k in quantized.items() if not k.symmetric)
    tf: list[str] = []
    if asym:
        tf.append(f"asymmetric modules ({len(asym)}, e.g. {asym[0]}): transformers' compressed-tensors loader "
                  "cannot read zero points; use symmetric schemes")
    distinct = sorted({k for ks in experts.values() for k in ks}, key=lambda k: k.key)
    if len(distinct) > 1:
        tf.append("the routed experts of different MoE layers use different schemes "
                  f"({', '.join(k.label() for k in distinct)}): transformers dequantizes every layer's experts "
                  "with one scheme and would load wrong weights")
    if family.disk_fused and experts:
        tf.append(f"transformers has no loader for the per-expert compressed-tensors modules of {family.name} "
                  "(it stores its experts fused) and would leave the quantized experts randomly initialised")
    vl: list[str] = []
    bits = sorted({k.bits for k in quantized.values()} - {4, 8})
    if bits:
        vl.append(f"{'/'.join(map(str, bits))}-bit weights: vLLM's integer weight-only kernels take 4 or 8 bits")
    if fused_expert_layers:
        vl.append(f"the high-precision experts of {len(fused_expert_layers)} MoE layer(s) (e.g. "
                  f"{fused_expert_layers[0]}) are written in transformers' fused layout, which vLLM's per-expert "
                  "loaders do not read; quantize every MoE layer's experts to serve with vLLM")
    notes = []
    if any(not k.symmetric for ks in experts.values() for k in ks) and not vl:
        notes.append("asymmetric MoE layers need a vLLM with PR #44025")
    return [LoaderSupport("transformers", not tf, tuple(tf)),
            LoaderSupport("vllm", not vl, tuple(vl or notes), tested=False)]


def describe(support: Sequence[LoaderSupport]) -> str:
    """One line per loader, e.g. ``"transformers: loads"`` / ``"vllm: does not load (...)"``."""
    lines = []
    for s in support:
        how = "" if s.tested else " (by its source, untested)"
        state = "loads" if s.loads else "does not load"
        lines.append(f"{s.loader}: {state}{how}" + (f": {'; '.join(s.reasons)}" if s.reasons else ""))
    return "\n".join(lines)
