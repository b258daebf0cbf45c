"""Routed calibration capture: per-expert inputs of fused MoE experts and inputs of plain Linears.

:class:`ExpertCapture` registers a forward *pre*-hook (``with_kwargs=True``) on a fused experts module, so it
sees exactly ``(hidden_states [T,H], top_k_index [T,k], top_k_weights [T,k])`` whatever
``config._experts_implementation`` dispatches to ("eager", "grouped_mm", ...). Per call it builds a
:class:`RoutedBatch` with one stable sort (rows grouped by expert, token order kept inside an expert), computes
the down_proj inputs ``h = glu(gate, up)`` per expert in fp32, and feeds two Hessian accumulators (gate+up share
``H_e = sum x x^T`` of dim H; down has dim I), optionally weighted by the routing weight (AGQ).
:class:`LinearCapture` does the same for ``nn.Linear`` modules
(single-"expert" accumulators) and :class:`LayerCapture` combines both for one decoder layer, with the optional
``sigmoid(shared_expert_gate(x))`` weighting of a gated shared expert. All hooks are removed on exit, also on
exceptions.

Accumulator protocol (``moequant.ops.HessianAccumulator``): ``acc = factory(num_experts, dim, device)``;
``acc.add(x [n,dim], expert_ids [n] int32, weights [n] float32 | None)``, ``x`` in the hidden states' dtype (bf16
for a bf16 layer; CUDA accumulators widen it exactly, others convert it to float32) or float32 (the down inputs
``h``); ``acc.hessians [E,dim,dim]``, ``acc.counts [E] int64``, ``acc.mass [E] float64``, ``acc.absmax [E]
float32`` (the largest |x| of each expert's rows).
"""
from __future__ import annotations

import abc
import contextlib
import inspect
import logging
from typing import Callable, Mapping

import torch
from torch import nn

from ..models.base import STANDARD, MoEFamily, intermediate_size, linear_modules, num_experts, split_expert
from .routing import RoutedBatch, expert_glu, expert_intermediate, route_tokens

__all__ = ["WEIGHTINGS", "AccumulatorFactory", "default_accumulator_factory", "flat_mask", "Hooks", "ExpertsCall",
           "ExpertCapture", "LinearCapture", "LayerCapture"]

logger = logging.getLogger(__name__)

WEIGHTINGS = ("none", "routing")

AccumulatorFactory = Callable[[int, int, torch.device], object]


def default_accumulator_factory(num_experts: int, dim: int, device: torch.device):
    """``moequant.ops.HessianAccumulator(num_experts, dim, dtype=float32, device=device)`` (imported lazily)."""
    from .. import ops

    return ops.HessianAccumulator(num_experts, dim, dtype=torch.float32, device=device)


