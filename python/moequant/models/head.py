"""The model's own head on given final hidden states: :func:`final_hidden`, a context in which the lazy model's
decoder layers are replaced by one module that returns those states, so that ``lazy.model(input_ids=...)`` runs
the embeddings (ignored), the final norm, the lm_head and any logit scaling exactly as the model does. Used by
``moequant compare`` (logits of two hidden-state streams) and the loss sensitivities of the budget (gradients at
the last layer's output)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["final_hidden", "decoder_module"]


class _Inject(nn.Module):
    """Stands in for the decoder layers: returns the given final hidden states."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


def decoder_module(lazy) -> nn.Module:
    """The module that holds the decoder layers (``.layers``) of a :class:`~moequant.models.lazy.LazyModel`."""
    prefix = lazy.layer_prefix(0)
    return lazy.model.get_submodule(prefix.rsplit(".", 2)[0]) if prefix.count(".") >= 2 else lazy.model


@contextlib.contextmanager
def final_hidden(lazy, hidden: torch.Tensor) -> Iterator[None]:
    """Within the context, the model's decoder layers are one module returning ``hidden`` ``[B, S, H]``; they are
    put back on exit (also on an exception)."""
    dec = decoder_module(lazy)
    saved = dec.layers
    dec.layers = nn.ModuleList([_Inject(hidden)])
    try:
        yield
    finally:
        dec.layers = saved
