"""Declarative description of a transformers-5 MoE family and the helpers that read a model through it.

A :class:`MoEFamily` is plain data: where the decoder layers live, where (inside a layer) the fused routed
experts, the router and the optional shared expert live, how the fused expert tensors are laid out, how the
expert computes the down_proj input from gate/up, and how the original checkpoint names the per-expert Linears.
No modeling code is copied; everything is read from the live module.

Fused expert layouts (E experts, hidden H, expert width I):

* ``"standard"``  : ``gate_up_proj [E, 2I, H]`` (rows ``[:I]`` gate, ``[I:]`` up), ``down_proj [E, H, I]``;
  ``gate, up = (x @ gate_up_proj[e].T).chunk(2, -1)``; ``y = (act(gate) * up) @ down_proj[e].T``.
* ``"transposed"``: ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]`` (GPT-OSS), optionally with biases
  ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]`` and gate/up interleaved along 2I
  (columns ``0::2`` gate, ``1::2`` up).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

STANDARD = "standard"
TRANSPOSED = "transposed"

GluFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

# Residual rotation data (see MoEFamily.residual_norms): the pre-attention norm feeds the attention (softmax or
# linear), the post-attention norm the MLP / MoE block (router, shared expert and its gate, routed experts).
RESIDUAL_NORMS = (("input_layernorm", ("self_attn", "linear_attn")), ("post_attention_layernorm", ("mlp",)))
ROTATION_INTERNAL = ("q_b_proj", "kv_b_proj", "q_a_layernorm", "kv_a_layernorm", "q_norm", "k_norm", "norm",
                     "conv1d")


def glu_act_fn(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``experts.act_fn(gate) * up`` -- the GLU of every family except GPT-OSS. Shapes ``[n, I]`` -> ``[n, I]``."""
    return experts.act_fn(gate) * up


