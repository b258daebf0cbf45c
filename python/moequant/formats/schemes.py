"""Named schemes as users know them from llm-compressor (``scheme="NVFP4"``): a weight format, an input-activation
format, and the compressed-tensors format a checkpoint stores them in. The recipe's ``scheme: NVFP4`` / the CLI's
``--scheme NVFP4`` (:class:`moequant.recipe.QuantScheme` ``preset``) and the export read them from here.

============  =================================================  ==================  ========================
preset        weights                                            input activations   compressed-tensors format
============  =================================================  ==================  ========================
W4A16         int4, groups of 128, symmetric                     --                  pack-quantized
W8A16         int8, groups of 128, symmetric                     --                  pack-quantized
W8A8          int8 per channel, symmetric                        int8 per token      int-quantized
FP8           FP8 per channel (llm-compressor's FP8_DYNAMIC)     FP8 per token       float-quantized
FP8_BLOCK     FP8 in 128 x 128 blocks (DeepSeek-V3's layout)     FP8 per 128 columns float-quantized
NVFP4         FP4 g16, FP8 scales, fp32 global scale             NVFP4 (static       nvfp4-pack-quantized
                                                                 global scale)
NVFP4A16      as NVFP4                                           --                  nvfp4-pack-quantized
MXFP4         FP4 g32, E8M0 scales                               MXFP4 (dynamic)     mxfp4-pack-quantized
MXFP4A16      as MXFP4                                           --                  mxfp4-pack-quantized
MXFP6A16      FP6 E2M3 g32, E8M0 scales (OCP MX)                 --                  mxfp6-pack-quantized
MXFP6A8       as MXFP6A16                                        MXFP8 (dynamic)     mxfp6-pack-quantized
MXFP8A16      FP8 E4M3 g32, E8M0 scales (OCP MX)                 --                  mxfp8-quantized
MXFP8         as MXFP8A16                                        MXFP8 (dynamic)     mxfp8-quantized
============  =================================================  ==================  ========================

Aliases: ``FP8_DYNAMIC`` = FP8, ``INT8`` = W8A8 (llm-compressor's names). llm-compressor's ``FP8`` (static per-tensor
weights and activations) is not offered: moequant's FP8 is the dynamic per-token scheme.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from .activations import ActivationFormat
from .floating import FloatFormat
from .integer import IntFormat

__all__ = ["Preset", "PRESETS", "PRESET_ALIASES", "preset", "compression_format", "scheme_storage_bits",
           "PACK_QUANTIZED", "INT_QUANTIZED", "FLOAT_QUANTIZED", "NVFP4_PACK_QUANTIZED", "MXFP4_PACK_QUANTIZED",
           "MXFP6_PACK_QUANTIZED", "MXFP8_QUANTIZED", "MIXED_PRECISION", "WeightFormat"]

PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
NVFP4_PACK_QUANTIZED = "nvfp4-pack-quantized"
MXFP4_PACK_QUANTIZED = "mxfp4-pack-quantized"
MXFP6_PACK_QUANTIZED = "mxfp6-pack-quantized"
MXFP8_QUANTIZED = "mxfp8-quantized"
MIXED_PRECISION = "mixed-precision"

WeightFormat = Union[IntFormat, FloatFormat]


@dataclass(frozen=True)
class Preset:
    """A named scheme: ``weights`` (an :class:`IntFormat` or :class:`FloatFormat`), ``activations`` (an
    :class:`ActivationFormat`, None for weight-only) and its scale search (``"minmax"``: the float formats have no
    MSE search)."""

    name: str
    weights: WeightFormat
    activations: Optional[ActivationFormat] = None

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    @property
    def format(self) -> str:
        return compression_format(self.weights, self.activations)


_W8_CHANNEL = IntFormat(8, -1, True)
PRESETS = {p.name: p for p in (
    Preset("W4A16", IntFormat(4, 128, True)),
    Preset("W8A16", IntFormat(8, 128, True)),
    Preset("W8A8", _W8_CHANNEL, ActivationFormat("int8_token")),
    Preset("FP8", FloatFormat("fp8"), ActivationFormat("fp8_token")),
    Preset("FP8_BLOCK", FloatFormat("fp8_block"), ActivationFormat("fp8_group")),
    Preset("NVFP4", FloatFormat("nvfp4"), ActivationFormat("nvfp4")),
    Preset("NVFP4A16", FloatFormat("nvfp4")),
    Preset("MXFP4", FloatFormat("mxfp4"), ActivationFormat("mxfp4")),
    Preset("MXFP4A16", FloatFormat("mxfp4")),
    Preset("MXFP6A16", FloatFormat("mxfp6")),
    Preset("MXFP6A8", FloatFormat("mxfp6"), ActivationFormat("mxfp8")),
    Preset("MXFP8A16", FloatFormat("mxfp8")),
    Preset("MXFP8", FloatFormat("mxfp8"), ActivationFormat("mxfp8")),
)}
PRESET_ALIASES = {"FP8_DYNAMIC": "FP8", "INT8": "W8A8"}


def preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive; aliases resolved), else ValueError listing them."""
    key = name.upper() if isinstance(name, str) else name
    key = PRESET_ALIASES.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"preset: expected one of {', '.join(list(PRESETS) + list(PRESET_ALIASES))}, got {name!r}")
    return PRESETS[key]


