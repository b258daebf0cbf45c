"""The quantized KV cache: the recipe's ``kv_cache: fp8`` (llm-compressor's ``kv_cache_scheme``), its
compressed-tensors ``kv_cache_scheme`` block and the per-attention scales a checkpoint stores.

An FP8 E4M3 KV cache stores every key and value ``x`` of an attention as ``e4m3(x / scale)`` with one static scale
per attention for the keys (``<attention>.k_scale``) and one for the values (``<attention>.v_scale``); the
runtime reads them back times the scale (vLLM with ``--kv-cache-dtype fp8``). The scales come from calibration:
``amax / 448`` of the keys (after the projection, ``k_norm`` where the model has one, and RoPE: what the cache
stores) and of the values over every calibration token, as llm-compressor's ``static_minmax`` observer and
compressed-tensors' ``calculate_qparams`` compute them (a zero maximum gives the scale dtype's eps). They are
stored as compressed-tensors registers them on the attention module: shape ``[1]``, in the checkpoint dtype.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

__all__ = ["KV_CACHE_KINDS", "KV_SCALE_NAMES", "FP8_E4M3_MAX", "check_kv_cache", "kv_cache_scheme_args",
           "kv_cache_kind", "kv_scale"]

KV_CACHE_KINDS = ("fp8",)
KV_SCALE_NAMES = ("k_scale", "v_scale")
FP8_E4M3_MAX = 448.0


def check_kv_cache(value, where: str = "kv_cache") -> Optional[str]:
    """``value`` as a KV-cache kind (``"fp8"``, case-insensitive) or None (no KV-cache quantization); ValueError
    naming ``where`` otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in KV_CACHE_KINDS:
        return value.lower()
    raise ValueError(f"{where}: expected one of {', '.join(map(repr, KV_CACHE_KINDS))} or null, got {value!r}")


def kv_cache_scheme_args(kind: Optional[str]) -> Optional[dict]:
    """compressed-tensors' ``kv_cache_scheme`` of a kind (None for None): FP8 E4M3, one static symmetric scale per
    tensor, as llm-compressor writes it and vLLM's ``CompressedTensorsKVCacheMethod`` accepts (8-bit float,
    strategy ``tensor``, symmetric)."""
    if check_kv_cache(kind) is None:
        return None
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "group_size": None,
            "dynamic": False, "observer": "static_minmax"}


def kv_cache_kind(args: Optional[Mapping]) -> Optional[str]:
    """The kind of a checkpoint's ``kv_cache_scheme`` (None when it is null); ValueError for a scheme moequant does
    not simulate (anything but 8-bit float, per tensor, symmetric, static)."""
    if not args:
        return None
    if (args.get("type") == "float" and args.get("num_bits") == 8 and args.get("strategy", "tensor") == "tensor"
            and args.get("symmetric", True) and not args.get("dynamic", False)):
        return "fp8"
    raise ValueError(f"quantization_config: kv_cache_scheme {dict(args)} is not one moequant reads (it writes and "
                     f"simulates FP8 E4M3 with per-tensor static scales)")


def kv_scale(amax: torch.Tensor | float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The stored scale of an observed absolute maximum: ``amax / 448`` in float32, 0 replaced by the eps of
    ``dtype``, rounded to ``dtype``; shape ``[1]``, on ``amax``'s device."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    if not bool(torch.isfinite(a).all()) or float(a) < 0:
        raise ValueError(f"amax: expected a finite value >= 0, got {float(a)}")
    s = a / torch.full((), FP8_E4M3_MAX, device=a.device)  # true division on CUDA too (not times 1/448)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(dtype).eps), s)
    return s.to(dtype)
