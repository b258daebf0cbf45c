"""Which loaders read a checkpoint moequant writes, decided from its plan before the run (and from a written
checkpoint's ``quantization_config`` by ``moequant eval``).

transformers (5.23 with compressed-tensors 0.20, on the CPU; every rule is exercised by
tests/python/trust/test_loadable.py and test_loadable_formats.py):
    - asymmetric modules do not load: its compressed-tensors layer expects unpacked zero points (size mismatch)
      and its MoE dequantizer passes none ("Asymmetric quant requires zero-point values");
    - it dequantizes the routed experts of every MoE layer with ONE scheme: quantized expert layers with
      different schemes would load wrong weights without an error;
    - it has no loader for per-expert compressed-tensors modules of families that store their experts fused
      (GPT-OSS, GraniteMoE): their quantized experts would be left randomly initialised;
    - NVFP4 routed experts are dequantized without their global scale (transformers issue #48371): the expert
      weights come out multiplied by it (~1e3 .. 1e5), silently;
    - int8 W8A8 (``int-quantized``) routed experts do not load: its MoE dequantizer looks for ``weight_packed``
      ("torch.cat(): expected a non-empty list of Tensors");
    - FP8_BLOCK routed experts larger than one 128 x 128 block do not load: it multiplies the FP8 weight by the
      block scales without expanding them ("The size of tensor a (384) must match the size of tensor b (3)");
    - MXFP8 routed experts do not load: the same FP8 path multiplies the weight by the E8M0 scale bytes, neither
      decoded nor expanded ("The size of tensor a (128) must match the size of tensor b (4)");
    - dense Linears of the W8A8 / W4A4 schemes (FP8, FP8_BLOCK, W8A8, NVFP4, MXFP4) load, and compressed-tensors
      fake-quantizes their inputs as the config says on every forward (the routed experts, dequantized into
      transformers' fused modules, compute on unquantized inputs): the logits are not those of the weights alone.
    MXFP4 / MXFP4A16 / MXFP6A16, FP8 and FP8_BLOCK experts within one block, and every dense Linear of every scheme
    load bit-exactly (the tests compare the weights after compressed-tensors' decompression with moequant's).
vLLM (read from its source, not run here: no vLLM on our machines):
    - integer weight-only kernels take 4 or 8 bits;
    - routed experts are read per expert: a MoE layer whose experts stay in high precision is written in
      transformers' fused layout (:mod:`moequant.io.expert_layout`), which vLLM's per-expert loaders do not read;
    - asymmetric MoE layers need a vLLM with PR #44025;
    - it has MoE methods for every scheme (``compressed_tensors_moe.py``: MXFP4, NVFP4 A4 / A16, FP8 W8A8
      channel / block, int8 W8A8, WNA16); NVFP4 W4A4 Linears run W4A4 only where CUTLASS FP4 exists (Blackwell),
      else as W4A16 (its ``_get_scheme_from_parts``); MXFP4 dense Linears need a vLLM with the MXFP4 Linear schemes
      (``compressed_tensors_w4a4_mxfp4.py`` / ``w4a16_mxfp4.py``);
    - MXFP8 W8A8 (``mxfp8-quantized`` weights with MXFP8 activations): vLLM PR #38815 (``CompressedTensorsW8A8Mxfp8``,
      dense and MoE layers; its description, not its source, was read); MXFP6 weights and weight-only MXFP8: no
      vLLM scheme for them is known here, so the statement says they do not load (not checked).
A ``"dequantized"`` export is a plain checkpoint: every loader reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from ..formats import ActivationFormat, FloatFormat, IntFormat
from .export import EXPERT_MODULE_RE

__all__ = ["LoaderSupport", "ModuleScheme", "loader_support", "describe"]


@dataclass(frozen=True)
class LoaderSupport:
    """Whether ``loader`` reads the checkpoint, why not (or what it needs), and whether moequant's tests check it."""

    loader: str
    loads: bool
    reasons: tuple = ()
    tested: bool = True

    def to_dict(self) -> dict:
        return {"loader": self.loader, "loads": self.loads, "reasons": list(self.reasons), "tested": self.tested}


