"""The compressed-tensors tensors of one quantized Linear ``<prefix>`` (:func:`compressed_tensor_names`) and their
inverse, the weight a loader reconstructs from them (:func:`decompress`). One function per compressed-tensors
format (docs/formats.md, docs/export.md; ``weight_dtype`` is the checkpoint's weight dtype):

====================  ==============================================================================================
format                tensors
====================  ==============================================================================================
pack-quantized        ``weight_packed`` int32 ``[out, ceil(in*b/32)]``, ``weight_scale`` weight_dtype ``[out, G]``,
                      ``weight_shape`` int64 ``[2]``, ``weight_zero_point`` int32 ``[ceil(out*b/32), G]`` (asym)
int-quantized         ``weight`` int8 ``[out, in]``, ``weight_scale`` weight_dtype ``[out, 1]``
float-quantized       ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` weight_dtype ``[out, 1]`` (per channel)
                      or ``[ceil(out/128), ceil(in/128)]`` (blocks)
nvfp4-pack-quantized  ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` float8_e4m3fn ``[out, in/16]``,
                      ``weight_global_scale`` float32 ``[1]``, ``input_global_scale`` float32 ``[1]`` (NVFP4 W4A4)
mxfp4-pack-quantized  ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` uint8 ``[out, in/32]`` (E8M0)
mxfp6-pack-quantized  ``weight_packed`` uint8 ``[out, in*3/4]`` (four E2M3 codes in three bytes), ``weight_scale``
                      uint8 ``[out, in/32]`` (E8M0)
mxfp8-quantized       ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` uint8 ``[out, in/32]`` (E8M0)
====================  ==============================================================================================
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .activations import ActivationFormat
from .compressed_tensors import as_format
from .floating import FloatFormat
from .integer import IntFormat
from .schemes import (FLOAT_QUANTIZED, INT_QUANTIZED, MXFP4_PACK_QUANTIZED, MXFP6_PACK_QUANTIZED, MXFP8_QUANTIZED,
                      NVFP4_PACK_QUANTIZED, PACK_QUANTIZED, compression_format)

__all__ = ["compressed_tensor_names", "decompress", "COMPANIONS"]

COMPANIONS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
              "weight_global_scale", "input_global_scale")
"""Tensor names (after ``<prefix>.``) a quantized Linear may have besides ``weight``."""


_STORES = {"int": (PACK_QUANTIZED, INT_QUANTIZED), "fp8": (FLOAT_QUANTIZED,), "fp8_block": (FLOAT_QUANTIZED,),
           "nvfp4": (NVFP4_PACK_QUANTIZED,), "mxfp4": (MXFP4_PACK_QUANTIZED,), "mxfp6": (MXFP6_PACK_QUANTIZED,),
           "mxfp8": (MXFP8_QUANTIZED,)}
# the packed width of a row of `cols` codes of the packed FP formats: two FP4 codes a byte, four FP6 in three bytes
_PACKED_COLS = {MXFP4_PACK_QUANTIZED: lambda cols: math.ceil(cols / 2),
                NVFP4_PACK_QUANTIZED: lambda cols: math.ceil(cols / 2),
                MXFP6_PACK_QUANTIZED: lambda cols: math.ceil(cols * 3 / 4)}


def _exact_scales(prefix: str, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scale`` in ``dtype``, which must hold every value exactly (ValueError otherwise)."""
    out = scale.detach().to("cpu", dtype)
    if not torch.equal(out.float(), scale.detach().to("cpu", torch.float32)):
        raise ValueError(
            f"{prefix}: scales are not exactly representable in {dtype}; quantize with the scale dtype set "
            "to the checkpoint's weight dtype so that loaders dequantize to exactly the optimized weights"
        )
    return out


def _check_shape(prefix: str, name: str, t: torch.Tensor, shape: tuple, dtype=None) -> None:
    if tuple(t.shape) != tuple(shape) or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{prefix}: {name}: expected {dtype or ''} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")


