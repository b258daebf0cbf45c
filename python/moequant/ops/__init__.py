"""Tensor-level operations of moequant, backed by the C++ core (CPU) and the CUDA kernels (GPU).

Every function takes torch tensors, converts them to the layout the extension wants (float32, contiguous,
int8 codes, int32 expert ids) and returns torch tensors. The plain-PyTorch twins in :mod:`moequant.ref`
define the exact semantics, file for file (``ops.quant`` ~ ``ref.quant``, ``ops.pack`` ~ ``ref.pack``, ...); each
function here is tested against its twin (``tests/python/test_ops.py``) under the policy in
``tests/python/tolerances.py``.

One module per op family: :mod:`~moequant.ops.quant` (``QuantizedTensor``, ``quantize_rtn``, ``dequantize``,
``make_spec``), :mod:`~moequant.ops.pack`, :mod:`~moequant.ops.hessian` (``HessianAccumulator``),
:mod:`~moequant.ops.gptq` (``gptq_quantize`` for ints, ``gptq_quantize_format`` for every format),
:mod:`~moequant.ops.hadamard`, :mod:`~moequant.ops.rounding` (``refine_rounding``),
:mod:`~moequant.ops.formats` (FP8 / FP4 / FP6 / MX formats and the FP8-block and MXFP4 source decoders),
:mod:`~moequant.ops.float_quant` (``FloatQuantizedTensor``, ``quantize_float``: the pipeline's results in a
:class:`~moequant.formats.FloatFormat`).
"""
from .formats import (Format, FormatQuantized, decode_fp8_block_scaled, decode_mxfp4_blocks, format_dequantize,
                      format_quantize, pack_fp_codes, unpack_fp_codes)
from .gptq import gptq_quantize, gptq_quantize_batched, gptq_quantize_format, gptq_quantize_format_batched
from .hadamard import hadamard_transform
from .hessian import HessianAccumulator
from .pack import pack_int32, pack_zero_points, unpack_int32, unpack_zero_points
from .quant import QuantizedTensor, dequantize, make_spec, quantize_rtn
from .rounding import refine_rounding
from .float_quant import FloatQuantizedTensor, from_format_quantized, quantize_float
from .formats import ElementKind

__all__ = [
    "QuantizedTensor",
    "quantize_rtn",
    "dequantize",
    "pack_int32",
    "unpack_int32",
    "pack_zero_points",
    "unpack_zero_points",
    "HessianAccumulator",
    "gptq_quantize",
    "gptq_quantize_batched",
    "gptq_quantize_format",
    "gptq_quantize_format_batched",
    "hadamard_transform",
    "make_spec",
    "refine_rounding",
    "Format",
    "FormatQuantized",
    "format_quantize",
    "format_dequantize",
    "pack_fp_codes",
    "unpack_fp_codes",
    "decode_fp8_block_scaled",
    "decode_mxfp4_blocks",
    "ElementKind",
    "FloatQuantizedTensor",
    "quantize_float",
    "from_format_quantized",
]
from .act_quant import fake_quantize_activations, fake_quantize_fp8

__all__ += ["fake_quantize_activations", "fake_quantize_fp8"]
