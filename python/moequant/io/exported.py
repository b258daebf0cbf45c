"""Reading back a compressed-tensors checkpoint moequant wrote, without transformers' quantization loader.

:class:`ExportedCheckpoint` presents an exported checkpoint in its *source view*: the tensor names and layout of
the original model's checkpoint, with every quantized module dequantized (in each compressed-tensors format of
:mod:`moequant.formats.tensors`: exactly what a loader reconstructs) and the routed-expert layouts of
:mod:`moequant.io.expert_layout` undone (per-expert modules of GPT-OSS / GraniteMoE fused again; high-precision
experts written in transformers' fused layout split per expert). :func:`load_model` builds the full model from
it through :class:`moequant.models.LazyModel`, so it reads what transformers cannot (asymmetric schemes,
different expert schemes per layer, the quantized experts of GPT-OSS and GraniteMoE). ``moequant eval`` uses it
for such checkpoints (``--loader``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

import torch

from ..formats import COMPANIONS, config_groups, decompress, group_of
from ..models import MoEFamily, detect_family, split_expert_tensors
from ..models.base import ExpertTensors, fuse_experts
from .expert_layout import fused_disk_names
from .safetensors import CheckpointReader

__all__ = ["ExportedCheckpoint", "load_model", "checkpoint_schemes", "checkpoint_groups", "fused_expert_layers"]

def checkpoint_groups(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(config.json, {quantized module name: its :class:`~moequant.formats.ConfigGroup`}) of a checkpoint directory
    (a quantized module: one with a ``weight_scale``)."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    groups = config_groups(qcfg) if qcfg else []
    with CheckpointReader(directory) as src:
        modules = [n[: -len(".weight_scale")] for n in src.names() if n.endswith(".weight_scale")]
    out = {}
    for m in modules:
        group = group_of(m, groups)
        if group is None:
            raise ValueError(f"{directory}: no quantization_config group covers the quantized module {m!r}")
        out[m] = group
    return config, out


def checkpoint_schemes(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(config.json, {quantized module name: its :class:`~moequant.io.compat.ModuleScheme`}) of a checkpoint
    directory: the weight format, the input activations and the matrix shape, what
    :func:`moequant.io.compat.loader_support` decides from."""
    from .compat import ModuleScheme

    config, groups = checkpoint_groups(directory)
    out = {}
    with CheckpointReader(directory) as src:
        for m, g in groups.items():
            if f"{m}.weight_shape" in src:
                shape = tuple(int(v) for v in src.get(f"{m}.weight_shape").tolist())
            elif f"{m}.weight_packed" in src:  # FP4: two codes a byte
                rows, cols = src.shape(f"{m}.weight_packed")
                shape = (rows, 2 * cols)
            else:
                shape = tuple(src.shape(f"{m}.weight"))
            out[m] = ModuleScheme(g.format, g.activations, shape)
    return config, out


def fused_expert_layers(directory: str | os.PathLike, family: MoEFamily) -> list[str]:
    """MoE layers (``"model.layers.0.mlp.experts"``) whose high-precision experts a checkpoint stores in
    transformers' fused layout (for a family that stores experts per expert)."""
    if family.disk_fused:
        return []
    with CheckpointReader(directory) as src:
        return [n[: -len(".gate_up_proj")] for n in src.names() if n.endswith(f".{family.experts}.gate_up_proj")]