def compression_format(weights: WeightFormat, activations: Optional[ActivationFormat]) -> str:
    """The compressed-tensors format of a module quantized with ``weights`` and ``activations`` (compressed-tensors'
    own inference, ``compressors/format.py``): FP4 g16 -> nvfp4-pack-quantized, FP4 g32 -> mxfp4-pack-quantized,
    FP6 g32 -> mxfp6-pack-quantized, FP8 g32 (E8M0 scales) -> mxfp8-quantized, other FP8 -> float-quantized, int8 with int8 activations -> int-quantized, other integers -> pack-quantized.
    ValueError for pairs no loader reads (activations without a matching weight format)."""
    if isinstance(weights, FloatFormat):
        if weights.kind == "nvfp4" and (activations is None or activations.kind == "nvfp4"):
            return NVFP4_PACK_QUANTIZED
        if weights.kind == "mxfp4" and (activations is None or activations.kind == "mxfp4"):
            return MXFP4_PACK_QUANTIZED
        if weights.kind == "mxfp6" and (activations is None or activations.kind == "mxfp8"):
            return MXFP6_PACK_QUANTIZED
        if weights.kind == "mxfp8" and (activations is None or activations.kind == "mxfp8"):
            return MXFP8_QUANTIZED
        if weights.kind in ("fp8", "fp8_block") and activations is not None and activations.kind.startswith("fp8"):
            return FLOAT_QUANTIZED
    elif isinstance(weights, IntFormat):
        if activations is None:
            return PACK_QUANTIZED
        if activations.kind == "int8_token" and weights.bits == 8 and weights.symmetric and weights.per_channel:
            return INT_QUANTIZED
    raise ValueError(f"activations: {activations.label() if activations else 'none'} cannot go with "
                     f"{weights.label()} weights in a compressed-tensors checkpoint; use a preset "
                     f"({', '.join(PRESETS)})")


def scheme_storage_bits(weights: WeightFormat, activations: Optional[ActivationFormat], out_features: int,
                        in_features: int, scale_bits: int = 16) -> int:
    """Bits an ``[out, in]`` matrix quantized with ``weights`` / ``activations`` takes in a compressed-tensors
    checkpoint, in the format the pair implies (:func:`compression_format`): the weight format's ``storage_bits``,
    except W8A8's ``int-quantized`` (int8 codes unpacked, one ``scale_bits`` scale per row, no ``weight_shape``),
    plus NVFP4 W4A4's float32 ``input_global_scale`` (the budget's fixed bits of a pinned matrix)."""
    if compression_format(weights, activations) == INT_QUANTIZED:
        return 8 * out_features * in_features + out_features * scale_bits
    return weights.storage_bits(out_features, in_features, scale_bits) + \
        (32 if activations is not None and activations.static_global_scale else 0)
