"""How much the language-model loss reacts to each decoder layer's output and to each quantized matrix's output
(:func:`loss_sensitivity`), computed layer by layer on a lazily opened model.

For an output y (the residual stream after layer L, or one matrix's output ``y = W x``) with gradient
``g_t = dLoss/dy_t`` of the summed next-token cross-entropy of the unquantized model at token t, an error ``e_t``
added to y raises the loss by about ``sum_t e_t^T F e_t / 2`` with F the Fisher information of y; for errors without
a preferred direction that is ``sum_t ||g_t||^2 ||e_t||^2 / (2 d)``. So

* ``layers[L] = mean_t ||dLoss/dh_{L+1}[t]||^2`` says how much a squared error in layer L's output costs, compared
  across layers (the budget's ``sensitivity: layer``);
* ``matrices[name] = sum_t ||g_t||^2 / d_out`` over the tokens the matrix sees says how much its mean squared output
  error ``tr(dW H dW^T)`` costs (``sensitivity: matrix``). A routed expert's matrices see only their routed tokens:
  its down_proj's output enters the layer scaled by the routing weight c, so ``g = c * dLoss/d(experts output)``; its
  gate and up outputs get their gradient through the GLU and down_proj (recomputed per expert in float32), and share
  one value (the mean over both outputs' dimensions: they share one solve).

One forward pass keeps every layer's inputs (``samples x seq_len x hidden`` values per layer, in host memory), the
model's own head gives the gradient at the last layer's output, and a backward pass loads the layers again in reverse
and carries the gradient down with one vector-Jacobian product each (hooks on the layer's Linears and on its experts
module read the matrix outputs' gradients). Two reads of the checkpoint, about three forwards' compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models import linear_modules, num_experts, split_expert
from ..models.lazy import LazyModel, record_layer_inputs
from .capture import ExpertsCall
from .routing import route_tokens

__all__ = ["Sensitivity", "loss_sensitivity"]


@dataclass
class Sensitivity:
    """``layers[L]``: mean squared loss gradient per token at layer L's output; ``matrices``: on-disk matrix name ->
    summed squared loss gradient of its output per output dimension (module docstring); ``tokens``: tokens behind
    them."""

    layers: list
    matrices: dict = field(default_factory=dict)
    tokens: int = 0


class _Inject(nn.Module):
    """Stands in for the decoder layers: returns the given final hidden states (the model's head runs on them)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


def _decoder(lazy: LazyModel) -> nn.Module:
    prefix = lazy.layer_prefix(0)
    return lazy.model.get_submodule(prefix.rsplit(".", 2)[0]) if prefix.count(".") >= 2 else lazy.model


def _out(y):
    return y[0] if isinstance(y, tuple) else y


class _MatrixGrads:
    """Hooks on one layer's Linears and experts module that keep their outputs (gradients retained) and, after each
    backward, add the squared output gradients per matrix to ``sums`` (on-disk names)."""

    def __init__(self, layer: nn.Module, lazy: LazyModel, prefix: str, sums: dict) -> None:
        fam = lazy.family
        self.fam, self.prefix, self.sums = fam, prefix, sums
        self.linears = {fam.disk_name(n): m for n, m in linear_modules(layer, fam, prefix).items()}
        self.experts = fam.experts_of(layer)
        self.outs: dict = {}
        self.calls: list = []
        self.handles = []
        for name, m in self.linears.items():
            self.handles.append(m.register_forward_hook(lambda mod, a, o, n=name: self._keep(n, o)))
        if self.experts is not None:
            call = ExpertsCall(self.experts)
            self.handles.append(self.experts.register_forward_pre_hook(
                lambda mod, a, k: self.calls.append(call.bind(a, k)), with_kwargs=True))
            self.handles.append(self.experts.register_forward_hook(lambda mod, a, o: self._keep("experts", o)))

    def _keep(self, name: str, out) -> None:
        out = _out(out)
        if out.requires_grad:
            out.retain_grad()
            self.outs[name] = out

    def _add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value

    def collect(self) -> None:
        """After a backward: the batch's squared gradients into ``sums``."""
        for name, out in self.outs.items():
            if name != "experts" and out.grad is not None:
                self._add(name, float(out.grad.double().pow(2).sum()) / out.shape[-1])
        out = self.outs.get("experts")
        if out is not None and out.grad is not None and self.calls:
            self._experts(self.calls[-1], out.grad)
        self.outs, self.calls = {}, []

    def _experts(self, call, grad: torch.Tensor) -> None:
        fam, ex = self.fam, self.experts
        hs, idx, w = (t.detach() for t in call)
        g = grad.reshape(-1, grad.shape[-1]).float()
        batch = route_tokens(hs, idx, w, num_experts(ex))
        off = batch.offsets.tolist()
        for e in range(batch.num_experts):
            a, b = off[e], off[e + 1]
            if b == a:
                continue
            t = split_expert(ex, fam, e)
            names = fam.disk_expert_names(self.prefix, e)
            gy = batch.weights[a:b, None].float() * g[batch.token_index[a:b]]  # dLoss/d(down output)
            self._add(names["down"], float(gy.double().pow(2).sum()) / gy.shape[-1])
            x = batch.x[a:b].float()
            with torch.enable_grad():
                gate = (x @ t.gate.detach().float().t()).requires_grad_(True)
                up = (x @ t.up.detach().float().t()).requires_grad_(True)
                gb = gate if t.gate_bias is None else gate + t.gate_bias.detach().float()
                ub = up if t.up_bias is None else up + t.up_bias.detach().float()
                y = fam.glu(ex, gb, ub) @ t.down.detach().float().t()
                (y * gy).sum().backward()
            s = float(gate.grad.double().pow(2).sum() + up.grad.double().pow(2).sum()) / (2 * gate.shape[-1])
            self._add(names["gate"], s)
            self._add(names["up"], s)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def loss_sensitivity(lazy: LazyModel, ids: torch.Tensor, device, batch_size: int = 4,
                     matrices: bool = False) -> Sensitivity:
    """The :class:`Sensitivity` of every layer (and with ``matrices`` of every quantizable matrix) of ``lazy`` on token
    ids ``[N, S]`` (N windows), computed on ``device`` in the model's dtype; ``batch_size`` windows at a time."""
    device = torch.device(device)
    batches = list(ids.split(batch_size))
    recorded = [record_layer_inputs(lazy, b, device) for b in batches]
    kwargs = [r.kwargs_per_layer for r in recorded]
    inputs: list[list[torch.Tensor]] = [[r.hidden_states.cpu() for r in recorded]]
    with torch.no_grad():
        for i in range(lazy.num_layers):
            layer = lazy.load_layer(i, device)
            inputs.append([_out(layer(h.to(device), **kw[i])).cpu() for h, kw in zip(inputs[-1], kwargs)])
            del layer
    grads = []
    dec = _decoder(lazy)
    saved = dec.layers
    try:
        for b, h in zip(batches, inputs[-1]):
            leaf = h.to(device).detach().requires_grad_(True)
            dec.layers = nn.ModuleList([_Inject(leaf)])
            lazy.model.to(device)  # the head (the meta layers are out of the model meanwhile)
            with torch.enable_grad():
                logits = lazy.model(input_ids=b.to(device), use_cache=False).logits.float()
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                   b[:, 1:].reshape(-1).to(device), reduction="sum")
                loss.backward()
            grads.append(leaf.grad.detach())
    finally:
        dec.layers = saved
    tokens = sum(g.numel() // g.shape[-1] for g in grads)
    out = Sensitivity([0.0] * lazy.num_layers, {}, tokens)
    for i in reversed(range(lazy.num_layers)):
        out.layers[i] = sum(float(g.double().pow(2).sum()) for g in grads) / max(tokens, 1)
        if i == 0 and not matrices:
            break
        layer = lazy.load_layer(i, device)
        layer.requires_grad_(False)
        hooks = _MatrixGrads(layer, lazy, lazy.layer_prefix(i), out.matrices) if matrices else None
        down = []
        try:
            for h, g, kw in zip(inputs[i], grads, kwargs):
                x = h.to(device).detach().requires_grad_(True)
                with torch.enable_grad():
                    _out(layer(x, **kw[i])).backward(g)
                down.append(x.grad.detach())
                if hooks is not None:
                    hooks.collect()
        finally:
            if hooks is not None:
                hooks.remove()
        grads = down
        del layer
    return out