class ExportedCheckpoint:
    """Lazy reader of an exported checkpoint in its source view (see the module docstring): ``names()``,
    ``in``, ``get(name)``; the interface of :class:`moequant.io.safetensors.CheckpointReader`."""

    def __init__(self, directory: str | os.PathLike, family: Optional[MoEFamily] = None):
        self.dir = Path(directory)
        config, self.groups = checkpoint_groups(self.dir)
        self.schemes = {m: g.format for m, g in self.groups.items()}
        if family is None:
            import transformers

            family = detect_family(transformers.AutoConfig.from_pretrained(self.dir))
        self.family = family
        self.src = CheckpointReader(self.dir)
        self._view: dict[str, Callable[[], torch.Tensor]] = {}
        names = self.src.names()
        for n in names:
            prefix, _, leaf = n.rpartition(".")
            if leaf in COMPANIONS:
                continue
            self._view[n] = (lambda n=n: self.src.get(n))
        for m in self.schemes:
            self._view[f"{m}.weight"] = (lambda m=m: self.dequantized(m))
        if family.disk_fused:
            self._fuse_per_expert_modules()
        else:
            self._split_fused_layers(names)

    # ------------------------------------------------------------------ reader interface
    def names(self) -> list[str]:
        return list(self._view)

    def __contains__(self, name: str) -> bool:
        return name in self._view

    def get(self, name: str) -> torch.Tensor:
        try:
            thunk = self._view[name]
        except KeyError:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}") from None
        return thunk()

    # ------------------------------------------------------------------ dequantization
    def dequantized(self, module: str) -> torch.Tensor:
        """``module``'s weight as a loader reconstructs it from the tensors of its compressed-tensors format
        (:func:`moequant.formats.decompress`: integers ``(codes - zero) * scale`` rounded to the scale dtype, FP8
        ``code * scale`` in it, FP4 in bfloat16)."""
        g = self.groups[module]
        return decompress(self.src.get, module, g.format, g.compression)

    def input_activations(self, module: str):
        """``(ActivationFormat or None, input_global_scale or None)`` of a quantized module: what a runtime does to
        its input (``moequant eval`` simulates it: :class:`moequant.eval.simulate.SimulationPlan`)."""
        g = self.groups[module]
        name = f"{module}.input_global_scale"
        return g.activations, (self.src.get(name) if name in self.src else None)

    # ------------------------------------------------------------------ expert layouts
    def _fuse_per_expert_modules(self) -> None:
        """GPT-OSS / GraniteMoE: quantized experts were written per expert; the source view has the fused tensors."""
        fam = self.family
        g, u, d = (re.escape(p) for p in fam.disk_proj_names)
        pat = re.compile(rf"^(.*)\.{re.escape(fam.disk_experts)}\.(\d+)\.({g}|{u}|{d})\.(weight|bias)$")
        layers: dict[str, set] = {}
        for n in list(self._view):
            m = pat.match(n)
            if m:
                layers.setdefault(m.group(1), set()).add(int(m.group(2)))
        for prefix, experts in layers.items():
            count = max(experts) + 1
            per = [fam.disk_expert_names(prefix, e) for e in range(count)]
            names = [f"{p[k]}.{leaf}" for p in per for k in ("gate", "up", "down") for leaf in ("weight", "bias")]
            present = [n for n in names if n in self._view]
            thunks = {n: self._view.pop(n) for n in present}
            fused = self._fused_names(prefix)

            def build(thunks=thunks, per=per):
                mats = []
                for p in per:
                    get = (lambda n: thunks[n]() if n in thunks else None)
                    mats.append(ExpertTensors(get(p["gate"] + ".weight"), get(p["up"] + ".weight"),
                                              get(p["down"] + ".weight"), get(p["gate"] + ".bias"),
                                              get(p["up"] + ".bias"), get(p["down"] + ".bias")))
                return fuse_experts(self.family, mats)

            cache: dict = {}
            for leaf, name in fused.items():
                self._view[name] = (lambda leaf=leaf, build=build, cache=cache:
                                    (cache.setdefault("t", build()))[leaf])

    def _fused_names(self, prefix: str) -> dict:
        fam = self.family
        out = fused_disk_names(fam, prefix)
        if not fam.has_bias:
            out = {k: v for k, v in out.items() if not k.endswith("_bias")}
        return out

    def _split_fused_layers(self, names: list[str]) -> None:
        """High-precision experts written in transformers' fused layout: the source view has per-expert tensors."""
        fam = self.family
        suffix = f".{fam.experts}.gate_up_proj"
        for n in names:
            if not n.endswith(suffix):
                continue
            prefix = n[: -len(suffix)]
            down = f"{prefix}.{fam.experts}.down_proj"
            gate_up = self._view.pop(n)
            down_t = self._view.pop(down)
            cache: dict = {}

            def expert(e: int, gate_up=gate_up, down_t=down_t, cache=cache) -> ExpertTensors:
                if "gu" not in cache:
                    cache["gu"], cache["dn"] = gate_up(), down_t()
                return split_expert_tensors(fam, cache["gu"][e], cache["dn"][e])

            count = int(self.src.shape(n)[0])
            for e in range(count):
                d = fam.disk_expert_names(prefix, e)
                for k in ("gate", "up", "down"):
                    self._view[f"{d[k]}.weight"] = (lambda e=e, k=k, expert=expert: getattr(expert(e), k).clone())

    def close(self) -> None:
        self.src.close()


def load_model(directory: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu") -> torch.nn.Module:
    """The full causal LM of an exported checkpoint with dequantized weights (see the module docstring), in
    ``dtype`` on ``device``, in eval mode."""
    from ..models.lazy import LazyModel

    reader = ExportedCheckpoint(directory)
    lazy = LazyModel(directory, dtype=dtype, reader=reader)
    for i in range(lazy.num_layers):
        lazy.layers[i] = lazy.load_layer(i, device)
    model = lazy.model.to(device).eval()
    model.config.__dict__.pop("quantization_config", None)
    reader.close()
    return model
