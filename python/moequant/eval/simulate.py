"""Simulating at evaluation what the runtime quantizes besides the weights, so that ``moequant eval`` reads the
perplexity the deployed model has: the inputs of the Linears of W8A8 / W4A4 schemes (FP8 per token, FP8 per 128
columns, int8 per token, NVFP4 with the static ``input_global_scale``, MXFP4) and the FP8 KV cache
(``k_scale`` / ``v_scale``).

:class:`SimulationPlan` reads from a checkpoint what to simulate: the input-activation format of every quantized
module (its config group's ``input_activations``) with its ``input_global_scale``, and the KV-cache scales of every
attention when ``kv_cache_scheme`` is set. :class:`Simulation` applies it to a loaded model (either loader,
:mod:`moequant.eval.loader`):

* a dense ``nn.Linear`` (attention projections, dense MLPs, shared experts): a forward pre-hook fake-quantizes its
  input (:func:`moequant.ops.fake_quantize_activations`);
* routed experts (transformers' fused module, called as ``experts(hidden_states, top_k_index, top_k_weights)``):
  the module's forward is replaced, while attached, by :func:`moequant.calibration.routing.experts_forward`, which
  fake-quantizes each expert's routed rows before gate / up and its ``glu(gate, up)`` before down, per token as
  vLLM's MoE kernels quantize them (NVFP4: each expert with its own input global scale; gate and up share the
  smaller, as vLLM fuses them); computed in float32;
* an attention's keys (after ``k_norm`` and RoPE) and values: stored in FP8 with the checkpoint's scales and read
  back (:func:`moequant.ops.fake_quantize_fp8`, through :class:`moequant.calibration.kv_cache.KVCacheHooks`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..calibration.capture import ExpertsCall, Hooks
from ..calibration.kv_cache import KVCacheHooks, kv_attentions
from ..calibration.routing import experts_forward
from ..formats import ActivationFormat
from ..formats.kv_cache import kv_cache_kind
from ..models.base import MoEFamily, num_experts
from ..ops.act_quant import fake_quantize_activations, fake_quantize_fp8

__all__ = ["SimulationPlan", "Simulation"]


@dataclass
class SimulationPlan:
    """What a checkpoint's runtime quantizes besides the weights.

    Attributes:
        inputs: on-disk module name -> ``(ActivationFormat, input_global_scale float32 [1] or None)``, for the
            quantized modules whose scheme quantizes activations.
        kv: on-disk attention name (``model.layers.0.self_attn``) -> ``(k_scale, v_scale)``, float32 ``[1]`` each,
            when the checkpoint has an FP8 ``kv_cache_scheme``.
    """

    inputs: dict = field(default_factory=dict)
    kv: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.inputs and not self.kv

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> "SimulationPlan":
        """The plan of a checkpoint directory (empty for an unquantized or weight-only one); ValueError when a
        scale the config announces is missing."""
        from ..io.exported import checkpoint_groups
        from ..io.safetensors import CheckpointReader

        config, groups = checkpoint_groups(directory)
        kind = kv_cache_kind((config.get("quantization_config") or {}).get("kv_cache_scheme"))
        inputs, kv = {}, {}
        with CheckpointReader(directory) as src:
            for m, g in groups.items():
                if g.activations is None:
                    continue
                gs = None
                if g.activations.static_global_scale:
                    name = f"{m}.input_global_scale"
                    if name not in src:
                        raise ValueError(f"{directory}: {m} is quantized with {g.activations.label()} activations "
                                         f"but the checkpoint has no {name}")
                    gs = src.get(name).float().reshape(1)
                inputs[m] = (g.activations, gs)
            if kind is not None:
                for n in src.names():
                    if n.endswith(".k_scale"):
                        att = n[: -len(".k_scale")]
                        if f"{att}.v_scale" not in src:
                            raise ValueError(f"{directory}: {n} has no {att}.v_scale")
                        kv[att] = tuple(_scale(src.get(f"{att}.{s}"), f"{att}.{s}") for s in ("k_scale", "v_scale"))
                if not kv:
                    raise ValueError(f"{directory}: quantization_config has a kv_cache_scheme but the checkpoint "
                                     f"has no *.k_scale / *.v_scale tensors")
        return cls(inputs, kv)


def _scale(t: torch.Tensor, name: str) -> torch.Tensor:
    s = t.float().reshape(-1)
    if s.numel() != 1 or not bool(torch.isfinite(s).all()) or not float(s) > 0:
        raise ValueError(f"{name}: expected one finite value > 0, got {s.tolist()}")
    return s


class _ExpertsPatch:
    """Replaces one fused experts module's forward by the simulated one; ``remove()`` restores the class's."""

    def __init__(self, experts: nn.Module, family: MoEFamily, gate_up: Optional[list], down: Optional[list]) -> None:
        self.experts = experts
        call = ExpertsCall(experts)
        dev = experts.gate_up_proj.device
        gu_fn, dn_fn = _rows_fn(gate_up, dev), _rows_fn(down, dev)

        def forward(*args, **kwargs):
            hs, idx, w = call.bind(args, kwargs)
            return experts_forward(experts, family, hs, idx, w, gu_fn, dn_fn)

        experts.forward = forward

    def remove(self) -> None:
        self.experts.__dict__.pop("forward", None)


def _rows_fn(spec: Optional[list], device):
    """``fn(ids, x)`` fake-quantizing routed rows grouped by expert with each expert's ``(format, global scale)``:
    one call for all rows when the experts share them (the dynamic kinds), else one per expert (NVFP4's scales)."""
    if spec is None:
        return None
    fmt = spec[0][0]
    if all(f == fmt and g is None for f, g in spec):
        return lambda ids, x: fake_quantize_activations(x, fmt)
    scales = [None if g is None else g.to(device) for _, g in spec]

    def fn(ids, x):
        out = torch.empty_like(x)
        experts, counts = torch.unique_consecutive(ids, return_counts=True)
        a = 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            out[a:a + n] = fake_quantize_activations(x[a:a + n], spec[e][0], scales[e])
            a += n
        return out
    return fn


def _expert_spec(plan: SimulationPlan, names: list, keys: tuple) -> Optional[list]:
    """Per expert ``(format, global scale)`` of the input the projections ``keys`` read (gate and up share
    theirs: the smaller global scale); None when none of the experts quantizes that input."""
    specs = [[plan.inputs.get(n[k]) for k in keys] for n in names]
    if all(s is None for per in specs for s in per):
        return None
    out = []
    for n, per in zip(names, specs):
        if any(s is None for s in per) or len({s[0] for s in per}) != 1:
            raise ValueError(f"{n[keys[0]]}: its projections {keys} do not all quantize their input in one format; "
                             f"moequant simulates one activation format per expert input")
        gs = [s[1] for s in per if s[1] is not None]
        out.append((per[0][0], torch.minimum(*gs) if len(gs) == 2 else (gs[0] if gs else None)))
    return out


class Simulation(Hooks):
    """Applies a :class:`SimulationPlan` to a model of ``family`` (module docstring); ValueError when a module of
    the plan is not in the model. ``attach()`` / ``remove()`` (or ``with``) switch it on and off."""

    def __init__(self, model: nn.Module, family: MoEFamily, plan: SimulationPlan) -> None:
        super().__init__()
        self.model, self.family, self.plan = model, family, plan
        used: set = set()
        self.linears: dict = {}  # runtime name -> (module, format, global scale)
        for name, mod in model.named_modules():
            disk = family.disk_name(name)
            if isinstance(mod, nn.Linear) and disk in plan.inputs:
                self.linears[name] = (mod, *plan.inputs[disk])
                used.add(disk)
        self.experts: dict = {}  # runtime name -> (module, gate/up spec, down spec)
        for _, prefix, layer in family.iter_layers(model):
            ex = family.experts_of(layer)
            if ex is None:
                continue
            names = [family.disk_expert_names(prefix, e) for e in range(num_experts(ex))]
            gate_up, down = _expert_spec(plan, names, ("gate", "up")), _expert_spec(plan, names, ("down",))
            if gate_up is not None or down is not None:
                self.experts[f"{prefix}.{family.experts}"] = (ex, gate_up, down)
                used.update(n for per in names for n in per.values())
        self.attentions: dict = {}  # runtime name -> (module, k_scale, v_scale)
        for name, mod in kv_attentions(model).items():
            disk = family.disk_name(name)
            if disk in plan.kv:
                self.attentions[name] = (mod, *plan.kv[disk])
        missing = sorted(set(plan.inputs) - used) + sorted(set(plan.kv) - {family.disk_name(n)
                                                                           for n in self.attentions})
        if missing:
            raise ValueError(f"the model has no module {missing[0]!r} ({len(missing)} of the checkpoint's quantized "
                             f"modules are not found); cannot simulate their runtime quantization")

    @property
    def formats(self) -> list[str]:
        """The labels of the activation formats simulated, sorted."""
        return sorted({f.label() for f, _ in self.plan.inputs.values()})

    def describe(self) -> str:
        """One line: what is simulated (whether attached or not)."""
        if self.plan.empty:
            return "nothing to simulate (the checkpoint quantizes weights only)"
        parts = []
        if self.plan.inputs:
            parts.append(f"activations {', '.join(self.formats)} ({len(self.linears)} Linears, the routed experts "
                         f"of {len(self.experts)} layers)")
        if self.attentions:
            parts.append(f"KV cache FP8 ({len(self.attentions)} attentions)")
        return " and ".join(parts)

    def attach(self) -> "Simulation":
        if self.attached:
            return self
        try:
            for mod, fmt, gs in self.linears.values():
                self._handles.append(mod.register_forward_pre_hook(_input_hook(fmt, gs, mod.weight.device)))
            for ex, gate_up, down in self.experts.values():
                self._handles.append(_ExpertsPatch(ex, self.family, gate_up, down))
            if self.attentions:
                scales = {n: (k, v) for n, (_, k, v) in self.attentions.items()}

                def kv(name, k, v):
                    ks, vs = scales[name]
                    return fake_quantize_fp8(k, ks), fake_quantize_fp8(v, vs)

                self._handles.append(KVCacheHooks({n: a[0] for n, a in self.attentions.items()}, kv).attach())
        except BaseException:
            self.remove()
            raise
        return self


def _input_hook(fmt: ActivationFormat, gs: Optional[torch.Tensor], device):
    g = None if gs is None else gs.to(device)

    def hook(module, args):
        return (fake_quantize_activations(args[0], fmt, g), *args[1:])
    return hook
