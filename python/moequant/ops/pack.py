"""Packing of integer codes into compressed-tensors int32 words (``pack-quantized``, docs/formats.md), along the
input dimension (codes) or the output dimension (zero points). Twins: :mod:`moequant.ref.pack`."""
from __future__ import annotations

import torch

from moequant import _C
from moequant.formats import check_bits

__all__ = ["pack_int32", "unpack_int32", "pack_zero_points", "unpack_zero_points"]


def _as_codes(q: torch.Tensor, name: str) -> torch.Tensor:
    if type(q) is torch.Tensor and q.dtype is torch.int8 and q.dim() == 2:
        return q.contiguous()  # the common call (int8 codes), ahead of the checks it satisfies
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of integer codes, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer dtype (int8 codes), got {q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(q.shape)}")
    if q.dtype != torch.int8:
        lo, hi = (int(q.min()), int(q.max())) if q.numel() else (0, 0)
        if lo < -128 or hi > 127:
            raise ValueError(f"{name}: expected codes in [-128, 127], got values in [{lo}, {hi}]")
        q = q.to(torch.int8)
    return q.contiguous()


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs signed codes ``[rows, cols]`` into compressed-tensors int32 words ``[rows, ceil(cols*bits/32)]``.

    Element ``i`` of a row occupies bits ``[i*bits, (i+1)*bits)`` of the row's bit stream (offset by
    ``2^(bits-1)``, least significant first). Example: ``pack_int32(tensor([[-8,...,-1]]), 4) == [[0x76543210]]``.
    """
    return _C.pack_rows(_as_codes(q, "q"), check_bits(bits))


def unpack_int32(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int8 ``[rows, in_features]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32:
        raise ValueError(f"packed: expected an int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    return _C.unpack_rows(packed.contiguous(), check_bits(bits), int(in_features))


def pack_zero_points(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs zero points ``[out, G]`` along the output dimension: int32 ``[ceil(out*bits/32), G]``."""
    zp = _as_codes(zero_point, "zero_point")
    bits = check_bits(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if zp.numel() and (int(zp.min()) < lo or int(zp.max()) > hi):
        raise ValueError(f"zero_point: expected values in [{lo}, {hi}] for {bits} bits, got values in "
                         f"[{int(zp.min())}, {int(zp.max())}]")
    return _C.pack_rows(zp.t().contiguous(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`: int8 ``[out_features, G]``."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"packed: expected a 2-D int32 tensor, got {getattr(packed, 'dtype', type(packed))}")
    bits = check_bits(bits)
    words = (int(out_features) * bits + 31) // 32
    if int(out_features) < 0 or packed.shape[0] != words:
        raise ValueError(f"out_features: expected a value whose packing at {bits} bits takes {packed.shape[0]} "
                         f"int32 rows (packed has that many), got {out_features} which takes {words}")
    return _C.unpack_rows(packed.t().contiguous(), bits, int(out_features)).t().contiguous()

