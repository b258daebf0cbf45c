"""Routed calibration capture: per-expert inputs of fused MoE experts and inputs of plain Linears.

:class:`ExpertCapture` registers a forward *pre*-hook (``with_kwargs=True``) on a fused experts module, so it
sees exactly ``(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])`` whatever
``config._experts_implementation`` dispatches to ("eager", "grouped_mm", ...). Per call it builds a
:class:`RoutedBatch` with one stable sort (rows grouped by expert, token order kept inside an expert), computes
the down_proj inputs ``h = glu(gate, up)`` per expert in fp32, and feeds two Hessian accumulators (gate+up share
``H_e = sum x x^T`` of dim H; down has dim I), optionally weighted by the routing weight (AGQ).
:class:`LinearCapture` (:mod:`moequant.capture_linear`, re-exported here) does the same for ``nn.Linear`` modules
(single-"expert" accumulators) and :class:`LayerCapture` combines both for one decoder layer, with the optional
``sigmoid(shared_expert_gate(x))`` weighting of a gated shared expert. All hooks are removed on exit, also on
exceptions.

Accumulator protocol (``moequant.ops.HessianAccumulator``): ``acc = factory(num_experts, dim, device)``;
``acc.add(x [n,dim], expert_ids [n] int32, weights [n] float32 | None)``, ``x`` in the hidden states' dtype (bf16
for a bf16 layer; CUDA accumulators widen it exactly, others convert it to float32) or float32 (the down inputs
``h``); ``acc.hessians [E,dim,dim]``, ``acc.counts [E] int64``, ``acc.mass [E] float64``.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .capture_base import AccumulatorFactory, Hooks, default_accumulator_factory, flat_mask
from .capture_linear import LinearCapture
from .models.base import STANDARD, MoEFamily, intermediate_size, linear_modules, num_experts, split_expert

__all__ = ["WEIGHTINGS", "AccumulatorFactory", "default_accumulator_factory", "RoutedBatch", "route_tokens",
           "expert_intermediate", "expert_output", "ExpertCapture", "LinearCapture", "LayerCapture"]

WEIGHTINGS = ("none", "routing")


@dataclass
class RoutedBatch:
    """Routed (token, slot) pairs of one experts call, grouped by expert with one stable sort.

    N = number of routed pairs after dropping pads (index outside ``[0, E)``, e.g. the value E) and masked tokens.

    Attributes:
        x: ``[N, H]`` expert inputs in the dtype of ``hidden_states`` (bf16 for a bf16 layer: the CUDA Hessian
            kernels read it as it is); rows of expert e are ``offsets[e]:offsets[e+1]``.
        expert_ids: ``[N]`` int32, non-decreasing.
        weights: ``[N]`` float32 routing weight the module multiplies that row's output by.
        token_index: ``[N]`` int64 row of the flattened ``hidden_states`` each routed row came from.
        offsets: ``[E+1]`` int64 prefix sums of per-expert counts (on the input's device).
        h: ``[N, I]`` float32 down_proj inputs ``glu(gate, up)`` (None until computed).
        num_tokens: T, rows of the flattened ``hidden_states``.
    """

    x: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor
    token_index: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    h: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """``[E]`` int64 routed rows per expert."""
        return self.offsets.diff()


def route_tokens(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 num_experts: int, token_mask: torch.Tensor | None = None) -> RoutedBatch:
    """Group the routed rows of one experts call by expert (one stable argsort; no per-token loop).

    Args:
        hidden_states: ``[T, H]`` (any leading dims are flattened).
        top_k_index: ``[T, k]`` expert ids; values outside ``[0, E)`` are "no expert" pads and dropped.
        top_k_weights: ``[T, k]`` routing weights, or ``[T, E]`` dense scores (gathered at ``top_k_index``).
        num_experts: E.
        token_mask: optional bool ``[T]`` (any shape with T elements); False rows are dropped (padding).
    """
    H = hidden_states.shape[-1]
    hs = hidden_states.reshape(-1, H)
    T = hs.shape[0]
    idx = top_k_index.reshape(T, -1).long()
    k = idx.shape[1]
    w = top_k_weights.reshape(T, -1)
    if w.shape[1] != k:  # dense [T, E] scores (older GPT-OSS router): weight of the chosen slots
        w = w.gather(1, idx.clamp(0, w.shape[1] - 1))
    flat = idx.reshape(-1)
    tok = torch.arange(T, device=idx.device).repeat_interleave(k)
    valid = (flat >= 0) & (flat < num_experts)
    if token_mask is not None:
        valid &= token_mask.reshape(-1).to(device=idx.device, dtype=torch.bool).repeat_interleave(k)
    ids = flat[valid]
    order = torch.argsort(ids, stable=True)
    ids = ids[order]
    tok = tok[valid][order]
    counts = torch.bincount(ids, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return RoutedBatch(
        x=hs[tok], expert_ids=ids.to(torch.int32), weights=w.reshape(-1)[valid][order].float(),
        token_index=tok, offsets=offsets, num_tokens=T)


def _expert_ranges(batch: RoutedBatch) -> list[tuple[int, int, int]]:
    off = batch.offsets.tolist()
    return [(e, off[e], off[e + 1]) for e in range(batch.num_experts) if off[e + 1] > off[e]]


def expert_glu(experts: nn.Module, family: MoEFamily, t, x: torch.Tensor) -> torch.Tensor:
    """``glu(x gate^T + b_gate, x up^T + b_up)`` in fp32 for rows ``x`` of one expert ``t`` (``split_expert``)."""
    x = x.float()
    gate, up = x @ t.gate.float().t(), x @ t.up.float().t()
    if t.gate_bias is not None:
        gate, up = gate + t.gate_bias.float(), up + t.up_bias.float()
    return family.glu(experts, gate, up)


@torch.no_grad()
def expert_intermediate(experts: nn.Module, family: MoEFamily, batch: RoutedBatch) -> torch.Tensor:
    """``h [N, I]`` float32: the down_proj input of every routed row, ``glu(gate, up)`` computed per expert
    (loop over experts, not tokens) from the fused weights in fp32, exactly as the module does (biases included).
    """
    h = torch.zeros(batch.x.shape[0], intermediate_size(experts, family), dtype=torch.float32,
                    device=batch.x.device)
    for e, a, b in _expert_ranges(batch):
        h[a:b] = expert_glu(experts, family, split_expert(experts, family, e), batch.x[a:b])
    return h


@torch.no_grad()
def expert_output(experts: nn.Module, family: MoEFamily, batch: RoutedBatch) -> torch.Tensor:
    """Recompute the experts module output ``[T, H]`` float32 from a captured batch (``batch.h`` required):
    ``out[t] += c * (h @ down.T + down_bias)`` over routed rows. For tests and sanity checks."""
    if batch.h is None:
        raise ValueError("batch.h is None: capture with compute_h=True")
    H = batch.x.shape[1]
    out = torch.zeros(batch.num_tokens, H, dtype=torch.float32, device=batch.x.device)
    for e, a, b in _expert_ranges(batch):
        t = split_expert(experts, family, e)
        y = batch.h[a:b] @ t.down.float().t()
        if t.down_bias is not None:
            y = y + t.down_bias.float()
        out.index_add_(0, batch.token_index[a:b], y * batch.weights[a:b, None])
    return out


class ExpertCapture(Hooks):
    """Capture the routed inputs of one fused experts module.

    Args:
        experts: the fused experts module (``family.experts_of(layer)``).
        family: its :class:`MoEFamily`.
        on_batch: optional ``callback(batch: RoutedBatch)`` called once per experts call.
        accumulate: create and feed ``self.gate_up`` (E experts, dim H) and ``self.down`` (E, dim I).
        weighting: ``"none"`` (plain ``sum x x^T``) or ``"routing"`` (``sum c x x^T``, c = routing weight; AGQ).
        compute_h: compute ``batch.h`` (required for the down accumulator).
        accumulator_factory: ``factory(num_experts, dim, device)``; default ``moequant.ops.HessianAccumulator``.
        all_tokens: also feed ``self.all_input`` (1 "expert", dim H): the unweighted Hessian of the block input
            over *all* tokens, each once (the router's input; the shrinkage target of gate/up).
        all_token_down: also feed ``self.down_all`` (E experts, dim I): for every expert e, the unweighted
            Hessian of ``glu(gate_e x, up_e x)`` over all tokens ("calibrate all experts"; E x the expert compute).

    ``token_mask`` (bool, T elements, or None) may be set before each forward to drop padding tokens.
    """

    def __init__(self, experts: nn.Module, family: MoEFamily, *, on_batch: Callable[[RoutedBatch], None] | None = None,
                 accumulate: bool = True, weighting: str = "none", compute_h: bool = True,
                 accumulator_factory: AccumulatorFactory | None = None, all_tokens: bool = False,
                 all_token_down: bool = False) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if accumulate and not compute_h:
            raise ValueError("accumulate=True needs compute_h=True (the down accumulator takes h)")
        self.experts, self.family, self.on_batch = experts, family, on_batch
        self.weighting, self.compute_h = weighting, compute_h
        self.num_experts = num_experts(experts)
        self.hidden_size = experts.gate_up_proj.shape[-1 if family.layout == STANDARD else 1]
        self.intermediate_size = intermediate_size(experts, family)
        self.token_mask: torch.Tensor | None = None
        self.num_calls = 0
        self.gate_up = self.down = self.all_input = self.down_all = None
        if accumulate:
            make = accumulator_factory or default_accumulator_factory
            dev = experts.gate_up_proj.device
            self.gate_up = make(self.num_experts, int(self.hidden_size), dev)
            self.down = make(self.num_experts, self.intermediate_size, dev)
            if all_tokens:
                self.all_input = make(1, int(self.hidden_size), dev)
            if all_token_down:
                self.down_all = make(self.num_experts, self.intermediate_size, dev)
        try:
            names = list(inspect.signature(experts.forward).parameters)[:3]
        except (TypeError, ValueError):
            names = []
        self._arg_names = names if len(names) == 3 else ["hidden_states", "top_k_index", "top_k_weights"]

    def attach(self) -> "ExpertCapture":
        if not self.attached:
            self._handles.append(self.experts.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def _bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        vals = list(args[:3])
        for name in self._arg_names[len(vals):]:
            if name not in kwargs:
                raise TypeError(f"experts called without {name!r}: args={len(args)} kwargs={list(kwargs)}")
            vals.append(kwargs[name])
        return vals

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hs, idx, w = self._bind(args, kwargs)
        mask = flat_mask(self.token_mask, hs.reshape(-1, hs.shape[-1]).shape[0])
        batch = route_tokens(hs, idx, w, self.num_experts, mask)
        if self.compute_h:
            batch.h = expert_intermediate(self.experts, self.family, batch)
        self.num_calls += 1
        if self.gate_up is not None and batch.x.shape[0]:
            cw = batch.weights if self.weighting == "routing" else None
            self.gate_up.add(batch.x, batch.expert_ids, cw)
            self.down.add(batch.h, batch.expert_ids, cw)
        if self.all_input is not None or self.down_all is not None:
            self._add_all_tokens(hs, mask)
        if self.on_batch is not None:
            self.on_batch(batch)


    @torch.no_grad()
    def _add_all_tokens(self, hs: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Every (unmasked) token once: block-input Hessian and, optionally, every expert's down input."""
        x = hs.reshape(-1, hs.shape[-1])
        if mask is not None:
            x = x[mask.to(x.device)]
        if not x.shape[0]:
            return
        if self.all_input is not None:  # in the hidden-state dtype, like the routed rows (widened exactly)
            self.all_input.add(x, torch.zeros(x.shape[0], dtype=torch.int32, device=x.device))
        if self.down_all is not None:
            xf = x.float()  # once, not in each expert's expert_glu
            for e in range(self.num_experts):
                t = split_expert(self.experts, self.family, e)
                self.down_all.add(expert_glu(self.experts, self.family, t, xf),
                                  torch.full((x.shape[0],), e, dtype=torch.int32, device=x.device))


class LayerCapture(Hooks):
    """Everything one decoder layer needs for calibration: routed experts + quantized Linears.

    Args:
        layer: a decoder layer; family: its :class:`MoEFamily`; layer_prefix: full name (``"model.layers.3"``).
        weighting: routed experts weighting, ``"none"`` | ``"routing"``.
        shared_weighting: ``"none"`` | ``"gate"`` -- weight the gated shared expert's Linears by
            ``sigmoid(shared_expert_gate(x))`` (ignored when the family has no shared_expert_gate).
        on_batch, accumulator_factory, compute_h, all_tokens, all_token_down: forwarded to :class:`ExpertCapture`.

    Attributes: ``experts`` (:class:`ExpertCapture` or None for a dense layer), ``linears`` (:class:`LinearCapture`).
    """

    def __init__(self, layer: nn.Module, family: MoEFamily, *, layer_prefix: str = "", weighting: str = "none",
                 shared_weighting: str = "none", on_batch: Callable[[RoutedBatch], None] | None = None,
                 accumulator_factory: AccumulatorFactory | None = None, compute_h: bool = True,
                 accumulate: bool = True, all_tokens: bool = False, all_token_down: bool = False) -> None:
        super().__init__()
        if shared_weighting not in ("none", "gate"):
            raise ValueError(f"shared_weighting must be 'none' or 'gate', got {shared_weighting!r}")
        self.layer, self.family = layer, family
        ex = family.experts_of(layer)
        self.experts = None if ex is None else ExpertCapture(
            ex, family, on_batch=on_batch, weighting=weighting, compute_h=compute_h,
            accumulator_factory=accumulator_factory, accumulate=accumulate, all_tokens=all_tokens,
            all_token_down=all_token_down)
        mods = linear_modules(layer, family, layer_prefix)
        self._shared = family.shared_expert_of(layer)
        self._shared_gate = family.shared_expert_gate_of(layer)
        self._shared_c: torch.Tensor | None = None
        weight_fns = {}
        if shared_weighting == "gate" and self._shared is not None and self._shared_gate is not None:
            ids = {id(m) for m in self._shared.modules()}
            weight_fns = {n: self._shared_weights for n, m in mods.items() if id(m) in ids}
        self.linears = LinearCapture(mods, weight_fns=weight_fns, accumulator_factory=accumulator_factory,
                                     accumulate=accumulate)

    def _shared_weights(self) -> torch.Tensor | None:
        return self._shared_c

    @torch.no_grad()
    def _shared_pre_hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        self._shared_c = torch.sigmoid(self._shared_gate(x).float()).reshape(-1)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Bool mask with one element per token of the next forward (e.g. ``attention_mask``), or None."""
        self.linears.token_mask = mask
        if self.experts is not None:
            self.experts.token_mask = mask

    def attach(self) -> "LayerCapture":
        if self.attached:
            return self
        with contextlib.ExitStack() as stack:
            stack.callback(self.remove)
            if self.linears.weight_fns:
                self._handles.append(self._shared.register_forward_pre_hook(self._shared_pre_hook))
            for cap in (self.experts, self.linears):
                if cap is not None:
                    cap.attach()
                    self._handles.append(_Detach(cap))
            stack.pop_all()
        return self


class _Detach:
    """Adapter so a child capture is removed like a hook handle."""

    def __init__(self, cap: Hooks) -> None:
        self.cap = cap

    def remove(self) -> None:
        self.cap.remove()