def glu_gpt_oss(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS clamped SwiGLU, read from ``GptOssExperts._apply_gate``:
    ``gate.clamp(max=limit)``, ``up.clamp(-limit, limit)``, ``(up + 1) * gate * sigmoid(alpha * gate)``,
    with ``alpha = experts.alpha`` (config.swiglu_alpha) and ``limit = experts.limit`` (config.swiglu_limit)."""
    limit, alpha = experts.limit, experts.alpha
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def get_path(root: nn.Module, path: str | None) -> nn.Module | None:
    """Follow a dotted attribute path (``"mlp.experts"``); ``None`` if any hop is missing or ``path`` is None."""
    if path is None:
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class ExpertTensors(NamedTuple):
    """One expert's weights as ``nn.Linear``-style ``[out, in]`` views of the fused parameters (no copy).

    gate, up: ``[I, H]``; down: ``[H, I]``; biases ``[I]``, ``[I]``, ``[H]`` or None."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


@dataclass(frozen=True)
class MoEFamily:
    """One MoE model family. All module paths are relative to a decoder layer unless noted.

    Attributes:
        name: short family name (``"qwen3_moe"``).
        model_types: ``config.model_type`` values this entry matches.
        layers_path: path of the decoder ``nn.ModuleList`` from the top model (``"model.layers"``).
        moe_block: path of the MoE block in a layer (``"mlp"``); dense layers hold an MLP at the same place.
        experts: path of the fused experts module; a layer is MoE iff it exists and has ``gate_up_proj``.
        router: path of the ``*TopKRouter`` (kept high precision).
        layout: ``STANDARD`` or ``TRANSPOSED`` (see module docstring).
        interleaved: gate/up interleaved along the 2I axis (GPT-OSS) instead of gate-rows-first.
        has_bias: experts carry ``gate_up_proj_bias`` / ``down_proj_bias``.
        glu: ``glu(experts, gate [n,I], up [n,I]) -> [n,I]`` computing the down_proj input like the module.
        shared_expert: path of the shared-expert MLP (plain ``nn.Linear`` gate/up/down_proj) or None.
        shared_expert_gate: path of the ``nn.Linear [1,H]`` scaling the shared expert by ``sigmoid(.)`` or None.
        disk_experts: checkpoint prefix of the per-expert modules relative to the layer (``"mlp.experts"``).
        disk_proj_names: checkpoint names of (gate, up, down) per expert, e.g. Mixtral ``("w1", "w3", "w2")``.
        disk_fused: the original checkpoint stores the experts fused (3-D), not per expert; ``disk_*`` then
            give the per-expert names an exporter should write for vLLM / compressed-tensors (the
            llm-compressor linearized names).
        extra_high_precision: layer-relative module paths kept in high precision besides the router and
            ``shared_expert_gate`` (e.g. tiny gating projections).
        model_high_precision: top-model paths never quantized by default (embeddings, lm_head).
        disk_renames: ``(runtime, checkpoint)`` substring renames turning a runtime module name into its
            checkpoint name (Mixtral ``(".mlp.", ".block_sparse_moe.")``); applied in order by :meth:`disk_name`.
        residual_norms: ``(norm, blocks)`` pairs for the residual rotation (:mod:`moequant.rotation`): the
            layer-relative RMSNorm ``norm`` feeds every module under the layer-relative ``blocks`` (absent blocks
            are skipped); its weight is folded into the modules reading it.
        residual_writers: leaf names of the Linears that write to the residual stream (output side rotated);
            every other Linear of a block reads the normalized residual (input side), except
        rotation_internal: leaf names of modules neither reading nor writing the residual stream (MLA
            ``q_b_proj``/``kv_b_proj``, per-head norms); left untouched by the rotation.
        final_norm: top-model path of the norm before lm_head.
        norm_weight_offset: the norms compute ``x / rms(x) * (offset + weight)`` (1.0 for Qwen3-Next's
            ``1 + weight`` RMSNorm); after folding the weight becomes ``1 - offset``.
        notes: free text (provenance of the names, caveats).
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    moe_block: str = "mlp"
    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    layout: str = STANDARD
    interleaved: bool = False
    has_bias: bool = False
    glu: GluFn = glu_act_fn
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    disk_experts: str = "mlp.experts"
    disk_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    disk_fused: bool = False
    extra_high_precision: tuple[str, ...] = ()
    disk_renames: tuple[tuple[str, str], ...] = ()
    model_high_precision: tuple[str, ...] = ("model.embed_tokens", "lm_head")
    residual_norms: tuple[tuple[str, tuple[str, ...]], ...] = RESIDUAL_NORMS
    residual_writers: tuple[str, ...] = ("o_proj", "out_proj", "down_proj")
    rotation_internal: tuple[str, ...] = ROTATION_INTERNAL
    final_norm: str = "model.norm"
    norm_weight_offset: float = 0.0
    notes: str = field(default="", compare=False)

    # ---------------------------------------------------------------- structure
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a ``*ForCausalLM`` (``model.layers``) or of the bare ``*Model`` (``layers``)."""
        for path in (self.layers_path, self.layers_path.split(".", 1)[-1]):
            layers = get_path(model, path)
            if isinstance(layers, nn.ModuleList):
                return layers
        raise ValueError(f"{self.name}: no decoder layers at {self.layers_path!r} in {type(model).__name__}")

    def layer_prefix(self, model: nn.Module, index: int) -> str:
        """Full module name prefix of layer ``index`` (``"model.layers.3"``) in ``model``."""
        path = self.layers_path if get_path(model, self.layers_path) is not None else self.layers_path.split(".", 1)[-1]
        return f"{path}.{index}"

    def experts_of(self, layer: nn.Module) -> nn.Module | None:
        """The fused experts module of ``layer``, or None for a dense layer (structural check)."""
        mod = get_path(layer, self.experts)
        if mod is None or not isinstance(getattr(mod, "gate_up_proj", None), torch.Tensor):
            return None
        return mod

    def is_moe_layer(self, layer: nn.Module) -> bool:
        return self.experts_of(layer) is not None

    def router_of(self, layer: nn.Module) -> nn.Module | None:
        return get_path(layer, self.router) if self.is_moe_layer(layer) else None

    def shared_expert_of(self, layer: nn.Module) -> nn.Module | None:
        return get_path(layer, self.shared_expert) if self.is_moe_layer(layer) else None

    def shared_expert_gate_of(self, layer: nn.Module) -> nn.Module | None:
        return get_path(layer, self.shared_expert_gate) if self.is_moe_layer(layer) else None

    def iter_layers(self, model: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
        """Yield ``(index, full_prefix, layer)`` for every decoder layer."""
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            yield i, self.layer_prefix(model, i), layer

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError unless at least one layer holds fused experts with the expected shapes."""
        moe = [self.experts_of(layer) for layer in self.layers(model)]
        moe = [m for m in moe if m is not None]
        if not moe:
            raise ValueError(
                f"{self.name}: no layer has fused experts at {self.experts!r} (expected a module with a 3-D "
                f"'gate_up_proj'); this transformers version stores the experts differently -- moequant needs "
                f"transformers>=5 with fused experts for this family")
        for m in moe:
            E, I = num_experts(m), intermediate_size(m, self)
            want_down = (E, m.gate_up_proj.shape[-1], I) if self.layout == STANDARD else (E, I, m.gate_up_proj.shape[1])
            if tuple(m.down_proj.shape) != want_down:
                raise ValueError(f"{self.name}: down_proj shape {tuple(m.down_proj.shape)} != expected {want_down}")

    # ---------------------------------------------------------------- names
    def disk_expert_names(self, layer_prefix: str, expert: int) -> dict[str, str]:
        """Checkpoint module names of one expert: ``{"gate": ..., "up": ..., "down": ...}`` (append ``.weight``)."""
        g, u, d = self.disk_proj_names
        base = f"{layer_prefix}.{self.disk_experts}.{expert}"
        return {"gate": f"{base}.{g}", "up": f"{base}.{u}", "down": f"{base}.{d}"}

    @property
    def high_precision(self) -> tuple[str, ...]:
        """Layer-relative paths kept in high precision: router, shared_expert_gate, extras."""
        return tuple(p for p in (self.router, self.shared_expert_gate, *self.extra_high_precision) if p)

    def disk_name(self, runtime_name: str) -> str:
        """Checkpoint name of a non-expert runtime module name (``model.layers.0.mlp.gate`` ->
        ``model.layers.0.block_sparse_moe.gate`` for Mixtral)."""
        name = "." + runtime_name
        for src, dst in self.disk_renames:
            name = name.replace(src, dst)
        return name[1:]

    def is_high_precision(self, name: str) -> bool:
        """Whether a full module name (``model.layers.3.mlp.gate``) is kept in high precision by default."""
        for p in self.model_high_precision:
            if name == p or name.startswith(p + "."):
                return True
        for p in self.high_precision:
            if re.search(r"(^|\.)" + re.escape(p) + r"$", name):
                return True
        return False

    def ignore_patterns(self) -> list[str]:
        """compressed-tensors style ``ignore`` list (``"lm_head"``, ``"re:.*mlp\\.gate$"``) of the high-precision
        modules, by checkpoint name (vLLM matches those) and, where it differs, by runtime module name
        (transformers matches those: PhiMoE's router is the ``nn.Linear`` subclass ``mlp.router`` at run time and
        ``block_sparse_moe.gate`` on disk)."""
        out = [p for p in self.model_high_precision if p == "lm_head"]
        for p in self.high_precision:
            for name in (self.disk_name("L." + p)[2:], p):
                pattern = f"re:.*{re.escape(name)}$"
                if pattern not in out:
                    out.append(pattern)
        return out


# -------------------------------------------------------------------- fused-expert accessors
def num_experts(experts: nn.Module) -> int:
    return int(experts.gate_up_proj.shape[0])


def text_config(config):
    """The language-model part of a transformers config: ``get_text_config()`` where the config has it (a
    multimodal wrapper returns its text sub-config, a plain config itself), else ``config.text_config``, else
    ``config``."""
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


def intermediate_size(experts: nn.Module, family: MoEFamily) -> int:
    """Expert width I (half the fused 2I axis)."""
    two_i = experts.gate_up_proj.shape[1] if family.layout == STANDARD else experts.gate_up_proj.shape[2]
    return int(two_i) // 2


def gate_up_slices(family: MoEFamily, inter: int) -> tuple[slice, slice]:
    """Where gate and up live along the fused 2I axis: interleaved (GPT-OSS) or gate rows first."""
    if family.interleaved:
        return slice(0, None, 2), slice(1, None, 2)
    return slice(0, inter), slice(inter, None)


def split_expert_tensors(family: MoEFamily, gate_up: torch.Tensor, down: torch.Tensor,
                         gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None
                         ) -> ExpertTensors:
    """One expert's ``[out, in]`` views (see :class:`ExpertTensors`) of its slices of the fused tensors
    (``gate_up_proj[e]``, ``down_proj[e]`` and the biases' ``[e]`` rows), whatever the fused layout."""
    gu, dn = (gate_up.t(), down.t()) if family.layout == TRANSPOSED else (gate_up, down)  # -> [2I, H], [H, I]
    sel_g, sel_u = gate_up_slices(family, gu.shape[0] // 2)
    gb = ub = None
    if gate_up_bias is not None:
        gb, ub = gate_up_bias[sel_g], gate_up_bias[sel_u]
    return ExpertTensors(gu[sel_g], gu[sel_u], dn, gb, ub, down_bias)


def split_expert(experts: nn.Module, family: MoEFamily, e: int) -> ExpertTensors:
    """Views of expert ``e`` as ``[out, in]`` matrices (see :class:`ExpertTensors`), whatever the fused layout."""
    gub = experts.gate_up_proj_bias[e] if family.has_bias else None
    db = experts.down_proj_bias[e] if family.has_bias else None
    return split_expert_tensors(family, experts.gate_up_proj[e], experts.down_proj[e], gub, db)


def fuse_experts(family: MoEFamily, experts: list[ExpertTensors]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`split_expert`: the fused runtime tensors (``gate_up_proj``, ``down_proj`` and, when
    every expert has biases, ``gate_up_proj_bias`` / ``down_proj_bias``) of per-expert ``[out, in]`` matrices, in
    the family's layout (gate rows first or interleaved; GPT-OSS transposed)."""
    if not experts:
        raise ValueError("experts: expected at least one expert")
    inter, hidden = experts[0].gate.shape
    sel_g, sel_u = gate_up_slices(family, inter)
    gate_up = experts[0].gate.new_empty((len(experts), 2 * inter, hidden))
    gate_up[:, sel_g] = torch.stack([t.gate for t in experts])
    gate_up[:, sel_u] = torch.stack([t.up for t in experts])
    down = torch.stack([t.down for t in experts])
    out = {"gate_up_proj": gate_up, "down_proj": down}
    if family.layout == TRANSPOSED:
        out = {k: v.transpose(1, 2).contiguous() for k, v in out.items()}
    if all(t.gate_bias is not None and t.up_bias is not None and t.down_bias is not None for t in experts):
        gub = experts[0].gate_bias.new_empty((len(experts), 2 * inter))
        gub[:, sel_g] = torch.stack([t.gate_bias for t in experts])
        gub[:, sel_u] = torch.stack([t.up_bias for t in experts])
        out["gate_up_proj_bias"] = gub
        out["down_proj_bias"] = torch.stack([t.down_bias for t in experts])
    return out


def linear_modules(layer: nn.Module, family: MoEFamily, layer_prefix: str = "") -> dict[str, nn.Linear]:
    """``nn.Linear`` modules of one decoder layer quantized by default, keyed by full name.

    Includes attention projections (MLA ``q_a/q_b/kv_a/kv_b/o``, Qwen3-Next linear-attention ``in_proj_qkvz``/
    ``out_proj``), shared-expert and dense-MLP Linears. Excludes the fused experts (not ``nn.Linear``), the
    router (PhiMoE's router *is* an ``nn.Linear`` subclass), ``shared_expert_gate`` and ``family.high_precision``.
    ``layer_prefix`` (``"model.layers.3"``) is prepended; empty gives layer-relative names.
    """
    skip = {family.experts, *family.high_precision}
    out: dict[str, nn.Linear] = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear) or not name:
            continue
        if any(s is not None and (name == s or name.startswith(s + ".")) for s in skip):
            continue
        full = f"{layer_prefix}.{name}" if layer_prefix else name
        if family.is_high_precision(full):
            continue
        out[full] = mod
    return out
