"""How much the language-model loss reacts to the residual stream after each decoder layer (:func:`residual_sensitivity`),
computed layer by layer on a lazily opened model.

``s[L] = mean_t ||dLoss / dh_{L+1}[t]||^2`` over calibration tokens t, with h_{L+1} the output of layer L and Loss the
summed next-token cross-entropy of the unquantized model. An error e added to that residual stream raises the loss
by about ``e^T F e / 2`` (F the Fisher information of h, whose trace per token is s[L]); for errors without a
preferred direction that is ``s[L] / d * ||e||^2 / 2``, so s[L] is how much a squared output error of layer L costs,
compared across layers (the budget's ``layer_scale: fisher``).

One forward pass keeps every layer's inputs (``samples x seq_len x hidden`` values per layer, in host memory), the
model's own head gives the gradient at the last layer's output, and a backward pass loads the layers again in reverse
and carries the gradient down with one vector-Jacobian product each. Two reads of the checkpoint, about three
forwards' compute.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.lazy import LazyModel, record_layer_inputs

__all__ = ["residual_sensitivity"]


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


def residual_sensitivity(lazy: LazyModel, ids: torch.Tensor, device, batch_size: int = 4) -> list[float]:
    """``s[L]`` (module docstring) for every layer L of ``lazy`` on token ids ``[N, S]`` (N windows), computed on
    ``device`` in the model's dtype; ``batch_size`` windows at a time."""
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
    sens = [0.0] * lazy.num_layers
    for i in reversed(range(lazy.num_layers)):
        sens[i] = sum(float(g.double().pow(2).sum()) for g in grads) / max(tokens, 1)
        if i == 0:
            break
        layer = lazy.load_layer(i, device)
        layer.requires_grad_(False)
        down = []
        for h, g, kw in zip(inputs[i], grads, kwargs):
            x = h.to(device).detach().requires_grad_(True)
            with torch.enable_grad():
                _out(layer(x, **kw[i])).backward(g)
            down.append(x.grad.detach())
        grads = down
        del layer
    return sens
