"""What an attention stores in its KV cache, seen where transformers stores it.

transformers' attentions compute ``key_states`` (the ``k_proj`` output, through ``k_norm`` where the model has one
-- Qwen3 -- and RoPE) and ``value_states``, then call ``past_key_values.update(key_states, value_states,
layer_idx)`` and attend over what it returns. :class:`KVCacheHooks` puts a :class:`CacheTap` in the place of
``past_key_values`` (a forward pre-hook on the attention module, as compressed-tensors' ``QuantizedKVCache`` does):
its ``update`` hands the keys and values to a callback, which may replace them (the FP8 simulation of ``moequant
eval``) or only look at them (the calibration of ``k_scale`` / ``v_scale``: :class:`KVObserver`), and passes them
on to the real cache when there is one. So the keys seen are exactly the cached ones, post-``k_norm`` and
post-RoPE, whatever the family computes before.

The attentions with a KV cache of keys and values are the modules named ``self_attn`` with ``k_proj`` and
``v_proj`` (:func:`kv_attentions`): the MLA attentions of DeepSeek-V2 / V3 cache a compressed latent instead, and
Qwen3-Next's linear-attention layers have no KV cache.
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .capture import Hooks

__all__ = ["kv_attentions", "CacheTap", "KVCacheHooks", "KVObserver"]

KVCallback = Callable[[str, torch.Tensor, torch.Tensor], Optional[tuple]]


def kv_attentions(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """``{full name: attention module}`` of the attentions of ``model`` (a model or one decoder layer, names
    prefixed with ``prefix``) that cache keys and values: modules named ``self_attn`` with ``k_proj`` and ``v_proj``
    submodules (module docstring)."""
    out = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] != "self_attn":
            continue
        if isinstance(getattr(mod, "k_proj", None), nn.Module) and isinstance(getattr(mod, "v_proj", None), nn.Module):
            out[f"{prefix}.{name}" if prefix else name] = mod
    return out


class CacheTap:
    """Stands in for an attention's ``past_key_values`` for one forward: ``update(k, v, *args, **kwargs)`` calls
    ``callback(name, k, v)`` (a returned ``(k, v)`` replaces them) and then the wrapped cache's ``update``, or
    returns ``(k, v)`` when the model runs without a cache. Other attributes are the wrapped cache's."""

    def __init__(self, name: str, callback: KVCallback, inner=None) -> None:
        self._name, self._callback, self._inner = name, callback, inner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = self._callback(self._name, key_states, value_states)
        if out is not None:
            key_states, value_states = out
        if self._inner is None:
            return key_states, value_states
        return self._inner.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("_inner")
        if inner is None:
            raise AttributeError(f"{type(self).__name__} (no cache in this forward) has no attribute {name!r}")
        return getattr(inner, name)


def _cache_parameter(module: nn.Module) -> tuple[str, int]:
    """The name and position of the attention forward's cache argument (``past_key_values``; older families
    ``past_key_value``)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        params = []
    for name in ("past_key_values", "past_key_value"):
        if name in params:
            return name, params.index(name)
    raise ValueError(f"{type(module).__name__}.forward has no past_key_values argument: moequant cannot see its KV "
                     f"cache (transformers >= 5 attentions take one)")


class KVCacheHooks(Hooks):
    """Taps the KV cache of the given attentions (``{name: module}``, :func:`kv_attentions`): ``callback(name,
    key_states, value_states)`` sees every key and value an attention stores (``[batch, kv_heads, seq, head_dim]``)
    and may return replacements. Hooks removed on exit."""

    def __init__(self, attentions: Mapping[str, nn.Module], callback: KVCallback) -> None:
        super().__init__()
        self.attentions, self.callback = dict(attentions), callback
        self._params = {n: _cache_parameter(m) for n, m in self.attentions.items()}

    def attach(self) -> "KVCacheHooks":
        if not self.attached:
            for name, mod in self.attentions.items():
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name), with_kwargs=True))
        return self

    def _make_hook(self, name: str):
        key, pos = self._params[name]

        def hook(module, args, kwargs):
            if len(args) > pos:  # passed positionally (args[0] is the first argument after self)
                args = (*args[:pos], CacheTap(name, self.callback, args[pos]), *args[pos + 1:])
            else:
                kwargs[key] = CacheTap(name, self.callback, kwargs.get(key))
            return args, kwargs
        return hook


class KVObserver:
    """Largest ``|key|`` and ``|value|`` per attention over everything it stored (the calibration of
    ``k_scale`` / ``v_scale``): pass :meth:`observe` as a :class:`KVCacheHooks` callback; ``amax[name]`` is a
    float32 ``[2]`` tensor (keys, values) on the attention's device. ``token_mask`` (bool, one element per token of
    the next forward, or None) drops padding tokens."""

    def __init__(self) -> None:
        self.amax: dict[str, torch.Tensor] = {}
        self.token_mask: Optional[torch.Tensor] = None

    @torch.no_grad()
    def observe(self, name: str, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        m = []
        for t in (key_states, value_states):
            a = t.detach().abs()
            mask = self.token_mask
            if mask is not None and t.dim() == 4 and mask.numel() == t.shape[0] * t.shape[2]:
                a = a * mask.reshape(t.shape[0], 1, t.shape[2], 1).to(a.device, a.dtype)
            m.append(a.amax().float() if a.numel() else torch.zeros((), device=a.device))
        cur = torch.stack(m)
        self.amax[name] = torch.maximum(self.amax[name], cur) if name in self.amax else cur
        return None
