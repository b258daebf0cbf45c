"""Allocation units: the groups of matrices that must share one scheme (pure: names and shapes in, units out).

A loader runs some matrices as one kernel and needs them in one scheme (vLLM, read from its source):

* the routed experts of a MoE layer: all experts' gate, up and down (``CompressedTensorsMoEMethod.get_moe_method``
  raises "All MoE projections need to have same quantization scheme"; moequant's preflight enforces it for a
  pack-quantized export);
* q, k and v of one attention (``QKVParallelLinear``), gate and up of one MLP or shared expert
  (``MergedColumnParallelLinear``), DeepSeek's ``q_a_proj`` and ``kv_a_proj_with_mqa`` (``fused_qkv_a_proj``):
  :data:`FUSED_SIBLINGS`;
* transformers 5.23 dequantizes the routed experts of *every* MoE layer with one scheme
  (:mod:`moequant.io.compat`).

:func:`build_units` groups the matrices by those rules; ``experts`` chooses how the routed experts may vary:
``"layer"`` (vLLM's rule, the default), ``"model"`` (one scheme for every layer's experts: transformers' rule),
``"projection"`` (gate+up and down of a layer apart) or ``"expert"`` (every expert's gate+up and down apart); the
last two are for moequant's own loader and dequantized exports only. Gate and up always share a unit (they share
one Hessian and one solve). Each unit carries the override patterns that select exactly its matrices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

__all__ = ["Matrix", "Unit", "build_units", "FUSED_SIBLINGS", "EXPERT_GRANULARITIES", "unit_kind"]

EXPERT_GRANULARITIES = ("layer", "model", "projection", "expert")
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))
DOWN_NAMES = ("down_proj", "w2")  # a routed expert's down projection (Mixtral / PhiMoE / GraniteMoE: w2)
_EXPERT = re.compile(r"^(?P<base>.+\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)$")
_IN_LAYER = re.compile(r"\.layers\.\d+\.(.+)$")


@dataclass(frozen=True)
class Matrix:
    """A quantized matrix: its on-disk name, shape and decoder layer."""

    name: str
    out_features: int
    in_features: int
    layer: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class Unit:
    """Matrices that share one scheme.

    Attributes:
        key: unique name (``"model.layers.3.mlp.experts"``, ``"model.layers.3.self_attn.q_proj+k_proj+v_proj"``).
        label: the name within its layer (``"mlp.experts"``, ``"self_attn.q_proj+k_proj+v_proj"``; across layers,
            ``"mlp.experts (all layers)"``). kind: ``"routed"``, ``"shared"``, ``"attention"`` or ``"dense"``.
        layers: the decoder layers of its matrices. members: their names. patterns: recipe override patterns
            matching exactly these matrices among the model's. expert: the routed expert (``"expert"``
            granularity), else None.
    """

    key: str
    label: str
    kind: str
    layers: tuple
    members: tuple
    patterns: tuple
    expert: int | None = None


def unit_kind(name: str) -> str:
    """``"routed"``, ``"shared"``, ``"attention"`` or ``"dense"`` from an on-disk module name (the report's
    module kinds)."""
    if _EXPERT.match(name) and "shared_expert" not in name:
        return "routed"
    if "shared_expert" in name:
        return "shared"
    return "attention" if re.search(r"attn|attention", name) else "dense"


def _in_layer(name: str) -> str:
    m = _IN_LAYER.search(name)
    return m.group(1) if m else name


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def build_units(matrices: Sequence[Matrix], experts: str = "layer") -> list[Unit]:
    """The allocation units of ``matrices`` (module docstring), in the order of their first matrix."""
    if experts not in EXPERT_GRANULARITIES:
        raise ValueError(f"experts: expected one of {EXPERT_GRANULARITIES}, got {experts!r}")
    groups: dict[str, dict] = {}  # key -> {label, kind, members, patterns, expert}
    names = {m.name for m in matrices}

    def add(key: str, label: str, kind: str, m: Matrix, pattern: str, expert=None) -> None:
        g = groups.setdefault(key, {"label": label, "kind": kind, "members": [], "patterns": [], "layers": [],
                                    "expert": expert})
        g["members"].append(m.name)
        if m.layer not in g["layers"]:
            g["layers"].append(m.layer)
        if pattern not in g["patterns"]:
            g["patterns"].append(pattern)

    for m in matrices:
        x = _EXPERT.match(m.name)
        if x and "shared_expert" not in m.name:
            base, e, proj = x.group("base"), int(x.group("e")), x.group("proj")
            part = "down" if proj in DOWN_NAMES else "gate_up"
            esc = _glob_escape(base)
            if experts == "layer":
                add(base, _in_layer(base), "routed", m, f"{esc}.*")
            elif experts == "model":
                add("routed experts", f"{_in_layer(base)} (all layers)", "routed", m, f"{esc}.*")
            elif experts == "projection":
                pat = f"{esc}.*.{proj}"
                add(f"{base}.{part}", f"{_in_layer(base)}.{part}", "routed", m, pat)
            else:
                add(f"{base}.{e}.{part}", f"{_in_layer(base)}.{e}.{part}", "routed", m,
                    f"{esc}.{e}.{proj}", expert=e)
            continue
        parent, _, leaf = m.name.rpartition(".")
        fused = next((s for s in FUSED_SIBLINGS if leaf in s), None)
        if fused is not None:
            present = [n for n in fused if f"{parent}.{n}" in names]
            if len(present) > 1:
                key = f"{parent}.{'+'.join(present)}"
                add(key, _in_layer(key), unit_kind(m.name), m, _glob_escape(m.name))
                continue
        add(m.name, _in_layer(m.name), unit_kind(m.name), m, _glob_escape(m.name))
    return [Unit(k, g["label"], g["kind"], tuple(g["layers"]), tuple(g["members"]), tuple(g["patterns"]),
                 g["expert"]) for k, g in groups.items()]