def compressed_tensor_names(prefix: str, qt: Any, weight_dtype: torch.dtype, compression: Optional[str] = None,
                            activations: Optional[ActivationFormat] = None) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized Linear (module docstring), insertion-ordered.

    Args:
        prefix: on-disk module name, e.g. ``"model.layers.0.mlp.experts.3.gate_proj"``.
        qt: the quantized weight: an integer one (``codes`` int8 [out, in], ``scale`` [out, G], ``zero_point``
            [out, G] and an :class:`IntFormat`, :func:`moequant.formats.as_format`) or a floating-point one
            (:class:`moequant.ops.FloatQuantizedTensor`: ``codes`` uint8, ``scale`` values, ``scale_codes``,
            ``global_scale``, ``input_global_scale``, a :class:`FloatFormat`).
        weight_dtype: the checkpoint's weight dtype; integer and FP8 scales are stored in it and must be exactly
            representable (quantize with the scale dtype set to the checkpoint dtype).
        compression: the compressed-tensors format of the module's config group (default: the format's own,
            ``pack-quantized`` for integers). activations: the group's input activations (NVFP4 W4A4 writes the
            module's ``input_global_scale``, which ``qt`` must then carry).
    """
    fmt = as_format(qt)
    if compression is None or activations is not None:
        expected = compression_format(fmt, activations)
        compression = compression or expected
        if compression != expected:
            raise ValueError(f"{prefix}: a {fmt.label()} weight with {activations.label()} activations is stored as "
                             f"{expected!r}, got {compression!r}")
    elif compression not in _STORES.get(getattr(fmt, "kind", "int"), ()):
        raise ValueError(f"{prefix}: a {fmt.label()} weight cannot be stored as {compression!r}")
    codes = qt.codes
    if codes.dim() != 2:
        raise ValueError(f"{prefix}: codes: expected [out, in], got {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    if compression == PACK_QUANTIZED:
        return _pack_quantized(prefix, qt, fmt, weight_dtype)
    if compression == INT_QUANTIZED:
        if fmt.bits != 8 or not fmt.symmetric or not (fmt.per_channel or fmt.group_size >= in_f):
            raise ValueError(f"{prefix}: int-quantized stores int8 symmetric per-channel weights, got {fmt.label()}")
        _check_shape(prefix, "codes", codes, (out_f, in_f), torch.int8)
        _check_shape(prefix, "scale", qt.scale, (out_f, 1))
        return {f"{prefix}.weight": codes.detach().cpu().contiguous(),
                f"{prefix}.weight_scale": _exact_scales(prefix, qt.scale, weight_dtype)}
    _check_shape(prefix, "codes", codes, (out_f, in_f), torch.uint8)
    _check_shape(prefix, "scale", qt.scale, fmt.scale_shape(out_f, in_f))
    codes = codes.detach().cpu().contiguous()
    if compression == FLOAT_QUANTIZED:
        return {f"{prefix}.weight": codes.view(torch.float8_e4m3fn),
                f"{prefix}.weight_scale": _exact_scales(prefix, qt.scale, weight_dtype)}
    from moequant import ops  # the native extension; imported lazily so this module imports without it

    scale_codes = qt.scale_codes.detach().cpu().contiguous()
    _check_shape(prefix, "scale codes", scale_codes, fmt.scale_shape(out_f, in_f), torch.uint8)
    if compression == MXFP8_QUANTIZED:  # FP8 bytes as they are
        return {f"{prefix}.weight": codes.view(torch.float8_e4m3fn), f"{prefix}.weight_scale": scale_codes}
    packed = ops.pack_fp_codes(codes, getattr(ops.ElementKind, fmt.element))
    _check_shape(prefix, "packed codes", packed, (out_f, _PACKED_COLS[compression](in_f)), torch.uint8)
    if compression in (MXFP4_PACK_QUANTIZED, MXFP6_PACK_QUANTIZED):
        return {f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": scale_codes}
    out = {f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": scale_codes.view(torch.float8_e4m3fn),
           f"{prefix}.weight_global_scale": _one(prefix, "global_scale", qt.global_scale)}
    if activations is not None and activations.static_global_scale:
        out[f"{prefix}.input_global_scale"] = _one(prefix, "input_global_scale",
                                                   getattr(qt, "input_global_scale", None))
    return out


def _one(prefix: str, name: str, t: Optional[torch.Tensor]) -> torch.Tensor:
    if t is None or not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{prefix}: {name}: expected a float32 tensor of one element, got "
                         f"{getattr(t, 'shape', t)!r}")
    v = t.detach().to("cpu", torch.float32).reshape(1).clone()
    if not bool(torch.isfinite(v).all()) or float(v) <= 0:
        raise ValueError(f"{prefix}: {name}: expected a finite value > 0, got {float(v)}")
    return v


def _pack_quantized(prefix: str, qt: Any, fmt: IntFormat, weight_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``pack-quantized``: ``weight_packed`` int32 [out, ceil(in*bits/32)] (packed along the input dim, LSB first,
    +2^(b-1)), ``weight_scale`` [out, G] (G = 1 for per-channel), ``weight_shape`` int64 [2],
    ``weight_zero_point`` int32 [ceil(out*bits/32), G] (packed along the output dim, asymmetric only)."""
    from moequant import ops

    codes = qt.codes
    if codes.dtype != torch.int8:
        raise ValueError(f"{prefix}: codes: expected int8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
    out_f, in_f = codes.shape
    bits, gs, sym = fmt.key
    groups = in_f // gs if 0 < gs < in_f else 1
    if 0 < gs < in_f and in_f % gs:
        raise ValueError(f"{prefix}: group_size: expected a divisor of in_features={in_f}, got {gs}")
    if tuple(qt.scale.shape) != (out_f, groups):
        raise ValueError(f"{prefix}: scale: expected shape {(out_f, groups)}, got {tuple(qt.scale.shape)}")
    scale = _exact_scales(prefix, qt.scale, weight_dtype)
    packed = ops.pack_int32(codes.detach().cpu(), bits)
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out_f, math.ceil(in_f * bits / 32)):
        raise RuntimeError(f"{prefix}: ops.pack_int32 returned {packed.dtype} {tuple(packed.shape)}")
    result = {
        f"{prefix}.weight_packed": packed,
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    zp = qt.zero_point
    if sym:
        if zp is not None and bool((zp != 0).any()):
            raise ValueError(f"{prefix}: symmetric quantization with non-zero zero points")
    else:
        if zp is None or tuple(zp.shape) != (out_f, groups):
            raise ValueError(f"{prefix}: zero_point: expected int8 [{out_f}, {groups}] for an asymmetric scheme")
        zpp = ops.pack_zero_points(zp.detach().cpu().to(torch.int8), bits)
        if zpp.dtype != torch.int32 or tuple(zpp.shape) != (math.ceil(out_f * bits / 32), groups):
            raise RuntimeError(f"{prefix}: ops.pack_zero_points returned {zpp.dtype} {tuple(zpp.shape)}")
        result[f"{prefix}.weight_zero_point"] = zpp
    return result


def decompress(get: Callable[[str], torch.Tensor], prefix: str, fmt, compression: str,
               shape: Optional[tuple] = None) -> torch.Tensor:
    """The weight of module ``prefix`` as a loader reconstructs it from its tensors (``get(name)`` reads one), in
    the dtype of its ``weight_scale`` for integer and FP8 formats (the checkpoint's) and in bfloat16 for NVFP4 and MX
    (compressed-tensors' own FP4 decompression dtype). ``shape``: ``(out, in)`` where no ``weight_shape`` is stored
    (int-quantized / float-quantized / FP4 read it from the tensors)."""
    from moequant import ops

    if compression == PACK_QUANTIZED:
        bits = fmt.bits
        scale = get(f"{prefix}.weight_scale")
        out_f, in_f = (int(v) for v in get(f"{prefix}.weight_shape").tolist())
        codes = ops.unpack_int32(get(f"{prefix}.weight_packed"), bits, in_f)
        zp = None if fmt.symmetric else ops.unpack_zero_points(get(f"{prefix}.weight_zero_point"), bits, out_f)
        return ops.dequantize(codes, scale, zp, fmt.group_size, bits).to(scale.dtype)
    if compression == INT_QUANTIZED:
        scale = get(f"{prefix}.weight_scale")
        return ops.dequantize(get(f"{prefix}.weight"), scale, None, -1, 8).to(scale.dtype)
    if not isinstance(fmt, FloatFormat):
        raise ValueError(f"{prefix}: {compression!r} stores floating-point weights, got {fmt.label()}")
    if compression == FLOAT_QUANTIZED:
        scale = get(f"{prefix}.weight_scale")
        w = get(f"{prefix}.weight")
        q = ops.FormatQuantized(w.view(torch.uint8), scale.float().reshape(fmt.scale_shape(*w.shape)),
                                None, None, torch.ones(1), None, format=fmt.core(scale.dtype))
        return ops.format_dequantize(q, torch.float32).to(scale.dtype)
    if compression == MXFP8_QUANTIZED:
        codes = get(f"{prefix}.weight").view(torch.uint8)
    elif compression in _PACKED_COLS:
        packed = get(f"{prefix}.weight_packed")
        # four FP6 codes in three bytes, two FP4 codes a byte
        cols = packed.shape[1] * 4 // 3 if compression == MXFP6_PACK_QUANTIZED else packed.shape[1] * 2
        codes = ops.unpack_fp_codes(packed, getattr(ops.ElementKind, fmt.element), cols)
    else:
        raise ValueError(f"{prefix}: unknown compressed-tensors format {compression!r}")
    sc = get(f"{prefix}.weight_scale").view(torch.uint8)
    core = fmt.core()
    if compression == NVFP4_PACK_QUANTIZED:
        values = sc.view(torch.float8_e4m3fn).float()
        g = get(f"{prefix}.weight_global_scale").float().reshape(1)
    else:  # MX: E8M0 scales
        values = torch.ldexp(torch.ones_like(sc, dtype=torch.float32), sc.to(torch.int32) - 127)
        g = torch.ones(1)
    q = ops.FormatQuantized(codes, values, sc, None, g, None, format=core)
    return ops.format_dequantize(q, torch.bfloat16)
