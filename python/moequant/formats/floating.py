"""Floating-point and microscaling weight formats: :class:`FloatFormat`, the counterpart of
:class:`~moequant.formats.IntFormat` for FP8 and FP4 weights, with the same interface (``bits``, ``group_size``,
``symmetric``, ``per_channel``, ``key``, ``groups``, ``divides``, ``equivalents``, ``label``) so that the pipeline,
the work directory, the export and the loaders handle both the same way.

Six kinds, each a compressed-tensors weight scheme (docs/formats.md has the arithmetic, ``moequant/format.h`` the
one implementation):

=============  ==================================================================  ==============================
kind           elements and scales                                                 compressed-tensors
=============  ==================================================================  ==============================
``fp8``        FP8 E4M3, one scale per output channel (in the checkpoint dtype)    ``float-quantized`` (channel)
``fp8_block``  FP8 E4M3, one scale per 128 x 128 block (checkpoint dtype)           ``float-quantized`` (block)
``nvfp4``      FP4 E2M1, groups of 16, FP8 E4M3 scales, a per-tensor fp32 global   ``nvfp4-pack-quantized``
``mxfp4``      FP4 E2M1, groups of 32, E8M0 (power of two) scales                  ``mxfp4-pack-quantized``
``mxfp6``      FP6 E2M3, groups of 32, E8M0 scales (OCP MX)                        ``mxfp6-pack-quantized``
``mxfp8``      FP8 E4M3, groups of 32, E8M0 scales (OCP MX)                        ``mxfp8-quantized``
=============  ==================================================================  ==============================

A format is validated once, when it is made. Whether it fits a matrix depends on the matrix
(:meth:`FloatFormat.divides`: the NVFP4 / MX group sizes must divide ``in_features``, as compressed-tensors requires;
FP8 blocks may be partial at the edges, as in DeepSeek's own checkpoints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["FloatFormat", "FLOAT_KINDS", "nvfp4_global_scale", "weight_format_from_key"]

FLOAT_KINDS = ("fp8", "fp8_block", "nvfp4", "mxfp4", "mxfp6", "mxfp8")
# kind: (bits, group_size as the recipe states it, per-channel, label)
_KINDS = {
    "fp8": (8, -1, "FP8 per-channel"),
    "fp8_block": (8, 128, "FP8 block 128x128"),
    "nvfp4": (4, 16, "NVFP4 g16"),
    "mxfp4": (4, 32, "MXFP4 g32"),
    "mxfp6": (6, 32, "MXFP6 g32"),
    "mxfp8": (8, 32, "MXFP8 g32"),
}
MX_KINDS = ("mxfp4", "mxfp6", "mxfp8")
# the element of each kind, as moequant.ops.ElementKind names it
ELEMENTS = {"fp8": "fp8_e4m3", "fp8_block": "fp8_e4m3", "nvfp4": "fp4_e2m1", "mxfp4": "fp4_e2m1",
            "mxfp6": "fp6_e2m3", "mxfp8": "fp8_e4m3"}
FP8_MAX, FP4_MAX = 448.0, 6.0
_TINY = torch.finfo(torch.float32).tiny


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` of an absolute maximum, in float32: ``448 * 6 / amax`` as torch computes
    it, ``fl(1 / amax) * 2688`` (``amax`` clamped to the smallest normal float), 1 where that is not finite; the
    format core's ``global_scale_from_amax`` bit for bit. The NVFP4 weight global scale of a matrix
    (``amax`` its largest ``|w|``; fused partners such as q / k / v or gate / up share the one of their joint
    maximum) and the static ``input_global_scale`` of NVFP4 activations (``amax`` the largest ``|x|`` observed).
    Returns a float32 tensor of one element, on ``amax``'s device."""
    a = torch.as_tensor(amax, dtype=torch.float32).reshape(1)
    # torch evaluates generate_gparam's `2688 / amax` (a Python float by a tensor) as `amax.reciprocal() * 2688`
    g = torch.reciprocal(a.clamp_min(_TINY)) * torch.tensor(FP8_MAX * FP4_MAX, dtype=torch.float32, device=a.device)
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


