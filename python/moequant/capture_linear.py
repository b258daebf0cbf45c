"""Capture of the inputs of plain ``nn.Linear`` modules (attention, dense and shared-expert MLPs) into
single-expert Hessian accumulators; re-exported by :mod:`moequant.capture`."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from .capture_base import AccumulatorFactory, Hooks, default_accumulator_factory, flat_mask

__all__ = ["LinearCapture"]


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
