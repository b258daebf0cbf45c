"""Plain-PyTorch twin of ``libmoequant/include/moequant/pack.h``: the compressed-tensors ``pack-quantized`` layout.

A signed b-bit code q is stored as ``u = q + 2**(b-1)``; element i of a row occupies bits ``[i*b, i*b + b)`` of
the row's bit stream, least significant bit first; word c holds stream bits ``[32c, 32c + 32)`` (values may
straddle two words for 3/5/6/7 bits); a row of n codes takes ``ceil(n*b/32)`` words, the tail is zero bits and the
words are reinterpreted as signed int32. Zero points ``[out, G]`` are packed the same way along the output dim.

The code below builds that bit stream literally (one int64 0/1 entry per bit), which is slow but obviously right.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant import qrange

__all__ = [
    "packed_words",
    "pack_int32_ref",
    "unpack_int32_ref",
    "pack_zero_points_ref",
    "unpack_zero_points_ref",
]


def packed_words(n: int, bits: int) -> int:
    """int32 words per packed row of n codes: ``ceil(n * bits / 32)``."""
    return (n * bits + 31) // 32


def pack_int32_ref(q: Tensor, bits: int) -> Tensor:
    """Packs codes ``q`` (any integer dtype) [rows, cols] in ``[qmin, qmax]`` -> int32 [rows, ceil(cols*bits/32)].

    Bit-exact with pack.h ``pack_rows`` and ``moequant.ops.pack_int32``.
    """
    qmin, qmax = qrange(bits)
    if q.dim() != 2:
        raise ValueError(f"q: expected a 2-D tensor, got {q.dim()}-D")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"q: expected an integer tensor, got {q.dtype}")
    q = q.to(torch.int64)
    if q.numel() and (q.min() < qmin or q.max() > qmax):
        raise ValueError(f"q: expected codes in [{qmin}, {qmax}] for {bits} bits, got [{q.min()}, {q.max()}]")
    rows, cols = q.shape
    words = packed_words(cols, bits)
    u = q + (1 << (bits - 1))  # unsigned 0 .. 2**bits - 1
    bit_of_value = torch.arange(bits, dtype=torch.int64)
    stream = ((u.unsqueeze(-1) >> bit_of_value) & 1).reshape(rows, cols * bits)  # LSB first
    stream = torch.cat([stream, torch.zeros(rows, words * 32 - cols * bits, dtype=torch.int64)], dim=1)
    word_u32 = (stream.reshape(rows, words, 32) << torch.arange(32, dtype=torch.int64)).sum(-1)
    word_i32 = torch.where(word_u32 >= 2**31, word_u32 - 2**32, word_u32)  # two's-complement reinterpretation
    return word_i32.to(torch.int32)


def unpack_int32_ref(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """Inverse of :func:`pack_int32_ref`: int32 [rows, ceil(in_features*bits/32)] -> int8 [rows, in_features].

    Bit-exact with pack.h ``unpack_rows`` and ``moequant.ops.unpack_int32``.
    """
    qrange(bits)
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise ValueError(f"packed: expected a 2-D int32 tensor, got {packed.dim()}-D {packed.dtype}")
    rows, words = packed.shape
    if in_features < 0 or packed_words(in_features, bits) != words:
        raise ValueError(
            f"in_features: expected a value with ceil(in_features*{bits}/32) == {words} packed words, got {in_features}"
        )
    w = packed.to(torch.int64) & 0xFFFFFFFF  # the unsigned word
    stream = ((w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).reshape(rows, words * 32)
    vals = stream[:, : in_features * bits].reshape(rows, in_features, bits)
    u = (vals << torch.arange(bits, dtype=torch.int64)).sum(-1)
    return (u - (1 << (bits - 1))).to(torch.int8)


def pack_zero_points_ref(zp: Tensor, bits: int) -> Tensor:
    """Packs zero points int [out, G] along the output dim -> int32 [ceil(out*bits/32), G] (pack.h ``pack_columns``)."""
    if zp.dim() != 2:
        raise ValueError(f"zp: expected a 2-D tensor [out_features, groups], got {zp.dim()}-D")
    return pack_int32_ref(zp.t(), bits).t().contiguous()


def unpack_zero_points_ref(packed: Tensor, bits: int, out_features: int) -> Tensor:
    """Inverse of :func:`pack_zero_points_ref`: int32 [ceil(out*bits/32), G] -> int8 [out, G]."""
    if packed.dim() != 2:
        raise ValueError(f"packed: expected a 2-D tensor, got {packed.dim()}-D")
    if packed_words(out_features, bits) != packed.shape[0] or out_features < 0:
        raise ValueError(
            f"out_features: expected a value with ceil(out_features*{bits}/32) == {packed.shape[0]}, got {out_features}"
        )
    return unpack_int32_ref(packed.t().contiguous(), bits, out_features).t().contiguous()
