"""The state AWQ's stages share over one decoder layer (:class:`AWQContext`)."""
from __future__ import annotations

import torch

from ...models import MoEFamily, linear_modules

__all__ = ["AWQContext"]


class AWQContext:
    """One decoder layer under AWQ, its recorded inputs and the recipe: what the three stages
    (:mod:`moequant.methods.awq.layer`, :mod:`moequant.methods.awq.pairs`) share.

    Attributes:
        layer, fam (its :class:`~moequant.models.MoEFamily`), recipe, cfg (``recipe.awq``), prefix
        (``"model.layers.3"``), index, device, storage (the checkpoint dtype): the layer being smoothed.
        kwargs: per calibration batch, the recorded keyword arguments of every layer (``kwargs[batch][index]``).
        experts: the fused routed experts module, or None for a dense layer.
        sel: the calibration batches used (whole batches up to ``awq.max_tokens`` tokens); inputs: those batches
            on ``device``, by batch index.
        linears: layer-relative names of the Linears the pipeline quantizes.
        tensors: changed high-precision tensors by checkpoint name (:meth:`keep`), the result for the export.
        changed_experts: ``(expert, "gate" | "up" | "down")`` changed in place.
        expert_schemes: per projection, the scheme (or None) of every expert, resolved once
            (:meth:`expert_schemes_of`).
        fq_chunks: per gate/up projection, the quantized experts grouped by format, in chunks (stage 1's cache).
    """

    def __init__(self, layer, family: MoEFamily, recipe, prefix, hidden, kwargs, index, device, storage):
        self.layer, self.fam, self.recipe, self.cfg = layer, family, recipe, recipe.awq
        self.prefix, self.kwargs, self.index = prefix, kwargs, index
        self.device, self.storage = device, storage
        self.experts = family.experts_of(layer)
        n, self.sel = 0, []
        # the shapes without reading the batches (a disk-backed store, moequant.pipeline.states, has them)
        shapes = getattr(hidden, "shapes", None) or [tuple(h.shape) for h in hidden]
        for i, shape in enumerate(shapes):
            if n >= self.cfg.max_tokens:
                break
            self.sel.append(i)
            n += shape[0] * shape[1]
        # the selected inputs on the layer's device once (the stages run the layer ~6 times over them)
        self.inputs = {i: hidden[i].to(device) for i in self.sel}
        self.linears = set(linear_modules(layer, family))  # layer-relative names the pipeline quantizes
        self.tensors: dict = {}
        self.changed_experts: set = set()  # (expert, "gate" | "up" | "down") changed in place
        self.expert_schemes: dict = {}  # "gate" | "up" | "down" -> [scheme or None per expert], resolved once
        self.fq_chunks: dict = {}  # "gate" | "up" -> [(IntFormat, expert index tensor)], built once

    def disk(self, rel: str) -> str:
        return self.fam.disk_name(f"{self.prefix}.{rel}")

    def scheme(self, rel: str):
        """The scheme of a layer-relative Linear, None when the pipeline keeps it in high precision."""
        return self.recipe.resolve(self.disk(rel)) if rel in self.linears else None

    def expert_schemes_of(self, proj: str) -> list:
        """The scheme of every routed expert's ``proj`` ("gate" | "up" | "down"; None: kept in high precision),
        resolved once per layer."""
        if proj not in self.expert_schemes:
            self.expert_schemes[proj] = [self.recipe.resolve(self.fam.disk_expert_names(self.prefix, e)[proj])
                                         for e in range(self.experts.gate_up_proj.shape[0])]
        return self.expert_schemes[proj]

    def run(self, hooks: list) -> list:
        """Runs the selected batches through the layer with ``hooks`` = [(module, kind, fn)] attached."""
        handles, outs = [], []
        try:
            for mod, kind, fn in hooks:
                handles.append(mod.register_forward_pre_hook(fn, with_kwargs=True) if kind == "pre"
                               else mod.register_forward_hook(fn))
            for i in self.sel:
                y = self.layer(self.inputs[i], **self.kwargs[i][self.index])
                outs.append(y[0] if isinstance(y, tuple) else y)
        finally:
            for h in handles:
                h.remove()
        return outs

    def keep(self, name: str, t: torch.Tensor) -> None:
        """Rounds a changed high-precision tensor to the checkpoint dtype in place and records it for export."""
        r = t.detach().to(self.storage)
        if r.dtype != t.dtype:
            t.copy_(r)
        self.tensors[name] = r.to("cpu", copy=True)
