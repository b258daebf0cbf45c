"""Weight and activation formats, the named schemes, and their checkpoint encodings.

* :mod:`moequant.formats.integer`: :class:`IntFormat` (bits, group size, symmetry);
* :mod:`moequant.formats.floating`: :class:`FloatFormat` (FP8 per channel / 128x128 blocks, NVFP4, MXFP4 / 6 / 8),
  with IntFormat's interface: the two are the weight formats used from the recipe (``QuantScheme.format``) through the
  solvers, the work directory and the export to the loaders, each validated in one place;
* :mod:`moequant.formats.activations`: :class:`ActivationFormat`, the runtime's quantization of a Linear's input
  (W8A8 / W4A4 schemes);
* :mod:`moequant.formats.schemes`: the named presets (W4A16, W8A16, W8A8, FP8, FP8_BLOCK, NVFP4, NVFP4A16, MXFP4,
  MXFP4A16, MXFP6A16, MXFP8A16) and the compressed-tensors format of a weight / activation pair;
* :mod:`moequant.formats.compressed_tensors`: the ``quantization_config`` block of config.json, written and parsed;
* :mod:`moequant.formats.tensors`: the tensors of one quantized Linear in each compressed-tensors format, and
  their decompression.

Where a new format goes: its definition here (next to ``IntFormat`` / ``FloatFormat``), its kernels
(``libmoequant`` / ``kernels/`` with a :mod:`moequant.ops` entry point and a :mod:`moequant.ref` twin), its
config arguments in ``compressed_tensors`` and its tensors in ``tensors``.
"""
from .activations import ACTIVATION_KINDS, ActivationFormat
from .compressed_tensors import (MIXED_PRECISION, ConfigGroup, WeightsConfig, as_format, config_formats,
                                 config_groups, group_of, quantization_config_block, weights_args)
from .floating import FLOAT_KINDS, FloatFormat, nvfp4_global_scale, weight_format_from_key
from .integer import IntFormat, check_bits, check_group_size, matrix_group_size
from .schemes import (FLOAT_QUANTIZED, INT_QUANTIZED, MXFP4_PACK_QUANTIZED, MXFP6_PACK_QUANTIZED, MXFP8_QUANTIZED,
                      NVFP4_PACK_QUANTIZED, PACK_QUANTIZED, PRESET_ALIASES, PRESETS, Preset, WeightFormat, compression_format, preset,
                      scheme_storage_bits)
from .tensors import COMPANIONS, compressed_tensor_names, decompress

__all__ = ["IntFormat", "FloatFormat", "ActivationFormat", "WeightFormat", "FLOAT_KINDS", "ACTIVATION_KINDS",
           "check_bits", "check_group_size", "matrix_group_size", "nvfp4_global_scale", "weight_format_from_key",
           "Preset", "PRESETS", "PRESET_ALIASES", "preset", "compression_format", "scheme_storage_bits",
           "PACK_QUANTIZED", "INT_QUANTIZED", "FLOAT_QUANTIZED", "NVFP4_PACK_QUANTIZED", "MXFP4_PACK_QUANTIZED",
           "MXFP6_PACK_QUANTIZED", "MXFP8_QUANTIZED", "MIXED_PRECISION", "WeightsConfig", "ConfigGroup", "as_format", "config_formats", "config_groups",
           "group_of", "quantization_config_block", "weights_args", "compressed_tensor_names", "decompress", "COMPANIONS"]