def flat_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``mask`` flattened to bool ``[rows]``; None when there is none or it does not have one element a row."""
    if mask is None:
        return None
    if mask.numel() != rows:
        logger.debug("token mask of %d elements ignored for an input of %d rows", mask.numel(), rows)
        return None
    return mask.reshape(-1).bool()


class Hooks(abc.ABC):
    """Owns hook handles; removal is idempotent. Context manager base of the capture classes."""

    def __init__(self) -> None:
        self._handles: list = []

    @abc.abstractmethod
    def attach(self):
        """Registers the hooks and returns self."""

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ExpertsCall:
    """How a fused experts module is called: ``experts(hidden_states, top_k_index, top_k_weights)``, the last two
    under the names of its ``forward`` (GPT-OSS: ``router_indices`` / ``routing_weights``), positionally or by
    keyword. :meth:`bind` returns the three tensors of one call."""

    def __init__(self, experts: nn.Module) -> None:
        try:
            names = list(inspect.signature(experts.forward).parameters)[:3]
        except (TypeError, ValueError):
            names = []
        self.names = names if len(names) == 3 else ["hidden_states", "top_k_index", "top_k_weights"]

    def bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        vals = list(args[:3])
        for name in self.names[len(vals):]:
            if name not in kwargs:
                raise TypeError(f"experts called without {name!r}: args={len(args)} kwargs={list(kwargs)}")
            vals.append(kwargs[name])
        return vals


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
        self._call = ExpertsCall(experts)

    def attach(self) -> "ExpertCapture":
        if not self.attached:
            self._handles.append(self.experts.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.add_call(*self._call.bind(args, kwargs))

    @torch.no_grad()
    def add_call(self, hs: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        """Feeds one experts call ``(hidden_states, top_k_index, top_k_weights)`` as the hook does (ids outside
        ``[0, num_experts)`` are pads: the expert streaming engine passes a group's view of the experts with the
        other experts' slots padded)."""
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


class LinearCapture(Hooks):
    """Capture the inputs of plain ``nn.Linear`` modules into single-expert accumulators.

    Args:
        modules: ``{name: nn.Linear}`` (e.g. :func:`moequant.models.linear_modules`).
        weight_fns: optional ``{name: fn() -> [n] float32 | None}`` giving per-row weights at hook time
            (used for the gated shared expert).
        accumulator_factory: as in :class:`ExpertCapture`; ``self.accumulators[name]`` has E=1, dim=in_features.
        on_input: optional ``callback(name, x [n, in] float32, weights | None)``.
        share_inputs: Linears that receive the very same input tensor object in one forward (q/k/v of an
            attention, gate/up of a shared expert, DeepSeek's q_a/kv_a) share one accumulator: the first forward
            decides which module owns it (``self.shares``: alias -> owner) and later forwards only check that the
            input is still shared (RuntimeError naming both modules otherwise), so the Hessian is accumulated once.
    """

    _RECENT = 4  # inputs remembered for sharing (modules reading one input need not be called back to back)

    def __init__(self, modules: Mapping[str, nn.Linear], *, weight_fns: Mapping[str, Callable] | None = None,
                 accumulator_factory: AccumulatorFactory | None = None, accumulate: bool = True,
                 on_input: Callable[[str, torch.Tensor, torch.Tensor | None], None] | None = None,
                 share_inputs: bool = True) -> None:
        super().__init__()
        self.modules = dict(modules)
        self.weight_fns = dict(weight_fns or {})
        self.on_input = on_input
        self.token_mask: torch.Tensor | None = None
        self.share_inputs = share_inputs
        self.shares: dict[str, str] = {}
        self._decided: set[str] = set()
        self._recent: list = []  # [(raw input, owner name, weight fn, mask)] of the last hook calls
        make = accumulator_factory or default_accumulator_factory
        self.accumulators = {n: make(1, m.in_features, m.weight.device) for n, m in self.modules.items()} \
            if accumulate else {}

    def attach(self) -> "LinearCapture":
        if not self.attached:
            for name, mod in self.modules.items():
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def remove(self) -> None:
        super().remove()
        self._recent.clear()

    def _owner_of_input(self, name: str, raw: torch.Tensor, fn) -> str | None:
        """The module that already accumulated this very input in this forward (same weights and mask), if any."""
        for x, owner, f, mask in reversed(self._recent):
            if x is raw and f == fn and mask is self.token_mask and owner != name \
                    and self.modules[owner].in_features == self.modules[name].in_features:
                return owner
        return None

    def _shared_with(self, name: str, raw: torch.Tensor, fn) -> str | None:
        """Decides (first forward) or checks (later forwards) whether ``name`` reuses another module's Hessian."""
        if not self.share_inputs or name not in self.accumulators:
            return None
        owner = self._owner_of_input(name, raw, fn)
        if name not in self._decided:
            self._decided.add(name)
            if owner is not None:
                self.shares[name] = owner  # owners recorded in _recent are never aliases themselves
                self.accumulators[name] = self.accumulators[owner]
        elif name in self.shares and owner != self.shares[name]:
            raise RuntimeError(f"LinearCapture: {name} received the same input as {self.shares[name]} in the first "
                               f"forward but not in this one, so their shared Hessian would be wrong; construct "
                               f"the capture with share_inputs=False for this model")
        return self.shares.get(name)

    def _make_hook(self, name: str):
        @torch.no_grad()
        def hook(module: nn.Module, args: tuple) -> None:
            raw = args[0]
            fn = self.weight_fns.get(name)
            shared = self._shared_with(name, raw, fn)
            self._recent = (self._recent + [(raw, shared or name, fn, self.token_mask)])[-self._RECENT:]
            if shared is not None and self.on_input is None:
                return
            x = raw.reshape(-1, raw.shape[-1])  # its own dtype: the accumulator converts what it must
            w = fn() if fn is not None else None
            mask = flat_mask(self.token_mask, x.shape[0])
            if mask is not None:
                x = x[mask]
                w = w[mask] if w is not None else None
            if shared is None and name in self.accumulators and x.shape[0]:
                ids = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
                self.accumulators[name].add(x, ids, w)
            if self.on_input is not None:
                self.on_input(name, x.float(), w)
        return hook


class LayerCapture(Hooks):
    """Everything one decoder layer needs for calibration: routed experts + quantized Linears.

    Args:
        layer: a decoder layer; family: its :class:`MoEFamily`; layer_prefix: full name (``"model.layers.3"``).
        weighting: routed experts weighting, ``"none"`` | ``"routing"``.
        shared_weighting: ``"none"`` | ``"gate"`` -- weight the gated shared expert's Linears by
            ``sigmoid(shared_expert_gate(x))`` (ignored when the family has no shared_expert_gate).
        on_batch, accumulator_factory, compute_h, all_tokens, all_token_down: forwarded to :class:`ExpertCapture`.
        experts: False captures the Linears only (the expert streaming engine feeds the experts itself).

    Attributes: ``experts`` (:class:`ExpertCapture` or None for a dense layer), ``linears`` (:class:`LinearCapture`).
    """

    def __init__(self, layer: nn.Module, family: MoEFamily, *, layer_prefix: str = "", weighting: str = "none",
                 shared_weighting: str = "none", on_batch: Callable[[RoutedBatch], None] | None = None,
                 accumulator_factory: AccumulatorFactory | None = None, compute_h: bool = True,
                 accumulate: bool = True, all_tokens: bool = False, all_token_down: bool = False,
                 experts: bool = True) -> None:
        super().__init__()
        if shared_weighting not in ("none", "gate"):
            raise ValueError(f"shared_weighting must be 'none' or 'gate', got {shared_weighting!r}")
        self.layer, self.family = layer, family
        ex = family.experts_of(layer) if experts else None
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