@dataclass(frozen=True)
class ModuleScheme:
    """What the loaders need to know of one quantized matrix: its weight format, its input activations (None:
    weight-only) and its shape ``(out, in)`` (None: unknown)."""

    format: Any
    activations: Optional[ActivationFormat] = None
    shape: Optional[tuple] = None

    @classmethod
    def of(cls, obj: Any, shape: Optional[tuple] = None) -> "ModuleScheme":
        """``obj`` itself, a weight format, or anything with ``format`` (and ``activations``): a
        :class:`~moequant.recipe.QuantScheme`, a :class:`~moequant.formats.ConfigGroup`."""
        if isinstance(obj, ModuleScheme):
            return obj
        if isinstance(obj, (IntFormat, FloatFormat)):
            return cls(obj, None, shape)
        return cls(obj.format, getattr(obj, "activations", None), shape)


def _kind(m: ModuleScheme) -> str:
    return getattr(m.format, "kind", "int")


def _transformers(family, quantized: dict, experts: dict) -> tuple[list, list]:
    """(reasons it does not load, notes) of transformers (module docstring)."""
    tf: list[str] = []
    asym = sorted(n for n, m in quantized.items() if not m.format.symmetric)
    if asym:
        tf.append(f"asymmetric modules ({len(asym)}, e.g. {asym[0]}): transformers' compressed-tensors loader "
                  "cannot read zero points; use symmetric schemes")
    distinct = sorted({m.format for ms in experts.values() for m in ms.values()}, key=lambda f: f.label())
    if len(distinct) > 1:
        tf.append("the routed experts of different MoE layers use different schemes "
                  f"({', '.join(f.label() for f in distinct)}): transformers dequantizes every layer's experts "
                  "with one scheme and would load wrong weights")
    if family.disk_fused and experts:
        tf.append(f"transformers has no loader for the per-expert compressed-tensors modules of {family.name} "
                  "(it stores its experts fused) and would leave the quantized experts randomly initialised")
    routed = {n: m for ms in experts.values() for n, m in ms.items()}
    nv = sorted(n for n, m in routed.items() if _kind(m) == "nvfp4")
    if nv:
        tf.append(f"NVFP4 routed experts (e.g. {nv[0]}): transformers 5.23 dequantizes them without their global "
                  "scale (transformers issue #48371) and would load wrong weights; use MXFP4 for the experts or "
                  "moequant's loader (moequant eval)")
    i8 = sorted(n for n, m in routed.items() if isinstance(m.format, IntFormat) and m.activations is not None)
    if i8:
        tf.append(f"int8 W8A8 routed experts (e.g. {i8[0]}): transformers 5.23 has no loader for int-quantized "
                  "experts (loading fails)")
    big = sorted(n for n, m in routed.items() if _kind(m) == "fp8_block" and (m.shape is None or max(m.shape) > 128))
    if big:
        tf.append(f"FP8_BLOCK routed experts larger than one 128x128 block (e.g. {big[0]}): transformers 5.23 "
                  "multiplies them by their block scales without expanding them (loading fails)")
    mx8 = sorted(n for n, m in routed.items() if _kind(m) == "mxfp8")
    if mx8:
        tf.append(f"MXFP8 routed experts (e.g. {mx8[0]}): transformers 5.23 multiplies their FP8 weights by the E8M0 "
                  "scale bytes without decoding or expanding them (loading fails); use MXFP6A16 or MXFP4A16 for the "
                  "experts, or moequant's loader (moequant eval)")
    notes = []
    acts = sorted({m.activations.label() for n, m in quantized.items() if m.activations is not None and n not in
                   routed})
    if acts and not tf:
        notes.append(f"compressed-tensors fake-quantizes the inputs of the dense Linears ({', '.join(acts)}) on "
                     "every forward, the routed experts compute on unquantized inputs")
    return tf, notes