@dataclass(frozen=True)
class FloatFormat:
    """A floating-point weight format (module docstring). Frozen and hashable; ``kind`` is one of
    :data:`FLOAT_KINDS`."""

    kind: str
    type: ClassVar[str] = "float"  # compressed-tensors' weights "type"
    symmetric: ClassVar[bool] = True
    block: ClassVar[tuple] = (128, 128)  # the FP8 block (rows, cols)

    def __post_init__(self) -> None:
        if self.kind not in FLOAT_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(map(repr, FLOAT_KINDS))}, got {self.kind!r}")

    # -- the IntFormat interface ---------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return _KINDS[self.kind][0]

    @property
    def group_size(self) -> int:
        """Input columns per scale: -1 (FP8 per channel), 128 (the FP8 block's width), 16 (NVFP4), 32 (MX)."""
        return _KINDS[self.kind][1]

    @property
    def per_channel(self) -> bool:
        return self.kind == "fp8"

    @property
    def is_block(self) -> bool:
        return self.kind == "fp8_block"

    @property
    def global_scale(self) -> bool:
        """NVFP4's per-tensor fp32 global scale (``weight_global_scale``)."""
        return self.kind == "nvfp4"

    @property
    def fp4(self) -> bool:
        return self.kind in ("nvfp4", "mxfp4")

    @property
    def mx(self) -> bool:
        """An OCP microscaling kind (MXFP4 / MXFP6 / MXFP8): groups of 32 with E8M0 scales."""
        return self.kind in MX_KINDS

    @property
    def byte_scales(self) -> bool:
        """Scales stored as one byte per group (FP8 E4M3 for NVFP4, E8M0 for MX) rather than in the checkpoint
        dtype (FP8 per channel / block)."""
        return self.kind == "nvfp4" or self.mx

    @property
    def element(self) -> str:
        """The element kind, as :class:`moequant.ops.ElementKind` names it (``"fp4_e2m1"``, ``"fp6_e2m3"``, ...)."""
        return ELEMENTS[self.kind]

    @property
    def key(self) -> tuple:
        """``(kind,)``: what the work directory stores (:func:`weight_format_from_key` reads it back)."""
        return (self.kind,)

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The shape of the scale tensor of an ``[out, in]`` matrix (the FP8 blocks' edge blocks may be partial)."""
        if self.kind == "fp8":
            return (out_features, 1)
        if self.kind == "fp8_block":
            return (math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1]))
        return (out_features, in_features // self.group_size)

    def groups(self, in_features: int) -> int:
        """Scales per row of a matrix of ``in_features`` columns (ValueError if the format does not fit it); for FP8
        blocks, the blocks across a row."""
        if not self.divides(in_features):
            raise ValueError(f"in_features: {self.label()} needs a multiple of {self.group_size} input columns, got "
                             f"{in_features}")
        return self.scale_shape(1, in_features)[1]

    def divides(self, in_features: int) -> bool:
        """Whether the format fits a matrix of ``in_features`` columns (NVFP4 / MX: a multiple of the group size)."""
        return not self.byte_scales or in_features % self.group_size == 0

    def splits_rows(self, rows: int) -> bool:
        """Whether a matrix quantized whole can be cut after ``rows`` rows into two matrices quantized the same
        (gate and up solved stacked): always, except inside an FP8 block."""
        return self.kind != "fp8_block" or rows % self.block[0] == 0

    def equivalents(self, in_features: int) -> frozenset:
        """The formats a matrix quantized in this format is stored correctly under: itself."""
        return frozenset({self})

    def storage_bits(self, out_features: int, in_features: int, scale_bits: int = 16) -> int:
        """Bits an ``[out_features, in_features]`` matrix's weight tensors take in the checkpoint
        (:func:`moequant.formats.tensors.compressed_tensor_names`): FP8 one byte a weight plus ``scale_bits`` scales
        (checkpoint dtype) per row or per 128 x 128 block; NVFP4 / MX the element's bits a weight plus one byte
        (FP8 E4M3 / E8M0) per group, and NVFP4's float32 ``weight_global_scale``. (NVFP4 W4A4's
        ``input_global_scale``, 32 bits, belongs to the activations.) ValueError if the format does not fit
        ``in_features``."""
        groups = self.groups(in_features)
        if not self.byte_scales:
            return 8 * out_features * in_features + self.scale_shape(out_features, in_features)[0] * groups * scale_bits
        return self.bits * out_features * in_features + 8 * out_features * groups + (32 if self.global_scale else 0)

    def label(self) -> str:
        """``"NVFP4 g16"``, ``"FP8 block 128x128"``, ..."""
        return _KINDS[self.kind][2]

    # -- the format core -----------------------------------------------------------------------------
    def core(self, scale_dtype: torch.dtype = torch.float32):
        """The ``moequant.ops.Format`` (``moequant/format.h``) of this format; ``scale_dtype``: the dtype FP8's
        float scales are rounded to (the checkpoint's weight dtype, so that loaders reconstruct exactly the weights
        the solver computed; NVFP4's and MX scales are FP8 / E8M0 bytes whatever it is)."""
        from moequant import _C  # the native extension; imported lazily so this module imports without it

        sd = {torch.float32: _C.ScaleDtype.float32, torch.bfloat16: _C.ScaleDtype.bfloat16,
              torch.float16: _C.ScaleDtype.float16}.get(scale_dtype)
        if sd is None:
            raise ValueError(f"scale_dtype: expected torch.float32, torch.bfloat16 or torch.float16, got {scale_dtype}")
        if self.kind == "fp8":
            return _C.Format.fp8_channel(sd)
        if self.kind == "fp8_block":
            return _C.Format.fp8_block(self.block[0], self.block[1], sd)
        if self.kind == "nvfp4":
            return _C.Format.nvfp4()
        return _C.Format.mx(getattr(_C.ElementKind, self.element))


def weight_format_from_key(key: Any):
    """The weight format of a stored key: ``[bits, group_size, symmetric]`` (an
    :class:`~moequant.formats.IntFormat`) or ``[kind]`` (a :class:`FloatFormat`)."""
    from .integer import IntFormat

    key = list(key) if isinstance(key, (list, tuple)) else key
    if isinstance(key, list) and len(key) == 1 and isinstance(key[0], str):
        return FloatFormat(key[0])
    if isinstance(key, list) and len(key) == 3:
        return IntFormat.from_key(key)
    raise ValueError(f"format key: expected [bits, group_size, symmetric] or [kind], got {key!r}")
