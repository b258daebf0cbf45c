"""Weight formats and their checkpoint encodings.

* :mod:`moequant.formats.integer`: :class:`IntFormat` (bits, group size, symmetry), the one scheme type used from
  the recipe (``QuantScheme.format``) to the export and the loaders, validated in one place;
* :mod:`moequant.formats.compressed_tensors`: its compressed-tensors ``pack-quantized`` encoding (tensors per
  Linear, the ``quantization_config`` block of config.json).

Where a new format goes: its definition here (next to ``IntFormat``), its kernels (``libmoequant`` / ``kernels/``
with a :mod:`moequant.ops` entry point and a :mod:`moequant.ref` twin) and its encoding in ``compressed_tensors``.
"""
from .compressed_tensors import (PACK_QUANTIZED, WeightsConfig, as_format, compressed_tensor_names, config_formats,
                                 quantization_config_block, weights_args)
from .integer import IntFormat, check_bits, check_group_size, matrix_group_size

__all__ = ["IntFormat", "check_bits", "check_group_size", "matrix_group_size", "PACK_QUANTIZED", "WeightsConfig",
           "as_format", "compressed_tensor_names", "config_formats", "quantization_config_block", "weights_args"]