def _vllm(quantized: dict, experts: dict, fused_expert_layers: Sequence[str]) -> tuple[list, list]:
    """(reasons it does not load, notes) of vLLM, from its source (module docstring)."""
    vl: list[str] = []
    bits = sorted({m.format.bits for m in quantized.values() if isinstance(m.format, IntFormat)} - {4, 8})
    if bits:
        vl.append(f"{'/'.join(map(str, bits))}-bit weights: vLLM's integer weight-only kernels take 4 or 8 bits")
    if fused_expert_layers:
        vl.append(f"the high-precision experts of {len(fused_expert_layers)} MoE layer(s) (e.g. "
                  f"{fused_expert_layers[0]}) are written in transformers' fused layout, which vLLM's per-expert "
                  "loaders do not read; quantize every MoE layer's experts to serve with vLLM")
    notes = []
    routed = {n for ms in experts.values() for n in ms}
    if any(not m.format.symmetric for ms in experts.values() for m in ms.values()):
        notes.append("asymmetric MoE layers need a vLLM with PR #44025")
    if any(m.activations is not None and m.activations.kind == "nvfp4" for m in quantized.values()):
        notes.append("NVFP4 W4A4 Linears run W4A4 on GPUs with CUTLASS FP4 (Blackwell), else as W4A16")
    if any(_kind(m) == "mxfp4" for n, m in quantized.items() if n not in routed):
        notes.append("MXFP4 dense Linears need a vLLM with the compressed-tensors MXFP4 Linear schemes")
    unknown = sorted(n for n, m in quantized.items()
                     if _kind(m) == "mxfp6" or (_kind(m) == "mxfp8" and m.activations is None))
    if unknown:
        vl.append(f"MXFP6 / weight-only MXFP8 weights (e.g. {unknown[0]}): no vLLM compressed-tensors scheme for them "
                  "is known to moequant (not checked); MXFP8 W8A8 (preset MXFP8) is")
    if any(_kind(m) == "mxfp8" and m.activations is not None for m in quantized.values()):
        notes.append("MXFP8 W8A8 needs a vLLM with PR #38815 (CompressedTensorsW8A8Mxfp8)")
    return vl, notes


def loader_support(family, schemes: Mapping[str, Any], export_format: str = "pack-quantized",
                   fused_expert_layers: Sequence[str] = ()) -> list[LoaderSupport]:
    """transformers' and vLLM's support for a checkpoint.

    Args:
        family: the model's :class:`moequant.models.MoEFamily`.
        schemes: every quantized matrix by on-disk name -> its :class:`ModuleScheme`, or a weight format (an
            :class:`~moequant.formats.IntFormat` / :class:`~moequant.formats.FloatFormat`, weight-only), or a
            scheme with ``format`` and ``activations``; high-precision matrices may be left out or map to None.
        export_format: ``"pack-quantized"`` or ``"dequantized"``.
        fused_expert_layers: MoE layers (``"model.layers.0.mlp.experts"``) whose high-precision experts are
            written in transformers' fused layout.
    """
    if export_format == "dequantized":
        return [LoaderSupport("transformers", True), LoaderSupport("vllm", True, tested=False)]
    quantized = {n: ModuleScheme.of(k) for n, k in schemes.items() if k is not None}
    experts: dict[str, dict] = {}
    for name, m in quantized.items():
        match = EXPERT_MODULE_RE.match(name)
        if match:
            experts.setdefault(match.group(1), {})[name] = m
    tf, tf_notes = _transformers(family, quantized, experts)
    vl, vl_notes = _vllm(quantized, experts, fused_expert_layers)
    return [LoaderSupport("transformers", not tf, tuple(tf or tf_notes)),
            LoaderSupport("vllm", not vl, tuple(vl or vl_notes), tested=False)]


def describe(support: Sequence[LoaderSupport]) -> str:
    """One line per loader, e.g. ``"transformers: loads"`` / ``"vllm: does not load (...)"``."""
    lines = []
    for s in support:
        how = "" if s.tested else " (by its source, untested)"
        state = "loads" if s.loads else "does not load"
        lines.append(f"{s.loader}: {state}{how}" + (f": {'; '.join(s.reasons)}" if s.reasons else ""))
    return "\n".join(lines)
